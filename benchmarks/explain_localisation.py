"""Benchmark: do the models look at the lesion? Explanations against HAM10000's expert lesion masks.

For each seed: FedAvg over the four acquisition sources, centralized training, and each source
alone (`experiment=ham10000`; a local run already in ``bench_out/leave_one_site_out.json`` with the
same settings is reused). Each model's heatmaps of a class-stratified sample of every source's test
lesions (explaining the predicted class) are scored against the lesion masks: pointing game and
relevance mass (``fedmed.explain.localisation``), per source and pooled, for correctly and wrongly
classified images, beside a random map and a centre prior (a centred Gaussian) on the same images;
and the model-randomisation sanity check (Adebayo et al. 2018): the rank correlation of each map
with the map of the same network with re-initialised weights (near 0: the map depends on what was
learned).

Usage:
    FEDMED_DATA_DIR=../shared/data OMP_NUM_THREADS=1 python benchmarks/explain_localisation.py \
        [--seeds 42] [--methods gradcam saliency gradientshap] [--n 48] [--results <file>]
        [--label-randomisation]   # only the data randomisation test (Adebayo et al. 2018) of the centralized model
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from results import ms, save_json

from fedmed.config import compose
from fedmed.logs import setup_logging

SOURCES = ("rosendahl", "vidir_modern", "vidir_molemax", "vienna_dias")
BASE = ["experiment=ham10000", "logger.experiment=benchmark-loso", "logger.log_model=false",
        "privacy.audit=none", "explain.every_n_rounds=0"]


def trained(seed: int, kind: str, site: str | None) -> str:
    """The run id of a model (trained here unless the leave-one-site-out benchmark has it)."""
    from fedmed.tasks import fit

    loso = Path("bench_out") / "leave_one_site_out.json"
    if kind == "local" and loso.exists():
        done = json.loads(loso.read_text()).get(f"local:{site}:{seed}")
        if done:
            return str(done["run_id"])
    mine = Path("bench_out") / "explain_localisation_runs.json"
    runs = json.loads(mine.read_text()) if mine.exists() else {}
    key = f"{kind}:{site}:{seed}"
    if key not in runs:
        extra = {"federated": [], "centralized": ["mode=centralized"], "local": [f"site={site}"]}[kind]
        runs[key] = fit.run(compose("fit", [*BASE, f"seed={seed}", *extra]))["run_id"]
        save_json("explain_localisation_runs", runs)
    return str(runs[key])


def shuffled_labels(seed: int) -> str:
    """The run id of a centralized model trained on HAM10000 with its labels randomly permuted (the data
    randomisation test of Adebayo et al. 2018): a copy of the label table with the label column shuffled."""
    import pandas as pd

    from fedmed.tasks import fit

    mine = Path("bench_out") / "explain_localisation_runs.json"
    runs = json.loads(mine.read_text()) if mine.exists() else {}
    key = f"shuffled:centralized:{seed}"
    if key not in runs:
        cfg = compose("fit", BASE)
        table = pd.read_csv(Path(cfg.data.source.root) / cfg.data.source.table)
        table["label"] = np.random.default_rng(seed).permutation(table["label"].to_numpy())
        path = Path("bench_out").resolve() / f"ham10000_labels_shuffled_{seed}.csv"
        path.parent.mkdir(exist_ok=True)
        table.to_csv(path, index=False)
        runs[key] = fit.run(compose("fit", [*BASE, f"seed={seed}", "mode=centralized", f"data.source.table={path}",
                                            f"partition.dirname=labels-shuffled-{seed}"]))["run_id"]
        save_json("explain_localisation_runs", runs)
    return str(runs[key])


def sample_images(n: int):
    """A class-stratified sample of each source's test lesions (the same for every model): images, labels, masks."""
    from hydra.utils import instantiate

    from fedmed.data.datamodule import Pipeline
    from fedmed.explain.sampling import stratified_sample

    cfg = compose("fit", BASE)
    source = instantiate(cfg.data.source)
    pipeline = Pipeline.from_config(cfg.data, source)
    where = np.asarray(source.column("test", "source"))
    images = {}
    for s in SOURCES:
        rows = np.flatnonzero(where == s)
        ds = pipeline.dataset("test", rows)
        pick = stratified_sample(ds.y, n, 0).numpy()
        images[s] = (ds.x[pick], ds.y[pick], pipeline.masks("test", rows[pick])[:, 0])
    return cfg, images


