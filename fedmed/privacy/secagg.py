"""Secure aggregation by pairwise additive masking with a self mask (Bonawitz et al. 2017's double masking).

Each site holds an X25519 key pair. For a round, every pair of participating sites (i, j)
derives a shared seed from its Diffie-Hellman secret (HKDF-SHA256 over the round number,
``cryptography``), expands it with ChaCha20 into a mask, and site i adds it while site j
subtracts it. Each site also adds a *self mask*, expanded from a seed only it can derive (from
its private key and the round). Updates are encoded as fixed-point integers modulo 2^64, so the
masks cancel *exactly*; the server learns only the sum of the sites' contributions
(n_k * w_k per tensor, the pooled-BatchNorm moments, and n_k), from which it computes the FedAvg
mean. A single masked update is uniformly distributed, whatever the site sent.

Overflow: the ring holds signed sums below 2^63 in magnitude, and a wrapped sum is silently wrong
(its sign flips). The server cannot see a masked value, so each site refuses to send a contribution
whose fixed-point magnitude reaches 2^63 / K (K: the sites masking this round, itself included):
then no sum of up to K contributions can wrap. A site that drops out only removes a term.

Keys: a site makes a fresh key pair for every masked update (``fedmed.federated.channel``), signs
its public half with its SuperNode key, and masks only with peers' keys signed by their registered
keys (:mod:`fedmed.privacy.identity`), so the server can neither substitute keys it made nor get
two updates under the same masks.

Unmasking, after the masked updates are in: the server names the survivors S (the sites whose
update arrived) and asks each to **attest** S: it answers, once per update, a tag per other
survivor (HMAC-SHA256 under their pairwise seed over the round and S). Then each survivor
**reveals**: given the tags the others made for it, it checks that every other survivor attested
the same S, that S and the dropped sites are exactly the round's sites, that S holds at least
:func:`threshold` sites, and that it has not revealed before (the private key is forgotten when
it reveals); only then it sends its self mask plus its pairwise masks with the dropped sites,
which the server subtracts from the sum.

Threat model (docs: Privacy, with the test behind each row): the server learns the sum of the
survivors' contributions and nothing about one site's update, also if it lies about who dropped
out, names fewer survivors than the threshold, relays keys it made, or asks for a round twice. A
site that fails between attesting and revealing ends the round (it cannot be recovered without
revealing a mask twice): the federation stops with an error and continues from its last
checkpoint with ``resume=``, with new keys. Colluding sites learn what their own masks tell them:
the sum of the honest sites' contributions. Robust aggregators (median, trimmed mean, Krum) need
individual updates and cannot run on sums.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedmed.aggregation import BN_MEAN, BN_VAR, cast_like
from fedmed.errors import FedmedError

FRAC_BITS = 24  # fixed-point resolution 2^-24 on n_k * w


class MaskingKey:
    """A site's key pair for pairwise masks (generated fresh; never leaves the site but for its public half)."""

    def __init__(self, private: bytes | None = None):
        self._private = X25519PrivateKey.generate() if private is None else X25519PrivateKey.from_private_bytes(private)
        self.public = self._private.public_key().public_bytes(serialization.Encoding.Raw,
                                                              serialization.PublicFormat.Raw)

    def private_bytes(self) -> bytes:
        """The raw private key, for a site that keeps it between processes on its own machine."""
        return self._private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                           serialization.NoEncryption())

    def self_seed(self, round_idx: int) -> bytes:
        """32-byte seed of this site's self mask for the round (derivable only from its private key)."""
        return HKDF(hashes.SHA256(), 32, salt=None,
                    info=f"fedmed secagg self mask {round_idx}".encode()).derive(self.private_bytes())

    def seed_with(self, peer_public: bytes, round_idx: int) -> bytes:
        """32-byte seed shared with the peer for this round (the same at both ends)."""
        shared = self._private.exchange(X25519PublicKey.from_public_bytes(peer_public))
        return HKDF(hashes.SHA256(), 32, salt=None, info=f"fedmed secagg round {round_idx}".encode()).derive(shared)


def prg(seed: bytes, n: int) -> np.ndarray:
    """n uniformly random uint64 words: the ChaCha20 keystream under ``seed``."""
    enc = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    return np.frombuffer(enc.update(b"\0" * (8 * n)), dtype=np.uint64).copy()


def layout(global_w: Mapping[str, torch.Tensor]) -> list[tuple[str, int]]:
    """(key, numel) in the order contributions are flattened; the sample count comes last."""
    return [(k, v.numel()) for k, v in global_w.items()]


