"""What a run prints and draws: the summary table and the confusion-matrix figure."""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402


def confusion_figure(confmat: torch.Tensor, class_names: Sequence[str], title: str):
    """A labelled confusion-matrix heat map (rows: true class, columns: predicted)."""
    cm = confmat.numpy()
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(1.4 + 0.9 * k, 1.2 + 0.8 * k), dpi=120)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(k), class_names, rotation=30, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(textwrap.fill(title, 34), fontsize=9)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > cm.max() / 2 else "black")
    fig.tight_layout()
    return fig


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def summary_table(title: str, rows: Sequence[dict], footer: str | None = None, console: Console | None = None) -> str:
    """Print a table of rows ``{"who", "split", "n", "acc", "f1", "auroc"}``; return it as plain text."""
    table = Table(title=title, title_justify="left")
    for col, justify in (("who", "left"), ("evaluated on", "left"), ("n", "right"),
                         ("accuracy", "right"), ("macro-F1", "right"), ("AUROC", "right")):
        table.add_column(col, justify=justify, no_wrap=True)
    for r in rows:
        table.add_row(r["who"], r["split"], str(r["n"]), f"{r['acc']:.4f}", f"{r['f1']:.4f}", f"{r['auroc']:.4f}")
    if console is None:
        console = Console()
        if not console.is_terminal:  # CI logs and pipes: wide enough that nothing is cut
            console = Console(width=120)
    console.print(table)
    if footer:
        console.print(footer)
    plain = Console(width=100, record=True, file=io.StringIO())
    plain.print(table)
    if footer:
        plain.print(footer)
    return plain.export_text()


def partition_figure(counts: np.ndarray, class_names: Sequence[str], sites: Sequence[str], title: str):
    """Stacked bar chart of per-site training class counts."""
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(sites), 3.6), dpi=110)
    bottom = np.zeros(len(sites))
    for j, name in enumerate(class_names):
        ax.bar(list(sites), counts[:, j], bottom=bottom, label=name)
        bottom += counts[:, j]
    ax.set_ylabel("training images")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.tight_layout()
    plt.close(fig)
    return fig
