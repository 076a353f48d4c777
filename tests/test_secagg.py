"""Secure aggregation: masks cancel exactly, one masked update looks like noise, dropouts are
recovered, and a federation under it ends with the same global model as one without."""

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
    _, _, _, vectors, masked = _mask_all(states, ns)
    total = np.zeros_like(masked[0])
    for m in masked:
        total = total + m
    plain = np.zeros_like(total)
    for v in vectors:
        plain = plain + sa.to_ring(v)
    assert np.array_equal(total, plain)  # bit-exact in the ring: the masks cancel
    mean, n = sa.mean_state(sa.unmask_sum(masked, []), states[0])
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
    corrections = [sa.dropout_correction(keys[n], n, dropped, 5, len(masked[0])) for n in names[:3]]
    mean, n = sa.mean_state(sa.unmask_sum(masked[:3], corrections), states[0])
    assert n == 60
    ref = fedavg(states[:3], ns[:3])
    assert all(torch.allclose(mean[k].double(), ref[k].double(), atol=1e-6) for k in ref)
    # without the corrections the sum is garbage (the sample count too)
    assert sa.unmask_sum(masked[:3], [])[-1] != 60


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
        assert torch.allclose(secure.final_weights[k].double(), v.double(), atol=1e-5), k
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
    assert np.array_equal(sa.unmask_sum(masked, []), 2 * sa.from_ring(sa.to_ring(vectors[0])))


def test_the_largest_contribution_allowed_still_sums_exactly():
    limit = sa.contribution_limit(4)
    assert limit * 4 <= 2.0**63
    edge = np.nextafter(limit, 0) / 2.0**sa.FRAC_BITS  # the largest value a site of four may send
    vectors = [np.array([edge, -edge, 2.0**-sa.FRAC_BITS, 7.0]) for _ in range(4)]
    names = [f"site{k}" for k in range(4)]
    keys = {n: sa.MaskingKey() for n in names}
    peers = {n: keys[n].public for n in names}
    total = sa.unmask_sum([sa.mask(v, keys[n], n, peers, 2) for v, n in zip(vectors, names, strict=True)], [])
    assert total[0] == 4 * sa.from_ring(sa.to_ring(vectors[0]))[0] > 0 and total[1] < 0
    assert total[2] == 4 * 2.0**-sa.FRAC_BITS and total[3] == 28.0
