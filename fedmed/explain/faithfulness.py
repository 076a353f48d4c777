"""Numbers that say whether a heatmap is faithful. All batched: one value per image.

- :func:`relevance_mass`: share of the (non-negative) map inside a known relevant region R
  ("explainability score" E; Arras et al. 2022), next to :func:`area_fraction` |R|/N, what a
  uniform random map scores.
- :func:`deletion_insertion`: area under the target-class probability as the most relevant
  pixels are removed (deletion, lower is better) or added to a blank image (insertion, higher
  is better) (Petsiuk et al. 2018).
- :func:`randomized_copy` + :func:`rank_correlation`: the model-parameter randomisation test
  (Adebayo et al. 2018): maps of a trained and a randomised model must differ (low correlation).
- :func:`class_mean_maps` + :func:`map_correlation`: consistency across rounds or sites.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from scipy.stats import rankdata
from torch import nn


def relevance_mass(maps: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """E per image: sum(map inside R) / sum(map). ``maps`` >= 0 and ``regions`` bool, same shape (B, *S)."""
    if maps.shape != regions.shape:
        raise ValueError(f"maps {tuple(maps.shape)} and regions {tuple(regions.shape)} differ in shape")
    m = maps.clamp(min=0).flatten(1)
    inside = (m * regions.flatten(1).float()).sum(1)
    return inside / m.sum(1).clamp(min=1e-12)


def area_fraction(regions: torch.Tensor) -> torch.Tensor:
    """|R| / N per image: the expected E of a map that ignores the image."""
    return regions.flatten(1).float().mean(1)


@torch.no_grad()
def deletion_insertion(
    net: nn.Module, x: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor, steps: int = 16, seed: int = 0,
    batch_size: int = 512,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deletion and insertion AUC per image (probability of ``targets``, averaged over ``steps + 1`` levels).

    Removed pixels take the image's mean intensity (per channel); ties in the map are broken at
    random (seeded), so a flat map scores like a random order.

    Args:
        net: network returning logits.
        x: (B,C,*S) inputs.
        maps: (B,*S) relevance maps.
        targets: (B,) explained classes.
        steps: number of removal/insertion steps.

    Returns:
        (deletion_auc, insertion_auc), each (B,).
    """
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    b = len(x)
    g = torch.Generator().manual_seed(seed)
    flat = maps.flatten(1) + torch.rand(maps.flatten(1).shape, generator=g) * 1e-6
    order = flat.argsort(1, descending=True)  # (B, N) most relevant first
    n = flat.shape[1]
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n).expand(b, n).contiguous())
    rank = rank.view(maps.shape).unsqueeze(1)  # (B,1,*S): 0 = most relevant
    fill = x.flatten(2).mean(2).view(b, x.shape[1], *([1] * (x.ndim - 2))).expand_as(x)
    curves: dict[str, list[torch.Tensor]] = {"del": [], "ins": []}
    for k in range(steps + 1):
        cut = round(n * k / steps)
        top = rank < cut  # the k/steps most relevant pixels
        for kind, img in (("del", torch.where(top, fill, x)), ("ins", torch.where(top, x, fill))):
            probs = []
            for i in range(0, b, batch_size):
                logits = net(img[i : i + batch_size].to(device))
                probs.append(logits.softmax(-1).gather(1, targets[i : i + batch_size, None].to(device))[:, 0].cpu())
            curves[kind].append(torch.cat(probs))
    net.train(was_training)
    auc = {k: torch.stack(v, 1).mean(1) for k, v in curves.items()}  # uniform steps: mean = normalised AUC
    return auc["del"], auc["ins"]


def randomized_copy(net: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of ``net`` with every layer re-initialised (cascading randomisation, all layers)."""
    clone = copy.deepcopy(net)
    torch.manual_seed(seed)
    for module in clone.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset) and module is not clone:
            reset()
        reset_stats = getattr(module, "reset_running_stats", None)
        if callable(reset_stats):
            reset_stats()
    return clone


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation per image between two batches of maps (B, *S); ties get average ranks.

    A map with no variation (constant) gives 0.
    """
    ra = rankdata(a.flatten(1).numpy(), axis=1)
    rb = rankdata(b.flatten(1).numpy(), axis=1)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    denom = np.sqrt((ra**2).sum(1) * (rb**2).sum(1))
    corr = np.where(denom > 0, (ra * rb).sum(1) / np.where(denom > 0, denom, 1), 0.0)
    return torch.from_numpy(corr).float()


def class_mean_maps(maps: torch.Tensor, classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, *S) mean map per class; NaN where a class has no image."""
    out = torch.full((num_classes, *maps.shape[1:]), float("nan"))
    for c in range(num_classes):
        sel = classes == c
        if bool(sel.any()):
            out[c] = maps[sel].mean(0)
    return out


def map_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over classes (present in both) of the Pearson correlation of two (C, *S) class-mean maps."""
    vals = []
    for ma, mb in zip(a.flatten(1), b.flatten(1), strict=True):
        if torch.isnan(ma).any() or torch.isnan(mb).any():
            continue
        ma, mb = ma - ma.mean(), mb - mb.mean()
        denom = float(ma.norm() * mb.norm())
        vals.append(float((ma * mb).sum()) / denom if denom > 0 else 0.0)
    return float(np.mean(vals)) if vals else float("nan")
