"""What leaves a site: the weights as they are, a compressed update, or a masked contribution."""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence
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
        self._round: dict[str, Any] = {}  # the last masked round: its number, peers, what was attested, revealed

    @property
    def masking_key(self) -> secagg.MaskingKey | None:
        """This site's secure-aggregation key pair (None until first used)."""
        return self._key

    @masking_key.setter
    def masking_key(self, key: secagg.MaskingKey | None) -> None:
        self._key = key

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
            self._round = {"round": int(plan["round"]), "peers": dict(plan["peers"]), "attested": None,
                           "revealed": False}
        elif self.encoder is not None:
            result.payload = self.encoder.encode(result.weights, start)
            result.weights = {}
        return result

    def _masked_round(self, round_idx: int) -> dict[str, Any]:
        if self._key is None or self._round.get("round") != round_idx:
            raise ValueError(f"site {self.site} masked no update in round {round_idx}")
        return self._round

    def attest(self, round_idx: int, survivors: Sequence[str]) -> dict[str, bytes]:
        """Secure aggregation: a tag per other survivor saying the server named ``survivors`` (once per round)."""
        state, named = self._masked_round(round_idx), sorted(survivors)
        if state["attested"] is not None and state["attested"] != named:
            raise ValueError(f"site {self.site} already attested the survivors {state['attested']} in round "
                             f"{round_idx}; a second account of who survived ({named}) is refused")
        if self.site not in named or not set(named) <= set(state["peers"]):
            raise ValueError(f"site {self.site}: survivors {named} are not sites of round {round_idx} including it")
        state["attested"] = named
        assert self._key is not None
        return {u: secagg.attest_tag(self._key, state["peers"][u], round_idx, named) for u in named if u != self.site}

    def dropout_correction(self, dropped: Sequence[str], round_idx: int, length: int, survivors: Sequence[str],
                           tags: Mapping[str, bytes]) -> np.ndarray:
        """Secure aggregation: this site's self mask and its masks with the ``dropped`` sites, once the other
        survivors' ``tags`` show they were all told the same ``survivors`` as this site attested."""
        state, named = self._masked_round(round_idx), sorted(survivors)
        if state["revealed"]:
            raise ValueError(f"site {self.site} already revealed its masks for round {round_idx}")
        if state["attested"] != named:
            raise ValueError(f"site {self.site} attested {state['attested']} in round {round_idx}, not {named}")
        if set(named) & set(dropped) or set(named) | set(dropped) != set(state["peers"]):
            raise ValueError(f"site {self.site}: survivors {named} and dropped {sorted(dropped)} are not a split "
                             f"of round {round_idx}'s sites {sorted(state['peers'])}")
        assert self._key is not None
        for u in named:
            if u != self.site and not hmac.compare_digest(
                    bytes(tags.get(u, b"")), secagg.attest_tag(self._key, state["peers"][u], round_idx, named)):
                raise ValueError(f"site {self.site}: site {u} did not attest the survivors {named}; "
                                 "masks not revealed")
        state["revealed"] = True
        return secagg.reveal(self._key, self.site, {v: state["peers"][v] for v in dropped}, round_idx, length)

    def state_dict(self) -> dict[str, Any]:
        return {"encoder": self.encoder.state_dict() if self.encoder else None, "secagg_round": dict(self._round)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.encoder is not None and state.get("encoder"):
            self.encoder.load_state_dict(state["encoder"])
        self._round = dict(state.get("secagg_round") or {})
