"""Federations across processes and machines, on Flower's deployment runtime.

- ``fedmed serve`` (:func:`serve_federation`) starts a SuperLink, registers the sites' SuperNode
  keys, submits fedmed's Flower App with ``flwr run`` and waits for it; the App's ServerApp
  (:func:`run_on_grid`) runs fedmed's orchestrator over the Grid, one node per site.
- ``fedmed fit site=<name> federation.server=<host:port>`` (:func:`join_federation`) builds one
  hospital's site once, starts its SuperNode and answers the ClientApp's messages through a local
  relay (:mod:`fedmed.relay`), until the server ends the federation.
- ``federation.parallel`` (:func:`run_parallel`) is both on one machine: a SuperLink on loopback
  and every site in its own worker process.

The orchestrator, site client, strategies and report are the in-process ones.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fedmed import build
from fedmed.config import compose, site_config
from fedmed.data.datamodule import Pipeline
from fedmed.errors import FedmedError
from fedmed.federated import Orchestrator, flower_app, runtime
from fedmed.federated.flower_app import NodeSite
from fedmed.logs import setup_logging
from fedmed.outcome import Trained, finish, run_name, site_training_sets
from fedmed.relay import NODE_CONFIG_KEY, SiteRelay
from fedmed.reporting import fmt_bytes
from fedmed.schema import validate
from fedmed.tracking import RunLog, Tracker, exit_status, run_status

log = logging.getLogger("fedmed")

CONFIG_FILE, RESULT_FILE, LOCAL_DATA, OVERRIDES = "config-file", "result-file", "local-data", "config-overrides"
NOT_ACTIVATED = "Failed to activate SuperNode"  # Flower: the SuperLink does not (yet) know this node's key


def _file(path: str | None, what: str) -> Path | None:
    if not path:
        return None
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise FedmedError(f"{what}={path}: no such file")
    return p.resolve()


def tls_files(cfg: DictConfig, server: bool) -> runtime.Tls | None:
    """``federation.tls`` as files (the server needs all three, a site the CA), or None (no TLS)."""
    tls = cfg.federation.tls
    keys = ("ca_cert", "server_cert", "server_key") if server else ("ca_cert",)
    given = {k: tls.get(k) for k in keys}
    if not any(given.values()):
        return None
    missing = [k for k, v in given.items() if not v]
    if missing:
        raise FedmedError(f"TLS needs federation.tls.{', federation.tls.'.join(keys)}; missing {missing}")
    files = {k: _file(v, f"federation.tls.{k}") for k, v in given.items()}
    return runtime.Tls(files["ca_cert"], files.get("server_cert"), files.get("server_key"))  # type: ignore[arg-type]


def supernode_keys(cfg: DictConfig) -> dict[str, Path] | None:
    """Site -> its SuperNode's public key file, from ``federation.auth.supernode_keys`` (None: no node auth)."""
    given = cfg.federation.auth.get("supernode_keys")
    if not given:
        return None
    sites = list(cfg.federation.sites)
    keys = {str(k): v for k, v in OmegaConf.to_container(given).items()}  # type: ignore[union-attr]
    unknown, missing = sorted(set(keys) - set(sites)), [s for s in sites if s not in keys]
    if unknown or missing:
        raise FedmedError(f"federation.auth.supernode_keys must name exactly the sites {sites}: "
                          + "; ".join(p for p in (f"not sites: {unknown}" if unknown else "",
                                                  f"missing: {missing}" if missing else "") if p))
    out = {s: _file(v, f"federation.auth.supernode_keys.{s}") for s, v in keys.items()}
    for s, path in out.items():
        try:
            flower_app.public_key_der(path.read_bytes())  # type: ignore[union-attr]
        except ValueError as exc:
            raise FedmedError(f"federation.auth.supernode_keys.{s}={path}: not a public key ({exc})") from None
    return out  # type: ignore[return-value]


def _check_security(cfg: DictConfig, tls: runtime.Tls | None, keys: Mapping[str, Path] | None) -> None:
    if keys is not None and tls is None:
        raise FedmedError("federation.auth.supernode_keys needs TLS (federation.tls.*): Flower authenticates "
                          "SuperNodes only over TLS")
    host = str(cfg.federation.server).rsplit(":", 1)[0]
    if tls is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("federation.server=%s without TLS: updates cross the network in the clear and any node can "
                    "join; set federation.tls.* and federation.auth.supernode_keys", cfg.federation.server)


