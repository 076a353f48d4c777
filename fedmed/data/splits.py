"""Deterministic train/val/test assignment for sources that ship without one (pure functions)."""

from __future__ import annotations

import numpy as np

from fedmed.errors import FedmedError


def group_stratified_split(labels: np.ndarray, groups: np.ndarray | None, fractions: dict[str, float],
                           seed: int) -> np.ndarray:
    """Assign each sample to a split so that no group straddles two splits.

    Groups (e.g. HAM10000's ``lesion_id``: several images of one lesion) are shuffled within their
    majority label and cut by cumulative image count, so each split gets about ``fractions[s]`` of
    every class's images.

    Args:
        labels: (N,) int labels.
        groups: (N,) group keys, or None (every sample its own group).
        fractions: e.g. ``{"val": 0.15, "test": 0.15}``; the rest is ``train``.
        seed: the assignment is a deterministic function of (labels, groups, fractions, seed).

    Returns:
        (N,) array of split names.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if sum(fractions.values()) >= 1 or any(f < 0 for f in fractions.values()):
        raise FedmedError(f"split fractions {fractions} must be >= 0 and sum to < 1")
    keys = np.arange(n).astype(str) if groups is None else np.asarray(groups).astype(str)
    uniq, inverse = np.unique(keys, return_inverse=True)
    votes = np.zeros((len(uniq), int(labels.max(initial=0)) + 1), dtype=np.int64)
    np.add.at(votes, (inverse, labels), 1)
    group_label = votes.argmax(1)  # majority label of each group
    group_size = votes.sum(1)
    rng = np.random.default_rng(seed)
    group_split = np.full(len(uniq), "train", dtype=object)
    for c in np.unique(group_label):
        members = np.flatnonzero(group_label == c)
        rng.shuffle(members)
        filled = np.cumsum(group_size[members]) / group_size[members].sum()
        lo = 0.0
        for name, frac in fractions.items():
            take = (filled > lo) & (filled <= lo + frac + 1e-12)
            if frac > 0 and not take.any() and len(members) > 1:  # small class: at least one group
                take = filled > lo
                take[np.argmax(take) + 1:] = False
            group_split[members[take & (group_split[members] == "train")]] = name
            lo += frac
    return group_split[inverse].astype(str)
