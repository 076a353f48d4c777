"""Networks: output shapes on 28 px and larger inputs, 2D and 3D; the Lightning module trains."""

import lightning as L
import pytest
import torch

from fedmed.data.datamodule import ArrayDataset, make_loader
from fedmed.models import create_model
from fedmed.models.classifier import Classifier


@pytest.mark.parametrize("name", ["cnn", "densenet"])
@pytest.mark.parametrize("size", [28, 64])
def test_2d_shapes(name, size):
    net = create_model(name, in_channels=3, num_classes=4)
    assert net(torch.randn(2, 3, size, size)).shape == (2, 4)


def test_3d_shapes():
    assert create_model("cnn", in_channels=1, num_classes=2, spatial_dims=3)(torch.randn(2, 1, 28, 28, 28)).shape == (2, 2)
    net = create_model("densenet", in_channels=1, num_classes=2, spatial_dims=3, block_config=(2, 2))
    assert net(torch.randn(1, 1, 16, 16, 16)).shape == (1, 2)


def test_target_layers_exist():
    for name in ("cnn", "densenet"):
        net = create_model(name, in_channels=1, num_classes=2)
        for path in net.target_layers:
            assert isinstance(net.get_submodule(path), torch.nn.Module)


def test_unknown_model_is_named():
    with pytest.raises(ValueError, match="resnet"):
        create_model("resnet")


def test_classifier_learns_a_separable_task():
    torch.manual_seed(0)
    y = torch.randint(0, 2, (256,))
    x = torch.randn(256, 1, 28, 28) * 0.1
    x[y == 1, :, :14] += 1.0  # class 1: bright top half
    module = Classifier(create_model("cnn", in_channels=1, num_classes=2), 2, lr=3e-3)
    trainer = L.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    ds = ArrayDataset(x, y)
    trainer.fit(module, make_loader(ds, 32, True), make_loader(ds, 128, False))
    assert module.last_val["acc"] > 0.95
    probs = module.predict_proba(x[:4])
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))
