"""Explanations: CAMs and attributions, faithfulness numbers, heatmap figures."""

from fedmed.choices import ATTRIBUTION_METHODS, CAM_METHODS
from fedmed.explain.faithfulness import (
    area_fraction,
    class_mean_maps,
    deletion_insertion,
    map_correlation,
    randomized_copy,
    rank_correlation,
    relevance_mass,
)
from fedmed.explain.figures import heatmap_grid
from fedmed.explain.methods import METHODS, explain, predict

__all__ = [
    "ATTRIBUTION_METHODS", "CAM_METHODS", "METHODS", "area_fraction", "class_mean_maps", "deletion_insertion",
    "explain", "heatmap_grid", "predict", "map_correlation", "randomized_copy", "rank_correlation", "relevance_mass",
]
