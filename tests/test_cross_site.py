"""At the end of a federation each site scores the selected model on its own test images and sends only
counts; the report is the same whether the sites run in this process or behind Flower SuperNodes."""

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from fedmed.config import compose
from fedmed.tasks import fit
from tests.conftest import DATA_DIR, needs

HAM = DATA_DIR / "skin_lesion" / "labels.csv"
TWO_SITES = ["experiment=ham10000", "federation.rounds=1", "trainer.limit_train_batches=0.2",
             "data.transforms.size=16", "privacy.audit=none", "explain.every_n_rounds=0", "logger.log_model=false",
             "data.source.keep={source: [vienna_dias, rosendahl]}", "federation.sites=[vienna_dias,rosendahl]",
             "partition.dirname=natural-two-sources"]
# the levers that make sites send class statistics (query.statistics) ride along: the same result both ways too
LEVERS = ["model.logit_prior=federation", "federation.calibrate_head=true", "federation.calibrate_samples=100",
          "federation.calibrate_epochs=2"]


def _evaluation(cfg, run_id: str, tmp: Path) -> dict:
    client = MlflowClient(cfg.logger.tracking_uri)
    return json.loads(Path(client.download_artifacts(run_id, "evaluation.json", str(tmp))).read_text())


@needs(HAM)
def test_each_site_scores_the_final_model_at_home_the_same_in_process_and_over_flower(isolated, tmp_path):
    cfg = compose("fit", [*isolated, *TWO_SITES, *LEVERS])
    here = fit.run(cfg)
    flower = fit.run(compose("fit", [*isolated, *TWO_SITES, *LEVERS, "federation.parallel=2"]))
    assert here["selected"] == "round 1/1, head calibrated"
    mlflow = MlflowClient(cfg.logger.tracking_uri)
    for key in ("label_prior_count_class4", "calibrated_val_pooled_balanced_acc"):
        want = mlflow.get_run(here["run_id"]).data.metrics[key]
        assert mlflow.get_run(flower["run_id"]).data.metrics[key] == pytest.approx(want, abs=1e-3), key
    a, b = _evaluation(cfg, here["run_id"], tmp_path / "a"), _evaluation(cfg, flower["run_id"], tmp_path / "b")
    assert set(a["scores"]) == {"ham10000 test", "vienna_dias", "rosendahl"}
    # the same weights and images: the same counts; the same numbers up to the float rounding of the forward
    # pass in a process with another thread count (a one-round model has near-ties that it can reorder)
    for name, want in a["scores"].items():
        got = b["scores"][name]
        assert got["images_per_class"] == want["images_per_class"] and got["kind"] == want["kind"], name
        for metric, v in want["metrics"].items():
            assert got["metrics"][metric]["value"] == pytest.approx(v["value"], abs=1e-3, nan_ok=True), (name, metric)
            for bound in ("low", "high"):
                assert got["metrics"][metric][bound] == pytest.approx(v[bound], abs=1e-2, nan_ok=True), (name, metric)
    assert sum(a["scores"]["vienna_dias"]["images_per_class"]) == 64  # its own test lesions only
    assert sum(a["scores"]["rosendahl"]["images_per_class"]) + 64 == sum(a["scores"]["ham10000 test"]
                                                                         ["images_per_class"])
    run = MlflowClient(cfg.logger.tracking_uri).get_run(flower["run_id"])
    value = a["scores"]["rosendahl"]["metrics"]["balanced_acc"]
    assert run.data.metrics["site_test/rosendahl/balanced_acc"] == pytest.approx(value["value"])
    assert run.data.metrics["site_test/rosendahl/balanced_acc_low"] == pytest.approx(value["low"])
    card = Path(MlflowClient(cfg.logger.tracking_uri).download_artifacts(flower["run_id"], "model_card.md",
                                                                           str(tmp_path / "c"))).read_text()
    assert "| vienna_dias | internal | 64 |" in card and "| vienna_dias | 3" not in card
    assert "label prior" in card and "re-fitted on class-balanced virtual features" in card