def label_randomisation(args) -> list[dict]:
    """The centralized model's maps against those of the same network trained on permuted labels, on the same
    images, explaining the class the real model predicts: Spearman rank correlation per image (near 0: the
    maps depend on the labels the model learned)."""
    from fedmed.build import checkpoint_net, load_model_checkpoint
    from fedmed.explain import explain, predict, rank_correlation
    from fedmed.models.metrics import balanced_accuracy
    from fedmed.tracking import Tracker

    cfg, images = sample_images(args.n)
    tracker = Tracker(cfg.logger.tracking_uri, cfg.logger.experiment, cfg.logger.artifact_location)
    out = []
    for seed in args.seeds:
        nets = {}
        for kind, run_id in (("centralized", trained(seed, "centralized", None)), ("shuffled", shuffled_labels(seed))):
            ckpt = load_model_checkpoint(f"runs:/{run_id}", tracker, Path(".cache") / "study")
            nets[kind] = checkpoint_net(ckpt, run_id).eval()
        for method in args.methods:
            row = {"seed": seed, "method": method, "sites": {}}
            for s, (x, y, _) in images.items():
                pred, _ = predict(nets["centralized"], x)
                shuffled_pred, _ = predict(nets["shuffled"], x)
                rho = rank_correlation(explain(nets["centralized"], x, method, pred),
                                       explain(nets["shuffled"], x, method, pred))
                mat = torch.zeros(7, 7)
                for t, q in zip(y.tolist(), shuffled_pred.tolist(), strict=True):
                    mat[t, q] += 1
                row["sites"][s] = {"rank_corr": float(rho.mean()), "n": len(y),
                                   "shuffled_model_balanced_acc": balanced_accuracy(mat)}
            out.append(row)
            save_json("explain_label_randomisation", out)
            print(f"seed {seed} {method:<14} label randomisation rank corr "
                  f"{np.mean([v['rank_corr'] for v in row['sites'].values()]):.3f}", flush=True)
    return out


def study(args) -> list[dict]:
    from fedmed.build import checkpoint_net, load_model_checkpoint
    from fedmed.explain import explain, predict, randomized_copy, rank_correlation
    from fedmed.explain.localisation import baseline_maps, localisation
    from fedmed.tracking import Tracker

    cfg, images = sample_images(args.n)
    tracker = Tracker(cfg.logger.tracking_uri, cfg.logger.experiment, cfg.logger.artifact_location)
    out = []
    for seed in args.seeds:
        models = [("federated", None), ("centralized", None), *[("local", s) for s in SOURCES]]
        for kind, site in models:
            run_id = trained(seed, kind, site)
            ckpt = load_model_checkpoint(f"runs:/{run_id}", tracker, Path(".cache") / "study")
            net = checkpoint_net(ckpt, run_id).eval()
            shuffled = randomized_copy(net, seed)
            for method in args.methods:
                t0 = time.perf_counter()
                row = {"seed": seed, "model": kind if site is None else f"{site} alone", "method": method,
                       "run_id": run_id, "sites": {}}
                for s, (x, y, m) in images.items():
                    pred, _ = predict(net, x)
                    maps = explain(net, x, method, pred)
                    loc = localisation(maps, m)
                    right, mass = pred == y, loc["relevance_mass"]
                    rho = rank_correlation(maps, explain(shuffled, x, method, pred))
                    row["sites"][s] = {
                        "pointing_game": float(loc["pointing_game"].nanmean()),
                        "relevance_mass": float(loc["relevance_mass"].nanmean()),
                        "relevance_mass_correct": float(mass[right].nanmean()) if right.any() else None,
                        "relevance_mass_wrong": float(mass[~right].nanmean()) if (~right).any() else None,
                        "sanity_rank_corr": float(rho.mean()), "n": len(y), "correct": int(right.sum()),
                        **{f"{b}_{k}": float(localisation(baseline_maps(b, tuple(m.shape), seed), m)[k].nanmean())
                           for b in ("random", "centre") for k in ("pointing_game", "relevance_mass")}}
                row["seconds"] = time.perf_counter() - t0
                out.append(row)
                save_json("explain_localisation", out)
                pooled = {k: np.mean([v[k] for v in row["sites"].values()])
                          for k in ("pointing_game", "relevance_mass")}
                print(f"seed {seed} {row['model']:<22} {method:<14} pointing {pooled['pointing_game']:.3f} "
                      f"mass {pooled['relevance_mass']:.3f} ({row['seconds']:.0f}s)", flush=True)
    return out


