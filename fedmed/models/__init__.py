"""Networks in a small registry, and the Lightning classifier that wraps any of them."""

from __future__ import annotations

from torch import nn

from fedmed.models.cnn import CompactCNN
from fedmed.models.densenet import SmallInputDenseNet

REGISTRY: dict[str, type[nn.Module]] = {"cnn": CompactCNN, "densenet": SmallInputDenseNet}


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered network by name, e.g. ``create_model("cnn", in_channels=1, num_classes=2)``."""
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered: {sorted(REGISTRY)}")
    return REGISTRY[name](**kwargs)


__all__ = ["REGISTRY", "CompactCNN", "SmallInputDenseNet", "create_model"]
