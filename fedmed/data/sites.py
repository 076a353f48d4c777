"""Partition a dataset into site manifests (written once, deterministic for a seed)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedmed.data.manifest import Manifest, read_manifest, write_manifest
from fedmed.data.partition import partition_by_group, partition_labels, skew_from_counts
from fedmed.errors import FedmedError, ManifestError

log = logging.getLogger("fedmed")


def partition_spec(sites: Sequence[str], method: str, alpha: float | None, seed: int, min_samples: int = 10,
                   column: str | None = None, groups: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
    """The partition settings recorded in every manifest (and compared on reuse).

    A natural partition draws nothing (each site holds the rows its column names), so it records
    no seed and the same manifests serve every seed.
    """
    spec: dict[str, Any] = {"method": method, "alpha": alpha, "seed": None if method == "natural" else seed,
                            "min_samples": min_samples, "sites": list(sites)}
    if method == "natural":
        spec.update(column=column, groups={k: list(v) for k, v in groups.items()} if groups else None)
    return spec


def natural_groups(source, sites: Sequence[str], column: str | None, groups: Mapping | None) -> list[list[str]]:
    """The column values each site holds: ``groups[site]``, or (without ``groups``) the value named like the site."""
    if not column:
        raise FedmedError("partition.method=natural needs partition.column (a metadata column, e.g. source)")
    values = sorted(set(source.column("train", column)))
    if groups:
        missing = [s for s in sites if s not in groups]
        if missing:
            raise FedmedError(f"partition.groups has no entry for sites {missing}; values of {column!r}: {values}")
        out = [[str(v) for v in ([groups[s]] if isinstance(groups[s], str) else groups[s])] for s in sites]
    else:
        out = [[s] for s in sites]
    unknown = [v for vs in out for v in vs if v not in values]
    if unknown:
        raise FedmedError(f"natural partition by {column!r}: {unknown} are not values of the column; it has "
                          f"{values}. Set federation.sites to those values or map sites to them with partition.groups")
    return out


def build_manifests(source, sites: Sequence[str], method: str, alpha: float | None, seed: int,
                    min_samples: int = 10, column: str | None = None,
                    groups: Mapping[str, Sequence[str]] | None = None) -> list[Manifest]:
    """Partition the train and val splits of ``source`` among ``sites`` (the test split is never partitioned)."""
    labels = {"train": source.labels("train"), "val": source.labels("val")}
    if method == "natural":
        parts = partition_by_group({s: source.column(s, column) for s in labels},
                                   natural_groups(source, sites, column, groups))
        empty = [site for site, p in zip(sites, parts["train"], strict=True) if len(p) < max(min_samples, 1)]
        if empty:
            raise FedmedError(f"natural partition: sites {empty} get fewer than {min_samples} training samples")
    else:
        parts = partition_labels(labels, len(sites), method, alpha or 0.0, seed, min_samples)
    spec = partition_spec(sites, method, alpha, seed, min_samples, column, groups)
    ids = {split: source.ids(split) for split in labels}
    out = []
    for k, site in enumerate(sites):
        sections = {
            section: [{"image": ids[split][int(i)], "label": int(labels[split][i])} for i in parts[split][k]]
            for section, split in (("training", "train"), ("validation", "val"))
        }
        out.append(Manifest(dataset=source.name, site=site, source=dict(source.identity), partition=spec,
                            num_classes=source.num_classes, class_names=list(source.class_names), **sections))
    return out


def plan_manifests(source, sites: Sequence[str], paths: Sequence[str | Path], method: str, alpha: float | None,
                   seed: int, min_samples: int = 10, column: str | None = None,
                   groups: Mapping[str, Sequence[str]] | None = None) -> list[tuple[Path, Manifest, bool]]:
    """The sites' manifests, in memory: (path, manifest, new) per site; nothing is written.

    Existing manifests are read and must match the requested partition (the error names the file
    and the difference); the others are drawn (``new``), to be written with :func:`write_new`
    once the run has checked the data they name.
    """
    files = [Path(p) for p in paths]
    spec = partition_spec(sites, method, alpha, seed, min_samples, column, groups)
    existing = {p: read_manifest(p) for p in files if p.exists()}
    for p, m in existing.items():
        if m.partition != spec:
            raise ManifestError(f"{p} was written for partition {m.partition}, this run asks for {spec}; "
                                "move it away or change the partition settings")
    if len(existing) == len(files):
        return [(p, existing[p], False) for p in files]
    drawn = build_manifests(source, sites, method, alpha, seed, min_samples, column, groups)
    return [(p, existing.get(p, m), p not in existing) for p, m in zip(files, drawn, strict=True)]


def write_new(plan: Sequence[tuple[Path, Manifest, bool]]) -> None:
    """Write the manifests :func:`plan_manifests` drew (existing ones are never overwritten)."""
    new = [(p, m) for p, m, is_new in plan if is_new and not p.exists()]
    for p, m in new:
        write_manifest(m, p)
    if new:
        log.info("wrote %d site manifests to %s", len(new), new[0][0].parent)


def ensure_manifests(source, sites: Sequence[str], paths: Sequence[str | Path], method: str, alpha: float | None,
                     seed: int, min_samples: int = 10, column: str | None = None,
                     groups: Mapping[str, Sequence[str]] | None = None) -> list[Path]:
    """Write the sites' manifests unless they exist; existing ones must match the requested partition.

    An existing manifest is never overwritten: if it was made with other settings, the error
    names the file and the difference.
    """
    plan = plan_manifests(source, sites, paths, method, alpha, seed, min_samples, column, groups)
    write_new(plan)
    return [p for p, _, _ in plan]


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
    for m, row in zip(manifests, counts, strict=True):
        mix = ", ".join(f"{n}={c}" for n, c in zip(names, row.tolist(), strict=False))
        lines.append(f"  {m.site}: {int(row.sum())} train / {len(m.validation)} val ({mix})")
    return "\n".join(lines)


def one_class_sites(manifests: Sequence[Manifest]) -> list[str]:
    """A warning per site whose training or validation data holds a single class: it cannot learn the
    others, and its AUROC (one class in its validation data) is undefined."""
    out = []
    for section, what in (("training", "training"), ("validation", "validation")):
        for m, row in zip(manifests, site_class_counts(manifests, section), strict=True):
            present = [m.class_names[c] if m.class_names else str(c) for c in np.flatnonzero(row)]
            if len(present) == 1:
                out.append(f"site {m.site}: its {what} data holds only class {present[0]!r} ({int(row.sum())} "
                           "images)" + (": its AUROC is undefined (nan)" if section == "validation" else
                                        ": it cannot learn the other classes"))
    return out