# -- the server --------------------------------------------------------------------------------
def serve_federation(cfg: DictConfig, local_data: bool = False) -> dict[str, Any]:
    """``fedmed serve``: a SuperLink on ``federation.server``, the sites' keys registered, fedmed's App run on it.

    ``local_data``: the sites' data is on this machine too (``federation.parallel``), so the
    membership audit can use their training images.
    """
    build.check_settings(cfg, "federated")
    fed = cfg.federation
    if not fed.get("server"):
        raise FedmedError("fedmed serve needs federation.server=<host:port> to listen on")
    tls, keys = tls_files(cfg, server=True), supernode_keys(cfg)
    _check_security(cfg, tls, keys)
    if cfg.get("resume"):
        build.resume_state(cfg, "federated", OmegaConf.to_container(cfg, resolve=True))  # refused here, not in the App
    folder = Path(tempfile.mkdtemp(prefix="fedmed-serve-"))
    config = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(config))
    link = runtime.superlink(str(fed.server), folder / "superlink", tls, keys is not None, folder / "superlink.log")
    stream = None
    try:
        control = runtime.Control(str(fed.server), folder / "flwr", tls.ca_cert if tls else None)
        for site, key in (keys or {}).items():
            control.register(key, site)
        log.info("SuperLink on %s%s, its log in %s; submitting fedmed's App", fed.server,
                 f" (TLS, {len(keys or {})} SuperNode keys registered)" if tls else " (no TLS)", link.log)
        run_id = control.run(runtime.write_app(folder / "app"),
                             {CONFIG_FILE: str(folder / "config.yaml"), RESULT_FILE: str(folder / "result.json"),
                              LOCAL_DATA: "1" if local_data else ""})
        stream = control.stream_log(run_id)  # the ServerApp's log, here
        status = control.wait(run_id, link.check)
        result_file = folder / "result.json"
        if status != "finished:completed" or not result_file.exists():
            raise FedmedError(f"the federation (Flower run {run_id}) ended {status}; the server's log is above")
        return json.loads(result_file.read_text())
    finally:
        if stream is not None:
            time.sleep(1)  # its last lines
            stream.stop()
        link.stop()


def server_config(run_config: Mapping[str, Any]) -> DictConfig:
    """The ServerApp's config: the file ``fedmed serve`` wrote, else ``fedmed fit``'s config composed from
    the run config's ``config-overrides`` (``flwr run`` by hand)."""
    path = str(run_config.get(CONFIG_FILE) or "")
    if path:
        cfg = OmegaConf.load(path)
        assert isinstance(cfg, DictConfig)
    else:
        cfg = compose("fit", shlex.split(str(run_config.get(OVERRIDES) or "")))
    validate(cfg, "fit")
    return cfg


