"""Federated learning: site client, orchestrator (server round loop), aggregation strategies."""

from fedmed.federated.aggregation import FedAvg, fedavg, state_nbytes
from fedmed.federated.client import EvalResult, FitResult, SiteClient
from fedmed.federated.server import FederationResult, Orchestrator
from fedmed.federated.transport import InProcessSite

__all__ = [
    "EvalResult",
    "FedAvg",
    "FederationResult",
    "FitResult",
    "InProcessSite",
    "Orchestrator",
    "SiteClient",
    "fedavg",
    "state_nbytes",
]
