"""Numeric tests of the aggregation functions (no Lightning)."""

import pytest
import torch
from torch import nn

from fedmed.aggregation import fedavg, state_nbytes
from fedmed.federated.messages import FitResult
from fedmed.federated.strategies import Strategy


def test_weighted_average_equals_pooled_gradient_step_on_linear_model():
    torch.manual_seed(0)
    base = nn.Linear(5, 3).double()
    sizes = [7, 30, 13]
    data = [(torch.randn(n, 5, dtype=torch.float64), torch.randn(n, 3, dtype=torch.float64)) for n in sizes]

    def step(x, y):
        m = nn.Linear(5, 3).double()
        m.load_state_dict(base.state_dict())
        nn.functional.mse_loss(m(x), y).backward()
        with torch.no_grad():
            for p in m.parameters():
                p -= 0.1 * p.grad
        return m.state_dict()

    site_states = [step(x, y) for x, y in data]
    pooled = step(torch.cat([x for x, _ in data]), torch.cat([y for _, y in data]))
    agg = fedavg(site_states, sizes)
    for k in pooled:
        torch.testing.assert_close(agg[k], pooled[k], rtol=0, atol=1e-12)
    # unweighted averaging is not the pooled result: the test can tell the difference
    unweighted = fedavg(site_states, [1, 1, 1])
    assert not torch.allclose(unweighted["weight"], pooled["weight"], atol=1e-6)


def test_bn_running_stats_are_pooled_moments():
    torch.manual_seed(1)
    sites = [torch.randn(n, 4) * s + m for n, s, m in ((50, 1.0, -2.0), (150, 3.0, 1.0), (20, 0.5, 5.0))]
    states = []
    for x in sites:
        states.append({
            "bn.weight": torch.ones(4), "bn.bias": torch.zeros(4),
            "bn.running_mean": x.mean(0), "bn.running_var": x.var(0, unbiased=False),
            "bn.num_batches_tracked": torch.tensor(len(x), dtype=torch.long),
        })
    pooled = torch.cat(sites)
    agg = fedavg(states, [len(x) for x in sites])
    torch.testing.assert_close(agg["bn.running_mean"], pooled.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(agg["bn.running_var"], pooled.var(0, unbiased=False), rtol=1e-5, atol=1e-5)
    # the textbook mean of variances underestimates the pooled variance here
    plain = fedavg(states, [len(x) for x in sites], bn_stats="mean")
    assert (plain["bn.running_var"] < pooled.var(0, unbiased=False) - 0.5).all()
    assert agg["bn.num_batches_tracked"].dtype == torch.long


def test_dtypes_preserved_and_integers_rounded():
    states = [
        {"h": torch.tensor([1.0, 2.0], dtype=torch.float16), "d": torch.tensor([1.0], dtype=torch.float64),
         "n": torch.tensor(3)},
        {"h": torch.tensor([3.0, 4.0], dtype=torch.float16), "d": torch.tensor([2.0], dtype=torch.float64),
         "n": torch.tensor(6)},
    ]
    out = fedavg(states, [1, 3])
    assert out["h"].dtype == torch.float16 and out["d"].dtype == torch.float64 and out["n"].dtype == torch.int64
    torch.testing.assert_close(out["h"], torch.tensor([2.5, 3.5], dtype=torch.float16))
    torch.testing.assert_close(out["d"], torch.tensor([1.75], dtype=torch.float64))
    assert int(out["n"]) == 5  # 0.25*3 + 0.75*6 = 5.25 -> 5


def test_one_site_is_identity_and_equal_weights_is_mean():
    a = {"w": torch.tensor([1.0, -2.0])}
    b = {"w": torch.tensor([3.0, 4.0])}
    torch.testing.assert_close(fedavg([a], [17])["w"], a["w"])
    torch.testing.assert_close(fedavg([a, b], [5, 5])["w"], torch.tensor([2.0, 1.0]))
    fits = [FitResult("a", a, 1), FitResult("b", b, 3)]
    assert Strategy().aggregate_fit(a, fits)["w"].tolist() == [2.5, 2.5]


@pytest.mark.parametrize(
    "states,counts,match",
    [
        ([{"w": torch.ones(2)}, {"v": torch.ones(2)}], [1, 1], "different keys"),
        ([{"w": torch.ones(2)}, {"w": torch.ones(3)}], [1, 1], "key 'w'"),
        ([{"w": torch.ones(2)}, {"w": torch.ones(2, dtype=torch.float64)}], [1, 1], "key 'w'"),
        ([{"w": torch.ones(2)}, {"w": torch.ones(2)}], [4, 0], "positive"),
        ([{"w": torch.ones(2)}], [1, 2], "sample counts"),
        ([], [], "nothing to aggregate"),
    ],
)
def test_bad_inputs_are_rejected(states, counts, match):
    with pytest.raises(ValueError, match=match):
        fedavg(states, counts)


def test_state_nbytes():
    assert state_nbytes({"a": torch.zeros(10), "b": torch.zeros(4, dtype=torch.float16)}) == 48
