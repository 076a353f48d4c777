"""Image folders, CSV/JSON tables and NIfTI volumes: real files in ../shared/data, and files the tests write
(corrupt, truncated, empty, wrong label, wrong shape) for the error paths."""

from __future__ import annotations

import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from fedmed.data import DataError, DataSource, ImageFolderSource, Pipeline, Preprocessing, TableSource, make_loader
from fedmed.data.check import check_dataset
from fedmed.data.sites import build_manifests
from fedmed.errors import DataNotFoundError, FedmedError
from tests.conftest import DATA_DIR, PNEUMONIA, needs

BRAIN = DATA_DIR / "brain_tumor_mri"
HAM = DATA_DIR / "skin_lesion"
NIFTI = DATA_DIR / "nifti" / "MNI152_T1_2mm_brain.nii.gz"
VESSEL = DATA_DIR / "medmnist" / "vesselmnist3d.npz"


def pre(**kw) -> Preprocessing:
    return Preprocessing.from_config(kw)


# -- real data --------------------------------------------------------------------------------
@needs(BRAIN)
def test_brain_mri_folder_grey_and_rgb_jpegs_become_one_channel():
    src = ImageFolderSource("brain_mri", str(BRAIN), splits={"train": "Training", "test": "Testing"})
    assert src.class_names == ["glioma", "meningioma", "notumor", "pituitary"]
    n = {s: len(src.labels(s)) for s in ("train", "val", "test")}
    assert n["test"] == 1311 and n["train"] + n["val"] == 5708 and 0.09 < n["val"] / 5708 < 0.11
    assert not set(src.ids("val")) & set(src.ids("train"))
    assert all(i.startswith("Testing/") for i in src.ids("test"))
    # one greyscale and one RGB JPEG of different sizes
    modes = {}
    for row, path in enumerate(src.table[src.table.split == "train"].path):
        modes.setdefault(Image.open(path).mode, row)
        if len(modes) == 2:
            break
    assert set(modes) == {"L", "RGB"}
    ds = Pipeline(src, pre(size=64, intensity="minmax")).dataset("train", sorted(modes.values()))
    assert ds.x.shape == (2, 1, 64, 64) and float(ds.x.min()) == 0.0 and float(ds.x.max()) == 1.0
    assert ds.y.tolist() == [int(src.labels("train")[r]) for r in sorted(modes.values())]


@needs(HAM)
def test_ham10000_split_by_lesion_and_natural_partition_by_source():
    src = TableSource("ham10000", str(HAM), "labels.csv", group_column="lesion_id",
                      class_names=["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"])
    t = src.table
    assert len(t) == 10015 and not src.problems
    assert t.groupby("lesion_id").split.nunique().max() == 1  # no lesion in two splits
    share = t.split.value_counts(normalize=True)
    assert 0.13 < share["test"] < 0.17 and 0.13 < share["val"] < 0.17
    for c in range(7):  # every class in every split
        assert all((t[t.split == s].label == c).any() for s in ("train", "val", "test"))
    sites = ["rosendahl", "vidir_modern", "vidir_molemax", "vienna_dias"]
    manifests = build_manifests(src, sites, "natural", None, 0, column="source")
    src_of = dict(zip(t.id, t.source, strict=True))
    for m in manifests:
        assert {src_of[e["image"]] for e in m.training + m.validation} == {m.site}
    assert sum(len(m.training) for m in manifests) == len(src.ids("train"))
    counts = np.array([[sum(e["label"] == c for e in m.training) for c in range(7)] for m in manifests])
    assert counts[sites.index("vienna_dias")].sum() < counts[sites.index("vidir_molemax")].sum()
    with pytest.raises(FedmedError, match="hospital_a.*values of the column"):
        build_manifests(src, ["hospital_a"], "natural", None, 0, column="source")
    assert manifests[0].partition["seed"] is None  # nothing is drawn: the same manifests serve every seed
    again = build_manifests(src, sites, "natural", None, 7, column="source")
    assert [m.training for m in again] == [m.training for m in manifests]
    assert again[0].partition == manifests[0].partition
    grouped = build_manifests(src, ["east", "west"], "natural", None, 0, column="source",
                              groups={"east": ["rosendahl", "vienna_dias"], "west": ["vidir_modern", "vidir_molemax"]})
    assert {src_of[e["image"]] for e in grouped[0].training} == {"rosendahl", "vienna_dias"}


