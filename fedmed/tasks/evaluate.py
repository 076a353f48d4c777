"""``fedmed evaluate``: a trained model on a data set, one site's images, or each site's own images.

Every figure comes with a stratified bootstrap interval; each site scores the model where its images
are and hands over only :class:`~fedmed.evaluation.Scores` (counts, no image), which are pooled.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from fedmed.build import checkpoint_net, dp_config, load_model_checkpoint
from fedmed.config import site_config
from fedmed.errors import FedmedError
from fedmed.evaluation import Scores, interval_table, model_card, pool, reliability_figure, score
from fedmed.evaluation.predict import class_probabilities
from fedmed.evaluation.record import evaluation_record, metric_values
from fedmed.evaluation.scores import LABELS, fmt
from fedmed.evaluation.sites import SiteImages, trained_on
from fedmed.models.metrics import class_keys
from fedmed.privacy.dp import describe
from fedmed.reporting import confusion_figure
from fedmed.tracking import RunLog, Tracker, run_status

log = logging.getLogger("fedmed")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Score ``cfg.checkpoint``; returns the run id and, per data set scored, metric -> {value, low, high}."""
    if cfg.split not in ("train", "val", "test", "all"):
        raise FedmedError(f"split={cfg.split!r} must be train, val, test or all")
    if cfg.get("site") and cfg.sites:
        raise FedmedError("give site=<name> (one site) or sites=all|[...] (each site), not both")
    tracker = Tracker(cfg.logger.tracking_uri, cfg.logger.experiment, cfg.logger.artifact_location)
    ckpt = load_model_checkpoint(str(cfg.checkpoint), tracker, Path(cfg.paths.output_dir) / ".cache" / "evaluate")
    trained = OmegaConf.create(ckpt["config"])
    source = instantiate(cfg.data.source)
    names = list(ckpt.get("class_names") or [])
    _check_fit(trained, cfg, names, source)
    where = _where(cfg, trained, source)  # every site named is checked before any image is read
    net = checkpoint_net(ckpt, str(cfg.checkpoint))
    parts: list[tuple[str, Scores]] = []
    for place in where:  # each site scores where its images are; only Scores leave it
        data = place.dataset(trained.data)
        probs, labels = class_probabilities(net, data)
        parts.append((place.kind, score(probs, labels, names, place.name, int(cfg.n_boot), int(cfg.seed),
                                        int(cfg.bins))))
        log.info("%s: %d images scored", place.name, len(labels))
    if len(parts) > 1:
        kinds = {k for k, _ in parts}
        parts.append((kinds.pop() if len(kinds) == 1 else "mixed", pool([s for _, s in parts])))
    run_id = _log(cfg, tracker, ckpt, trained, parts)
    _print(cfg, parts, run_id)
    return {"run_id": run_id, "scores": {s.name: s.summary() for _, s in parts},
            "images": {s.name: int(s.support.sum()) for _, s in parts}}


def _check_fit(trained: DictConfig, cfg: DictConfig, names: list[str], source) -> None:
    """Refuse, in one line, a model whose classes, channels or dimensions are not the data's."""
    data = cfg.data
    if int(trained.data.num_classes) != int(data.num_classes) or (names and names != list(source.class_names)):
        raise FedmedError(f"checkpoint={cfg.checkpoint} predicts {trained.data.num_classes} classes "
                          f"{names or ''} but data={data.name} has {data.num_classes}: {list(source.class_names)}")
    got, want = int(data.transforms.channels), int(trained.data.transforms.channels)
    if got != want or int(data.get("spatial_dims", 2)) != int(trained.data.get("spatial_dims", 2)):
        raise FedmedError(f"checkpoint={cfg.checkpoint} takes {want}-channel {trained.data.get('spatial_dims', 2)}D "
                          f"input; data={data.name} is {got}-channel {data.get('spatial_dims', 2)}D")


def _where(cfg: DictConfig, trained: DictConfig, source) -> list[SiteImages]:
    """The data sets to score: the whole split, one site's images, or each site's."""
    if not cfg.get("site") and not cfg.sites:
        if cfg.split == "all":
            raise FedmedError("split=all scores every image of a site the model never trained on: give site=<name>")
        kind = "internal" if cfg.data.name == trained.data.name else "external"
        return [SiteImages(f"{cfg.data.name} {cfg.split}", cfg.data, source, None, cfg.split, kind)]
    if cfg.sites == "all":
        sites = [str(s) for s in cfg.federation.sites]
    else:
        sites = [str(cfg.site.name)] if cfg.get("site") else [str(s) for s in cfg.sites]
    out = []
    for name in sites:
        site = site_config(cfg, name, "evaluate")
        own = instantiate(cfg.data.source, root=site.data_root)
        used = trained_on(trained, name, cfg.data.name)
        if used and cfg.split != "test":
            what = "images" if cfg.split == "all" else f"{cfg.split} images"
            raise FedmedError(f"site={name}: the model trained on this site's {what}; score its test images "
                              "(split=test)")
        out.append(SiteImages(name, cfg.data, own, cfg.partition, cfg.split, "internal" if used else "external"))
        out[-1].check()
    return out


