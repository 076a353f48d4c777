"""The orchestrator: the server's round loop. It sees only weights, sample counts and metrics."""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmed.aggregation import state_nbytes
from fedmed.choices import SELECTIONS, WEIGHTINGS
from fedmed.errors import BudgetSpent, FederationError, FedmedError
from fedmed.federated.calls import SiteTimeout, call_with_timeout, concurrently
from fedmed.federated.checkpoint import CHECKPOINT, save_checkpoint
from fedmed.federated.messages import EvalResult, FitResult, RoundRecord, clone_state
from fedmed.federated.secure_round import collect_keys, unmask, unmask_vectors
from fedmed.federated.statistics import (
    HeadCalibration,
    check_statistics,
    last_linear,
    statistics_from_vector,
    statistics_length,
    summed,
)
from fedmed.federated.strategies.base import Strategy
from fedmed.federated.tail_average import TailAverage
from fedmed.federated.transport import SiteTransport
from fedmed.federated.updates import check_masked, check_masked_vector, check_update, receive
from fedmed.models.metrics import balanced_accuracy
from fedmed.privacy.dp import PrivacyBudgetExhausted
from fedmed.privacy.secagg import vector_length
from fedmed.tracking import RunLog

log = logging.getLogger("fedmed")



def pooled_balanced_acc(results: Sequence[EvalResult]) -> float:
    """Balanced accuracy of the sites' validation data taken together (their confusion matrices summed).

    NaN when a site sent no confusion matrix. Unlike the sample-weighted mean of the sites' own
    balanced accuracies, a class only one site holds counts as much as any other.
    """
    mats = [r.confmat for r in results]
    if not mats or any(m is None for m in mats):
        return float("nan")
    return balanced_accuracy(torch.stack([m.to(torch.float64) for m in mats if m is not None]).sum(0))


def site_mean_balanced_acc(results: Sequence[EvalResult]) -> float:
    """Mean over the sites of each site's own validation balanced accuracy (sites without a confusion
    matrix or without labelled images left out; NaN if none is left): every site counts the same,
    whatever its size."""
    values = [balanced_accuracy(r.confmat.to(torch.float64)) for r in results if r.confmat is not None]
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


SELECTION_METRIC = {"best_val_balanced_acc": "val_pooled_balanced_acc",
                    "best_val_site_balanced_acc": "val_site_balanced_acc"}


def selection_score(select: str, metrics: Mapping[str, float]) -> float:
    """Lower is better: the validation loss, or minus the validation balanced accuracy (the sites' pooled,
    or the mean of the sites' own)."""
    if select in SELECTION_METRIC:
        value = metrics[SELECTION_METRIC[select]]
        return float("inf") if math.isnan(value) else -value
    return metrics["val_loss"]


