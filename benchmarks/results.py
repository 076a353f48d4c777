"""Shared output of the benchmark scripts: mean +- std markdown tables and a JSON copy in bench_out/."""

from __future__ import annotations

import json
import statistics
from pathlib import Path


def ms(vals: list[float]) -> str:
    """``mean ± std`` over seeds (just the value for one seed)."""
    return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else f"{vals[0]:.3f}"


def markdown_table(rows: dict[str, list[dict]]) -> str:
    """One line per run label: test ACC, macro-F1, AUROC (mean ± std over seeds) and mean seconds."""
    lines = ["| run | test ACC | test macro-F1 | test AUROC | time (s) |", "|---|---|---|---|---|"]
    for label, rs in rows.items():
        lines.append(f"| {label} | {ms([r['acc'] for r in rs])} | {ms([r['f1'] for r in rs])} | "
                     f"{ms([r['auroc'] for r in rs])} | {statistics.mean(r['seconds'] for r in rs):.0f} |")
    return "\n".join(lines)


def save_json(name: str, data) -> Path:
    out = Path("bench_out")
    out.mkdir(exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(data, indent=1))
    return path
