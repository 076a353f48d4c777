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

from results import save_json

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


def evaluate(args) -> None:
    raise SystemExit("the evaluation phase needs `fedmed evaluate`")


if __name__ == "__main__":
    main()
