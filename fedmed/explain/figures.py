"""Heatmap figures: for each image, the image, its heatmap and the overlay, with true/predicted class.

The grid is laid out in whole pixels at the figure's dpi, so that what ``savefig`` writes with its
defaults (as MLflow's ``log_figure`` does) is what was planned: every image is drawn at an integer
multiple of its own resolution (never shrunk), every text lies inside the figure, and the font
sizes are the ones given here at the saved size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FormatStrFormatter  # noqa: E402

from fedmed.reporting import wrap_to_width  # noqa: E402

HEADERS = ("image", "heatmap", "overlay")
RELEVANCE_LABEL = "relevance (0 = none, 1 = max)"
WRONG_COLOUR = "#b00020"
MAX_FIGURE_PX = 60_000  # Agg refuses images of 2**16 pixels or more along a side


def _display(img: torch.Tensor) -> tuple[torch.Tensor, str | None]:
    """(C,*S) -> a 2D picture: grey for 1 channel, RGB for 3; volumes show their middle slice along the first axis."""
    img = img.detach().float().cpu()
    if img.ndim == 4:  # (C,D,H,W)
        img = img[:, img.shape[1] // 2]
    img = (img - img.min()) / (img.max() - img.min()).clamp(min=1e-12)
    return (img[0], "gray") if img.shape[0] == 1 else (img[:3].permute(1, 2, 0), None)


def _heat(m: torch.Tensor) -> torch.Tensor:
    """(*S) -> 2D: volumes show the same middle slice as :func:`_display`."""
    m = m.detach().float().cpu()
    return m[m.shape[0] // 2] if m.ndim == 3 else m


def _caption(true: str, pred: str, prob: float) -> str:
    return f"true: {true} \u00b7 pred: {pred} (p={prob:.2f})"


def heatmap_grid(
    images: torch.Tensor,
    maps: torch.Tensor,
    labels: torch.Tensor,
    preds: torch.Tensor,
    probs: torch.Tensor,
    class_names: Sequence[str],
    title: str,
    per_row: int | None = None,
    *,
    tile_inches: float = 2.2,
    dpi: int = 100,
    cmap: str = "jet",
    alpha: float = 0.45,
    interpolation: str = "nearest",
    font_size: float = 10.0,
    max_width_inches: float = 15.0,
) -> Figure:
    """A grid figure: per image three panels (image | heatmap | overlay) under a caption
    ``true: <class> · pred: <class> (p=<probability of the predicted class>)``, with column headers
    and a colour bar for the heatmap values.

    Args:
        images: (B,C,H,W) or (B,C,D,H,W) inputs, 1 (grey) or 3 (RGB) channels; volumes show their middle slice.
        maps: (B,H,W) or (B,D,H,W) heatmaps in [0, 1] (another spatial size is stretched over the image).
        labels, preds: (B,) true and predicted class indices.
        probs: (B,) probability of the predicted class.
        class_names: name of each class index.
        title: figure title (wrapped to the figure's width).
        per_row: images side by side; default: two where two fit in ``max_width_inches``, else one.
        tile_inches: smallest side of one panel; a panel is an integer multiple of the image's own pixels,
            so an image larger than ``tile_inches * dpi`` is drawn at its full resolution.
        dpi: the figure's resolution, which ``savefig`` uses by default.
        cmap, alpha: heatmap colour map and its opacity in the overlay.
        interpolation: how images are upsampled (``nearest`` shows the data's own pixels).
        font_size: caption size in points; the title is 30% larger, headers 10%, tick labels 10% smaller.
    """
    b = len(images)
    pic0 = _display(images[0])[0] if b else torch.zeros(1, 1)
    h_img, w_img = int(pic0.shape[0]), int(pic0.shape[1])
    scale = max(1, math.ceil(tile_inches * dpi / max(h_img, w_img)))
    tile_w, tile_h = w_img * scale, h_img * scale  # pixels

    def px(inches: float) -> int:
        return round(inches * dpi)

    def line_px(points: float) -> int:
        return math.ceil(1.4 * points * dpi / 72)

    fs_title, fs_header, fs_tick = 1.3 * font_size, 1.1 * font_size, 0.9 * font_size
    margin, gap, group_gap = px(0.3), px(0.08), px(0.45)
    group_w = 3 * tile_w + 2 * gap
    if per_row is None:
        per_row = 2 if 2 * group_w + group_gap + 2 * margin <= px(max_width_inches) else 1
    per_row = max(1, min(per_row, max(b, 1)))
    row_h_estimate = tile_h + line_px(font_size) * 2 + px(0.3)
    per_row = max(per_row, math.ceil(b / max(1, (MAX_FIGURE_PX - px(3)) // row_h_estimate)))
    rows = max(1, math.ceil(b / per_row))
    width = max(2 * margin + per_row * group_w + (per_row - 1) * group_gap, px(5.0))
    text_w = width - 2 * margin

    title_lines = wrap_to_width(title, text_w, fs_title, dpi, "bold")
    n_slices = int(images.shape[2]) if images.ndim == 5 else 0
    note_lines = (wrap_to_width(f"3D volumes: middle slice (index {n_slices // 2} of {n_slices}) of each volume and of "
                                "its heatmap", text_w, font_size, dpi) if n_slices else [])
    captions = [
        _caption(class_names[int(labels[i])], class_names[int(preds[i])], float(probs[i])) for i in range(b)
    ]
    wrapped = [wrap_to_width(c, group_w, font_size, dpi) for c in captions]

    # -- vertical layout, top to bottom, in pixels ---------------------------------------------
    y = px(0.2)
    title_top = y
    y += len(title_lines) * line_px(fs_title)
    note_top = y
    y += len(note_lines) * line_px(font_size) + px(0.12)
    cbar_label_top = y
    y += line_px(font_size)
    cbar_top, cbar_h = y, px(0.18)
    y += cbar_h + line_px(fs_tick) + px(0.2)
    header_top = y
    y += line_px(fs_header) + px(0.04)
    row_tops: list[tuple[int, int]] = []  # (caption top, tile top) per grid row
    for r in range(rows):
        lines = max((len(wrapped[i]) for i in range(r * per_row, min(b, (r + 1) * per_row))), default=1)
        row_tops.append((y, y + lines * line_px(font_size) + px(0.04)))
        y = row_tops[-1][1] + tile_h + px(0.3)
    height = y - px(0.3) + px(0.25)

    fig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi)

    def frac(x0: int, y_top: int, w: int, h: int) -> tuple[float, float, float, float]:
        return x0 / width, 1 - (y_top + h) / height, w / width, h / height

    def text(x0: float, y_top: int, s: str, size: float, ha: str = "center", **kw) -> None:
        fig.text(x0 / width, 1 - y_top / height, s, ha=ha, va="top", fontsize=size, linespacing=1.25, **kw)

    text(width / 2, title_top, "\n".join(title_lines), fs_title, fontweight="bold")
    if note_lines:
        text(width / 2, note_top, "\n".join(note_lines), font_size, color="0.25")

    # colour bar: one for the whole figure (every heatmap and overlay uses the same 0..1 scale)
    cbar_w = min(group_w, px(4.0))
    cax = fig.add_axes(frac((width - cbar_w) // 2, cbar_top, cbar_w, cbar_h))
    mappable = ScalarMappable(norm=Normalize(0, 1), cmap=cmap)
    cbar = fig.colorbar(mappable, cax=cax, orientation="horizontal", ticks=[0, 0.25, 0.5, 0.75, 1])
    cbar.ax.tick_params(labelsize=fs_tick)
    cbar.ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    text(width / 2, cbar_label_top, RELEVANCE_LABEL, font_size)

    for c in range(per_row if b else 0):
        x_group = margin + c * (group_w + group_gap)
        for k, name in enumerate(HEADERS):
            text(x_group + k * (tile_w + gap) + tile_w / 2, header_top, name, fs_header, fontweight="bold")

    extent = (-0.5, w_img - 0.5, h_img - 0.5, -0.5)
    for i in range(b):
        r, c = divmod(i, per_row)
        caption_top, tile_top = row_tops[r]
        x_group = margin + c * (group_w + group_gap)
        ok = int(labels[i]) == int(preds[i])
        colour = "black" if ok else WRONG_COLOUR
        text(x_group + group_w / 2, caption_top, "\n".join(wrapped[i]), font_size, color=colour)
        pic, pic_cmap = _display(images[i])
        heat = _heat(maps[i])
        axes = [fig.add_axes(frac(x_group + k * (tile_w + gap), tile_top, tile_w, tile_h)) for k in range(3)]
        axes[0].imshow(pic, cmap=pic_cmap, interpolation=interpolation)
        axes[1].imshow(heat, cmap=cmap, vmin=0, vmax=1, interpolation=interpolation, extent=extent)
        axes[2].imshow(pic, cmap=pic_cmap, interpolation=interpolation)
        axes[2].imshow(heat, cmap=cmap, alpha=alpha, vmin=0, vmax=1, interpolation=interpolation, extent=extent)
        for ax in axes:
            ax.set_axis_off()
            ax.set_xlim(extent[0], extent[1])
            ax.set_ylim(extent[2], extent[3])
    if not b:
        text(width / 2, row_tops[0][0], "no images", font_size)
    return fig
