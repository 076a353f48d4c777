"""How well a trained model does on a data set, with uncertainty: metrics with stratified bootstrap
intervals, calibration, summaries that pool across sites without moving their images, the model card."""

from fedmed.evaluation.calibration import reliability_figure
from fedmed.evaluation.card import model_card
from fedmed.evaluation.scores import Scores, interval_table, pool, score

__all__ = ["Scores", "interval_table", "model_card", "pool", "reliability_figure", "score"]
