"""What a finished training run reports, for ``fedmed fit`` and ``fedmed serve`` alike: the test
evaluation, the membership-inference audit, the privacy record, the logged model and the summary.

Members of the audit are the images the model trained on (every site's training manifest, or
the pooled train split for a centralized model); non-members are the validation split, which no
site trained on and which comes from the same distribution as the training split (not the test
split: in MedMNIST it is the original test set, with another class mix, and an attack would score
that shift instead of membership). Both are drawn balanced, ``privacy.audit_n`` each.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from fedmed.build import build_module, dp_config, shares
from fedmed.config import site_config
from fedmed.data.datamodule import ArrayDataset, Pipeline, SiteData, make_loader
from fedmed.data.manifest import Manifest, read_manifest
from fedmed.data.sites import describe_partition, site_class_counts
from fedmed.errors import FedmedError
from fedmed.evaluation import Scores, model_card, reliability_figure, score
from fedmed.evaluation.predict import class_probabilities
from fedmed.evaluation.record import evaluation_record, metric_values
from fedmed.evaluation.scores import HEADLINE, fmt
from fedmed.federated.checkpoint import CHECKPOINT, disk_fault
from fedmed.federated.messages import EvalResult, RoundRecord
from fedmed.federated.site import SiteClient
from fedmed.federated.training import TrainingSettings
from fedmed.model_export import ImageClassifier, log_pyfunc, raw_examples
from fedmed.models.metrics import class_keys, evaluate, name_classes
from fedmed.privacy.audit import AttackResult, candidates, lira_attack, loss_attack
from fedmed.privacy.dp import DPConfig, describe
from fedmed.privacy.record import format_record, privacy_record
from fedmed.reporting import confusion_figure, partition_figure, summary_table
from fedmed.schema import AUDITS
from fedmed.tracking import Tracker

log = logging.getLogger("fedmed")


@dataclass
class Trained:
    """What a training run hands to its report.

    Args:
        mode: federated, centralized or local.
        sites: the sites that trained (or ``pooled``).
        weights: the selected model.
        chosen: which one it is, e.g. ``round 4/10`` or ``epoch 7/20``.
        seconds: training wall time.
        site_rows: (label, site, split, evaluation) rows of the summary.
        comm: the communication line of the summary.
        trained_on: the training data the audit draws members from (empty where it stays at the sites).
        epochs: the training epochs behind the selected model (LiRA trains its shadow models as long).
        history: the federation's rounds (empty for a baseline).
        dp_records: each site's DP accounting.
        num_train: training images over all sites (default: the size of ``trained_on``).
        site_scores: the selected model on each site's own test images, as the sites scored it.
    """

    mode: str
    sites: list[str]
    weights: dict[str, torch.Tensor]
    chosen: str
    seconds: float
    site_rows: list[tuple[str, str, str, EvalResult]]
    comm: str
    trained_on: list[ArrayDataset]
    epochs: int
    history: list[RoundRecord] = field(default_factory=list)
    dp_records: dict[str, dict[str, float]] = field(default_factory=dict)
    num_train: int | None = None
    site_scores: list[Scores] = field(default_factory=list)


def run_name(cfg: DictConfig, mode: str, site: str | None = None, strategy: str | None = None,
             start: float | None = None) -> str:
    """The MLflow name of a training run: mode, dataset, model, the site (local baseline) or the
    strategy (federated), the seed and the start time (local, MMDD-HHMM), e.g.
    ``federated-pneumoniamnist-cnn-fedavg-s42-1204-0312``. ``run_name=`` overrides it."""
    if cfg.get("run_name"):
        return str(cfg.run_name)
    if mode == "federated" and strategy is None:
        from hydra.utils import get_class

        strategy = str(getattr(get_class(cfg.strategy._target_), "name", cfg.strategy._target_.rsplit(".", 1)[-1]))
    parts = [mode, cfg.data.name, cfg.model.name]
    if mode == "local" and site:
        parts.append(site)
    if mode == "federated" and strategy:
        parts.append(strategy)
    parts += [f"s{cfg.seed}", time.strftime("%m%d-%H%M", time.localtime(start))]
    return "-".join(str(p) for p in parts)


def log_partition(tracker: Tracker, run_id: str, manifests: dict[str, Manifest], class_names: list[str],
                  title: str) -> None:
    """The sites' class counts as JSON, a table and a bar chart, and the partition's summary."""
    counts = site_class_counts(list(manifests.values()))
    tracker.log_dict(run_id, {s: row.tolist() for s, row in zip(manifests, counts, strict=True)},
                     "partition/class_counts.json")
    tracker.log_text(run_id, describe_partition(list(manifests.values())), "partition/summary.txt")
    tracker.log_table(run_id, {"site": list(manifests),
                               **{c: counts[:, j].tolist() for j, c in enumerate(class_names)}},
                      "partition/class_counts_table.json")
    tracker.log_figure(run_id, partition_figure(counts, class_names, list(manifests), title),
                       "partition/class_counts.png")


def finish(cfg: DictConfig, pipeline: Pipeline, trained: Trained, tracker: Tracker,
           run_id: str) -> tuple[dict[str, float], dict[str, Any]]:
    """Evaluate the chosen model on the test split, audit it, log the model and the privacy record, print the summary.

    Returns:
        (test metrics, privacy record).
    """
    source, t = pipeline.source, trained
    rounds = cfg.federation.rounds
    # -- final evaluation on the official test split ---------------------------------
    module = build_module(cfg)
    module.net.load_state_dict(t.weights)
    test = pipeline.dataset("test")
    test_metrics, confmat = evaluate(module.net, make_loader(test, 256, False), cfg.data.num_classes)
    tracker.log_metrics(run_id, {f"test_{k}": v for k, v in name_classes(test_metrics, source.class_names).items()},
                        step=rounds)
    tracker.log_metrics(run_id, {"fit_seconds": t.seconds}, step=0)
    title = f"{cfg.data.name} test, {t.mode} {cfg.model.name} ({t.chosen})"
    try:
        tracker.log_figure(run_id, confusion_figure(confmat, source.class_names, title), "confusion_matrix_test.png")
        tracker.log_checkpoint(run_id, t.weights, OmegaConf.to_container(cfg, resolve=True),
                               source.class_names, t.epochs)
        if cfg.logger.log_model:
            log_model(cfg, source, tracker, run_id, t.weights)
    except OSError as exc:
        kept = Path(cfg.federation.checkpoint_dir) / run_id / CHECKPOINT
        where = f"; the trained federation is kept in {kept}" if kept.exists() else ""
        raise FedmedError(f"logger.artifact_location={cfg.logger.artifact_location}: cannot write the run's model: "
                          f"{disk_fault(exc)}{where}") from None

    # -- privacy: membership-inference audit of the final model, and the run's record ----
    attacks = audit_model(cfg, module.net, t.trained_on, [pipeline.dataset("val")], epochs=t.epochs)
    h = t.history
    record = privacy_record(
        mode=t.mode, sites=t.sites, rounds_done=len(h), bytes_up=[r.bytes_up for r in h],
        bytes_down=[r.bytes_down for r in h], compression=cfg.federation.compression if h else "none",
        secure_aggregation=bool(cfg.privacy.secure_aggregation), dp=t.dp_records, dp_setting=describe(dp_config(cfg)),
        audit=attack_rows(attacks),
        num_train=t.num_train if t.num_train is not None else sum(len(d) for d in t.trained_on),
        class_statistics=shares(cfg, t.mode == "federated"),
        features_from_round=cfg.federation.get("calibrate_from"))
    tracker.log_dict(run_id, record, "privacy/record.json")
    eps = {"dp_epsilon_max": max(d["epsilon"] for d in t.dp_records.values())} if t.dp_records else {}
    tracker.log_metrics(run_id, {**mlflow_attack_metrics(attacks),
                                 "privacy_update_bytes_sent": record["update_bytes_sent"], **eps}, step=rounds)

    evaluations = log_evaluations(cfg, tracker, run_id, module.net, test, source.class_names, t.site_scores)
    rows = [{"who": f"{label} @ {site}", "split": split, "n": e.num_samples, **e.metrics}
            for label, site, split, e in t.site_rows]
    rows += [{"who": f"{t.mode} model @ {s.name}", "split": "own test", "n": int(s.support.sum()),
              **{k: v["value"] for k, v in s.summary().items() if k in HEADLINE}} for s in t.site_scores]
    rows.append({"who": f"{t.mode} model", "split": "test", "n": int(confmat.sum()), **test_metrics})
    whole = evaluations[0][1].summary()
    spread = (f"\ntest with 95% intervals ({evaluations[0][1].n_boot} resamples within each class): balanced accuracy "
              f"{fmt(whole['balanced_acc'])}, AUROC {fmt(whole['auroc'])}, calibration error {fmt(whole['ece'])}; "
              "model card: model_card.md in the run")
    spread += ("\neach site's own test images (scored at the site): balanced accuracy "
              + ", ".join(f"{s.name} {fmt(s.summary()['balanced_acc'])}" for s in t.site_scores)
              + f"; worst {min(evaluations[1:], key=lambda e: e[1].summary()['balanced_acc']['value'])[1].name}"
              if t.site_scores else "")
    text = summary_table(
        f"fedmed fit: {t.mode}, {cfg.data.name}, {cfg.model.name}, selected {t.chosen}, {t.seconds:.0f}s",
        rows,
        f"{t.comm}{spread}\n{format_record(record)}\n"
        f"MLflow run {run_id}; browse it with: mlflow ui --backend-store-uri {cfg.logger.tracking_uri}",
    )  # the footer's lines are never wrapped: the command stays one line to copy
    tracker.log_text(run_id, text, "summary.txt")
    return test_metrics, record


def log_evaluations(cfg: DictConfig, tracker: Tracker, run_id: str, net: torch.nn.Module, test: ArrayDataset,
                    class_names: list[str], site_scores: list[Scores]) -> list[tuple[str, Scores]]:
    """The selected model on the test split and on each site's own test images, with 95% bootstrap
    intervals (``test/<metric>_low|_high``, ``site_test/<site>/<metric>``), a reliability diagram and
    the model card (``model_card.md``)."""
    probs, labels = class_probabilities(net, test)
    pooled = score(probs, labels, class_names, f"{cfg.data.name} test")
    evaluations = [("internal", pooled), *[("internal", s) for s in site_scores]]
    for prefix, s in [("test", pooled), *[(f"site_test/{class_keys([s.name])[0]}", s) for s in site_scores]]:
        tracker.log_metrics(run_id, metric_values(prefix, s), step=cfg.federation.rounds)
    tracker.log_dict(run_id, evaluation_record(evaluations), "evaluation.json")
    tracker.log_figure(run_id, reliability_figure(pooled.calibration[0], f"{cfg.data.name} test, selected model"),
                       "reliability_test.png")
    counts = tracker.load_json(run_id, "partition/class_counts.json")  # absent for a centralized run
    tracker.log_text(run_id, model_card(cfg, evaluations, name=run_id, training_counts=counts,
                                        privacy=describe(dp_config(cfg))), "model_card.md")
    return evaluations


def log_model(cfg: DictConfig, source, tracker: Tracker, run_id: str, weights: dict[str, torch.Tensor]) -> str:
    """Log the selected model as ``model``: an MLflow pyfunc that takes raw images and returns class
    probabilities (:mod:`fedmed.model_export`), with two test images as its input example."""
    net_cfg = OmegaConf.to_container(cfg.model.net, resolve=True)
    transforms = OmegaConf.to_container(cfg.data.get("transforms") or {}, resolve=True)
    model = ImageClassifier(net_cfg, transforms, source.class_names,  # type: ignore[arg-type]
                            int(cfg.data.get("spatial_dims", 2)), dp_compatible=dp_config(cfg) is not None)
    return log_pyfunc(tracker.tracking_uri, tracker.experiment_id, run_id, model, weights, raw_examples(source),
                      resizes=bool(cfg.data.get("transforms", {}).get("size")))


def audit_model(cfg: DictConfig, net: torch.nn.Module, members: list[ArrayDataset], non_members: list[ArrayDataset],
                kind: str | None = None, epochs: int | None = None) -> list[AttackResult]:
    """Run the configured attacks (``privacy.audit``) against ``net``.

    LiRA's shadow models are trained like the target: the same network, optimiser, batch size
    and DP settings, for ``epochs`` (the epochs behind the selected model; default rounds x local
    epochs), on a training set of the target's size: every training image outside the candidate
    set plus a random half of the candidates.
    """
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
    mx, my = torch.cat([m.x for m in members]), torch.cat([m.y for m in members])
    nx, ny = torch.cat([m.x for m in non_members]), torch.cat([m.y for m in non_members])
    mi, ni = candidates(np.arange(len(mx)), np.arange(len(nx)), int(p.audit_n), cfg.seed)
    x, y = torch.cat([mx[mi], nx[ni]]), torch.cat([my[mi], ny[ni]])
    is_member = np.r_[np.ones(len(mi)), np.zeros(len(ni))]
    net = net.cpu().eval()
    results = [loss_attack(net, x, y, is_member)]
    if kind == "lira":
        n_epochs = epochs or cfg.federation.rounds * cfg.federation.local_epochs
        rest = np.setdiff1d(np.arange(len(mx)), mi)  # training images that are not candidates: in every shadow
        dp = DPConfig.from_config(OmegaConf.to_container(p))  # type: ignore[arg-type]
        trainer_kwargs = {**OmegaConf.to_container(cfg.trainer, resolve=True), "limit_val_batches": 0}  # type: ignore[dict-item]
        holdout = ArrayDataset(nx[:64], ny[:64])  # train_alone wants val data; selection is "last"

        def train_shadow(idx: np.ndarray, seed: int) -> torch.nn.Module:
            train = ArrayDataset(torch.cat([mx[rest], x[idx]]), torch.cat([my[rest], y[idx]]))
            settings = TrainingSettings(cfg.data.batch_size, trainer_kwargs, seed, n_epochs, dp)
            client = SiteClient(f"shadow{seed % 1000}", SiteData(train, holdout), lambda: build_module(cfg), settings)
            weights, _ = client.train_alone(n_epochs, select="last")
            client.module.net.load_state_dict(weights)
            return client.module.net

        log.info("membership audit: training %d shadow models (%d images, %d epochs each) for LiRA",
                 p.audit_shadows, len(rest) + len(x) // 2, n_epochs)
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
