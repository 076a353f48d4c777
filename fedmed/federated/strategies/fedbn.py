"""FedBN (Li et al. 2021): BatchNorm weights and statistics stay at each site."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedmed.aggregation import norm_keys
from fedmed.federated.strategies.base import SitePart, StateDict, Strategy


class FedBN(Strategy):
    """FedAvg of everything (the global BatchNorm layers serve only the pooled test); each site
    trains and evaluates with its own BatchNorm layers."""

    name = "fedbn"
    dp_incompatible = "DP replaces BatchNorm with GroupNorm, so there are no BatchNorm layers to keep local"
    needs_batchnorm = True

    def configure_fit(self, global_w: StateDict) -> dict[str, Any]:
        return {"local_keys": sorted(norm_keys(global_w))}

    def site_part(self) -> SitePart:
        return LocalNorms()


class LocalNorms(SitePart):
    """The site side of FedBN: keeps its own normalisation layers and puts them into the global weights."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.local: dict[str, torch.Tensor] | None = None

    def configure(self, instructions: Mapping[str, Any]) -> None:
        self.keys = list(instructions.get("local_keys", []))

    def local_weights(self, weights: StateDict) -> StateDict:
        if not self.keys or self.local is None:
            return weights
        return {**weights, **{k: self.local[k] for k in self.keys}}

    def after_training(self, start, new, steps, lr_factors) -> dict[str, Any]:
        if self.keys:
            self.local = {k: new[k].clone() for k in self.keys}
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"local": self.local, "local_keys": self.keys}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.local, self.keys = state.get("local"), list(state.get("local_keys") or [])
