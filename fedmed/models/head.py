"""The classifier layer of any network (its last linear layer) and the penultimate features it reads.

Head calibration re-fits that layer, ``model.freeze_head`` keeps it fixed, and ``model.decorrelation``
penalises correlated inputs to it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def last_linear(net: nn.Module) -> tuple[str, nn.Linear]:
    """The network's classifier layer: its last ``nn.Linear`` in module order, with its name."""
    found = [(name, m) for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError(f"{type(net).__name__} has no linear layer (the classifier layer fedmed looks for)")
    return found[-1]


@contextmanager
def penultimate(net: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Within the block, every forward pass of ``net`` appends the input of its last linear layer (its
    penultimate features, still in the autograd graph) to the list it yields."""
    seen: list[torch.Tensor] = []
    handle = last_linear(net)[1].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        yield seen
    finally:
        handle.remove()
