"""Networks: output shapes on 28 px and larger inputs, 2D and 3D; the Lightning module trains."""

import math

import lightning as L
import pytest
import torch

from fedmed.data.datamodule import ArrayDataset, make_loader
from fedmed.models import CompactCNN, EfficientNetLite0, SmallInputDenseNet
from fedmed.models.classifier import Classifier

NETS = {"cnn": CompactCNN, "densenet": SmallInputDenseNet, "efficientnet_lite0": EfficientNetLite0}


@pytest.mark.parametrize("name", ["cnn", "densenet", "efficientnet_lite0"])
@pytest.mark.parametrize("size", [28, 64])
def test_2d_shapes(name, size):
    net = NETS[name](in_channels=3, num_classes=4)
    assert net(torch.randn(2, 3, size, size)).shape == (2, 4)


def test_3d_shapes():
    assert CompactCNN(in_channels=1, num_classes=2, spatial_dims=3)(torch.randn(2, 1, 28, 28, 28)).shape == (2, 2)
    net = SmallInputDenseNet(in_channels=1, num_classes=2, spatial_dims=3, block_config=(2, 2))
    assert net(torch.randn(1, 1, 16, 16, 16)).shape == (1, 2)


def test_target_layers_exist():
    for name in NETS:
        net = NETS[name](in_channels=1, num_classes=2)
        for path in net.target_layers:
            assert isinstance(net.get_submodule(path), torch.nn.Module)


def test_cnn_block_count_follows_channels_and_cams_use_the_last_block():
    net = CompactCNN(in_channels=1, num_classes=4, channels=[32, 64, 128, 256], stem_stride=2)
    assert [name for name, _ in net.features.named_children()] == ["block1", "block2", "block3", "block4"]
    assert net.target_layers == ("features.block4.act",)
    acts = {}
    net.get_submodule(net.target_layers[0]).register_forward_hook(lambda m, i, o: acts.setdefault("a", o))
    assert net(torch.randn(2, 1, 128, 128)).shape == (2, 4)
    assert acts["a"].shape == (2, 256, 8, 8)  # 128 -> 64 (stem stride) -> 32 -> 16 -> 8 after the 4th conv
    for bad in ([], "wide"):
        with pytest.raises(ValueError, match="channels"):
            CompactCNN(in_channels=1, num_classes=4, channels=bad)
    auto = {size: CompactCNN(in_channels=1, num_classes=4, channels="auto", image_size=size) for size in (28, 128)}
    assert auto[28].target_layers == ("features.block3.act",) and auto[128].target_layers == ("features.block4.act",)


def test_model_configs_build_their_network_by_target():
    """``configs/model/*.yaml`` choose the network by Hydra ``_target_``: the only model registry."""
    from pathlib import Path

    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    configs = Path(__file__).resolve().parent.parent / "configs" / "model"
    data = {"in_channels": 1, "num_classes": 3, "spatial_dims": 2, "image_size": 28}
    for name, cls in NETS.items():
        cfg = OmegaConf.create({"data": data, "model": OmegaConf.load(configs / f"{name}.yaml")})
        net = instantiate(cfg.model.net, _convert_="all")
        assert type(net) is cls and net(torch.randn(2, 1, 28, 28)).shape == (2, 3)
    with pytest.raises(ValueError, match="EfficientNetLite0 is a 2D network"):
        EfficientNetLite0(in_channels=1, num_classes=2, spatial_dims=3)
    with pytest.raises(InstantiationException, match="fedmed.models.ResNet"):
        instantiate({"_target_": "fedmed.models.ResNet"})


@pytest.mark.parametrize("optimizer, lr", [("adam", 3e-3), ("sgd", 0.05)])
def test_classifier_learns_a_separable_task(optimizer, lr):
    torch.manual_seed(0)
    y = torch.randint(0, 2, (256,))
    x = torch.randn(256, 1, 28, 28) * 0.1
    x[y == 1, :, :14] += 1.0  # class 1: bright top half
    module = Classifier(CompactCNN(in_channels=1, num_classes=2), 2, lr=lr, optimizer=optimizer)
    opt = module.configure_optimizers()
    assert type(opt).__name__ == {"adam": "Adam", "sgd": "SGD"}[optimizer]
    if optimizer == "sgd":
        assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["lr"] == lr
    trainer = L.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    ds = ArrayDataset(x, y)
    trainer.fit(module, make_loader(ds, 32, True), make_loader(ds, 128, False))
    assert module.last_val["acc"] > 0.95
    probs = module.predict_proba(x[:4])
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))


def test_cnn_group_norm_has_no_batch_statistics():
    net = CompactCNN(in_channels=1, num_classes=2, norm="group", norm_groups=8)
    assert not any(k.endswith("running_mean") for k in net.state_dict())
    assert net.features.block2.norm.num_groups == 8
    net.train()  # per-image normalisation: an image's output does not depend on the rest of the batch
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(net.features(x)[:1], net.features(x[:1]))
    with pytest.raises(ValueError, match="layer"):
        CompactCNN(norm="layer")


