"""How the server reaches a site: the :class:`SiteTransport` interface, and the in-process one."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from fedmed.federated.messages import EvalResult, FitResult, clone_state
from fedmed.federated.site import SiteClient


@runtime_checkable
class SiteTransport(Protocol):
    """What the orchestrator needs of a site, wherever it runs."""

    name: str
    #: the site runs elsewhere (its own process or machine): the orchestrator may call several at once
    parallel: bool

    def fit(self, weights: Mapping[str, torch.Tensor], round_idx: int, epochs: int,
            instructions: Mapping[str, Any] | None = None) -> FitResult: ...

    def evaluate(self, weights: Mapping[str, torch.Tensor], round_idx: int, explain: bool = False) -> EvalResult: ...

    def finetune(self, weights: Mapping[str, torch.Tensor], round_idx: int, epochs: int,
                 instructions: Mapping[str, Any] | None = None) -> EvalResult:
        """Personalisation: the site trains ``weights`` on its own data, keeps the result in its own
        run (metrics ``personalized_val_*``, its model) and returns only its validation numbers."""
        ...

    def score(self, weights: Mapping[str, torch.Tensor]) -> dict[str, Any] | None:
        """The final model on the site's own test images: numbers only (:meth:`SiteClient.score`)."""
        ...

    def statistics(self, weights: Mapping[str, torch.Tensor] | None, features: bool,
                   secagg: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The site's training images per class and, with ``features``, per-class feature moments of ``weights``;
        with ``secagg``, masked (:meth:`SiteClient.statistics`)."""
        ...

    def style(self) -> dict[str, Any]:
        """The site's mean low-frequency amplitude spectrum (:meth:`SiteClient.style`)."""
        ...

    def public_key(self, round_idx: int) -> tuple[bytes, bytes]: ...

    def attest(self, round_idx: int, survivors: list[str]) -> dict[str, bytes]: ...

    def dropout_correction(self, dropped: list[str], round_idx: int, length: int, survivors: list[str],
                           tags: Mapping[str, bytes]) -> np.ndarray: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class InProcessSite:
    """A site in this process. Weights are copied both ways, as they would be over a wire.

    Args:
        client: the site's :class:`SiteClient`.
    """

    parallel = False

    def __init__(self, client: SiteClient):
        self.client = client
        self.name = client.name

    def fit(self, weights: Mapping[str, torch.Tensor], round_idx: int, epochs: int,
            instructions: Mapping[str, Any] | None = None) -> FitResult:
        result = self.client.train(clone_state(weights), round_idx, epochs, instructions)
        result.weights = clone_state(result.weights)
        return result

    def public_key(self, round_idx: int) -> tuple[bytes, bytes]:
        return self.client.public_key(round_idx)

    def attest(self, round_idx: int, survivors: list[str]) -> dict[str, bytes]:
        return self.client.attest(round_idx, list(survivors))

    def dropout_correction(self, dropped: list[str], round_idx: int, length: int, survivors: list[str],
                           tags: Mapping[str, bytes]) -> np.ndarray:
        return self.client.dropout_correction(list(dropped), round_idx, length, list(survivors), dict(tags))

    def state_dict(self) -> dict[str, Any]:
        return self.client.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.client.load_state_dict(state)

    def evaluate(self, weights: Mapping[str, torch.Tensor], round_idx: int, explain: bool = False) -> EvalResult:
        return self.client.evaluate(clone_state(weights), round_idx, explain=explain)

    def finetune(self, weights: Mapping[str, torch.Tensor], round_idx: int, epochs: int,
                 instructions: Mapping[str, Any] | None = None) -> EvalResult:
        return self.client.finetune(clone_state(weights), round_idx, epochs, instructions)

    def score(self, weights: Mapping[str, torch.Tensor]) -> dict[str, Any] | None:
        return self.client.score(clone_state(weights))

    def statistics(self, weights: Mapping[str, torch.Tensor] | None, features: bool,
                   secagg: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return self.client.statistics(clone_state(weights) if weights is not None else None, features,
                                      copy.deepcopy(secagg))

    def style(self) -> dict[str, Any]:
        return copy.deepcopy(self.client.style())
