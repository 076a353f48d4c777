"""What each privacy protection costs and buys: accuracy, membership-inference exposure, bytes, time.

Every run is a real `fedmed fit` (MLflow experiment `benchmark-privacy`) of the default
federation (PneumoniaMNIST, 3 sites, Dirichlet(0.5), FedAvg, 10 rounds x 2 local epochs,
selection on validation loss), audited at the end with the loss attack and LiRA (shadow models
trained like the target) on 500 training members vs 500 held-out images.

    FEDMED_DATA_DIR=../shared/data python benchmarks/privacy_bench.py [--runs none dp8 ...] \\
        [--audit lira|loss] [--seeds 42] [override ...]

Prints a markdown table and writes bench_out/privacy.json.
"""

from __future__ import annotations

import argparse
import statistics

from results import ms, save_json

from fedmed.config import compose
from fedmed.logs import setup_logging
from fedmed.tasks import fit

RUNS = {
    "none": ("no protection", []),
    "dp8": ("DP-SGD epsilon 8", ["privacy.epsilon=8"]),
    "dp1": ("DP-SGD epsilon 1", ["privacy.epsilon=1"]),
    "fp16": ("fp16 updates", ["federation.compression=fp16"]),
    "int8": ("int8 updates", ["federation.compression=int8"]),
    "topk": ("top-10% updates (error feedback)", ["federation.compression=topk", "federation.topk_fraction=0.1"]),
    "secagg": ("secure aggregation", ["privacy.secure_aggregation=true"]),
    "centralized": ("centralized (pooled data, reference)", ["mode=centralized"]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--audit", default="lira", choices=["loss", "lira"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[42])
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    setup_logging()
    base = ["logger.experiment=benchmark-privacy", "logger.log_model=false", "explain.every_n_rounds=0",
            f"privacy.audit={args.audit}", *args.overrides]
    rows: dict[str, list[dict]] = {}
    for seed in args.seeds:
        for key in args.runs:
            label, extra = RUNS[key]
            res = fit.run(compose("fit", [*base, f"seed={seed}", *extra]))
            rec = res["privacy"]
            attacks = {a["name"].split()[0]: a for a in rec["membership_inference"]}
            eps = [d["epsilon"] for d in rec["dp_per_site"].values()]
            rows.setdefault(label, []).append({
                **res["test"], "seed": seed, "run_id": res["run_id"], "seconds": res["seconds"],
                "rounds": rec["rounds"], "bytes_per_site_round": rec["update_bytes_per_site_round"],
                "epsilon_max": max(eps) if eps else None, "attacks": attacks})

    def col(rs, f):
        vals = [f(r) for r in rs]
        return "-" if any(v is None for v in vals) else ms(vals)

    print("\n| run | test ACC | test AUROC | loss-attack AUC | LiRA-offline AUC | LiRA-offline TPR@0.1%FPR "
          "| max site epsilon "
          "| update KB / site / round | s / round |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, rs in rows.items():
        lira = [r["attacks"].get("lira-offline") for r in rs]
        per_round = statistics.mean(r["seconds"] / max(r["rounds"], 1) for r in rs) if rs[0]["rounds"] else None
        print(f"| {label} | {ms([r['acc'] for r in rs])} | {ms([r['auroc'] for r in rs])} "
              f"| {ms([r['attacks']['loss']['auc'] for r in rs])} "
              f"| {'-' if None in lira else ms([a['auc'] for a in lira])} "
              f"| {'-' if None in lira else ms([a['tpr_at_01pct'] for a in lira])} "
              f"| {col(rs, lambda r: r['epsilon_max'])} "
              f"| {col(rs, lambda r: r['bytes_per_site_round'] / 1024 if r['rounds'] else None)} "
              f"| {f'{per_round:.1f}' if per_round else '-'} |")
    save_json("privacy", rows)


if __name__ == "__main__":
    main()
