"""Heatmap figures: for each image, the image, its heatmap and the overlay, with true/predicted class."""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def _display(img: torch.Tensor) -> tuple[torch.Tensor, str | None]:
    """(C,*S) -> a 2D picture: grey for 1 channel, RGB for 3; volumes show their middle axial slice."""
    if img.ndim == 4:  # (C,D,H,W)
        img = img[:, img.shape[1] // 2]
    img = (img - img.min()) / (img.max() - img.min()).clamp(min=1e-12)
    return (img[0], "gray") if img.shape[0] == 1 else (img[:3].permute(1, 2, 0), None)


def heatmap_grid(
    images: torch.Tensor,
    maps: torch.Tensor,
    labels: torch.Tensor,
    preds: torch.Tensor,
    probs: torch.Tensor,
    class_names: Sequence[str],
    title: str,
    per_row: int = 4,
):
    """A grid figure: per image three panels (image | heatmap | overlay), titled ``true / pred p``.

    Args:
        images: (B,C,*S) inputs; maps: (B,*S) heatmaps in [0,1]; labels, preds: (B,) classes;
        probs: (B,) probability of the predicted class.
    """
    b = len(images)
    rows = max(1, math.ceil(b / per_row))
    cols = 3 * min(per_row, max(b, 1))
    fig, axes = plt.subplots(rows, cols, figsize=(1.25 * cols, 1.45 * rows + 0.5), dpi=110, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(b):
        r, c = divmod(i, per_row)
        pic, cmap = _display(images[i])
        heat = maps[i] if maps[i].ndim == 2 else maps[i][maps[i].shape[0] // 2]
        ok = int(labels[i]) == int(preds[i])
        axes[r, 3 * c].imshow(pic, cmap=cmap)
        axes[r, 3 * c].set_title(f"true {class_names[int(labels[i])]}", fontsize=6)
        axes[r, 3 * c + 1].imshow(heat, cmap="jet", vmin=0, vmax=1)
        axes[r, 3 * c + 1].set_title(f"pred {class_names[int(preds[i])]}", fontsize=6, color="black" if ok else "red")
        axes[r, 3 * c + 2].imshow(pic, cmap=cmap)
        axes[r, 3 * c + 2].imshow(heat, cmap="jet", alpha=0.45, vmin=0, vmax=1)
        axes[r, 3 * c + 2].set_title(f"p={float(probs[i]):.2f}", fontsize=6)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig
