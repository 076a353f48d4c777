"""`fedmed fit` end to end on the real image-folder (brain MRI) and table (HAM10000) sources."""

import json
from pathlib import Path

from mlflow import MlflowClient

from fedmed.config import compose, site_config
from fedmed.tasks import fit
from tests.conftest import DATA_DIR, needs


def _artifacts(tmp_path, run_id, path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    return {a.path for a in client.list_artifacts(run_id, path)}


@needs(DATA_DIR / "brain_tumor_mri")
def test_brain_mri_federation_of_three_sites(tmp_path, isolated):
    cfg = compose("fit", [*isolated, "experiment=smoke", "data=brain_mri", "data.transforms.size=32",
                          "federation.sites=[hospital_a,hospital_b,hospital_c]", "logger.log_model=false"])
    res = fit.run(cfg)
    assert set(res["sites"]) == {"hospital_a", "hospital_b", "hospital_c"}
    assert 0.0 <= res["test"]["acc"] <= 1.0 and "test_f1_class3" not in res["test"] and "f1_class3" in res["test"]
    # the committed reference manifests where they exist, else the ones this run wrote under paths.manifests
    manifests = [Path(site_config(cfg, s).manifest) for s in cfg.federation.sites]
    assert [m.name for m in manifests] == ["hospital_a.json", "hospital_b.json", "hospital_c.json"]
    assert all(m.is_file() for m in manifests)
    ids = [e["image"] for m in manifests for e in json.loads(m.read_text())["training"]]
    assert len(ids) == len(set(ids)) and all(i.startswith("Training/") for i in ids)
    assert (DATA_DIR / "brain_tumor_mri" / ids[0]).exists()
    assert {"partition/class_counts.png", "partition/class_counts_table.json", "partition/summary.txt",
            "partition/class_counts.json"} <= _artifacts(tmp_path, res["run_id"], "partition")


@needs(DATA_DIR / "skin_lesion" / "labels.csv")
def test_ham10000_natural_partition_by_acquisition_source(tmp_path, isolated):
    cfg = compose("fit", [*isolated, "experiment=smoke", "data=ham10000", "data.transforms.size=28",
                          "federation.sites=[rosendahl,vienna_dias]", "logger.log_model=false"])
    assert cfg.partition.method == "natural" and cfg.model.net.in_channels == 3
    res = fit.run(cfg)
    assert set(res["sites"]) == {"rosendahl", "vienna_dias"} and 0.0 <= res["test"]["acc"] <= 1.0
    m = json.loads(Path(site_config(cfg, "vienna_dias").manifest).read_text())
    assert m["partition"]["method"] == "natural" and 200 < len(m["training"]) < 439
