"""One HTML page a clinician can read: a site's cases, each image at its native resolution with the
heatmap over it, the expert outline, the class explained and the model's answer, grouped into correct,
missed and false alarm per class, under the site's localisation and faithfulness numbers."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

CMAP = "inferno"  # perceptually uniform, readable in greyscale print


@dataclass
class Case:
    """One explained image.

    Args:
        image: the file as stored (native resolution), RGB or grey array.
        heatmap: the map in [0, 1] at model resolution (stretched over the image).
        mask: the expert outline at native resolution (or None).
        true, pred, explained: class names.
        prob: the model's probability of ``pred``.
        name: the image id.
    """

    image: np.ndarray
    heatmap: np.ndarray
    mask: np.ndarray | None
    true: str
    pred: str
    explained: str
    prob: float
    name: str


def case_png(case: Case, dpi: int = 100) -> bytes:
    """The image beside the heatmap over it (with its colour bar and the expert contour), as PNG bytes."""
    h, w = case.image.shape[:2]
    small = Image.fromarray((case.heatmap * 255).astype(np.uint8))
    heat = np.asarray(small.resize((w, h), Image.Resampling.BILINEAR)) / 255
    fig = Figure(figsize=(2 * w / dpi + 0.9, h / dpi + 0.35), dpi=dpi)
    left = fig.add_axes((0.0, 0.0, w / dpi / (2 * w / dpi + 0.9), 1 - 0.35 / (h / dpi + 0.35)))
    right = fig.add_axes((w / dpi / (2 * w / dpi + 0.9), 0.0, w / dpi / (2 * w / dpi + 0.9),
                          1 - 0.35 / (h / dpi + 0.35)))
    grey = case.image.ndim == 2
    for ax in (left, right):
        ax.imshow(case.image, cmap="gray" if grey else None, interpolation="nearest")
        ax.set_axis_off()
    shown = right.imshow(heat, cmap=CMAP, alpha=0.5, vmin=0, vmax=1, interpolation="bilinear")
    if case.mask is not None and case.mask.any():
        for ax in (left, right):
            ax.contour(case.mask.astype(float), levels=[0.5], colors=["#00e5ff"], linewidths=1.2)
    left.set_title("image, expert outline", fontsize=8)
    right.set_title(f"evidence for: {case.explained}", fontsize=8)
    bar = fig.add_axes((1 - 0.8 / (2 * w / dpi + 0.9), 0.08, 0.12 / (2 * w / dpi + 0.9), 0.75))
    fig.colorbar(shown, cax=bar).set_label("relevance", fontsize=7)
    bar.tick_params(labelsize=6)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def groups(cases: Sequence[Case], class_names: Sequence[str]) -> list[tuple[str, str, list[Case]]]:
    """(class, correct | missed | false alarm, cases) in class order. A wrong case is listed twice: missed under
    its true class and a false alarm under the class the model called it."""
    out = []
    for c in class_names:
        for kind, keep in (("correct", lambda k: k.true == c and k.pred == c),  # noqa: B023
                           ("missed", lambda k: k.true == c and k.pred != c),  # noqa: B023
                           ("false alarm", lambda k: k.true != c and k.pred == c)):  # noqa: B023
            chosen = [k for k in cases if keep(k)]
            if chosen:
                out.append((c, kind, chosen))
    return out


def html_report(title: str, site: str, cases: Sequence[Case], class_names: Sequence[str],
                numbers: Mapping[str, Mapping[str, float]], notes: Sequence[str]) -> str:
    """The page. ``numbers``: row -> metric -> value (the method and the baselines); ``notes``: the plain
    lines that say what they mean."""
    esc = html.escape
    metrics = sorted({m for row in numbers.values() for m in row})
    labels = {"deletion_auc": "deletion AUC", "insertion_auc": "insertion AUC", "top_iou": "top-25% IoU"}
    head = "".join(f"<th>{esc(labels.get(m, m.replace('_', ' ')))}</th>" for m in metrics)
    body = "".join(f"<tr><th>{esc(r)}</th>" + "".join(f"<td>{v[m]:.3f}</td>" if m in v else "<td>-</td>"
                                                        for m in metrics) + "</tr>" for r, v in numbers.items())
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>",
             "<style>body{font-family:system-ui,sans-serif;margin:24px;max-width:1100px;color:#111}"
             "table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #bbb;padding:3px 8px;"
             "text-align:right}th:first-child{text-align:left}.case{display:inline-block;margin:6px;"
             "vertical-align:top;border:1px solid #ddd;padding:4px}.case p{margin:2px;font-size:13px}"
             "</style></head><body>",
             f"<h1>{esc(title)}</h1><p>Site: <b>{esc(site)}</b>. {len(cases)} cases. Not for clinical use.</p>",
             f"<h2>How well the heatmaps match the expert outlines</h2><table><tr><th></th>{head}</tr>{body}</table>",
             *(f"<p>{esc(n)}</p>" for n in notes)]
    for c, kind, chosen in groups(cases, class_names):
        parts.append(f"<h2>{esc(c)}: {esc(kind)} ({len(chosen)})</h2>")
        for k in chosen:
            png = base64.b64encode(case_png(k)).decode()
            parts.append(f"<div class='case'><img alt='{esc(k.name)}: heatmap for {esc(k.explained)}' "
                         f"src='data:image/png;base64,{png}'><p><b>{esc(k.name)}</b></p>"
                         f"<p>model says: <b>{esc(k.pred)}</b> (probability {k.prob:.2f})</p>"
                         f"<p>true class: {esc(k.true)}</p></div>")
    parts.append("</body></html>")
    return "\n".join(parts)
