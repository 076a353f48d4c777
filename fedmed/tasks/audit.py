"""``fedmed audit privacy``: membership-inference attacks on a trained model's training data,
logged under its run (the attacks themselves: :func:`fedmed.outcome.audit_model`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fedmed.build import checkpoint_net, load_model_checkpoint, resolve_mode
from fedmed.data.datamodule import Pipeline
from fedmed.errors import FedmedError
from fedmed.outcome import attack_rows, audit_model, mlflow_attack_metrics, site_training_sets
from fedmed.tracking import RunLog, Tracker, run_status


def run(cfg: DictConfig) -> dict[str, Any]:
    """``fedmed audit privacy``: attack a trained model's training data, log the result under its run."""
    tracker = Tracker(cfg.logger.tracking_uri, cfg.logger.experiment, cfg.logger.artifact_location)
    ckpt = load_model_checkpoint(str(cfg.checkpoint), tracker, Path(cfg.paths.output_dir) / ".cache" / "audit")
    trained = OmegaConf.create(ckpt["config"])
    # the audit's own knobs come from this command line; everything about training from the checkpoint
    trained.privacy = OmegaConf.merge(trained.get("privacy") or cfg.privacy,
                                      {k: cfg.privacy[k] for k in ("audit", "audit_n", "audit_shadows")})
    if cfg.data.name != trained.data.name:
        raise FedmedError(f"the checkpoint was trained on {trained.data.name!r}, but data={cfg.data.name!r}")
    net = checkpoint_net(ckpt, str(cfg.checkpoint))
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
    with run_status(RunLog(tracker, run_id)):
        tracker.log_params(run_id, OmegaConf.to_container(cfg.privacy, resolve=True))  # type: ignore[arg-type]
        tracker.log_metrics(run_id, mlflow_attack_metrics(results), step=0)
        tracker.log_dict(run_id, {"attacks": attack_rows(results)}, "privacy/audit.json")
    lines = [f"membership-inference audit of {cfg.checkpoint} ({mode} model, {trained.data.name})"]
    for r in results:
        lines.append(f"  {r.name:<18} AUC {r.auc:.3f}   TPR@1%FPR {r.tpr_at_1pct:.3f}   "
                     f"TPR@0.1%FPR {r.tpr_at_01pct:.3f}"
                     f"   ({r.members} members vs {r.non_members} held out)")
    lines.append("  AUC 0.5 = the attacker cannot tell members from held-out images; TPR at low FPR is what matters.")
    print("\n".join(lines))
    return {"run_id": run_id, "attacks": attack_rows(results)}
