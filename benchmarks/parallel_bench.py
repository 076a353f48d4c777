"""Round time with sites one after another in this process vs each site in its own worker process.

    FEDMED_DATA_DIR=../shared/data python benchmarks/parallel_bench.py [--workers 0 1 2] [--rounds 3] [override ...]

`--workers 0` is the in-process orchestrator (sites in turn); N > 0 is `federation.parallel=N`
(every site in its own process, all at once, round-robin over N GPUs or the CPU cores split N
ways). Same seed, data and model everywhere; reports the mean round time (training + federated
evaluation; worker start-up excluded) and the test accuracy, and names the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics

import torch
from mlflow import MlflowClient
from results import save_json

from fedmed.config import compose
from fedmed.logs import setup_logging
from fedmed.tasks import fit


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores"
    return f"CPU only: {os.cpu_count()} cores ({platform.processor() or platform.machine()})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    setup_logging()
    base = ["logger.experiment=benchmark-parallel", "logger.log_model=false", "explain.every_n_rounds=0",
            "privacy.audit=none", f"federation.rounds={args.rounds}", *args.overrides]
    rows = []
    for n in args.workers:
        cfg = compose("fit", [*base, f"federation.parallel={n}"])
        res = fit.run(cfg)
        client = MlflowClient(cfg.logger.tracking_uri)
        secs = [m.value for m in client.get_metric_history(res["run_id"], "round_seconds")]
        rows.append({"workers": n, "round_seconds": statistics.mean(secs), "rounds": secs, "acc": res["test"]["acc"],
                     "run_id": res["run_id"]})
    print(f"\nmachine: {machine()}; {cfg.data.name}, {cfg.model.name}, {len(cfg.federation.sites)} sites, "
          f"{args.rounds} rounds x {cfg.federation.local_epochs} local epochs\n")
    print("| sites run | mean round time (s) | vs in-process | test ACC |")
    print("|---|---|---|---|")
    ref = rows[0]["round_seconds"]
    for r in rows:
        label = "in this process, one after another" if r["workers"] == 0 else f"own processes, parallel={r['workers']}"
        print(f"| {label} | {r['round_seconds']:.1f} | {ref / r['round_seconds']:.2f}x | {r['acc']:.4f} |")
    save_json("parallel", {"machine": machine(), "rows": rows})


if __name__ == "__main__":
    main()
