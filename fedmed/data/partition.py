"""Partition a labelled split into sites: IID, Dirichlet label skew, quantity skew, or natural (by a
metadata column such as the acquisition source). Pure functions of (labels, seed).

The same per-site class proportions are applied to the train and the validation split, so a
site's validation data looks like its training data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedmed.choices import PARTITIONS
from fedmed.errors import FedmedError

METHODS = PARTITIONS
LABEL_METHODS = ("iid", "dirichlet", "quantity")


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
        method: ``iid`` (stratified equal shares), ``dirichlet`` (label skew: each class shared by
            Dirichlet(alpha) proportions) or ``quantity`` (site sizes ~ Dirichlet(alpha), labels IID).
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
    if method not in LABEL_METHODS:
        raise FedmedError(f"partition.method={method!r} is not one of {LABEL_METHODS}")
    splits = list(labels)
    num_classes = int(max(int(np.max(v)) for v in labels.values() if len(v)) + 1)
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        if method == "iid":
            props = np.full((num_classes, num_sites), 1.0 / num_sites)
        elif method == "quantity":  # site sizes ~ Dirichlet(alpha), every site with the pooled label mix
            props = np.tile(dirichlet_proportions(1, num_sites, alpha, rng), (num_classes, 1))
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


def partition_by_group(groups: Mapping[str, np.ndarray],
                       site_groups: Sequence[Sequence[str]]) -> dict[str, list[np.ndarray]]:
    """Natural partition: site k holds every sample whose group (e.g. acquisition source) is in ``site_groups[k]``.

    Args:
        groups: ``{split: (N,) group value of each sample}``.
        site_groups: for each site, the group values it holds (disjoint across sites).

    Returns:
        ``{split: [indices of site 0, ..., indices of site K-1]}``; samples of unlisted groups are left out.
    """
    flat = [g for gs in site_groups for g in gs]
    if len(flat) != len(set(flat)):
        raise FedmedError(f"partition.groups gives a group to two sites: {list(site_groups)}")
    return {split: [np.flatnonzero(np.isin(np.asarray(v).astype(str), list(gs))) for gs in site_groups]
            for split, v in groups.items()}
