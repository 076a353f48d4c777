"""Which images get explained: fixed, class-stratified samples (the same images every round)."""

from __future__ import annotations

import numpy as np
import torch


def stratified_sample(labels: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Up to ``n`` indices, as equal per class as the data allows, in a seeded random order.

    Args:
        labels: (N,) class labels.
        n: how many indices.
        seed: the sample depends only on (labels, n, seed).

    Returns:
        Sorted-by-class (N',) int64 indices, N' = min(n, N).
    """
    rng = np.random.default_rng(seed)
    y = labels.cpu().numpy()
    pools = [rng.permutation(np.flatnonzero(y == c)).tolist() for c in np.unique(y)]
    picked: list[int] = []
    while len(picked) < min(n, len(y)):
        for pool in pools:
            if pool and len(picked) < n:
                picked.append(pool.pop())
    return torch.as_tensor(sorted(picked, key=lambda i: (y[i], i)), dtype=torch.long)
