"""What ``federation.parallel`` costs on one machine against the same federation in one process.

Runs ``fedmed fit`` twice (in process, and with ``federation.parallel=N``), each as a fresh command,
and samples the whole process tree every 0.2 s: wall time, CPU seconds (user + system of every
process, from /proc), the peak of the summed resident memory, and how many processes were started
(by command name). Linux only. Compare two revisions in one run (read the ratios: the machine is
shared) by pointing ``--old`` at another checkout:

    FEDMED_DATA_DIR=../shared/data python benchmarks/parallel_cost.py --old /tmp/base
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat(pid: int) -> tuple[int, float, int, str] | None:
    """(parent pid, CPU seconds, resident bytes, command name) of a live process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
        rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return None
    name = raw[raw.index("(") + 1: raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2:].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK, rss, name


def _tree(root: int) -> dict[int, tuple[int, float, int, str]]:
    stats = {pid: s for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()) if (s := _stat(pid))}
    tree, frontier = {}, [root]
    while frontier:
        pid = frontier.pop()
        if pid in stats:
            tree[pid] = stats[pid]
            frontier += [c for c, s in stats.items() if s[0] == pid]
    return tree


REPO = Path(__file__).resolve().parents[1]


def measure(cmd: list[str], env: dict[str, str], cwd: Path) -> dict[str, float | str]:
    t0 = time.perf_counter()  # cwd: `python -m` puts it first on sys.path, so it picks the revision measured
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    cpu: dict[int, float] = {}
    names: dict[int, str] = {}
    peak = 0
    while proc.poll() is None:
        tree = _tree(proc.pid)
        for pid, (_, seconds, _, name) in tree.items():
            cpu[pid] = max(cpu.get(pid, 0.0), seconds)
            names[pid] = name
        peak = max(peak, sum(s[2] for s in tree.values()))
        time.sleep(0.2)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    started = Counter(names.values())
    return {"wall_s": time.perf_counter() - t0, "cpu_s": sum(cpu.values()), "peak_rss_gb": peak / 2**30,
            "processes": sum(started.values()),
            "started": ", ".join(f"{n} x{c}" for n, c in started.most_common(5))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", help="another checkout to measure the same runs with (PYTHONPATH)")
    ap.add_argument("--parallel", type=int, default=3)
    ap.add_argument("overrides", nargs="*", default=["experiment=smoke", "federation.sites=[hospital_a,hospital_b,"
                                                     "hospital_c]", "federation.rounds=3"])
    args = ap.parse_args()
    base = [*args.overrides, "privacy.audit=none", "explain.every_n_rounds=0", "logger.log_model=false"]
    revisions = {"this": None, **({"old": args.old} if args.old else {})}
    print(f"{'revision':<9} {'run':<13} {'wall s':>7} {'CPU s':>7} {'peak GB':>8} {'procs':>6}  started")
    with tempfile.TemporaryDirectory(prefix="fedmed-parallel-cost-") as tmp:
        for name, path in revisions.items():
            env = {**os.environ, "FEDMED_OUTPUT_DIR": str(Path(tmp) / name)}
            if path:
                env["PYTHONPATH"] = path
            for run, extra in (("in process", []), (f"parallel={args.parallel}",
                                                     [f"federation.parallel={args.parallel}"])):
                m = measure([sys.executable, "-m", "fedmed.cli", "fit", *base, *extra], env, Path(path or REPO))
                print(f"{name:<9} {run:<13} {m['wall_s']:>7.1f} {m['cpu_s']:>7.1f} {m['peak_rss_gb']:>8.2f} "
                      f"{m['processes']:>6}  {m['started']}", flush=True)


if __name__ == "__main__":
    main()
