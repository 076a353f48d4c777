"""FedAdam / FedYogi (Reddi et al. 2021): a server optimizer steps towards the sites' mean."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedmed.aggregation import server_opt_step
from fedmed.federated.strategies.base import StateDict, Strategy, Update


class FedAdam(Strategy):
    """The sites' FedAvg is a pseudo-gradient for an Adam step on the server.

    Args:
        server_lr: the server optimizer's learning rate.
        beta1, beta2: its moment decay rates.
        tau: adaptivity (added to the root of the second moment, and its start value is tau^2).
    """

    name = "fedadam"
    optimizer = "adam"

    def __init__(self, server_lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3,
                 **kw: Any):
        super().__init__(**kw)
        self.lr, self.beta1, self.beta2, self.tau = server_lr, beta1, beta2, tau
        self.moments: dict[str, dict[str, torch.Tensor]] | None = None

    def aggregate_fit(self, global_w: StateDict, fits: Sequence[Update]) -> dict[str, torch.Tensor]:
        target = super().aggregate_fit(global_w, fits)
        new, self.moments = server_opt_step(global_w, target, self.moments, self.optimizer, self.lr,
                                            self.beta1, self.beta2, self.tau)
        return new

    def state_dict(self) -> dict[str, Any]:
        return {"moments": self.moments}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.moments = state.get("moments")


class FedYogi(FedAdam):
    """As :class:`FedAdam`, with Yogi's additive second-moment update."""

    name = "fedyogi"
    optimizer = "yogi"
