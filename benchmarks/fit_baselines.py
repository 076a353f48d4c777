"""Benchmark: federated (default `fedmed fit`) vs centralized vs each site alone, on the official test split.

Every mode uses the same model, the same total epochs (rounds x local epochs), the same
model-selection rule (best validation loss, never the test split) and the same test evaluation.

Usage:
    FEDMED_DATA_DIR=../shared/data python benchmarks/fit_baselines.py [--seeds 42 43 44] [override ...]

Prints a markdown table (mean +- std over seeds) and writes bench_out/fit_baselines_<data>.json.
"""

from __future__ import annotations

import argparse
import time

from results import markdown_table, save_json

from fedmed.config import compose
from fedmed.logs import setup_logging
from fedmed.tasks import fit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    ap.add_argument("--no-local", action="store_true", help="skip the site-alone baselines")
    ap.add_argument("--no-central", action="store_true", help="skip the centralized baseline")
    ap.add_argument("--name", default=None, help="JSON name in bench_out/ (default fit_baselines_<data>)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides applied to every run, e.g. data=breastmnist")
    args = ap.parse_args()
    setup_logging()
    base = ["logger.experiment=benchmark-fit", "logger.log_model=false", *args.overrides]
    rows: dict[str, list[dict]] = {}
    for seed in args.seeds:
        cfg = compose("fit", [*base, f"seed={seed}"])
        strategy = cfg.strategy._target_.rsplit(".", 1)[-1]  # e.g. FedAvg, FedAvgM
        runs = [(f"federated ({strategy})", [])] + ([] if args.no_central else [("centralized", ["mode=centralized"])])
        runs += [] if args.no_local else [(f"local: {s}", [f"site={s}"]) for s in cfg.federation.sites]
        for label, extra in runs:
            t0 = time.perf_counter()
            res = fit.run(compose("fit", [*base, f"seed={seed}", *extra]))
            rows.setdefault(label, []).append({**res["test"], "seconds": time.perf_counter() - t0, "seed": seed,
                                               "val": res["sites"]})

    partition = cfg.partition.dirname.replace(f"seed{args.seeds[-1]}", "seed*")
    print(f"\n{cfg.data.name}, {cfg.model.name}, partition {partition}, "
          f"{cfg.federation.rounds} rounds x {cfg.federation.local_epochs} local epochs; seeds {args.seeds}\n")
    print(markdown_table(rows))
    save_json(args.name or f"fit_baselines_{cfg.data.name}", rows)


if __name__ == "__main__":
    main()
