"""FedAvgM (Hsu, Qi, Brown 2019): FedAvg with server momentum.

The server treats the sites' mean as a pseudo-gradient and keeps a momentum buffer across rounds:

    d = x - mean_k(y_k),    v <- beta v + d  (v = d in the first round),    x <- x - server_lr v.

With ``server_momentum`` 0 and ``server_lr`` 1 it is FedAvg. Under label skew each round's mean
points partly towards the sites' own optima; the momentum keeps the part the rounds agree on.
BatchNorm statistics and integer buffers take the mean, as in FedAvg.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedmed.federated.strategies.base import StateDict, Strategy, Update
from fedmed.federated.strategies.scaffold import trainable_keys


class FedAvgM(Strategy):
    """Server momentum on top of the sample-weighted mean.

    Args:
        server_lr: the server's step size on the momentum buffer.
        server_momentum: the buffer's decay beta (0: none).
    """

    name = "fedavgm"

    def __init__(self, server_lr: float = 1.0, server_momentum: float = 0.9, **kw: Any):
        super().__init__(**kw)
        if server_lr <= 0 or not 0 <= server_momentum < 1:
            raise ValueError(f"FedAvgM needs server_lr > 0 and 0 <= server_momentum < 1, "
                             f"got {server_lr} and {server_momentum}")
        self.lr, self.beta = float(server_lr), float(server_momentum)
        self.velocity: dict[str, torch.Tensor] | None = None

    def aggregate_fit(self, global_w: StateDict, fits: Sequence[Update]) -> dict[str, torch.Tensor]:
        out = super().aggregate_fit(global_w, fits)
        first = self.velocity is None
        velocity = {} if self.velocity is None else dict(self.velocity)
        for k in trainable_keys(global_w):
            x = global_w[k].to(torch.float64)
            d = x - out[k].to(torch.float64)
            velocity[k] = d if first else self.beta * velocity[k] + d
            out[k] = (x - self.lr * velocity[k]).to(global_w[k].dtype)
        self.velocity = velocity
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"velocity": self.velocity}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.velocity = state.get("velocity")
