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
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
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


def study(args) -> list[dict]:
    from hydra.utils import instantiate

    from fedmed.build import checkpoint_net, load_model_checkpoint
    from fedmed.data.datamodule import Pipeline
    from fedmed.explain import explain, predict, randomized_copy, rank_correlation
    from fedmed.explain.localisation import baseline_maps, localisation
    from fedmed.explain.sampling import stratified_sample
    from fedmed.tracking import Tracker

    cfg = compose("fit", BASE)
    source = instantiate(cfg.data.source)
    pipeline = Pipeline.from_config(cfg.data, source)
    where = np.asarray(source.column("test", "source"))
    images = {}
    for s in SOURCES:  # a class-stratified sample of each source's test lesions, the same for every model
        rows = np.flatnonzero(where == s)
        ds = pipeline.dataset("test", rows)
        pick = stratified_sample(ds.y, args.n, 0).numpy()
        images[s] = (ds.x[pick], ds.y[pick], pipeline.masks("test", rows[pick])[:, 0])
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
    args = ap.parse_args()
    setup_logging()
    path = Path("bench_out") / "explain_localisation.json"
    rows = json.loads(path.read_text()) if args.only else study(args)
    columns, out = table(rows, args.methods)
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for r in out:
        print("| " + " | ".join(r) + " |")
    if args.results:
        doc = json.loads(args.results.read_text()) if args.results.exists() else {}
        doc.update({"columns": columns, "rows": out, "seeds": sorted({r["seed"] for r in rows})})
        args.results.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
