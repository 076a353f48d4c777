"""Fashion-MNIST from its plain npz (``data=fashion_mnist``, :class:`fedmed.data.NpzSource`): the config,
the official 60,000 / 10,000 samples with a validation share carved from train, and a missing file."""

from __future__ import annotations

import numpy as np
import pytest
from hydra.utils import instantiate

from fedmed.config import compose
from fedmed.data import DataSource, NpzSource, Pipeline
from fedmed.errors import DataNotFoundError
from tests.conftest import DATA_DIR, needs

FASHION = DATA_DIR / "fashion_mnist" / "fashion_mnist.npz"
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@pytest.fixture(scope="module")
def fashion():
    if not FASHION.exists():
        pytest.skip(f"real data file {FASHION} not present (set FEDMED_DATA_DIR)")
    with np.load(FASHION) as npz:
        arrays = {k: npz[k] for k in npz.files}
    return NpzSource("fashion_mnist", str(FASHION.parent), FASHION.name, CLASSES), arrays


def test_config_composes_and_instantiates(monkeypatch):
    monkeypatch.setenv("FEDMED_DATA_DIR", str(DATA_DIR))
    cfg = compose("fit", ["data=fashion_mnist"])
    assert cfg.data.name == "fashion_mnist" and cfg.data.num_classes == 10 and cfg.data.in_channels == 1
    src = instantiate(cfg.data.source)
    assert isinstance(src, NpzSource)  # (DataSource's isinstance reads the file on Python < 3.12: see below)
    assert src.class_names == CLASSES and src.num_classes == 10 and src.spatial_dims == 2
    assert src.path == FASHION.resolve()
    assert cfg.partition.method == "dirichlet"  # no metadata column: label-skew partitions only


@needs(FASHION)
def test_splits_counts_and_labels_match_the_file(fashion):
    src, arrays = fashion
    assert isinstance(src, DataSource)
    n = {s: len(src.labels(s)) for s in ("train", "val", "test")}
    assert n["train"] + n["val"] == 60000 and n["test"] == 10000
    assert n["val"] == 6000  # val_fraction 0.1 of every class
    assert (np.bincount(src.labels("val"), minlength=10) == 600).all()
    ids = {s: src.ids(s) for s in ("train", "val", "test")}
    assert not set(ids["train"]) & set(ids["val"])
    assert sorted(int(i.split("/")[1]) for i in ids["train"] + ids["val"]) == list(range(60000))
    assert ids["test"] == [f"test/{i}" for i in range(10000)]
    for split in ("train", "val", "test"):  # every sample's label and pixels are the file's
        rows = np.array([int(i.split("/")[1]) for i in ids[split]])
        key = "train" if split == "val" else split
        assert (src.labels(split) == arrays[f"y_{key}"][rows]).all()
        assert (src.images(split)[:50] == arrays[f"x_{key}"][rows[:50]]).all()
        assert src.locate(ids[split][7]) == (split, 7)
    assert src.locate("test/10000") is None and src.locate("nonsense") is None
    again = NpzSource("fashion_mnist", str(FASHION.parent), FASHION.name, CLASSES)
    assert again.ids("val") == ids["val"]  # the carve-out is a fixed function of split_seed


@needs(FASHION)
def test_items_become_one_channel_images_in_unit_range(fashion):
    src, arrays = fashion
    pipeline = Pipeline.from_config(compose("fit", ["data=fashion_mnist"]).data, source=src)
    ds = pipeline.dataset("test", [0, 1, 2])
    assert ds.x.shape == (3, 1, 28, 28) and float(ds.x.min()) >= 0.0 and float(ds.x.max()) <= 1.0
    assert np.allclose(ds.x[:, 0].numpy() * 255, arrays["x_test"][:3], atol=1e-3)
    assert ds.y.tolist() == arrays["y_test"][:3].tolist()


def test_missing_file_is_refused_with_a_clear_error(tmp_path):
    src = NpzSource("fashion_mnist", str(tmp_path), "fashion_mnist.npz", CLASSES)
    with pytest.raises(DataNotFoundError, match=r"fashion_mnist.npz does not exist.*FEDMED_DATA_DIR"):
        src.labels("train")
    with pytest.raises(DataNotFoundError, match="does not exist"):
        src.ensure_available()
