"""What leaves a site: the weights as they are, a compressed update, or a masked contribution.

Under secure aggregation (:mod:`fedmed.privacy.secagg`) the site protects itself from the server
it talks to, whatever the server says:

- configured for secure aggregation (``masked_only``), it sends its update and its class statistics
  only masked: a server that asks for them without masking instructions gets a refusal, not the
  values in the clear;
- a fresh key pair for every masked update (:meth:`UpdateChannel.public_key`), used to mask once
  and forgotten after its masks are revealed: a repeated round index, a second ``package`` or a
  resumed server never gets two updates under the same masks, nor a second reveal;
- with a roster (``federation.auth.supernode_keys``), its masking key signed with its own
  SuperNode key, and every peer's key checked against the peer's registered key before it masks:
  a key the server made is refused;
- no attestation and no reveal for fewer survivors than :func:`~fedmed.privacy.secagg.threshold`,
  one survivor set attested per update, its self mask revealed only when every other survivor
  attested the same set, and for each peer either the pairwise mask (it dropped) or nothing.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fedmed.federated.compression import UpdateEncoder
from fedmed.federated.messages import FitResult, StateDict
from fedmed.privacy import secagg
from fedmed.privacy.identity import Signer, verify


class UpdateChannel:
    """A site's way of sending its update.

    Args:
        site: the site's name (secure aggregation derives its pairwise masks from it).
        encoder: compress updates with this codec (None: send the weights raw).
        signer: this site's SuperNode key: it signs the site's masking keys.
        roster: site -> registered public key (DER): the peers' masking keys must carry their
            signatures (None: keys are taken as relayed, for sites in the server's own process).
        masked_only: this site's config has ``privacy.secure_aggregation``: nothing it sends about its
            data (update, class statistics) leaves it unmasked, whatever the server asks.
    """

    def __init__(self, site: str, encoder: UpdateEncoder | None = None, signer: Signer | None = None,
                 roster: Mapping[str, bytes] | None = None, masked_only: bool = False):
        self.site, self.encoder, self.masked_only = site, encoder, masked_only
        self.signer, self.roster = signer, (dict(roster) if roster is not None else None)
        self._fresh: tuple[int, secagg.MaskingKey] | None = None  # a key pair handed out, not yet used to mask
        self._round: dict[str, Any] = {}  # the last masked update: round, peers, key, attested, revealed

    def public_key(self, round_idx: int) -> tuple[bytes, bytes]:
        """A fresh key pair for ``round_idx``'s masked update: (its public half, this site's signature over it).

        Every call makes a new pair; one handed out earlier that masked nothing is dropped.
        """
        key = secagg.MaskingKey()
        self._fresh = (round_idx, key)
        statement = secagg.key_statement(self.site, round_idx, key.public)
        return key.public, self.signer.sign(statement) if self.signer is not None else b""

    def package(self, result: FitResult, start: StateDict, instructions: Mapping[str, Any]) -> FitResult:
        """Turn ``result`` into what is sent: with ``instructions["secagg"]`` (peers' public keys) a
        masked contribution, else with an encoder a compressed update, else the weights."""
        plan = self.plan(instructions.get("secagg"), "its update")
        if plan is not None:
            bad = [k for k, v in result.weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
            if bad:  # the server cannot look inside a masked update: the site checks its own
                raise ValueError(f"site {self.site}: its update has NaN/Inf in {bad[:3]}; not sent")
            vector = secagg.contribution(result.weights, result.num_samples, plan["pooled_bn"])
            result.masked = self.mask(vector, plan)
            result.weights = {}
        elif self.encoder is not None:
            result.payload = self.encoder.encode(result.weights, start)
            result.weights = {}
        return result

    def plan(self, plan: Mapping[str, Any] | None, what: str) -> Mapping[str, Any] | None:
        """The server's masking instructions for sending ``what``; refused where this site sends only masked."""
        if plan is None and self.masked_only:
            raise ValueError(f"site {self.site} sends {what} only masked (privacy.secure_aggregation); the server "
                             "asked for it without masking keys: nothing is sent")
        return plan

    def mask(self, vector: np.ndarray, plan: Mapping[str, Any]) -> np.ndarray:
        """``vector`` masked under this round's fresh key and the peers' keys in ``plan``; the key masks nothing
        else, and the site can attest and reveal for it once."""
        round_idx, peers = int(plan["round"]), dict(plan["peers"])
        key = self._checked_key(round_idx, peers, dict(plan.get("signatures") or {}))
        masked = secagg.mask(vector, key, self.site, peers, round_idx)
        self._fresh = None  # this key masks nothing else
        self._round = {"round": round_idx, "peers": peers, "key": key, "attested": None, "revealed": False}
        return masked

    def _checked_key(self, round_idx: int, peers: Mapping[str, bytes], signatures: Mapping[str, bytes]
                     ) -> secagg.MaskingKey:
        """This round's fresh key, once the round's peers are ones this site can mask with."""
        if self._fresh is None or self._fresh[0] != round_idx:
            raise ValueError(f"site {self.site} has no fresh masking key for round {round_idx}: each masked update "
                             "needs a key of its own")
        key = self._fresh[1]
        if bytes(peers.get(self.site, b"")) != key.public:
            raise ValueError(f"site {self.site}: the server did not relay this site's own masking key")
        need = secagg.threshold(len(peers))
        if len(peers) < need:
            raise ValueError(f"site {self.site}: {len(peers)} site(s) in round {round_idx}; secure aggregation "
                             f"needs at least {need}")
        if self.roster is not None:
            for peer, public in peers.items():
                registered = self.roster.get(peer)
                if registered is None or not verify(registered, secagg.key_statement(peer, round_idx, bytes(public)),
                                                    bytes(signatures.get(peer, b""))):
                    raise ValueError(f"site {self.site}: the masking key of {peer!r} for round {round_idx} is not "
                                     "signed by that site's registered key; nothing is sent")
        return key

    def _masked_round(self, round_idx: int) -> dict[str, Any]:
        if self._round.get("round") != round_idx:
            raise ValueError(f"site {self.site} masked no update in round {round_idx}")
        return self._round

    def attest(self, round_idx: int, survivors: Sequence[str]) -> dict[str, bytes]:
        """Secure aggregation: a tag per other survivor saying the server named ``survivors`` (once per update)."""
        state, named = self._masked_round(round_idx), sorted(survivors)
        if state["attested"] is not None and state["attested"] != named:
            raise ValueError(f"site {self.site} already attested the survivors {state['attested']} in round "
                             f"{round_idx}; a second account of who survived ({named}) is refused")
        if self.site not in named or not set(named) <= set(state["peers"]):
            raise ValueError(f"site {self.site}: survivors {named} are not sites of round {round_idx} including it")
        self._enough(named, state, round_idx)
        if state["key"] is None:
            raise ValueError(f"site {self.site} already revealed its masks for round {round_idx}")
        state["attested"] = named
        return {u: secagg.attest_tag(state["key"], state["peers"][u], round_idx, named)
                for u in named if u != self.site}

    def _enough(self, named: Sequence[str], state: Mapping[str, Any], round_idx: int) -> None:
        need = secagg.threshold(len(state["peers"]))
        if len(named) < need:
            raise ValueError(f"site {self.site}: {len(named)} survivor(s) of {len(state['peers'])} in round "
                             f"{round_idx}; it reveals nothing for fewer than {need}")

    def dropout_correction(self, dropped: Sequence[str], round_idx: int, length: int, survivors: Sequence[str],
                           tags: Mapping[str, bytes]) -> np.ndarray:
        """Secure aggregation: this site's self mask and its masks with the ``dropped`` sites, once the other
        survivors' ``tags`` show they were all told the same ``survivors`` as this site attested."""
        state, named = self._masked_round(round_idx), sorted(survivors)
        key = state["key"]
        if state["revealed"] or key is None:
            raise ValueError(f"site {self.site} already revealed its masks for round {round_idx}")
        if state["attested"] != named:
            raise ValueError(f"site {self.site} attested {state['attested']} in round {round_idx}, not {named}")
        if set(named) & set(dropped) or set(named) | set(dropped) != set(state["peers"]):
            raise ValueError(f"site {self.site}: survivors {named} and dropped {sorted(dropped)} are not a split "
                             f"of round {round_idx}'s sites {sorted(state['peers'])}")
        self._enough(named, state, round_idx)
        for u in named:
            if u != self.site and not hmac.compare_digest(
                    bytes(tags.get(u, b"")), secagg.attest_tag(key, state["peers"][u], round_idx, named)):
                raise ValueError(f"site {self.site}: site {u} did not attest the survivors {named}; "
                                 "masks not revealed")
        state["revealed"], state["key"] = True, None  # the key is forgotten: nothing more can be revealed
        return secagg.reveal(key, self.site, {v: state["peers"][v] for v in dropped}, round_idx, length)

    def state_dict(self) -> dict[str, Any]:
        """What the server may keep for this site (its checkpoint): never a masking key."""
        return {"encoder": self.encoder.state_dict() if self.encoder else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.encoder is not None and state.get("encoder"):
            self.encoder.load_state_dict(state["encoder"])

    def secret_state(self) -> dict[str, Any]:
        """What only the site keeps between processes (a SuperNode started by hand): its keys and masked update."""
        out: dict[str, Any] = {}
        if self._fresh is not None:
            out["fresh"] = {"round": self._fresh[0], "private": self._fresh[1].private_bytes()}
        if self._round:
            key = self._round["key"]
            out["round"] = {**{k: v for k, v in self._round.items() if k != "key"},
                            "private": key.private_bytes() if key is not None else None}
        return out

    def load_secret_state(self, state: Mapping[str, Any]) -> None:
        fresh, masked = state.get("fresh"), state.get("round")
        self._fresh = (int(fresh["round"]), secagg.MaskingKey(fresh["private"])) if fresh else None
        if masked:
            private = masked.get("private")
            self._round = {**{k: v for k, v in masked.items() if k != "private"},
                           "key": secagg.MaskingKey(private) if private is not None else None}
