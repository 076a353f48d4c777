"""How the server reaches a site. In-process here; a network transport offers the same two calls."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedmed.federated.client import EvalResult, FitResult, SiteClient, clone_state


class InProcessSite:
    """A site in this process. Weights are copied both ways, as they would be over a wire.

    Args:
        client: the site's :class:`SiteClient`.
    """

    def __init__(self, client: SiteClient):
        self.client = client
        self.name = client.name

    def fit(self, weights: Mapping[str, torch.Tensor], round_idx: int, epochs: int, config=None) -> FitResult:
        result = self.client.train(clone_state(weights), round_idx, epochs, config)
        result.weights = clone_state(result.weights)
        return result

    def public_key(self) -> bytes:
        return self.client.public_key()

    def dropout_correction(self, dropped, round_idx: int, length: int):
        return self.client.dropout_correction(dict(dropped), round_idx, length)

    def state_dict(self):
        return self.client.state_dict()

    def load_state_dict(self, state) -> None:
        self.client.load_state_dict(state)

    def evaluate(self, weights: Mapping[str, torch.Tensor], round_idx: int, explain: bool = False) -> EvalResult:
        return self.client.evaluate(clone_state(weights), round_idx, explain=explain)