def threshold(n_sites: int) -> int:
    """The fewest survivors for which a site reveals anything: a majority of the round's sites, and at least 2
    (a sum of one update is the update; two disjoint majorities cannot exist, so a server cannot obtain two
    partial sums by telling two groups different survivor sets)."""
    return max(2, n_sites // 2 + 1)


def key_statement(site: str, round_idx: int, public: bytes) -> bytes:
    """What a site signs to vouch for its masking key of one round."""
    return f"fedmed secagg key: site {json.dumps(site)} round {round_idx} public {public.hex()}".encode()


def vector_length(global_w: Mapping[str, torch.Tensor]) -> int:
    return sum(n for _, n in layout(global_w)) + 1


def contribution(state: Mapping[str, torch.Tensor], num_samples: int, pooled_bn: bool = True) -> np.ndarray:
    """What a site adds to the sum: n_k * w_k per tensor (n_k * (var + mean^2) for BN variances), then n_k."""
    parts = []
    for k, v in state.items():
        x = v.detach().cpu().double()
        if pooled_bn and k.endswith(BN_VAR) and (mean_key := k[: -len(BN_VAR)] + BN_MEAN) in state:
            x = x + state[mean_key].detach().cpu().double() ** 2
        parts.append(num_samples * x.flatten().numpy())
    parts.append(np.array([float(num_samples)]))
    return np.concatenate(parts)


def contribution_limit(n_sites: int) -> float:
    """Bound on a site's fixed-point magnitudes so that ``n_sites`` of them sum below 2^63 (never wrap)."""
    return min(2.0**62, 2.0**63 / max(n_sites, 1))


def to_ring(x: np.ndarray, n_sites: int = 1) -> np.ndarray:
    """float64 -> fixed-point integers modulo 2^64 (two's complement), refused if ``n_sites`` of them could wrap."""
    scaled = np.round(x * 2.0**FRAC_BITS)
    if not np.isfinite(scaled).all():
        raise FedmedError("privacy.secure_aggregation: the update has NaN/Inf values; it is not sent")
    peak, limit = float(np.abs(scaled).max(initial=0)), contribution_limit(n_sites)
    if peak >= limit:
        raise FedmedError(f"privacy.secure_aggregation: a value of {peak / 2.0**FRAC_BITS:.4g} (n_k * w) is too "
                          f"large for the 64-bit ring summed over {n_sites} sites "
                          f"(limit {limit / 2.0**FRAC_BITS:.4g}); it is not sent")
    return scaled.astype(np.int64).view(np.uint64)


def from_ring(u: np.ndarray) -> np.ndarray:
    return u.view(np.int64).astype(np.float64) / 2.0**FRAC_BITS


def pair_mask(key: MaskingKey, me: str, peer: str, peer_public: bytes, round_idx: int, n: int) -> np.ndarray:
    """+mask if me < peer, -mask (mod 2^64) otherwise: the pair's masks cancel in a sum."""
    m = prg(key.seed_with(peer_public, round_idx), n)
    return m if me < peer else (np.uint64(0) - m)


def self_mask(key: MaskingKey, round_idx: int, n: int) -> np.ndarray:
    return prg(key.self_seed(round_idx), n)


def mask(vector: np.ndarray, key: MaskingKey, me: str, peers: Mapping[str, bytes], round_idx: int) -> np.ndarray:
    """A site's masked update: its contribution in the ring, its self mask, and its pairwise masks with
    every other peer.

    ``peers`` holds every site masking this round (this one may be among them); the contribution is
    bounded so that the sum over all of them cannot wrap (:func:`contribution_limit`).
    """
    out = to_ring(vector, n_sites=len(set(peers) | {me})) + self_mask(key, round_idx, len(vector))
    for peer, pub in peers.items():
        if peer != me:
            out = out + pair_mask(key, me, peer, pub, round_idx, len(out))  # uint64: wraps modulo 2^64
    return out


def dropout_correction(key: MaskingKey, me: str, dropped: Mapping[str, bytes], round_idx: int, n: int) -> np.ndarray:
    """The sum of a survivor's masks with the sites that dropped out."""
    out = np.zeros(n, dtype=np.uint64)
    for peer, pub in dropped.items():
        out = out + pair_mask(key, me, peer, pub, round_idx, n)
    return out


def survivors_message(round_idx: int, survivors: Sequence[str]) -> bytes:
    return f"fedmed secagg survivors {round_idx}: {json.dumps(sorted(survivors))}".encode()


def attest_tag(key: MaskingKey, peer_public: bytes, round_idx: int, survivors: Sequence[str]) -> bytes:
    """This site's statement to one peer that the server named ``survivors`` (only the two of them can make it)."""
    return hmac.new(key.seed_with(peer_public, round_idx), survivors_message(round_idx, survivors),
                    hashlib.sha256).digest()


def reveal(key: MaskingKey, me: str, dropped: Mapping[str, bytes], round_idx: int, n: int) -> np.ndarray:
    """What a survivor sends for the server to subtract: its self mask and its masks with the dropped sites."""
    return self_mask(key, round_idx, n) + dropout_correction(key, me, dropped, round_idx, n)


def unmask_sum(masked: Sequence[np.ndarray], corrections: Sequence[np.ndarray]) -> np.ndarray:
    """Sum of the survivors' masked updates minus what they revealed: the sum of their contributions."""
    total = np.zeros_like(masked[0])
    for m in masked:
        total = total + m
    for c in corrections:
        total = total - c
    return from_ring(total)


def mean_state(total: np.ndarray, global_w: Mapping[str, torch.Tensor], pooled_bn: bool = True
               ) -> tuple[dict[str, torch.Tensor], int]:
    """From the unmasked sum, the sample-weighted mean state (pooled BN moments) and the total n."""
    n = float(total[-1])
    if not n > 0:
        raise ValueError(f"the unmasked sample count is {n}: the masks did not cancel")
    out, pos = {}, 0
    for k, numel in layout(global_w):
        out[k] = torch.from_numpy(total[pos:pos + numel] / n).reshape(global_w[k].shape)
        pos += numel
    for k in global_w:
        if pooled_bn and k.endswith(BN_VAR) and (mean_key := k[: -len(BN_VAR)] + BN_MEAN) in out:
            out[k] = out[k] - out[mean_key] ** 2
    return {k: cast_like(out[k], ref) for k, ref in global_w.items()}, int(round(n))
