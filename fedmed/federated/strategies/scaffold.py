"""SCAFFOLD (Karimireddy et al. 2020), option II control variates; sites train with plain SGD.

Server: x <- x + server_lr * mean_k(y_k - x);  c <- c + |S|/N * mean_k(delta c_k).
Site: gradient + (c - c_i) at every step; c_i+ = c_i - c + (x - y_i) / (steps * lr).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fedmed.aggregation import buffer_keys, fedavg
from fedmed.federated.strategies.base import SitePart, StateDict, Strategy, Update

if TYPE_CHECKING:
    import lightning as L


def trainable_keys(global_w: StateDict) -> list[str]:
    """Floating-point weights that are not BatchNorm statistics (what an optimizer moves)."""
    stats = buffer_keys(global_w)
    return [k for k, v in global_w.items() if v.is_floating_point() and k not in stats]


class Scaffold(Strategy):
    """SCAFFOLD: the server keeps a control variate c, each site its own c_i.

    Args:
        server_lr: the global step size.
        local_lr: the sites' plain-SGD learning rate (the control variates assume SGD).
    """

    name = "scaffold"
    summable = False
    dp_incompatible = "its gradient correction is added outside the per-sample gradients DP-SGD clips"

    def __init__(self, server_lr: float = 1.0, local_lr: float = 0.05, **kw: Any):
        super().__init__(**kw)
        self.server_lr, self.local_lr = server_lr, local_lr
        self.c: dict[str, torch.Tensor] | None = None

    def configure_fit(self, global_w: StateDict) -> dict[str, Any]:
        if self.c is None:
            self.c = {k: torch.zeros_like(global_w[k], dtype=torch.float64) for k in trainable_keys(global_w)}
        return {"scaffold_c": self.c, "sgd_lr": self.local_lr}

    def aggregate_fit(self, global_w: StateDict, fits: Sequence[Update]) -> dict[str, torch.Tensor]:
        assert self.c is not None, "configure_fit runs before aggregate_fit"
        avg = fedavg([f.weights for f in fits], [f.num_samples for f in fits], bn_stats=self.bn_stats)
        out = dict(avg)
        for k in trainable_keys(global_w):
            x = global_w[k].to(torch.float64)
            out[k] = (x + self.server_lr * (avg[k].to(torch.float64) - x)).to(global_w[k].dtype)
        deltas = [f.extras["scaffold_delta_c"] for f in fits]
        share = len(fits) / max(self.num_sites or 1, len(fits))
        for k in self.c:
            self.c[k] = self.c[k] + share * torch.stack([d[k] for d in deltas]).mean(0)
        return out

    def site_part(self) -> SitePart:
        return ControlVariate()

    def state_dict(self) -> dict[str, Any]:
        return {"c": self.c}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.c = state.get("c")


class ControlVariate(SitePart):
    """The site side of SCAFFOLD: its control variate c_i, plain SGD, and the corrected gradients."""

    def __init__(self) -> None:
        self.c: dict[str, torch.Tensor] = {}
        self.lr = 0.0
        self.c_i: dict[str, torch.Tensor] | None = None

    def configure(self, instructions: Mapping[str, Any]) -> None:
        self.c, self.lr = instructions["scaffold_c"], float(instructions["sgd_lr"])

    @property
    def keeps_optimizer_state(self) -> bool:
        return False

    def make_optimizer(self, params: Iterable[nn.Parameter], weight_decay: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.lr, weight_decay=weight_decay)

    def callbacks(self) -> list[L.Callback]:
        if self.c_i is None:
            self.c_i = {k: torch.zeros_like(v) for k, v in self.c.items()}
        from fedmed.federated.callbacks import GradientCorrection  # Lightning: only at a training site

        return [GradientCorrection({k: self.c[k] - self.c_i[k] for k in self.c})]

    def after_training(self, start, new, steps, lr_factors) -> dict[str, Any]:
        assert self.c_i is not None
        c, c_i = self.c, self.c_i
        lr = self.lr * sum(lr_factors) / len(lr_factors)  # the round's mean learning rate
        c_new = {k: c_i[k] - c[k] + (start[k].double() - new[k].double()) / (max(steps, 1) * lr) for k in c}
        delta = {k: c_new[k] - c_i[k] for k in c}
        self.c_i = c_new
        return {"scaffold_delta_c": delta}

    def state_dict(self) -> dict[str, Any]:
        return {"c_i": self.c_i}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.c_i = state.get("c_i")
