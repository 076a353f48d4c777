"""Federated learning: the orchestrator (the server's round loop), the site client and its parts,
strategies (one file each), and the transports between them.

The names below are imported on first use, so that ``fedmed.federated.strategies`` (which the config
check reads) comes without the orchestrator's and the site's Lightning stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedmed.aggregation import fedavg, state_nbytes
    from fedmed.errors import FederationError
    from fedmed.federated.messages import EvalResult, FitResult
    from fedmed.federated.orchestrator import FederationResult, FederationSettings, Orchestrator
    from fedmed.federated.site import SiteClient
    from fedmed.federated.strategies import Strategy
    from fedmed.federated.training import TrainingSettings
    from fedmed.federated.transport import InProcessSite, SiteTransport

_WHERE = {
    "fedavg": "fedmed.aggregation", "state_nbytes": "fedmed.aggregation", "FederationError": "fedmed.errors",
    "EvalResult": "fedmed.federated.messages", "FitResult": "fedmed.federated.messages",
    "FederationResult": "fedmed.federated.orchestrator", "FederationSettings": "fedmed.federated.orchestrator",
    "Orchestrator": "fedmed.federated.orchestrator", "SiteClient": "fedmed.federated.site",
    "Strategy": "fedmed.federated.strategies", "TrainingSettings": "fedmed.federated.training",
    "InProcessSite": "fedmed.federated.transport", "SiteTransport": "fedmed.federated.transport",
}

__all__ = [
    "EvalResult",
    "FederationError",
    "FederationResult",
    "FederationSettings",
    "FitResult",
    "InProcessSite",
    "Orchestrator",
    "SiteClient",
    "SiteTransport",
    "Strategy",
    "TrainingSettings",
    "fedavg",
    "state_nbytes",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'fedmed.federated' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