@dataclass(frozen=True)
class FederationSettings:
    """How the round loop runs.

    Args:
        rounds: number of rounds.
        local_epochs: local epochs per round.
        fraction: share of sites sampled per round.
        min_sites: sample at least this many sites, and need this many successful updates.
        seed: seeds site sampling.
        select: ``best_val_loss`` keeps the global model with the lowest sample-weighted site
            validation loss (federated evaluation; the test split is never used),
            ``best_val_balanced_acc`` the one with the highest balanced accuracy on the sites'
            validation data taken together, ``best_val_site_balanced_acc`` the one with the highest
            mean of the sites' own validation balanced accuracies, ``last`` the final one.
        explain_rounds: rounds at which sites also explain the new global model (numbers come back).
        site_timeout: seconds a site may take to train (None: no limit).
        secure_aggregation: sites send masked contributions; the server only learns their sum
            (:mod:`fedmed.privacy.secagg`). Needs a strategy whose aggregate is ``summable``.
        label_prior: before the first round every site sends its training images per class; their sum
            goes to every site with every round (``model.logit_prior=federation``).
        weighting: ``examples`` (FedAvg: each update weighs by the site's training images) or ``balanced``: the
            sites' label counts are summed before the first round, as for ``label_prior``, and go to every site
            with every round as ``class_totals``; each site then weighs its update by
            :func:`~fedmed.aggregation.balanced_weight` (``federation.weighting=balanced``).
        num_classes: the model's classes (checks what the sites send).
        average_from: from this round on, the model the sites evaluate, that selection may keep and that
            the run returns is the mean of the global models since this round
            (:mod:`fedmed.federated.tail_average`); training goes on from the plain global model. None: off.
        calibrate_from: from this round on, that model is head-calibrated every round before the sites evaluate
            it (the Orchestrator's ``head``), so selection chooses among calibrated models; training goes on
            from the plain global model. None: off (the selected model may be calibrated once, afterwards).
        style_mix: before the first round every site sends its mean low-frequency amplitude spectrum
            (:mod:`fedmed.data.style`); they go to every site with every round as ``style_spectra``, and each site
            gives this share of its training images another site's look. 0: off. Not with secure aggregation
            (each site's spectrum reaches the server, and its peers, in the clear).
    """

    rounds: int
    local_epochs: int = 1
    fraction: float = 1.0
    min_sites: int = 1
    seed: int = 0
    select: str = "best_val_loss"
    explain_rounds: frozenset[int] = frozenset()
    site_timeout: float | None = None
    secure_aggregation: bool = False
    label_prior: bool = False
    weighting: str = "examples"
    num_classes: int | None = None
    average_from: int | None = None
    calibrate_from: int | None = None
    style_mix: float = 0.0

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.local_epochs < 1:
            raise ValueError(f"rounds and local_epochs must be >= 1, got {self.rounds}, {self.local_epochs}")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"federation.fraction must be in (0, 1], got {self.fraction}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"federation.weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.counts_needed and self.num_classes is None:
            raise ValueError("label_prior and weighting=balanced need num_classes")
        if self.select not in SELECTIONS:
            raise ValueError(f"federation.select must be one of {SELECTIONS}, got {self.select!r}")
        if self.average_from is not None and not 1 <= self.average_from <= self.rounds:
            raise ValueError(f"federation.average_from must be a round from 1 to federation.rounds={self.rounds} "
                             f"(or null), got {self.average_from}")
        if not 0 <= self.style_mix <= 1:
            raise ValueError(f"federation.style_mix must be in [0, 1], got {self.style_mix}")
        if self.style_mix and self.secure_aggregation:
            raise ValueError("federation.style_mix with secure aggregation: each site's style spectrum would reach "
                             "the server and its peers unmasked")
        if self.calibrate_from is not None and not 1 <= self.calibrate_from <= self.rounds:
            raise ValueError(f"federation.calibrate_from must be a round from 1 to federation.rounds={self.rounds} "
                             f"(or null), got {self.calibrate_from}")

    @property
    def counts_needed(self) -> bool:
        """Whether the sites' label counts are summed before the first round (the prior, the balanced weights)."""
        return self.label_prior or self.weighting == "balanced"


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