def table(rows: list[dict], methods: list[str]) -> tuple[list[str], list[list[str]]]:
    columns = ["model", "method", "pointing game (all sites)", "relevance mass (all sites)",
               *[f"relevance mass @ {s}" for s in SOURCES], "mass: correct / wrong", "sanity rank corr"]
    out = []
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["method"]), []).append(r)
    for (model, method), rs in groups.items():
        def over(key: str, rs=rs) -> list[float]:
            return [float(np.mean([v[key] for v in r["sites"].values() if v[key] is not None])) for r in rs]
        out.append([model, method, ms(over("pointing_game")), ms(over("relevance_mass")),
                    *[ms([r["sites"][s]["relevance_mass"] for r in rs]) for s in SOURCES],
                    f"{np.mean(over('relevance_mass_correct')):.3f} / {np.mean(over('relevance_mass_wrong')):.3f}",
                    ms(over("sanity_rank_corr"))])
    first = rows[0]
    for b in ("random", "centre"):
        out.append([f"baseline: {b}", "-", ms([np.mean([v[f"{b}_pointing_game"] for v in first["sites"].values()])]),
                    ms([np.mean([v[f"{b}_relevance_mass"] for v in first["sites"].values()])]),
                    *[ms([first["sites"][s][f"{b}_relevance_mass"]]) for s in SOURCES], "-", "-"])
    return columns, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[42])
    ap.add_argument("--methods", nargs="+", default=["gradcam", "saliency", "gradientshap"])
    ap.add_argument("--n", type=int, default=48, help="test lesions explained per source")
    ap.add_argument("--only", action="store_true", help="print the table of what bench_out holds")
    ap.add_argument("--results", type=Path, default=None)
    ap.add_argument("--label-randomisation", action="store_true",
                    help="only the data randomisation test of the centralized model (a model trained on permuted "
                    "labels); --results then gets its table")
    args = ap.parse_args()
    setup_logging()
    if args.label_randomisation:
        rows = label_randomisation(args)
        columns = ["seed", "method", "rank corr (all sites)", *[f"rank corr @ {s}" for s in SOURCES],
                   "permuted-label model: bal. ACC (all sites)"]
        out = [[str(r["seed"]), r["method"], f"{np.mean([v['rank_corr'] for v in r['sites'].values()]):.3f}",
                *[f"{r['sites'][s]['rank_corr']:.3f}" for s in SOURCES],
                f"{np.mean([v['shuffled_model_balanced_acc'] for v in r['sites'].values()]):.3f}"] for r in rows]
        publish(columns, out, rows, args.results)
        return
    path = Path("bench_out") / "explain_localisation.json"
    rows = json.loads(path.read_text()) if args.only else study(args)
    publish(*table(rows, args.methods), rows, args.results)


def publish(columns: list[str], out: list[list[str]], rows: list[dict], results: Path | None) -> None:
    """Print the table; with ``results``, also put it (and the seeds) into that Results page file."""
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for r in out:
        print("| " + " | ".join(r) + " |")
    if results:
        doc = json.loads(results.read_text()) if results.exists() else {}
        doc.update({"columns": columns, "rows": out, "seeds": sorted({r["seed"] for r in rows})})
        results.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
