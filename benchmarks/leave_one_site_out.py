"""Benchmark: external validation on HAM10000's four acquisition sources, leave one site out.

For each held-out source ``h`` and seed: FedAvg over the other three sources, pooled (centralized)
training on the same three (``data.source.keep``: only their rows; the split of every kept row is
the one it has in the whole table), and every source alone. Each model is then scored with
``fedmed evaluate`` on the images of ``h`` (a site none of them trained on): all of ``h``'s images
(``split=all``) and, for comparison with the internal figures, ``h``'s test lesions only; and on
the pooled test lesions of the sites it trained on (internal). Selection is on the training sites'
validation images only; ``h`` is never looked at before the final score.

Usage:
    FEDMED_DATA_DIR=../shared/data OMP_NUM_THREADS=1 python benchmarks/leave_one_site_out.py \
        [--seeds 42 43 44] [--held-out vienna_dias ...] [--phase train|evaluate|all] [override ...]

Training runs go to bench_out/<name>.json as they finish (a run already there is not run again),
so several processes may each take some seeds. ``--phase evaluate`` scores every trained run
and prints (and with ``--results``, writes) the table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from results import ms, save_json

from fedmed.config import compose
from fedmed.logs import setup_logging

SOURCES = ("rosendahl", "vidir_modern", "vidir_molemax", "vienna_dias")
BASE = ["experiment=ham10000", "logger.experiment=benchmark-loso", "logger.log_model=false",
        "privacy.audit=none", "explain.every_n_rounds=0"]


def train_overrides(kind: str, held_out: str | None, seed: int, site: str | None = None) -> list[str]:
    """The `fedmed fit` overrides of one run: ``federated`` / ``pooled`` without ``held_out``, ``local`` at ``site``."""
    if kind == "local":
        return [*BASE, f"seed={seed}", f"site={site}"]
    three = [s for s in SOURCES if s != held_out]
    keep = [f"data.source.keep={{source: [{', '.join(three)}]}}"]
    if kind == "pooled":
        return [*BASE, f"seed={seed}", *keep, "mode=centralized"]
    return [*BASE, f"seed={seed}", *keep, f"federation.sites=[{','.join(three)}]",
            f"partition.dirname=natural-source-without-{held_out}"]


def plan(seeds: list[int], held_out: list[str]) -> list[dict]:
    runs = []
    for seed in seeds:
        for h in held_out:
            runs += [{"kind": k, "held_out": h, "seed": seed, "site": None} for k in ("federated", "pooled")]
        runs += [{"kind": "local", "held_out": None, "seed": seed, "site": s} for s in SOURCES]
    return runs


def key(run: dict) -> str:
    return f"{run['kind']}:{run['held_out'] or run['site']}:{run['seed']}"


def train(args, extra: list[str]) -> None:
    from fedmed.tasks import fit

    path = Path("bench_out") / f"{args.name}.json"
    runs = plan(args.seeds, args.held_out)
    for run in reversed(runs) if args.reverse else runs:
        done = json.loads(path.read_text()) if path.exists() else {}
        if key(run) in done:
            continue
        overrides = [*train_overrides(run["kind"], run["held_out"], run["seed"], run["site"]), *extra]
        t0 = time.perf_counter()
        res = fit.run(compose("fit", overrides))
        done = json.loads(path.read_text()) if path.exists() else {}  # another process may have added runs
        done[key(run)] = {**run, "run_id": res["run_id"], "selected": res["selected"], "overrides": overrides,
                          "seconds": time.perf_counter() - t0}
        save_json(args.name, done)
        print(f"{key(run)}: selected {res['selected']}, {time.perf_counter() - t0:.0f}s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[42])
    ap.add_argument("--held-out", nargs="+", default=list(SOURCES), choices=SOURCES)
    ap.add_argument("--phase", choices=("train", "evaluate", "all"), default="all")
    ap.add_argument("--reverse", action="store_true", help="train the planned runs last to first (a second process)")
    ap.add_argument("--name", default="leave_one_site_out")
    ap.add_argument("--results", type=Path, default=None, help="write the table into this benchmarks/results/*.json")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides applied to every training run")
    args = ap.parse_args()
    setup_logging()
    if args.phase in ("train", "all"):
        train(args, args.overrides)
    if args.phase in ("evaluate", "all"):
        evaluate(args)


def scored(run: dict, cache: Path) -> dict:
    """`fedmed evaluate` of one trained run: external (sites it never trained on, every image) and internal
    (its training sites' test lesions), each with its 95% bootstrap interval; cached in bench_out."""
    from fedmed.tasks import evaluate

    key_ = f"{key(run)}:{run['run_id']}"
    done = json.loads(cache.read_text()) if cache.exists() else {}
    if key_ in done:
        return done[key_]
    trained_at = [run["site"]] if run["kind"] == "local" else [s for s in SOURCES if s != run["held_out"]]
    unseen = [s for s in SOURCES if s not in trained_at]
    base = [f"checkpoint=runs:/{run['run_id']}", "data=ham10000", "data.cache=disk", "logger.experiment=benchmark-loso"]
    ext = evaluate.run(compose("evaluate", [*base, f"sites=[{','.join(unseen)}]", "split=all"]))
    internal = evaluate.run(compose("evaluate", [*base, f"sites=[{','.join(trained_at)}]", "split=test"]))
    pooled = "pooled" if len(trained_at) > 1 else trained_at[0]
    out = {"external": {s: ext["scores"][s] for s in unseen}, "images": ext["images"],
           "internal": internal["scores"][pooled], "evaluate_runs": [ext["run_id"], internal["run_id"]]}
    done[key_] = out
    cache.write_text(json.dumps(done, indent=1))
    return out


def evaluate(args) -> None:
    runs = json.loads((Path("bench_out") / f"{args.name}.json").read_text())
    cache = Path("bench_out") / f"{args.name}_scores.json"
    for run in runs.values():
        run["scores"] = scored(run, cache)
    seeds = sorted({r["seed"] for r in runs.values()})
    columns = ["held-out site", "images", "federated (3 sites): internal", "federated: at the held-out site",
               "pooled (3 sites): internal", "pooled: at the held-out site", "each site alone: at the held-out site",
               "federated at the held-out site, seed 42 (95% CI)"]
    rows = []
    for h in args.held_out:
        fed = [r for r in runs.values() if r["kind"] == "federated" and r["held_out"] == h]
        pooled = [r for r in runs.values() if r["kind"] == "pooled" and r["held_out"] == h]
        alone = [r["scores"]["external"][h]["balanced_acc"]["value"] for r in runs.values()
                 if r["kind"] == "local" and r["site"] != h]
        ext = [[r["scores"]["external"][h]["balanced_acc"]["value"] for r in rs] for rs in (fed, pooled)]
        internal = [[r["scores"]["internal"]["balanced_acc"]["value"] for r in rs] for rs in (fed, pooled)]
        ci = [r["scores"]["external"][h]["balanced_acc"] for r in fed if r["seed"] == 42]
        rows.append([h, str(fed[0]["scores"]["images"][h]) if fed else "-",
                     *(ms(v) if v else "-" for v in (internal[0], ext[0], internal[1], ext[1])),
                     f"{ms(alone)} (min {min(alone):.3f}, max {max(alone):.3f})" if alone else "-",
                     f"{ci[0]['value']:.3f} [{ci[0]['low']:.3f}, {ci[0]['high']:.3f}]" if ci else "-"])
    print(f"HAM10000 leave one site out, balanced accuracy, seeds {seeds}")
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if args.results:
        write_results(args.results, columns, rows, seeds)


def write_results(path: Path, columns: list[str], rows: list[list[str]], seeds: list[int]) -> None:
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc.update({"columns": columns, "rows": rows, "seeds": seeds})
    path.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