@needs(NIFTI)
def test_real_nifti_volume_as_3d_input_and_as_axial_slice(tmp_path):
    (tmp_path / "a.nii.gz").symlink_to(NIFTI)
    (tmp_path / "b.nii.gz").symlink_to(NIFTI)
    (tmp_path / "list.csv").write_text("path,label\na.nii.gz,0\nb.nii.gz,1\n")
    src = TableSource("mni", str(tmp_path), "list.csv", split_column=None, val_fraction=0.0, test_fraction=0.0,
                      spatial_dims=3)
    vol = Pipeline(src, pre(orientation="RAS", size=32, intensity="percentile"), spatial_dims=3).dataset("train")
    assert vol.x.shape == (2, 1, 32, 32, 32) and float(vol.x.min()) >= 0.0 and float(vol.x.max()) <= 1.0
    sl = Pipeline(src, pre(orientation="RAS", slice_axis=2, size=48, intensity="minmax"),
                  spatial_dims=2).dataset("train")
    assert sl.x.shape == (2, 1, 48, 48)
    raw = nib.load(str(NIFTI)).get_fdata()
    assert raw.shape == (91, 109, 91) and (sl.x[0] > 0.05).float().mean() > 0.2  # brain tissue in the middle slice
    with pytest.raises(FedmedError, match="slice_axis"):
        Pipeline(src, pre(), spatial_dims=2)


@needs(VESSEL)
def test_vesselmnist3d_volumes_train_a_3d_model():
    from fedmed.data import MedMNISTSource
    from fedmed.models import CompactCNN

    src = MedMNISTSource("vesselmnist3d", str(VESSEL.parent))
    assert src.spatial_dims == 3
    ds = Pipeline(src, pre(), spatial_dims=3).dataset("train", np.arange(8))
    assert ds.x.shape == (8, 1, 28, 28, 28) and float(ds.x.max()) <= 1.0
    net = CompactCNN(in_channels=1, num_classes=2, spatial_dims=3)
    assert net(ds.x).shape == (8, 2)


