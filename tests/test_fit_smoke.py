"""`fedmed fit` on the real PneumoniaMNIST file: the CLI, the three modes and the MLflow run tree."""

import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import torch
from mlflow import MlflowClient

from fedmed.cli import main
from fedmed.config import compose
from fedmed.tasks import fit
from tests.conftest import PNEUMONIA, needs

pytestmark = needs(PNEUMONIA)


def runs_of(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("fedmed")
    return client, exp, client.search_runs([exp.experiment_id])


def test_cli_smoke_writes_the_mlflow_run_tree(tmp_path, isolated):
    env = {**os.environ, "FEDMED_DATA_DIR": os.environ["FEDMED_DATA_DIR"]}
    proc = subprocess.run(
        [sys.executable, "-m", "fedmed.cli", "fit", "experiment=smoke", *isolated],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "federated model" in proc.stdout and "test" in proc.stdout and "bytes sent per round" in proc.stdout
    assert "bal. acc" in proc.stdout
    hint = f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'mlflow.db'}"
    assert any(line.rstrip().endswith(hint) for line in proc.stdout.splitlines()), proc.stdout[-2000:]  # never wrapped
    assert "round 1/1" in proc.stderr and "[hospital_a] round 1 epoch 1/1" in proc.stderr

    client, exp, runs = runs_of(tmp_path)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # MLflow 3's UI opens it on its runs
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    name = parent.info.run_name  # mode, data, model, strategy, seed, start time (MMDD-HHMM)
    assert re.fullmatch(r"federated-pneumoniamnist-cnn-fedavg-s42-\d{4}-\d{4}", name), name
    assert parent.data.tags["seed"] == "42"
    assert {k: parent.data.tags[k] for k in ("dataset", "model", "strategy", "mode")} == {
        "dataset": "pneumoniamnist", "model": "cnn", "strategy": "fedavg", "mode": "federated"}
    assert parent.data.params["federation.rounds"] == "1" and parent.data.params["data.name"] == "pneumoniamnist"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted(c.info.run_name for c in children) == ["hospital_a", "hospital_b"]
    for c in children:
        assert c.info.status == "FINISHED"
        hist = client.get_metric_history(c.info.run_id, "val_acc")
        assert [m.step for m in hist] == [1] and 0.0 <= hist[0].value <= 1.0
        assert {"val_f1_pneumonia", "val_recall_normal", "val_balanced_acc"} <= set(c.data.metrics)
        assert [m.step for m in client.get_metric_history(c.info.run_id, "train_loss")] == [1]
    assert [m.step for m in client.get_metric_history(parent.info.run_id, "val_auroc")] == [1]
    assert client.get_metric_history(parent.info.run_id, "comm_bytes_up")[0].value > 0
    assert 0.0 <= parent.data.metrics["test_acc"] <= 1.0
    assert {"test_f1_normal", "test_f1_pneumonia", "test_recall_normal", "test_recall_pneumonia",
            "test_balanced_acc"} <= set(parent.data.metrics)
    assert not [k for k in parent.data.metrics if "_class" in k]
    summary = client.download_artifacts(parent.info.run_id, "summary.txt", str(tmp_path))
    assert hint in Path(summary).read_text().splitlines()[-1]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"confusion_matrix_test.png", "config.yaml", "summary.txt", "checkpoint", "partition"} <= artifacts
    # explanations: heatmap images only in each site's own run; the federation run gets numbers only
    assert "heatmaps" not in artifacts
    for c in children:
        assert [a.path for a in client.list_artifacts(c.info.run_id, "heatmaps")] == ["heatmaps/round_001.png"]
        assert 0.0 <= c.data.metrics["val_xai_deletion_auc"] <= 1.0
    assert -1.0 <= parent.data.metrics["xai_site_consistency"] <= 1.0
    assert "val_xai_insertion_auc" in parent.data.metrics
    models = client.search_logged_models(experiment_ids=[exp.experiment_id])
    assert [m.source_run_id for m in models] == [parent.info.run_id]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    info = mlflow.models.get_model_info(f"runs:/{parent.info.run_id}/model")  # a pyfunc of raw images
    assert set(info.flavors) == {"python_function"} and info.flavors["python_function"]["loader_module"] == (
        "mlflow.pyfunc.model")
    spec = info.signature.inputs.inputs[0]  # raw images as the npz holds them
    assert (str(spec.type), tuple(spec.shape)) == ("uint8", (-1, 28, 28))
    assert info.signature.outputs.input_names() == ["normal", "pneumonia", "predicted"]


def test_local_and_centralized_baselines_share_epochs_and_evaluation(tmp_path, isolated):
    base = [*isolated, "experiment=smoke", "federation.rounds=2", "logger.log_model=false"]
    local = fit.run(compose("fit", [*base, "site=hospital_b"]))
    central = fit.run(compose("fit", [*base, "mode=centralized"]))
    assert local["mode"] == "local" and central["mode"] == "centralized"
    assert set(local["test"]) == set(central["test"]) and "auroc" in local["test"]
    client, _, runs = runs_of(tmp_path)
    by_mode = {r.data.tags["mode"]: r for r in runs}
    assert by_mode["local"].data.tags["site"] == "hospital_b"
    for r in by_mode.values():  # one epoch per (round x local epoch), validated each epoch
        assert [m.step for m in client.get_metric_history(r.info.run_id, "val_loss")] == [1, 2]
        assert "test_acc" in r.data.metrics


