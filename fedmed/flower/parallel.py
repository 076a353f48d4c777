"""``fedmed fit federation.parallel=N``: every site in its own worker process on this machine.

A SuperLink on loopback (:func:`fedmed.flower.serve.serve_federation`) and each site as a
``fedmed fit site=<name>`` worker with its own SuperNode: the same path as separate machines.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fedmed import build
from fedmed.config import site_config
from fedmed.flower import runtime
from fedmed.flower.serve import serve_federation
from fedmed.flower.site import join_federation
from fedmed.logs import setup_logging

log = logging.getLogger("fedmed")


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
            [sys.executable, "-m", "fedmed.flower.parallel", str(config_file), name], env=env,
            stdout=logfile, stderr=subprocess.STDOUT)))
    try:
        result = serve_federation(cfg, local_data=True)
    finally:
        failed = False
        for name, logfile, proc in workers:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            logfile.close()
            if proc.returncode:
                failed = True
                log.warning("site %s worker exited with %s; its log: %s", name, proc.returncode, folder / f"{name}.log")
    if not failed:  # the workers' logs are kept where something went wrong
        shutil.rmtree(folder, ignore_errors=True)
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
