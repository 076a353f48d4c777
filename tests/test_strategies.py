"""Every aggregation strategy against hand-computed results, including the degenerate cases."""

import math

import pytest
import torch

from fedmed.aggregation import (
    coordinate_median,
    krum,
    krum_scores,
    norm_keys,
    server_opt_step,
    trimmed_mean,
)
from fedmed.errors import FedmedError
from fedmed.federated.messages import FitResult
from tests.helpers import STRATEGY_NAMES
from tests.helpers import strategy as make_strategy


def st(*vals, n=None):
    return {"w": torch.tensor(vals, dtype=torch.float32), "n": torch.tensor(n if n is not None else 0)}


def fits(states, counts=None):
    counts = counts or [1] * len(states)
    return [FitResult(f"s{i}", s, c) for i, (s, c) in enumerate(zip(states, counts, strict=True))]


def test_median_odd_even_and_one_site():
    a, b, c = st(1.0, 10.0, n=1), st(2.0, -5.0, n=3), st(100.0, 0.0, n=8)
    assert coordinate_median([a, b, c])["w"].tolist() == [2.0, 0.0]
    assert coordinate_median([a, b])["w"].tolist() == [1.5, 2.5]  # mean of the two middle values
    assert int(coordinate_median([a, b, c])["n"]) == 3 and coordinate_median([a, b, c])["n"].dtype == torch.int64
    assert torch.equal(coordinate_median([c])["w"], c["w"])


def test_trimmed_mean_drops_extremes_per_coordinate():
    states = [st(v, -v) for v in (1.0, 2.0, 3.0, 4.0, 1000.0)]
    out = trimmed_mean(states, 0.2)  # drop one from each end of each coordinate
    assert out["w"].tolist() == [3.0, -3.0]
    assert trimmed_mean(states, 0.0)["w"].tolist() == [202.0, -202.0]  # plain mean
    with pytest.raises(ValueError, match="beta"):
        trimmed_mean(states[:2], 0.5)
    # 4 sites, beta 0.2: floor(0.8) = 0 would be a plain mean; one value per end is still dropped
    assert trimmed_mean(states[1:], 0.2)["w"].tolist() == [3.5, -3.5]
    with pytest.raises(FedmedError, match="at least 5 sites"):
        make_strategy("krum", f=1, num_sites=4)


def test_krum_scores_and_selection_by_hand():
    pts = [0.0, 1.0, 2.0, 3.0, 50.0]
    states = [{"w": torch.tensor([p])} for p in pts]
    # f=1: each score sums the squared distances to its K - f - 2 = 2 nearest others
    expected = [1 + 4, 1 + 1, 1 + 1, 1 + 4, 47**2 + 48**2]
    assert krum_scores(states, 1).tolist() == expected
    out, kept = krum(states, [1] * 5, f=1, m=1)
    assert kept == [1] and out["w"].tolist() == [1.0]  # lowest score, first of the tie
    out, kept = krum(states, [1, 1, 1, 3, 1], f=1, m=3)  # Multi-Krum: FedAvg of the 3 best
    assert kept == [0, 1, 2] and math.isclose(out["w"].item(), 1.0)
    with pytest.raises(ValueError, match="at least 5"):
        krum(states[:4], [1] * 4, f=1)


def test_fedadam_and_fedyogi_one_step_by_hand():
    g = {"w": torch.tensor([1.0]), "bn.running_mean": torch.tensor([0.0])}
    target = {"w": torch.tensor([3.0]), "bn.running_mean": torch.tensor([7.0])}
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    d = 2.0
    m = (1 - b1) * d
    v_adam = b2 * tau**2 + (1 - b2) * d**2
    new, mom = server_opt_step(g, target, None, "adam", lr, b1, b2, tau)
    assert math.isclose(new["w"].item(), 1.0 + lr * m / (math.sqrt(v_adam) + tau), rel_tol=1e-6)
    assert new["bn.running_mean"].item() == 7.0  # statistics are taken, not optimised
    v_yogi = tau**2 - (1 - b2) * d**2 * math.copysign(1, tau**2 - d**2)
    new, _ = server_opt_step(g, target, None, "yogi", lr, b1, b2, tau)
    assert math.isclose(new["w"].item(), 1.0 + lr * m / (math.sqrt(v_yogi) + tau), rel_tol=1e-6)
    # the moments carry over: a second step with no change moves by the remaining momentum
    new2, _ = server_opt_step(new, new, mom, "adam", lr, b1, b2, tau)
    assert new2["w"].item() > new["w"].item()


