"""What the server does with a site's answer before aggregating it: measure, decode, check."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from fedmed.aggregation import state_nbytes
from fedmed.federated.compression import decode_update, payload_nbytes
from fedmed.federated.messages import FitResult


def receive(result: object, global_w: Mapping[str, torch.Tensor]) -> object:
    """Measure a site's answer's bytes on the wire and decode a compressed update."""
    if not isinstance(result, FitResult):
        return result
    extras = sum(state_nbytes(v) for v in result.extras.values() if isinstance(v, Mapping))
    if result.masked is not None:
        result.wire_bytes = int(result.masked.nbytes) + extras
    elif result.payload is not None:
        result.wire_bytes = payload_nbytes(result.payload) + extras
        result.weights, result.payload = decode_update(result.payload, global_w), None
    else:
        result.wire_bytes = state_nbytes(result.weights) + extras if isinstance(result.weights, Mapping) else 0
    return result


def check_masked(length: int, result: object) -> str | None:
    """Why a masked update is unusable (the server cannot look inside one: only its form)."""
    if not isinstance(result, FitResult):
        return f"returned {type(result).__name__}, not a FitResult"
    return check_masked_vector(length, result.masked, "masked update")


def check_masked_vector(length: int, m: object, what: str) -> str | None:
    """Why a masked vector (an update's, or class statistics') is not one the server can add up."""
    if not isinstance(m, np.ndarray) or m.dtype != np.uint64 or m.shape != (length,):
        return f"{what} is not a uint64 vector of length {length}"
    return None


def check_update(global_w: Mapping[str, torch.Tensor], result: object) -> str | None:
    """Why a site's returned update is unusable (None if it is fine): type, keys, shapes, dtypes, NaN/Inf, n_k."""
    if not isinstance(result, FitResult):
        return f"returned {type(result).__name__}, not a FitResult"
    w = result.weights
    if not isinstance(w, Mapping):
        return f"weights are a {type(w).__name__}, not a state dict"
    missing, extra = sorted(set(global_w) - set(w)), sorted(set(w) - set(global_w))
    if missing or extra:
        return f"wrong keys (missing {missing[:3]}, unexpected {extra[:3]})"
    for k, ref in global_w.items():
        t = w[k]
        if not isinstance(t, torch.Tensor):
            return f"{k} is a {type(t).__name__}, not a tensor"
        if t.shape != ref.shape:
            return f"{k} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}"
        if t.dtype != ref.dtype:
            return f"{k} has dtype {t.dtype}, expected {ref.dtype}"
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return f"{k} contains NaN or Inf"
    n = result.num_samples
    if not isinstance(n, int) or n <= 0:
        return f"num_samples={n!r} is not a positive integer"
    return None
