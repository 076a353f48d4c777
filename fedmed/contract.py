"""What every site of a federation must agree on with the server before it is sent any weights.

A site declares its terms in its hello; the server compares them with its own and refuses a site
whose terms differ, naming the first key (``fedmed.flower.grid.accept``). A site trained on another
data set, with another network or preprocessing, without the federation's DP-SGD or under another
strategy would otherwise be averaged in silently.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedmed.build import dp_config, label_prior
from fedmed.privacy.dp import describe

PREFIX = "contract."  # the terms travel in the hello as contract.<key>


def _plain(node) -> str:
    value = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    return json.dumps(value, sort_keys=True, default=str)


def terms(cfg: DictConfig, weights: Mapping[str, Any]) -> dict[str, str]:
    """The federation's terms as this config sees them: key -> value, as text. ``weights``: the state dict of
    the network this side built from ``cfg`` (its parameter names, shapes and dtypes are a term)."""
    shapes = ";".join(f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in weights.items())
    fed, data = cfg.federation, cfg.data
    return {
        "data.name": str(data.name),
        "data.num_classes": str(data.num_classes),
        "data.transforms": _plain(data.get("transforms")),
        "model.net": _plain(cfg.model.net),
        "model.parameters": hashlib.sha256(shapes.encode()).hexdigest()[:16],
        "partition": _plain(cfg.partition),
        "privacy.dp": describe(dp_config(cfg)),
        "federation.plan": f"rounds={fed.rounds} local_epochs={fed.local_epochs} finetune_epochs={fed.finetune_epochs}",
        "model.loss": f"logit_adjust={cfg.model.get('logit_adjust', 0.0)} logit_prior={label_prior(cfg)} "
                      f"decorrelation={cfg.model.get('decorrelation', 0.0)} "
                      f"freeze_head={bool(cfg.model.get('freeze_head', False))} "
                      f"fix_batchnorm_from={cfg.model.get('fix_batchnorm_from')}",
        "federation.calibrate_head": f"{bool(fed.get('calibrate_head'))} "
                                     f"min_images={fed.get('calibrate_min_images', 10)} "
                                     f"every_round_from={fed.get('calibrate_from')}",
        "strategy": _plain(cfg.strategy),
        "federation.weighting": str(fed.get("weighting", "examples")),
        "federation.style": f"mix={fed.get('style_mix', 0.0)} band={fed.get('style_band', 0.1)}",
        "privacy.secure_aggregation": str(bool(cfg.privacy.secure_aggregation)),
        "federation.compression": f"{fed.compression} topk_fraction={fed.topk_fraction} "
                                  f"error_feedback={fed.error_feedback}",
    }


def declared(hello: Mapping[str, object]) -> dict[str, str]:
    """The terms a site declared in its hello."""
    return {k[len(PREFIX):]: str(v) for k, v in hello.items() if k.startswith(PREFIX)}


def as_hello(own: Mapping[str, str]) -> dict[str, str]:
    return {PREFIX + k: v for k, v in own.items()}


def first_difference(federation: Mapping[str, str], site: Mapping[str, str]) -> str | None:
    """Why a site's terms are not the federation's (the first differing key), or None."""
    for key, want in federation.items():
        got = site.get(key)
        if got is None:
            return f"it declared no {key} (an older fedmed?)"
        if got != want:
            return f"its {key} is {_short(got)}, the federation's is {_short(want)}"
    return None


def _short(text: str, limit: int = 160) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
