"""Explanations: a planted-evidence task with a known relevant region, and real PneumoniaMNIST shapes."""

import lightning as L
import pytest
import torch

from fedmed.data.datamodule import ArrayDataset, make_loader
from fedmed.explain import (
    METHODS,
    area_fraction,
    class_mean_maps,
    deletion_insertion,
    explain,
    heatmap_grid,
    map_correlation,
    randomized_copy,
    rank_correlation,
    relevance_mass,
)
from fedmed.models import CompactCNN
from fedmed.models.classifier import Classifier


def planted(n: int, seed: int, size: int = 28, blob: int = 6):
    """Noise images with one bright square; its half (left/right) is the class. Returns x, y, region masks."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, generator=g) * 0.3
    y = torch.randint(0, 2, (n,), generator=g)
    regions = torch.zeros(n, size, size, dtype=torch.bool)
    for i in range(n):
        r = int(torch.randint(0, size - blob, (1,), generator=g))
        c = int(torch.randint(0, size // 2 - blob, (1,), generator=g)) + (size // 2 if y[i] else 0)
        x[i, 0, r : r + blob, c : c + blob] += 0.7
        regions[i, r : r + blob, c : c + blob] = True
    return x, y, regions


@pytest.fixture(scope="module")
def trained():
    L.seed_everything(0, verbose=False)
    x, y, _ = planted(1024, 0)
    module = Classifier(CompactCNN(in_channels=1, num_classes=2), 2, lr=3e-3)
    L.Trainer(max_epochs=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu").fit(module, make_loader(ArrayDataset(x, y), 32, True))
    return module.net.eval()


def test_gradcam_finds_planted_evidence_and_random_model_does_not(trained):
    x, y, regions = planted(128, 1)
    assert (trained(x).argmax(-1) == y).float().mean() > 0.95
    area = float(area_fraction(regions).mean())
    e_trained = float(relevance_mass(explain(trained, x, "gradcam", y), regions).mean())
    e_random = float(relevance_mass(explain(randomized_copy(trained), x, "gradcam", y), regions).mean())
    assert e_trained > 3 * area, (e_trained, area)
    assert e_random < 2 * area < e_trained, (e_random, area)


@pytest.mark.parametrize("method", ["gradcam", "integratedgradients"])
def test_deletion_insertion_and_sanity_check(trained, method):
    x, y, _ = planted(64, 2)
    maps = explain(trained, x, method, y)
    d, i = deletion_insertion(trained, x, maps, y)
    d_rand, i_rand = deletion_insertion(trained, x, torch.rand_like(maps), y)
    assert d.shape == (64,) and float(d.mean()) < float(d_rand.mean()) - 0.2  # removing the evidence hurts fast
    assert float(i.mean()) >= float(i_rand.mean()) - 0.02
    rho = rank_correlation(maps, explain(randomized_copy(trained), x, method, y))
    assert float(rho.mean()) < 0.5  # the maps depend on the learned weights
    assert float(rank_correlation(maps, maps).mean()) == pytest.approx(1.0)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_real_pneumoniamnist(pneumonia, method):
    net = CompactCNN(in_channels=1, num_classes=2).eval()
    x = torch.from_numpy(pneumonia.images("test")[:6]).float().div(255).unsqueeze(1)
    maps = explain(net, x, method, batch_size=4)
    assert maps.shape == (6, 28, 28) and maps.dtype == torch.float32
    assert float(maps.min()) >= 0 and float(maps.max()) <= 1 + 1e-6
    # batching does not change the per-image result
    one = explain(net, x[2:3], method)
    if method not in ("gradientshap", "eigencam"):  # random baselines / batch SVD
        torch.testing.assert_close(one[0], maps[2], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("method", ["gradcam", "layercam", "saliency", "integratedgradients"])
def test_3d_heatmaps(method):
    net = CompactCNN(in_channels=1, num_classes=2, spatial_dims=3).eval()
    maps = explain(net, torch.rand(2, 1, 16, 16, 16), method)
    assert maps.shape == (2, 16, 16, 16) and float(maps.max()) <= 1 + 1e-6


def test_scorecam_3d_is_refused_clearly():
    net = CompactCNN(in_channels=1, num_classes=2, spatial_dims=3)
    with pytest.raises(ValueError, match="scorecam"):
        explain(net, torch.rand(1, 1, 16, 16, 16), "scorecam")
    with pytest.raises(ValueError, match="one of"):
        explain(net, torch.rand(1, 1, 16, 16, 16), "gradcam-plus")


def test_class_mean_maps_and_consistency():
    a = torch.rand(10, 8, 8)
    labels = torch.tensor([0] * 5 + [1] * 5)
    m = class_mean_maps(a, labels, 3)
    assert m.shape == (3, 8, 8) and torch.isnan(m[2]).all()
    assert map_correlation(m, m) == pytest.approx(1.0)
    assert map_correlation(m, -m) == pytest.approx(-1.0)


def test_heatmap_grid_figure(trained):
    x, y, _ = planted(6, 3)
    maps = explain(trained, x, "gradcam")
    probs = trained(x).softmax(-1).max(-1)
    fig = heatmap_grid(x, maps, y, probs.indices, probs.values.detach(), ["left", "right"], "t")
    assert len([a for a in fig.axes if a.images]) == 18  # image, heatmap, overlay per sample


def test_cams_are_not_blank_for_either_class_on_real_data(pneumonia):
    """Regression: CAMs on the raw conv output were all-zero for every 'pneumonia' prediction."""
    L.seed_everything(0, verbose=False)
    x = torch.from_numpy(pneumonia.images("train")[:1500]).float().div(255).unsqueeze(1)
    y = torch.from_numpy(pneumonia.labels("train")[:1500])
    module = Classifier(CompactCNN(in_channels=1, num_classes=2), 2)
    L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu").fit(module, make_loader(ArrayDataset(x, y), 64, True))
    net = module.net.eval()
    xt = torch.from_numpy(pneumonia.images("test")[:96]).float().div(255).unsqueeze(1)
    pred = net(xt).argmax(-1)
    assert 0 < int(pred.sum()) < len(pred), "need predictions of both classes"
    for method in ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam"):
        peak = explain(net, xt, method).flatten(1).amax(1)
        for c in (0, 1):
            assert float((peak[pred == c] > 0).float().mean()) > 0.9, (method, c)
