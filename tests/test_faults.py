"""Storage faults: a read-only MLflow store or artifact folder, a read-only or full checkpoint folder, a store
that stops taking writes mid-run, and two first runs on one fresh store.

File permissions do not stop root, so the code under test runs in a child process which, where the tests
run as root, has given up the capabilities that override them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH,
CAP_FOWNER, dropped from its bounding set before it starts). Folders are made read-only with ``chmod``, as
a user would find them.
"""

from __future__ import annotations

import ctypes
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import fedmed
from fedmed.errors import FedmedError
from fedmed.federated.checkpoint import load_checkpoint, save_checkpoint

REPO = Path(fedmed.__file__).resolve().parents[1]  # the checkout the children import
PR_CAPBSET_DROP = 24
LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: the forked child only calls it


@pytest.fixture
def workspace(tmp_path):
    """A folder for the child process; read-only folders it leaves are made writable again, so they can go."""
    yield tmp_path
    for d, _, _ in os.walk(tmp_path):
        os.chmod(d, stat.S_IRWXU)


def _without_permission_override() -> None:
    """Run in the child before it starts: drop the capabilities that let root ignore file permissions."""
    for cap in (1, 2, 3):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
        if LIBC.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def child(code: str, workspace: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``code`` in a python child to which file permissions apply; ``WS`` is the workspace path."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    script = f"from pathlib import Path\nWS = Path({str(workspace)!r})\n" + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], cwd=workspace, env=env, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=_without_permission_override if os.geteuid() == 0 else None)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


# -- MLflow store and artifact folder ------------------------------------------------------------------------
def test_read_only_store_and_artifact_folder_are_refused_in_seconds_naming_key_and_path(workspace):
    out = ok(child("""
        import sqlite3, time
        from fedmed.errors import FedmedError
        from fedmed.tracking import Tracker

        ro = WS / "ro"
        ro.mkdir()
        sqlite3.connect(ro / "old.db").execute("create table t (x)").connection.commit()
        (ro / "old.db").chmod(0o444)
        ro.chmod(0o555)
        cases = {"new store in a read-only folder": (f"sqlite:///{ro}/sub/mlflow.db", WS / "mlruns"),
                 "read-only store": (f"sqlite:///{ro}/old.db", WS / "mlruns"),
                 "read-only artifact folder": (f"sqlite:///{WS}/ok/mlflow.db", ro / "mlruns")}
        for case, (uri, artifacts) in cases.items():
            start = time.monotonic()
            try:
                Tracker(uri, "exp", str(artifacts))
            except FedmedError as exc:
                print(f"{case}|{time.monotonic() - start:.1f}|{exc}")
            else:
                print(f"{case}|accepted")
        print("store created:", (WS / "ok").exists())
    """, workspace))
    lines = dict(line.split("|", 1) for line in out.splitlines() if "|" in line)
    ro = workspace / "ro"
    expect = {"new store in a read-only folder": ("logger.tracking_uri", f"{ro}/sub/mlflow.db"),
              "read-only store": ("logger.tracking_uri", f"{ro}/old.db"),
              "read-only artifact folder": ("logger.artifact_location", f"{ro}/mlruns")}
    for case, (key, path) in expect.items():
        assert lines[case] != "accepted", out
        seconds, message = lines[case].split("|", 1)
        assert float(seconds) < 5 and message.startswith(f"{key}: ") and path in message, out
        assert "read-only" in message and "\n" not in message, out
    assert "store created: False" in out  # refused before MLflow made anything


RACER = """
import sys, time
from fedmed.tracking import Tracker

me, reps = sys.argv[1], int(sys.argv[2])
for rep in range(reps):
    (WS / f"ready-{rep}-{me}").touch()
    while not (WS / f"go-{rep}").exists():  # both processes start the run at the same moment
        time.sleep(0.001)
    try:
        tracker = Tracker(f"sqlite:///{WS}/r{rep}/mlflow.db", "exp", str(WS / f"r{rep}" / "mlruns"))
        tracker.end_run(tracker.start_run("first"))
        print(f"{rep}|ok", flush=True)
    except Exception as exc:
        print(f"{rep}|{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", flush=True)
"""


def test_two_first_runs_on_a_fresh_store_both_succeed(tmp_path):
    reps = 3
    script = f"from pathlib import Path\nWS = Path({str(tmp_path)!r})\n{RACER}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(k), str(reps)], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(2)]
    try:
        for rep in range(reps):
            deadline = time.monotonic() + 240
            while not all((tmp_path / f"ready-{rep}-{k}").exists() for k in range(2)):
                assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a racer stopped"
                time.sleep(0.01)
            (tmp_path / f"go-{rep}").touch()
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for (out, err), p in zip(outs, procs, strict=True):
        assert p.returncode == 0 and out.split() == [f"{rep}|ok" for rep in range(reps)], out + err
    from mlflow import MlflowClient

    for rep in range(reps):
        client = MlflowClient(f"sqlite:///{tmp_path}/r{rep}/mlflow.db")
        exp = client.get_experiment_by_name("exp")
        assert exp is not None and len(client.search_runs([exp.experiment_id])) == 2


def test_store_that_stops_taking_writes_mid_run_keeps_the_original_error(workspace):
    proc = child("""
        from fedmed.tracking import RunLog, Tracker, run_status

        store = WS / "store"
        tracker = Tracker(f"sqlite:///{store}/mlflow.db", "exp", str(WS / "mlruns"))
        run = tracker.start_run("mid-run")
        try:
            with run_status(RunLog(tracker, run)):
                (store / "mlflow.db").chmod(0o444)
                store.chmod(0o555)  # the store goes read-only after the start
                raise ValueError("the error that stopped the run")
        except BaseException as exc:
            print("raised:", type(exc).__name__, exc)
    """, workspace)
    out = ok(proc)
    assert "raised: ValueError the error that stopped the run" in out, out
    warnings = [line for line in proc.stderr.splitlines() if "could not mark MLflow run" in line]
    assert len(warnings) == 1 and "FAILED: OperationalError: " in warnings[0], proc.stderr


# -- the server checkpoint ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint_faults(tmp_path_factory):
    """One child (torch loads once) meets a read-only checkpoint folder, then the file size limit."""
    workspace = tmp_path_factory.mktemp("checkpoints")
    out = ok(child("""
        import resource, signal
        import torch
        from fedmed.errors import FedmedError
        from fedmed.federated.checkpoint import load_checkpoint, save_checkpoint

        def attempt(case, folder, state):
            try:
                save_checkpoint(folder / "server.pt", state)
            except FedmedError as exc:
                print(f"{case}|error|{exc}")
            except Exception as exc:  # not the one-line error: shown, so that the test says what happened
                print(f"{case}|error|{type(exc).__name__}: {str(exc).splitlines()[0]}")
            left = sorted(p.name for p in folder.iterdir())
            print(f"{case}|left|{left} round {load_checkpoint(folder / 'server.pt')['round']}")

        ro, big = WS / "ro", WS / "big"
        save_checkpoint(ro / "server.pt", {"round": 1})
        save_checkpoint(big / "server.pt", {"round": 1})
        ro.chmod(0o555)
        attempt("read-only", ro, {"round": 2})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, resource.RLIM_INFINITY))
        attempt("size limit", big, {"round": 2, "weights": torch.zeros(100_000)})
    """, workspace))
    (workspace / "ro").chmod(stat.S_IRWXU)
    return workspace, {tuple(line.split("|")[:2]): line.split("|", 2)[2] for line in out.splitlines() if "|" in line}


def test_read_only_checkpoint_folder_is_one_line_and_keeps_the_previous_checkpoint(checkpoint_faults):
    workspace, seen = checkpoint_faults
    error = seen.get(("read-only", "error"), "")
    assert error.startswith(f"federation.checkpoint_dir: cannot write the server checkpoint "
                            f"{workspace / 'ro' / 'server.pt'}: ") and "read-only" in error, seen
    assert seen[("read-only", "left")] == "['server.pt'] round 1", seen


def test_file_size_limit_while_checkpointing_removes_the_temporary_file(checkpoint_faults):
    workspace, seen = checkpoint_faults
    error = seen.get(("size limit", "error"), "")
    assert f"{workspace / 'big' / 'server.pt'}: the file grew past the file size limit; " in error, seen
    assert seen[("size limit", "left")] == "['server.pt'] round 1", seen


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
def test_full_disk_while_checkpointing_is_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "server.pt"
    save_checkpoint(path, {"round": 1})
    (tmp_path / "server.tmp").symlink_to("/dev/full")  # every write to the temporary file: ENOSPC
    with pytest.raises(FedmedError) as info:
        save_checkpoint(path, {"round": 2, "weights": torch.zeros(10_000)})
    message = str(info.value)
    assert message.startswith(f"federation.checkpoint_dir: cannot write the server checkpoint {path}: "
                              "no space left on the disk; ") and "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["server.pt"]
    assert load_checkpoint(path)["round"] == 1



STRAY = """
import sys, torch
from fedmed.federated.calls import SiteTimeout, call_with_timeout

def train_forever():  # a site call still in torch code when its round's time is up
    x = torch.randn(256, 256)
    for _ in range(10**7):
        x = torch.tanh(x @ x)

try:
    call_with_timeout(train_forever, 0.5)
except SiteTimeout:
    pass
from fedmed import cli
cli.main = lambda argv=None: 0  # the federation itself finished and was logged
cli.entry()
"""


def test_a_site_still_training_past_its_timeout_does_not_abort_the_exit(tmp_path):
    """Without care, the interpreter's teardown under a thread inside torch ends in std::terminate (exit 134,
    'terminate called without an active exception') after the federation was logged as finished."""
    script = tmp_path / "stray.py"
    script.write_text(STRAY)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-500:])
    assert "terminate called" not in proc.stderr


def test_an_artifact_store_that_fills_up_after_training_is_one_line_and_keeps_the_federation(isolated, tmp_path,
                                                                                           monkeypatch):
    """The disk under logger.artifact_location fills up while the trained model is written: one line naming the
    key and what happened, and the server checkpoint (the trained federation) stays."""
    import errno

    from mlflow import MlflowClient

    from fedmed.config import compose
    from fedmed.errors import FedmedError
    from fedmed.tasks import fit

    def full(self, run_id, local_path, artifact_path=None):
        if str(artifact_path or "").startswith("checkpoint"):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(MlflowClient, "log_artifact", full)
    ckpt = tmp_path / "ckpt"
    cfg = compose("fit", [*isolated, "experiment=smoke", "privacy.audit=none", "explain.every_n_rounds=0",
                          "logger.log_model=false", f"federation.checkpoint_dir={ckpt}"])
    with pytest.raises(FedmedError) as info:
        fit.run(cfg)
    said = str(info.value)
    assert said.startswith(f"logger.artifact_location={tmp_path / 'mlruns'}: cannot write the run's model: no space "
                           "left on the disk; the trained federation is kept in "), said
    assert list(ckpt.glob("*/server.pt")) and "\n" not in said
