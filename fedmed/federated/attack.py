"""Attack simulation for robustness tests: a site that poisons its data or its update."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset, default_collate

from fedmed.federated.messages import StateDict

ATTACKS = ("scale", "signflip", "labelflip")


class LabelFlipped(Dataset):
    """A poisoned view of a dataset: label y becomes C - 1 - y."""

    def __init__(self, base: Any, num_classes: int):
        self.base, self.num_classes = base, num_classes

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return x, self.num_classes - 1 - y

    def reseed(self, seed: int) -> None:
        if hasattr(self.base, "reseed"):
            self.base.reseed(seed)

    def collate(self, samples: list):
        collate = getattr(self.base, "collate", None)
        return collate(samples) if collate is not None else default_collate(samples)


class Attack:
    """A test attacker: ``labelflip`` trains on flipped labels; ``scale`` / ``signflip`` send the
    update multiplied by ``scale`` / ``-scale``.

    Args:
        kind: one of :data:`ATTACKS`.
        scale: the update multiplier.
    """

    def __init__(self, kind: str, scale: float = 10.0):
        if kind not in ATTACKS:
            raise ValueError(f"site attack must be one of {ATTACKS}, got {kind!r}")
        self.kind, self.scale = kind, scale

    def training_data(self, data: Any, num_classes: int) -> Any:
        return LabelFlipped(data, num_classes) if self.kind == "labelflip" else data

    def update(self, start: StateDict, new: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.kind not in ("scale", "signflip"):
            return new
        factor = self.scale if self.kind == "scale" else -self.scale
        return {k: (start[k] + factor * (v - start[k])).to(v.dtype) if v.is_floating_point() else v
                for k, v in new.items()}
