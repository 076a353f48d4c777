"""Shared output of the benchmark scripts: mean +- std markdown tables and a JSON copy in bench_out/."""

from __future__ import annotations

import json
import statistics
from pathlib import Path


def ms(vals: list[float]) -> str:
    """``mean ± std`` over seeds (just the value for one seed)."""
    return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else f"{vals[0]:.3f}"


def pooled_val(sites: dict[str, dict], key: str = "acc") -> float:
    """A validation metric over all sites' validation data: the sites' values weighted by their sample counts.

    For accuracy and loss this equals the metric on the pooled validation split (the sites partition it).
    """
    total = sum(m["n"] for m in sites.values())
    return sum(m[key] * m["n"] for m in sites.values()) / total


def markdown_table(rows: dict[str, list[dict]]) -> str:
    """One line per run label: validation ACC (what a choice may be made on), then test ACC, macro-F1, AUROC
    (mean ± std over seeds) and mean seconds."""
    lines = ["| run | val ACC | test ACC | test macro-F1 | test AUROC | time (s) |", "|---|---|---|---|---|---|"]
    for label, rs in rows.items():
        val = [pooled_val(r["val"]) for r in rs if r.get("val") and all("n" in m for m in r["val"].values())]
        lines.append(f"| {label} | {ms(val) if val else '-'} | {ms([r['acc'] for r in rs])} | "
                     f"{ms([r['f1'] for r in rs])} | {ms([r['auroc'] for r in rs])} | "
                     f"{statistics.mean(r['seconds'] for r in rs):.0f} |")
    return "\n".join(lines)


def save_json(name: str, data) -> Path:
    out = Path("bench_out")
    out.mkdir(exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(data, indent=1))
    return path
