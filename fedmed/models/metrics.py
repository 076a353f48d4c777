"""Classification metrics (torchmetrics) and a plain evaluation loop.

Scalar metrics keep one name each (``acc``, ``balanced_acc``, ``precision``, ``recall``, ``f1``,
``auroc``, ``loss``); per-class ones are ``<metric>_class<i>`` here, and
:func:`name_classes` renames them after the classes (``f1_pneumonia``) for MLflow.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)


def make_metrics(num_classes: int) -> MetricCollection:
    """Accuracy, macro precision/recall/F1, per-class F1 and recall, macro AUROC and the confusion matrix.

    :func:`flatten_metrics` adds the balanced accuracy (``balanced_acc``) from the confusion matrix.

    Binary tasks are treated as 2-class multiclass: macro one-vs-rest AUROC then equals the
    binary AUROC. The macro AUROC averages only the classes that have both positives and negatives
    in the evaluated data (:func:`flatten_metrics`); it is NaN when none has, e.g. at a site whose
    validation data holds one class (torchmetrics would count such a class as 0).
    """
    k = num_classes
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(k, average="micro"),
            "precision": MulticlassPrecision(k, average="macro"),
            "recall": MulticlassRecall(k, average="macro"),
            "f1": MulticlassF1Score(k, average="macro"),
            "f1_per_class": MulticlassF1Score(k, average="none"),
            "recall_per_class": MulticlassRecall(k, average="none"),
            "auroc": MulticlassAUROC(k, average="none"),
            "confmat": MulticlassConfusionMatrix(k),
        }
    )


def compute_metrics(metrics: MetricCollection) -> tuple[dict[str, float], torch.Tensor]:
    """``metrics.compute()`` flattened; undefined per-class AUROCs are left out quietly (see :func:`make_metrics`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"No (positive|negative) samples in targets")
        return flatten_metrics(metrics.compute())


def balanced_accuracy(confmat: torch.Tensor) -> float:
    """Mean recall over the classes present in the labels (rows of ``confmat``); NaN if none is."""
    support = confmat.sum(1)
    present = support > 0
    if not present.any():
        return float("nan")
    return float((confmat.diagonal()[present].double() / support[present].double()).mean())


def flatten_metrics(values: dict[str, torch.Tensor]) -> tuple[dict[str, float], torch.Tensor]:
    """Turn a computed collection into scalar floats (``f1_class<i>`` per class) and the confusion matrix.

    ``balanced_acc`` is the mean recall over the classes present in the labels (scikit-learn's
    ``balanced_accuracy_score``). It equals the macro ``recall`` unless a class is predicted but
    never labelled: macro recall counts that class as 0, the balanced accuracy leaves it out.
    """
    scalars: dict[str, float] = {}
    confmat = values["confmat"].cpu()
    support = confmat.sum(1)
    defined = (support > 0) & (support < support.sum())  # one-vs-rest AUROC needs positives and negatives
    auroc = values["auroc"].cpu()
    scalars["auroc"] = float(auroc[defined].mean()) if defined.any() else float("nan")
    scalars["balanced_acc"] = balanced_accuracy(confmat)
    for name, v in values.items():
        if name in ("confmat", "auroc"):
            continue
        if v.ndim == 0:
            scalars[name] = float(v)
        else:
            scalars.update({f"{name.removesuffix('_per_class')}_class{i}": float(x) for i, x in enumerate(v)})
    return scalars, confmat


def metric_key(text: str) -> str:
    """``text`` as part of an MLflow metric name: runs of anything but ASCII letters, digits, ``_ - .``
    become one ``_`` (MLflow also allows spaces and ``/``; they are left out so that names need no
    quoting in ``search_runs`` filters and make no artifact-like paths)."""
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", str(text)).strip("_") or "_"


def class_keys(class_names: Sequence[str]) -> list[str]:
    """One metric-name part per class (:func:`metric_key`); names that clash after cleaning keep their index."""
    keys = [metric_key(c) for c in class_names]
    return [k if keys.count(k) == 1 else f"{k}_{i}" for i, k in enumerate(keys)]


_PER_CLASS = re.compile(r"^(?P<metric>.+)_class(?P<index>\d+)$")


def name_classes(metrics: Mapping[str, float], class_names: Sequence[str] | None) -> dict[str, float]:
    """``f1_class1`` -> ``f1_pneumonia``, ``recall_class0`` -> ``recall_normal``; other keys unchanged.

    Without class names (or for an index beyond them) the key stays as it is.
    """
    if not class_names:
        return dict(metrics)
    keys = class_keys(class_names)
    out: dict[str, float] = {}
    for k, v in metrics.items():
        m = _PER_CLASS.match(k)
        if m and int(m["index"]) < len(keys):
            k = f"{m['metric']}_{keys[int(m['index'])]}"
        out[k] = v
    return out


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, num_classes: int) -> tuple[dict[str, float], torch.Tensor]:
    """Evaluate ``model`` (returning logits) on ``loader``: (scalar metrics incl. ``loss``, confusion matrix)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    metrics = make_metrics(num_classes).to(device)
    loss_sum, n = 0.0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        n += len(y)
        metrics.update(logits.softmax(-1), y)
    model.train(was_training)
    scalars, confmat = compute_metrics(metrics)
    scalars["loss"] = loss_sum / max(n, 1)
    return scalars, confmat
