"""The server's part of secure aggregation in one round: collect keys, then unmask only the sum."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from fedmed.errors import FederationError
from fedmed.federated.messages import FitResult, StateDict
from fedmed.privacy.secagg import mean_state, unmask_sum, vector_length

log = logging.getLogger("fedmed")


def collect_keys(sites: Sequence, exclude: Callable[[str, str], None]) -> dict[str, bytes]:
    """Each sampled site's public key; a site that cannot give one is excluded."""
    peers: dict[str, bytes] = {}
    for site in sites:
        try:
            peers[site.name] = site.public_key()
        except Exception as exc:  # noqa: BLE001
            exclude(site.name, f"no public key for secure aggregation: {type(exc).__name__}: {exc}")
    return peers


def unmask(r: int, fits: list[FitResult], peers: dict[str, bytes], global_w: StateDict, sites: Sequence,
           pooled_bn: bool, min_sites: int, exclude: Callable[[str, str], None]) -> FitResult:
    """The sum of the survivors' contributions, as one FitResult of their mean.

    Sites told to mask that did not deliver have dropped out: every survivor sends its masks
    with them, which the server subtracts. A survivor that fails to do so drops out too.
    """
    by_name = {s.name: s for s in sites}
    survivors = list(fits)
    length = vector_length(global_w)
    while True:
        dropped = {n: pub for n, pub in peers.items() if n not in {f.site for f in survivors}}
        corrections, failed = [], None
        for f in survivors if dropped else []:
            try:
                corrections.append(by_name[f.site].dropout_correction(dropped, r, length))
            except Exception as exc:  # noqa: BLE001
                exclude(f.site, f"no dropout correction for secure aggregation: {exc}")
                failed = f
                break
        if failed is None:
            break
        survivors.remove(failed)
    if len(survivors) < max(min_sites, 1):
        raise FederationError(f"round {r}: only {len(survivors)} sites completed secure aggregation "
                              f"(federation.min_sites={min_sites})")
    if dropped:
        log.info("round %d: secure aggregation: removed the masks shared with %s (dropped out)",
                 r, ", ".join(sorted(dropped)))
    total = unmask_sum([f.masked for f in survivors], corrections)
    mean, n = mean_state(total, global_w, pooled_bn)
    expected = sum(f.num_samples for f in survivors)
    if n != expected:
        raise FederationError(f"round {r}: secure aggregation sum has n={n}, the sites reported {expected}")
    return FitResult("secure sum of " + "+".join(f.site for f in survivors), mean, n)
