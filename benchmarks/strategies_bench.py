"""Strategies under label skew, and under a poisoned site, against centralized and local-only training.

Every run is a real `fedmed fit` (logged to MLflow, experiment `benchmark-strategies`) with the
same model, total epochs, model selection (validation loss, never test) and test evaluation.

    FEDMED_DATA_DIR=../shared/data python benchmarks/strategies_bench.py \\
        [--data pneumoniamnist] [--partitions iid dirichlet-0.5 dirichlet-0.1] \\
        [--strategies fedavg fedprox fedbn fedadam scaffold] [--seeds 42] [--local] [--poison] [override ...]

Prints markdown tables (mean +- std over seeds) and writes bench_out/strategies_<data>.json.
"""

from __future__ import annotations

import argparse

from results import markdown_table, save_json

from fedmed.config import compose
from fedmed.logs import setup_logging
from fedmed.tasks import fit

SITES = "federation.sites=[hospital_a,hospital_b,hospital_c,hospital_d]"


def partition_overrides(p: str) -> list[str]:
    if p == "iid":
        return ["partition=iid"]
    method, alpha = p.split("-")
    return [f"partition={method}", f"partition.alpha={alpha}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="pneumoniamnist")
    ap.add_argument("--partitions", nargs="+", default=["iid", "dirichlet-0.5", "dirichlet-0.1"])
    ap.add_argument("--strategies", nargs="+", default=["fedavg", "fedprox", "fedbn", "fedadam", "scaffold"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[42])
    ap.add_argument("--local", action="store_true", help="also train every site alone (local-only baseline)")
    ap.add_argument("--poison", action="store_true",
                    help="also: hospital_d sends sign-flipped x10 updates; fedavg vs median / trimmed_mean")
    ap.add_argument("--name", default=None, help="JSON name in bench_out/ (default strategies_<data>)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    setup_logging()
    base = [f"data={args.data}", SITES, "logger.experiment=benchmark-strategies", "logger.log_model=false",
            "explain.every_n_rounds=0", *args.overrides]
    rows: dict[str, dict[str, list[dict]]] = {}
    name = args.name or f"strategies_{args.data}"

    def record(part: str, label: str, extra: list[str], seed: int) -> None:
        res = fit.run(compose("fit", [*base, f"seed={seed}", *extra]))
        rows.setdefault(part, {}).setdefault(label, []).append({**res["test"], "seed": seed, "run_id": res["run_id"],
                                                                "seconds": res["seconds"], "val": res["sites"]})
        save_json(name, rows)  # after every run: a long grid interrupted keeps what it has

    for seed in args.seeds:
        record("pooled", "centralized", ["mode=centralized"], seed)
        for part in args.partitions:
            for strategy in args.strategies:
                record(part, strategy, [*partition_overrides(part), f"strategy={strategy}"], seed)
            if args.local:
                for s in ("hospital_a", "hospital_b", "hospital_c", "hospital_d"):
                    record(part, f"local: {s}", [*partition_overrides(part), f"site={s}"], seed)
        if args.poison:
            iid = partition_overrides("iid")
            record("poison-iid", "fedavg, no attacker", [*iid, "strategy=fedavg"], seed)
            for strategy in ("fedavg", "median", "trimmed_mean"):  # krum needs >= 5 sites for f = 1
                record("poison-iid", f"{strategy}, hospital_d sign-flips x10",
                       [*iid, f"strategy={strategy}", "federation.attackers=[hospital_d:signflip]"], seed)

    cfg = compose("fit", base)
    print(f"\n{args.data}, {cfg.model.name}, 4 sites, {cfg.federation.rounds} rounds x "
          f"{cfg.federation.local_epochs} local epochs; seeds {args.seeds}; test split\n")
    for part, by in rows.items():
        print(f"\n**{part}**\n\n{markdown_table(by)}")


if __name__ == "__main__":
    main()
