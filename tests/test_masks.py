"""Evidence masks as data: they follow the images' geometry, score the sites' explanations during a
federation, and never reach training or selection."""

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from fedmed.build import load_model_checkpoint
from fedmed.config import compose
from fedmed.data.datamodule import Pipeline, Preprocessing
from fedmed.data.table_source import TableSource
from fedmed.errors import FedmedError
from fedmed.tasks import fit
from fedmed.tracking import Tracker
from tests.conftest import DATA_DIR, needs

HAM = DATA_DIR / "skin_lesion" / "labels.csv"


def _squares(root, n=6, w=60, h=45):
    """RGB images with one dark rectangle each, its mask beside it (as HAM10000's: <stem>.png, 0/255)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    rows = ["path,label"]
    for i in range(n):
        img = np.full((h, w, 3), 220, np.uint8)
        mask = np.zeros((h, w), np.uint8)
        r, c = rng.integers(0, h - 20), rng.integers(0, w - 24)
        img[r:r + 18, c:c + 21] = 30
        mask[r:r + 18, c:c + 21] = 255
        Image.fromarray(img).save(root / "images" / f"im{i}.jpg", quality=98)
        Image.fromarray(mask).save(root / "masks" / f"im{i}.png")
        rows.append(f"images/im{i}.jpg,{i % 2}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")


def test_masks_go_through_the_images_resize_and_no_intensity_step(tmp_path):
    _squares(tmp_path)
    src = TableSource("squares", str(tmp_path), "labels.csv", split_column=None, val_fraction=0.0,
                      test_fraction=0.0, mask_root="masks")
    pipe = Pipeline(src, Preprocessing(channels=3, size=16, intensity="uint8"))
    x, masks = pipe.dataset("train").x, pipe.masks("train")
    assert masks.dtype == torch.bool and masks.shape == (6, 1, 16, 16)
    dark = x.mean(1, keepdim=True) < (30 + 220) / 2 / 255  # the square, thresholded half-way as the mask is
    iou = (dark & masks).sum((1, 2, 3)).float() / (dark | masks).sum((1, 2, 3)).float()
    assert iou.min() > 0.95, iou  # the same pixels: the mask went through the image's resize
    other = Pipeline(src, Preprocessing(channels=1, size=16, intensity="minmax", zscore=True, contrast="histeq"))
    assert torch.equal(other.masks("train"), masks)  # no intensity or channel step touches a mask
    assert TableSource("s", str(tmp_path), "labels.csv").mask_items("train") is None  # no mask_root: no masks
    (tmp_path / "masks" / "im3.png").unlink()
    with pytest.raises(FedmedError, match="im3.png"):
        Pipeline(src, Preprocessing(channels=3, size=16)).masks("train")


@needs(HAM)
def test_ham10000_lesions_are_darker_inside_their_masks():
    cfg = compose("fit", ["experiment=ham10000", f"paths.data_dir={DATA_DIR}"])
    pipe = Pipeline.from_config(cfg.data)
    rows = np.arange(0, 1500, 15)
    x, m = pipe.dataset("test", rows).x.mean(1), pipe.masks("test", rows)[:, 0]
    darker = [float(x[i][m[i]].mean()) < float(x[i][~m[i]].mean()) for i in range(len(rows)) if (~m[i]).any()]
    assert np.mean(darker) > 0.85, np.mean(darker)


TWO_SITES = ["experiment=ham10000", "federation.rounds=1", "trainer.limit_train_batches=0.2",
             "data.transforms.size=16", "privacy.audit=none", "explain.every_n_rounds=1", "explain.n=8",
             "logger.log_model=false", "data.source.keep={source: [vienna_dias, rosendahl]}",
             "federation.sites=[vienna_dias,rosendahl]", "partition.dirname=natural-two-sources"]


@needs(HAM)
def test_masks_score_the_sites_explanations_and_never_change_training(isolated, tmp_path):
    with_masks = fit.run(compose("fit", [*isolated, *TWO_SITES]))
    without = fit.run(compose("fit", [*isolated, *TWO_SITES, "data.source.mask_root=null"]))
    cfg = compose("fit", isolated)
    tracker = Tracker(cfg.logger.tracking_uri, cfg.logger.experiment, cfg.logger.artifact_location)
    a = load_model_checkpoint(f"runs:/{with_masks['run_id']}", tracker, tmp_path / "a")["state_dict"]
    b = load_model_checkpoint(f"runs:/{without['run_id']}", tracker, tmp_path / "b")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical: masks never reach training or selection
    client = MlflowClient(cfg.logger.tracking_uri)
    metrics = client.get_run(with_masks["run_id"]).data.metrics
    assert 0 <= metrics["val_xai_pointing_game"] <= 1 and 0 <= metrics["val_xai_centre_relevance_mass"] <= 1
    assert "val_xai_pointing_game" not in client.get_run(without["run_id"]).data.metrics
    site = client.search_runs([client.get_run(with_masks["run_id"]).info.experiment_id],
                              f"tags.mlflow.parentRunId = '{with_masks['run_id']}' and tags.site = 'vienna_dias'")
    assert "val_xai_relevance_mass" in site[0].data.metrics  # logged in the site's own run too


def _untrained_ham_model(folder: Path, seed: int) -> Path:
    """A HAM10000 checkpoint (16 px, untrained): which images and masks are scored does not depend on weights."""
    from omegaconf import OmegaConf

    from fedmed.build import build_module

    cfg = compose("fit", ["experiment=ham10000", f"paths.data_dir={DATA_DIR}", "data.transforms.size=16"])
    torch.manual_seed(seed)
    path = folder / "model.pt"
    torch.save({"state_dict": build_module(cfg).net.state_dict(), "config": OmegaConf.to_container(cfg, resolve=True),
                "class_names": list(cfg.data.source.class_names)}, path)
    return path


@needs(HAM)
def test_explain_scores_every_method_against_the_masks_beside_the_baselines(isolated, tmp_path):
    from fedmed.tasks import explain

    path = _untrained_ham_model(tmp_path, seed=0)
    res = explain.run(compose("explain", [*isolated, "data=ham10000", f"checkpoint={path}", "n=8", "per_class=0",
                                          "faithfulness=false", f"output_dir={tmp_path / 'xai'}"]))["methods"]
    assert set(res) == {"gradcam", "baseline: random", "baseline: centre"}
    for row in res.values():
        assert all(0 <= row[k] <= 1 for k in ("pointing_game", "relevance_mass", "relevance_rank", "top_iou"))
    assert res["baseline: centre"]["relevance_rank"] > res["baseline: random"]["relevance_rank"]  # centred lesions


CHROMIUM = shutil.which("chromium") or shutil.which("google-chrome")


@needs(HAM)
def test_a_site_report_groups_its_cases_and_says_what_the_numbers_mean(isolated, tmp_path):
    from fedmed.tasks import explain

    path = _untrained_ham_model(tmp_path, seed=1)
    res = explain.run(compose("explain", [*isolated, "data=ham10000", f"checkpoint={path}", "site=vienna_dias",
                                          "n=12", "per_class=0", "report=true", f"output_dir={tmp_path / 'xai'}"]))
    page = (Path(res["output_dir"]) / "report.html").read_text()
    assert "Site: <b>vienna_dias</b>. 12 cases" in page and "baseline: centre" in page
    assert "the maps do not point at the lesions" in page or "the maps point at the lesions" in page
    cases = re.findall(r"<p><b>(ISIC_\d+)</b></p><p>model says: <b>(\w+)</b> \(probability [0-9.]+\)</p>"
                       r"<p>true class: (\w+)</p>", page)
    assert len({name for name, _, _ in cases}) == 12  # every explained image is shown
    for name, pred, true in set(cases):  # a right case once, under "correct"; a wrong one as missed and false alarm
        assert sum(c[0] == name for c in cases) == (1 if pred == true else 2)
        assert (f"<h2>{true}: correct" in page) if pred == true else \
            (f"<h2>{true}: missed" in page and f"<h2>{pred}: false alarm" in page)
    if CHROMIUM:  # what a reader sees: the page renders with its images
        shot = tmp_path / "report.png"
        subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                        "--window-size=1200,1600", (Path(res["output_dir"]) / "report.html").as_uri()],
                       capture_output=True, timeout=120)
        assert shot.exists() and shot.stat().st_size > 50_000
