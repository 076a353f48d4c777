"""Aggregation strategies as pure functions of (state dicts, sample counts) -> state dict.

No Lightning, no I/O: these are tested numerically on their own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

StateDict = Mapping[str, torch.Tensor]

BN_MEAN, BN_VAR = "running_mean", "running_var"


def state_nbytes(state: StateDict) -> int:
    """Bytes needed to send ``state`` raw (sum of numel x element size)."""
    return sum(t.numel() * t.element_size() for t in state.values())


def check_compatible(states: Sequence[StateDict]) -> None:
    """Raise ``ValueError`` naming the site index and key if the states differ in keys, shapes or dtypes."""
    if not states:
        raise ValueError("nothing to aggregate: no site states")
    ref = states[0]
    for i, s in enumerate(states[1:], start=1):
        if set(s) != set(ref):
            diff = sorted(set(s) ^ set(ref))
            raise ValueError(f"state {i} has different keys than state 0: {diff[:5]}")
        for k, t in s.items():
            if t.shape != ref[k].shape or t.dtype != ref[k].dtype:
                raise ValueError(
                    f"state {i} key {k!r} is {tuple(t.shape)} {t.dtype}, state 0 has {tuple(ref[k].shape)} {ref[k].dtype}"
                )


def normalized_weights(num_samples: Sequence[float]) -> torch.Tensor:
    """n_k / n as float64; every site must bring at least one sample."""
    w = torch.as_tensor(num_samples, dtype=torch.float64)
    if w.ndim != 1 or len(w) == 0:
        raise ValueError(f"need one sample count per state, got {num_samples!r}")
    if bool((w <= 0).any()) or not bool(torch.isfinite(w).all()):
        raise ValueError(f"every site needs a positive, finite sample count; got {list(map(float, w))}")
    return w / w.sum()


def weighted_average(states: Sequence[StateDict], weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sum_k w_k * state_k per key, computed in float64 and cast back to each tensor's dtype.

    Integer tensors (e.g. BatchNorm's ``num_batches_tracked``) get the weighted mean rounded to
    the nearest integer, so the dtype is preserved.
    """
    out: dict[str, torch.Tensor] = {}
    for key, ref in states[0].items():
        stacked = torch.stack([s[key].detach().to("cpu", torch.float64) for s in states])
        avg = torch.tensordot(weights, stacked, dims=1)
        out[key] = (avg.round() if not ref.is_floating_point() else avg).to(ref.dtype)
    return out


def fedavg(states: Sequence[StateDict], num_samples: Sequence[float], bn_stats: str = "pooled") -> dict[str, torch.Tensor]:
    """FedAvg (McMahan et al. 2017): the sample-weighted mean of the sites' states.

    Args:
        states: one state dict per site (same keys, shapes and dtypes).
        num_samples: training samples per site, n_k; weights are n_k / n.
        bn_stats: ``"pooled"`` (default) treats each BatchNorm layer's ``running_mean`` /
            ``running_var`` as per-site moments and returns the moments of the pooled data:
            mean = sum_k w_k m_k, var = sum_k w_k (v_k + (m_k - mean)^2). ``"mean"`` averages
            them like any other tensor (the textbook FedAvg).

    Returns:
        The aggregated state dict (on CPU, dtypes as in ``states[0]``).
    """
    if bn_stats not in ("pooled", "mean"):
        raise ValueError(f"bn_stats must be 'pooled' or 'mean', got {bn_stats!r}")
    check_compatible(states)
    if len(num_samples) != len(states):
        raise ValueError(f"{len(states)} states but {len(num_samples)} sample counts")
    w = normalized_weights(num_samples)
    out = weighted_average(states, w)
    if bn_stats == "pooled":
        for key in [k for k in out if k.endswith(BN_VAR)]:
            mean_key = key[: -len(BN_VAR)] + BN_MEAN
            if mean_key not in out:
                continue
            means = torch.stack([s[mean_key].to(torch.float64) for s in states])  # (K, C)
            pooled_mean = out[mean_key].to(torch.float64)
            between = torch.tensordot(w, (means - pooled_mean) ** 2, dims=1)
            out[key] = (torch.tensordot(w, torch.stack([s[key].to(torch.float64) for s in states]), dims=1) + between).to(
                states[0][key].dtype
            )
    return out


@dataclass
class FedAvg:
    """FedAvg strategy: ``aggregate(states, num_samples)`` with the options of :func:`fedavg`.

    Args:
        bn_stats: how BatchNorm running statistics are combined (``pooled`` or ``mean``).
    """

    bn_stats: str = "pooled"
    name: str = "fedavg"

    def aggregate(self, states: Sequence[StateDict], num_samples: Sequence[float]) -> dict[str, torch.Tensor]:
        return fedavg(states, num_samples, bn_stats=self.bn_stats)
