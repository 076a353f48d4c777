"""Levers on what the network's body learns: model.decorrelation (the feature decorrelation penalty, checked
against numpy's correlations and in training) and model.freeze_head (the classifier layer kept at its initial
weights); both are terms every site must agree on."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedmed.config import compose
from fedmed.contract import first_difference, terms
from fedmed.models import CompactCNN
from fedmed.models.classifier import Classifier
from fedmed.models.decorrelation import decorrelation_penalty
from fedmed.models.head import last_linear, penultimate


def numpy_penalty(z: np.ndarray) -> float:
    """B * the mean squared off-diagonal Pearson correlation, from numpy's own correlation matrix."""
    corr = np.corrcoef(z, rowvar=False)
    d = corr.shape[0]
    return len(z) * float((corr[~np.eye(d, dtype=bool)] ** 2).mean())


def test_penalty_is_the_batch_size_times_the_mean_squared_correlation_numpy_computes():
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(6, 6))
    for n in (2, 7, 64):
        z = rng.normal(size=(n, 6)) @ mixing  # correlated dimensions
        got = decorrelation_penalty(torch.tensor(z)).item()
        assert got == pytest.approx(numpy_penalty(z), rel=1e-4)


def test_penalty_is_zero_for_uncorrelated_dimensions_and_the_batch_size_for_one_direction():
    signs = torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]])  # orthogonal
    assert decorrelation_penalty(signs).item() == pytest.approx(0.0, abs=1e-6)
    direction = torch.randn(8, 1) * torch.tensor([[1.0, -2.0, 0.5]])  # every dimension a multiple of one
    assert decorrelation_penalty(direction).item() == pytest.approx(8.0, rel=1e-4)


def test_a_dead_dimension_or_a_single_image_gives_a_finite_penalty_and_gradient():
    z = torch.randn(16, 4)
    z[:, 2] = 0.0  # a ReLU unit that never fires
    z.requires_grad_(True)
    penalty = decorrelation_penalty(z)
    penalty.backward()
    assert torch.isfinite(penalty) and torch.isfinite(z.grad).all()
    alive = z.detach()[:, [0, 1, 3]]
    assert penalty.item() == pytest.approx(numpy_penalty(alive.numpy()) * 6 / 12, rel=1e-4)  # 6 of 12 pairs alive
    assert decorrelation_penalty(torch.randn(1, 4)).item() == 0.0


def train_small(**module_args) -> tuple[CompactCNN, dict[str, torch.Tensor], torch.Tensor, list[float]]:
    """Train a compact CNN on small two-class images with ``module_args`` for :class:`Classifier`; returns the
    network, its initial weights, the training images and the training loss of each epoch."""
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(128) % 2
    x = torch.randn(128, 1, 16, 16, generator=gen) * 0.5 + y.view(-1, 1, 1, 1).float()
    L.seed_everything(0, verbose=False)
    net = CompactCNN(in_channels=1, num_classes=2, channels=(8, 16), hidden=32, dropout=0.0)
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    module = Classifier(net, 2, lr=3e-3, **module_args)
    losses: list[float] = []

    class Losses(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            losses.append(float(trainer.callback_metrics["train_loss"]))

    trainer = L.Trainer(max_epochs=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", deterministic=True, callbacks=[Losses()])
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=gen))
    return net, initial, x, losses


def trained_penalty(weight: float) -> float:
    """The penalty of the penultimate features (in eval mode) on the training images after training with
    ``weight``."""
    net, _, x, _ = train_small(decorrelation=weight)
    net.eval()
    with torch.no_grad(), penultimate(net) as seen:
        net(x)
    return decorrelation_penalty(seen[0]).item()


def test_training_with_the_penalty_spreads_the_features_over_more_directions():
    plain, decorrelated = trained_penalty(0.0), trained_penalty(1.0)
    assert decorrelated < 0.5 * plain, (plain, decorrelated)


def test_a_frozen_head_keeps_its_initial_weights_while_the_body_learns():
    net, initial, _, losses = train_small(freeze_head=True)
    name, _ = last_linear(net)
    after = net.state_dict()
    for key in (f"{name}.weight", f"{name}.bias"):
        assert torch.equal(after[key], initial[key]), key
    body = [k for k in initial if not k.startswith(name) and after[k].is_floating_point()]
    assert body and all(not torch.equal(after[k], initial[k]) for k in body if "running" not in k)
    assert losses[-1] < 0.5 * losses[0], losses  # the body alone still learns the task
    net, initial, _, _ = train_small()  # and without it the head moves
    assert not torch.equal(net.state_dict()[f"{name}.weight"], initial[f"{name}.weight"])


@pytest.mark.parametrize("override,term", [("model.decorrelation=0.1", "decorrelation=0.1"),
                                           ("model.freeze_head=true", "freeze_head=True")])
def test_each_lever_is_a_term_of_the_federation_that_a_site_must_share(override, term):
    cfg, other = (compose("fit", ["experiment=smoke", *extra]) for extra in ([], [override]))
    weights = CompactCNN(in_channels=1, num_classes=2).state_dict()
    why = first_difference(terms(cfg, weights), terms(other, weights))
    assert why is not None and "model.loss" in why and term in why, why
