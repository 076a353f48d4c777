"""FedNova (Wang et al. 2020): normalised averaging for sites that take different numbers of local steps.

With plain FedAvg a site that takes more local steps (more data, or more epochs) moves the
average further towards its own optimum, and the federation minimises a mix of the sites'
objectives weighted by their step counts instead of the intended one. FedNova divides each
site's update by its step count tau_k before averaging, then rescales by the effective step
count tau_eff = sum_k p_k tau_k:

    d_k = (x - y_k) / tau_k,    x <- x - tau_eff * sum_k p_k d_k,    p_k = n_k / n.

The normaliser a_k = tau_k is FedNova's for plain local SGD; with Adam or momentum at the sites it
is the step-count normalisation. BatchNorm statistics and integer buffers are aggregated as in
FedAvg. With equal step counts FedNova is FedAvg.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fedmed.aggregation import fedavg, normalized_weights
from fedmed.federated.strategies.base import SitePart, StateDict, Strategy, Update
from fedmed.federated.strategies.scaffold import trainable_keys

STEPS = "fednova_steps"


def fednova(global_w: StateDict, states: Sequence[StateDict], num_samples: Sequence[float], steps: Sequence[int],
            bn_stats: str = "pooled") -> dict[str, torch.Tensor]:
    """FedNova's aggregate of site weights ``states`` that took ``steps`` local steps from ``global_w``."""
    if len(steps) != len(states) or any(int(t) < 1 for t in steps):
        raise ValueError(f"FedNova needs a positive step count per site, got {list(steps)}")
    p = normalized_weights(num_samples)  # float64
    tau = torch.as_tensor([float(t) for t in steps], dtype=torch.float64)
    tau_eff = float((p * tau).sum())
    out = fedavg(states, num_samples, bn_stats=bn_stats)
    for k in trainable_keys(global_w):
        x = global_w[k].to(torch.float64)
        d = sum(p[i] * (x - s[k].to(torch.float64)) / tau[i] for i, s in enumerate(states))
        out[k] = (x - tau_eff * d).to(global_w[k].dtype)
    return out


class FedNova(Strategy):
    """Normalised averaging: each update counts by its site's data, not by how many steps it took."""

    name = "fednova"
    summable = False  # each update is divided by its own site's step count

    def aggregate_fit(self, global_w: StateDict, fits: Sequence[Update]) -> dict[str, torch.Tensor]:
        return fednova(global_w, [f.weights for f in fits], [f.num_samples for f in fits],
                       [int(f.extras[STEPS]) for f in fits], self.bn_stats)

    def site_part(self) -> SitePart:
        return StepCount()


class StepCount(SitePart):
    """The site side of FedNova: report the number of local steps with the update."""

    def after_training(self, start, new, steps, lr_factors) -> dict[str, Any]:
        return {STEPS: int(steps)}
