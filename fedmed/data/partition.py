"""Partition a labelled split into sites: IID or Dirichlet label skew. Pure functions of (labels, seed).

The same per-site class proportions are applied to the train and the validation split, so a
site's validation data looks like its training data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedmed.errors import FedmedError

METHODS = ("iid", "dirichlet")


def dirichlet_proportions(num_classes: int, num_sites: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """Per-class site shares drawn from Dirichlet(alpha): array (num_classes, num_sites), rows sum to 1."""
    if alpha <= 0:
        raise FedmedError(f"partition.alpha must be > 0, got {alpha}")
    return rng.dirichlet(np.full(num_sites, float(alpha)), size=num_classes)


def split_by_proportions(labels: np.ndarray, proportions: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Split sample indices so that site k gets ``proportions[c, k]`` of class c.

    Args:
        labels: (N,) int class labels.
        proportions: (C, K) per-class shares, rows summing to 1.
        rng: random generator used to shuffle within each class.

    Returns:
        K sorted index arrays, disjoint, covering ``range(N)``.
    """
    num_sites = proportions.shape[1]
    parts: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
    for c in range(proportions.shape[0]):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        cuts = (np.cumsum(proportions[c])[:-1] * len(idx)).round().astype(int)
        for k, chunk in enumerate(np.split(idx, cuts)):
            parts[k].append(chunk)
    return [np.sort(np.concatenate(p)) if p else np.empty(0, dtype=np.int64) for p in parts]


def partition_labels(
    labels: Mapping[str, np.ndarray],
    num_sites: int,
    method: str = "dirichlet",
    alpha: float = 0.5,
    seed: int = 0,
    min_samples: int = 10,
    max_tries: int = 1000,
) -> dict[str, list[np.ndarray]]:
    """Partition every split in ``labels`` into ``num_sites`` disjoint index sets.

    Args:
        labels: ``{split: (N,) labels}``, e.g. ``{"train": ..., "val": ...}``.
        num_sites: number of sites K (>= 1).
        method: ``iid`` (stratified equal shares) or ``dirichlet`` (label skew, Dirichlet(alpha)).
        alpha: Dirichlet concentration; smaller is more skewed.
        seed: the partition is a deterministic function of (labels, method, alpha, seed).
        min_samples: every site must get at least this many samples of the first split;
            Dirichlet draws are repeated until it does (the usual practice).
        max_tries: give up after this many Dirichlet draws.

    Returns:
        ``{split: [indices of site 0, ..., indices of site K-1]}``.
    """
    if num_sites < 1:
        raise FedmedError(f"need at least one site, got {num_sites}")
    if method not in METHODS:
        raise FedmedError(f"partition.method={method!r} is not one of {METHODS}")
    splits = list(labels)
    num_classes = int(max(int(np.max(v)) for v in labels.values() if len(v)) + 1)
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        if method == "iid":
            props = np.full((num_classes, num_sites), 1.0 / num_sites)
        else:
            props = dirichlet_proportions(num_classes, num_sites, alpha, rng)
        out = {s: split_by_proportions(np.asarray(labels[s]), props, rng) for s in splits}
        if min(len(p) for p in out[splits[0]]) >= min_samples:
            return out
        if method == "iid":
            break
    raise FedmedError(
        f"could not give each of {num_sites} sites >= {min_samples} samples "
        f"({method}, alpha={alpha}); use fewer sites, a larger alpha or a smaller partition.min_samples"
    )


def class_counts(labels: np.ndarray, parts: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """(K, C) matrix of per-site class counts."""
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])


def label_skew(labels: np.ndarray, parts: Sequence[np.ndarray], num_classes: int) -> float:
    """Mean total-variation distance between each site's label distribution and the pooled one (0 = IID)."""
    return skew_from_counts(class_counts(labels, parts, num_classes))


def skew_from_counts(counts: np.ndarray) -> float:
    """:func:`label_skew` from a (K, C) matrix of per-site class counts."""
    counts = counts.astype(float)
    site_dist = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    pooled = counts.sum(0) / counts.sum()
    return float(0.5 * np.abs(site_dist - pooled).sum(1).mean())
