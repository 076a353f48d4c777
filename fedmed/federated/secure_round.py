"""The server's part of secure aggregation in one round: collect keys, then unmask only the sum."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

from fedmed.errors import FederationError
from fedmed.federated.messages import FitResult, StateDict
from fedmed.privacy.secagg import mean_state, threshold, unmask_sum, vector_length

log = logging.getLogger("fedmed")


def collect_keys(sites: Sequence, round_idx: int, exclude: Callable[[str, str], None]
                 ) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """Each sampled site's fresh masking key for the round and its signature over it; a site that cannot give
    one is excluded. Returns (site -> key, site -> signature)."""
    peers: dict[str, bytes] = {}
    signatures: dict[str, bytes] = {}
    for site in sites:
        try:
            peers[site.name], signatures[site.name] = site.public_key(round_idx)
        except Exception as exc:  # noqa: BLE001
            exclude(site.name, f"no public key for secure aggregation: {type(exc).__name__}: {exc}")
    return peers, signatures


def unmask(r: int, fits: list[FitResult], peers: dict[str, bytes], global_w: StateDict, sites: Sequence,
           pooled_bn: bool, min_sites: int, exclude: Callable[[str, str], None]) -> FitResult:
    """The sum of the survivors' contributions (:func:`unmask_vectors`), as one FitResult of their mean."""
    total = unmask_vectors(r, {f.site: f.masked for f in fits}, peers, sites, min_sites, vector_length(global_w))
    mean, n = mean_state(total, global_w, pooled_bn)
    expected = sum(f.num_samples for f in fits)
    if n != expected:
        raise FederationError(f"round {r}: secure aggregation sum has n={n}, the sites reported {expected}")
    return FitResult("secure sum of " + "+".join(f.site for f in fits), mean, n)


def unmask_vectors(r: int, masked: dict[str, np.ndarray], peers: dict[str, bytes], sites: Sequence,
                   min_sites: int, length: int) -> np.ndarray:
    """The sum of the survivors' masked vectors, unmasked.

    The survivors are the sites whose masked vector arrived; sites given keys that did not
    deliver have dropped out. Every survivor attests the survivor set, then reveals its self
    mask and its masks with the dropped sites, which the server subtracts
    (:mod:`fedmed.privacy.secagg`). A survivor that fails in these two steps ends the round: its
    masks cannot be recovered without asking another site to reveal twice.
    """
    by_name = {s.name: s for s in sites}
    survivors = sorted(masked)
    need = max(min_sites, threshold(len(peers)))
    if len(survivors) < need:
        raise FederationError(f"round {r}: only {len(survivors)} of {len(peers)} sites completed secure aggregation; "
                              f"the sites reveal their masks only for at least {need} (a majority, at least 2, and "
                              f"federation.min_sites={min_sites})")
    dropped = sorted(n for n in peers if n not in survivors)
    tags = {u: _step(r, u, "attesting the survivors", lambda u=u: by_name[u].attest(r, survivors))
            for u in survivors}
    revealed = [_step(r, site, "revealing its masks", lambda site=site: by_name[site].dropout_correction(
        dropped, r, length, survivors, {u: tags[u][site] for u in survivors if u != site})) for site in masked]
    if dropped:
        log.info("round %d: secure aggregation: removed the masks shared with %s (dropped out)",
                 r, ", ".join(dropped))
    return unmask_sum(list(masked.values()), revealed)


def _step(r: int, site: str, what: str, call):
    try:
        return call()
    except Exception as exc:  # noqa: BLE001 - a failed unmasking step ends the round (see unmask)
        raise FederationError(f"round {r}: site {site} failed while {what} for secure aggregation "
                              f"({type(exc).__name__}: {exc}); the round cannot be completed without it. "
                              "Continue from the last round with resume=<run id>") from None