# -- files the tests write ----------------------------------------------------------------------
def _folder(root, bad: bool = False):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in ["benign", "malignant"]:
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(6):
                img = rng.integers(0, 255, (20 + i, 24, 3) if i % 2 else (24, 20 + i), dtype=np.uint8)
                Image.fromarray(img).save(d / f"{name}_{i}.png")
    if bad:
        d = root / "train" / "benign"
        good = (d / "benign_0.png").read_bytes()
        (d / "truncated.png").write_bytes(good[: len(good) // 2])
        (d / "empty.png").write_bytes(b"")
        (d / "corrupt.jpg").write_bytes(b"this is not a jpeg" * 10)
    return root


def test_every_source_kind_is_a_data_source(tmp_path):
    from fedmed.data import MedMNISTSource

    _folder(tmp_path / "img")
    rows = [f"img/train/{c}/{c}_{i}.png,{c}" for c in ("benign", "malignant") for i in range(6)]
    (tmp_path / "list.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    files = [ImageFolderSource("tiny", str(tmp_path / "img"), splits={"train": "train", "test": "test"}),
             TableSource("t", str(tmp_path), "list.csv")]
    npz = MedMNISTSource("pneumoniamnist", str(PNEUMONIA.parent))  # the file is read only when asked for data
    for src in [*files, npz]:
        assert isinstance(src, DataSource), type(src).__name__
    assert not isinstance(object(), DataSource)
    for src in files + ([npz] if PNEUMONIA.exists() else []):
        src.ensure_available()
        ids = src.ids("train")
        assert len(ids) == len(src.labels("train")) and src.locate(ids[1]) == ("train", 1)
        item = src.items("train", [1])[0]
        assert item["id"] == ids[1] and item["label"] == int(src.labels("train")[1])
        assert set(src.identity) == {"file", "md5"} and len(src.class_names) == src.num_classes
        assert src.spatial_dims == 2 and (src.loader() is None) == (src is npz)


def test_image_folder_carves_val_from_train_and_resizes(tmp_path):
    src = ImageFolderSource("tiny", str(_folder(tmp_path)), splits={"train": "train", "test": "test"},
                            val_fraction=0.25)
    assert src.class_names == ["benign", "malignant"]
    assert len(src.labels("val")) + len(src.labels("train")) == 12 and len(src.labels("test")) == 12
    assert np.bincount(src.labels("val")).tolist() == [1, 1]  # stratified: each class gives its share
    ds = Pipeline(src, pre(size=16)).dataset("test")
    assert ds.x.shape == (12, 1, 16, 16)
    with pytest.raises(FedmedError, match="different shapes.*data.transforms.size"):
        Pipeline(src, pre()).dataset("test")


def test_corrupt_truncated_and_empty_images_are_all_reported_by_name(tmp_path):
    src = ImageFolderSource("tiny", str(_folder(tmp_path, bad=True)), splits={"train": "train", "test": "test"},
                            val_fraction=0.0)
    report = check_dataset(Pipeline(src, pre(size=16)))
    text = "\n".join(report.problems)
    assert len(report.problems) == 3, text
    for name in ("truncated.png", "empty.png", "corrupt.jpg"):
        assert name in text
    assert report.checked == 27
    with pytest.raises(DataError, match=r"(truncated|empty|corrupt)"):
        Pipeline(src, pre(size=16)).dataset("train")


def test_table_with_wrong_labels_and_missing_files(tmp_path):
    _folder(tmp_path / "img")
    rows = ["path,label,patient"]
    rows += [f"img/train/benign/benign_{i}.png,benign,p{i}" for i in range(6)]
    rows += [f"img/train/malignant/malignant_{i}.png,malignant,p{i}" for i in range(6)]
    rows += ["img/train/benign/benign_0.png,begnin,p9", "img/nowhere.png,benign,p10"]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    src = TableSource("t", str(tmp_path), "list.csv", class_names=["benign", "malignant"], group_column="patient")
    text = "\n".join(src.problems)
    assert "list.csv row 14: label 'begnin'" in text and "nowhere.png: file does not exist" in text
    with pytest.raises(DataNotFoundError, match="2 problem"):
        src.ensure_available()
    # same patient never in two splits
    t = src.table
    assert t.groupby("patient").split.nunique().max() == 1


def test_monai_datalist_json_is_a_table(tmp_path):
    _folder(tmp_path / "img")
    import json

    item = lambda c, i: {"image": f"img/train/{c}/{c}_{i}.png", "label": c}  # noqa: E731
    (tmp_path / "datalist.json").write_text(json.dumps({
        "training": [item(c, i) for c in ("benign", "malignant") for i in range(4)],
        "validation": [item("benign", 4), item("malignant", 4)],
        "test": [item("benign", 5), item("malignant", 5)]}))
    src = TableSource("dl", str(tmp_path), "datalist.json", path_column="image")
    assert [len(src.labels(s)) for s in ("train", "val", "test")] == [8, 2, 2] and not src.problems


def test_nifti_with_unexpected_shape_is_named(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 2), np.float32), np.eye(4)), tmp_path / "four_d.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), tmp_path / "ok.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), tmp_path / "ok2.nii.gz")
    (tmp_path / "v.csv").write_text("path,label,split\nok.nii.gz,0,train\nfour_d.nii.gz,1,train\nok2.nii.gz,1,test\n")
    src = TableSource("v", str(tmp_path), "v.csv", split_column="split", spatial_dims=3)
    report = check_dataset(Pipeline(src, pre(intensity="minmax"), spatial_dims=3), splits=["train"])
    assert len(report.problems) == 1 and "four_d.nii.gz" in report.problems[0] and "3D" in report.problems[0]


# -- preprocessing ----------------------------------------------------------------------------
def test_preprocessing_config_typos_name_the_key():
    with pytest.raises(FedmedError, match=r"data.transforms.denoize.*denoise"):
        Preprocessing.from_config({"denoize": "gaussian"})
    with pytest.raises(FedmedError, match=r"augment.flip.*flip_prob"):
        Preprocessing.from_config({"augment": {"flip": 0.5}})
    with pytest.raises(FedmedError, match="contrast='clahe'"):
        Preprocessing.from_config({"contrast": "clahe"})


