"""Small builders the tests share: strategies from their YAML files, sites on synthetic data."""

from __future__ import annotations

from pathlib import Path

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fedmed.federated.strategies.base import Strategy

STRATEGY_DIR = Path(__file__).resolve().parents[1] / "configs" / "strategy"
STRATEGY_NAMES = sorted(p.stem for p in STRATEGY_DIR.glob("*.yaml"))


def strategy(name: str, **params) -> Strategy:
    """The strategy ``configs/strategy/<name>.yaml`` describes, with ``params`` overriding its keys."""
    node = OmegaConf.merge(OmegaConf.load(STRATEGY_DIR / f"{name}.yaml"), params)
    try:
        return instantiate(node)
    except InstantiationException as exc:  # the strategy's own error, as fedmed's builder shows it
        raise exc.__cause__ or exc from None
