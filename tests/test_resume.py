"""Crash-resume with real processes: SIGKILL a federation mid-run, resume it, get bit-identical weights."""

import os
import signal
import subprocess
import sys
import time

import torch
from mlflow import MlflowClient

from tests.conftest import PNEUMONIA, needs

pytestmark = needs(PNEUMONIA)

ROUNDS = 4


def _cmd(isolated, ckpt_dir, *extra):
    return [sys.executable, "-m", "fedmed.cli", "fit", "experiment=smoke", f"federation.rounds={ROUNDS}",
            "explain.every_n_rounds=0", "logger.log_model=false", "strategy=fedadam",
            f"federation.checkpoint_dir={ckpt_dir}", *isolated, *extra]


def _final(ckpt_dir):
    (path,) = list(ckpt_dir.glob("*/server.pt"))
    state = torch.load(path, weights_only=False)
    return state


def test_killed_federation_resumes_to_the_same_weights(tmp_path, isolated):
    env = dict(os.environ)
    straight = tmp_path / "straight"
    proc = subprocess.run(_cmd(isolated, straight), capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    reference = _final(straight)
    assert reference["round"] == ROUNDS

    killed = tmp_path / "killed"
    p = subprocess.Popen(_cmd(isolated, killed), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and not list(killed.glob("*/server.pt")):
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    partial = _final(killed)
    assert 1 <= partial["round"] < ROUNDS
    run_id = partial["run_id"]
    # the command printed at the start, typed as printed: no override repeated
    said = p.stderr.read().decode()
    printed = said.split("continue it with: ", 1)[1].split()[:3]
    assert printed == ["fedmed", "fit", f"resume={killed.resolve() / run_id}"], said[-2000:]
    proc = subprocess.run([sys.executable, "-m", "fedmed.cli", *printed[1:]], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resuming after round {partial['round']}/{ROUNDS}" in proc.stderr
    resumed = _final(killed)
    assert resumed["round"] == ROUNDS
    for k, v in reference["global"].items():
        assert torch.equal(v, resumed["global"][k]), k
    assert torch.equal(reference["best"][2][next(iter(v for v in reference["global"]))],
                       resumed["best"][2][next(iter(reference["global"]))])
    assert reference["strategy"]["moments"].keys() == resumed["strategy"]["moments"].keys()

    # a resume with another config is refused, naming the difference; a wrong place is named too
    proc = subprocess.run(_cmd(isolated, killed, "seed=7", f"resume={run_id}"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 1 and "seed: 42 -> 7" in proc.stderr, proc.stderr[-2000:]
    proc = subprocess.run(_cmd(isolated, killed, f"resume={tmp_path / 'nowhere'}"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 1 and "no server.pt" in proc.stderr

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run_id, "val_loss"))
    assert steps == list(range(1, ROUNDS + 1))  # one value per round, in the same run