def test_each_deterministic_step_does_what_it_says():
    from fedmed.data.transforms import deterministic_transforms

    rng = np.random.default_rng(0)
    base = np.clip(rng.normal(128, 40, (1, 32, 32)), 0, 255).astype(np.float32)

    def run(**kw):
        return deterministic_transforms(pre(**kw), 2)({"image": base.copy()})["image"]

    plain = run()
    assert torch.allclose(plain, torch.from_numpy(base / 255.0), atol=1e-6)
    assert run(denoise="gaussian", denoise_sigma=1.0).std() < 0.6 * plain.std()
    assert run(denoise="median").std() < plain.std()
    eq = run(contrast="histeq")
    assert eq.std() > plain.std()  # equalisation spreads the histogram
    assert run(contrast="gamma", gamma=0.5).mean() > plain.mean()  # gamma < 1 brightens
    z = run(zscore=True)
    assert abs(float(z.mean())) < 1e-5 and abs(float(z.std()) - 1) < 0.02
    assert run(size=16).shape == (1, 16, 16)
    rgb = deterministic_transforms(pre(channels=3), 2)({"image": base.copy()})["image"]
    assert rgb.shape == (3, 32, 32) and torch.equal(rgb[0], rgb[2])


def test_augmentation_is_seeded_and_for_training_only(tmp_path):
    src = ImageFolderSource("tiny", str(_folder(tmp_path)), splits={"train": "train", "test": "test"},
                            val_fraction=0.25)
    p = Pipeline(src, pre(size=16, augment={"flip_prob": 0.5, "rotate_degrees": 20, "zoom": 0.1, "affine_prob": 1.0,
                                            "brightness": 0.2, "brightness_prob": 1.0}))
    train, test = p.dataset("train", train=True), p.dataset("test", train=True)  # same call for both kinds
    assert type(train).__name__ == "AugmentedDataset" and type(p.dataset("val")).__name__ == "ArrayDataset"

    def epoch(seed):  # through the loader: per-image steps, then the batched rotation/zoom
        return torch.cat([x for x, _ in make_loader(train, 4, shuffle=False, seed=seed)])

    a, b, c = epoch(1), epoch(1), epoch(2)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, train.x)
    assert test.x.shape == (12, 1, 16, 16)


def test_batched_rotation_and_zoom():
    from fedmed.data.transforms import BatchRandAffine

    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    disk = (((yy - 15.5) ** 2 + (xx - 15.5) ** 2) < 8**2).float()[None]  # a centred disk: rotation-invariant
    batch = disk.repeat(16, 1, 1, 1)
    off = BatchRandAffine(prob=1.0, rotate_degrees=0.0, zoom=0.0, spatial_dims=2)(batch)
    torch.testing.assert_close(off, batch, atol=1e-5, rtol=0)  # the identity resamples exactly
    rot = BatchRandAffine(prob=1.0, rotate_degrees=45.0, zoom=0.0, spatial_dims=2)(batch)
    assert (rot - batch).abs().mean() < 0.02  # a disk turned is the same disk
    aug = BatchRandAffine(prob=1.0, rotate_degrees=0.0, zoom=0.3, spatial_dims=2)
    aug.set_random_state(3)
    zoomed = aug(batch)
    areas = zoomed.sum((1, 2, 3)) / disk.sum()
    assert areas.std() > 0.05 and areas.min() > 0.4 and areas.max() < 2.1  # each image its own zoom
    aug.set_random_state(3)
    assert torch.equal(aug(batch), zoomed)  # seeded
    half = BatchRandAffine(prob=0.5, rotate_degrees=0.0, zoom=0.3, spatial_dims=2)(batch)
    untouched = (half == batch).flatten(1).all(1)
    assert 0 < untouched.sum() < 16  # prob picks images, the others pass through as they are
    vol = torch.rand(3, 1, 8, 8, 8)
    assert BatchRandAffine(1.0, 10.0, 0.1, spatial_dims=3)(vol).shape == vol.shape


