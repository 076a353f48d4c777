"""Federations across processes and machines, through Flower: the server (``fedmed serve``), one
hospital's site (``fedmed fit site=<name> federation.server=<host:port>``), and every site in its
own worker process on this machine (``federation.parallel``). The orchestrator, site client,
strategies and report are the in-process ones."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fedmed import build
from fedmed.config import site_config
from fedmed.data.datamodule import Pipeline
from fedmed.data.manifest import read_manifest
from fedmed.errors import FedmedError
from fedmed.federated import Orchestrator
from fedmed.federated.flower import FlowerServer
from fedmed.federated.flower import run_site as serve_site
from fedmed.logs import setup_logging
from fedmed.outcome import Trained, finish, site_training_sets
from fedmed.reporting import fmt_bytes
from fedmed.tracking import RunLog, Tracker, run_status

log = logging.getLogger("fedmed")


def _read(path: str | None, what: str) -> bytes | None:
    if not path:
        return None
    p = Path(path).expanduser()
    if not p.is_file():
        raise FedmedError(f"{what}={path}: no such file")
    return p.read_bytes()


def certificates(cfg: DictConfig) -> tuple[bytes, bytes, bytes] | None:
    """(CA, server cert, server key) from ``federation.tls``, or None; all three or none."""
    tls = cfg.federation.tls
    given = {k: tls.get(k) for k in ("ca_cert", "server_cert", "server_key")}
    if not any(given.values()):
        return None
    missing = [k for k, v in given.items() if not v]
    if missing:
        raise FedmedError(f"TLS needs federation.tls.ca_cert, server_cert and server_key; missing {missing}")
    return tuple(_read(v, f"federation.tls.{k}") for k, v in given.items())  # type: ignore[return-value]


def tokens(cfg: DictConfig) -> dict[str, str] | None:
    """Site -> token from ``federation.auth.tokens_file`` (JSON), or None (no node authentication)."""
    raw = _read(cfg.federation.auth.get("tokens_file"), "federation.auth.tokens_file")
    if raw is None:
        return None
    try:
        out = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise FedmedError(f"federation.auth.tokens_file is not JSON: {exc}") from None
    unknown = sorted(set(out) - set(cfg.federation.sites))
    if unknown:
        raise FedmedError(f"federation.auth.tokens_file names sites not in federation.sites: {unknown}")
    return {k: str(v) for k, v in out.items()}


def serve_federation(cfg: DictConfig, local_data: bool = False) -> dict[str, Any]:
    """``fedmed serve``: wait for every site of ``federation.sites`` to connect, then run the federation.

    ``local_data``: the sites' data is on this machine too (``federation.parallel``), so the
    membership audit can use their training images.
    """
    strategy = build.check_settings(cfg, "federated")
    assert strategy is not None
    fed = cfg.federation
    if not fed.get("server"):
        raise FedmedError("fedmed serve needs federation.server=<host:port> to listen on")
    certs, toks = certificates(cfg), tokens(cfg)
    sites = list(fed.sites)
    tracker = Tracker(cfg.logger.tracking_uri, cfg.logger.experiment, cfg.logger.artifact_location)
    from fedmed.outcome import run_name

    run_id = tracker.start_run(run_name(cfg, "federated", strategy=strategy.name),
                               {"dataset": cfg.data.name, "model": cfg.model.name, "mode": "federated",
                                "strategy": strategy.name, "transport": "flower", "server": str(fed.server),
                                "tls": str(certs is not None), "partition": cfg.partition.dirname,
                                "seed": str(cfg.seed)})
    tracker.log_params(run_id, OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    server = FlowerServer(str(fed.server), certs)
    connected = []
    try:
        with run_status(RunLog(tracker, run_id)):
            log.info("waiting for %d sites (%s) to connect to %s", len(sites), ", ".join(sites), fed.server)
            connected = server.accept(sites, float(fed.connect_timeout), fed.site_timeout, toks,
                                      hello={"run_id": run_id, "experiment": cfg.logger.experiment,
                                             "strategy": strategy.name})
            out = federate_remote(cfg, strategy, connected, tracker, run_id, local_data)
    finally:
        server.stop(connected)
    return out


def federate_remote(cfg: DictConfig, strategy, sites: list, tracker: Tracker, run_id: str,
                    local_data: bool = False) -> dict[str, Any]:
    """Run the orchestrator over sites in other processes (Flower nodes), then the run's report.

    ``local_data``: the sites' data is on this machine too, so the membership audit can use it.
    """
    fed = cfg.federation
    L.seed_everything(cfg.seed, verbose=False)
    initial = build.build_module(cfg).net.state_dict()
    orchestrator = Orchestrator(sites, strategy, build.federation_settings(cfg), RunLog(tracker, run_id),
                                Path(fed.checkpoint_dir) / run_id, {"run_id": run_id, "site_runs": {}})
    t0 = time.perf_counter()
    result = orchestrator.run(initial)
    seconds = time.perf_counter() - t0
    last = result.history[-1]
    comm = (f"bytes sent per round: {fmt_bytes(last.bytes_down)} down + {fmt_bytes(last.bytes_up)} up "
            f"({len(last.sites)} sites over Flower); raw images sent: 0")
    rows = [("global model", s, "val", e) for s, e in result.site_eval.items()]
    pipeline = Pipeline.from_config(cfg.data)
    pipeline.source.ensure_available()  # the server evaluates on the test split, which it must hold
    n_train = sum(int(s.info.get("num_train", 0)) for s in sites)
    names = list(fed.sites)
    members = site_training_sets(cfg, pipeline, names) if local_data else []
    trained = Trained("federated", names, result.weights, f"round {result.round}/{fed.rounds}", seconds,
                      rows, comm, members, result.round * fed.local_epochs, result.history,
                      build.dp_records_from_history(result.history), n_train)
    test, _ = finish(cfg, pipeline, trained, tracker, run_id)
    return {"mode": "federated", "run_id": run_id, "test": test, "weights": result.weights,
            "history": result.history}


def join_federation(cfg: DictConfig) -> dict[str, Any]:
    """``fedmed fit site=<name> federation.server=<host:port>``: this hospital's site, until the server ends."""
    name = cfg.site.name
    sites = list(cfg.federation.sites)
    if name not in sites:
        raise FedmedError(f"site={name} is not in federation.sites {sites}; the server expects exactly those")
    strategy = build.check_settings(cfg, "federated")
    source = instantiate(cfg.data.source)
    source.ensure_available()
    build.write_partition(cfg, source)  # never overwrites: a real site brings its own manifest
    scfg = site_config(cfg, name)
    data = build.site_data(cfg, read_manifest(scfg.manifest), scfg)
    site_run = RunLog()  # opened when the server says hello: nested under the server's run
    client = build.site_client(cfg, name, sites.index(name), data, site_run, source.class_names, strategy)

    def on_hello(req: dict) -> None:  # the server's run id: this site's run is nested under it
        theirs = req.get("strategy")
        if strategy is not None and theirs is not None and theirs != strategy.name:
            raise FedmedError(f"the server runs strategy={theirs}, this site is configured with "
                              f"strategy={strategy.name}; use the server's")
        if not site_run.active:
            # opened only now: sites sharing the server's store find it created (no concurrent schema set-up)
            tracker = Tracker(cfg.logger.tracking_uri, cfg.logger.experiment, cfg.logger.artifact_location)
            run_id = tracker.start_run(name, {"site": name, "dataset": cfg.data.name, "role": "site",
                                              "transport": "flower"}, parent_id=req.get("run_id"))
            site_run.tracker, site_run.run_id = tracker, run_id
            tracker.log_params(run_id, {**client.initialize(), "manifest": scfg.manifest,
                                        "server": str(cfg.federation.server)})

    token = _read(cfg.federation.auth.get("token_file"), "federation.auth.token_file")
    ca = _read(cfg.federation.tls.get("ca_cert"), "federation.tls.ca_cert")
    with run_status(site_run):
        serve_site(client, str(cfg.federation.server), ca, token.decode().strip() if token else None, on_hello,
                   float(cfg.federation.connect_timeout))
    log.info("[%s] the federation server ended the federation", name)
    return {"mode": "site", "site": name, "run_id": site_run.run_id}


