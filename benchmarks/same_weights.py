"""Fingerprint the final weights of small runs, to show that a change of code keeps behaviour.

Runs ``fedmed fit experiment=smoke federation.rounds=2`` once per case (every strategy, secure
aggregation, compression, fine-tuning, DP-SGD, the local and centralized baselines), reads each
run's logged model (``checkpoint/model.pt``) and writes the SHA-256 of every tensor to a JSON
file. Two such files from two revisions of the code are compared with ``--compare``.

    FEDMED_DATA_DIR=../shared/data python benchmarks/same_weights.py --out after.json
    # the same on an older checkout (its own spelling of the strategy option):
    PYTHONPATH=<old checkout> python benchmarks/same_weights.py --spelling old --out before.json
    python benchmarks/same_weights.py --compare before.json after.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: case -> (overrides with the strategy config group, overrides with the old federation.* keys)
CASES: dict[str, tuple[list[str], list[str]]] = {
    "fedavg": ([], []),
    "fedprox": (["strategy=fedprox", "strategy.mu=0.1"], ["federation.strategy=fedprox", "federation.mu=0.1"]),
    "fedbn": (["strategy=fedbn"], ["federation.strategy=fedbn"]),
    "fedadam": (["strategy=fedadam"], ["federation.strategy=fedadam"]),
    "fedyogi": (["strategy=fedyogi"], ["federation.strategy=fedyogi"]),
    "scaffold": (["strategy=scaffold"], ["federation.strategy=scaffold"]),
    "median": (["strategy=median"], ["federation.strategy=median"]),
    "trimmed_mean": (["strategy=trimmed_mean"], ["federation.strategy=trimmed_mean"]),
    "secagg": (["privacy.secure_aggregation=true"], ["privacy.secure_aggregation=true"]),
    "int8": (["federation.compression=int8"], ["federation.compression=int8"]),
    "topk": (["federation.compression=topk"], ["federation.compression=topk"]),
    "finetune": (["federation.finetune_epochs=1"], ["federation.finetune_epochs=1"]),
    "dp": (["privacy.noise_multiplier=1.0"], ["privacy.noise_multiplier=1.0"]),
    "labelflip": (["federation.attackers=[hospital_b:labelflip]"], ["federation.attackers=[hospital_b:labelflip]"]),
    "centralized": (["mode=centralized"], ["mode=centralized"]),
    "local": (["site=hospital_a"], ["site=hospital_a"]),
}
BASE = ["experiment=smoke", "federation.rounds=2", "explain.every_n_rounds=1", "privacy.audit=none",
        "logger.log_model=false", "seed=42"]


def fingerprint(path: Path) -> dict[str, str]:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    return {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest()[:16] for k, v in sorted(state.items())}


def run_case(name: str, overrides: list[str], work: Path) -> dict[str, str]:
    import mlflow

    db = work / f"{name}.db"
    args = [*BASE, *overrides, f"logger.tracking_uri=sqlite:///{db}", f"logger.artifact_location={work}/{name}-art",
            f"federation.checkpoint_dir={work}/{name}-ckpt", f"paths.manifests={work}/manifests"]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fedmed.cli", "fit", *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name}: fedmed fit failed\n{proc.stderr[-3000:]}")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("fedmed")
    runs = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    local = client.download_artifacts(runs[0].info.run_id, "checkpoint/model.pt", str(work))
    print(f"{name:<14} {time.perf_counter() - t0:5.1f}s", flush=True)
    return fingerprint(Path(local))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write the fingerprints here (JSON)")
    ap.add_argument("--spelling", choices=["new", "old"], default="new", help="old: federation.strategy=...")
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two fingerprint files")
    args = ap.parse_args()
    if args.compare:
        a, b = (json.loads(Path(p).read_text()) for p in args.compare)
        same = 0
        for case in sorted(set(a) & set(b)):
            diff = [k for k in set(a[case]) | set(b[case]) if a[case].get(k) != b[case].get(k)]
            print(f"{case:<14} {'bit-identical' if not diff else f'DIFFERENT in {len(diff)} tensors, e.g. {diff[0]}'}")
            same += not diff
        print(f"{same}/{len(set(a) & set(b))} cases bit-identical")
        sys.exit(0 if same == len(set(a) & set(b)) else 1)
    os.environ.setdefault("FEDMED_DATA_DIR", str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    out: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="fedmed-same-") as tmp:
        for case in args.cases:
            overrides = CASES[case][0 if args.spelling == "new" else 1]
            out[case] = run_case(case, overrides, Path(tmp))
            if args.out:  # after every case: a failure later keeps what was measured
                Path(args.out).write_text(json.dumps(out, indent=1, sort_keys=True))
    if not args.out:
        print(json.dumps(out, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
