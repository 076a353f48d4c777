"""Secure aggregation: masks cancel exactly, one masked update looks like noise, dropouts are
recovered, a server that lies about who dropped out learns nothing, and a federation under it ends
with the same global model as one without."""

import numpy as np
import pytest
import torch

from fedmed.errors import FedmedError
from fedmed.federated import FederationSettings, InProcessSite, Orchestrator, Strategy, fedavg
from fedmed.privacy import secagg as sa
from tests.helpers import strategy as make_strategy
from tests.test_orchestrator import clients, factory


def _states(k=3, seed=0, width=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        out.append({"conv.weight": torch.randn(8, width, generator=g), "bn.running_mean": torch.randn(8, generator=g),
                    "bn.running_var": torch.rand(8, generator=g) + 0.5, "bn.num_batches_tracked": torch.tensor(12)})
    return out


def _mask_all(states, ns, round_idx=3):
    names = [f"site{k}" for k in range(len(states))]
    keys = {n: sa.MaskingKey() for n in names}
    peers = {n: keys[n].public for n in names}
    vectors = [sa.contribution(s, n) for s, n in zip(states, ns, strict=True)]
    masked = [sa.mask(v, keys[n], n, peers, round_idx) for v, n in zip(vectors, names, strict=True)]
    return names, keys, peers, vectors, masked


def test_masks_cancel_exactly_and_the_mean_is_fedavg():
    states, ns = _states(), [30, 70, 11]
    names, keys, _, vectors, masked = _mask_all(states, ns)
    total = np.zeros_like(masked[0])
    for m, name in zip(masked, names, strict=True):
        total = total + m - sa.self_mask(keys[name], 3, len(m))
    plain = np.zeros_like(total)
    for v in vectors:
        plain = plain + sa.to_ring(v, n_sites=3)
    assert np.array_equal(total, plain)  # bit-exact in the ring: the pairwise masks cancel
    assert not np.array_equal(sa.unmask_sum(masked, []), sa.from_ring(plain))  # the self masks stay: each site
    revealed = [sa.reveal(keys[n], n, {}, 3, len(masked[0])) for n in names]  # reveals its own
    assert np.array_equal(sa.unmask_sum(masked, revealed), sa.from_ring(plain))
    mean, n = sa.mean_state(sa.unmask_sum(masked, revealed), states[0])
    assert n == sum(ns)
    ref = fedavg(states, ns, bn_stats="pooled")
    for k in ref:
        assert mean[k].dtype == ref[k].dtype
        assert torch.allclose(mean[k].double(), ref[k].double(), atol=1e-6), k


def test_one_masked_update_is_indistinguishable_from_noise():
    states, ns = _states(seed=1, width=500), [30, 70, 11]
    # a very regular update (all zeros) and a real one: their masked forms look alike
    states[0] = {k: torch.zeros_like(v) for k, v in states[0].items()}
    _, _, _, vectors, masked = _mask_all(states, ns)
    for m in masked[:2]:
        bits = np.unpackbits(m.view(np.uint8))
        assert abs(bits.mean() - 0.5) < 0.02  # every bit is a fair coin
        counts = np.bincount(m.view(np.uint8), minlength=256)
        expected = len(m) * 8 / 256
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 400  # 255 degrees of freedom: ~330 is the 0.1% tail
    # nothing of the update shows: reading the masked vector as fixed point is unrelated to the values
    decoded = sa.from_ring(masked[1])
    assert abs(np.corrcoef(decoded[:-1], vectors[1][:-1])[0, 1]) < 0.1  # ~4000 values: noise gives ~0.016
    assert np.abs(decoded).max() > 1e9  # wildly out of range: it is noise, not a perturbed update


def test_a_site_that_drops_after_masking_is_recovered():
    states, ns = _states(k=4, seed=2), [10, 20, 30, 40]
    names, keys, peers, _, masked = _mask_all(states, ns, round_idx=5)
    # site3 masked but never delivered; the survivors send their masks with it
    dropped = {"site3": peers["site3"]}
    corrections = [sa.reveal(keys[n], n, dropped, 5, len(masked[0])) for n in names[:3]]
    mean, n = sa.mean_state(sa.unmask_sum(masked[:3], corrections), states[0])
    assert n == 60
    ref = fedavg(states[:3], ns[:3])
    assert all(torch.allclose(mean[k].double(), ref[k].double(), atol=1e-6) for k in ref)
    # without the corrections the sum is garbage (the sample count too)
    assert sa.unmask_sum(masked[:3], [])[-1] != 60


def _channels(k: int, round_idx: int):
    """k site channels that masked one update each in ``round_idx``."""
    from fedmed.federated.channel import UpdateChannel
    from fedmed.federated.messages import FitResult

    states = _states(k=k, seed=4, width=500)  # ~4,000 values: noise correlates by |r| < 0.2 always
    chans = {f"site{i}": UpdateChannel(f"site{i}") for i in range(k)}
    peers = {n: c.public_key(round_idx)[0] for n, c in chans.items()}
    plan = {"secagg": {"round": round_idx, "peers": peers, "pooled_bn": True}}
    masked = {n: c.package(FitResult(n, dict(s), 10 * (i + 1)), s, plan).masked
              for i, ((n, c), s) in enumerate(zip(chans.items(), states, strict=True))}
    return chans, masked, states


def test_a_server_that_lies_about_a_dropout_learns_nothing_of_that_site():
    """The attack pairwise masking alone allows: the server holds site2's masked update, says site2 dropped
    and asks the others for their masks with it. With the self mask, what remains is still noise."""
    chans, masked, states = _channels(3, round_idx=7)
    n = len(masked["site2"])
    survivors = ["site0", "site1"]
    keys = {u: chans[u]._round["key"] for u in survivors}  # what the sites hold (forgotten once revealed)
    tags = {u: chans[u].attest(7, survivors) for u in survivors}
    revealed = [chans[u].dropout_correction(["site2"], 7, n, survivors, {w: tags[w][u] for w in survivors if w != u})
                for u in survivors]
    # the survivors' masks with site2, removed from site2's masked update: pairwise masks gone, self mask left
    pair_part = np.zeros(n, dtype=np.uint64)
    for u, r in zip(survivors, revealed, strict=True):
        pair_part = pair_part + (r - sa.self_mask(keys[u], 7, n))
    attempt = sa.from_ring(masked["site2"] + pair_part)  # site2's pairwise masks are -(theirs)
    truth = sa.contribution(states[2], 30)
    assert abs(np.corrcoef(attempt[:-1], truth[:-1])[0, 1]) < 0.2 and np.abs(attempt).max() > 1e9
    # the honest use of what was revealed: the survivors' sum, exactly
    mean, total_n = sa.mean_state(sa.unmask_sum([masked[u] for u in survivors], revealed), states[0])
    assert total_n == 30
    # site2 itself, told it survived while the others were told it dropped, reveals nothing: the others'
    # tags are over another survivor set
    tags2 = chans["site2"].attest(7, ["site0", "site1", "site2"])
    assert set(tags2) == {"site0", "site1"}
    with pytest.raises(ValueError, match="did not attest the survivors"):
        chans["site2"].dropout_correction([], 7, n, ["site0", "site1", "site2"],
                                          {"site0": tags["site0"]["site1"], "site1": tags["site1"]["site0"]})


def test_a_site_attests_one_survivor_set_and_reveals_once():
    chans, masked, _ = _channels(3, round_idx=2)
    n = len(masked["site0"])
    everyone = ["site0", "site1", "site2"]
    tags = {u: chans[u].attest(2, everyone) for u in everyone}
    with pytest.raises(ValueError, match="a second account of who survived"):
        chans["site0"].attest(2, ["site0", "site1"])
    mine = {w: tags[w]["site0"] for w in everyone if w != "site0"}
    with pytest.raises(ValueError, match="not a split"):  # a site both survived and dropped
        chans["site0"].dropout_correction(["site2"], 2, n, everyone, mine)
    with pytest.raises(ValueError, match="attested"):
        chans["site0"].dropout_correction([], 2, n, ["site0", "site1"], mine)
    with pytest.raises(ValueError, match="masked no update in round 3"):
        chans["site0"].attest(3, everyone)
    revealed = {u: chans[u].dropout_correction([], 2, n, everyone, {w: tags[w][u] for w in everyone if w != u})
                for u in everyone}
    with pytest.raises(ValueError, match="already revealed"):
        chans["site0"].dropout_correction([], 2, n, everyone, mine)
    plain = np.zeros(n, dtype=np.uint64)
    for u in everyone:
        plain = plain + masked[u] - revealed[u]
    assert sa.from_ring(plain)[-1] == 60  # the sample counts 10 + 20 + 30, exactly


class DropsAfterMasking(InProcessSite):
    """A real site that takes part in key exchange, then fails during training."""

    def fit(self, weights, round_idx, epochs, config=None):
        if round_idx == 2:
            raise ConnectionError("link lost")
        return super().fit(weights, round_idx, epochs, config)


def test_federation_under_secure_aggregation_matches_plain_fedavg():
    torch.manual_seed(0)
    initial = factory().net.state_dict()
    runs = {}
    for secure in (False, True):
        a, b, c = clients((40, 60, 30))
        sites = [InProcessSite(a), InProcessSite(b), DropsAfterMasking(c)]
        orch = Orchestrator(sites, Strategy(), FederationSettings(rounds=2, select="last", secure_aggregation=secure))
        runs[secure] = orch.run(initial)
    plain, secure = runs[False], runs[True]
    for k, v in plain.final_weights.items():
        assert secure.final_weights[k].dtype == v.dtype
        # round 1's sums agree to the 2^-24 fixed point; round 2 trains from them, which amplifies that
        # to about 3e-5 with torch 2.14 (weights are ~1e-2; a wrong mask would be off by O(1))
        diff = (secure.final_weights[k].double() - v.double()).abs().max().item()
        assert diff < 1e-4, (k, diff)
    assert secure.history[1].sites == ["s0", "s1"]  # round 2 went on without the dropped site
    # a masked update is 64-bit per value: twice the float32 weights
    assert secure.history[0].bytes_up == pytest.approx(2 * plain.history[0].bytes_up, rel=0.01)


def test_secure_aggregation_refuses_what_needs_single_updates():
    sites = [InProcessSite(c) for c in clients((20, 20, 20))]
    for name in ("median", "trimmed_mean"):
        with pytest.raises(FedmedError, match="secure_aggregation"):
            Orchestrator(sites, make_strategy(name), FederationSettings(rounds=1, secure_aggregation=True))
    with pytest.raises(FedmedError, match="at least 2"):
        Orchestrator(sites[:1], Strategy(), FederationSettings(rounds=1, secure_aggregation=True))


def _ring_sum(vectors):
    total = np.zeros(len(vectors[0]), dtype=np.uint64)
    for v in vectors:
        total = total + sa.to_ring(v)
    return total


def test_a_sum_that_would_wrap_the_ring_is_refused_at_the_site():
    """Four sites at 0.6 * 2^62 each fit the ring alone, but their sum (2.4 * 2^62 > 2^63) wraps to the wrong sign."""
    big = 0.6 * 2.0**62 / 2.0**sa.FRAC_BITS
    vectors = [np.array([big, -big, 1.0, 10.0]) for _ in range(4)]
    wrapped = sa.from_ring(_ring_sum(vectors))
    assert wrapped[0] < 0 < wrapped[1]  # what an unchecked sum gives: the mean has the wrong sign
    names = [f"site{k}" for k in range(4)]
    keys = {n: sa.MaskingKey() for n in names}
    peers = {n: keys[n].public for n in names}
    for n in names:
        with pytest.raises(FedmedError, match=r"privacy\.secure_aggregation.*4 sites"):
            sa.mask(vectors[0], keys[n], n, peers, 1)
    # the same value is fine when only two sites add up
    two = {n: peers[n] for n in names[:2]}
    masked = [sa.mask(vectors[0], keys[n], n, two, 1) for n in names[:2]]
    revealed = [sa.reveal(keys[n], n, {}, 1, len(vectors[0])) for n in names[:2]]
    assert np.array_equal(sa.unmask_sum(masked, revealed), 2 * sa.from_ring(sa.to_ring(vectors[0])))


def test_the_largest_contribution_allowed_still_sums_exactly():
    limit = sa.contribution_limit(4)
    assert limit * 4 <= 2.0**63
    edge = np.nextafter(limit, 0) / 2.0**sa.FRAC_BITS  # the largest value a site of four may send
    vectors = [np.array([edge, -edge, 2.0**-sa.FRAC_BITS, 7.0]) for _ in range(4)]
    names = [f"site{k}" for k in range(4)]
    keys = {n: sa.MaskingKey() for n in names}
    peers = {n: keys[n].public for n in names}
    total = sa.unmask_sum([sa.mask(v, keys[n], n, peers, 2) for v, n in zip(vectors, names, strict=True)],
                          [sa.reveal(keys[n], n, {}, 2, len(vectors[0])) for n in names])
    assert total[0] == 4 * sa.from_ring(sa.to_ring(vectors[0]))[0] > 0 and total[1] < 0
    assert total[2] == 4 * 2.0**-sa.FRAC_BITS and total[3] == 28.0
