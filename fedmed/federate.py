"""One federation, however its sites are reached: the run's MLflow record, the round loop, fine-tuning, the report.

Every way of running a federation calls these two functions: ``fedmed fit`` (sites in this
process), ``fedmed serve`` and ``federation.parallel`` (sites behind Flower SuperNodes) and
Flower's own ``flwr run`` (the same ServerApp). Only how the sites are reached differs (a list
of :class:`~fedmed.federated.transport.SiteTransport`), so every option (selection, resume,
fine-tuning, the privacy record and the run's tags) behaves the same on each path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedmed import build
from fedmed.data.datamodule import Pipeline
from fedmed.evaluation import Scores
from fedmed.federated import Orchestrator
from fedmed.federated.strategies.base import Strategy
from fedmed.federated.transport import SiteTransport
from fedmed.outcome import Trained, finish, run_name
from fedmed.privacy.dp import describe
from fedmed.reporting import fmt_bytes
from fedmed.tracking import RunLog, Tracker

log = logging.getLogger("fedmed")


def run_tags(cfg: DictConfig, mode: str, sites: Sequence[str], strategy: Strategy | None) -> dict[str, str]:
    """The tags of a training run: what it trained on, how, and with which privacy settings."""
    tags = {"dataset": cfg.data.name, "model": cfg.model.name, "mode": mode,
            "strategy": strategy.name if strategy is not None else "none",
            "partition": cfg.partition.dirname if mode != "centralized" else "pooled",
            "privacy.dp": describe(build.dp_config(cfg)),
            "privacy.secure_aggregation": str(bool(cfg.privacy.secure_aggregation)),
            "federation.compression": cfg.federation.compression if mode == "federated" else "none",
            "seed": str(cfg.seed)}
    if mode == "local":
        tags["site"] = sites[0]
    return tags


def open_run(cfg: DictConfig, mode: str, sites: Sequence[str], strategy: Strategy | None,
             resume: Mapping[str, Any] | None, transport: Mapping[str, str], verb: str = "fit") -> tuple[Tracker, str]:
    """The run's MLflow run: reopened (``resume=``), else started with its tags, params and ``config.yaml``.

    ``transport``: tags that say how the sites were reached (``transport``, the server's address).
    ``verb``: the command that runs it, for the resume command printed (``fit`` or ``serve``).
    """
    tracker = Tracker(cfg.logger.tracking_uri, cfg.logger.experiment, cfg.logger.artifact_location)
    if resume is not None:
        run_id = str(resume["run_id"])
        tracker.reopen(run_id)
    else:
        name = run_name(cfg, mode, site=sites[0] if mode == "local" else None,
                        strategy=strategy.name if strategy is not None else None)
        run_id = tracker.start_run(name, {**run_tags(cfg, mode, sites, strategy), **transport})
        tracker.log_params(run_id, OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
        tracker.log_text(run_id, OmegaConf.to_yaml(cfg), "config.yaml")
    if mode == "federated":
        tracker.set_tags(run_id, {"checkpoint_dir": str(Path(cfg.federation.checkpoint_dir) / run_id)})
    log.info("MLflow run %s%s", run_id, f"; if it stops, continue it with: {build.resume_command(cfg, verb, run_id)}"
             if mode == "federated" else "")
    return tracker, run_id


def resumable(exc: BaseException, cfg: DictConfig, verb: str, run_id: str) -> BaseException:
    """``exc`` (a stop, a failure) carrying the command that continues the federation, for the CLI to repeat."""
    exc.fedmed_resume = build.resume_command(cfg, verb, run_id)  # type: ignore[attr-defined]
    return exc


def site_scores(sites: Sequence[SiteTransport], weights: Mapping[str, Any]) -> list[Scores]:
    """Each site scores the selected model on its own test images and returns numbers only; what a site
    sends is checked (shapes, its name) and a site that cannot answer is left out with a warning."""
    out = []
    for site in sites:
        try:
            got = site.score(weights)
            if got is None:
                continue
            scores = Scores.from_dict(got)
            if scores.name != site.name:
                raise ValueError(f"answered as site {scores.name!r}")
        except Exception as exc:  # noqa: BLE001 - the federation is done; its report goes on without this site
            log.warning("site %s could not score the final model on its own test images: %s: %s", site.name,
                        type(exc).__name__, exc)
            continue
        out.append(scores)
    return out


def federate(cfg: DictConfig, strategy: Strategy, sites: Sequence[SiteTransport], initial: Mapping[str, Any],
             tracker: Tracker, run_id: str, resume: Mapping[str, Any] | None, pipeline: Pipeline,
             site_runs: Mapping[str, str] | None = None, members: Sequence[Any] = (),
             n_train: int | None = None) -> tuple[Trained, dict[str, float], dict[str, Any]]:
    """Run the federation over ``sites`` from ``initial`` (or ``resume``), fine-tune, then report.

    Args:
        site_runs: site -> its MLflow run (kept in the server checkpoint, for a resume).
        members: the sites' training data where this process holds it (the membership audit).
        n_train: training images over all sites, where the sites keep their data elsewhere.

    Returns:
        (what was trained, the test metrics, the privacy record).
    """
    fed = cfg.federation
    t0 = time.perf_counter()
    calibration = build.head_calibration(cfg)
    head = (calibration, build.build_net(cfg)[0]) if calibration is not None else None
    orchestrator = Orchestrator(list(sites), strategy, build.federation_settings(cfg), RunLog(tracker, run_id),
                                Path(fed.checkpoint_dir) / run_id,
                                {"run_id": run_id, "site_runs": dict(site_runs or {}),
                                 "config": OmegaConf.to_container(cfg, resolve=True)},
                                head if fed.get("calibrate_from") is not None else None)
    result = orchestrator.run(initial, resume)
    selected = next((h for h in result.history if h.round == result.round), None)
    calibrated_in_round = selected is not None and bool(selected.metrics.get("head_calibrated"))
    rows = [("head calibrated" if calibrated_in_round else "global model", s, "val", e)
            for s, e in result.site_eval.items()]
    chosen = f"round {result.round}/{fed.rounds}"
    if fed.get("average_from") is not None and result.round >= fed.average_from:
        chosen += f", mean of rounds {fed.average_from}-{result.round}"
    if calibrated_in_round:  # federation.calibrate_from: selected among calibrated models
        chosen += ", head calibrated"
    elif head is not None:
        calibration, net = head
        calibrated = orchestrator.calibrate_head(result.weights, calibration, net)
        if calibrated is not None:
            result.weights = calibrated[0]
            chosen += ", head calibrated"
            rows += [("head calibrated", s, "val", e) for s, e in calibrated[1].items()]
    if fed.finetune_epochs > 0:  # personalisation: each site fine-tunes the selected model on its own data
        instructions = {**orchestrator.instructions(result.weights), "trained_epochs": result.round * fed.local_epochs}
        for site in sites:
            ev = site.finetune(result.weights, fed.rounds + 1, fed.finetune_epochs, instructions)
            rows.append((f"fine-tuned {fed.finetune_epochs} ep", site.name, "val", ev))
    scores = site_scores(sites, result.weights)
    seconds = time.perf_counter() - t0
    last = result.history[-1]
    codec = "" if fed.compression == "none" else f", {fed.compression} updates"
    remote = " over Flower" if any(s.parallel for s in sites) else ""
    comm = (f"bytes sent per round: {fmt_bytes(last.bytes_down)} down + {fmt_bytes(last.bytes_up)} up "
            f"({len(last.sites)} sites{remote}{codec}; model {fmt_bytes(last.bytes_down / max(len(last.sites), 1))} "
            "raw); raw images sent: 0")
    trained = Trained("federated", [s.name for s in sites], result.weights, chosen,
                      seconds, rows, comm, list(members), result.round * fed.local_epochs, result.history,
                      build.dp_records_from_history(result.history, orchestrator.statistics_dp), n_train, scores)
    test, record = finish(cfg, pipeline, trained, tracker, run_id)
    return trained, test, record
