"""Federated learning: site client, orchestrator (server round loop), aggregation strategies."""

from fedmed.federated.aggregation import fedavg, state_nbytes
from fedmed.federated.client import EvalResult, FitResult, SiteClient
from fedmed.federated.server import FederationError, FederationResult, Orchestrator
from fedmed.federated.strategies import STRATEGIES, Strategy, make_strategy
from fedmed.federated.transport import InProcessSite

__all__ = [
    "STRATEGIES",
    "EvalResult",
    "FederationError",
    "FederationResult",
    "FitResult",
    "InProcessSite",
    "Orchestrator",
    "SiteClient",
    "Strategy",
    "fedavg",
    "make_strategy",
    "state_nbytes",
]
