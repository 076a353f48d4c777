"""The orchestrator: the server's round loop. It sees only weights, sample counts and metrics."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from fedmed.federated.aggregation import state_nbytes
from fedmed.federated.client import EvalResult, clone_state

log = logging.getLogger("fedmed")

SELECTIONS = ("best_val_loss", "last")


@dataclass
class RoundRecord:
    round: int
    sites: list[str]
    metrics: dict[str, float]
    bytes_up: int
    bytes_down: int
    seconds: float


@dataclass
class FederationResult:
    """Final and selected global weights, and the per-round history."""

    final_weights: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor]  # the selected global model (see ``select``)
    round: int  # the round it comes from
    history: list[RoundRecord] = field(default_factory=list)
    site_eval: dict[str, EvalResult] = field(default_factory=dict)  # selected model, per site


def weighted_metrics(results: Sequence[EvalResult]) -> dict[str, float]:
    """Sample-weighted mean of each scalar metric over sites."""
    total = sum(r.num_samples for r in results)
    keys = set.intersection(*(set(r.metrics) for r in results))
    return {k: sum(r.metrics[k] * r.num_samples for r in results) / total for k in sorted(keys)}


def site_consistency(results: Sequence[EvalResult]) -> float:
    """Mean pairwise correlation of the sites' coarse per-class mean heatmaps (NaN with < 2 sites)."""
    from fedmed.explain.faithfulness import map_correlation

    maps = [r.xai_summary for r in results if r.xai_summary is not None]
    pairs = [map_correlation(a, b) for i, a in enumerate(maps) for b in maps[i + 1 :]]
    pairs = [p for p in pairs if not math.isnan(p)]
    return sum(pairs) / len(pairs) if pairs else float("nan")


class Orchestrator:
    """Runs rounds of: sample sites -> send global weights -> local training -> aggregate -> evaluate.

    Args:
        sites: objects with ``name``, ``fit(weights, round, epochs)`` and ``evaluate(weights, round)``
            (e.g. :class:`fedmed.federated.InProcessSite`).
        strategy: object with ``name`` and ``aggregate(states, num_samples)``.
        rounds: number of rounds.
        local_epochs: local epochs per round.
        fraction: share of sites sampled per round.
        min_sites: sample at least this many sites.
        seed: seeds site sampling.
        select: ``best_val_loss`` keeps the global model with the lowest sample-weighted site
            validation loss (federated evaluation; the test split is never used), ``last`` the final one.
        tracker, run_id: where the federation's per-round metrics go (MLflow parent run).
        explain_rounds: rounds at which sites also explain the new global model (numbers come back).
    """

    def __init__(
        self,
        sites: Sequence,
        strategy,
        rounds: int,
        local_epochs: int = 1,
        fraction: float = 1.0,
        min_sites: int = 1,
        seed: int = 0,
        select: str = "best_val_loss",
        tracker=None,
        run_id: str | None = None,
        explain_rounds: set[int] | frozenset[int] = frozenset(),
    ):
        if rounds < 1 or local_epochs < 1:
            raise ValueError(f"rounds and local_epochs must be >= 1, got {rounds}, {local_epochs}")
        if not 0 < fraction <= 1:
            raise ValueError(f"federation.fraction must be in (0, 1], got {fraction}")
        if select not in SELECTIONS:
            raise ValueError(f"federation.select must be one of {SELECTIONS}, got {select!r}")
        if min_sites > len(sites):
            raise ValueError(f"federation.min_sites={min_sites} but only {len(sites)} sites")
        self.sites, self.strategy = list(sites), strategy
        self.rounds, self.local_epochs = rounds, local_epochs
        self.fraction, self.min_sites, self.seed, self.select = fraction, min_sites, seed, select
        self.tracker, self.run_id = tracker, run_id
        self.explain_rounds = set(explain_rounds)

    def sample(self, round_idx: int) -> list:
        k = max(self.min_sites, math.ceil(self.fraction * len(self.sites)))
        if k >= len(self.sites):
            return list(self.sites)
        rng = np.random.default_rng([self.seed, round_idx])
        return [self.sites[i] for i in sorted(rng.choice(len(self.sites), size=k, replace=False))]

    def run(self, initial: Mapping[str, torch.Tensor]) -> FederationResult:
        global_w = clone_state(initial)
        best: tuple[float, int, dict, dict] | None = None
        history: list[RoundRecord] = []
        for r in range(1, self.rounds + 1):
            t0 = time.perf_counter()
            chosen = self.sample(r)
            log.info("round %d/%d: training at %s", r, self.rounds, ", ".join(s.name for s in chosen))
            payload = state_nbytes(global_w)
            fits = [site.fit(global_w, r, self.local_epochs) for site in chosen]
            bytes_down = payload * len(chosen)
            bytes_up = sum(state_nbytes(f.weights) for f in fits)
            global_w = self.strategy.aggregate([f.weights for f in fits], [f.num_samples for f in fits])
            explain = r in self.explain_rounds
            evals = {site.name: site.evaluate(global_w, r, explain=explain) for site in self.sites}
            metrics = {f"val_{k}": v for k, v in weighted_metrics(list(evals.values())).items()}
            if explain:
                metrics["xai_site_consistency"] = site_consistency(list(evals.values()))
            n_train = sum(f.num_samples for f in fits)
            metrics["train_loss"] = sum(f.metrics.get("train_loss", 0.0) * f.num_samples for f in fits) / n_train
            metrics.update({"comm_bytes_up": bytes_up, "comm_bytes_down": bytes_down, "sites_trained": len(fits)})
            record = RoundRecord(r, [f.site for f in fits], metrics, bytes_up, bytes_down, time.perf_counter() - t0)
            metrics["round_seconds"] = record.seconds
            history.append(record)
            if self.tracker and self.run_id:
                self.tracker.log_metrics(self.run_id, metrics, step=r)
            log.info(
                "round %d/%d: val_loss=%.4f val_acc=%.4f val_auroc=%.4f | sent %.2f MB | %.1fs",
                r, self.rounds, metrics["val_loss"], metrics["val_acc"], metrics["val_auroc"],
                (bytes_up + bytes_down) / 2**20, record.seconds,
            )
            if explain:
                log.info("round %d/%d: explained at every site: deletion AUC %.3f, insertion AUC %.3f, "
                         "cross-site heatmap consistency %.3f", r, self.rounds, metrics["val_xai_deletion_auc"],
                         metrics["val_xai_insertion_auc"], metrics["xai_site_consistency"])
            if best is None or self.select == "last" or metrics["val_loss"] < best[0]:
                best = (metrics["val_loss"], r, clone_state(global_w), evals)
        assert best is not None
        _, best_round, best_w, best_evals = best
        if self.tracker and self.run_id:
            self.tracker.set_tags(self.run_id, {"selected_round": best_round})
        return FederationResult(global_w, best_w, best_round, history, best_evals)
