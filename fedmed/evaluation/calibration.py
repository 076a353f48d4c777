"""Calibration of the top-label confidence: equal-width bins, expected calibration error, reliability diagram."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

BINS = 15  # as torchmetrics' MulticlassCalibrationError


def bin_sums(confidence: np.ndarray, correct: np.ndarray, bins: int = BINS) -> np.ndarray:
    """Per bin: (count, sum of confidence, number correct), for ``(..., n)`` arrays -> ``(..., 3, bins)``.

    Bin ``b`` holds confidences in ``(b/bins, (b+1)/bins]`` (the first bin also holds 0).
    """
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    lead = confidence.shape[:-1]
    flat = which.reshape(-1, confidence.shape[-1]) + bins * np.arange(int(np.prod(lead)))[:, None]
    size = int(np.prod(lead)) * bins
    out = [np.bincount(flat.ravel(), weights=w.ravel(), minlength=size).reshape(*lead, bins)
           for w in (np.ones_like(confidence), confidence, correct.astype(np.float64))]
    return np.stack(out, axis=-2)


def ece(sums: np.ndarray) -> np.ndarray:
    """Expected calibration error from :func:`bin_sums`: sum over bins of |confidence - accuracy| x share."""
    count, conf, right = sums[..., 0, :], sums[..., 1, :], sums[..., 2, :]
    return np.abs(conf - right).sum(-1) / np.maximum(count.sum(-1), 1)


def reliability_figure(sums: np.ndarray, title: str) -> Figure:
    """Accuracy against confidence per bin (bars), the diagonal of perfect calibration, and how many images
    each bin holds; ``sums`` as from :func:`bin_sums` for one data set."""
    count, conf, right = sums
    bins = len(count)
    edges = np.linspace(0, 1, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    filled = count > 0
    fig = Figure(figsize=(5.2, 5.6), dpi=120, layout="constrained")
    top, bottom = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    acc = np.divide(right, count, out=np.zeros(bins), where=filled)
    mean_conf = np.divide(conf, count, out=np.zeros(bins), where=filled)
    top.bar(centres[filled], acc[filled], width=1 / bins, edgecolor="#1f3b73", color="#4c72b0", label="accuracy")
    top.plot([0, 1], [0, 1], ls="--", color="#555555", lw=1, label="perfect calibration")
    top.scatter(mean_conf[filled], acc[filled], color="#dd8452", s=14, zorder=3, label="mean confidence in bin")
    top.set(ylabel="accuracy in bin", xlim=(0, 1), ylim=(0, 1))
    top.set_title(f"{title}\nECE {float(ece(sums)):.3f} ({bins} bins, n={int(count.sum())})", fontsize=10)
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centres, count, width=1 / bins, color="#8c8c8c")
    bottom.set(xlabel="confidence of the predicted class", ylabel="images")
    return fig
