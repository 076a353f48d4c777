"""Classification metrics (torchmetrics) and a plain evaluation loop."""

from __future__ import annotations

import warnings

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
    """Accuracy, macro precision/recall/F1, per-class F1, macro AUROC and the confusion matrix.

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
            "auroc": MulticlassAUROC(k, average="none"),
            "confmat": MulticlassConfusionMatrix(k),
        }
    )


def compute_metrics(metrics: MetricCollection) -> tuple[dict[str, float], torch.Tensor]:
    """``metrics.compute()`` flattened; undefined per-class AUROCs are left out quietly (see :func:`make_metrics`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"No (positive|negative) samples in targets")
        return flatten_metrics(metrics.compute())


def flatten_metrics(values: dict[str, torch.Tensor]) -> tuple[dict[str, float], torch.Tensor]:
    """Turn a computed collection into scalar floats (``f1_class<i>`` per class) and the confusion matrix."""
    scalars: dict[str, float] = {}
    confmat = values["confmat"].cpu()
    support = confmat.sum(1)
    defined = (support > 0) & (support < support.sum())  # one-vs-rest AUROC needs positives and negatives
    auroc = values["auroc"].cpu()
    scalars["auroc"] = float(auroc[defined].mean()) if defined.any() else float("nan")
    for name, v in values.items():
        if name in ("confmat", "auroc"):
            continue
        if v.ndim == 0:
            scalars[name] = float(v)
        else:
            scalars.update({f"{name.removesuffix('_per_class')}_class{i}": float(x) for i, x in enumerate(v)})
    return scalars, confmat


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
