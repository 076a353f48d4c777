"""Aggregation strategies as pure functions of (state dicts, sample counts) -> state dict.

No Lightning, no I/O: these are tested numerically on their own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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
                    f"state {i} key {k!r} is {tuple(t.shape)} {t.dtype}, "
                    f"state 0 has {tuple(ref[k].shape)} {ref[k].dtype}"
                )


def normalized_weights(num_samples: Sequence[float]) -> torch.Tensor:
    """n_k / n as float64; every site must bring at least one sample."""
    w = torch.as_tensor(num_samples, dtype=torch.float64)
    if w.ndim != 1 or len(w) == 0:
        raise ValueError(f"need one sample count per state, got {num_samples!r}")
    if bool((w <= 0).any()) or not bool(torch.isfinite(w).all()):
        raise ValueError(f"every site needs a positive, finite sample count; got {list(map(float, w))}")
    return w / w.sum()


def balanced_weight(counts: Sequence[int], totals: Sequence[int]) -> int:
    """A site's weight in the mean under ``federation.weighting=balanced``.

    Each of the site's training images counts ``m / N_y``, where ``N_y`` is the federation's number of
    training images of its class and ``m`` that of the federation's rarest class: sum_c n_c m / N_c, rounded,
    at least 1. Across sites these weights are proportional to each site's share of the class-balanced
    objective, (1/C) sum_c n_kc / N_c, the weights under which the sites' mean matches pooled training that
    gives every class the same total weight. No image counts more than 1, so the weight never exceeds the
    site's image count (a site cannot buy more influence than plain FedAvg gives it).

    Args:
        counts: the site's training images per class.
        totals: the federation's training images per class (the sum over sites, from the server).

    Raises:
        ValueError: the two differ in length, or ``totals`` is below ``counts`` for a class: they are not
            the federation's totals.
    """
    n = torch.as_tensor(counts, dtype=torch.float64)
    big = torch.as_tensor(totals, dtype=torch.float64)
    if n.shape != big.shape or n.ndim != 1:
        raise ValueError(f"{len(big)} class totals for {len(n)} classes")
    short = [c for c in range(len(n)) if big[c] < n[c]]
    if short:
        c = short[0]
        raise ValueError(f"the federation's class totals count {int(big[c])} images of class {c}, fewer than the "
                         f"{int(n[c])} this site holds: they are not the federation's totals")
    held = big > 0
    if not bool(held.any()):
        raise ValueError("the federation's class totals are all 0")
    rarest = big[held].min()
    return max(1, round(float((n[held] * rarest / big[held]).sum())))


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


def fedavg(states: Sequence[StateDict], num_samples: Sequence[float],
           bn_stats: str = "pooled") -> dict[str, torch.Tensor]:
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
            within = torch.tensordot(w, torch.stack([s[key].to(torch.float64) for s in states]), dims=1)
            out[key] = (within + between).to(
                states[0][key].dtype
            )
    return out


# -- robust aggregation (the weights of sites are ignored: a bad site must not buy influence) ------
def _stack(states: Sequence[StateDict], key: str) -> torch.Tensor:
    return torch.stack([s[key].detach().to("cpu", torch.float64) for s in states])


def cast_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return (value if like.is_floating_point() else value.round()).to(like.dtype)


def coordinate_median(states: Sequence[StateDict]) -> dict[str, torch.Tensor]:
    """Coordinate-wise median (Yin et al. 2018); with an even count, the mean of the two middle values."""
    check_compatible(states)
    return {k: cast_like(_stack(states, k).quantile(0.5, dim=0) if len(states) > 1 else _stack(states, k)[0], ref)
            for k, ref in states[0].items()}


def trimmed_mean(states: Sequence[StateDict], beta: float) -> dict[str, torch.Tensor]:
    """Coordinate-wise beta-trimmed mean: drop the floor(beta*K) largest and smallest values, average the rest.

    With ``beta > 0`` and at least 3 sites, at least one value is dropped at each end (floor(0.2 * 4)
    would be 0: a plain mean, which one attacker controls).
    """
    check_compatible(states)
    k = len(states)
    cut = int(beta * k)
    if beta > 0 and k >= 3:
        cut = max(cut, 1)
    if not 0 <= beta < 0.5 or k - 2 * cut < 1:
        raise ValueError(f"trim beta={beta} must be in [0, 0.5) and leave a value of {k} sites")
    return {key: cast_like(_stack(states, key).sort(dim=0).values[cut:k - cut].mean(0), ref)
            for key, ref in states[0].items()}


def flatten(state: StateDict) -> torch.Tensor:
    """All floating-point entries of a state as one float64 vector (for distances)."""
    return torch.cat([t.detach().to("cpu", torch.float64).flatten() for t in state.values() if t.is_floating_point()])


def krum_scores(states: Sequence[StateDict], f: int) -> torch.Tensor:
    """Krum score of each state: the summed squared distance to its K - f - 2 nearest other states."""
    k = len(states)
    if k < 2 * f + 3:
        raise ValueError(f"Krum with f={f} Byzantine sites needs at least {2 * f + 3} sites, got {k}")
    x = torch.stack([flatten(s) for s in states])
    d = torch.cdist(x, x) ** 2
    d.fill_diagonal_(float("inf"))
    return d.sort(dim=1).values[:, : k - f - 2].sum(1)


def krum(states: Sequence[StateDict], num_samples: Sequence[float], f: int,
         m: int = 1) -> tuple[dict[str, torch.Tensor], list[int]]:
    """(Multi-)Krum (Blanchard et al. 2017): keep the ``m`` states with the lowest Krum scores, FedAvg them.

    Returns:
        (aggregate, indices of the kept states)
    """
    check_compatible(states)
    if not 1 <= m <= len(states):
        raise ValueError(f"Multi-Krum m={m} must be in 1..{len(states)}")
    keep = krum_scores(states, f).argsort()[:m].tolist()
    return fedavg([states[i] for i in keep], [num_samples[i] for i in keep], bn_stats="mean"), sorted(keep)


# -- helpers for strategies that treat some keys specially ---------------------------------------
def norm_prefixes(state: StateDict) -> set[str]:
    """Module prefixes of normalisation layers with running statistics (``features.block1.norm.``)."""
    return {k[: -len(BN_MEAN)] for k in state if k.endswith(BN_MEAN)}


def norm_keys(state: StateDict) -> set[str]:
    """Every key of a BatchNorm layer: weight, bias, running stats and the batch counter (FedBN keeps these local)."""
    prefixes = norm_prefixes(state)
    return {k for k in state if any(k.startswith(p) for p in prefixes)}


def buffer_keys(state: StateDict) -> set[str]:
    """Keys that are statistics, not trained parameters (running mean/var, counters)."""
    return {k for k in state if k.endswith((BN_MEAN, BN_VAR, "num_batches_tracked"))}


def server_opt_step(global_w: StateDict, target: StateDict, moments: dict[str, dict[str, torch.Tensor]] | None,
                    optimizer: str, lr: float, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3,
                    ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """One FedOpt server step (Reddi et al. 2021): the pseudo-gradient is ``target - global``.

    m = b1 m + (1 - b1) d;  Adam: v = b2 v + (1 - b2) d^2;  Yogi: v = v - (1 - b2) d^2 sign(v - d^2);
    x = x + lr m / (sqrt(v) + tau). Statistics buffers (BatchNorm running stats) are not
    optimised: they take the target's value.

    Returns:
        (new global state, new moments ``{"m": ..., "v": ...}``)
    """
    if optimizer not in ("adam", "yogi"):
        raise ValueError(f"server optimizer must be adam or yogi, got {optimizer!r}")
    stats = buffer_keys(global_w)
    m = dict(moments["m"]) if moments else {}
    v = dict(moments["v"]) if moments else {}
    out: dict[str, torch.Tensor] = {}
    for k, x in global_w.items():
        if k in stats or not x.is_floating_point():
            out[k] = target[k].clone()
            continue
        x64 = x.to(torch.float64)
        d = target[k].to(torch.float64) - x64
        m[k] = beta1 * m.get(k, torch.zeros_like(d)) + (1 - beta1) * d
        v_prev = v.get(k, torch.full_like(d, tau**2))
        if optimizer == "adam":
            v[k] = beta2 * v_prev + (1 - beta2) * d**2
        else:
            v[k] = v_prev - (1 - beta2) * d**2 * torch.sign(v_prev - d**2)
        out[k] = (x64 + lr * m[k] / (v[k].sqrt() + tau)).to(x.dtype)
    return out, {"m": m, "v": v}
