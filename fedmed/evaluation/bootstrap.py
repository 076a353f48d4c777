"""Stratified bootstrap: resample within each true class, so that every replicate keeps the class counts."""

from __future__ import annotations

import numpy as np


def stratified_indices(labels: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """``n_boot`` resamples of ``range(len(labels))``, each class resampled with replacement within itself.

    Returns:
        (n_boot, n) indices; column block ``c`` holds the draws from class ``c``'s members.
    """
    rng = np.random.default_rng(seed)
    blocks = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        blocks.append(members[rng.integers(0, len(members), size=(n_boot, len(members)))])
    return np.concatenate(blocks, axis=1) if blocks else np.zeros((n_boot, 0), dtype=np.int64)


def interval(replicates: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of the finite replicates (NaN, NaN if there are none)."""
    finite = replicates[np.isfinite(replicates)]
    if not len(finite):
        return float("nan"), float("nan")
    lo, hi = np.quantile(finite, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)
