"""Sharpness-aware minimisation (model.optimizer.sam_rho): the step against its formula computed by hand,
through Lightning as a site trains, and its refusals."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedmed.build import check_settings
from fedmed.config import compose
from fedmed.errors import FedmedError
from fedmed.models.classifier import Classifier
from fedmed.models.sam import SAM
from fedmed.schema import validate


def small_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(16, 5, generator=gen), torch.arange(16) % 3


def by_hand(net: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, rho: float,
            prior: torch.Tensor | float = 0.0) -> dict[str, torch.Tensor]:
    """w - lr * grad L(w + rho * g / ||g||), g = grad L(w), L the cross-entropy of ``net(x) + prior``: with
    torch.func on a copy of the weights."""
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    grad = torch.func.grad(lambda p: nn.functional.cross_entropy(torch.func.functional_call(net, p, (x,)) + prior, y))
    g = grad(params)
    norm = torch.sqrt(sum((v ** 2).sum() for v in g.values()))
    g_ascent = grad({k: params[k] + rho * g[k] / norm for k in params})
    return {k: params[k] - lr * g_ascent[k] for k in params}


def test_a_step_takes_the_gradient_at_the_ascent_point_as_computed_by_hand():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = small_batch()
    expected = by_hand(net, x, y, lr=0.1, rho=0.5)
    opt = SAM(torch.optim.SGD(net.parameters(), lr=0.1), rho=0.5)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        return loss

    plain = by_hand(net, x, y, lr=0.1, rho=1e-9)  # an SGD step
    before = nn.functional.cross_entropy(net(x), y).item()
    loss = opt.step(closure)
    assert loss.item() == pytest.approx(before)  # the loss at the weights themselves
    for k, v in net.named_parameters():
        torch.testing.assert_close(v.detach(), expected[k], rtol=1e-5, atol=1e-6)
    assert max((expected[k] - plain[k]).abs().max().item() for k in expected) > 1e-3  # rho changes the step


def test_the_pass_at_the_perturbed_weights_leaves_the_batchnorm_statistics_as_the_first_pass_set_them():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    x, y = small_batch()
    twin = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    twin.load_state_dict(net.state_dict())
    twin(x)  # one training-mode pass: what the statistics should be after one step
    opt = SAM(torch.optim.SGD(net.parameters(), lr=0.1), rho=0.5, net=net)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        torch.testing.assert_close(net.state_dict()[name], twin.state_dict()[name])
    unguarded = SAM(torch.optim.SGD(twin.parameters(), lr=0.1), rho=0.5)  # without net=: both passes count
    twin.load_state_dict({**net.state_dict()})
    seen = twin.state_dict()["1.num_batches_tracked"].item()
    unguarded.step(lambda: nn.functional.cross_entropy(twin(x), y).backward())
    assert twin.state_dict()["1.num_batches_tracked"].item() == seen + 2


def test_its_state_is_the_wrapped_optimizers_so_kept_moments_resume():
    torch.manual_seed(0)
    net = nn.Linear(5, 3)
    x, y = small_batch()
    base = torch.optim.Adam(net.parameters(), lr=1e-2)
    opt = SAM(base, rho=0.05)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    state = opt.state_dict()
    assert state["state"][0]["step"].item() == 3  # one Adam step per SAM step, not two
    torch.testing.assert_close(state["state"][0]["exp_avg"], base.state_dict()["state"][0]["exp_avg"])
    fresh = SAM(torch.optim.Adam(net.parameters(), lr=1e-2), rho=0.05)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.base.state_dict()["state"][0]["exp_avg_sq"], state["state"][0]["exp_avg_sq"])
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    with pytest.raises(ValueError, match="rho"):
        SAM(base, rho=0.0)


def test_a_site_training_through_lightning_takes_the_sam_step_of_its_logit_adjusted_loss():
    """One Lightning step of a Classifier with sam_rho and plain SGD equals the formula applied to the
    module's own loss (logit adjustment included); the logged training loss is the one at the weights."""
    torch.manual_seed(0)
    x, y = small_batch(1)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    module = Classifier(net, 3, lr=0.2, optimizer="sgd", momentum=0.0, logit_adjust=1.0, sam_rho=0.3)
    module.set_label_prior(torch.tensor([0, 0, 0, 1, 2]))
    prior = module.log_prior.clone()

    expected = by_hand(net, x, y, lr=0.2, rho=0.3, prior=prior)
    at_weights = nn.functional.cross_entropy(net(x) + prior, y).item()
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", limit_val_batches=0)
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=16))
    for k, v in net.named_parameters():
        torch.testing.assert_close(v.detach(), expected[k], rtol=1e-5, atol=1e-6)
    assert float(trainer.callback_metrics["train_loss"]) == pytest.approx(at_weights, rel=1e-5)
    assert module.sam is not None and not module.sam.perturbed


def test_sam_with_dp_or_a_negative_radius_is_refused_naming_the_key():
    cfg = compose("fit", ["experiment=smoke", "model.optimizer.sam_rho=0.05", "privacy.noise_multiplier=1.0"])
    with pytest.raises(FedmedError, match="model.optimizer.sam_rho"):
        check_settings(cfg, "federated")
    with pytest.raises(FedmedError, match="model.optimizer.sam_rho"):
        validate(compose("fit", ["experiment=smoke", "model.optimizer.sam_rho=-0.1"]))
