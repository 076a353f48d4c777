"""The orchestrator's round loop on small synthetic sites: it aggregates exactly what the sites return."""

import math

import pytest
import torch

from fedmed.data.datamodule import ArrayDataset, SiteData
from fedmed.federated import (
    FederationSettings,
    InProcessSite,
    Orchestrator,
    SiteClient,
    Strategy,
    TrainingSettings,
    fedavg,
)
from fedmed.federated.strategies.fedprox import ProximalTerm
from fedmed.models import CompactCNN
from fedmed.models.classifier import Classifier


def synthetic_site(seed: int, n: int, bias: float, noise: float = 0.2, shift: float = 1.0) -> SiteData:
    """Class 1 (share ``bias``) is brighter in the upper half by ``shift``; pixel noise ``noise``."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=g) < bias).long()
    x = torch.randn(n, 1, 12, 12, generator=g) * noise
    x[y == 1, :, :6] += shift
    return SiteData(ArrayDataset(x, y), ArrayDataset(x[: n // 4], y[: n // 4]))


def factory():
    return Classifier(CompactCNN(in_channels=1, num_classes=2, hidden=16), 2, lr=1e-2)


def clients(sizes=(40, 90), **site):
    return [SiteClient(f"s{k}", synthetic_site(k, n, 0.3 + 0.4 * k, **site), factory,
                       TrainingSettings(batch_size=16, trainer={"accelerator": "cpu"}, seed=5), site_index=k)
            for k, n in enumerate(sizes)]


def test_global_model_is_fedavg_of_site_updates():
    torch.manual_seed(0)
    initial = factory().net.state_dict()
    orch = Orchestrator([InProcessSite(c) for c in clients()], Strategy(),
                        FederationSettings(rounds=2, local_epochs=1, select="last"))
    result = orch.run(initial)
    # replay by hand with fresh clients: round 1, aggregate, round 2, aggregate
    fresh = clients()
    w = initial
    for r in (1, 2):
        fits = [c.train(w, r, 1) for c in fresh]
        w = fedavg([f.weights for f in fits], [f.num_samples for f in fits])
    for k in w:
        assert torch.equal(w[k], result.final_weights[k]), k
    assert [h.round for h in result.history] == [1, 2]
    assert result.history[0].bytes_up == result.history[0].bytes_down > 0
    assert result.history[-1].metrics["val_acc"] > 0.8


def test_site_sampling_respects_fraction_and_minimum():
    sites = [InProcessSite(c) for c in clients((20, 20))]
    orch = Orchestrator(sites, Strategy(), FederationSettings(rounds=1, fraction=0.5, min_sites=1, seed=3))
    picks = {tuple(s.name for s in orch.sample(r)) for r in range(1, 20)}
    assert all(len(p) == 1 for p in picks) and len(picks) == 2  # one site per round, both get picked
    with pytest.raises(ValueError, match="min_sites"):
        Orchestrator(sites, Strategy(), FederationSettings(rounds=1, min_sites=3))
    with pytest.raises(ValueError, match="select"):
        FederationSettings(rounds=1, select="best_test")


def test_cosine_learning_rate_continues_across_rounds():
    """A site's optimizer runs at the rate of the run epoch it is in: 3 rounds x 2 local epochs
    follow one half cosine over 6 epochs, not one per round."""
    seen: list[float] = []

    class Recording(Classifier):
        def on_train_epoch_start(self):
            seen.append(self.trainer.optimizers[0].param_groups[0]["lr"])

    def cosine_factory():
        return Recording(CompactCNN(in_channels=1, num_classes=2, hidden=16), 2, lr=1e-2,
                          lr_schedule="cosine", min_lr_ratio=0.1)

    site = SiteClient("s0", synthetic_site(0, 32, 0.5), cosine_factory,
                      TrainingSettings(batch_size=16, trainer={"accelerator": "cpu"}, planned_epochs=6))
    w = cosine_factory().net.state_dict()
    for r in (1, 2, 3):
        w = site.train(w, r, 2).weights
    expected = [1e-2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * e / 6))) for e in range(6)]
    assert seen == pytest.approx(expected, rel=1e-6)
    assert seen[0] == pytest.approx(1e-2) and seen[-1] < 0.2e-2


@pytest.mark.parametrize("keep", [False, True])
def test_site_optimizer_moments_reset_or_carry_over_between_rounds(keep):
    """model.optimizer.keep_state: a site's Adam resumes its moments and step count round after round
    (they never leave the site); off, every round starts a fresh Adam. The cosine rate follows the run
    either way."""
    steps: list[int] = []
    rates: list[float] = []

    class Recording(Classifier):
        def on_train_epoch_start(self):
            opt = self.trainer.optimizers[0]
            rates.append(opt.param_groups[0]["lr"])
            state = opt.state.get(next(self.net.parameters()), {})
            steps.append(int(state["step"]) if "step" in state else 0)

    def make():
        return Recording(CompactCNN(in_channels=1, num_classes=2, hidden=16), 2, lr=1e-2,
                         lr_schedule="cosine", min_lr_ratio=0.1, keep_state=keep)

    site = SiteClient("s0", synthetic_site(0, 32, 0.5), make,  # 2 batches per epoch
                      TrainingSettings(batch_size=16, trainer={"accelerator": "cpu"}, planned_epochs=4),
                      part=ProximalTerm())
    w = make().net.state_dict()
    for r in (1, 2):
        w = site.train(w, r, 2, {"prox_mu": 0.0}).weights  # FedProx with mu 0 is FedAvg: moments may stay
    assert steps == ([0, 2, 4, 6] if keep else [0, 2, 0, 2])
    assert rates == pytest.approx([1e-2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * e / 4))) for e in range(4)])
    if keep:  # what the site keeps after 2 rounds x 2 epochs x 2 batches: every parameter's 8 steps
        assert site.module.optimizer_state and all(int(v["step"]) == 8 for v in site.module.optimizer_state.values())
    # a FedProx round starts a fresh optimizer and leaves the kept state alone (README: kept moments
    # made FedProx collapse at Dirichlet 0.1)
    kept = site.module.optimizer_state
    steps.clear()
    site.train(w, 3, 2, {"prox_mu": 0.01})
    assert steps == [0, 2] and site.module.optimizer_state is kept
