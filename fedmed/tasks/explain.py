"""``fedmed explain``: heatmaps (PNG grids) and faithfulness numbers for a trained model, logged to MLflow."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from fedmed.build import checkpoint_net, load_model_checkpoint
from fedmed.config import site_config
from fedmed.data.datamodule import Pipeline
from fedmed.errors import FedmedError
from fedmed.evaluation.sites import SiteImages
from fedmed.explain import (
    METHODS,
    deletion_insertion,
    explain,
    heatmap_grid,
    predict,
    randomized_copy,
    rank_correlation,
)
from fedmed.explain.localisation import BASELINES, baseline_maps, localisation
from fedmed.explain.localisation import METRICS as LOCALISATION
from fedmed.explain.report import Case, html_report
from fedmed.explain.sampling import stratified_sample
from fedmed.tracking import RunLog, Tracker, run_status

log = logging.getLogger("fedmed")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Explain ``cfg.n`` images of ``cfg.split`` with ``cfg.method``; returns per-method numbers."""
    methods = list(METHODS) if cfg.method == "all" else [cfg.method]
    if any(m not in METHODS for m in methods):
        raise FedmedError(f"method={cfg.method!r} is not one of {', '.join(METHODS)} or all")
    if cfg.target not in ("predicted", "true"):
        raise FedmedError(f"target={cfg.target!r} must be 'predicted' or 'true'")
    tracker = Tracker(cfg.logger.tracking_uri, cfg.logger.experiment, cfg.logger.artifact_location)
    out_root = Path(cfg.output_dir)
    ckpt = load_model_checkpoint(str(cfg.checkpoint), tracker, out_root / "_downloads")
    trained = OmegaConf.create(ckpt["config"])
    if trained.data.name != cfg.data.name:
        raise FedmedError(f"the checkpoint was trained on {trained.data.name!r}, but data={cfg.data.name!r}")
    net = checkpoint_net(ckpt, str(cfg.checkpoint))
    net.eval()
    source = instantiate(cfg.data.source)  # this machine's copy, preprocessed as the model was trained
    site = str(cfg.site.name) if cfg.get("site") else None
    if site is not None:  # one site's images (its own copy; under a natural partition its source's rows)
        source = instantiate(cfg.data.source, root=site_config(cfg, site, "explain").data_root)
        place = SiteImages(site, cfg.data, source, cfg.partition, cfg.split, "")
        place.check()
        rows = place.rows(cfg.split)
    else:
        rows = None
    ds = Pipeline.from_config(trained.data, source).dataset(cfg.split, rows)
    names = list(ckpt.get("class_names") or source.class_names)
    pred_all, conf_all = predict(net, ds.x)

    parent = ckpt.get("run_id")
    run_id = tracker.start_run(
        f"explain-{cfg.method}-{site + '-' if site else ''}{cfg.split}",
        {"role": "explain", "dataset": cfg.data.name, "method": cfg.method, "split": cfg.split,
         "checkpoint": str(cfg.checkpoint)},
        parent_id=parent,
    )
    out = out_root / run_id
    out.mkdir(parents=True, exist_ok=True)
    tracker.log_params(run_id, OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    results: dict[str, dict[str, float]] = {}
    per_class: dict[str, dict[str, dict[str, float]]] = {}
    randomized = randomized_copy(net, cfg.seed) if cfg.faithfulness else None
    with run_status(RunLog(tracker, run_id)):
        idx = stratified_sample(ds.y, cfg.n, cfg.seed)
        x, y = ds.x[idx], ds.y[idx]
        chosen = idx.numpy() if rows is None else rows[idx.numpy()]  # rows of the split
        masks = _masks(trained, source, cfg.split, chosen)  # evidence masks, where the data has them
        for method in methods:
            targets = pred_all[idx] if cfg.target == "predicted" else y
            t0 = time.perf_counter()
            maps = explain(net, x, method, targets)
            row = {"maps_per_second": len(x) / (time.perf_counter() - t0)}
            if method == methods[0]:
                shown = maps  # the report's maps
            title = f"{method} on {cfg.data.name} {cfg.split} (target: {cfg.target} class)"
            _save(tracker, run_id, out, f"{method}_{cfg.split}.png",
                  heatmap_grid(x, maps, y, pred_all[idx], conf_all[idx], names, title))
            if cfg.faithfulness:
                d, i = deletion_insertion(net, x, maps, targets, seed=cfg.seed)
                assert randomized is not None
                rho = rank_correlation(maps, explain(randomized, x, method, targets))
                row.update(deletion_auc=float(d.mean()), insertion_auc=float(i.mean()),
                           sanity_rank_corr=float(rho.mean()))
            if cfg.per_class:
                _per_class(cfg, net, ds, pred_all, conf_all, names, method, tracker, run_id, out)
            if masks is not None:
                loc = localisation(maps, masks)
                row.update({k: float(v.nanmean()) for k, v in loc.items()})
                per_class[method] = {names[c]: {k: float(v[y == c].nanmean()) for k, v in loc.items()}
                                     for c in range(len(names)) if (y == c).any()}
            results[method] = row
            key = method.replace("+", "p")  # MLflow metric names take no '+': gradcam++ -> gradcampp
            tracker.log_metrics(run_id, {f"{key}/{k}": v for k, v in row.items()}, step=0)
            log.info("%s: %s", method, ", ".join(f"{k}={v:.3f}" for k, v in row.items()))
        if masks is not None:  # what a map earns without a model: noise, and "look at the middle"
            for kind in BASELINES:
                loc = localisation(baseline_maps(kind, tuple(masks.shape), cfg.seed), masks)
                base = results[f"baseline: {kind}"] = {k: float(v.nanmean()) for k, v in loc.items()}
                tracker.log_metrics(run_id, {f"baseline_{kind}/{k}": v for k, v in base.items()}, step=0)
            tracker.log_dict(run_id, per_class, "localisation_per_class.json")
        tracker.log_dict(run_id, results, "faithfulness.json")
        if cfg.report:
            path = _report(cfg, tracker, run_id, out, source, chosen, shown, y, pred_all[idx], conf_all[idx], targets,
                           methods[0], names, results, masks, site, parent)
            log.info("clinician report: %s", path)
        _print_table(cfg, results, out, run_id)
    return {"run_id": run_id, "output_dir": str(out), "methods": results}


def _masks(trained: DictConfig, source, split: str, rows: np.ndarray) -> torch.Tensor | None:
    """The evidence masks of the explained images (N, *spatial), through the model's preprocessing; None where
    the data has none."""
    pipeline = Pipeline.from_config(trained.data, source)
    return pipeline.masks(split, rows)[:, 0] if pipeline.has_masks else None


def _report(cfg, tracker: Tracker, run_id: str, out: Path, source, rows: np.ndarray, maps: torch.Tensor, y, pred,
            conf, targets, method: str, names: list[str], results: dict, masks, site: str | None,
            model_run: str | None) -> Path:
    """The HTML report of the explained sample (``maps`` of ``method`` for the classes ``targets``): every case at
    its native resolution, grouped per class, under the sample's numbers; logged to this run and, where it
    exists, to the site's run of the model's federation."""
    from PIL import Image

    items = source.items(cfg.split, rows)
    mask_items = getattr(source, "mask_items", lambda *_: None)(cfg.split, rows)
    cases = []
    for i, it in enumerate(items):
        image = np.asarray(Image.open(it["path"]).convert("RGB"))
        mask = np.asarray(Image.open(mask_items[i]["path"]).convert("L")) > 127 if mask_items else None
        cases.append(Case(image, maps[i].numpy(), mask, names[int(y[i])], names[int(pred[i])],
                          names[int(targets[i])], float(conf[i]), Path(it["path"]).stem))
    keep = {"pointing_game", "relevance_mass", "relevance_rank", "top_iou", "deletion_auc", "insertion_auc"}
    numbers = {name: {k: v for k, v in row.items() if k in keep} for name, row in results.items()
               if name == method or name.startswith("baseline")}
    explained = "the class it predicted" if cfg.target == "predicted" else "the true class"
    notes = [f"Each heatmap shows where the model found evidence for {explained} (brighter: more). "
             "The cyan line is the expert's lesion outline."]
    if masks is not None:
        ours, centre = results[method]["relevance_mass"], results["baseline: centre"]["relevance_mass"]
        notes.append(f"Pointing game: share of images whose brightest point lies inside the outline. Relevance mass: "
                     f"share of the heat inside it. A map that ignores the image and always lights up the centre "
                     f"scores the 'baseline: centre' row; random noise scores the 'baseline: random' row. Here "
                     f"{method} puts {ours:.0%} of its heat inside the outlines, the centre alone {centre:.0%}: "
                     + ("the maps point at the lesions more than the centre does." if ours > centre else
                        "the maps do not point at the lesions more than a fixed centre spot does."))
    notes.append("Deletion AUC (lower is better) and insertion AUC (higher): how fast the model's confidence falls "
                 "as the brightest pixels are removed, or rises as they are revealed.")
    title = f"{method} explanations of {cfg.data.name} {cfg.split} images" + (f" at {site}" if site else "")
    page = html_report(title, site or "all", cases, names, numbers, notes)
    path = out / "report.html"
    path.write_text(page)
    tracker.log_text(run_id, page, "report.html")
    if site and model_run:
        runs = tracker.client.search_runs([tracker.experiment_id], f"tags.mlflow.parentRunId = '{model_run}' "
                                                                   f"and tags.site = '{site}'")
        if runs:
            tracker.log_text(runs[0].info.run_id, page, f"report/{method}_{cfg.split}.html")
    return path


def _save(tracker: Tracker, run_id: str, out: Path, name: str, fig) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(out / name)
    tracker.log_figure(run_id, fig, f"heatmaps/{name}")
    plt.close(fig)


def _per_class(cfg, net, ds, pred_all, conf_all, names, method, tracker, run_id, out) -> None:
    """For each class: grids of correctly and wrongly classified examples (as in the seed studies)."""
    g = torch.Generator().manual_seed(cfg.seed)
    for c, name in enumerate(names):
        for kind, sel in (("correct", (ds.y == c) & (pred_all == c)), ("misclassified", (ds.y == c) & (pred_all != c))):
            pool = sel.nonzero().flatten()
            if len(pool) == 0:
                continue
            pick = pool[torch.randperm(len(pool), generator=g)[: cfg.per_class]]
            targets = pred_all[pick] if cfg.target == "predicted" else ds.y[pick]
            maps = explain(net, ds.x[pick], method, targets)
            title = f"{method}: true {name}, {kind} ({len(pool)} in {cfg.split})"
            _save(tracker, run_id, out, f"{method}_{cfg.split}_{name}_{kind}.png",
                  heatmap_grid(ds.x[pick], maps, ds.y[pick], pred_all[pick], conf_all[pick], names, title))


def _print_table(cfg, results, out: Path, run_id: str) -> None:
    table = Table(title=f"fedmed explain: {cfg.data.name} {cfg.split}, n={cfg.n}, target={cfg.target}",
                  title_justify="left")
    cols = ["deletion_auc", "insertion_auc", "sanity_rank_corr", "maps_per_second"]
    if any("pointing_game" in row for row in results.values()):
        cols[3:3] = list(LOCALISATION)
    table.add_column("method", no_wrap=True)
    short = {"deletion_auc": "del. AUC", "insertion_auc": "ins. AUC", "sanity_rank_corr": "sanity rho",
             "pointing_game": "pointing", "relevance_mass": "rel. mass", "relevance_rank": "rel. rank",
             "top_iou": "top IoU", "maps_per_second": "maps/s"}
    for c in cols:
        table.add_column(short.get(c, c), justify="right", no_wrap=True)
    for m, row in results.items():
        table.add_row(m, *(f"{row[c]:.3f}" if c in row else "-" for c in cols))
    console = Console() if Console().is_terminal else Console(width=120)
    console.print(table)
    console.print("deletion AUC: lower is better; insertion AUC: higher; sanity rank corr (trained vs randomised "
                  "model): low means the maps depend on what the model learned.")
    if any("pointing_game" in row for row in results.values()):
        console.print("against the expert masks: pointing game (the map's maximum inside), relevance mass (share of "
                      "relevance inside), relevance rank (share of the top |mask| pixels inside), top IoU (top 25% of "
                      "pixels vs the mask); higher is better. A method localises only where it beats the centre "
                      "prior, a Gaussian at the image centre.")
    console.print(f"figures: {out}\nMLflow run {run_id}")
