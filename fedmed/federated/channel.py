"""What leaves a site: the weights as they are, a compressed update, or a masked contribution."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from fedmed.federated.compression import UpdateEncoder
from fedmed.federated.messages import FitResult, StateDict
from fedmed.privacy import secagg


class UpdateChannel:
    """A site's way of sending its update.

    Args:
        site: the site's name (secure aggregation derives its pairwise masks from it).
        encoder: compress updates with this codec (None: send the weights raw).
    """

    def __init__(self, site: str, encoder: UpdateEncoder | None = None):
        self.site, self.encoder = site, encoder
        self._key: secagg.MaskingKey | None = None  # secure aggregation key pair, made on first use

    def public_key(self) -> bytes:
        """This site's public key for secure aggregation (the private half stays here)."""
        if self._key is None:
            self._key = secagg.MaskingKey()
        return self._key.public

    def package(self, result: FitResult, start: StateDict, instructions: Mapping[str, Any]) -> FitResult:
        """Turn ``result`` into what is sent: with ``instructions["secagg"]`` (peers' public keys) a
        masked contribution, else with an encoder a compressed update, else the weights."""
        plan = instructions.get("secagg")
        if plan is not None:
            bad = [k for k, v in result.weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
            if bad:  # the server cannot look inside a masked update: the site checks its own
                raise ValueError(f"site {self.site}: its update has NaN/Inf in {bad[:3]}; not sent")
            self.public_key()
            assert self._key is not None
            vector = secagg.contribution(result.weights, result.num_samples, plan["pooled_bn"])
            result.masked = secagg.mask(vector, self._key, self.site, plan["peers"], plan["round"])
            result.weights = {}
        elif self.encoder is not None:
            result.payload = self.encoder.encode(result.weights, start)
            result.weights = {}
        return result

    def dropout_correction(self, dropped: Mapping[str, bytes], round_idx: int, length: int) -> np.ndarray:
        """Secure aggregation: this site's masks with the sites that dropped out of the round."""
        if self._key is None:
            raise ValueError(f"site {self.site} has no secure-aggregation key: it never masked an update")
        return secagg.dropout_correction(self._key, self.site, dropped, round_idx, length)

    def state_dict(self) -> dict[str, Any]:
        return {"encoder": self.encoder.state_dict() if self.encoder else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.encoder is not None and state.get("encoder"):
            self.encoder.load_state_dict(state["encoder"])
