"""What a run prints and draws: the summary table, the confusion-matrix and partition figures.

Figures lay themselves out (constrained layout, titles and labels wrapped to the figure's width),
so that ``savefig`` with its defaults, as MLflow's ``log_figure`` calls it, cuts nothing.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from functools import lru_cache

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.backends.backend_agg import RendererAgg  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.font_manager import FontProperties  # noqa: E402
from matplotlib.layout_engine import ConstrainedLayoutEngine  # noqa: E402
from matplotlib.ticker import PercentFormatter  # noqa: E402
from rich.console import Console, JustifyMethod  # noqa: E402
from rich.table import Table  # noqa: E402


@lru_cache(maxsize=8)
def _renderer(dpi: float) -> RendererAgg:
    return RendererAgg(8, 8, dpi)


def text_width(text: str, fontsize: float, dpi: float, weight: str = "normal") -> float:
    """Width in pixels of one line of ``text`` at ``fontsize`` points, drawn at ``dpi``."""
    prop = FontProperties(size=fontsize, weight=weight)
    return _renderer(dpi).get_text_width_height_descent(text, prop, ismath=False)[0]


def wrap_to_width(text: str, width_px: float, fontsize: float, dpi: float, weight: str = "normal") -> list[str]:
    """Greedy word wrap of ``text`` into lines no wider than ``width_px`` when drawn; a word too wide is split."""
    lines: list[str] = []
    for paragraph in str(text).split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if text_width(candidate, fontsize, dpi, weight) <= width_px:
                line = candidate
                continue
            if line:
                lines.append(line)
            while text_width(word, fontsize, dpi, weight) > width_px and len(word) > 1:
                cut = len(word) - 1
                while cut > 1 and text_width(word[:cut], fontsize, dpi, weight) > width_px:
                    cut -= 1
                joint = max(word.rfind(sep, 0, cut) for sep in "_-+/.")  # rather after a separator
                cut = joint + 1 if joint > 0 else cut
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def _wrapped(text: str, width_px: float, fontsize: float, dpi: float, weight: str = "normal") -> str:
    return "\n".join(wrap_to_width(text, width_px, fontsize, dpi, weight))


def confusion_figure(confmat: torch.Tensor, class_names: Sequence[str], title: str) -> Figure:
    """A labelled confusion matrix (rows: true class, columns: predicted class).

    Each cell shows its count and its share of the true class (row-normalised); the colour is that share.
    """
    cm = np.asarray(confmat.detach().cpu().numpy() if isinstance(confmat, torch.Tensor) else confmat, dtype=float)
    k = len(class_names)
    totals = cm.sum(axis=1)
    share = np.divide(cm, totals[:, None], out=np.zeros_like(cm), where=totals[:, None] > 0)
    dpi, cell = 100, 1.05 if k <= 8 else 0.8
    fs_title, fs_label, fs_cell = 12.0, 10.0 if k <= 8 else 9.0, 10.0 if k <= 8 else 9.0
    width = max(6.0, 2.9 + cell * k + 1.3)
    height = max(4.8, 2.4 + cell * k)
    fig = plt.figure(figsize=(width, height), dpi=dpi, layout=ConstrainedLayoutEngine(w_pad=0.1, h_pad=0.1))
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1, aspect="auto")  # "equal" defeats constrained layout
    cbar = fig.colorbar(image, ax=ax, fraction=0.06, pad=0.03, shrink=0.9)
    cbar.set_label("share of the true class (row-normalised)", fontsize=fs_label)
    cbar.ax.tick_params(labelsize=fs_label - 1)
    cbar.ax.yaxis.set_major_formatter(PercentFormatter(xmax=1, decimals=0))
    words = [w for n in class_names for w in str(n).split()]
    x_wrap = max([0.9 * cell * dpi] + [text_width(w, fs_label, dpi) for w in words])  # horizontal, in a cell
    x_names = [_wrapped(str(n), x_wrap, fs_label, dpi) for n in class_names]
    y_names = [_wrapped(f"{n} (n={int(t)})", 1.8 * dpi, fs_label, dpi)
               for n, t in zip(class_names, totals, strict=True)]
    ax.set_xticks(range(k), x_names, fontsize=fs_label)
    ax.set_yticks(range(k), y_names, fontsize=fs_label)
    ax.set_xlabel("predicted class", fontsize=fs_label + 1)
    ax.set_ylabel("true class", fontsize=fs_label + 1)
    ax.tick_params(length=0)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{int(cm[i, j])}\n{share[i, j]:.1%}", ha="center", va="center", fontsize=fs_cell,
                    color="white" if share[i, j] > 0.55 else "black")
    fig.suptitle(_wrapped(title, (width - 0.8) * dpi, fs_title, dpi, "bold"), fontsize=fs_title, fontweight="bold")
    return fig


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def summary_table(title: str, rows: Sequence[dict], footer: str | None = None, console: Console | None = None) -> str:
    """Print a table of rows ``{"who", "split", "n", "acc", "balanced_acc", "f1", "auroc"}``; return it as plain text.

    The footer's lines are printed as they are, never wrapped (a command in it stays one line
    to copy, in the terminal and in the returned text).
    """
    table = Table(title=title, title_justify="left")
    columns: tuple[tuple[str, JustifyMethod], ...] = (("who", "left"), ("evaluated on", "left"), ("n", "right"),
                                                     ("accuracy", "right"), ("bal. acc", "right"),
                                                     ("macro-F1", "right"), ("AUROC", "right"))
    for col, justify in columns:
        table.add_column(col, justify=justify, no_wrap=True)
    for r in rows:
        balanced = r.get("balanced_acc", float("nan"))
        table.add_row(r["who"], r["split"], str(r["n"]), f"{r['acc']:.4f}", f"{balanced:.4f}", f"{r['f1']:.4f}",
                      f"{r['auroc']:.4f}")
    if console is None:
        console = Console()
        if not console.is_terminal:  # CI logs and pipes: wide enough that nothing is cut
            console = Console(width=120)
    console.print(table)
    if footer:
        console.print(footer, soft_wrap=True, markup=False, highlight=False)
    plain = Console(width=100, record=True, file=io.StringIO())
    plain.print(table)
    if footer:
        plain.print(footer, soft_wrap=True, markup=False, highlight=False)
    return plain.export_text()


def partition_figure(counts: np.ndarray, class_names: Sequence[str], sites: Sequence[str], title: str) -> Figure:
    """Stacked bar chart of per-site training class counts: one bar per site, one colour per class.

    Segments show their count where it fits, and each bar its total.
    """
    counts = np.asarray(counts)
    n_sites, k = len(sites), len(class_names)
    dpi, fs_title, fs_label = 100, 12.0, 10.0
    legend_w = min(3.0, max(1.2, max((len(str(n)) for n in class_names), default=4) * 0.09 + 0.7))
    width = max(6.5, 1.4 + 1.25 * n_sites + legend_w)
    height = 4.8
    fig = plt.figure(figsize=(width, height), dpi=dpi, layout=ConstrainedLayoutEngine(w_pad=0.1, h_pad=0.1))
    ax = fig.add_subplot()
    palette = matplotlib.colormaps["tab10" if k <= 10 else "tab20"]
    totals = counts.sum(axis=1)
    ymax = max(float(totals.max()) if n_sites else 1.0, 1.0) * 1.1
    ax.set_ylim(0, ymax)
    bottom = np.zeros(n_sites)
    x = np.arange(n_sites)
    axes_h_px = 0.62 * height * dpi  # about the plot area's height under constrained layout
    for j, name in enumerate(class_names):
        colour = palette(j % palette.N)
        label = _wrapped(str(name), 2.6 * dpi, fs_label, dpi)
        ax.bar(x, counts[:, j], bottom=bottom, width=0.7, color=colour, label=label, edgecolor="white", linewidth=0.6)
        for s in range(n_sites):
            v = counts[s, j]
            if v > 0 and v / ymax * axes_h_px >= 1.5 * fs_label * dpi / 72:
                r, g, b_ = to_rgb(colour)
                dark = 0.299 * r + 0.587 * g + 0.114 * b_ < 0.5
                ax.text(s, bottom[s] + v / 2, f"{int(v)}", ha="center", va="center", fontsize=fs_label - 1,
                        color="white" if dark else "black")
        bottom += counts[:, j]
    for s in range(n_sites):
        ax.text(s, totals[s], f"n={int(totals[s])}", ha="center", va="bottom", fontsize=fs_label)
    slot_px = (width - legend_w - 1.4) / max(n_sites, 1) * dpi * 0.95
    site_names = [_wrapped(str(s), slot_px, fs_label, dpi) for s in sites]
    ax.set_xticks(x, site_names, fontsize=fs_label)
    ax.set_xlabel("site", fontsize=fs_label + 1)
    ax.set_ylabel("training images", fontsize=fs_label + 1)
    ax.tick_params(axis="y", labelsize=fs_label)
    ax.spines[["top", "right"]].set_visible(False)
    handles, labels = ax.get_legend_handles_labels()  # top of the stack first; beside the axes, under the title
    ax.legend(handles[::-1], labels[::-1], title="class", loc="upper left", bbox_to_anchor=(1.02, 1.0),
              fontsize=fs_label, title_fontsize=fs_label + 1, frameon=False)
    fig.suptitle(_wrapped(title, (width - 0.8) * dpi, fs_title, dpi, "bold"), fontsize=fs_title, fontweight="bold")
    plt.close(fig)
    return fig
