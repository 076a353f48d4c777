"""What DP-SGD costs per local epoch: one site's epoch with and without it, alternated, on one machine.

    FEDMED_DATA_DIR=../shared/data python benchmarks/dp_cost.py [--site hospital_a] [--repeats 3] [override ...]

Per-sample gradients (Opacus) cost more than a plain backward pass; this measures how much,
as a ratio within one run (the machines are noisy), with the run's model and batch size.
"""

from __future__ import annotations

import argparse
import statistics
import time

from hydra.utils import instantiate

from fedmed.build import build_strategy, site_client, site_data, write_partition
from fedmed.config import compose, site_config
from fedmed.data.manifest import read_manifest
from fedmed.logs import setup_logging


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--site", default="hospital_a")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    setup_logging()
    times: dict[str, list[float]] = {"plain": [], "DP-SGD": []}
    for r in range(args.repeats):
        for label, extra in (("plain", []), ("DP-SGD", ["privacy.epsilon=8"])):
            cfg = compose("fit", [*args.overrides, *extra, "federation.rounds=100"])
            write_partition(cfg, instantiate(cfg.data.source))
            scfg = site_config(cfg, args.site)
            data = site_data(cfg, read_manifest(scfg.manifest), scfg)
            client = site_client(cfg, args.site, 0, data, strategy=build_strategy(cfg))
            w = client.get_weights()
            t0 = time.perf_counter()
            client.train(w, r + 1, 1, send=False)
            times[label].append(time.perf_counter() - t0)
    plain, dp = statistics.median(times["plain"]), statistics.median(times["DP-SGD"])
    n = len(data.train)
    print(f"\n{cfg.data.name}, {cfg.model.name}, site {args.site} ({n} images), batch {cfg.data.batch_size}, "
          f"median of {args.repeats}:")
    print("| local epoch | seconds | images/s |\n|---|---|---|")
    print(f"| plain | {plain:.2f} | {n / plain:.0f} |\n| DP-SGD (Opacus) | {dp:.2f} | {n / dp:.0f} |")
    print(f"DP-SGD / plain = {dp / plain:.2f}x")


if __name__ == "__main__":
    main()
