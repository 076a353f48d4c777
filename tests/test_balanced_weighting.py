"""federation.weighting=balanced: each site weighs its update by its share of the class-balanced objective,
from its own label counts and the federation's totals (a secure sum where secure aggregation is on); checked
against pooled class-weighted gradient descent, and refused where it cannot hold."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from fedmed.aggregation import balanced_weight, fedavg
from fedmed.build import check_settings
from fedmed.config import compose
from fedmed.contract import first_difference, terms
from fedmed.errors import FedmedError
from fedmed.federated import FederationSettings, InProcessSite, Orchestrator, SiteClient, TrainingSettings
from fedmed.federated.channel import UpdateChannel
from fedmed.federated.statistics import LABEL_COUNTS
from fedmed.flower import grid as fgrid
from fedmed.models import CompactCNN
from fedmed.schema import validate
from tests.helpers import strategy as make_strategy
from tests.test_flower_app import LoopbackGrid, serverapp  # noqa: F401 - the fixture
from tests.test_orchestrator import factory, synthetic_site


def test_the_weight_is_the_class_balanced_share_and_never_above_the_image_count():
    counts = np.array([[30, 5, 0], [10, 40, 2], [200, 5, 8]])
    totals = counts.sum(0)
    weights = [balanced_weight(c.tolist(), totals.tolist()) for c in counts]
    share = (counts / totals).mean(1)  # (1/C) sum_c n_kc / N_c
    assert np.allclose(np.array(weights) / sum(weights), share / share.sum(), atol=0.01)
    assert all(w <= n for w, n in zip(weights, counts.sum(1), strict=True))
    # by hand: the rarest class has 10 images, so an image of class c counts 10 / N_c
    assert weights[0] == round(30 * 10 / 240 + 5 * 10 / 50)
    assert balanced_weight([0, 0, 10], totals.tolist()) == 10  # only the rarest class: every image counts 1
    assert balanced_weight([1, 0, 0], [10_000, 0, 10]) == 1  # at least 1
    with pytest.raises(ValueError, match="count 3 images of class 1, fewer than the 5 this site holds"):
        balanced_weight([1, 5], [10, 3])
    with pytest.raises(ValueError, match="2 class totals for 3 classes"):
        balanced_weight([1, 2, 3], [4, 5])
    with pytest.raises(ValueError, match="all 0"):
        balanced_weight([0, 0], [0, 0])


def test_one_step_at_single_class_sites_is_one_step_of_pooled_class_balanced_descent():
    """Sites that each hold one class, one full-batch gradient step each: the balanced mean of their models is
    the model after one step on the pooled data with every class weighed alike (torch's class-weighted loss)."""
    g = torch.Generator().manual_seed(0)
    labels = [0, 0, 1, 2]  # two sites of class 0
    sizes = [6, 14, 40, 10]  # class totals 20, 40, 10: every weight is a whole number
    xs = [torch.randn(n, 5, generator=g) + y for n, y in zip(sizes, labels, strict=True)]
    ys = [torch.full((n,), y) for n, y in zip(sizes, labels, strict=True)]
    start = {"w": torch.randn(3, 5, generator=g, dtype=torch.float64), "b": torch.zeros(3, dtype=torch.float64)}
    lr = 0.5

    def step(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        w, b = (start[k].clone().requires_grad_(True) for k in ("w", "b"))
        F.cross_entropy(x.double() @ w.T + b, y, weight=weight).backward()
        return {"w": (w - lr * w.grad).detach(), "b": (b - lr * b.grad).detach()}

    totals = torch.bincount(torch.cat(ys), minlength=3)
    weights = [balanced_weight(torch.bincount(y, minlength=3).tolist(), totals.tolist()) for y in ys]
    assert weights == [3, 7, 10, 10]
    federated = fedavg([step(x, y) for x, y in zip(xs, ys, strict=True)], weights)
    pooled = step(torch.cat(xs), torch.cat(ys), weight=1.0 / totals.double())
    for k in start:
        torch.testing.assert_close(federated[k], pooled[k])
    by_examples = fedavg([step(x, y) for x, y in zip(xs, ys, strict=True)], sizes)
    assert not torch.allclose(by_examples["w"], pooled["w"])  # FedAvg's own weights give another model


def balanced_site(k: int, n: int, secure: bool = False, weighting: str = "balanced") -> SiteClient:
    return SiteClient(f"s{k}", synthetic_site(k, n, 0.15 + 0.6 * k), factory,
                      TrainingSettings(batch_size=16, trainer={"accelerator": "cpu"}, seed=5,
                                       shares=frozenset({LABEL_COUNTS}), weighting=weighting),
                      site_index=k, channel=UpdateChannel(f"s{k}", masked_only=secure))


class Recorded(InProcessSite):
    """An in-process site whose answers the test reads."""

    sent: list = []

    def fit(self, weights, round_idx, epochs, instructions=None):
        out = super().fit(weights, round_idx, epochs, instructions)
        self.sent.append((self.name, out.num_samples, dict(instructions or {})))
        return out


@pytest.mark.parametrize("secure", [False, True], ids=["clear", "secure_aggregation"])
def test_each_site_weighs_its_update_by_its_balanced_share(secure):
    torch.manual_seed(0)
    initial = factory().net.state_dict()
    Recorded.sent = []
    clients = [balanced_site(k, n, secure) for k, n in enumerate((40, 90))]
    orch = Orchestrator([Recorded(c) for c in clients], make_strategy("fedavg"),
                        FederationSettings(rounds=1, select="last", weighting="balanced", num_classes=2,
                                           secure_aggregation=secure))
    orch.run(initial)
    counts = [np.bincount(c.data.train.y.numpy(), minlength=2) for c in clients]
    assert orch.label_counts == sum(counts).tolist()
    want = {c.name: balanced_weight(k.tolist(), sum(counts).tolist()) for c, k in zip(clients, counts, strict=True)}
    assert {name: n for name, n, _ in Recorded.sent} == want
    assert want["s0"] != 40 and want != {"s0": 40, "s1": 90}  # not the image counts
    assert all(i["class_totals"] == orch.label_counts and "label_prior" not in i for _, _, i in Recorded.sent)


def test_the_weighting_changes_the_federation_and_travels_over_flower(serverapp):  # noqa: F811
    """Through Flower (the site's answer checked against the images it declared) the balanced federation gives the
    in-process one's weights, and they differ from FedAvg's."""
    torch.manual_seed(0)
    initial = factory().net.state_dict()
    out = {}
    for weighting, remote in (("examples", False), ("balanced", False), ("balanced", True)):
        makers = [lambda k=k, n=n, w=weighting: balanced_site(k, n, weighting=w) for k, n in enumerate((40, 90))]
        if remote:
            sites = fgrid.accept(LoopbackGrid({10 + k: m for k, m in enumerate(makers)}), ["s0", "s1"], timeout=30,
                                 hello={})
        else:
            sites = [InProcessSite(m()) for m in makers]
        settings = FederationSettings(rounds=2, select="last", weighting=weighting, num_classes=2)
        out[weighting, remote] = Orchestrator(sites, make_strategy("fedavg"), settings).run(initial).weights
    for k, v in out["balanced", False].items():
        torch.testing.assert_close(out["balanced", True][k], v, atol=1e-6, rtol=0)
    assert not torch.allclose(out["balanced", False]["head.5.weight"], out["examples", False]["head.5.weight"])


def test_a_site_refuses_totals_it_did_not_agree_to_or_that_are_not_the_federations():
    w = factory().net.state_dict()
    plain = balanced_site(0, 40, weighting="examples")
    with pytest.raises(ValueError, match="configured with federation.weighting=examples"):
        plain.train(w, 1, 1, {"class_totals": [100, 100]})
    site = balanced_site(0, 40)
    with pytest.raises(ValueError, match="the server sent no class totals"):
        site.train(w, 1, 1, {})
    with pytest.raises(ValueError, match="the server's class totals: counts must be 2 non-negative integers"):
        site.train(w, 1, 1, {"class_totals": [10, -1]})
    with pytest.raises(ValueError, match="fewer than the .* this site holds"):  # a server inflating this site
        site.train(w, 1, 1, {"class_totals": [1, 1]})


def test_refused_with_dp_checked_by_the_schema_and_a_term_of_the_federation():
    with pytest.raises(FedmedError, match="federation.weighting=balanced with DP-SGD"):
        check_settings(compose("fit", ["experiment=smoke", "federation.weighting=balanced", "privacy.epsilon=8"]),
                       "federated")
    with pytest.raises(FedmedError, match="federation.weighting"):
        validate(compose("fit", ["experiment=smoke", "federation.weighting=uniform"]))
    cfg, other = (compose("fit", ["experiment=smoke", *extra]) for extra in ([], ["federation.weighting=balanced"]))
    weights = CompactCNN(in_channels=1, num_classes=2).state_dict()
    why = first_difference(terms(cfg, weights), terms(other, weights))
    assert why is not None and "federation.weighting" in why, why
