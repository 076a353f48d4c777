"""``fedmed serve``: the federation's server; sites on other machines connect through Flower.

Wiring only: :func:`fedmed.flower.serve.serve_federation` runs it.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from fedmed.flower.serve import serve_federation


def run(cfg: DictConfig) -> dict[str, Any]:
    """Wait for every site of ``federation.sites`` to connect, then run the federation."""
    return serve_federation(cfg)
