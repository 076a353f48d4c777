"""Membership-inference audits of a trained model: at the end of ``fedmed fit`` and as
``fedmed audit privacy checkpoint=...``.

Members are the images the model trained on (every site's training manifest, or the pooled
train split for a centralized model); non-members are the validation split, which no site
trained on and which comes from the same distribution as the training split. (Not the test
split: in MedMNIST it is the original test set, with another class mix, and an attack would
score that shift instead of membership.) Both are drawn balanced, ``privacy.audit_n`` each.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fedmed.config import site_config
from fedmed.data.datamodule import ArrayDataset, Pipeline, SiteData
from fedmed.data.manifest import read_manifest
from fedmed.errors import FedmedError
from fedmed.privacy.audit import AttackResult, candidates, lira_attack, loss_attack
from fedmed.privacy.dp import DPConfig
from fedmed.tracking import Tracker

log = logging.getLogger("fedmed")

AUDITS = ("none", "loss", "lira")


def _concat(parts: list[ArrayDataset]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts])


def audit_model(cfg: DictConfig, net: torch.nn.Module, members: list[ArrayDataset], non_members: list[ArrayDataset],
                kind: str | None = None, epochs: int | None = None) -> list[AttackResult]:
    """Run the configured attacks (``privacy.audit``) against ``net``.

    LiRA's shadow models are trained like the target: the same network, optimiser, batch size
    and DP settings, for ``epochs`` (the epochs behind the selected model; default rounds x local
    epochs), on a training set of the target's size: every training image outside the candidate
    set plus a random half of the candidates.
    """
    from fedmed.federated.client import SiteClient
    from fedmed.tasks.fit import build_module

    p = cfg.privacy
    kind = kind or p.audit
    if kind not in AUDITS:
        raise FedmedError(f"privacy.audit={kind!r} is not one of {AUDITS}")
    if kind == "none":
        return []
    if not members:
        log.info("membership audit: this process holds no training images (they stay at the sites); "
                 "run `fedmed audit privacy checkpoint=...` at a site")
        return []
    mx, my = _concat(members)
    nx, ny = _concat(non_members)
    mi, ni = candidates(np.arange(len(mx)), np.arange(len(nx)), int(p.audit_n), cfg.seed)
    x, y = torch.cat([mx[mi], nx[ni]]), torch.cat([my[mi], ny[ni]])
    is_member = np.r_[np.ones(len(mi)), np.zeros(len(ni))]
    net = net.cpu().eval()
    results = [loss_attack(net, x, y, is_member)]
    if kind == "lira":
        epochs = epochs or cfg.federation.rounds * cfg.federation.local_epochs
        rest = np.setdiff1d(np.arange(len(mx)), mi)  # training images that are not candidates: in every shadow
        dp = DPConfig.from_config(OmegaConf.to_container(p))
        trainer_kwargs = {**OmegaConf.to_container(cfg.trainer, resolve=True), "limit_val_batches": 0}
        holdout = ArrayDataset(nx[:64], ny[:64])  # train_alone wants val data; selection is "last"

        def train_shadow(idx: np.ndarray, seed: int) -> torch.nn.Module:
            train = ArrayDataset(torch.cat([mx[rest], x[idx]]), torch.cat([my[rest], y[idx]]))
            client = SiteClient(f"shadow{seed % 1000}", SiteData(train, holdout), lambda: build_module(cfg),
                                cfg.data.batch_size, trainer_kwargs, seed, privacy=dp, planned_epochs=epochs)
            weights, _ = client.train_alone(epochs, select="last")
            client.module.net.load_state_dict(weights)
            return client.module.net

        log.info("membership audit: training %d shadow models (%d images, %d epochs each) for LiRA",
                 p.audit_shadows, len(rest) + len(x) // 2, epochs)
        results += lira_attack(net, x, y, is_member, train_shadow, int(p.audit_shadows), cfg.seed,
                               progress=lambda s: log.info("  shadow model %d/%d done", s, p.audit_shadows))
    for r in results:
        log.info("membership audit, %s attack: AUC %.3f, TPR@1%%FPR %.3f, TPR@0.1%%FPR %.3f (%d vs %d)",
                 r.name, r.auc, r.tpr_at_1pct, r.tpr_at_01pct, r.members, r.non_members)
    return results


def attack_rows(results: list[AttackResult]) -> list[dict[str, Any]]:
    return [dataclasses.asdict(r) for r in results]


def site_training_sets(cfg: DictConfig, pipeline: Pipeline, sites: list[str]) -> list[ArrayDataset]:
    """The training data each site's manifest names (the members an audit draws from)."""
    return [pipeline.site(read_manifest(site_config(cfg, s).manifest)).train for s in sites]