def run_on_grid(grid, cfg: DictConfig, run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The ServerApp: wait for every site of ``federation.sites`` among the grid's nodes, then run the federation."""
    strategy = build.check_settings(cfg, "federated")
    assert strategy is not None
    fed = cfg.federation
    keys = supernode_keys(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    resume = build.resume_state(cfg, "federated", config) if cfg.get("resume") else None
    tracker = Tracker(cfg.logger.tracking_uri, cfg.logger.experiment, cfg.logger.artifact_location)
    if resume is not None:
        run_id = str(resume["run_id"])
        tracker.reopen(run_id)
    else:
        run_id = tracker.start_run(run_name(cfg, "federated", strategy=strategy.name),
                                   {"dataset": cfg.data.name, "model": cfg.model.name, "mode": "federated",
                                    "strategy": strategy.name, "transport": "flower", "server": str(fed.server),
                                    "tls": str(bool(fed.tls.get("ca_cert"))), "partition": cfg.partition.dirname,
                                    "seed": str(cfg.seed)})
        tracker.log_params(run_id, config)  # type: ignore[arg-type]
    log.info("MLflow run %s (if it stops, continue it with fedmed serve resume=%s)", run_id, run_id)
    sites: list[flower_app.GridSite] = []
    try:
        with run_status(RunLog(tracker, run_id)):
            log.info("waiting for %d sites (%s) among the SuperNodes", len(fed.sites), ", ".join(fed.sites))
            sites = flower_app.accept(grid, list(fed.sites), float(fed.connect_timeout),
                                      {"run_id": run_id, "experiment": cfg.logger.experiment,
                                       "strategy": strategy.name}, fed.site_timeout,
                                      {s: k.read_bytes() for s, k in keys.items()} if keys else None)
            out = federate_remote(cfg, strategy, sites, tracker, run_id, bool(run_config.get(LOCAL_DATA)), resume)
    except BaseException as exc:
        flower_app.finish(grid, sites, exit_status(exc))
        raise
    flower_app.finish(grid, sites, "FINISHED")
    result = {"mode": "federated", "run_id": run_id, "test": out["test"],
              "rounds": [{"round": h.round, "sites": h.sites} for h in out["history"]]}
    if run_config.get(RESULT_FILE):
        Path(str(run_config[RESULT_FILE])).write_text(json.dumps(result, default=float))
    return result


def federate_remote(cfg: DictConfig, strategy, sites: list, tracker: Tracker, run_id: str,
                    local_data: bool = False, resume: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run the orchestrator over sites in other processes (Flower nodes), then the run's report.

    ``local_data``: the sites' data is on this machine too, so the membership audit can use it.
    ``resume``: the server checkpoint to continue from (the sites keep their own state).
    """
    fed = cfg.federation
    L.seed_everything(cfg.seed, verbose=False)
    initial = build.build_module(cfg).net.state_dict()
    orchestrator = Orchestrator(sites, strategy, build.federation_settings(cfg), RunLog(tracker, run_id),
                                Path(fed.checkpoint_dir) / run_id,
                                {"run_id": run_id, "site_runs": {},
                                 "config": OmegaConf.to_container(cfg, resolve=True)})
    t0 = time.perf_counter()
    result = orchestrator.run(initial, resume)
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


# -- a hospital's site --------------------------------------------------------------------------
def join_federation(cfg: DictConfig) -> dict[str, Any]:
    """``fedmed fit site=<name> federation.server=<host:port>``: this hospital's site, until the server ends.

    The site is built once (its data decoded, its model and trainer set up); a SuperNode is started
    for it with ``site=<name>`` in its node config, and every message the server sends it is
    answered here, through the relay.
    """
    name, sites = cfg.site.name, list(cfg.federation.sites)
    if name not in sites:
        raise FedmedError(f"site={name} is not in federation.sites {sites}; the server expects exactly those")
    strategy = build.check_settings(cfg, "federated")
    tls = tls_files(cfg, server=False)
    key = _file(cfg.federation.auth.get("private_key"), "federation.auth.private_key")
    if key is not None and tls is None:
        raise FedmedError("federation.auth.private_key needs federation.tls.ca_cert: Flower authenticates "
                          "SuperNodes only over TLS")
    source = instantiate(cfg.data.source)
    source.ensure_available()
    _, loaded = build.load_sites(cfg, source, [name])  # a real site brings its own manifest, never overwritten
    scfg = site_config(cfg, name)
    run = RunLog()  # opened at the server's hello, nested under the server's run
    client = build.site_client(cfg, name, sites.index(name), loaded[name], run, source.class_names, strategy)
    node = local_node(cfg, client, strategy.name if strategy is not None else None, str(scfg.manifest))
    with run_status(run), SiteRelay(node.handle) as relay:
        def start() -> runtime.Process:
            return runtime.supernode(str(cfg.federation.server), {"site": name, NODE_CONFIG_KEY: relay.path},
                                     tls.ca_cert if tls else None, key, _supernode_log(cfg, name))

        keeper = _Keeper(name, start, float(cfg.federation.connect_timeout), node)
        log.info("[%s] SuperNode started for %s; waiting for the server (%s)", name, cfg.federation.server,
                 "TLS" + (", authenticated" if key else "") if tls else "no TLS")
        try:
            relay.serve(lambda: node.finished is not None or node.refused is not None, keeper.check)
            time.sleep(3)  # the SuperNode delivers the last answer before it stops
        finally:
            keeper.proc.stop()
        if node.refused is not None:
            raise FedmedError(f"the server refused this node: {node.refused}")
        if node.finished != "FINISHED":
            raise FedmedError(f"the server ended the federation as {node.finished}; see the server's log")
    log.info("[%s] the federation server ended the federation", name)
    return {"mode": "site", "site": name, "run_id": run.run_id}


def local_node(cfg: DictConfig, client, strategy: str | None, manifest: str) -> NodeSite:
    """The site end of this node's messages (its MLflow run in the config's store)."""
    return NodeSite(client, strategy, lambda: Tracker(cfg.logger.tracking_uri, cfg.logger.experiment,
                                                      cfg.logger.artifact_location),
                    {"manifest": manifest, "server": str(cfg.federation.server)}, {"dataset": str(cfg.data.name)})


def _supernode_log(cfg: DictConfig, name: str) -> Path:
    folder = Path(cfg.paths.output_dir) / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"supernode-{name}-{os.getpid()}.log"


class _Keeper:
    """This site's SuperNode, kept running until the federation ends.

    Between two messages it checks the SuperNode. One that gave up reaching the SuperLink (exit
    status 0 or SIGINT, e.g. while the aggregator restarts to ``resume=``) or was not yet known to it
    (Flower's "Failed to activate SuperNode": the SuperLink is up but has not registered the key
    yet) is started again, for up to ``connect_timeout`` seconds without a message; then, or if it
    failed otherwise (a bad key file, a bad certificate), the site ends with its reason.
    """

    def __init__(self, name: str, start, connect_timeout: float, node: NodeSite):
        self.name, self.start, self.timeout, self.node = name, start, connect_timeout, node
        self.proc: runtime.Process = start()
        self.seen, self.lost = node.messages, time.monotonic()  # lost: since when no message has come
        self.waiting = True  # for the first message, or for the SuperLink again
        self.refused_key = ""  # Flower's last "not activated" reason, if any

    def check(self) -> None:
        now = time.monotonic()
        if self.node.messages != self.seen:
            self.seen, self.waiting = self.node.messages, False
        code = self.proc.proc.poll()
        if code is None:
            if self.waiting and now - self.lost > self.timeout:
                self._give_up("never reached this site" if not self.node.run.active
                              else "has not reached this site again")
            return
        reason = self.proc.last_line()
        if NOT_ACTIVATED in reason:
            self.refused_key = reason
        # 0 or SIGINT: the SuperNode gave up reaching the SuperLink (Flower ends it either way; it runs
        # in its own process group, so a Ctrl-C at the terminal does not reach it)
        if code not in (0, -signal.SIGINT) and NOT_ACTIVATED not in reason:
            self.proc.check()  # raises with the SuperNode's reason
        if not self.waiting:
            self.waiting, self.lost = True, now
        if now - self.lost > self.timeout:
            if NOT_ACTIVATED in reason:
                raise FedmedError(f"the SuperLink did not accept this SuperNode's key within federation.connect_"
                                  f"timeout={self.timeout:g}s ({reason}); the server must list this site's public "
                                  "key in federation.auth.supernode_keys")
            self._give_up(f"could not be reached again ({reason})")
        log.warning("[%s] the SuperNode stopped (%s); starting it again", self.name, reason)
        time.sleep(2)
        self.proc = self.start()

    def _give_up(self, what: str) -> None:
        if self.refused_key and not self.node.run.active:
            raise FedmedError(f"the SuperLink did not accept this SuperNode's key within federation.connect_"
                              f"timeout={self.timeout:g}s ({self.refused_key}); the server must list this site's "
                              "public key in federation.auth.supernode_keys")
        raise FedmedError(f"federation.connect_timeout={self.timeout:g}s passed and the server {what} "
                          f"(SuperNode log: {self.proc.log})")


# -- every site on this machine ------------------------------------------------------------------
def run_parallel(cfg: DictConfig) -> dict[str, Any]:
    """``fedmed fit federation.parallel=N``: every site in its own worker process on this machine, all
    training at once, their SuperNodes connected to a SuperLink on loopback.

    Sites are assigned round-robin to N devices: GPUs (``CUDA_VISIBLE_DEVICES``) when the trainer
    uses them and there are any, else the CPU cores are split between the N workers.
    """
    n = int(cfg.federation.parallel)
    sites = list(cfg.federation.sites)
    gpus = torch.cuda.device_count() if str(cfg.trainer.get("accelerator", "cpu")) in ("gpu", "cuda", "auto") else 0
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[assignment]
    cfg.federation.server = f"127.0.0.1:{runtime.free_port()}"
    cfg.federation.parallel = 0
    if gpus:
        cfg.trainer.devices = 1  # each worker sees exactly its one GPU (CUDA_VISIBLE_DEVICES below)
    source = instantiate(cfg.data.source)
    source.ensure_available()
    build.write_partition(cfg, source)  # once, before the workers read their manifests
    folder = Path(tempfile.mkdtemp(prefix="fedmed-parallel-"))
    cfg.paths.output_dir = str(folder)  # the workers' SuperNode logs (every other path is resolved already)
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
