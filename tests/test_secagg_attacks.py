"""Secure aggregation against a lying server (Bonawitz et al., CCS 2017): each attack below drives a site's
own :class:`UpdateChannel` as a malicious server would, and recovers nothing of the site's update.

(a) "you are the only survivor": a site reveals nothing for fewer survivors than the threshold;
(b) masking keys the server made: a site with a roster refuses keys its peers did not sign;
(c) the same round asked twice (also what an honest server resumed mid-round does): every masked
    update has a fresh key, a key masks once, and what was revealed cannot be revealed again, even
    by a site process restarted from what it kept;
(d) "send it in the clear this time": a site configured for secure aggregation sends its update only
    masked, whatever the server's instructions say (its class statistics likewise:
    ``tests/test_site_shift.py::test_a_site_tells_the_server_only_what_its_config_shares``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedmed.federated.channel import UpdateChannel
from fedmed.federated.messages import FitResult
from fedmed.privacy import secagg as sa
from fedmed.privacy.identity import Signer

SITES = ["site0", "site1", "site2"]


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # 4,100 values: two unrelated vectors of this length correlate by |r| < 0.2 except with odds of ~1e-37
    return {"w": torch.randn(4096, generator=g), "b": torch.randn(4, generator=g)}


def _signers() -> dict[str, Signer]:
    out = {}
    for name in SITES:
        key = ec.generate_private_key(ec.SECP384R1())
        out[name] = Signer(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    return out


def _package(chan: UpdateChannel, state, n: int, plan: dict | None) -> np.ndarray:
    instructions = {"secagg": plan} if plan is not None else {}
    return chan.package(FitResult(chan.site, dict(state), n), state, instructions).masked


def _round(chans: dict[str, UpdateChannel], r: int) -> dict:
    keys = {name: chan.public_key(r) for name, chan in chans.items()}
    return {"round": r, "peers": {n: k[0] for n, k in keys.items()},
            "signatures": {n: k[1] for n, k in keys.items()}, "pooled_bn": False}


def test_a_site_told_it_is_the_only_survivor_reveals_nothing():
    chans = {n: UpdateChannel(n) for n in SITES}
    plan = _round(chans, 4)
    masked = {n: _package(c, _state(i), 10, plan) for i, (n, c) in enumerate(chans.items())}
    n = len(masked["site0"])
    # the server tells site0 it alone survived: today's threshold (a majority, at least 2) refuses both steps
    with pytest.raises(ValueError, match="reveals nothing for fewer than 2"):
        chans["site0"].attest(4, ["site0"])
    with pytest.raises(ValueError, match="attested None"):
        chans["site0"].dropout_correction(["site1", "site2"], 4, n, ["site0"], {})
    # two survivors of three is a majority: the honest round still completes
    tags = {u: chans[u].attest(4, ["site0", "site1"]) for u in ("site0", "site1")}
    revealed = [chans[u].dropout_correction(["site2"], 4, n, ["site0", "site1"], {w: tags[w][u] for w in tags
                                                                                  if w != u})
                for u in ("site0", "site1")]
    assert sa.unmask_sum([masked["site0"], masked["site1"]], revealed)[-1] == 20


def test_masking_keys_the_server_made_are_refused_by_a_site_with_a_roster():
    signers = _signers()
    roster = {n: s.public_der for n, s in signers.items()}
    chans = {n: UpdateChannel(n, signer=signers[n], roster=roster) for n in SITES}
    plan = _round(chans, 2)
    # the server swaps in keys it made for site1 and site2, and signs them with a key of its own
    forged = {n: sa.MaskingKey() for n in ("site1", "site2")}
    own = _signers()["site1"]
    evil = {**plan, "peers": {**plan["peers"], **{n: k.public for n, k in forged.items()}},
            "signatures": {**plan["signatures"], **{n: own.sign(sa.key_statement(n, 2, k.public))
                                                     for n, k in forged.items()}}}
    with pytest.raises(ValueError, match="masking key of 'site1' for round 2 is not signed"):
        _package(chans["site0"], _state(0), 10, evil)
    unsigned = {**plan, "signatures": {}}
    with pytest.raises(ValueError, match="not signed"):
        _package(chans["site0"], _state(0), 10, unsigned)
    swapped = {**plan, "peers": {**plan["peers"], "site0": forged["site1"].public}}
    with pytest.raises(ValueError, match="did not relay this site's own masking key"):
        _package(chans["site0"], _state(0), 10, swapped)
    # the keys the sites signed themselves: masked, and the sum comes out exactly
    masked = [_package(c, _state(i), 10, plan) for i, c in enumerate(chans.values())]
    n = len(masked[0])
    tags = {u: chans[u].attest(2, SITES) for u in SITES}
    revealed = [chans[u].dropout_correction([], 2, n, SITES, {w: tags[w][u] for w in SITES if w != u}) for u in SITES]
    want = sum(sa.contribution(_state(i), 10, False) for i in range(3))
    assert np.allclose(sa.unmask_sum(masked, revealed), want, atol=1e-6)


def test_a_round_asked_twice_gets_fresh_masks_and_one_reveal():
    chans = {n: UpdateChannel(n) for n in SITES}
    plan = _round(chans, 3)
    first = _package(chans["site0"], _state(0), 10, plan)
    with pytest.raises(ValueError, match="no fresh masking key for round 3"):  # the same key never masks twice
        _package(chans["site0"], _state(1), 10, plan)
    # a resumed (or lying) server runs round 3 again: new keys, so the two masked updates share no mask
    again = _round(chans, 3)
    second = _package(chans["site0"], _state(1), 10, again)
    difference = sa.from_ring(first - second)
    truth = sa.contribution(_state(0), 10, False) - sa.contribution(_state(1), 10, False)
    assert abs(np.corrcoef(difference[:-1], truth[:-1])[0, 1]) < 0.2 and np.abs(difference).max() > 1e9
    # the round's update is revealed once; a site process restarted from what it kept cannot reveal it again
    for name in ("site1", "site2"):
        _package(chans[name], _state(2), 10, again)
    n = len(second)
    tags = {u: chans[u].attest(3, SITES) for u in SITES}
    mine = {w: tags[w]["site0"] for w in SITES if w != "site0"}
    chans["site0"].dropout_correction([], 3, n, SITES, mine)
    restarted = UpdateChannel("site0")
    restarted.load_secret_state(chans["site0"].secret_state())
    for chan in (chans["site0"], restarted):
        with pytest.raises(ValueError, match="already revealed"):
            chan.dropout_correction([], 3, n, SITES, mine)
    assert restarted.secret_state()["round"]["private"] is None  # the key itself is gone
    assert "private" not in str(chans["site1"].state_dict())  # what the server checkpoints holds no key


def test_a_site_configured_for_secure_aggregation_never_sends_its_update_in_the_clear():
    chans = {n: UpdateChannel(n, masked_only=True) for n in SITES}
    with pytest.raises(ValueError, match="site site0 sends its update only masked .* nothing is sent"):
        _package(chans["site0"], _state(0), 10, None)
    plan = _round(chans, 5)  # with the masking keys, as always
    assert _package(chans["site0"], _state(0), 10, plan).dtype == np.uint64
    plain = UpdateChannel("site0")  # a site of a federation without secure aggregation sends its weights
    result = plain.package(FitResult("site0", _state(0), 10), _state(0), {})
    assert torch.equal(result.weights["w"], _state(0)["w"])


def test_a_site_across_machines_needs_its_key_and_the_roster_for_secure_aggregation(isolated, tmp_path, caplog):
    from fedmed.config import compose
    from fedmed.errors import FedmedError
    from fedmed.flower.keys import secagg_identity
    from tests.test_deployment import supernode_key

    keys = {s: supernode_key(tmp_path, s) for s in ("hospital_a", "hospital_b", "hospital_c")}
    roster = "{" + ", ".join(f"{s}: {pub}" for s, (_, pub) in keys.items()) + "}"
    base = [*isolated, "privacy.secure_aggregation=true", "site=hospital_a"]
    remote = compose("fit", [*base, "federation.server=fed.example.org:9092"])
    with pytest.raises(FedmedError, match="needs, at every site, federation.auth.private_key"):
        secagg_identity(remote)
    wrong = compose("fit", [*base, "federation.server=fed.example.org:9092",
                            f"federation.auth.private_key={keys['hospital_b'][0]}",
                            f"federation.auth.supernode_keys={roster}"])
    with pytest.raises(FedmedError, match="is not the key federation.auth.supernode_keys.hospital_a names"):
        secagg_identity(wrong)
    right = compose("fit", [*base, "federation.server=fed.example.org:9092",
                            f"federation.auth.private_key={keys['hospital_a'][0]}",
                            f"federation.auth.supernode_keys={roster}"])
    signer, registered = secagg_identity(right)
    assert signer is not None and registered is not None and registered["hospital_a"] == signer.public_der
    assert secagg_identity(compose("fit", [*base, "federation.server=127.0.0.1:9092"])) == (None, None)
    assert "masking keys are not signed" in caplog.text