def mlflow_attack_metrics(results: list[AttackResult]) -> dict[str, float]:
    """``mia_loss_auc``, ``mia_lira_tpr_at_fpr_0.1pct``... for MLflow."""
    return {k: v for r in results for k, v in r.as_dict(f"mia_{r.name.split()[0]}_").items()
            if not (isinstance(v, float) and math.isnan(v))}


def run(cfg: DictConfig) -> dict[str, Any]:
    """``fedmed audit privacy``: attack a trained model's training data, log the result under its run."""
    from fedmed.tasks.explain import load_checkpoint
    from fedmed.tasks.fit import build_net, resolve_mode

    tracker = Tracker(cfg.logger.tracking_uri, cfg.logger.experiment, cfg.logger.artifact_location)
    ckpt = load_checkpoint(str(cfg.checkpoint), tracker, Path(cfg.paths.root) / ".cache" / "audit")
    trained = OmegaConf.create(ckpt["config"])
    # the audit's own knobs come from this command line; everything about training from the checkpoint
    trained.privacy = OmegaConf.merge(trained.get("privacy") or cfg.privacy,
                                      {k: cfg.privacy[k] for k in ("audit", "audit_n", "audit_shadows")})
    if cfg.data.name != trained.data.name:
        raise FedmedError(f"the checkpoint was trained on {trained.data.name!r}, but data={cfg.data.name!r}")
    net, _ = build_net(trained)
    net.load_state_dict(ckpt["state_dict"])
    pipeline = Pipeline.from_config(trained.data, instantiate(cfg.data.source))
    mode = resolve_mode(trained)
    if mode == "centralized":
        members = [pipeline.dataset("train")]
    else:
        members = site_training_sets(trained, pipeline,
                                     [trained.site.name] if mode == "local" else list(trained.federation.sites))
    non_members = [pipeline.dataset("val")]
    results = audit_model(trained, net, members, non_members, cfg.privacy.audit,
                          cfg.get("epochs") or ckpt.get("epochs"))
    run_id = tracker.start_run(f"audit-privacy-{cfg.privacy.audit}",
                               {"role": "audit", "dataset": cfg.data.name, "checkpoint": str(cfg.checkpoint)},
                               parent_id=ckpt.get("run_id"))
    tracker.log_params(run_id, OmegaConf.to_container(cfg.privacy, resolve=True))
    tracker.log_metrics(run_id, mlflow_attack_metrics(results), step=0)
    tracker.log_dict(run_id, {"attacks": attack_rows(results)}, "privacy/audit.json")
    tracker.end_run(run_id, "FINISHED")
    lines = [f"membership-inference audit of {cfg.checkpoint} ({mode} model, {trained.data.name})"]
    for r in results:
        lines.append(f"  {r.name:<18} AUC {r.auc:.3f}   TPR@1%FPR {r.tpr_at_1pct:.3f}   TPR@0.1%FPR {r.tpr_at_01pct:.3f}"
                     f"   ({r.members} members vs {r.non_members} held out)")
    lines.append("  AUC 0.5 = the attacker cannot tell members from held-out images; TPR at low FPR is what matters.")
    print("\n".join(lines))
    return {"run_id": run_id, "attacks": attack_rows(results)}
