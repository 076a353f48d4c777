"""Which images a site scores a model on, and whether the model trained on that site."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from fedmed.data.datamodule import ArrayDataset, Pipeline
from fedmed.errors import FedmedError


def _members(partition: DictConfig | None, site: str) -> list[str]:
    """The values of the partition column a natural-partition site holds (its name, or its group)."""
    groups = (partition.get("groups") if partition is not None else None) or {}
    return [str(v) for v in groups.get(site, [site])]


def trained_on(trained: DictConfig, site: str, data_name: str) -> bool:
    """Whether the model behind config ``trained`` trained on images of ``site`` of data set ``data_name``."""
    if str(trained.data.name) != str(data_name):
        return False
    if trained.get("site"):
        return str(trained.site.name) == site
    if str(trained.get("mode", "federated")) == "federated":
        return site in [str(s) for s in trained.federation.sites]
    keep = trained.data.source.get("keep") or {}  # centralized: the pooled rows it kept
    column = trained.partition.get("column")
    if column and column in keep:
        return bool(set(_members(trained.partition, site)) & {str(v) for v in keep[column]})
    return True


@dataclass
class SiteImages:
    """The images one site scores: the ``split`` (``all``: every split) of its own copy of the data,
    narrowed, under a natural partition, to the rows whose partition column is the site's.

    Args:
        name: the site (or a label for the whole split).
        data: the ``data`` config of this command.
        source: the site's copy of the data.
        partition: the partition config (None: the whole split).
        split: train, val, test or all.
        kind: internal (the model trained on this site) or external.
    """

    name: str
    data: DictConfig
    source: Any
    partition: DictConfig | None
    split: str
    kind: str

    def _column(self) -> str | None:
        p = self.partition
        return str(p.column) if p is not None and p.get("method") == "natural" and p.get("column") else None

    def rows(self, split: str) -> np.ndarray | None:
        """Row indices of ``split`` this site holds (None: all of them)."""
        column = self._column()
        if column is None:
            return None
        values = np.asarray(self.source.column(split, column)).astype(str)
        return np.flatnonzero(np.isin(values, _members(self.partition, self.name)))

    def check(self) -> None:
        """Refuse a site that holds no image here, naming the values that exist."""
        self.source.ensure_available()
        column = self._column()
        if column is None:
            return
        splits = ("train", "val", "test") if self.split == "all" else (self.split,)
        if not any(len(self.rows(s)) for s in splits):  # type: ignore[arg-type]
            seen = sorted({str(v) for s in splits for v in self.source.column(s, column)})
            raise FedmedError(f"site={self.name} holds no {self.split} image of {self.data.name}: its {column} values "
                              f"are {seen} (partition.groups maps a site to several)")

    def dataset(self, trained_data: DictConfig) -> ArrayDataset:
        """The site's images, preprocessed as the model was trained (cached as this command's data config says)."""
        here = {k: self.data.get(k) for k in ("cache", "cache_dir", "cache_workers") if self.data.get(k) is not None}
        pipeline = Pipeline.from_config(OmegaConf.merge(trained_data, here), self.source)
        parts = [pipeline.dataset(s, self.rows(s)) for s in (("train", "val", "test") if self.split == "all"
                                                                else (self.split,))]
        parts = [p for p in parts if len(p)]
        if len(parts) == 1:
            return parts[0]
        return ArrayDataset(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]),
                            [i for p in parts for i in p.ids])
