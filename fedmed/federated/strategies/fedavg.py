"""FedAvg: the sample-weighted mean, with plain local training (:class:`~.base.Strategy` itself)."""

from fedmed.federated.strategies.base import Strategy


class FedAvg(Strategy):
    """FedAvg (McMahan et al. 2017). See :class:`~fedmed.federated.strategies.base.Strategy`."""

    name = "fedavg"
