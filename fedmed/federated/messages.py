"""What a site and the server send each other: weights, sample counts, metrics (never images)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

StateDict = Mapping[str, torch.Tensor]


@dataclass
class FitResult:
    """What a site returns after local training."""

    site: str
    weights: dict[str, torch.Tensor]
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)  # what the strategy's site part adds (SCAFFOLD's delta c)
    #: with federation.compression: the encoded update (``weights`` is then empty until the server decodes it)
    payload: dict | None = None
    #: with secure aggregation: the masked fixed-point contribution (``weights`` stays empty)
    masked: Any = None
    #: bytes this update took on the wire (measured by the server on receipt)
    wire_bytes: int = 0


@dataclass
class EvalResult:
    """What a site returns after evaluating weights on its validation data."""

    site: str
    num_samples: int
    metrics: dict[str, float]
    confmat: torch.Tensor | None = None
    #: per-class mean heatmap pooled to a coarse grid (numbers only, no image), when explained
    xai_summary: torch.Tensor | None = None


def clone_state(state: StateDict) -> dict[str, torch.Tensor]:
    """Detached CPU copies, so later training never mutates what was sent."""
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


@dataclass
class RoundRecord:
    """One round as the server saw it: who trained, the logged metrics, bytes each way, what each site reported."""

    round: int
    sites: list[str]
    metrics: dict[str, float]
    bytes_up: int
    bytes_down: int
    seconds: float
    site_metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # what each site reported
