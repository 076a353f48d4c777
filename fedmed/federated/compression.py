"""Compressed model updates: what a site sends instead of its full float32 weights.

A site sends its update delta = w_site - w_global, encoded by one codec
(``federation.compression``):

| codec | per float tensor | bytes per value | error bound per value |
|---|---|---|---|
| none | float32 | 4 | 0 |
| fp16 | float16 | 2 | relative 2^-11 (finite values below 65504) |
| int8 | int8 + one float32 scale (max abs / 127) | ~1 | scale / 2 |
| topk | the k = ceil(fraction * numel) largest magnitudes: int32 index + float32 value | 8k / numel x 4 | the dropped |

Integer tensors (BatchNorm's ``num_batches_tracked``) are sent as they are. BatchNorm running
statistics are sent as values in float16 with lossy codecs (as they are with ``none``), never as
sparsified or error-fed deltas: those can turn a running variance negative, which makes every
later evaluation NaN. With error feedback
(``federation.error_feedback``, default on) the site adds what the codec lost last round to the
next update (Seide et al. 2014; Karimireddy et al. 2019), so nothing is lost for good, only late.
The server rebuilds w_global + decoded delta and aggregates as usual.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from fedmed.aggregation import BN_MEAN, BN_VAR
from fedmed.choices import CODECS

Payload = dict[str, tuple]  # key -> (kind, *arrays): what goes on the wire
STAT_SUFFIXES = (BN_MEAN, BN_VAR)  # BatchNorm statistics: sent as float16 values


def encode_tensor(x: torch.Tensor, codec: str, fraction: float = 0.1) -> tuple:
    """One float tensor (a delta) -> its wire form."""
    x = x.detach().to("cpu", torch.float32)
    if codec == "none":
        return ("f32", x.clone())
    if codec == "fp16":
        return ("f16", x.to(torch.float16))
    if codec == "int8":
        scale = float(x.abs().max()) / 127 if x.numel() else 0.0
        q = torch.zeros_like(x, dtype=torch.int8) if scale == 0 else (x / scale).round().clamp(-127, 127).to(torch.int8)
        return ("i8", q, torch.tensor(scale, dtype=torch.float32))
    if codec == "topk":
        flat = x.flatten()
        k = max(1, math.ceil(fraction * flat.numel()))
        idx = flat.abs().topk(k, sorted=False).indices
        return ("topk", idx.to(torch.int32), flat[idx].clone(), torch.tensor(list(x.shape), dtype=torch.int32))
    raise ValueError(f"federation.compression must be one of {CODECS}, got {codec!r}")


def decode_tensor(item: tuple, like: torch.Tensor) -> torch.Tensor:
    """The wire form -> a float32 tensor shaped like ``like``; raises ``ValueError`` if it does not fit."""
    kind = item[0]
    if kind in ("f32", "f16"):
        out = item[1].to(torch.float32)
    elif kind == "i8":
        out = item[1].to(torch.float32) * item[2].to(torch.float32)
    elif kind == "topk":
        idx, val = item[1].long(), item[2].to(torch.float32)
        if idx.numel() != val.numel() or (idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= like.numel())):
            raise ValueError("top-k indices out of range or not matching the values")
        out = torch.zeros(like.numel(), dtype=torch.float32).index_put_((idx,), val)
    else:
        raise ValueError(f"unknown encoding {kind!r}")
    if out.numel() != like.numel():
        raise ValueError(f"decoded {out.numel()} values for a tensor of {like.numel()}")
    return out.reshape(like.shape)


def payload_nbytes(payload: Payload) -> int:
    """Bytes of the arrays in ``payload`` (what a wire format would carry, headers aside)."""
    return sum(t.numel() * t.element_size() for item in payload.values() for t in item[1:])


class UpdateEncoder:
    """A site's encoder, with its error-feedback memory.

    Args:
        codec: one of :data:`CODECS`.
        fraction: share of values top-k keeps.
        error_feedback: carry what the codec dropped into the next update.
    """

    def __init__(self, codec: str = "none", fraction: float = 0.1, error_feedback: bool = True):
        if codec not in CODECS:
            raise ValueError(f"federation.compression must be one of {CODECS}, got {codec!r}")
        if not 0 < fraction <= 1:
            raise ValueError(f"federation.topk_fraction must be in (0, 1], got {fraction}")
        self.codec, self.fraction, self.error_feedback = codec, fraction, error_feedback
        self.residual: dict[str, torch.Tensor] = {}

    def encode(self, new: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor]) -> Payload:
        """Encode the update ``new - start`` (float tensors) and ``new`` (integer tensors)."""
        payload: Payload = {}
        for k, v in new.items():
            if not v.is_floating_point():
                payload[k] = ("raw", v.detach().cpu().clone())
                continue
            if k.endswith(STAT_SUFFIXES) and self.codec != "none":
                payload[k] = ("v16", v.detach().cpu().to(torch.float16))
                continue
            delta = v.detach().cpu().float() - start[k].detach().cpu().float()
            if self.error_feedback and k in self.residual:
                delta = delta + self.residual[k]
            item = encode_tensor(delta, self.codec, self.fraction)
            if self.error_feedback and self.codec != "none":
                self.residual[k] = delta - decode_tensor(item, delta)
            payload[k] = item
        return payload

    def state_dict(self) -> dict[str, Any]:
        return {"residual": self.residual}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.residual = dict(state.get("residual") or {})


def decode_update(payload: Payload, global_w: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The site's weights as the server rebuilds them: w_global + decoded delta (dtypes of ``global_w``)."""
    if not isinstance(payload, Mapping):
        raise ValueError(f"a compressed update must be a mapping, got {type(payload).__name__}")
    missing, extra = sorted(set(global_w) - set(payload)), sorted(set(payload) - set(global_w))
    if missing or extra:
        raise ValueError(f"wrong keys (missing {missing[:3]}, unexpected {extra[:3]})")
    out = {}
    for k, ref in global_w.items():
        item = payload[k]
        if not isinstance(item, tuple) or not item:
            raise ValueError(f"{k}: not an encoded tensor")
        if item[0] == "raw":
            out[k] = item[1]
            continue
        if item[0] == "v16":  # a value, not a delta
            if item[1].numel() != ref.numel():
                raise ValueError(f"{k}: decoded {item[1].numel()} values for a tensor of {ref.numel()}")
            out[k] = item[1].to(ref.dtype).reshape(ref.shape)
            continue
        out[k] = (ref.to(torch.float32) + decode_tensor(item, ref)).to(ref.dtype)
    return out
