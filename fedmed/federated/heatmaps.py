"""A site's explanations of the global model during a federation: heatmaps into its own MLflow run,
only numbers back to the server."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fedmed.data.datamodule import ArrayDataset
from fedmed.explain import class_mean_maps, deletion_insertion, explain, heatmap_grid, map_correlation, predict
from fedmed.explain.localisation import localisation_table
from fedmed.explain.sampling import stratified_sample


@dataclass(frozen=True)
class ExplainSettings:
    """Args: method: a method of :data:`fedmed.explain.METHODS`; n: images explained per site."""

    method: str = "gradcam"
    n: int = 16


class SiteHeatmaps:
    """Explains a fixed, class-stratified sample of one site's validation images.

    Args:
        site: the site's name (figure titles).
        data: the site's validation data.
        num_classes: classes of the task.
        settings: method and sample size.
        seed: picks the sample (the same images every round) and seeds the faithfulness baselines.
        class_names: for the figures.
        masks: evidence masks of ``data`` (N, 1, *spatial), where the site has them: the maps are scored
            against them (:mod:`fedmed.explain.localisation`), beside a centre-prior baseline; the masks
            stay here, only the numbers leave.
    """

    def __init__(self, site: str, data: ArrayDataset, num_classes: int, settings: ExplainSettings, seed: int,
                 class_names: list[str] | None = None, masks: torch.Tensor | None = None):
        self.site, self.data, self.num_classes, self.settings = site, data, num_classes, settings
        self.seed, self.class_names, self.masks = seed, class_names, masks
        self.previous: torch.Tensor | None = None  # last explained round's per-class mean maps

    def explain(self, net: nn.Module, round_idx: int,
                log_figure: Callable[[object, str], None] | None = None) -> tuple[dict[str, float], torch.Tensor]:
        """Deletion / insertion AUC and consistency with the previous explained round, and a coarse
        (C, 7, 7[, 7]) per-class mean map for cross-site comparison (numbers only)."""
        import matplotlib.pyplot as plt

        method, k = self.settings.method, self.num_classes
        idx = stratified_sample(self.data.y, int(self.settings.n), self.seed)
        x, y = self.data.x[idx], self.data.y[idx]
        pred, conf = predict(net, x)
        maps = explain(net, x, method, pred)
        deletion, insertion = deletion_insertion(net, x, maps, pred, seed=self.seed)
        xai = {"xai_deletion_auc": float(deletion.mean()), "xai_insertion_auc": float(insertion.mean())}
        if self.masks is not None:
            table = localisation_table({"model": maps}, self.masks[idx][:, 0], seed=self.seed)
            xai |= {f"xai_{m}": v for m, v in table["model"].items()}
            xai |= {f"xai_centre_{m}": v for m, v in table["baseline: centre"].items()}
        means = class_mean_maps(maps, y, k)
        if self.previous is not None:
            xai["xai_round_consistency"] = map_correlation(means, self.previous)
        self.previous = means
        if log_figure is not None:
            names = self.class_names or [str(c) for c in range(k)]
            fig = heatmap_grid(x, maps, y, pred, conf, names,
                               f"{self.site}, round {round_idx}: {method} of the global model")
            log_figure(fig, f"heatmaps/round_{round_idx:03d}.png")
            plt.close(fig)
        pool = torch.nn.functional.adaptive_avg_pool2d if means.ndim == 3 else torch.nn.functional.adaptive_avg_pool3d
        return xai, pool(means, 7)
