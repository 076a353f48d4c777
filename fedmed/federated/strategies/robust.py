"""Robust aggregators against poisoned updates: coordinate-wise median, trimmed mean, (Multi-)Krum.

Each needs every update on its own, so none runs under secure aggregation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fedmed.aggregation import coordinate_median, krum, trimmed_mean
from fedmed.errors import FedmedError
from fedmed.federated.strategies.base import StateDict, Strategy, Update


class Median(Strategy):
    """Coordinate-wise median (Yin et al. 2018)."""

    name = "median"
    summable = False

    def aggregate_fit(self, global_w: StateDict, fits: Sequence[Update]) -> dict[str, torch.Tensor]:
        return coordinate_median([f.weights for f in fits])


class TrimmedMean(Strategy):
    """Coordinate-wise trimmed mean (Yin et al. 2018).

    Args:
        beta: share dropped at each end per coordinate (at least one value per end is dropped).
    """

    name = "trimmed_mean"
    summable = False

    def __init__(self, beta: float = 0.2, **kw: Any):
        super().__init__(**kw)
        self.beta = beta

    def aggregate_fit(self, global_w: StateDict, fits: Sequence[Update]) -> dict[str, torch.Tensor]:
        return trimmed_mean([f.weights for f in fits], self.beta)


class Krum(Strategy):
    """(Multi-)Krum (Blanchard et al. 2017).

    Args:
        f: Byzantine sites tolerated (needs at least 2f + 3 sites).
        m: updates kept and averaged (1 = Krum, more = Multi-Krum).
    """

    name = "krum"
    summable = False

    def __init__(self, f: int = 1, m: int = 1, **kw: Any):
        super().__init__(**kw)
        self.f, self.m = f, m
        self.last_kept: list[str] = []  # sites whose updates the last aggregate used
        if self.num_sites is not None and self.num_sites < 2 * f + 3:
            raise FedmedError(f"krum with strategy.f={f} needs at least {2 * f + 3} sites, the federation has "
                              f"{self.num_sites}; lower strategy.f or use strategy=median / trimmed_mean")

    def aggregate_fit(self, global_w: StateDict, fits: Sequence[Update]) -> dict[str, torch.Tensor]:
        out, kept = krum([f.weights for f in fits], [f.num_samples for f in fits], self.f, min(self.m, len(fits)))
        self.last_kept = [fits[i].site for i in kept]
        return out
