"""The orchestrator: the server's round loop. It sees only weights, sample counts and metrics."""

from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from fedmed.errors import FedmedError
from fedmed.federated.aggregation import state_nbytes
from fedmed.federated.client import EvalResult, FitResult, clone_state
from fedmed.federated.compression import decode_update, payload_nbytes

log = logging.getLogger("fedmed")

SELECTIONS = ("best_val_loss", "last")
CHECKPOINT = "server.pt"


#: strategies that need only the sum of the updates, so they run under secure aggregation
SUMMABLE = ("fedavg", "fedprox", "fedbn", "fedadam", "fedyogi")


class FederationError(FedmedError):
    """A round could not complete (too few sites succeeded); the last round's checkpoint is intact."""


class BudgetSpent(FederationError):
    """Too few sites have privacy budget left for another round: the federation ends after the last one."""


def receive(result, global_w: Mapping[str, torch.Tensor]):
    """What the server does with a site's answer before checking it: measure its bytes, decode a compressed update."""
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


def check_masked(length: int, result) -> str | None:
    """Why a masked update is unusable (the server cannot look inside one: only its form)."""
    if not isinstance(result, FitResult):
        return f"returned {type(result).__name__}, not a FitResult"
    m = result.masked
    if not isinstance(m, np.ndarray) or m.dtype != np.uint64 or m.shape != (length,):
        return f"masked update is not a uint64 vector of length {length}"
    return None


def check_update(global_w: Mapping[str, torch.Tensor], result) -> str | None:
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


def _call_with_timeout(fn, timeout: float | None):
    """Run ``fn()``; with a timeout, in a daemon thread (a hung site cannot block the federation).

    Returns (value, None), or raises; on timeout the still-running thread is in the exception's
    ``thread`` attribute (an in-process site cannot be killed, only ignored until it returns).
    """
    if not timeout:
        return fn(), None
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        err = TimeoutError(f"no answer within federation.site_timeout={timeout:g}s")
        err.thread = thread
        raise err
    if "error" in box:
        raise box["error"]
    return box["value"], None


def concurrently(fn, sites: Sequence) -> list[tuple[object, Exception | None]]:
    """``fn(site)`` for every site: at the same time where every site runs elsewhere (``site.parallel``,
    e.g. Flower nodes), one after another otherwise (in-process sites share this process' RNG).

    Returns (value, None) or (None, exception) per site, in the sites' order.
    """
    def safe(site):
        try:
            return fn(site), None
        except Exception as exc:  # noqa: BLE001 - reported per site
            return None, exc

    if len(sites) > 1 and all(getattr(s, "parallel", False) for s in sites):
        with ThreadPoolExecutor(max_workers=len(sites), thread_name_prefix="site") as pool:
            return list(pool.map(safe, sites))
    return [safe(s) for s in sites]


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a kill during the write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)


def load_checkpoint(path: Path) -> dict:
    if not path.exists():
        raise FedmedError(f"no federation checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=False)


@dataclass
class RoundRecord:
    round: int
    sites: list[str]
    metrics: dict[str, float]
    bytes_up: int
    bytes_down: int
    seconds: float
    site_metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # what each site reported


@dataclass
class FederationResult:
    """Final and selected global weights, and the per-round history."""

    final_weights: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor]  # the selected global model (see ``select``)
    round: int  # the round it comes from
    history: list[RoundRecord] = field(default_factory=list)
    site_eval: dict[str, EvalResult] = field(default_factory=dict)  # selected model, per site


def weighted_metrics(results: Sequence[EvalResult]) -> dict[str, float]:
    """Sample-weighted mean of each scalar metric over the sites where it is defined (not NaN).

    A metric that no site defines (e.g. AUROC when every site's validation data holds one class)
    is NaN.
    """
    keys = set.intersection(*(set(r.metrics) for r in results))
    out = {}
    for k in sorted(keys):
        have = [r for r in results if not math.isnan(r.metrics[k])]
        total = sum(r.num_samples for r in have)
        out[k] = sum(r.metrics[k] * r.num_samples for r in have) / total if total else float("nan")
    return out


