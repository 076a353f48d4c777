"""`fedmed evaluate` on real models and data: the numbers, the MLflow record, sites that never trained,
and refusals that come before any image is read."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from omegaconf import OmegaConf
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from fedmed.build import build_module, checkpoint_net, load_model_checkpoint
from fedmed.cli import main
from fedmed.config import compose
from fedmed.data.datamodule import Pipeline
from fedmed.evaluation.predict import class_probabilities
from fedmed.tasks import evaluate, fit
from fedmed.tracking import Tracker
from tests.conftest import DATA_DIR, PNEUMONIA, needs

HAM = DATA_DIR / "skin_lesion" / "labels.csv"


@pytest.fixture
def fitted(isolated):
    res = fit.run(compose("fit", [*isolated, "experiment=smoke", "logger.log_model=false", "privacy.audit=none"]))
    return res["run_id"], isolated


@needs(PNEUMONIA)
def test_evaluate_scores_the_test_split_like_scikit_learn_and_logs_a_linked_run(tmp_path, fitted):
    run_id, isolated = fitted
    t0 = time.perf_counter()
    res = evaluate.run(compose("evaluate", [*isolated, f"checkpoint=runs:/{run_id}", "n_boot=500"]))
    seconds = time.perf_counter() - t0
    cfg = compose("evaluate", [*isolated, "checkpoint=x"])
    ckpt = load_model_checkpoint(f"runs:/{run_id}", Tracker(cfg.logger.tracking_uri, cfg.logger.experiment,
                                                           cfg.logger.artifact_location), tmp_path / "dl")
    net = checkpoint_net(ckpt, "x").eval()
    test = Pipeline.from_config(ckpt["config"].data).dataset("test")
    probs, labels = class_probabilities(net, test)  # the same predictions, scored by scikit-learn
    assert (labels == test.y.numpy()).all()
    got = res["scores"]["pneumoniamnist test"]
    assert got["balanced_acc"]["value"] == pytest.approx(balanced_accuracy_score(test.y, probs.argmax(1)), abs=1e-9)
    assert got["auroc_pneumonia"]["value"] == pytest.approx(roc_auc_score(labels, probs[:, 1]), abs=1e-12)
    one_vs_rest = [roc_auc_score(labels == c, probs[:, c]) for c in (0, 1)]  # float32 p0 is not exactly 1 - p1
    assert got["auroc"]["value"] == pytest.approx(np.mean(one_vs_rest), abs=1e-12)
    assert got["auroc"]["low"] < got["auroc"]["value"] < got["auroc"]["high"]
    assert {"recall_normal", "recall_pneumonia", "precision_pneumonia"} <= set(got)  # class names, never class0
    client = MlflowClient(cfg.logger.tracking_uri)
    run = client.get_run(res["run_id"])
    assert run.data.tags["mlflow.parentRunId"] == run_id and run.info.status == "FINISHED"
    assert run.data.metrics["pneumoniamnist_test/balanced_acc"] == pytest.approx(got["balanced_acc"]["value"])
    assert "pneumoniamnist_test/auroc_low" in run.data.metrics
    files = {a.path for a in client.list_artifacts(res["run_id"])}
    assert {"model_card.md", "evaluation.json", "reliability_pneumoniamnist_test.png",
            "confusion_matrix_pneumoniamnist_test.png"} <= files
    card = Path(client.download_artifacts(res["run_id"], "model_card.md", str(tmp_path))).read_text()
    assert "Not for clinical use" in card and "| hospital_a |" in card  # training counts from the model's run
    assert f"{got['balanced_acc']['value']:.3f} [{got['balanced_acc']['low']:.3f}" in card
    assert seconds < 60, seconds  # a generous bound; benchmarks/ holds the timings


@pytest.fixture(scope="module")
def ham_model(tmp_path_factory):
    """An untrained HAM10000 network trained (by its config) at three sources: which images each site
    scores does not depend on the weights."""
    if not HAM.exists():
        pytest.skip(f"{HAM} not present")
    folder = tmp_path_factory.mktemp("ham")
    cfg = compose("fit", ["experiment=ham10000", f"paths.data_dir={DATA_DIR}", "data.transforms.size=16",
                          "federation.sites=[rosendahl,vidir_modern,vidir_molemax]",
                          "data.source.keep={source: [rosendahl, vidir_modern, vidir_molemax]}"])
    torch.manual_seed(0)
    path = folder / "model.pt"
    torch.save({"state_dict": build_module(cfg).net.state_dict(), "config": OmegaConf.to_container(cfg, resolve=True),
                "class_names": list(cfg.data.source.class_names)}, path)
    return path


def _ham(isolated, *more):
    return compose("evaluate", [*isolated, "data=ham10000", *more])


def _record(isolated, run_id: str, tmp: Path) -> dict:
    client = MlflowClient(compose("evaluate", [*isolated, "checkpoint=x"]).logger.tracking_uri)
    return json.loads(Path(client.download_artifacts(run_id, "evaluation.json", str(tmp))).read_text())


def _ham_test_rows():
    from fedmed.data.table_source import TableSource

    return TableSource("ham10000", str(HAM.parent), "labels.csv", group_column="lesion_id").table


def test_each_site_scores_its_own_images_and_the_pooled_figure_sums_them(ham_model, isolated, tmp_path):
    res = evaluate.run(_ham(isolated, f"checkpoint={ham_model}", "sites=all", "n_boot=100"))
    assert set(res["scores"]) == {"rosendahl", "vidir_modern", "vidir_molemax", "vienna_dias", "pooled"}
    table = _ham_test_rows()
    test = table[table.split == "test"]
    record = _record(isolated, res["run_id"], tmp_path)["scores"]
    for site in ("rosendahl", "vidir_modern", "vidir_molemax", "vienna_dias"):
        assert record[site]["images_per_class"] == np.bincount(test[test.source == site].label, minlength=7).tolist()
    assert record["vienna_dias"]["kind"] == "external" and record["rosendahl"]["kind"] == "internal"
    assert sum(record["pooled"]["images_per_class"]) == len(test)


def test_a_site_that_never_trained_is_scored_on_all_its_images(ham_model, isolated, tmp_path):
    res = evaluate.run(_ham(isolated, f"checkpoint={ham_model}", "site=vienna_dias", "split=all", "n_boot=100"))
    table = _ham_test_rows()
    record = _record(isolated, res["run_id"], tmp_path)["scores"]["vienna_dias"]
    assert record["kind"] == "external"
    assert record["images_per_class"] == np.bincount(table[table.source == "vienna_dias"].label, minlength=7).tolist()


@pytest.mark.parametrize("args, words", [
    (["site=rosendahl", "split=all"], "trained on this site"),
    (["site=hospital_a"], "holds no test image of ham10000"),
    (["site=nowhere"], "nowhere"),
    (["sites=all", "site=rosendahl"], "not both"),
    (["split=all"], "give site=<name>"),
    (["data=pneumoniamnist"], "predicts 7 classes"),
    (["data.transforms.channels=1"], "3-channel"),
    (["n_boot=10"], "n_boot=10"),
])
def test_bad_requests_are_refused_in_one_line_before_any_work(ham_model, isolated, capsys, args, words):
    t0 = time.perf_counter()
    code = main(["evaluate", *isolated, "data=ham10000", f"checkpoint={ham_model}", *args])
    err = capsys.readouterr().err.strip()
    assert code != 0 and words in err and len(err.splitlines()) == 1, err
    assert time.perf_counter() - t0 < 30
