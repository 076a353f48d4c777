"""The federation's server on Flower's deployment runtime.

``fedmed serve`` (:func:`serve_federation`) starts a SuperLink, registers the sites' SuperNode
keys, submits fedmed's Flower App with ``flwr run`` and waits for it. The App's ServerApp
(:func:`run_on_grid`, also what ``flwr run`` by hand starts) admits the sites among the grid's
nodes and runs :func:`fedmed.federate.federate` over them, one :class:`~fedmed.flower.grid.GridSite` each.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from fedmed import build, contract
from fedmed.config import compose
from fedmed.data.datamodule import Pipeline
from fedmed.errors import FedmedError
from fedmed.federate import federate, open_run
from fedmed.flower import grid as grid_sites
from fedmed.flower import runtime
from fedmed.flower.gate import Secret, ServerGate
from fedmed.flower.keys import check_security, supernode_keys, tls_files
from fedmed.flower.runtime import CONFIG_FILE, LOCAL_DATA, OVERRIDES, RESULT_FILE
from fedmed.outcome import site_training_sets
from fedmed.schema import validate
from fedmed.tracking import RunLog, exit_status, run_status

log = logging.getLogger("fedmed")


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
    check_security(cfg, tls, keys)
    if cfg.get("resume"):
        build.resume_state(cfg, "federated", OmegaConf.to_container(cfg, resolve=True))  # refused here, not in the App
    folder = Path(tempfile.mkdtemp(prefix="fedmed-serve-"))
    config = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(config))
    secret = Secret()
    link = runtime.superlink(str(fed.server), folder / "superlink", tls, keys is not None, folder / "superlink.log",
                             secret.path)
    stream: runtime.Process | None = None
    gate: ServerGate | None = None
    done = False
    try:
        control = runtime.Control(str(fed.server), folder / "flwr", tls.ca_cert if tls else None)
        for site, key in (keys or {}).items():
            control.register(key, site)
        log.info("SuperLink on %s%s, its log in %s; submitting fedmed's App", fed.server,
                 f" (TLS, {len(keys or {})} SuperNode keys registered)" if tls else " (no TLS)", link.log)
        run_id = control.run(runtime.write_app(folder / "app"),
                             {CONFIG_FILE: str(folder / "config.yaml"), RESULT_FILE: str(folder / "result.json"),
                              LOCAL_DATA: "1" if local_data else ""})
        gate = ServerGate(control.target, secret, int(run_id), tls.ca_cert if tls else None,
                          log=folder / "serverapp.log").start()
        stream = control.stream_log(run_id)  # the ServerApp's log, here
        status = control.wait(run_id, link.check, poll=15,
                              ended=lambda: gate.process is not None and gate.process.poll() is not None)
        result_file = folder / "result.json"
        if status != "finished:completed" or not result_file.exists():
            raise FedmedError(f"the federation (Flower run {run_id}) ended {status}; the server's log is above, "
                              f"the SuperLink's in {link.log}")
        done = True
        return json.loads(result_file.read_text())
    finally:
        if stream is not None:
            time.sleep(1)  # its last lines
            stream.stop()
        if gate is not None:
            gate.stop()
        link.stop()
        secret.remove()
        if done:  # kept after a failure: the SuperLink's log is there
            shutil.rmtree(folder, ignore_errors=True)


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
    resume = build.resume_state(cfg, "federated", OmegaConf.to_container(cfg, resolve=True)) if cfg.get("resume") \
        else None
    pipeline = Pipeline.from_config(cfg.data)
    pipeline.source.ensure_available()  # the server evaluates on the test split, which it must hold
    tracker, run_id = open_run(cfg, "federated", list(fed.sites), strategy, resume,
                               {"transport": "flower", "server": str(fed.server),
                                "tls": str(bool(fed.tls.get("ca_cert")))}, verb="serve")
    sites: list[grid_sites.GridSite] = []
    try:
        with run_status(RunLog(tracker, run_id)):
            L.seed_everything(cfg.seed, verbose=False)
            initial = build.initial_weights(cfg)
            log.info("waiting for %d sites (%s) among the SuperNodes", len(fed.sites), ", ".join(fed.sites))
            sites = grid_sites.accept(grid, list(fed.sites), float(fed.connect_timeout),
                                      {"run_id": run_id, "experiment": cfg.logger.experiment,
                                       "strategy": strategy.name}, fed.site_timeout,
                                      {s: k.read_bytes() for s, k in keys.items()} if keys else None,
                                      contract.terms(cfg, initial))
            names = list(fed.sites)
            members = site_training_sets(cfg, pipeline, names) if run_config.get(LOCAL_DATA) else []
            trained, test, _ = federate(cfg, strategy, sites, initial, tracker, run_id, resume, pipeline,
                                  resume["site_runs"] if resume else None, members,
                                  sum(int(s.info.get("num_train", 0)) for s in sites))
    except BaseException as exc:
        grid_sites.finish(grid, sites, exit_status(exc))
        raise
    grid_sites.finish(grid, sites, "FINISHED")
    result = {"mode": "federated", "run_id": run_id, "test": test,
              "rounds": [{"round": h.round, "sites": h.sites} for h in trained.history]}
    if run_config.get(RESULT_FILE):
        Path(str(run_config[RESULT_FILE])).write_text(json.dumps(result, default=float))
    return result
