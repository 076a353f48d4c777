"""``fedmed data check``: validate a dataset and the federation's site manifests before training."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from fedmed.config import site_config
from fedmed.data.check import check_dataset
from fedmed.data.datamodule import Pipeline
from fedmed.data.manifest import read_manifest
from fedmed.errors import FedmedError, ManifestError

log = logging.getLogger("fedmed")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Check every sample and manifest; print a summary; raise if anything is wrong."""
    pipe = Pipeline.from_config(cfg.data)
    manifests, problems = [], []
    if cfg.manifests:
        for s in cfg.federation.sites:
            path = Path(site_config(cfg, s, verb="data_check").manifest)
            if path.exists():
                try:
                    manifests.append(read_manifest(path))
                except ManifestError as exc:
                    problems.append(str(exc))
    report = check_dataset(pipe, list(cfg.splits), manifests, cfg.workers, progress=sys.stderr.isatty())
    report.problems = problems + report.problems
    console = Console(width=None if sys.stdout.isatty() else 120)
    names = pipe.source.class_names
    table = Table(title=f"fedmed data check: {cfg.data.name} ({pipe.source.identity['file']})", title_justify="left")
    table.add_column("split")
    for n in names:
        table.add_column(n, justify="right")
    table.add_column("total", justify="right")
    for split, counts in report.counts.items():
        table.add_row(split, *[str(counts.get(n, 0)) for n in names], str(sum(counts.values())))
    console.print(table)
    shapes = ", ".join(f"{'x'.join(map(str, s))} ({n})" for s, n in report.shapes.most_common())
    console.print(f"decoded and preprocessed {report.checked} samples; model input shapes: {shapes or 'none'}")
    console.print(f"site manifests checked: {len(manifests)} "
                  f"({', '.join(m.site for m in manifests) or 'none written yet for this partition'})")
    for note in report.notes:
        console.print(f"  [yellow]note[/yellow] {note}", highlight=False, soft_wrap=True)
    if report.problems:
        for p in report.problems:
            console.print(f"  [red]problem[/red] {p}", highlight=False, soft_wrap=True)
        raise FedmedError(f"{len(report.problems)} problem(s) in {cfg.data.name}; see the list above")
    console.print("[green]no problems found[/green]")
    return {"checked": report.checked, "problems": report.problems, "notes": report.notes}