Best = tuple[float, int, dict[str, torch.Tensor], dict[str, EvalResult]]


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
        sites: the sites, each a :class:`~fedmed.federated.transport.SiteTransport`.
        strategy: a :class:`~fedmed.federated.strategies.base.Strategy`.
        settings: the round loop's :class:`FederationSettings`.
        run: the federation's MLflow run (per-round metrics, exclusion tags).
        checkpoint_dir: where the server checkpoints after every round (None: nowhere).
        extra_state: saved with every checkpoint (e.g. the MLflow run ids and the config).
        head: how to re-fit the classifier layer and a network of the model's architecture, for
            ``settings.calibrate_from``.
    """

    def __init__(self, sites: Sequence[SiteTransport], strategy: Strategy, settings: FederationSettings,
                 run: RunLog | None = None, checkpoint_dir: str | Path | None = None,
                 extra_state: Mapping[str, Any] | None = None,
                 head: tuple[HeadCalibration, torch.nn.Module] | None = None):
        if settings.secure_aggregation and not strategy.summable:
            raise FedmedError(f"privacy.secure_aggregation with strategy={strategy.name}: secure aggregation shows "
                              "the server only the sum of the updates, and this strategy needs each one")
        if settings.secure_aggregation and len(sites) < 2:
            raise FedmedError("privacy.secure_aggregation needs at least 2 sites (a sum of one update is the update)")
        if settings.min_sites > len(sites):
            raise ValueError(f"federation.min_sites={settings.min_sites} but only {len(sites)} sites")
        if settings.calibrate_from is not None and head is None:
            raise ValueError("federation.calibrate_from needs the head calibration (federation.calibrate_head=true)")
        self.head = head
        self.sites, self.strategy, self.settings = list(sites), strategy, settings
        self.run_log = run or RunLog()
        self.checkpoint = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir else None
        self.extra_state = dict(extra_state or {})
        self._stray: dict[str, threading.Thread] = {}  # sites still running a timed-out round
        self.label_counts: list[int] | None = None  # counts_needed: the federation's training images per class
        self.style_spectra: dict[str, np.ndarray] | None = None  # style_mix: every site's mean spectrum, by name
        self.statistics_dp: dict[str, dict[str, float]] = {}  # DP: each site's accounting after it sent statistics
        self.tail = TailAverage(settings.average_from) if settings.average_from is not None else None

    def sample(self, round_idx: int) -> list[SiteTransport]:
        s = self.settings
        k = max(s.min_sites, math.ceil(s.fraction * len(self.sites)))
        if k >= len(self.sites):
            return list(self.sites)
        rng = np.random.default_rng([s.seed, round_idx])
        return [self.sites[i] for i in sorted(rng.choice(len(self.sites), size=k, replace=False))]

    def _exclude(self, r: int, site: str, reason: str) -> None:
        log.warning("round %d/%d: site %s excluded: %s", r, self.settings.rounds, site, reason)
        if self.run_log.tracker is not None and self.run_log.run_id is not None:
            self.run_log.tracker.set_tags(self.run_log.run_id, {f"excluded.round_{r:03d}.{site}": reason[:250]})

    def _busy(self, name: str) -> bool:
        t = self._stray.get(name)
        return t is not None and t.is_alive()

    def _statistics(self, weights: dict[str, torch.Tensor] | None, dim: int | None, key_round: int = 0
                    ) -> tuple[list[dict[str, Any]], tuple[str, str] | None]:
        """Every site's class statistics (with ``weights``: its feature moments of ``dim`` features), each checked
        against what it declared; (what came, None), or (what came so far, (the first failing site, why)).
        Under secure aggregation only their sum comes (:meth:`_masked_statistics`, with ``key_round``)."""
        if self.settings.secure_aggregation:
            return self._masked_statistics(weights, dim, key_round)
        k, features = self.settings.num_classes or 0, weights is not None
        got: list[dict[str, Any]] = []
        for site, (stats, exc) in zip(self.sites, concurrently(lambda c: c.statistics(weights, features), self.sites),
                                      strict=True):
            declared = getattr(site, "info", {}).get("num_train")
            problem = (f"{type(exc).__name__}: {exc}" if exc is not None else
                       check_statistics(stats, k, features, dim, int(declared) if declared is not None else None))
            if problem:
                return got, (site.name, problem)
            self._note_dp(site.name, stats)
            got.append(dict(stats or {}))
        return got, None

    def _note_dp(self, site: str, answer: Any) -> None:
        """A site's DP accounting after it sent statistics (its epsilon includes them): kept for the record."""
        dp = answer.get("dp") if isinstance(answer, Mapping) else None
        if isinstance(dp, Mapping) and all(isinstance(dp.get(k), int | float) for k in ("epsilon", "delta")):
            self.statistics_dp[site] = {k: float(v) for k, v in dp.items() if isinstance(v, int | float)}

    def _masked_statistics(self, weights: dict[str, torch.Tensor] | None, dim: int | None, r: int
                           ) -> tuple[list[dict[str, Any]], tuple[str, str] | None]:
        """Secure aggregation of the sites' statistics, as of their updates: fresh keys, one masked vector per
        site (:func:`~fedmed.federated.statistics.statistics_vector`), the sum unmasked and checked against the
        images the sites declared. Key round ``r``: 0 for the label prior, ``rounds + 1`` for the head calibration
        after the federation, ``rounds + 1 + t`` for that of round ``t`` (no two releases share a round's keys)."""
        k, features = self.settings.num_classes or 0, weights is not None
        dim = dim if features else None
        failed: list[tuple[str, str]] = []
        peers, signatures = collect_keys(self.sites, r, lambda name, why: failed.append((name, why)))
        if failed:
            return [], failed[0]
        plan = {"round": r, "peers": peers, "signatures": signatures}
        length = statistics_length(k, dim)
        masked = {}
        for site, (answer, exc) in zip(self.sites, concurrently(lambda c: c.statistics(weights, features, plan),
                                                                self.sites), strict=True):
            m = answer.get("masked") if isinstance(answer, Mapping) else None
            problem = (f"{type(exc).__name__}: {exc}" if exc is not None else
                       check_masked_vector(length, m, "masked statistics"))
            if problem:
                return [], (site.name, problem)
            assert isinstance(m, np.ndarray)
            masked[site.name] = m
            self._note_dp(site.name, answer)
        try:
            total = statistics_from_vector(unmask_vectors(r, masked, peers, self.sites, self.settings.min_sites,
                                                          length), k, dim)
        except FederationError as exc:
            return [], ("(secure aggregation)", str(exc))
        declared = [getattr(site, "info", {}).get("num_train") for site in self.sites]
        most = sum(int(d) for d in declared if d is not None) if None not in declared else None
        problem = check_statistics(total, k, features, dim, most)
        if problem:
            return [], ("(the masked sum of " + ", ".join(masked) + ")", problem)
        log.info("class statistics: the secure sum of %d sites' masked %s", len(masked),
                 "feature moments" if features else "label counts")
        return [total], None

    def gather_label_counts(self) -> list[int]:
        """Every site's training images per class, checked, summed (``label_prior``, ``weighting=balanced``); a
        site that cannot answer stops the federation before any training (they would not be the federation's)."""
        got, problem = self._statistics(None, None)
        if problem:
            uses = [key for key, on in (("model.logit_prior=federation", self.settings.label_prior),
                                        ("federation.weighting=balanced", self.settings.weighting == "balanced"))
                    if on]
            raise FederationError(f"site {problem[0]} could not send its label counts for the federation's "
                                  f"totals ({' and '.join(uses)}): {problem[1]}")
        counts = [int(c) for c in summed(got)["counts"]]
        log.info("the federation's label counts, from %d sites: %s images per class", len(self.sites), counts)
        self.run_log.log_metrics({f"label_prior_count_class{i}": c for i, c in enumerate(counts)}, step=0)
        return counts

    def gather_style(self) -> dict[str, np.ndarray]:
        """Every site's mean low-frequency amplitude spectrum (``style_mix``), checked: an array of one shape for
        all, finite, non-negative. A site that cannot send one stops the federation before any training."""
        spectra: dict[str, np.ndarray] = {}
        for site, (answer, exc) in zip(self.sites, concurrently(lambda c: c.style(), self.sites), strict=True):
            spectrum = answer.get("spectrum") if isinstance(answer, Mapping) else None
            first = next(iter(spectra.values()), None)
            if exc is not None:
                problem = f"{type(exc).__name__}: {exc}"
            elif not (isinstance(spectrum, np.ndarray) and spectrum.ndim == 3 and np.isfinite(spectrum).all()
                      and (spectrum >= 0).all()):
                problem = "its spectrum is not a finite, non-negative (channels, rows, columns) array"
            elif first is not None and spectrum.shape != first.shape:
                problem = f"its spectrum has shape {spectrum.shape}, the others' {first.shape}"
            else:
                problem = ""
            if problem:
                raise FederationError(f"site {site.name} could not send its style spectrum "
                                      f"(federation.style_mix={self.settings.style_mix}): {problem}")
            spectra[site.name] = np.asarray(spectrum, dtype=np.float64)
        log.info("style spectra from %d sites (%s values each): each site trains on the others' looks",
                 len(spectra), next(iter(spectra.values())).size)
        return spectra

    def _fit_head(self, weights: dict[str, torch.Tensor], calibration: HeadCalibration, net: torch.nn.Module,
                  key_round: int) -> tuple[dict[str, torch.Tensor] | None, tuple[str, str] | None]:
        """``weights`` with the last layer re-fitted on virtual features from the sites' statistics of them; (None,
        (the first failing site, why)) where a site cannot send usable ones."""
        got, problem = self._statistics(weights, last_linear(net)[1].in_features, key_round)
        if problem:
            return None, problem
        return calibration.fit(net, weights, summed(got)), None

    def _skipped(self, problem: tuple[str, str], tag: str, what: str) -> None:
        log.warning("%s skipped: site %s sent no usable feature statistics: %s", what, *problem)
        if self.run_log.tracker is not None and self.run_log.run_id is not None:
            self.run_log.tracker.set_tags(self.run_log.run_id, {tag: f"skipped: {problem[0]}: {problem[1]}"[:250]})

    def calibrate_head(self, weights: dict[str, torch.Tensor], calibration: HeadCalibration, net: torch.nn.Module
                       ) -> tuple[dict[str, torch.Tensor], dict[str, EvalResult]] | None:
        """Classifier calibration with virtual features (:mod:`fedmed.federated.statistics`): every site sends
        the per-class moments of ``weights``' penultimate features, checked; the server re-fits the last linear
        layer and the sites evaluate the result (logged as ``calibrated_val_*`` at step ``rounds + 1``).

        Returns None, with a warning and a run tag, where a site cannot send usable statistics: the federation's
        model then stays as it is.
        """
        step = self.settings.rounds + 1
        calibrated, problem = self._fit_head(weights, calibration, net, step)
        if problem:
            self._skipped(problem, "head_calibration", "head calibration")
            return None
        assert calibrated is not None
        evals = self._evaluate_round(step, calibrated, explain=False)
        metrics = {"calibrated_val_pooled_balanced_acc": pooled_balanced_acc(list(evals.values())),
                   "calibrated_val_site_balanced_acc": site_mean_balanced_acc(list(evals.values())),
                   **{f"calibrated_val_{k}": v for k, v in weighted_metrics(list(evals.values())).items()}}
        self.run_log.log_metrics(metrics, step=step)
        log.info("head calibrated on %d virtual features per class from %d sites: validation balanced accuracy "
                 "%.4f (pooled), %.4f (mean of the sites)", calibration.samples, len(self.sites),
                 metrics["calibrated_val_pooled_balanced_acc"], metrics["calibrated_val_site_balanced_acc"])
        return calibrated, evals

    def _round_calibrated(self, r: int, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """``federation.calibrate_from``: round ``r``'s candidate, head-calibrated (None, with a warning and a
        run tag, where a site cannot send usable statistics: the round's candidate stays as it is)."""
        assert self.head is not None
        calibrated, problem = self._fit_head(weights, *self.head, self.settings.rounds + 1 + r)
        if problem:
            self._skipped(problem, f"head_calibration.round_{r:03d}", f"round {r}/{self.settings.rounds}: head "
                          "calibration")
            return None
        log.info("round %d/%d: the sites evaluate the model with its head calibrated on %d virtual features per "
                 "class", r, self.settings.rounds, self.head[0].samples)
        return calibrated

    def instructions(self, global_w) -> dict[str, Any]:
        """The strategy's instructions for a round, the federation's label counts where they are used (the
        label prior, the class totals of the balanced weighting) and the sites' style spectra (``style_mix``)."""
        out = dict(self.strategy.configure_fit(global_w))
        if self.label_counts is not None and self.settings.label_prior:
            out["label_prior"] = list(self.label_counts)
        if self.label_counts is not None and self.settings.weighting == "balanced":
            out["class_totals"] = list(self.label_counts)
        if self.style_spectra is not None:
            out["style_spectra"] = dict(self.style_spectra)
        return out

    def _train_round(self, r: int, chosen: list[SiteTransport], global_w) -> tuple[list[FitResult], dict[str, bytes]]:
        s = self.settings
        instructions = self.instructions(global_w)
        peers: dict[str, bytes] = {}
        length = 0
        if s.secure_aggregation:
            peers, signatures = collect_keys(chosen, r, lambda name, why: self._exclude(r, name, why))
            chosen = [c for c in chosen if c.name in peers]
            instructions = {**instructions, "secagg": {"round": r, "peers": peers, "signatures": signatures,
                                                       "pooled_bn": self.strategy.bn_stats == "pooled"}}
            length = vector_length(global_w)
        fits: list[FitResult] = []
        out_of_budget: list[str] = []
        busy = {c.name for c in chosen if self._busy(c.name)}
        for name in sorted(busy):
            self._exclude(r, name, "still busy with the round it timed out in")
        ready = [c for c in chosen if c.name not in busy]

        def train(site: SiteTransport) -> object:
            result = call_with_timeout(lambda: site.fit(global_w, r, s.local_epochs, instructions), s.site_timeout)
            return receive(result, global_w)

        for site, (result, exc) in zip(ready, concurrently(train, ready), strict=True):  # in site order
            if exc is not None:  # a failing site must not end the federation
                if isinstance(exc, SiteTimeout):
                    self._stray[site.name] = exc.thread
                if isinstance(exc, PrivacyBudgetExhausted):
                    out_of_budget.append(site.name)
                self._exclude(r, site.name, f"{type(exc).__name__}: {exc}")
                continue
            problem = check_masked(length, result) if s.secure_aggregation else check_update(global_w, result)
            if problem:
                self._exclude(r, site.name, f"malformed update: {problem}")
                continue
            assert isinstance(result, FitResult)
            fits.append(result)
        if len(fits) < s.min_sites and out_of_budget:
            raise BudgetSpent(f"round {r}: sites {', '.join(out_of_budget)} have spent their privacy budget; "
                              f"{len(fits)} site(s) could train (federation.min_sites={s.min_sites})")
        if len(fits) < s.min_sites:
            raise FederationError(
                f"round {r}: only {len(fits)} of {len(chosen)} sites returned a usable update "
                f"(federation.min_sites={s.min_sites}); the federation stops"
                + (f", its state after round {r - 1} is in {self.checkpoint}" if self.checkpoint and r > 1 else ""))
        if s.weighting == "balanced" and r == 1:
            total = sum(f.num_samples for f in fits)
            log.info("round 1/%d: class-balanced weights: %s", s.rounds,
                     ", ".join(f"{f.site} {f.num_samples / total:.1%}" for f in fits))
        return fits, peers

    def _unmask(self, r: int, fits: list[FitResult], peers: dict[str, bytes], global_w) -> FitResult:
        def exclude(name: str, why: str) -> None:
            self._exclude(r, name, why)

        return unmask(r, fits, peers, global_w, self.sites, self.strategy.bn_stats == "pooled",
                      self.settings.min_sites, exclude)

    def _evaluate_round(self, r: int, global_w, explain: bool) -> dict[str, EvalResult]:
        evals = {}
        ready = [s for s in self.sites if not self._busy(s.name)]  # a site still training a timed-out round
        for site, (ev, exc) in zip(ready, concurrently(lambda s: s.evaluate(global_w, r, explain=explain), ready),
                                   strict=True):
            if exc is None and ev is not None:
                evals[site.name] = ev
            else:
                self._exclude(r, site.name, f"evaluation failed: {type(exc).__name__}: {exc}")
        if not evals:
            raise FederationError(f"round {r}: no site could evaluate the global model")
        return evals

    def _evaluate(self, r: int, global_w, fits: list[FitResult], sampled: int, bytes_up: int, bytes_down: int,
                  t0: float, calibrated: bool = False) -> tuple[RoundRecord, dict[str, EvalResult]]:
        """Evaluate the new global model at every site; log and return the round's record (its metric
        ``head_calibrated`` is 1 where the model evaluated had its head calibrated, ``federation.calibrate_from``)."""
        rounds = self.settings.rounds
        explain = r in self.settings.explain_rounds
        evals = self._evaluate_round(r, global_w, explain)
        metrics = {f"val_{k}": v for k, v in weighted_metrics(list(evals.values())).items()}
        metrics["val_pooled_balanced_acc"] = pooled_balanced_acc(list(evals.values()))
        metrics["val_site_balanced_acc"] = site_mean_balanced_acc(list(evals.values()))
        if self.settings.calibrate_from is not None:
            metrics["head_calibrated"] = float(calibrated)
        if explain:
            metrics["xai_site_consistency"] = site_consistency(list(evals.values()))
        n_train = sum(f.num_samples for f in fits)
        metrics["train_loss"] = sum(f.metrics.get("train_loss", 0.0) * f.num_samples for f in fits) / n_train
        metrics.update({"comm_bytes_up": bytes_up, "comm_bytes_down": bytes_down, "sites_trained": len(fits),
                        "sites_failed": sampled - len(fits)})
        if any("dp_epsilon" in f.metrics for f in fits):
            metrics["dp_epsilon_max"] = max(f.metrics.get("dp_epsilon", 0.0) for f in fits)
        record = RoundRecord(r, [f.site for f in fits], metrics, bytes_up, bytes_down, time.perf_counter() - t0,
                             {f.site: dict(f.metrics) for f in fits})
        metrics["round_seconds"] = record.seconds
        self.run_log.log_metrics(metrics, step=r)
        log.info("round %d/%d: val_loss=%.4f val_acc=%.4f val_bal_acc=%.4f val_auroc=%.4f | sent %.2f MB | %.1fs",
                 r, rounds, metrics["val_loss"], metrics["val_acc"], metrics["val_pooled_balanced_acc"],
                 metrics["val_auroc"], (bytes_up + bytes_down) / 2**20, record.seconds)
        if explain:
            log.info("round %d/%d: explained at every site: deletion AUC %.3f, insertion AUC %.3f, "
                     "cross-site heatmap consistency %.3f", r, rounds, metrics["val_xai_deletion_auc"],
                     metrics["val_xai_insertion_auc"], metrics["xai_site_consistency"])
            if "val_xai_pointing_game" in metrics:  # the sites hold evidence masks
                log.info("round %d/%d: against the sites' lesion masks: pointing game %.3f (centre prior %.3f), "
                         "relevance mass %.3f (centre prior %.3f)", r, rounds, metrics["val_xai_pointing_game"],
                         metrics["val_xai_centre_pointing_game"], metrics["val_xai_relevance_mass"],
                         metrics["val_xai_centre_relevance_mass"])
        return record, evals

    def state(self, r: int, global_w, best: Best | None, history: list[RoundRecord]) -> dict[str, Any]:
        return {
            "round": r, "global": global_w, "best": best, "history": history,
            "strategy": self.strategy.state_dict(),
            "sites": {s.name: s.state_dict() for s in self.sites},
            "label_counts": self.label_counts,
            "tail_average": self.tail.state_dict() if self.tail is not None else None,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
            **self.extra_state,
        }

    def _restore(self, resume: Mapping[str, Any]) -> tuple[int, dict[str, torch.Tensor], Best | None,
                                                             list[RoundRecord]]:
        self.strategy.load_state_dict(resume["strategy"])
        for s in self.sites:
            if s.name in resume.get("sites", {}):
                s.load_state_dict(resume["sites"][s.name])
        if self.tail is not None:
            kept = resume.get("tail_average")
            if not isinstance(kept, Mapping) or kept.get("start") != self.tail.start:
                raise FederationError(f"resume: the checkpoint was not averaging the global models from round "
                                      f"{self.tail.start} (federation.average_from); resume with the setting "
                                      "it was trained with")
            try:
                self.tail.load_state_dict(kept, like=resume["global"])
            except (KeyError, TypeError, ValueError) as exc:
                raise FederationError(f"resume: the checkpoint's mean of the global models is unusable: "
                                      f"{exc}") from None
        torch.set_rng_state(resume["rng"]["torch"])
        np.random.set_state(resume["rng"]["numpy"])
        random.setstate(resume["rng"]["python"])
        first = int(resume["round"]) + 1
        log.info("resuming after round %d/%d", first - 1, self.settings.rounds)
        return first, clone_state(resume["global"]), resume["best"], list(resume["history"])

    def run(self, initial: Mapping[str, torch.Tensor], resume: Mapping[str, Any] | None = None) -> FederationResult:
        s = self.settings
        global_w, first = clone_state(initial), 1
        best: Best | None = None
        history: list[RoundRecord] = []
        if resume is not None:
            first, global_w, best, history = self._restore(resume)
        if s.counts_needed:  # asked once per federation: a resumed one keeps the counts it trained with
            kept = resume.get("label_counts") if resume is not None else None
            self.label_counts = [int(c) for c in kept] if kept is not None else self.gather_label_counts()
        if s.style_mix:  # asked again on resume: a site's spectrum is a function of its training images
            self.style_spectra = self.gather_style()
        for r in range(first, s.rounds + 1):
            t0 = time.perf_counter()
            chosen = self.sample(r)
            log.info("round %d/%d: training at %s", r, s.rounds, ", ".join(c.name for c in chosen))
            payload = state_nbytes(global_w)
            try:
                fits, peers = self._train_round(r, chosen, global_w)
            except BudgetSpent as exc:
                if best is None:
                    raise
                log.warning("%s: the federation ends after round %d", exc, r - 1)
                if self.run_log.tracker is not None and self.run_log.run_id is not None:
                    self.run_log.tracker.set_tags(self.run_log.run_id,
                                                  {"stopped_early": f"privacy budget spent before round {r}"})
                break
            bytes_down = payload * len(chosen)
            bytes_up = sum(f.wire_bytes for f in fits)
            fits_in = [self._unmask(r, fits, peers, global_w)] if s.secure_aggregation else fits
            global_w = self.strategy.aggregate_fit(global_w, fits_in)
            averaged = self.tail.update(r, global_w) if self.tail is not None else None  # a fresh copy
            if averaged is not None:
                log.info("round %d/%d: the sites evaluate the mean of the global models since round %d",
                         r, s.rounds, s.average_from)
            candidate = averaged  # None: the plain global model
            calibrated = None
            if s.calibrate_from is not None and r >= s.calibrate_from:
                calibrated = self._round_calibrated(r, averaged if averaged is not None else global_w)
                candidate = calibrated if calibrated is not None else candidate
            record, evals = self._evaluate(r, candidate if candidate is not None else global_w, fits, len(chosen),
                                           bytes_up, bytes_down, t0, calibrated is not None)
            history.append(record)
            score = selection_score(s.select, record.metrics)
            if best is None or s.select == "last" or score < best[0]:
                best = (score, r, candidate if candidate is not None else clone_state(global_w), evals)
            if self.checkpoint:
                save_checkpoint(self.checkpoint, self.state(r, global_w, best, history))
        assert best is not None
        _, best_round, best_w, best_evals = best
        if self.run_log.tracker is not None and self.run_log.run_id is not None:
            self.run_log.tracker.set_tags(self.run_log.run_id, {"selected_round": best_round})
        return FederationResult(global_w, best_w, best_round, history, best_evals)
