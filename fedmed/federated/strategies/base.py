"""What a strategy is: the server's half of a round, the site's half, and what it works with.

The shape follows Flower's ``Strategy``: :meth:`Strategy.configure_fit` says what every site is
asked to do this round, :meth:`Strategy.aggregate_fit` turns the sites' answers into the next
global weights. A strategy with work to do at the sites (an extra loss term, a gradient
correction, its own optimizer, layers a site keeps) gives each site a :class:`SitePart`; the
round loop and the site never branch on a strategy's name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import nn

from fedmed.aggregation import fedavg

if TYPE_CHECKING:  # Lightning only where a site trains: the config check imports strategies without it
    import lightning as L

StateDict = Mapping[str, torch.Tensor]


class Update(Protocol):
    """What a strategy reads of one site's answer (:class:`fedmed.federated.messages.FitResult`)."""

    site: str
    weights: dict[str, torch.Tensor]
    num_samples: int
    extras: dict[str, Any]


class SitePart:
    """A strategy's work at one site; the site keeps it between rounds and in its checkpoint.

    For each round the site calls, in this order: :meth:`configure` with the round's
    instructions, :meth:`local_weights` on the global weights it starts from, :meth:`before_training`
    on the network, then trains with :meth:`extra_loss`, :meth:`make_optimizer` and
    :meth:`callbacks`, and finally :meth:`after_training`, whose result travels with the update.
    Evaluation also goes through :meth:`local_weights`. The default does nothing: plain local training.
    """

    def configure(self, instructions: Mapping[str, Any]) -> None:
        """Read this round's instructions (what :meth:`Strategy.configure_fit` sent)."""

    def local_weights(self, weights: StateDict) -> StateDict:
        """The weights this site trains and evaluates: the global ones, or some of its own in their place."""
        return weights

    def before_training(self, net: nn.Module) -> None:
        """Called with the network holding the round's starting weights, before the first step."""

    @property
    def keeps_optimizer_state(self) -> bool:
        """Whether the site's optimizer moments may carry over to the next round."""
        return True

    def extra_loss(self, net: nn.Module) -> torch.Tensor | None:
        """A term added to every training step's loss (None: none)."""
        return None

    def make_optimizer(self, params: Iterable[nn.Parameter], weight_decay: float) -> torch.optim.Optimizer | None:
        """The optimizer this strategy needs at the site (None: the model's own)."""
        return None

    def callbacks(self) -> list[L.Callback]:
        """Lightning callbacks for this round's training (e.g. a gradient correction)."""
        return []

    def after_training(self, start: StateDict, new: StateDict, steps: int,
                       lr_factors: Sequence[float]) -> dict[str, Any]:
        """What the server needs besides the weights (sent with the update).

        Args:
            start: the weights training started from.
            new: the weights after training.
            steps: optimizer steps taken.
            lr_factors: each local epoch's learning rate as a share of the configured one.
        """
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


class Strategy:
    """FedAvg (McMahan et al. 2017): the sample-weighted mean of the sites' weights; the base of the others.

    Args:
        bn_stats: BatchNorm running statistics: ``pooled`` (the moments of the pooled data) or ``mean``.
        num_sites: sites in the federation (strategies that need it check or use it).
    """

    name: ClassVar[str] = "fedavg"
    #: the aggregate needs only the sum of the (weighted) updates, so secure aggregation can run
    summable: ClassVar[bool] = True
    #: why Opacus' DP-SGD cannot carry this strategy's site part (None: it can)
    dp_incompatible: ClassVar[str | None] = None
    #: the strategy only makes sense for a model with BatchNorm layers
    needs_batchnorm: ClassVar[bool] = False

    def __init__(self, bn_stats: str = "pooled", num_sites: int | None = None):
        if bn_stats not in ("pooled", "mean"):
            raise ValueError(f"strategy.bn_stats must be pooled or mean, got {bn_stats!r}")
        self.bn_stats = bn_stats
        self.num_sites = num_sites

    def configure_fit(self, global_w: StateDict) -> dict[str, Any]:
        """Instructions sent to every sampled site with this round's global weights."""
        return {}

    def aggregate_fit(self, global_w: StateDict, fits: Sequence[Update]) -> dict[str, torch.Tensor]:
        """The next global weights from the sites' updates."""
        return fedavg([f.weights for f in fits], [f.num_samples for f in fits], bn_stats=self.bn_stats)

    def site_part(self) -> SitePart:
        """A fresh site-side part for one site."""
        return SitePart()

    def state_dict(self) -> dict[str, Any]:
        """The server-side state a resumed federation needs (e.g. optimizer moments)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
