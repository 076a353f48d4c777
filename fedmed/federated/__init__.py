"""Federated learning: the orchestrator (the server's round loop), the site client and its parts,
strategies (one file each), and the transports between them."""

from fedmed.aggregation import fedavg, state_nbytes
from fedmed.errors import FederationError
from fedmed.federated.messages import EvalResult, FitResult
from fedmed.federated.orchestrator import FederationResult, FederationSettings, Orchestrator
from fedmed.federated.site import SiteClient
from fedmed.federated.strategies import Strategy
from fedmed.federated.training import TrainingSettings
from fedmed.federated.transport import InProcessSite, SiteTransport

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
