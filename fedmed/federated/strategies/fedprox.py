"""FedProx (Li et al. 2020): sites add mu/2 ||w - w_global||^2 to their loss."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fedmed.federated.strategies.base import SitePart, StateDict, Strategy


class FedProx(Strategy):
    """FedAvg on the server; a proximal term at the sites.

    Args:
        mu: weight of the proximal term mu/2 ||w - w_global||^2 (0: FedAvg).
    """

    name = "fedprox"
    dp_incompatible = "its proximal term's gradient is added outside the per-sample gradients DP-SGD clips"

    def __init__(self, mu: float = 0.01, **kw: Any):
        super().__init__(**kw)
        if mu < 0:
            raise ValueError(f"strategy.mu must be >= 0, got {mu}")
        self.mu = mu

    def configure_fit(self, global_w: StateDict) -> dict[str, Any]:
        return {"prox_mu": self.mu}

    def site_part(self) -> SitePart:
        return ProximalTerm()


class ProximalTerm(SitePart):
    """The site side of FedProx: the distance to the round's starting weights joins the loss."""

    def __init__(self) -> None:
        self.mu = 0.0
        self.reference: list[torch.Tensor] | None = None

    def configure(self, instructions: Mapping[str, Any]) -> None:
        self.mu = float(instructions.get("prox_mu", 0.0))

    def before_training(self, net: nn.Module) -> None:
        self.reference = [p.detach().clone() for p in net.parameters()] if self.mu > 0 else None

    @property
    def keeps_optimizer_state(self) -> bool:
        # kept moments point along the site's own skewed path, against the proximal pull
        # (they made FedProx collapse at Dirichlet 0.1): FedProx sites start a fresh optimizer
        return self.mu == 0

    def extra_loss(self, net: nn.Module) -> torch.Tensor | None:
        if self.mu <= 0 or self.reference is None:
            return None
        prox = sum(((p - r) ** 2).sum() for p, r in zip(net.parameters(), self.reference, strict=True))
        return 0.5 * self.mu * prox  # type: ignore[return-value]

    def after_training(self, start, new, steps, lr_factors) -> dict[str, Any]:
        self.reference = None
        return {}
