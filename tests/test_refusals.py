"""Input that would do harm or waste work is refused first: files that would run code, wrong config
values, a stop request. Each refusal is one line that names the key or file, and comes in seconds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from fedmed.cli import main
from tests.conftest import PNEUMONIA, needs


class RunsCode:
    """Unpickling this calls ``Path.touch(marker)``: what a hostile .pt would do with os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_a_model_checkpoint_that_would_run_code_is_refused(tmp_path, isolated, capsys):
    marker = tmp_path / "ran"
    bad = tmp_path / "model.pt"
    torch.save({"state_dict": {}, "config": {}, "payload": RunsCode(marker)}, bad)
    for verb in (["explain"], ["audit", "privacy"]):
        assert main([*verb, *isolated, f"checkpoint={bad}"]) == 1
        line = one_line(capsys.readouterr().err)
        assert str(bad) in line and "safely" in line
    assert not marker.exists()


def test_a_server_checkpoint_that_would_run_code_is_refused(tmp_path, isolated, capsys):
    marker = tmp_path / "ran"
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save({"round": 1, "config": {}, "payload": RunsCode(marker)}, folder / "server.pt")
    t0 = time.perf_counter()
    assert main(["fit", *isolated, f"resume={folder}"]) == 1
    line = one_line(capsys.readouterr().err)
    assert "server.pt" in line and "safely" in line and not marker.exists()
    assert time.perf_counter() - t0 < 30  # before any data is read


@pytest.mark.parametrize("override,names", [
    ("federation.rounds=abc", "federation.rounds='abc': expected an integer >= 1"),
    ("federation.fraction=0", "federation.fraction=0: expected a number in (0, 1]"),
    ("privacy.delta=2", "privacy.delta=2: expected a number in (0, 1)"),
    ("model.optimizer.lr=-1", "model.optimizer.lr=-1"),
    ("data.batch_size=0.5", "data.batch_size=0.5"),
    ("trainer.deterministic=maybe", "trainer.deterministic='maybe': expected true or false"),
    ("strategy=fedprox strategy.mu=-0.1", "strategy.mu must be >= 0"),
    ("strategy=fedprox strategy.mu=abc", "strategy.mu='abc': expected float"),
    ("strategy=krum", "needs at least 5 sites"),
    ("+strategy.lr=0.1", "strategy.lr: fedavg has no such parameter"),
    ("site=hospital_d", "site=hospital_d is not one of federation.sites"),
    ("privacy.audit_shadows=2", "privacy.audit_shadows=2: expected an integer >= 4"),
    ("model=efficientnet_lite0 model.pretrained=/no/such/weights.pth",
     "model.pretrained='/no/such/weights.pth': expected null or imagenet or an existing file of weights "
     "(no file /no/such/weights.pth)"),
    ("model.logit_prior=global", "model.logit_prior='global'"),
    ("data.transforms.colour=grey", "data.transforms.colour='grey'"),
    ("model.logit_adjust=1 model.logit_prior=federation privacy.epsilon=8",
     "model.logit_prior=federation with DP-SGD needs privacy.statistics_noise"),
    ("federation.calibrate_head=true privacy.epsilon=8", "federation.calibrate_head=true with DP-SGD needs privacy"),
    ("model.decorrelation=-0.1", "model.decorrelation=-0.1: expected a number >= 0"),
    ("model.decorrelation=0.1 privacy.noise_multiplier=1", "model.decorrelation=0.1: expected 0 with DP-SGD on"),
    ("model.freeze_head=maybe", "model.freeze_head='maybe': expected true or false"),
    ("federation.calibrate_from=2", "federation.calibrate_from=2: needs federation.calibrate_head=true"),
    ("federation.calibrate_head=true federation.calibrate_from=11",
     "federation.calibrate_from=11: expected a round from 1 to federation.rounds=10"),
    ("federation.calibrate_head=true federation.calibrate_from=0", "federation.calibrate_from=0: expected"),
    ("federation.calibrate_head=true federation.calibrate_from=2 privacy.noise_multiplier=1 "
     "privacy.statistics_noise=20", "federation.calibrate_from=2: expected null with DP-SGD on"),
    ("federation.calibrate_head=true privacy.epsilon=0.5 privacy.statistics_noise=0.5",
     "the class statistics alone spend epsilon"),
    ("federation.style_mix=1.5", "federation.style_mix=1.5: expected a number in [0, 1]"),
    ("federation.style_band=0.6", "federation.style_band=0.6: expected a number in (0, 0.5]"),
    ("federation.style_mix=0.5 privacy.secure_aggregation=true",
     "federation.style_mix=0.5 with privacy.secure_aggregation: each site's style spectrum leaves it unmasked"),
    ("federation.style_mix=0.5 privacy.noise_multiplier=1", "federation.style_mix=0.5 with DP-SGD"),
])
def test_wrong_config_values_are_one_line_before_any_work(tmp_path, isolated, capsys, override, names):
    t0 = time.perf_counter()
    assert main(["fit", *isolated, *override.split()]) == 1
    line = one_line(capsys.readouterr().err)
    assert names in line, line
    assert time.perf_counter() - t0 < 20
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "data_manifests").exists()  # nothing written


