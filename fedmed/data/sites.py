"""Partition a dataset into site manifests (written once, deterministic for a seed)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedmed.data.manifest import Manifest, read_manifest, write_manifest
from fedmed.data.medmnist_source import MedMNISTSource
from fedmed.data.partition import partition_labels, skew_from_counts
from fedmed.errors import ManifestError

log = logging.getLogger("fedmed")


def build_manifests(
    source: MedMNISTSource,
    sites: Sequence[str],
    method: str,
    alpha: float | None,
    seed: int,
    min_samples: int = 10,
) -> list[Manifest]:
    """Partition the official train and val splits of ``source`` among ``sites``."""
    labels = {"train": source.labels("train"), "val": source.labels("val")}
    parts = partition_labels(labels, len(sites), method, alpha or 0.0, seed, min_samples)
    spec = {"method": method, "alpha": alpha, "seed": seed, "min_samples": min_samples, "sites": list(sites)}
    out = []
    for k, site in enumerate(sites):
        sections = {
            section: [{"image": source.sample_id(split, int(i)), "label": int(labels[split][i])} for i in parts[split][k]]
            for section, split in (("training", "train"), ("validation", "val"))
        }
        out.append(
            Manifest(
                dataset=source.name,
                site=site,
                source={"file": source.filename, "md5": source.expected_md5},
                partition=spec,
                num_classes=source.num_classes,
                class_names=source.class_names,
                **sections,
            )
        )
    return out


def ensure_manifests(
    source: MedMNISTSource,
    sites: Sequence[str],
    paths: Sequence[str | Path],
    method: str,
    alpha: float | None,
    seed: int,
    min_samples: int = 10,
) -> list[Path]:
    """Write the sites' manifests unless they exist; existing ones must match the requested partition.

    An existing manifest is never overwritten: if it was made with other settings, the error
    names the file and the difference.
    """
    paths = [Path(p) for p in paths]
    spec = {"method": method, "alpha": alpha, "seed": seed, "min_samples": min_samples, "sites": list(sites)}
    if all(p.exists() for p in paths):
        for p in paths:
            m = read_manifest(p)
            if m.partition != spec:
                raise ManifestError(f"{p} was written for partition {m.partition}, this run asks for {spec}; "
                                    "move it away or change the partition settings")
        return paths
    manifests = build_manifests(source, sites, method, alpha, seed, min_samples)
    for m, p in zip(manifests, paths):
        if not p.exists():
            write_manifest(m, p)
    log.info("wrote %d site manifests to %s", len(paths), paths[0].parent)
    return paths


def site_class_counts(manifests: Sequence[Manifest], section: str = "training") -> np.ndarray:
    """(K, C) per-site class counts read from the manifests."""
    return np.stack(
        [np.bincount([e["label"] for e in m.section(section)], minlength=m.num_classes) for m in manifests]
    )


def describe_partition(manifests: Sequence[Manifest]) -> str:
    """One line per site: samples and class counts; plus the label skew (0 = IID)."""
    counts = site_class_counts(manifests)
    skew = skew_from_counts(counts)
    names = manifests[0].class_names
    lines = [f"partition: {len(manifests)} sites, label skew (mean TV distance to pooled) {skew:.3f}"]
    for m, row in zip(manifests, counts):
        mix = ", ".join(f"{n}={c}" for n, c in zip(names, row.tolist()))
        lines.append(f"  {m.site}: {int(row.sum())} train / {len(m.validation)} val ({mix})")
    return "\n".join(lines)
