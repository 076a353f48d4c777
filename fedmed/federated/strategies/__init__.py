"""Federated strategies, one file each; each is one object holding the server's and the sites' half.

A strategy is chosen with the ``strategy`` config group (``configs/strategy/<name>.yaml``, whose
``_target_`` names the class): ``fedmed fit strategy=fedprox strategy.mu=0.01``.

| strategy | server | site |
|---|---|---|
| fedavg | sample-weighted mean (BN stats pooled) | plain local training |
| fedprox | as fedavg | loss + mu/2 ||w - w_global||^2 |
| fedbn | as fedavg (global BN only for the pooled test) | keeps its own BatchNorm layers |
| fedavgm | mean, then a server momentum step | plain local training |
| fedadam / fedyogi | Adam / Yogi step on the pseudo-gradient | plain |
| scaffold | mean update + control variate c | SGD with gradient correction c - c_i |
| fednova | updates normalised by each site's local steps | reports its step count |
| median | coordinate-wise median | plain |
| trimmed_mean | coordinate-wise trimmed mean | plain |
| krum | (Multi-)Krum | plain |
"""

from fedmed.federated.strategies.base import SitePart, Strategy, Update
from fedmed.federated.strategies.fedavg import FedAvg
from fedmed.federated.strategies.fedbn import FedBN
from fedmed.federated.strategies.fedopt import FedAdam, FedYogi
from fedmed.federated.strategies.fedprox import FedProx
from fedmed.federated.strategies.robust import Krum, Median, TrimmedMean
from fedmed.federated.strategies.scaffold import Scaffold

__all__ = ["FedAdam", "FedAvg", "FedBN", "FedProx", "FedYogi", "Krum", "Median", "Scaffold", "SitePart",
           "Strategy", "TrimmedMean", "Update"]
