"""Weight averaging over the last rounds: the running mean of the global models from a given round on.

Under site shift the global model swings with each round's mix of site updates; the mean of the models of
the last rounds sits between those swings (stochastic weight averaging, Izmailov et al. 2018; for
federations, Caldarola et al. 2022). Training is unchanged: every round starts from the plain global model,
and only the model the sites evaluate, that selection may keep and that the run returns is the mean.
Baselines average the epochs' models the same way (``federation.average_from`` counts their epochs as
rounds times local epochs).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedmed.federated.messages import StateDict, clone_state


class TailAverage:
    """The running mean of the models given to :meth:`update` from step ``start`` on.

    Floating-point tensors (weights, BatchNorm's running statistics) are averaged; integer ones (BatchNorm's
    batch counter) are the latest model's.
    """

    def __init__(self, start: int):
        if start < 1:
            raise ValueError(f"averaging starts at step >= 1, got {start}")
        self.start, self.count = start, 0
        self.mean: dict[str, torch.Tensor] | None = None

    def update(self, step: int, weights: StateDict) -> dict[str, torch.Tensor] | None:
        """Fold the model of ``step`` into the mean; returns (a copy of) the mean, or None before ``start``."""
        if step < self.start:
            return None
        self.count += 1
        if self.mean is None:
            self.mean = clone_state(weights)
        else:
            if set(weights) != set(self.mean):
                raise ValueError("the averaged models must have the same tensors")
            for k, v in weights.items():
                if v.is_floating_point():
                    self.mean[k] += (v.detach().to(self.mean[k]) - self.mean[k]) / self.count
                else:
                    self.mean[k] = v.detach().clone()
        return clone_state(self.mean)

    def state_dict(self) -> dict[str, Any]:
        return {"start": self.start, "count": self.count, "mean": self.mean}

    def load_state_dict(self, state: Mapping[str, Any], like: StateDict | None = None) -> None:
        """Continue from :meth:`state_dict`'s output; with ``like``, its mean must hold the same tensors (names,
        shapes, dtypes) as ``like`` (ValueError otherwise: a checkpoint is not trusted blindly)."""
        start, count, mean = state["start"], state["count"], state["mean"]
        if not (isinstance(start, int) and isinstance(count, int) and start >= 1 and count >= 0):
            raise ValueError(f"start {start!r} and count {count!r} must be integers >= 1 and >= 0")
        if (mean is None) != (count == 0):
            raise ValueError(f"a mean of {count} models must {'not ' if count == 0 else ''}be given")
        if mean is not None:
            if not isinstance(mean, Mapping) or not all(isinstance(v, torch.Tensor) for v in mean.values()):
                raise ValueError("the mean must map names to tensors")
            if like is not None and {k: (v.shape, v.dtype) for k, v in mean.items()} != {
                    k: (v.shape, v.dtype) for k, v in like.items()}:
                raise ValueError("the mean does not hold the model's tensors")
        self.start, self.count = start, count
        self.mean = clone_state(mean) if mean is not None else None
