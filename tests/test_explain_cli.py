"""`fedmed explain` on a checkpoint from a real (smoke) federation: files, MLflow nesting, errors."""

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from fedmed.cli import main
from fedmed.config import compose
from fedmed.tasks import explain, fit
from tests.conftest import PNEUMONIA, needs

pytestmark = needs(PNEUMONIA)


@pytest.fixture
def fitted(tmp_path, isolated):
    res = fit.run(compose("fit", [*isolated, "experiment=smoke", "logger.log_model=false"]))
    return res["run_id"], isolated


def test_explain_all_methods_from_mlflow_run(tmp_path, fitted):
    run_id, isolated = fitted
    res = explain.run(compose("explain", [*isolated, f"checkpoint=runs:/{run_id}", "method=all", "n=8",
                                          "per_class=2", f"output_dir={tmp_path / 'xai'}"]))
    files = {p.name for p in (tmp_path / "xai" / res["run_id"]).iterdir()}
    assert {"gradcam_test.png", "integratedgradients_test.png", "scorecam_test.png"} <= files
    per_class = {f for f in files if f.startswith("gradcam_test_") and f != "gradcam_test.png"}
    for name in ("normal", "pneumonia"):  # every class has test images: correct or misclassified ones (or both)
        assert per_class & {f"gradcam_test_{name}_correct.png", f"gradcam_test_{name}_misclassified.png"}, per_class
    for m, row in res["methods"].items():
        assert 0 <= row["deletion_auc"] <= 1 and 0 <= row["insertion_auc"] <= 1, m
        assert -1 <= row["sanity_rank_corr"] <= 1 and row["maps_per_second"] > 0, m
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(res["run_id"])
    assert run.data.tags["mlflow.parentRunId"] == run_id and run.info.status == "FINISHED"
    assert "gradcam/deletion_auc" in run.data.metrics
    names = {a.path for a in client.list_artifacts(res["run_id"], "heatmaps")}
    assert "heatmaps/gradcam_test.png" in names
    got = json.loads(Path(client.download_artifacts(res["run_id"], "faithfulness.json", str(tmp_path))).read_text())
    assert set(got) == set(res["methods"])


def test_explain_errors_are_clear(tmp_path, fitted, capsys):
    run_id, isolated = fitted
    assert main(["explain", *isolated, f"checkpoint={tmp_path / 'nope.pt'}"]) == 1
    assert "nope.pt" in capsys.readouterr().err
    assert main(["explain", *isolated, f"checkpoint=runs:/{run_id}", "data=breastmnist"]) == 1
    assert "trained on 'pneumoniamnist'" in capsys.readouterr().err
    assert main(["explain", *isolated, f"checkpoint=runs:/{run_id}", "method=gradcam-x"]) == 1
    assert "gradcam-x" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["explain", *isolated, f"checkpoint={bad}"]) == 1
    assert "bad.pt" in capsys.readouterr().err
