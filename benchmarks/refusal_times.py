"""How long a refusal takes: each command below is wrong in one way, and fedmed must say so in one line.

Runs every case as a fresh ``python -m fedmed.cli`` process (imports included, as a user types it)
and prints the wall time and the line it printed. Compare two revisions in one run (machines are
noisy: read the ratio) by pointing ``--old`` at another checkout:

    FEDMED_DATA_DIR=../shared/data python benchmarks/refusal_times.py --old /tmp/base
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {
    "key typo": ["fit", "federation.roundz=3"],
    "wrong type": ["fit", "federation.rounds=abc"],
    "out of range": ["fit", "federation.rounds=0"],
    "site not in the federation": ["fit", "site=hospital_d"],
    "strategy parameter": ["fit", "strategy=fedprox", "strategy.mu=-1"],
    "missing FEDMED_DATA_DIR": ["fit"],
    "image folder missing": ["fit", "data=brain_mri", "data.source.root=/nonexistent/brain"],
    "--help": ["fit", "--help"],
    "--cfg": ["fit", "--cfg"],
}


def run(case: str, args: list[str], pythonpath: str | None, out: Path) -> tuple[float, str, int]:
    env = {**os.environ, "FEDMED_OUTPUT_DIR": str(out)}
    if case == "missing FEDMED_DATA_DIR":
        env["FEDMED_DATA_DIR"] = str(out / "no-such-folder")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fedmed.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300, cwd=pythonpath or Path(__file__).resolve().parents[1])  # first on sys.path
    seconds = time.perf_counter() - t0
    lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
    return seconds, (lines[-1] if lines else "")[:110], proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", help="another checkout to time the same cases against (PYTHONPATH)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per case (the median is printed)")
    args = ap.parse_args()
    revisions = {"this": None, **({"old": args.old} if args.old else {})}
    with tempfile.TemporaryDirectory(prefix="fedmed-refusals-") as tmp:
        print(f"{'case':<28} " + " ".join(f"{r + ' (s)':>10}" for r in revisions) + "  what it said (this revision)")
        for case, argv in CASES.items():
            medians, said = [], ""
            for name, path in revisions.items():
                times = []
                for _ in range(args.repeat):
                    seconds, line, _ = run(case, argv, path, Path(tmp))
                    times.append(seconds)
                    if name == "this":
                        said = line
                medians.append(statistics.median(times))
            print(f"{case:<28} " + " ".join(f"{m:>10.1f}" for m in medians) + f"  {said}", flush=True)


if __name__ == "__main__":
    main()
