"""Sharpness-aware minimisation around any optimizer (SAM, Foret et al., ICLR 2021).

Each step takes the gradient at the weights ``w``, moves to ``w + rho * g / ||g||`` (the steepest ascent
within a ball of radius ``rho``), takes the gradient there, comes back to ``w`` and lets the wrapped
optimizer step with that second gradient. Trained at every site of a federation it seeks flat minima, whose
average stays good for every site (FedSAM: Qu et al., ICML 2022; Caldarola et al., ECCV 2022). It costs a
second forward and backward pass per step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class SAM(torch.optim.Optimizer):
    """``base`` stepping with the gradient at the sharpness-ascent point.

    It shares ``base``'s parameter groups (a learning-rate scheduler steers both) and state (its
    ``state_dict`` is ``base``'s, so an optimizer state kept across federated rounds is unchanged).
    :meth:`step` needs the closure that recomputes the loss and its gradients (Lightning passes one).

    Args:
        base: the optimizer that takes the step.
        rho: radius of the ascent step (> 0).
        net: where given, its buffers (BatchNorm's running statistics) are left as the first pass set them:
            the pass at the perturbed weights only serves the gradient.
    """

    def __init__(self, base: torch.optim.Optimizer, rho: float, net: nn.Module | None = None) -> None:
        if not rho > 0:
            raise ValueError(f"SAM needs rho > 0, got {rho}")
        super().__init__(base.param_groups, base.defaults)
        self.base, self.rho, self.net = base, float(rho), net
        self.param_groups = base.param_groups
        self.state = base.state
        #: True while the closure runs at the perturbed weights (a module may skip its logging then)
        self.perturbed = False

    def state_dict(self):
        return self.base.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.base.load_state_dict(state_dict)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):  # type: ignore[override]
        if closure is None:
            raise ValueError("SAM.step needs the closure that recomputes the loss and its gradients")
        with torch.enable_grad():
            loss = closure()
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return loss
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        scale = self.rho / (norm + 1e-12)
        moves = []
        for p in params:
            move = p.grad * scale
            p.add_(move)
            moves.append(move)
        kept = [(b, b.clone()) for b in self.net.buffers()] if self.net is not None else []
        self.zero_grad()
        self.perturbed = True
        try:
            with torch.enable_grad():
                closure()
        finally:
            self.perturbed = False
            for p, move in zip(params, moves, strict=True):
                p.sub_(move)
            for buffer, value in kept:
                buffer.copy_(value)
        self.base.step()
        return loss