def test_fedadam_strategy_keeps_state_for_resume():
    s = make_strategy("fedadam", server_lr=0.1)
    g = {"w": torch.tensor([0.0])}
    out = s.aggregate_fit(g, fits([{"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}], [1, 1]))
    assert out["w"].item() > 0
    clone = make_strategy("fedadam", server_lr=0.1)
    clone.load_state_dict(s.state_dict())
    nxt = fits([{"w": torch.tensor([5.0])}])
    assert torch.equal(s.aggregate_fit(out, nxt)["w"], clone.aggregate_fit(out, nxt)["w"])


def test_fedavgm_by_hand_and_fedavg_without_momentum():
    """v = d (round 1), v = beta v + d after; x <- x - lr v with d = x - mean; buffers take the mean."""
    def site(w, mean, batches=4):
        return {"w": torch.tensor(w), "bn.running_mean": torch.tensor([mean]),
                "bn.num_batches_tracked": torch.tensor(batches)}

    g = site([1.0, 2.0], 0.0, 0)

    s = make_strategy("fedavgm", server_lr=0.5, server_momentum=0.8)
    out = s.aggregate_fit(g, fits([site([3.0, 2.0], 1.0), site([1.0, 6.0], 3.0)], [1, 1]))  # mean (2, 4): d = (-1, -2)
    torch.testing.assert_close(out["w"], torch.tensor([1.5, 3.0]))
    torch.testing.assert_close(out["bn.running_mean"], torch.tensor([2.0]))
    clone = make_strategy("fedavgm", server_lr=0.5, server_momentum=0.8)
    clone.load_state_dict(s.state_dict())
    nxt = fits([site([2.5, 3.0], 0.0)])  # d = (-1, 0); v = 0.8 (-1, -2) + (-1, 0) = (-1.8, -1.6)
    torch.testing.assert_close(s.aggregate_fit(out, nxt)["w"], torch.tensor([2.4, 3.8]))
    torch.testing.assert_close(clone.aggregate_fit(out, nxt)["w"], torch.tensor([2.4, 3.8]))
    plain, avg = make_strategy("fedavgm", server_momentum=0.0), make_strategy("fedavg")
    f = fits([site([3.0, 2.0], 1.0), site([1.0, 6.0], 3.0)], [1, 3])
    for key, v in avg.aggregate_fit(g, f).items():
        torch.testing.assert_close(plain.aggregate_fit(g, f)[key], v)
    with pytest.raises(ValueError, match="server_momentum"):
        make_strategy("fedavgm", server_momentum=1.0)


def test_scaffold_server_update_by_hand():
    s = make_strategy("scaffold", server_lr=0.5, local_lr=0.1, num_sites=4)
    g = {"w": torch.tensor([1.0, 1.0])}
    cfg = s.configure_fit(g)
    assert cfg["sgd_lr"] == 0.1 and torch.equal(cfg["scaffold_c"]["w"], torch.zeros(2, dtype=torch.float64))
    f = fits([{"w": torch.tensor([3.0, 1.0])}, {"w": torch.tensor([1.0, 5.0])}], [1, 1])
    f[0].extras["scaffold_delta_c"] = {"w": torch.tensor([2.0, 0.0], dtype=torch.float64)}
    f[1].extras["scaffold_delta_c"] = {"w": torch.tensor([0.0, 4.0], dtype=torch.float64)}
    out = s.aggregate_fit(g, f)
    assert out["w"].tolist() == [1.5, 2.0]  # x + 0.5 * (mean(y) - x) = 1 + 0.5 * ([2, 3] - 1)
    assert s.c["w"].tolist() == [0.5, 1.0]  # c + |S|/N * mean(delta c) = 2/4 * [1, 2]


def test_fedbn_and_fedprox_site_instructions():
    from fedmed.models import CompactCNN

    state = CompactCNN(in_channels=1, num_classes=2).state_dict()
    keys = set(make_strategy("fedbn").configure_fit(state)["local_keys"])
    assert keys == norm_keys(state)
    assert "features.block1.norm.weight" in keys and "features.block1.norm.running_var" in keys
    assert not any(k.startswith("head.") or k.endswith("conv.weight") for k in keys)
    assert make_strategy("fedprox", mu=0.3).configure_fit(state) == {"prox_mu": 0.3}


PARAMS = {"krum": {"f": 0}, "fedadam": {"server_lr": 1.0}, "fedyogi": {"server_lr": 1.0},
          "scaffold": {"server_lr": 1.0, "local_lr": 0.1}}


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_every_strategy_with_one_site_and_with_identical_sites(name):
    g = {"w": torch.tensor([0.5, -1.0]), "n": torch.tensor(2)}
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(4)}
    s = make_strategy(name, **PARAMS.get(name, {}), num_sites=5)
    s.configure_fit(g)
    f = fits([dict(a) for _ in range(5)], [1, 2, 3, 4, 5])
    for x in f:
        x.extras["scaffold_delta_c"] = {"w": torch.zeros(2, dtype=torch.float64)}
        x.extras["fednova_steps"] = 3
    out = s.aggregate_fit(g, f)
    if name in ("fedadam", "fedyogi"):  # a server optimizer moves towards the sites, it does not jump there
        assert ((out["w"] - g["w"]) * (a["w"] - g["w"]) > 0).all()
    else:
        torch.testing.assert_close(out["w"], a["w"])
    assert out["n"].dtype == torch.int64


def test_fednova_normalises_each_update_by_its_steps_by_hand():
    """x <- x - tau_eff * sum_k p_k (x - y_k) / tau_k, tau_eff = sum_k p_k tau_k; buffers as in FedAvg."""
    def state(w, mean, batches):
        return {"w": torch.tensor(w), "bn.running_mean": torch.tensor([mean]),
                "bn.num_batches_tracked": torch.tensor(batches)}

    g, a, b = state([1.0, 2.0], 0.0, 0), state([0.0, 1.0], 1.0, 2), state([3.0, 6.0], 5.0, 10)
    f = fits([a, b], [10, 30])
    f[0].extras["fednova_steps"], f[1].extras["fednova_steps"] = 2, 10
    s = make_strategy("fednova")
    assert not s.summable and s.dp_incompatible is None
    out = s.aggregate_fit(g, f)
    # p = (0.25, 0.75); d_a = (1 - 0, 2 - 1) / 2; d_b = (1 - 3, 2 - 6) / 10; tau_eff = 0.5 + 7.5 = 8
    expected = [1.0 - 8 * (0.25 * 0.5 + 0.75 * -0.2), 2.0 - 8 * (0.25 * 0.5 + 0.75 * -0.4)]
    torch.testing.assert_close(out["w"], torch.tensor(expected))
    fedavg_w = [0.25 * 0.0 + 0.75 * 3.0, 0.25 * 1.0 + 0.75 * 6.0]
    assert not torch.allclose(out["w"], torch.tensor(fedavg_w))  # the many-step site pulls FedAvg further
    assert out["bn.running_mean"].item() == pytest.approx(0.25 * 1.0 + 0.75 * 5.0)  # pooled mean, as FedAvg
    assert out["bn.num_batches_tracked"].dtype == torch.int64
    # equal step counts: FedNova is FedAvg
    f[0].extras["fednova_steps"] = 10
    torch.testing.assert_close(s.aggregate_fit(g, f)["w"], torch.tensor(fedavg_w))
    with pytest.raises(ValueError, match="positive step count"):
        f[0].extras["fednova_steps"] = 0
        s.aggregate_fit(g, f)


def test_fednova_federation_reports_real_step_counts_and_aggregates_them():
    """Two sites of 40 and 90 samples (batch 16: 3 and 6 steps per epoch) through the round loop: the
    global model is FedNova's formula applied to what each site sent."""
    from fedmed.federated import FederationSettings, InProcessSite, Orchestrator
    from fedmed.federated.strategies.fednova import fednova
    from tests.test_orchestrator import clients, factory

    torch.manual_seed(0)
    initial = factory().net.state_dict()
    s = make_strategy("fednova")
    sites = clients((40, 90))
    for c in sites:
        c.part = s.site_part()
    result = Orchestrator([InProcessSite(c) for c in sites], s, FederationSettings(rounds=1, local_epochs=2,
                                                                                       select="last")).run(initial)
    replay = clients((40, 90))
    for c in replay:
        c.part = s.site_part()
    answers = [c.train(initial, 1, 2) for c in replay]
    assert [a.extras["fednova_steps"] for a in answers] == [2 * 3, 2 * 6]
    expected = fednova(initial, [a.weights for a in answers], [40, 90], [6, 12])
    for k, v in expected.items():
        assert torch.equal(v, result.final_weights[k]), k