def test_a_checkpoint_that_is_not_one_is_named_and_never_told_to_load_unsafely(tmp_path, isolated, capsys):
    from omegaconf import OmegaConf

    from fedmed.config import compose
    from fedmed.models import CompactCNN

    noise = tmp_path / "noise.pt"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    other = tmp_path / "other.pt"  # weights of a 5-class network under a 2-class config
    config = OmegaConf.to_container(compose("fit", [*isolated, "experiment=smoke"]), resolve=True)
    torch.save({"state_dict": CompactCNN(in_channels=1, num_classes=5).state_dict(), "config": config}, other)
    for path, says in ((noise, "not a PyTorch file of tensors and plain values"), (other, "do not fit the network")):
        for verb in (["explain"], ["audit", "privacy"]):
            t0 = time.perf_counter()
            assert main([*verb, *isolated, f"checkpoint={path}"]) == 1
            line = one_line(capsys.readouterr().err)
            assert says in line and str(path) in line and "weights_only" not in line, line
            assert time.perf_counter() - t0 < 20


def test_a_missing_data_folder_is_named_and_not_created(tmp_path, isolated, monkeypatch, capsys):
    missing = tmp_path / "nonexistent"
    monkeypatch.setenv("FEDMED_DATA_DIR", str(missing))
    assert main(["fit", *isolated]) == 1
    assert "FEDMED_DATA_DIR" in one_line(capsys.readouterr().err)
    assert not missing.exists()


def test_a_missing_resume_is_refused_before_data_is_read(tmp_path, isolated, capsys):
    t0 = time.perf_counter()
    assert main(["fit", *isolated, f"resume={tmp_path / 'nowhere'}"]) == 1
    assert "no server.pt" in one_line(capsys.readouterr().err)
    assert time.perf_counter() - t0 < 20 and not (tmp_path / "data_manifests").exists()


def test_a_corrupt_image_is_named_and_leaves_no_manifest_or_run(tmp_path, isolated, capsys):
    """The sites' images are decoded before the partition's manifests or any MLflow run are written."""
    from PIL import Image

    root, rng = tmp_path / "ds", np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("benign", "malignant"):
            (root / split / c).mkdir(parents=True)
            for i in range(8):
                Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(root / split / c / f"{c}{i}.png")
    (root / "train" / "benign" / "broken.png").write_bytes(b"not a png" * 8)
    args = ["fit", *isolated, "data=image_folder", f"data.source.root={root}", "data.transforms.size=16",
            "partition=iid", "partition.min_samples=1", "federation.sites=[hospital_a,hospital_b]",
            "federation.rounds=1"]
    assert main(args) == 1
    assert "broken.png" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "data_manifests").exists() and not (tmp_path / "mlflow.db").exists()
    (root / "train" / "benign" / "broken.png").unlink()  # mended: the same command now trains
    assert main(args) == 0
    assert len(list((tmp_path / "data_manifests").rglob("*.json"))) == 2


@needs(PNEUMONIA)
def test_sigterm_ends_runs_as_killed_with_exit_status_143(tmp_path, isolated):
    """A scheduler's stop is not a success: exit 143, the runs KILLED, the run id printed at the start."""
    cmd = [sys.executable, "-m", "fedmed.cli", "fit", "experiment=smoke", "federation.rounds=50",
           "explain.every_n_rounds=0", "privacy.audit=none", f"federation.checkpoint_dir={tmp_path / 'ckpt'}",
           *isolated]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    deadline = time.time() + 300
    while time.time() < deadline and not list((tmp_path / "ckpt").glob("*/server.pt")):
        time.sleep(0.1)
    assert p.poll() is None, "the run ended before it could be stopped"
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err[-2000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("fedmed").experiment_id])
    assert runs and {r.info.status for r in runs} == {"KILLED"}
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    command = f"fedmed fit resume={tmp_path / 'ckpt' / parent.info.run_id}"
    assert command in err.split("round 1/")[0]  # said before the first round
    assert err.rstrip().endswith(f"continue it from its last round with: {command}"), err[-1000:]  # and again


def test_a_stop_that_lightning_turns_into_system_exit_still_ends_runs_killed(tmp_path):
    """Lightning answers a KeyboardInterrupt inside ``trainer.fit`` with ``exit(1)``: the stop is still a stop."""
    from fedmed.errors import Terminated
    from fedmed.tracking import RunLog, Tracker, run_status

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    tracker = Tracker(uri, "t", str(tmp_path / "art"))
    run_id = tracker.start_run("r")
    with pytest.raises(SystemExit), run_status(RunLog(tracker, run_id)):
        try:
            raise Terminated()
        except KeyboardInterrupt:
            raise SystemExit(1)  # noqa: B904 - as Lightning does: the interrupt is its __context__
    assert MlflowClient(uri).get_run(run_id).info.status == "KILLED"


@needs(PNEUMONIA)
def test_a_batch_fraction_that_leaves_a_site_no_batch_is_refused_before_training(isolated, capsys):
    # smoke: hospital_a holds 509 PneumoniaMNIST training images, 8 batches of 64; 0.01 of them is none
    t0 = time.perf_counter()
    assert main(["fit", *isolated, "experiment=smoke", "trainer.limit_train_batches=0.01"]) == 1
    err = capsys.readouterr().err  # the partition's log lines come first: the data had to be read
    line = one_line("\n".join(x for x in err.splitlines() if "error" in x.lower()))
    assert "Traceback" not in err and "round 1" not in err, err
    assert "trainer.limit_train_batches=0.01 gives site hospital_a no batch (it has 8)" in line, line
    assert "use at least" in line
    assert time.perf_counter() - t0 < 60
    # a fraction that leaves every site one batch trains
    assert main(["fit", *isolated, "experiment=smoke", "trainer.limit_train_batches=0.5",
                 "explain.every_n_rounds=0", "privacy.audit=none"]) == 0
