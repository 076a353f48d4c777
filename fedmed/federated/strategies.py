"""Aggregation strategies: the server side (``aggregate``) and what each asks of the sites (``site_config``).

A strategy sees the current global weights and the sites' :class:`~fedmed.federated.client.FitResult`
objects and returns the next global weights. Its own state (server-optimizer moments, SCAFFOLD's
control variate) is in ``state_dict()`` so a crashed federation resumes exactly.

| name | server | site |
|---|---|---|
| fedavg | sample-weighted mean (BN stats pooled) | plain local training |
| fedprox | as fedavg | loss + mu/2 ||w - w_global||^2 (``federation.mu``) |
| fedbn | as fedavg (global BN only for the pooled test) | keeps its own BatchNorm layers |
| fedadam / fedyogi | Adam / Yogi step on the pseudo-gradient (``server_lr``, ``beta1``, ``beta2``, ``tau``) | plain |
| scaffold | mean update + control variate c | SGD with gradient correction c - c_i |
| median | coordinate-wise median | plain |
| trimmed_mean | coordinate-wise trimmed mean (``trim_beta``) | plain |
| krum | (Multi-)Krum (``krum_f``, ``krum_m``) | plain |
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedmed.federated.aggregation import (
    buffer_keys,
    coordinate_median,
    fedavg,
    krum,
    norm_keys,
    server_opt_step,
    trimmed_mean,
)

log = logging.getLogger("fedmed")
StateDict = Mapping[str, torch.Tensor]


class Strategy:
    """FedAvg, and the base of the others."""

    name = "fedavg"

    def __init__(self, bn_stats: str = "pooled", **_: Any):
        self.bn_stats = bn_stats
        self.last_kept: list[str] | None = None  # sites whose updates the last aggregate used (Krum)

    def site_config(self, global_w: StateDict) -> dict[str, Any]:
        """Extra instructions sent to every site with the global weights."""
        return {}

    def aggregate(self, global_w: StateDict, fits: Sequence) -> dict[str, torch.Tensor]:
        return fedavg([f.weights for f in fits], [f.num_samples for f in fits], bn_stats=self.bn_stats)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class FedProx(Strategy):
    """FedProx (Li et al. 2020): sites add mu/2 ||w - w_global||^2 to their loss."""

    name = "fedprox"

    def __init__(self, mu: float = 0.01, **kw: Any):
        super().__init__(**kw)
        if mu < 0:
            raise ValueError(f"federation.mu must be >= 0, got {mu}")
        self.mu = mu

    def site_config(self, global_w):
        return {"prox_mu": self.mu}


class FedBN(Strategy):
    """FedBN (Li et al. 2021): BatchNorm weights and statistics stay at each site."""

    name = "fedbn"

    def site_config(self, global_w):
        return {"local_keys": sorted(norm_keys(global_w))}


class FedOpt(Strategy):
    """FedAdam / FedYogi (Reddi et al. 2021): a server optimizer steps towards the sites' mean."""

    def __init__(self, optimizer: str = "adam", server_lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3, **kw: Any):
        super().__init__(**kw)
        self.name = f"fed{optimizer}"
        self.optimizer, self.lr, self.beta1, self.beta2, self.tau = optimizer, server_lr, beta1, beta2, tau
        self.moments: dict[str, dict[str, torch.Tensor]] | None = None

    def aggregate(self, global_w, fits):
        target = super().aggregate(global_w, fits)
        new, self.moments = server_opt_step(global_w, target, self.moments, self.optimizer, self.lr,
                                            self.beta1, self.beta2, self.tau)
        return new

    def state_dict(self):
        return {"moments": self.moments}

    def load_state_dict(self, state):
        self.moments = state.get("moments")


class Scaffold(Strategy):
    """SCAFFOLD (Karimireddy et al. 2020), option II control variates; sites train with plain SGD.

    Server: x <- x + server_lr * mean_k(y_k - x);  c <- c + |S|/N * mean_k(delta c_k).
    Site: gradient + (c - c_i) at every step; c_i+ = c_i - c + (x - y_i) / (steps * lr).
    """

    name = "scaffold"

    def __init__(self, server_lr: float = 1.0, local_lr: float = 0.05, num_sites: int = 1, **kw: Any):
        super().__init__(**kw)
        self.server_lr, self.local_lr, self.num_sites = server_lr, local_lr, num_sites
        self.c: dict[str, torch.Tensor] | None = None

    def _trainable(self, global_w):
        stats = buffer_keys(global_w)
        return [k for k, v in global_w.items() if v.is_floating_point() and k not in stats]

    def site_config(self, global_w):
        if self.c is None:
            self.c = {k: torch.zeros_like(global_w[k], dtype=torch.float64) for k in self._trainable(global_w)}
        return {"scaffold_c": self.c, "sgd_lr": self.local_lr}

    def aggregate(self, global_w, fits):
        avg = fedavg([f.weights for f in fits], [f.num_samples for f in fits], bn_stats=self.bn_stats)
        out = dict(avg)
        for k in self._trainable(global_w):
            x = global_w[k].to(torch.float64)
            out[k] = (x + self.server_lr * (avg[k].to(torch.float64) - x)).to(global_w[k].dtype)
        deltas = [f.extras["scaffold_delta_c"] for f in fits]
        share = len(fits) / max(self.num_sites, len(fits))
        for k in self.c:
            self.c[k] = self.c[k] + share * torch.stack([d[k] for d in deltas]).mean(0)
        return out

    def state_dict(self):
        return {"c": self.c}

    def load_state_dict(self, state):
        self.c = state.get("c")


class Median(Strategy):
    name = "median"

    def aggregate(self, global_w, fits):
        return coordinate_median([f.weights for f in fits])


class TrimmedMean(Strategy):
    name = "trimmed_mean"

    def __init__(self, trim_beta: float = 0.2, **kw: Any):
        super().__init__(**kw)
        self.beta = trim_beta

    def aggregate(self, global_w, fits):
        return trimmed_mean([f.weights for f in fits], self.beta)


class Krum(Strategy):
    name = "krum"

    def __init__(self, krum_f: int = 1, krum_m: int = 1, num_sites: int | None = None, **kw: Any):
        super().__init__(**kw)
        self.f, self.m = krum_f, krum_m
        if num_sites is not None and num_sites < 2 * krum_f + 3:
            from fedmed.errors import FedmedError

            raise FedmedError(f"krum with federation.krum_f={krum_f} needs at least {2 * krum_f + 3} sites, "
                              f"the federation has {num_sites}; lower krum_f or use median / trimmed_mean")

    def aggregate(self, global_w, fits):
        out, kept = krum([f.weights for f in fits], [f.num_samples for f in fits], self.f, min(self.m, len(fits)))
        self.last_kept = [fits[i].site for i in kept]
        return out


STRATEGIES = {
    "fedavg": Strategy, "fedprox": FedProx, "fedbn": FedBN,
    "fedadam": lambda **kw: FedOpt("adam", **kw), "fedyogi": lambda **kw: FedOpt("yogi", **kw),
    "scaffold": Scaffold, "median": Median, "trimmed_mean": TrimmedMean, "krum": Krum,
}


def make_strategy(name: str, **params: Any) -> Strategy:
    """Build a strategy by name with the ``federation`` parameters it takes (others are ignored)."""
    if name not in STRATEGIES:
        from fedmed.errors import FedmedError

        raise FedmedError(f"federation.strategy={name!r} is not one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name](**params)
