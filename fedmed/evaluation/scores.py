"""One model's scores on one data set, with stratified bootstrap replicates, as numbers a site can share.

:func:`score` turns predicted probabilities and true labels into a :class:`Scores`: the confusion matrix,
the per-class one-vs-rest AUROC and the calibration bins, each for the observed data (index 0) and
for ``n_boot`` stratified bootstrap resamples (indices 1..n_boot). Nothing in it names an image, so a
site can send it to whoever pools the evaluation; :func:`pool` adds the sites' confusion matrices and
calibration bins replicate by replicate (a bootstrap stratified by site and class). AUROC needs the
scores themselves and is not pooled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import rankdata

from fedmed.evaluation.bootstrap import interval, stratified_indices
from fedmed.evaluation.calibration import BINS, bin_sums, ece
from fedmed.models.metrics import class_keys

LEVEL = 0.95
HEADLINE = ("acc", "balanced_acc", "f1", "auroc", "ece")
LABELS = {"acc": "accuracy", "balanced_acc": "balanced accuracy", "f1": "macro-F1", "auroc": "macro AUROC",
          "ece": "expected calibration error"}
SHORT = {"acc": "ACC", "balanced_acc": "bal. ACC", "f1": "macro-F1", "auroc": "AUROC", "ece": "ECE"}


@dataclass
class Scores:
    """A model on one data set (a site, or several pooled). Arrays hold the observed value at index 0 and
    the bootstrap replicates after it.

    Args:
        name: the site or data set.
        class_names: in label order.
        confmat: (1 + n_boot, K, K) counts, rows true class, columns predicted.
        auroc: (1 + n_boot, K) one-vs-rest AUROC per class (NaN where undefined, or pooled).
        calibration: (1 + n_boot, 3, bins) per confidence bin: count, summed confidence, number correct.
        seed: of the resampling.
    """

    name: str
    class_names: list[str]
    confmat: np.ndarray
    auroc: np.ndarray
    calibration: np.ndarray
    seed: int

    @property
    def n_boot(self) -> int:
        return len(self.confmat) - 1

    @property
    def support(self) -> np.ndarray:
        """Images per true class."""
        return self.confmat[0].sum(1)

    def metrics(self) -> dict[str, np.ndarray]:
        """Every metric as a (1 + n_boot,) array: the headline ones and per class ``recall_<class>``,
        ``precision_<class>``, ``f1_<class>``, ``auroc_<class>``."""
        cm = self.confmat.astype(np.float64)
        tp = np.diagonal(cm, axis1=1, axis2=2)
        labelled, predicted = cm.sum(2), cm.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            recall = np.where(labelled > 0, tp / labelled, np.nan)
            precision = np.where(predicted > 0, tp / predicted, 0.0)  # scikit-learn's zero_division=0
            f1 = np.where(labelled + predicted > 0, 2 * tp / (labelled + predicted), np.nan)
            out = {"acc": tp.sum(1) / cm.sum((1, 2)),
                   "balanced_acc": np.nanmean(recall, 1),
                   "f1": np.nanmean(f1, 1),  # over the classes labelled or predicted, as scikit-learn
                   "auroc": _nanmean(self.auroc),
                   "ece": ece(self.calibration)}
        for k, key in enumerate(class_keys(self.class_names)):
            out |= {f"recall_{key}": recall[:, k], f"precision_{key}": np.where(labelled[:, k] > 0,
                                                                               precision[:, k], np.nan),
                    f"f1_{key}": f1[:, k], f"auroc_{key}": self.auroc[:, k]}
        return out

    def summary(self, level: float = LEVEL) -> dict[str, dict[str, float]]:
        """metric -> {value, low, high}: the observed value and its percentile bootstrap interval."""
        out = {}
        for name, values in self.metrics().items():
            lo, hi = interval(values[1:], level)
            out[name] = {"value": float(values[0]), "low": lo, "high": hi}
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and numbers (what a site sends; JSON as logged)."""
        return {"name": self.name, "class_names": list(self.class_names), "seed": self.seed,
                "confmat": self.confmat.tolist(), "auroc": self.auroc.tolist(),
                "calibration": self.calibration.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scores:
        """The inverse of :meth:`to_dict`; shapes are checked (it may come from another party)."""
        confmat = np.asarray(d["confmat"], dtype=np.int64)
        auroc = np.asarray(d["auroc"], dtype=np.float64)
        calibration = np.asarray(d["calibration"], dtype=np.float64)
        k = len(d["class_names"])
        if confmat.ndim != 3 or confmat.shape[1:] != (k, k) or auroc.shape != confmat.shape[:2] \
                or calibration.shape[:2] != (len(confmat), 3) or (confmat < 0).any():
            raise ValueError(f"scores of {d.get('name')!r} do not have the shapes of {k} classes")
        return cls(str(d["name"]), [str(c) for c in d["class_names"]], confmat, auroc, calibration, int(d["seed"]))


def _nanmean(a: np.ndarray) -> np.ndarray:
    defined = np.isfinite(a)
    return np.where(defined.any(1), np.where(defined, a, 0).sum(1) / np.maximum(defined.sum(1), 1), np.nan)


def score(probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str], name: str, n_boot: int = 1000,
          seed: int = 0, bins: int = BINS) -> Scores:
    """Score predicted class probabilities ``probs`` (n, K) against ``labels`` (n,).

    The bootstrap resamples images within each true class (``n_boot`` times, ``seed``), so every
    replicate has the observed class counts.
    """
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    k = len(class_names)
    if probs.ndim != 2 or probs.shape[1] != k or len(probs) != len(labels):
        raise ValueError(f"probs {probs.shape} and labels {labels.shape} do not match {k} classes")
    if len(labels) and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"labels outside 0..{k - 1}")
    n = len(labels)
    rows = np.vstack([np.arange(n)[None, :], stratified_indices(labels, n_boot, seed)])  # (1 + B, n)
    y, p = labels[rows], probs.argmax(1)[rows]
    reps = np.arange(len(rows))[:, None]
    confmat = np.bincount((reps * k * k + y * k + p).ravel(), minlength=len(rows) * k * k).reshape(-1, k, k)
    auroc = np.full((len(rows), k), np.nan)
    for c in range(k):  # Mann-Whitney: ranks of the positives' scores among all (ties: mean rank)
        pos = labels == c
        n_pos, n_neg = int(pos.sum()), int(n - pos.sum())
        if n_pos and n_neg:
            ranks = rankdata(probs[:, c][rows], axis=1)
            auroc[:, c] = ((ranks * (y == c)).sum(1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    calibration = bin_sums(probs.max(1)[rows], p == y, bins)
    return Scores(name, list(class_names), confmat, auroc, calibration, seed)


def pool(parts: Sequence[Scores], name: str = "pooled") -> Scores:
    """Several data sets' scores as one: confusion matrices and calibration bins added replicate by
    replicate; AUROC is left undefined (it needs the scores, which stay where they are)."""
    if not parts:
        raise ValueError("nothing to pool")
    first = parts[0]
    for s in parts[1:]:
        if s.class_names != first.class_names or s.confmat.shape != first.confmat.shape \
                or s.calibration.shape != first.calibration.shape:
            raise ValueError(f"scores of {s.name!r} and {first.name!r} differ in classes or replicates")
    return Scores(name, list(first.class_names), np.sum([s.confmat for s in parts], axis=0),
                  np.full(first.auroc.shape, np.nan), np.sum([s.calibration for s in parts], axis=0), first.seed)


def fmt(entry: dict[str, float]) -> str:
    """``0.512 [0.483, 0.541]``, or ``-`` where undefined."""
    if not np.isfinite(entry["value"]):
        return "-"
    if not np.isfinite(entry["low"]):
        return f"{entry['value']:.3f}"
    return f"{entry['value']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}]"


def interval_table(parts: Sequence[Scores], level: float = LEVEL) -> tuple[list[str], list[list[str]]]:
    """The headline metrics of each data set with their intervals: (header, rows), one row per data set."""
    header = ["data", "n", *[SHORT[m] for m in HEADLINE]]
    rows = []
    for s in parts:
        summary = s.summary(level)
        rows.append([s.name, str(int(s.support.sum())), *[fmt(summary[m]) for m in HEADLINE]])
    return header, rows
