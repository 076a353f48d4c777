"""``fedmed fit``: federated training, or a local / centralized baseline on the same splits.

Wiring only: builds sources and sites from the config and hands them to
:func:`fedmed.federate.federate`. A hospital joining a federation over the network, and
``federation.parallel``, go through :mod:`fedmed.flower`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from fedmed import build
from fedmed.config import site_config
from fedmed.data.datamodule import Pipeline
from fedmed.data.sites import describe_partition, one_class_sites
from fedmed.federate import federate, open_run, resumable
from fedmed.federated import InProcessSite
from fedmed.outcome import Trained, finish, log_partition
from fedmed.privacy.dp import describe
from fedmed.schema import validate
from fedmed.tracking import RunLog, Tracker, check_writable, run_status

log = logging.getLogger("fedmed")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run ``fedmed fit``; returns the test metrics, per-site metrics and the MLflow run id."""
    validate(cfg, "fit")
    if cfg.get("site") and cfg.federation.get("server"):  # one hospital joining a federation over the network
        from fedmed.flower.site import join_federation

        return join_federation(cfg)
    mode = build.resolve_mode(cfg)
    strategy = build.check_settings(cfg, mode)
    if mode == "federated" and cfg.federation.get("parallel") and not cfg.get("resume"):
        from fedmed.flower.parallel import run_parallel

        return run_parallel(cfg)
    resume = (build.resume_state(cfg, mode, OmegaConf.to_container(cfg, resolve=True)) if cfg.get("resume")
              else None)  # before any data is read
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
        for warning in one_class_sites(list(manifests.values())):
            log.warning("%s; another seed or partition (partition.min_samples, partition.alpha) avoids it", warning)

    tracker, run_id = open_run(cfg, mode, sites, strategy, resume, {"transport": "in-process"})
    if manifests and not resume:
        log_partition(tracker, run_id, manifests, source.class_names, f"{cfg.data.name}: {cfg.partition.dirname}")
    with run_status(RunLog(tracker, run_id)) as site_runs_done:
        L.seed_everything(cfg.seed, verbose=False)
        initial = build.initial_weights(cfg)
        if mode == "federated":
            assert strategy is not None
            clients, site_runs = _sites(cfg, strategy, sites, datas, site_cfgs, source.class_names, tracker, run_id,
                                        resume, site_runs_done)
            try:
                trained, test_metrics, record = federate(cfg, strategy, [InProcessSite(c) for c in clients],
                                                         initial, tracker, run_id, resume, pipeline, site_runs,
                                                         [c.data.train for c in clients])
            except BaseException as exc:
                resumable(exc, cfg, "fit", run_id)
                raise
        else:
            trained = _baseline(cfg, mode, sites, datas, tracker, run_id, initial)
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


def _sites(cfg, strategy, sites, datas, site_cfgs, class_names, tracker: Tracker, run_id: str, resume,
           site_runs_done: list[RunLog]) -> tuple[list, dict[str, str]]:
    """The in-process site clients, each with its MLflow run nested under the federation's."""
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
    return clients, site_runs


def _baseline(cfg, mode, sites, datas, tracker: Tracker, run_id: str, initial) -> Trained:
    """Train one site alone (local) or the pooled training data (centralized)."""
    epochs = cfg.federation.rounds * cfg.federation.local_epochs
    ((who, data),) = datas.items()
    t0 = time.perf_counter()
    client = build.site_client(cfg, who, 0, data, RunLog(tracker, run_id))
    if cfg.model.get("pretrained"):
        client.set_weights(initial)

    def first_epoch(key: str) -> int | None:  # a round's first epoch: on equal terms with a federation
        at = cfg.federation.get(key)
        return (int(at) - 1) * cfg.federation.local_epochs + 1 if at is not None else None

    average_from, calibrate_from = first_epoch("average_from"), first_epoch("calibrate_from")
    calibration = build.head_calibration(cfg)
    weights, best_epoch = client.train_alone(epochs, cfg.federation.select, average_from, calibration, calibrate_from)
    seconds = time.perf_counter() - t0
    tracker.set_tags(run_id, {"selected_epoch": best_epoch})
    calibrated = calibrate_from is not None and best_epoch >= calibrate_from
    rows = [("head calibrated" if calibrated else f"{mode} model", who, "val",
             client.evaluate(weights, epochs, log_metrics=False))]
    chosen = f"epoch {best_epoch}/{epochs}" + (f", mean of epochs {average_from}-{best_epoch}"
                                               if average_from is not None and best_epoch >= average_from else "")
    if calibrated:  # federation.calibrate_from: selected among calibrated models
        chosen += ", head calibrated"
    elif calibration is not None:  # the same re-fit as a federation's, from this run's own training images
        net = client.module.net
        stats = client.own_statistics(weights, True, withhold=False)  # under DP-SGD: noised and counted
        weights = calibration.fit(net, weights, stats)
        ev = client.evaluate(weights, epochs + 1, log_metrics=False)
        client.run.log_metrics({f"calibrated_val_{k}": v for k, v in ev.metrics.items()}, step=epochs + 1)
        log.info("head calibrated on %d virtual features per class: validation balanced accuracy %.4f",
                 calibration.samples, ev.metrics["balanced_acc"])
        rows.append(("head calibrated", who, "val", ev))
        chosen += ", head calibrated"
    dp_records = {who: client.dp.record()} if client.dp is not None else {}
    return Trained(mode, sites, weights, chosen, seconds, rows,
                   "bytes sent: 0 (no federation)", [data.train], best_epoch, [], dp_records)