def test_same_seed_same_global_weights(tmp_path, isolated):
    args = [*isolated, "experiment=smoke", "logger.log_model=false", "federation.select=last"]
    a = fit.run(compose("fit", args))
    b = fit.run(compose("fit", args))
    assert a["test"] == b["test"]
    c = fit.run(compose("fit", [*args, "seed=1"]))
    assert c["test"] != a["test"]


def test_selection_on_validation_balanced_accuracy(tmp_path, isolated):
    """select=best_val_balanced_acc keeps the round (federated) or epoch (centralized) whose pooled
    validation balanced accuracy is highest, the first such on ties."""
    base = [*isolated, "experiment=smoke", "federation.rounds=3", "logger.log_model=false",
            "federation.select=best_val_balanced_acc", "privacy.audit=none"]
    fed = fit.run(compose("fit", base))
    central = fit.run(compose("fit", [*base, "mode=centralized"]))
    client, _, _ = runs_of(tmp_path)
    for res, key, tag in ((fed, "val_pooled_balanced_acc", "selected_round"),
                          (central, "val_balanced_acc", "selected_epoch")):
        hist = sorted((m.step, m.value) for m in client.get_metric_history(res["run_id"], key))
        assert [s for s, _ in hist] == [1, 2, 3]
        best = max(hist, key=lambda sv: (sv[1], -sv[0]))[0]
        assert client.get_run(res["run_id"]).data.tags[tag] == str(best), hist


def test_finetuned_site_models_are_logged_in_their_site_runs(tmp_path, isolated):
    """federation.finetune_epochs=1: each site run holds its personalised model as checkpoint/model.pt,
    which differs from the global one and scores on the site's validation data what the run logged."""
    from fedmed import build
    from fedmed.data.datamodule import Pipeline, make_loader
    from fedmed.models.metrics import evaluate

    cfg = compose("fit", [*isolated, "experiment=smoke", "logger.log_model=false", "privacy.audit=none",
                          "explain.every_n_rounds=0", "federation.finetune_epochs=1"])
    res = fit.run(cfg)
    client, _, runs = runs_of(tmp_path)
    global_sd = torch.load(client.download_artifacts(res["run_id"], "checkpoint/model.pt", str(tmp_path / "g")),
                           weights_only=False)["state_dict"]
    _, datas = build.load_sites(cfg, Pipeline.from_config(cfg.data).source, list(cfg.federation.sites))
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == res["run_id"]]
    assert sorted(r.info.run_name for r in children) == ["hospital_a", "hospital_b"]
    for r in children:
        path = client.download_artifacts(r.info.run_id, "checkpoint/model.pt", str(tmp_path / r.info.run_name))
        ckpt = build.load_model_checkpoint(path, None, tmp_path)
        assert ckpt["run_id"] == r.info.run_id and ckpt["epochs"] == 2
        sd = ckpt["state_dict"]
        assert any(not torch.equal(sd[k], global_sd[k]) for k in global_sd)
        net = build.build_module(cfg).net
        net.load_state_dict(sd)
        metrics, _ = evaluate(net, make_loader(datas[r.info.run_name].val, 256, False), cfg.data.num_classes)
        assert abs(metrics["acc"] - r.data.metrics["personalized_val_acc"]) < 1e-6


def test_missing_data_is_a_clear_cli_error(tmp_path, isolated, capsys):
    code = main(["fit", *isolated, f"data.source.root={tmp_path / 'nowhere'}", "data.source.download=false"])
    err = capsys.readouterr().err
    assert code == 1 and "pneumoniamnist.npz" in err and "nowhere" in err and "Traceback" not in err


def test_checkpoint_artifact_reloads(tmp_path, isolated):
    res = fit.run(compose("fit", [*isolated, "experiment=smoke", "logger.log_model=false"]))
    client, _, _ = runs_of(tmp_path)
    path = client.download_artifacts(res["run_id"], "checkpoint/model.pt", str(tmp_path))
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["class_names"] == ["normal", "pneumonia"] and "features.block1.conv.weight" in ckpt["state_dict"]


def test_tampered_manifest_fails_cleanly_before_any_run(tmp_path, isolated, capsys):
    import json

    assert main(["fit", *isolated, "experiment=smoke", "logger.log_model=false"]) == 0
    manifest = next((tmp_path / "data_manifests").rglob("hospital_b.json"))
    raw = json.loads(manifest.read_text())
    raw["training"][0]["image"] = "train/123456"
    manifest.write_text(json.dumps(raw))
    capsys.readouterr()
    assert main(["fit", *isolated, "experiment=smoke", "logger.log_model=false"]) == 1
    err = capsys.readouterr().err
    assert "hospital_b" in err and "train/123456" in err and "Traceback" not in err
    _, _, runs = runs_of(tmp_path)
    parents = sorted((r for r in runs if "mlflow.parentRunId" not in r.data.tags), key=lambda r: r.info.start_time)
    assert [r.info.status for r in parents] == ["FINISHED"]  # the earlier run is untouched; the refused one left none
