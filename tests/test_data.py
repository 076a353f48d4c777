"""MedMNIST source, manifests and site data: real file, and the error paths with files the tests write."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fedmed.data import MedMNISTSource, Pipeline, Preprocessing, read_manifest, write_manifest
from fedmed.data.sites import build_manifests, ensure_manifests
from fedmed.errors import DataNotFoundError, FedmedError, ManifestError


def test_real_pneumoniamnist_splits(pneumonia):
    assert pneumonia.ensure_available() == pneumonia.path
    assert [len(pneumonia.labels(s)) for s in ("train", "val", "test")] == [4708, 524, 624]
    assert pneumonia.images("train").shape == (4708, 28, 28) and pneumonia.num_classes == 2
    assert pneumonia.class_names == ["normal", "pneumonia"]


def test_site_trains_only_on_its_manifest(pneumonia, tmp_path):
    sites = ["a", "b", "c"]
    paths = ensure_manifests(pneumonia, sites, [tmp_path / f"{s}.json" for s in sites], "dirichlet", 0.5, 42)
    manifests = [read_manifest(p) for p in paths]
    ids = [set(e["image"] for e in m.training) for m in manifests]
    assert not (ids[0] & ids[1]) and sum(map(len, ids)) == 4708
    data = Pipeline(pneumonia, Preprocessing()).site(manifests[0])
    assert data.train.ids == [e["image"] for e in manifests[0].training]
    i = int(data.train.ids[0].split("/")[1])
    np.testing.assert_allclose(data.train.x[0, 0].numpy(), pneumonia.images("train")[i] / 255.0, rtol=1e-6)
    assert data.train.x.shape[1:] == (1, 28, 28)
    assert 0.0 <= float(data.train.x.min()) <= float(data.train.x.max()) <= 1.0
    # same settings -> the existing files are reused; different settings -> refused, file untouched
    before = paths[0].read_text()
    assert ensure_manifests(pneumonia, sites, paths, "dirichlet", 0.5, 42) == paths
    with pytest.raises(ManifestError, match="a.json"):
        ensure_manifests(pneumonia, sites, paths, "dirichlet", 0.1, 42)
    assert paths[0].read_text() == before


def test_manifests_are_deterministic(pneumonia):
    a = build_manifests(pneumonia, ["x", "y"], "dirichlet", 0.3, seed=1)
    b = build_manifests(pneumonia, ["x", "y"], "dirichlet", 0.3, seed=1)
    assert [m.to_json() for m in a] == [m.to_json() for m in b]
    assert a[0].source["md5"] == "28209eda62fecd6e6a2d98b1501bb15f"


@pytest.fixture
def one_manifest(pneumonia, tmp_path):
    m = build_manifests(pneumonia, ["solo"], "iid", None, seed=0, min_samples=1)[0]
    m.training = m.training[:20]
    m.validation = m.validation[:5]
    return m


def test_manifest_naming_missing_sample(pneumonia, one_manifest):
    one_manifest.training.append({"image": "train/99999", "label": 0})
    with pytest.raises(ManifestError, match="train/99999"):
        Pipeline(pneumonia, Preprocessing()).site(one_manifest)


def test_manifest_with_wrong_label(pneumonia, one_manifest):
    item = one_manifest.training[3]
    item["label"] = 1 - item["label"]
    with pytest.raises(ManifestError, match=item["image"]):
        Pipeline(pneumonia, Preprocessing()).site(one_manifest)


def test_manifest_putting_test_data_in_training(pneumonia, one_manifest):
    one_manifest.training.append({"image": "test/0", "label": int(pneumonia.labels("test")[0])})
    with pytest.raises(ManifestError, match="test sample"):
        Pipeline(pneumonia, Preprocessing()).site(one_manifest)


def test_manifest_out_of_range_label_and_bad_json(one_manifest, tmp_path):
    path = write_manifest(one_manifest, tmp_path / "m.json")
    raw = json.loads(path.read_text())
    raw["training"][0]["label"] = 7
    path.write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=r"m.json.*label 7"):
        read_manifest(path)
    path.write_text("{not json")
    with pytest.raises(ManifestError, match="m.json"):
        read_manifest(path)
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(tmp_path / "nope.json")


def test_corrupt_file_is_named(pneumonia, tmp_path):
    bad = tmp_path / "pneumoniamnist.npz"
    bad.write_bytes(pneumonia.path.read_bytes()[:10_000])  # truncated copy
    with pytest.raises(FedmedError, match=r"pneumoniamnist.npz is corrupt.*md5"):
        MedMNISTSource("pneumoniamnist", str(tmp_path)).ensure_available()


def test_missing_file_says_where_to_put_it(tmp_path):
    src = MedMNISTSource("breastmnist", str(tmp_path / "empty"), download=False)
    with pytest.raises(DataNotFoundError, match=r"breastmnist.npz.*empty"):
        src.ensure_available()


def test_unknown_dataset_and_size():
    with pytest.raises(FedmedError, match="pneumonia_mnist"):
        MedMNISTSource("pneumonia_mnist", "/tmp")
    with pytest.raises(FedmedError, match="data.source.size=32"):
        MedMNISTSource("pneumoniamnist", "/tmp", size=32)


def test_manifest_for_other_file_is_refused(pneumonia, one_manifest, tmp_path):
    one_manifest.source["md5"] = "0" * 32
    with pytest.raises(ManifestError, match="different data"):
        Pipeline(pneumonia, Preprocessing()).site(one_manifest)
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_absent_file_runs_medmnist_download_or_says_where_to_put_it(tmp_path):
    src = MedMNISTSource("breastmnist", str(tmp_path / "dl"))
    try:
        path = src.ensure_available()
    except DataNotFoundError as exc:  # no network (these machines): the advice names URL, md5 and place
        msg = str(exc)
        assert "breastmnist.npz" in msg and src.info["url"] in msg and src.expected_md5 in msg and str(src.path) in msg
    else:  # a machine with network: the ordinary download happened and was md5-checked
        assert path.exists()


# -- splits that share files, classes a split lacks (image folders the tests write) -------------------------
def _image_folder(root, classes=("benign", "malignant"), test_classes=None, n=6):
    from PIL import Image

    rng = np.random.default_rng(1)
    for split, names in (("train", classes), ("test", classes if test_classes is None else test_classes)):
        for name in names:
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(d / f"{split}_{name}_{i}.png")
    return root


def test_data_check_cli_names_files_in_two_splits_and_classes_without_val_images(tmp_path):
    import subprocess
    import sys

    root = _image_folder(tmp_path / "ds")
    cmd = [sys.executable, "-m", "fedmed.cli", "data", "check", "data=image_folder", f"data.source.root={root}",
           "data.transforms.size=16", f"paths.manifests={tmp_path / 'm'}", "data.source.val_fraction=0.0",
           "data.source.splits={train: train, val: null, test: train}"]  # the test split is the train folder
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in out, out
    lines = [" ".join(line.split()) for line in out.splitlines()]
    shared = [line for line in lines if "problem 12 file(s) are in both train and test" in line]
    assert len(shared) == 1 and "train_benign_0.png" in shared[0] and "and 9 more" in shared[0], out
    assert "1 problem(s)" in out, out
    for name in ("benign", "malignant"):  # no val folder and no share of train: a note, not a problem
        assert f"note val has no images of class '{name}': selection on validation cannot see it" in lines, out


def test_data_check_names_classes_without_train_or_test_images_and_copies_across_splits(tmp_path):
    from fedmed.data import ImageFolderSource
    from fedmed.data.check import check_dataset

    root = _image_folder(tmp_path, test_classes=("benign",))  # no malignant test images

    def source():
        return ImageFolderSource("tiny", str(root), splits={"train": "train", "test": "test"},
                                 class_names=["benign", "malignant", "cyst"], val_fraction=0.25)

    original = source().items("train")[-1]["path"]  # a malignant image that stays in train
    copy = root / "test" / "benign" / "copy_of_train.png"
    copy.write_bytes(Path(original).read_bytes())
    report = check_dataset(Pipeline(source(), Preprocessing.from_config({"size": 16})))
    assert sorted(report.problems) == sorted([
        "train has no images of class 'cyst': the model cannot learn it",
        "test has no images of class 'malignant': its test metrics (AUROC, recall) cannot be measured",
        "test has no images of class 'cyst': its test metrics (AUROC, recall) cannot be measured",
        f"1 test file(s) have the same content as a train file: {copy} = {original}; "
        "remove one file of each pair so that test does not repeat train",
    ]), report.problems
    assert report.notes == ["val has no images of class 'cyst': selection on validation cannot see it"]
    assert not report.ok and report.counts["test"] == {"benign": 7}


def test_two_runs_writing_one_manifest_path_with_other_partitions_do_not_both_go_on(pneumonia, tmp_path):
    """Two `fedmed fit` started at once under one partition name with other settings (seed=19 and
    seed=19 partition.min_samples=1500): the second to write is refused; no run trains on a partition
    that no manifest on disk records."""
    from concurrent.futures import ThreadPoolExecutor

    from fedmed.data.manifest import read_manifest, write_manifest

    path = tmp_path / "pneumoniamnist" / "dirichlet-a0.5-k3-seed19" / "hospital_a.json"
    first, second = (build_manifests(pneumonia, ["hospital_a", "hospital_b", "hospital_c"], "dirichlet", 0.5, seed=19,
                                     min_samples=n)[0] for n in (10, 1500))
    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(lambda m: _try(write_manifest, m, path), [first, second]))
    on_disk = read_manifest(path)
    refused = [o for o in outcomes if isinstance(o, ManifestError)]
    assert len(refused) == 1 and str(path) in str(refused[0]) and "another run" in str(refused[0])
    winner = first if outcomes[0] is not refused[0] else second
    assert on_disk.to_json() == winner.to_json()
    assert write_manifest(winner, path) == path  # the same partition again (a site process of one run): fine
    assert not list(path.parent.glob(".*.tmp"))


def _try(fn, *args):
    try:
        return fn(*args)
    except ManifestError as exc:
        return exc
