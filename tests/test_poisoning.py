"""A poisoned site (sign-flipped, boosted update) wrecks FedAvg; robust aggregation keeps the clean accuracy."""

import pytest
import torch

from fedmed.data.datamodule import make_loader
from fedmed.federated import FederationSettings, InProcessSite, Orchestrator, SiteClient, TrainingSettings
from fedmed.federated.attack import Attack
from fedmed.models.metrics import evaluate
from tests.helpers import strategy as make_strategy
from tests.test_orchestrator import factory, synthetic_site

TEST = synthetic_site(99, 400, 0.5).train


def federation(strategy: str, attack: str | None) -> float:
    clients = [SiteClient(f"s{k}", synthetic_site(k, 60, 0.5), factory,
                          TrainingSettings(batch_size=16, trainer={"accelerator": "cpu"}, seed=5), site_index=k,
                          attack=Attack(attack, 10.0) if attack and k == 4 else None) for k in range(5)]
    torch.manual_seed(0)
    orch = Orchestrator([InProcessSite(c) for c in clients], make_strategy(strategy),
                        FederationSettings(rounds=3, local_epochs=1, select="last"))
    weights = orch.run(factory().net.state_dict()).final_weights
    net = factory().net
    net.load_state_dict(weights)
    return evaluate(net, make_loader(TEST, 256, False), 2)[0]["acc"]


@pytest.fixture(scope="module")
def clean() -> float:
    return federation("fedavg", None)


def test_signflip_attacker_breaks_fedavg_not_robust_aggregation(clean):
    assert clean > 0.9
    assert federation("fedavg", "signflip") < clean - 0.2
    for strategy in ("median", "trimmed_mean", "krum"):
        acc = federation(strategy, "signflip")
        assert acc >= clean - 0.03, (strategy, acc, clean)


def test_label_flipping_site_is_outvoted_by_median(clean):
    assert federation("median", "labelflip") >= clean - 0.03
