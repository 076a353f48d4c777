"""How scores are recorded in MLflow: metric names with their interval bounds, and ``evaluation.json``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fedmed.evaluation.scores import LEVEL, Scores


def metric_values(prefix: str, scores: Scores) -> dict[str, float]:
    """``<prefix>/<metric>`` with ``_low`` / ``_high`` (the interval), defined values only."""
    return {f"{prefix}/{m}{suffix}": v[part] for m, v in scores.summary().items()
            for suffix, part in (("", "value"), ("_low", "low"), ("_high", "high")) if np.isfinite(v[part])}


def evaluation_record(parts: Sequence[tuple[str, Scores]]) -> dict[str, Any]:
    """What ``evaluation.json`` holds: per data set its kind, images per class and every metric with its interval."""
    first = parts[0][1]
    return {"level": LEVEL, "n_boot": first.n_boot, "seed": first.seed,
            "scores": {s.name: {"kind": kind, "images_per_class": s.support.tolist(), "metrics": s.summary()}
                       for kind, s in parts}}
