"""Does a heatmap point at the evidence? Localisation against expert masks, with two honest baselines.

Per image (maps and masks of one shape, ``(N, *spatial)``):

- **pointing game**: the map's maximum lies inside the mask (any of its maximal pixels);
- **relevance mass**: the share of the map's positive relevance that falls inside the mask;
- **relevance rank**: of the ``|mask|`` most relevant pixels, the share inside the mask;
- **top-k IoU**: intersection over union of the map's top ``top`` share of pixels with the mask.

The baselines need no model: a **random** map (uniform noise) scores about the mask's area; a
**centre prior** (a centred Gaussian) scores what "look at the middle" earns where lesions are
photographed centred, as in dermoscopy. A method must beat the centre to show that it localises.
``tests/test_localisation.py`` checks the first three against Quantus and the IoU against scikit-learn.
"""

from __future__ import annotations

import torch

METRICS = ("pointing_game", "relevance_mass", "relevance_rank", "top_iou")
BASELINES = ("random", "centre")


def localisation(maps: torch.Tensor, masks: torch.Tensor, top: float = 0.25) -> dict[str, torch.Tensor]:
    """The four metrics per image: (N,) float each; NaN for an empty mask."""
    if maps.shape != masks.shape:
        raise ValueError(f"maps {tuple(maps.shape)} and masks {tuple(masks.shape)} differ")
    a = maps.reshape(len(maps), -1).double().clamp(min=0)
    s = masks.reshape(len(masks), -1).bool()
    n, size = s.shape
    area = s.sum(1)
    at_max = a == a.max(1, keepdim=True).values
    pointing = (at_max & s).any(1).double()
    total = a.sum(1)
    mass = torch.where(total > 0, (a * s).sum(1) / total.clamp(min=1e-300), torch.zeros_like(total))
    order = torch.argsort(-a, dim=1, stable=True)
    ranked = torch.gather(s, 1, order)  # the mask along the pixels from most to least relevant
    first = torch.arange(size).expand(n, size) < area[:, None]
    rank = (ranked & first).sum(1).double() / area.clamp(min=1).double()
    k = max(1, round(top * size))
    chosen = torch.zeros_like(s)
    chosen.scatter_(1, order[:, :k], True)
    iou = (chosen & s).sum(1).double() / (chosen | s).sum(1).double()
    out = {"pointing_game": pointing, "relevance_mass": mass, "relevance_rank": rank.double(), "top_iou": iou.double()}
    empty = area == 0
    return {name: torch.where(empty, torch.full_like(v, float("nan")), v) for name, v in out.items()}


def baseline_maps(kind: str, shape: tuple[int, ...], seed: int = 0, sigma: float = 0.25) -> torch.Tensor:
    """``random`` (uniform noise, seeded) or ``centre`` (a Gaussian at the image centre, ``sigma`` times each
    side) maps of ``shape`` = (N, *spatial)."""
    if kind == "random":
        return torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    if kind == "centre":
        axes = [((torch.arange(n) + 0.5) / n - 0.5) / sigma for n in shape[1:]]
        grids = torch.meshgrid(*axes, indexing="ij")
        prior = torch.exp(-0.5 * torch.stack([g**2 for g in grids]).sum(0))
        return prior.expand(shape).clone()
    raise ValueError(f"baseline {kind!r} is not one of {BASELINES}")


def localisation_table(maps: dict[str, torch.Tensor], masks: torch.Tensor, seed: int = 0,
                       top: float = 0.25) -> dict[str, dict[str, float]]:
    """Mean of each metric for every method's maps and for the two baselines on the same masks."""
    rows = {name: localisation(m, masks, top) for name, m in maps.items()}
    shape = tuple(masks.shape)
    rows |= {f"baseline: {b}": localisation(baseline_maps(b, shape, seed), masks, top) for b in BASELINES}
    return {name: {k: float(torch.nanmean(v)) for k, v in r.items()} for name, r in rows.items()}