def test_unknown_optimizer_is_named():
    with pytest.raises(ValueError, match="rmsprop"):
        Classifier(CompactCNN(in_channels=1, num_classes=2), 2, optimizer="rmsprop")


def test_cnn_stem_stride_auto_strides_large_inputs_only():
    small = CompactCNN(in_channels=1, num_classes=4, stem_stride="auto", image_size=64)
    large = CompactCNN(in_channels=1, num_classes=4, stem_stride="auto", image_size=128)
    assert small.features.block1.conv.stride == (1, 1)
    assert large.features.block1.conv.stride == (2, 2)
    assert large(torch.randn(2, 1, 128, 128)).shape == (2, 4)
    # the rectified map CAMs read is 128 / 2 / 8 = 8 px wide
    acts = {}
    large.get_submodule(large.target_layers[0]).register_forward_hook(lambda m, i, o: acts.setdefault("a", o))
    large(torch.randn(1, 1, 128, 128))
    assert acts["a"].shape[-2:] == (16, 16)  # before block3's pool
    with pytest.raises(ValueError, match="stem_stride"):
        CompactCNN(stem_stride=4)


class _BiasOnly(torch.nn.Module):
    """A 'network' that can only learn a class prior: its logits ignore the image."""

    def __init__(self, k):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(k))

    def forward(self, x):
        return self.bias.expand(len(x), -1)


@pytest.mark.parametrize("tau", [0.0, 1.0])
def test_logit_adjusted_loss_learns_a_balanced_classifier(tau):
    """With plain cross-entropy a prior-only model learns logit gaps log(pi_c / pi_0); with the
    logit-adjusted loss (tau = 1) the site's prior is absorbed by the adjustment and the raw
    logits come out equal: the classifier no longer favours the site's majority class."""
    torch.manual_seed(0)
    y = torch.tensor([0] * 720 + [1] * 240 + [2] * 40)  # a skewed site: 72% / 24% / 4%
    ds = ArrayDataset(torch.zeros(len(y), 1, 4, 4), y)
    module = Classifier(_BiasOnly(3), 3, lr=0.1, logit_adjust=tau)
    module.set_label_prior(ds.y)
    prior = torch.tensor([721, 241, 41]) / 1003.0  # add-one smoothed
    torch.testing.assert_close(module.log_prior, prior.log())
    trainer = L.Trainer(max_epochs=30, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", limit_val_batches=0)
    trainer.fit(module, make_loader(ds, 100, True))
    gaps = module.net.bias.detach() - module.net.bias.detach()[0]
    expected = torch.zeros(3) if tau else torch.log(torch.tensor([720, 240, 40]) / 720.0)
    torch.testing.assert_close(gaps, expected, atol=0.05, rtol=0)


def _scores(logits, y, k):
    from torch.utils.data import DataLoader, TensorDataset

    from fedmed.models.metrics import evaluate

    class Fixed(torch.nn.Module):  # returns the given logits for the given inputs (their index)
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, i):
            return logits[i.long()]

    return evaluate(Fixed(), DataLoader(TensorDataset(torch.arange(len(y)), y), batch_size=4), k)[0]


def test_auroc_is_macro_over_defined_classes_and_nan_when_none_is():
    def roc_auc_score(pos, score):  # Mann-Whitney: P(score of a positive > score of a negative)
        a, b = score[pos], score[~pos]
        return float((a[:, None] > b[None, :]).double().mean())

    torch.manual_seed(0)
    logits = torch.randn(40, 3)
    y = torch.randint(0, 2, (40,))  # class 2 never occurs: its one-vs-rest AUROC is undefined
    p = logits.softmax(-1)
    expected = (roc_auc_score(y == 0, p[:, 0]) + roc_auc_score(y == 1, p[:, 1])) / 2
    assert _scores(logits, y, 3)["auroc"] == pytest.approx(expected, abs=1e-6)
    one_class = torch.ones(40, dtype=torch.long)  # a site whose validation data is all one class
    assert math.isnan(_scores(logits, one_class, 3)["auroc"])


def test_federated_mean_skips_sites_where_a_metric_is_undefined():
    from fedmed.federated.messages import EvalResult
    from fedmed.federated.orchestrator import weighted_metrics

    sites = [EvalResult("a", 100, {"auroc": 0.9, "loss": 0.2}),
             EvalResult("b", 300, {"auroc": float("nan"), "loss": 0.4})]
    out = weighted_metrics(sites)
    assert out["auroc"] == pytest.approx(0.9) and out["loss"] == pytest.approx(0.35)
    assert math.isnan(weighted_metrics(sites[1:])["auroc"])
