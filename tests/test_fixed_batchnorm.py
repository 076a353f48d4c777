"""model.fix_batchnorm_from (FixBN): from that epoch of the run on, BatchNorm trains with its running
statistics and stops updating them, while its scale and shift still learn; refused where it cannot apply."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedmed.build import check_settings
from fedmed.config import compose
from fedmed.contract import first_difference, terms
from fedmed.errors import FedmedError
from fedmed.models import CompactCNN
from fedmed.models.classifier import Classifier
from fedmed.schema import validate

BN = "features.block1.norm"  # the first block's BatchNorm layer


def small_images() -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(64) % 2
    return TensorDataset(torch.randn(64, 1, 16, 16, generator=gen) * 0.5 + 2.0 * y.view(-1, 1, 1, 1).float(), y)


def train(fix_from: int | None, epochs: int, first_epoch: int = 0) -> tuple[list[dict[str, torch.Tensor]], Classifier]:
    """Train a compact CNN for ``epochs`` epochs starting at run epoch ``first_epoch`` (0-based, as a
    federated site's later round does); returns the first BatchNorm layer's state before and after each epoch."""
    L.seed_everything(0, verbose=False)
    net = CompactCNN(in_channels=1, num_classes=2, channels=(8, 16), hidden=16, dropout=0.0)
    module = Classifier(net, 2, lr=1e-2, fix_batchnorm_from=fix_from)
    module.schedule = (first_epoch, first_epoch + epochs)
    layer = dict(net.named_modules())[BN]
    seen = [{k: v.clone() for k, v in layer.state_dict().items()}]

    class Record(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            seen.append({k: v.clone() for k, v in layer.state_dict().items()})

    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", limit_val_batches=0, callbacks=[Record()])
    trainer.fit(module, DataLoader(small_images(), batch_size=16, shuffle=True))
    return seen, module


def test_statistics_stop_moving_from_the_epoch_named_while_scale_and_shift_still_learn():
    seen, _ = train(fix_from=3, epochs=4)
    moved = [not torch.equal(seen[e]["running_mean"], seen[e + 1]["running_mean"]) for e in range(4)]
    assert moved == [True, True, False, False]  # epochs 1 and 2 update them, 3 and 4 do not
    assert torch.equal(seen[4]["running_var"], seen[2]["running_var"])
    assert seen[4]["num_batches_tracked"] == seen[2]["num_batches_tracked"]
    assert not torch.equal(seen[4]["weight"], seen[2]["weight"]) and not torch.equal(seen[4]["bias"], seen[2]["bias"])
    plain, _ = train(fix_from=None, epochs=4)
    assert not torch.equal(plain[4]["running_mean"], plain[2]["running_mean"])


def test_a_later_round_counts_from_the_runs_first_epoch_and_trains_as_it_evaluates():
    seen, module = train(fix_from=3, epochs=1, first_epoch=5)  # a site's round 6: fixed from its first step
    assert torch.equal(seen[0]["running_mean"], seen[1]["running_mean"])
    assert module.batchnorm_fixed
    net = module.net
    x, _ = small_images()[:16]
    net.train()
    for layer in net.modules():  # what training_step does: BatchNorm in eval mode, the rest training
        if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
            layer.eval()
    torch.testing.assert_close(net(x), net.eval()(x))  # no dropout here: training normalises as evaluation
    early, module = train(fix_from=8, epochs=1, first_epoch=5)  # round 6 of a run fixed from 8: not yet
    assert not torch.equal(early[0]["running_mean"], early[1]["running_mean"]) and not module.batchnorm_fixed


def test_refused_past_the_last_epoch_without_batchnorm_or_below_one_and_a_term_of_the_federation():
    with pytest.raises(FedmedError, match="model.fix_batchnorm_from=5: after the run's last epoch"):
        check_settings(compose("fit", ["experiment=smoke", "federation.rounds=2", "model.fix_batchnorm_from=5"]),
                       "federated")
    with pytest.raises(FedmedError, match="model.fix_batchnorm_from=1: this network has no BatchNorm"):
        check_settings(compose("fit", ["experiment=smoke", "model.net.norm=group", "model.fix_batchnorm_from=1"]),
                       "federated")
    with pytest.raises(FedmedError, match="model.fix_batchnorm_from"):
        validate(compose("fit", ["experiment=smoke", "model.fix_batchnorm_from=0"]))
    cfg, other = (compose("fit", ["experiment=smoke", *extra]) for extra in ([], ["model.fix_batchnorm_from=1"]))
    weights = CompactCNN(in_channels=1, num_classes=2).state_dict()
    why = first_difference(terms(cfg, weights), terms(other, weights))
    assert why is not None and "fix_batchnorm_from=1" in why, why
