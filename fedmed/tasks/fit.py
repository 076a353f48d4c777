"""``fedmed fit``: federated training, or a local / centralized baseline on the same splits.

Wiring only: builds sources, sites, the orchestrator and the MLflow runs from the config.
A hospital joining a federation over the network, and ``federation.parallel``, go through
:mod:`fedmed.deploy`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from fedmed import build, deploy
from fedmed.config import site_config
from fedmed.data.datamodule import Pipeline
from fedmed.data.sites import describe_partition
from fedmed.federated import InProcessSite, Orchestrator
from fedmed.federated.strategies.base import Strategy
from fedmed.outcome import Trained, finish, log_partition
from fedmed.privacy.dp import describe
from fedmed.reporting import fmt_bytes
from fedmed.schema import validate
from fedmed.tracking import RunLog, Tracker, check_writable, run_status

log = logging.getLogger("fedmed")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run ``fedmed fit``; returns the test metrics, per-site metrics and the MLflow run id."""
    validate(cfg, "fit")
    if cfg.get("site") and cfg.federation.get("server"):  # one hospital joining a federation over the network
        return deploy.join_federation(cfg)
    mode = build.resolve_mode(cfg)
    strategy = build.check_settings(cfg, mode)
    if mode == "federated" and cfg.federation.get("parallel") and not cfg.get("resume"):
        return deploy.run_parallel(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    resume = build.resume_state(cfg, mode, config) if cfg.get("resume") else None  # before any data is read
    check_writable(cfg.logger.tracking_uri, cfg.logger.artifact_location)
    dp = build.dp_config(cfg)
    if dp is not None:
        _, changes = build.build_net(cfg)
        log.warning("DP-SGD on (%s); the model is made DP-compatible: %s", describe(dp),
                    "; ".join(changes) or "no change needed")
    pipeline = Pipeline.from_config(cfg.data)
    source = pipeline.source
    source.ensure_available()
    sites = [cfg.site.name] if mode == "local" else list(cfg.federation.sites)
    site_cfgs = {s: site_config(cfg, s) for s in sites}
    manifests: dict = {}
    if mode == "centralized":
        datas = {"pooled": pipeline.pooled()}
    else:  # every image decoded before anything is written: a corrupt one leaves no manifest or run behind
        manifests, datas = build.load_sites(cfg, source, sites)
        log.info(describe_partition(list(manifests.values())))

    tracker = Tracker(cfg.logger.tracking_uri, cfg.logger.experiment, cfg.logger.artifact_location)
    if resume:
        run_id = resume["run_id"]
        tracker.reopen(run_id)
    else:
        run_id = tracker.start_run(_run_name(cfg, mode, sites), _run_tags(cfg, mode, sites, strategy))
        tracker.log_params(run_id, config)  # type: ignore[arg-type]
        tracker.log_text(run_id, OmegaConf.to_yaml(cfg), "config.yaml")
    log.info("MLflow run %s%s", run_id, " (if it stops, continue it with resume=" + run_id + ")"
             if mode == "federated" else "")
    checkpoint_dir = Path(cfg.federation.checkpoint_dir) / run_id
    if mode == "federated":
        tracker.set_tags(run_id, {"checkpoint_dir": str(checkpoint_dir)})
    if manifests and not resume:
        log_partition(tracker, run_id, manifests, source.class_names, f"{cfg.data.name}: {cfg.partition.dirname}")
    with run_status(RunLog(tracker, run_id)) as site_runs_done:
        L.seed_everything(cfg.seed, verbose=False)
        initial = build.build_module(cfg).net.state_dict()
        if mode == "federated":
            assert strategy is not None
            trained = _federate(cfg, strategy, sites, datas, site_cfgs, source.class_names, initial, tracker,
                                run_id, checkpoint_dir, resume, config, site_runs_done)
        else:
            trained = _baseline(cfg, mode, sites, datas, tracker, run_id)
        test_metrics, record = finish(cfg, pipeline, trained, tracker, run_id)
    return {
        "mode": mode,
        "run_id": run_id,
        "test": test_metrics,
        "sites": {site: {**e.metrics, "n": e.num_samples} for _, site, _, e in trained.site_rows},
        "selected": trained.chosen,
        "seconds": trained.seconds,
        "privacy": record,
    }


def _run_name(cfg: DictConfig, mode: str, sites: list[str]) -> str:
    """``run_name=``, else e.g. ``federated-pneumoniamnist-cnn-fedavg-s42-1204-0312`` (see ``outcome.run_name``)."""
    from fedmed.outcome import run_name

    return run_name(cfg, mode, site=sites[0] if mode == "local" else None)


def _run_tags(cfg: DictConfig, mode: str, sites: list[str], strategy: Strategy | None) -> dict[str, str]:
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


def _federate(cfg, strategy, sites, datas, site_cfgs, class_names, initial, tracker: Tracker, run_id: str,
              checkpoint_dir: Path, resume, config, site_runs_done: list[RunLog]) -> Trained:
    """Build the in-process sites, run the orchestrator and the optional fine-tuning."""
    fed = cfg.federation
    site_runs = dict(resume["site_runs"]) if resume else {}
    clients = []
    for k, s in enumerate(sites):
        if s in site_runs:
            tracker.reopen(site_runs[s])
        else:
            site_runs[s] = tracker.start_run(s, {"site": s, "dataset": cfg.data.name, "role": "site"},
                                             parent_id=run_id)
        site_log = RunLog(tracker, site_runs[s])
        site_runs_done.append(site_log)
        clients.append(build.site_client(cfg, s, k, datas[s], site_log, class_names, strategy))
        if not resume:
            tracker.log_params(site_runs[s], {**clients[-1].initialize(), "manifest": site_cfgs[s].manifest})
    t0 = time.perf_counter()
    orchestrator = Orchestrator([InProcessSite(c) for c in clients], strategy, build.federation_settings(cfg),
                                RunLog(tracker, run_id), checkpoint_dir,
                                {"run_id": run_id, "site_runs": site_runs, "config": config})
    result = orchestrator.run(initial, resume)
    rows = [("global model", s, "val", e) for s, e in result.site_eval.items()]
    if fed.finetune_epochs > 0:  # personalisation: each site fine-tunes the selected model on its own data
        instructions = strategy.configure_fit(result.weights)
        for c in clients:
            tuned = c.train(result.weights, fed.rounds + 1, fed.finetune_epochs, instructions, send=False).weights
            ev = c.evaluate(tuned, fed.rounds + 1, log_metrics=False)
            site_run = site_runs[c.name]
            tracker.log_metrics(site_run, {f"personalized_val_{k}": v for k, v in ev.metrics.items()}, step=fed.rounds)
            tracker.log_checkpoint(site_run, c.part.local_weights(tuned), config, class_names,  # the site's own model
                                   result.round * fed.local_epochs + fed.finetune_epochs)
            rows.append((f"fine-tuned {fed.finetune_epochs} ep", c.name, "val", ev))
    seconds = time.perf_counter() - t0
    last = result.history[-1]
    codec = "" if fed.compression == "none" else f", {fed.compression} updates"
    comm = (f"bytes sent per round: {fmt_bytes(last.bytes_down)} down + {fmt_bytes(last.bytes_up)} up "
            f"({len(last.sites)} sites{codec}; model {fmt_bytes(last.bytes_down / max(len(last.sites), 1))} raw); "
            "raw images sent: 0")
    return Trained("federated", sites, result.weights, f"round {result.round}/{fed.rounds}", seconds, rows, comm,
                   [c.data.train for c in clients], result.round * fed.local_epochs, result.history,
                   build.dp_records_from_history(result.history))


def _baseline(cfg, mode, sites, datas, tracker: Tracker, run_id: str) -> Trained:
    """Train one site alone (local) or the pooled training data (centralized)."""
    epochs = cfg.federation.rounds * cfg.federation.local_epochs
    ((who, data),) = datas.items()
    t0 = time.perf_counter()
    client = build.site_client(cfg, who, 0, data, RunLog(tracker, run_id))
    weights, best_epoch = client.train_alone(epochs, cfg.federation.select)
    seconds = time.perf_counter() - t0
    tracker.set_tags(run_id, {"selected_epoch": best_epoch})
    rows = [(f"{mode} model", who, "val", client.evaluate(weights, epochs, log_metrics=False))]
    dp_records = {who: client.dp.record()} if client.dp is not None else {}
    return Trained(mode, sites, weights, f"epoch {best_epoch}/{epochs}", seconds, rows,
                   "bytes sent: 0 (no federation)", [data.train], best_epoch, [], dp_records)