def _log(cfg: DictConfig, tracker: Tracker, ckpt: dict, trained: DictConfig, parts: list[tuple[str, Scores]]) -> str:
    model_run = ckpt.get("run_id")
    label = cfg.site.name if cfg.get("site") else ("sites" if cfg.sites else cfg.split)
    run_id = tracker.start_run(f"evaluate-{cfg.data.name}-{label}",
                               {"role": "evaluate", "dataset": cfg.data.name, "checkpoint": str(cfg.checkpoint),
                                "model_run_id": str(model_run or "")}, parent_id=model_run)
    with run_status(RunLog(tracker, run_id)):
        tracker.log_params(run_id, {k: cfg[k] for k in ("checkpoint", "sites", "split", "n_boot", "seed", "bins")}
                           | {"data": cfg.data.name, "site": cfg.site.name if cfg.get("site") else None})
        out = Path(cfg.output_dir) / run_id
        out.mkdir(parents=True, exist_ok=True)
        for _, s in parts:
            key = class_keys([s.name])[0]
            tracker.log_metrics(run_id, metric_values(key, s), step=0)
            title = f"{trained.data.name} model on {s.name} (n={int(s.support.sum())})"
            tracker.log_figure(run_id, reliability_figure(s.calibration[0], title), f"reliability_{key}.png")
            tracker.log_figure(run_id, confusion_figure(torch.as_tensor(s.confmat[0]), s.class_names, title),
                               f"confusion_matrix_{key}.png")
        tracker.log_dict(run_id, evaluation_record(parts), "evaluation.json")
        counts = tracker.load_json(model_run, "partition/class_counts.json") if model_run else None
        card = model_card(trained, [(k, s) for k, s in parts if s.name != "pooled" or len(parts) == 1],
                          name=_model_name(tracker, model_run) or str(cfg.checkpoint), training_counts=counts,
                          privacy=describe(dp_config(trained)), command=cfg.get("reproduce"))
        (out / "model_card.md").write_text(card)
        tracker.log_text(run_id, card, "model_card.md")
    return run_id


def _model_name(tracker: Tracker, model_run: str | None) -> str | None:
    """The MLflow name of the model's run (e.g. ``federated-ham10000-cnn-fedavg-s42-...``), where this store has it."""
    try:
        return f"{tracker.client.get_run(model_run).info.run_name} (MLflow run {model_run})" if model_run else None
    except Exception:  # noqa: BLE001 - a model from another store
        return None


def _print(cfg: DictConfig, parts: list[tuple[str, Scores]], run_id: str) -> None:
    console = Console() if Console().is_terminal else Console(width=150)
    header, rows = interval_table([s for _, s in parts])
    table = Table(title=f"fedmed evaluate {cfg.checkpoint} on {cfg.data.name} ({cfg.split})\n95% intervals: "
                        f"{cfg.n_boot} bootstrap resamples within each class, seed {cfg.seed}", title_justify="left")
    for h in ["kind", *header]:
        table.add_column(h, no_wrap=True)
    for (kind, _), row in zip(parts, rows, strict=True):
        table.add_row(kind, *row)
    console.print(table)
    for _, s in parts:
        summary = s.summary()
        per = Table(title=f"{s.name}: per class", title_justify="left")
        for h in ("class", "images", "recall", "precision", "F1", "AUROC"):
            per.add_column(h, no_wrap=True)
        for c, key, n in zip(s.class_names, class_keys(s.class_names), s.support, strict=True):
            per.add_row(c, str(int(n)), *[fmt(summary[f"{m}_{key}"]) for m in ("recall", "precision", "f1", "auroc")])
        console.print(per)
    sites = [s for _, s in parts if s.name != "pooled"]
    if len(sites) > 1:
        bal = {s.name: s.summary()["balanced_acc"]["value"] for s in sites}
        worst = min(bal, key=bal.get)  # type: ignore[arg-type]
        console.print(f"spread between sites ({LABELS['balanced_acc']}): {max(bal.values()) - min(bal.values()):.3f}; "
                      f"worst site: {worst} ({bal[worst]:.3f})")
    pooled = " The pooled AUROC needs the sites' scores, which stay at the sites: not formed." if len(sites) > 1 else ""
    console.print(f"bal. ACC: mean recall over the classes; ECE: expected calibration error (lower is better).{pooled}"
                  f"\nMLflow run {run_id} (model_card.md, evaluation.json, reliability and confusion plots)")