def site_consistency(results: Sequence[EvalResult]) -> float:
    """Mean pairwise correlation of the sites' coarse per-class mean heatmaps (NaN with < 2 sites)."""
    from fedmed.explain.faithfulness import map_correlation

    maps = [r.xai_summary for r in results if r.xai_summary is not None]
    pairs = [map_correlation(a, b) for i, a in enumerate(maps) for b in maps[i + 1 :]]
    pairs = [p for p in pairs if not math.isnan(p)]
    return sum(pairs) / len(pairs) if pairs else float("nan")


class Orchestrator:
    """Runs rounds of: sample sites -> send global weights -> local training -> aggregate -> evaluate.

    A site that raises, exceeds ``site_timeout`` or returns a malformed update (wrong keys,
    shapes or dtypes, NaN/Inf, no samples) is left out of that round with a log line and an
    MLflow tag naming it and the reason; the round goes on if at least ``min_sites`` succeeded,
    else :class:`FederationError`. After every round the server state (global weights, best
    model so far, strategy state, sites' own state, RNG state, history) is checkpointed to
    ``checkpoint_dir/server.pt``; ``run(..., resume=state)`` continues after its last round and
    ends with the same weights as an uninterrupted run.

    Args:
        sites: objects with ``name``, ``fit(weights, round, epochs, config)``,
            ``evaluate(weights, round, explain)``, ``state_dict()``, ``load_state_dict()``
            (e.g. :class:`fedmed.federated.InProcessSite`).
        strategy: a :class:`fedmed.federated.strategies.Strategy`.
        rounds: number of rounds.
        local_epochs: local epochs per round.
        fraction: share of sites sampled per round.
        min_sites: sample at least this many sites, and need this many successful updates.
        seed: seeds site sampling.
        select: ``best_val_loss`` keeps the global model with the lowest sample-weighted site
            validation loss (federated evaluation; the test split is never used), ``last`` the final one.
        tracker, run_id: where the federation's per-round metrics go (MLflow parent run).
        explain_rounds: rounds at which sites also explain the new global model (numbers come back).
        site_timeout: seconds a site may take to train (None: no limit).
        checkpoint_dir: where the server checkpoints after every round (None: nowhere).
        extra_state: saved with every checkpoint (e.g. the MLflow run ids and the config).
        secure_aggregation: sites send masked contributions; the server only learns their sum
            (:mod:`fedmed.privacy.secagg`). Needs a strategy in :data:`SUMMABLE`.
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
        site_timeout: float | None = None,
        checkpoint_dir: str | Path | None = None,
        extra_state: Mapping | None = None,
        secure_aggregation: bool = False,
    ):
        if secure_aggregation and strategy.name not in SUMMABLE:
            raise FedmedError(f"privacy.secure_aggregation works with {', '.join(SUMMABLE)}: they need only the "
                              f"sum of the updates; federation.strategy={strategy.name} needs each one")
        if secure_aggregation and len(sites) < 2:
            raise FedmedError("privacy.secure_aggregation needs at least 2 sites (a sum of one update is the update)")
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
        self.site_timeout = site_timeout
        self.checkpoint = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir else None
        self.extra_state = dict(extra_state or {})
        self._stray: dict[str, threading.Thread] = {}  # sites still running a timed-out round
        self.secure = secure_aggregation

    def sample(self, round_idx: int) -> list:
        k = max(self.min_sites, math.ceil(self.fraction * len(self.sites)))
        if k >= len(self.sites):
            return list(self.sites)
        rng = np.random.default_rng([self.seed, round_idx])
        return [self.sites[i] for i in sorted(rng.choice(len(self.sites), size=k, replace=False))]

    def _exclude(self, r: int, site: str, reason: str) -> None:
        log.warning("round %d/%d: site %s excluded: %s", r, self.rounds, site, reason)
        if self.tracker and self.run_id:
            self.tracker.set_tags(self.run_id, {f"excluded.round_{r:03d}.{site}": reason[:250]})

    def _train_round(self, r: int, chosen: list, global_w) -> tuple[list[FitResult], dict[str, bytes]]:
        config = self.strategy.site_config(global_w)
        peers: dict[str, bytes] = {}
        if self.secure:
            from fedmed.privacy.secagg import vector_length

            for site in chosen:
                try:
                    peers[site.name] = site.public_key()
                except Exception as exc:  # noqa: BLE001
                    self._exclude(r, site.name, f"no public key for secure aggregation: {type(exc).__name__}: {exc}")
            chosen = [s for s in chosen if s.name in peers]
            config = {**config, "secagg": {"round": r, "peers": peers, "pooled_bn": self.strategy.bn_stats == "pooled"}}
            length = vector_length(global_w)
        fits, out_of_budget = [], []
        busy = {s.name for s in chosen if (t := self._stray.get(s.name)) is not None and t.is_alive()}
        for name in sorted(busy):
            self._exclude(r, name, "still busy with the round it timed out in")
        ready = [s for s in chosen if s.name not in busy]

        def train(site):
            result, _ = _call_with_timeout(lambda: site.fit(global_w, r, self.local_epochs, config), self.site_timeout)
            return receive(result, global_w)

        for site, (result, exc) in zip(ready, concurrently(train, ready)):  # answers in site order: same aggregate
            if exc is not None:  # a failing site must not end the federation
                if getattr(exc, "thread", None) is not None:
                    self._stray[site.name] = exc.thread
                if getattr(exc, "kind", type(exc).__name__) == "PrivacyBudgetExhausted":  # kind: from a remote site
                    out_of_budget.append(site.name)
                self._exclude(r, site.name, f"{type(exc).__name__}: {exc}")
                continue
            problem = check_masked(length, result) if self.secure else check_update(global_w, result)
            if problem:
                self._exclude(r, site.name, f"malformed update: {problem}")
                continue
            fits.append(result)
        if len(fits) < self.min_sites and out_of_budget:
            raise BudgetSpent(f"round {r}: sites {', '.join(out_of_budget)} have spent their privacy budget; "
                              f"{len(fits)} site(s) could train (federation.min_sites={self.min_sites})")
        if len(fits) < self.min_sites:
            raise FederationError(
                f"round {r}: only {len(fits)} of {len(chosen)} sites returned a usable update "
                f"(federation.min_sites={self.min_sites}); the federation stops"
                + (f", its state after round {r - 1} is in {self.checkpoint}" if self.checkpoint and r > 1 else ""))
        return fits, peers

    def _unmask(self, r: int, fits: list[FitResult], peers: dict[str, bytes], global_w) -> FitResult:
        """Secure aggregation: the sum of the survivors' contributions, as one FitResult of their mean.

        Sites told to mask that did not deliver have dropped out: every survivor sends its masks
        with them, which the server subtracts. A survivor that fails to do so drops out too.
        """
        from fedmed.privacy.secagg import mean_state, unmask_sum, vector_length

        by_name = {s.name: s for s in self.sites}
        survivors = list(fits)
        length = vector_length(global_w)
        while True:
            dropped = {n: pub for n, pub in peers.items() if n not in {f.site for f in survivors}}
            corrections, failed = [], None
            for f in survivors if dropped else []:
                try:
                    corrections.append(by_name[f.site].dropout_correction(dropped, r, length))
                except Exception as exc:  # noqa: BLE001
                    self._exclude(r, f.site, f"no dropout correction for secure aggregation: {exc}")
                    failed = f
                    break
            if failed is None:
                break
            survivors.remove(failed)
        if len(survivors) < max(self.min_sites, 1):
            raise FederationError(f"round {r}: only {len(survivors)} sites completed secure aggregation "
                                  f"(federation.min_sites={self.min_sites})")
        if dropped:
            log.info("round %d/%d: secure aggregation: removed the masks shared with %s (dropped out)",
                     r, self.rounds, ", ".join(sorted(dropped)))
        total = unmask_sum([f.masked for f in survivors], corrections)
        mean, n = mean_state(total, global_w, self.strategy.bn_stats == "pooled")
        expected = sum(f.num_samples for f in survivors)
        if n != expected:
            raise FederationError(f"round {r}: secure aggregation sum has n={n}, the sites reported {expected}")
        return FitResult("secure sum of " + "+".join(f.site for f in survivors), mean, n)

    def _evaluate_round(self, r: int, global_w, explain: bool) -> dict[str, EvalResult]:
        evals = {}
        # a site whose model is being trained by a timed-out round is skipped
        ready = [s for s in self.sites if (t := self._stray.get(s.name)) is None or not t.is_alive()]
        for site, (ev, exc) in zip(ready, concurrently(lambda s: s.evaluate(global_w, r, explain=explain), ready)):
            if exc is None:
                evals[site.name] = ev
            else:
                self._exclude(r, site.name, f"evaluation failed: {type(exc).__name__}: {exc}")
        if not evals:
            raise FederationError(f"round {r}: no site could evaluate the global model")
        return evals

    def state(self, r: int, global_w, best, history) -> dict:
        return {
            "round": r, "global": global_w, "best": best, "history": history,
            "strategy": self.strategy.state_dict(),
            "sites": {s.name: s.state_dict() for s in self.sites if hasattr(s, "state_dict")},
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
            **self.extra_state,
        }

    def run(self, initial: Mapping[str, torch.Tensor], resume: Mapping | None = None) -> FederationResult:
        global_w = clone_state(initial)
        best: tuple[float, int, dict, dict] | None = None
        history: list[RoundRecord] = []
        first = 1
        if resume is not None:
            first = int(resume["round"]) + 1
            global_w, best, history = clone_state(resume["global"]), resume["best"], list(resume["history"])
            self.strategy.load_state_dict(resume["strategy"])
            for s in self.sites:
                if s.name in resume.get("sites", {}) and hasattr(s, "load_state_dict"):
                    s.load_state_dict(resume["sites"][s.name])
            torch.set_rng_state(resume["rng"]["torch"])
            np.random.set_state(resume["rng"]["numpy"])
            random.setstate(resume["rng"]["python"])
            log.info("resuming after round %d/%d", first - 1, self.rounds)
        for r in range(first, self.rounds + 1):
            t0 = time.perf_counter()
            chosen = self.sample(r)
            log.info("round %d/%d: training at %s", r, self.rounds, ", ".join(s.name for s in chosen))
            payload = state_nbytes(global_w)
            try:
                fits, peers = self._train_round(r, chosen, global_w)
            except BudgetSpent as exc:
                if best is None:
                    raise
                log.warning("%s: the federation ends after round %d", exc, r - 1)
                if self.tracker and self.run_id:
                    self.tracker.set_tags(self.run_id, {"stopped_early": f"privacy budget spent before round {r}"})
                break
            bytes_down = payload * len(chosen)
            bytes_up = sum(f.wire_bytes for f in fits)
            global_w = self.strategy.aggregate(global_w, [self._unmask(r, fits, peers, global_w)] if self.secure else fits)
            explain = r in self.explain_rounds
            evals = self._evaluate_round(r, global_w, explain)
            metrics = {f"val_{k}": v for k, v in weighted_metrics(list(evals.values())).items()}
            if explain:
                metrics["xai_site_consistency"] = site_consistency(list(evals.values()))
            n_train = sum(f.num_samples for f in fits)
            metrics["train_loss"] = sum(f.metrics.get("train_loss", 0.0) * f.num_samples for f in fits) / n_train
            metrics.update({"comm_bytes_up": bytes_up, "comm_bytes_down": bytes_down, "sites_trained": len(fits),
                            "sites_failed": len(chosen) - len(fits)})
            if any("dp_epsilon" in f.metrics for f in fits):
                metrics["dp_epsilon_max"] = max(f.metrics.get("dp_epsilon", 0.0) for f in fits)
            record = RoundRecord(r, [f.site for f in fits], metrics, bytes_up, bytes_down, time.perf_counter() - t0,
                                 {f.site: dict(f.metrics) for f in fits})
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
            if self.checkpoint:
                save_checkpoint(self.checkpoint, self.state(r, global_w, best, history))
        assert best is not None
        _, best_round, best_w, best_evals = best
        if self.tracker and self.run_id:
            self.tracker.set_tags(self.run_id, {"selected_round": best_round})
        return FederationResult(global_w, best_w, best_round, history, best_evals)