def run_parallel(cfg: DictConfig) -> dict[str, Any]:
    """``fedmed fit federation.parallel=N``: every site in its own worker process on this machine, all
    training at once, connected to an in-process server through Flower on loopback.

    Sites are assigned round-robin to N devices: GPUs (``CUDA_VISIBLE_DEVICES``) when the trainer
    uses them and there are any, else the CPU cores are split between the N workers.
    """
    n = int(cfg.federation.parallel)
    sites = list(cfg.federation.sites)
    gpus = torch.cuda.device_count() if str(cfg.trainer.get("accelerator", "cpu")) in ("gpu", "cuda", "auto") else 0
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[assignment]
    cfg.federation.server = f"127.0.0.1:{port}"
    cfg.federation.parallel = 0
    if gpus:
        cfg.trainer.devices = 1  # each worker sees exactly its one GPU (CUDA_VISIBLE_DEVICES below)
    source = instantiate(cfg.data.source)
    source.ensure_available()
    build.write_partition(cfg, source)  # once, before the workers read their manifests
    folder = Path(tempfile.mkdtemp(prefix="fedmed-parallel-"))
    config_file = folder / "config.yaml"
    config_file.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    workers = []
    for k, name in enumerate(sites):
        env = dict(os.environ)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(k % min(n, gpus))
            where = f"GPU {env['CUDA_VISIBLE_DEVICES']}"
        else:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, min(n, len(sites)))))
            where = f"CPU, {env['OMP_NUM_THREADS']} thread(s)"
        log.info("starting site %s in its own process (%s)", name, where)
        logfile = open(folder / f"{name}.log", "w")  # noqa: SIM115 - closed after the worker ends
        workers.append((name, logfile, subprocess.Popen(
            [sys.executable, "-m", "fedmed.deploy", str(config_file), name], env=env,
            stdout=logfile, stderr=subprocess.STDOUT)))
    try:
        result = serve_federation(cfg, local_data=True)
    finally:
        for name, logfile, proc in workers:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            logfile.close()
            if proc.returncode:
                log.warning("site %s worker exited with %s; its log: %s", name, proc.returncode, folder / f"{name}.log")
    return result


def _worker(config_file: str, site: str) -> None:
    """Entry point of a ``federation.parallel`` worker: one site, from the server's resolved config."""
    setup_logging()
    cfg = OmegaConf.load(config_file)
    assert isinstance(cfg, DictConfig)
    cfg.site = site_config(cfg, site)
    join_federation(cfg)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