# -- the validator from the command line --------------------------------------------------------
def test_data_check_cli_lists_bad_files_and_fails(tmp_path):
    root = _folder(tmp_path / "ds", bad=True)
    cmd = [sys.executable, "-m", "fedmed.cli", "data", "check", "data=image_folder", f"data.source.root={root}",
           "data.transforms.size=16", f"paths.manifests={tmp_path / 'm'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "truncated.png" in out and "empty.png" in out and "corrupt.jpg" in out and "3 problem(s)" in out
    assert "Traceback" not in out
    (root / "train" / "benign" / "truncated.png").unlink()
    (root / "train" / "benign" / "empty.png").unlink()
    (root / "train" / "benign" / "corrupt.jpg").unlink()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "no problems found" in proc.stdout, proc.stdout + proc.stderr


def test_nifti_volumes_with_nan_or_inf_voxels_are_named_by_the_check(tmp_path):
    part = np.ones((8, 8, 8), np.float32)
    part[2, 3, 4] = np.nan
    inf = np.ones((8, 8, 8), np.float32)
    inf[0, 0, 0] = np.inf
    for name, vol in (("part_nan", part), ("all_nan", np.full((8, 8, 8), np.nan, np.float32)), ("inf", inf),
                      ("ok", np.ones((8, 8, 8), np.float32))):
        nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / f"{name}.nii.gz")
    (tmp_path / "v.csv").write_text("path,label,split\npart_nan.nii.gz,0,train\nall_nan.nii.gz,1,train\n"
                                    "inf.nii.gz,0,train\nok.nii.gz,1,train\n")
    src = TableSource("v", str(tmp_path), "v.csv", split_column="split", spatial_dims=3)
    report = check_dataset(Pipeline(src, pre(intensity="minmax"), spatial_dims=3), splits=["train"])
    assert sorted(p.split(":")[0].rsplit("/", 1)[-1] for p in report.problems) == [
        "all_nan.nii.gz", "inf.nii.gz", "part_nan.nii.gz"], report.problems
    assert "1 of 512 values are NaN or infinite" in next(p for p in report.problems if "part_nan" in p)


def test_a_cmyk_jpeg_is_read_as_the_colours_it_shows_and_a_mislabelled_file_is_named(tmp_path):
    root = _folder(tmp_path / "img")
    rgb = np.zeros((24, 24, 3), np.uint8)
    rgb[..., 0], rgb[:12, :, 2] = 200, 120  # red, with a blue-ish top half
    cmyk = root / "train" / "benign" / "cmyk.jpg"
    Image.fromarray(rgb).convert("CMYK").save(cmyk, quality=100)
    with Image.open(cmyk) as im:
        assert im.mode == "CMYK"
        want = np.asarray(im.convert("RGB"), dtype=np.float32)  # PIL's own conversion, independently
    (root / "train" / "malignant" / "looks_like.gif").write_bytes((root / "train" / "malignant" /
                                                                  "malignant_0.png").read_bytes())
    src = ImageFolderSource("tiny", str(root), splits={"train": "train", "test": "test"}, val_fraction=0.0)
    from fedmed.data.file_source import LoadFiled

    got = LoadFiled(keys=["image"])({"image": str(cmyk)})["image"]
    assert tuple(got.shape) == (3, 24, 24)  # not 4 channels with black dropped
    assert np.allclose(np.asarray(got).transpose(1, 2, 0), want, atol=1)
    report = check_dataset(Pipeline(src, pre(size=16)))
    assert any("looks_like.gif" in p and "not read" in p for p in report.problems), report.problems


@needs(PNEUMONIA)
def test_a_tampered_medmnist_file_is_named_once_by_the_check(tmp_path):
    (tmp_path / "medmnist").mkdir()
    tampered = tmp_path / "medmnist" / "pneumoniamnist.npz"
    tampered.write_bytes(PNEUMONIA.read_bytes() + b"x")
    env = {**os.environ, "FEDMED_DATA_DIR": str(tmp_path), "FEDMED_OUTPUT_DIR": str(tmp_path / "out")}
    proc = subprocess.run([sys.executable, "-m", "fedmed.cli", "data", "check"], capture_output=True, text=True,
                          timeout=300, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and out.count("is corrupt or not the official file") == 1, out[-2000:]
    assert "1 problem(s)" in out
