"""Flower's deployment runtime on loopback, real processes: `fedmed serve` (a SuperLink and fedmed's App) and
`fedmed fit site=<name>` (a SuperNode each), with TLS and registered SuperNode keys: the global model is
the one the in-process orchestrator computes from the same seed and data, an unregistered node is
refused, and a site killed mid-round is left out and named."""

import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from tests.conftest import DATA_DIR, PNEUMONIA, REPO, needs

pytestmark = needs(PNEUMONIA)
SITES = ["hospital_a", "hospital_b", "hospital_c"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_certificates(folder: Path) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1 / localhost (as the README's openssl commands make)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject, issuer, key, signer, ca: bool, san=None):
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)])).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert("fedmed test CA", "fedmed test CA", ca_key, ca_key, True)
    server = cert("127.0.0.1", "fedmed test CA", key, ca_key, False,
                  [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    out = {"ca_cert": folder / "ca.pem", "server_cert": folder / "server.pem", "server_key": folder / "server.key"}
    out["ca_cert"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out["server_cert"].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    out["server_key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
    return out


def env() -> dict[str, str]:
    # one thread per process: the same float operations in the same order in every process
    return {**os.environ, "FEDMED_DATA_DIR": str(DATA_DIR), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def fedmed(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedmed.cli", *args], cwd=REPO, env=env(),
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def common(tmp: Path, rounds: int, epochs: int) -> list[str]:
    return [f"paths.manifests={tmp / 'manifests'}", f"logger.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
            f"logger.artifact_location={tmp / 'mlruns'}", f"federation.rounds={rounds}",
            f"federation.local_epochs={epochs}", "trainer.limit_train_batches=3", "explain.every_n_rounds=0",
            "logger.log_model=false", "privacy.audit=none", "federation.select=last"]


def wait(procs: dict[str, subprocess.Popen], logs: dict[str, Path], timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    for name, p in procs.items():
        try:
            p.wait(max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs.values():
                q.kill()
            pytest.fail(f"{name} did not finish:\n" + logs[name].read_text()[-3000:])


def started(procs, logs, timeout: float = 180) -> None:
    """Wait until the ServerApp runs (it has created the shared MLflow store by then)."""
    deadline = time.monotonic() + timeout
    while "waiting for" not in logs["server"].read_text():
        if procs["server"].poll() is not None or time.monotonic() > deadline:
            pytest.fail("the server did not start:\n" + logs["server"].read_text()[-3000:])
        time.sleep(0.2)


def federation(tmp_path: Path, args: list[str], sites: list[str]) -> tuple[dict, dict[str, Path]]:
    """``fedmed serve`` and a ``fedmed fit site=...`` per site, with ``args``: (processes, their logs)."""
    logs = {n: tmp_path / f"{n}.log" for n in ["server", *sites]}
    procs = {"server": fedmed(["serve", *args], logs["server"])}
    started(procs, logs)
    for s in sites:
        procs[s] = fedmed(["fit", f"site={s}", *args], logs[s])
    return procs, logs


def until(log: Path, text: str, shown: Path, poll: float = 0.2, timeout: float = 300) -> None:
    """Wait until ``log`` says ``text``; fail with the end of ``shown`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert time.monotonic() < deadline, shown.read_text()[-3000:]
        time.sleep(poll)


def supernode_key(folder: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's EC key pair in OpenSSH format (as ``ssh-keygen -t ecdsa -b 384`` makes)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / f"{name}.key", folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH))
    return private, public


def final_weights(checkpoints: Path) -> dict[str, torch.Tensor]:
    (path,) = list(checkpoints.glob("*/server.pt"))
    return torch.load(path, map_location="cpu", weights_only=False)["global"]



def test_a_deployment_equals_in_process_with_tls_registered_keys_and_a_resumed_server(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMED_DATA_DIR", str(DATA_DIR))
    port = free_port()
    certs = make_certificates(tmp_path)
    keys = {s: supernode_key(tmp_path, s) for s in [*SITES, "intruder"]}
    base = [*common(tmp_path, rounds=2, epochs=1), "strategy=scaffold", "federation.finetune_epochs=1"]
    flower = [*base, f"federation.server=127.0.0.1:{port}", f"federation.tls.ca_cert={certs['ca_cert']}",
              f"federation.checkpoint_dir={tmp_path / 'ckpt_flower'}", f"paths.output_dir={tmp_path}"]
    registered = json.dumps({s: str(keys[s][1]) for s in SITES}).replace('"', "")
    logs = {n: tmp_path / f"{n}.log" for n in ["server", *SITES, "intruder"]}
    serve = [*flower, f"federation.tls.server_cert={certs['server_cert']}",
             f"federation.tls.server_key={certs['server_key']}", f"federation.auth.supernode_keys={registered}"]
    procs = {"server": fedmed(["serve", *serve], logs["server"])}
    started(procs, logs)
    for s in SITES:
        procs[s] = fedmed(["fit", f"site={s}", *flower, f"federation.auth.private_key={keys[s][0]}"], logs[s])
    intruder = fedmed(["fit", "site=hospital_a", *flower, f"federation.auth.private_key={keys['intruder'][0]}",
                       "federation.connect_timeout=20"], logs["intruder"])
    # the aggregator dies in round 2; restarted with resume=, it continues with the same sites (their SCAFFOLD
    # control variates kept in their processes), whose SuperNodes reach the new SuperLink
    deadline = time.monotonic() + 300
    while "round 2/2: training" not in logs["server"].read_text():
        assert time.monotonic() < deadline and procs["server"].poll() is None, logs["server"].read_text()[-3000:]
        time.sleep(0.2)
    procs["server"].send_signal(signal.SIGKILL)
    procs["server"].wait()
    (run_id,) = [p.name for p in (tmp_path / "ckpt_flower").iterdir()]
    logs["server"] = tmp_path / "server_resumed.log"
    procs["server"] = fedmed(["serve", *serve, f"resume={run_id}"], logs["server"])
    wait(procs, logs)
    assert all(p.returncode == 0 for p in procs.values()), logs["server"].read_text()[-3000:]
    assert intruder.wait(120) == 1
    said = [line for line in logs["intruder"].read_text().splitlines() if "error" in line.lower()]
    assert said and "did not accept this SuperNode's key" in said[-1], logs["intruder"].read_text()[-2000:]
    server_log = logs["server"].read_text()
    assert "TLS, 3 SuperNode keys registered" in server_log and "resuming after round 1/2" in server_log
    assert "site hospital_c connected" in server_log

    # the same federation in one process (this one, one thread like the workers), from the same seed and data
    from fedmed.config import compose
    from fedmed.tasks import fit

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fit.run(compose("fit", [*base, f"federation.checkpoint_dir={tmp_path / 'ckpt_local'}"]))
    finally:
        torch.set_num_threads(threads)
    # and with federation.parallel: every site in its own worker process and SuperNode, on a SuperLink on loopback
    par_log = tmp_path / "parallel.log"
    par = fedmed(["fit", *base, "federation.parallel=3", f"federation.checkpoint_dir={tmp_path / 'ckpt_parallel'}"],
                 par_log)
    assert par.wait(400) == 0, par_log.read_text()[-3000:]
    assert "in its own process" in par_log.read_text()
    want = final_weights(tmp_path / "ckpt_local")
    for run in ("ckpt_flower", "ckpt_parallel"):
        got = final_weights(tmp_path / run)
        assert list(got) == list(want)
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), (run, k)

    # MLflow: the server's federation run, with each site's run nested under it
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("fedmed")
    (parent,) = client.search_runs(exp.experiment_id, f"tags.server = '127.0.0.1:{port}'")  # not the parallel run
    assert parent.info.status == "FINISHED" and parent.data.tags["tls"] == "True"
    children = client.search_runs(exp.experiment_id, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.data.tags["site"] for r in children) == SITES
    assert all(r.info.status == "FINISHED" for r in children)
    # every path logs the same record: tags and params (but for how the sites were reached), fine-tuned site models
    runs = {r.data.tags["transport"] + r.data.tags.get("server", ""): r for r in client.search_runs(
        exp.experiment_id, "tags.mode = 'federated'")}
    assert len(runs) == 3, sorted(runs)
    assert same_record(list(runs.values()))
    for run in runs.values():
        sites = client.search_runs(exp.experiment_id, f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
        assert len(sites) == len(SITES)
        for site in sites:
            assert "personalized_val_acc" in site.data.metrics, (run.data.tags["transport"], site.data.tags["site"])
            assert [a.path for a in client.list_artifacts(site.info.run_id, "checkpoint")] == ["checkpoint/model.pt"]


#: tags and params that say where and how the sites were reached, or where files go
WHERE = ("transport", "server", "tls", "checkpoint_dir", "federation.server", "federation.tls.", "federation.auth.",
         "federation.checkpoint_dir", "federation.parallel", "paths.", "data.cache_dir", "resume", "mlflow.",
         "run_name")


def same_record(runs) -> bool:
    """The runs log the same tags and params, leaving out :data:`WHERE`; fails naming the first difference."""
    def what(run) -> dict[str, str]:
        both = {**{f"tag {k}": v for k, v in run.data.tags.items()}, **{f"param {k}": v for k, v in
                                                                           run.data.params.items()}}
        return {k: v for k, v in both.items() if not k.split(" ", 1)[1].startswith(WHERE)}
    first = what(runs[0])
    assert first["tag privacy.dp"] and first["tag federation.compression"]  # the privacy and compression tags
    for other in runs[1:]:
        theirs = what(other)
        diff = sorted(k for k in set(first) | set(theirs) if first.get(k) != theirs.get(k))
        assert not diff, [(k, first.get(k), theirs.get(k)) for k in diff[:5]]
    return True


def test_a_site_killed_mid_round_is_left_out_and_named(tmp_path):
    port = free_port()
    args = [*common(tmp_path, rounds=2, epochs=2), f"federation.server=127.0.0.1:{port}", "federation.min_sites=1",
            "federation.site_timeout=30", f"federation.checkpoint_dir={tmp_path / 'ckpt'}",
            f"paths.output_dir={tmp_path}", "federation.sites=[hospital_a,hospital_b]"]
    procs, logs = federation(tmp_path, args, ["hospital_a", "hospital_b"])
    until(logs["hospital_b"], "round 2 epoch 1/2", logs["server"], 0.05)  # mid-way through its round-2 training
    procs["hospital_b"].send_signal(signal.SIGKILL)
    killed = procs.pop("hospital_b")
    wait(procs, logs)
    killed.wait()
    assert procs["server"].returncode == 0, logs["server"].read_text()[-3000:]
    assert "site hospital_b excluded" in logs["server"].read_text()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("fedmed")
    (parent,) = [r for r in client.search_runs(exp.experiment_id, "tags.transport = 'flower'")
                 if r.data.tags.get("role") != "site"]
    assert parent.info.status == "FINISHED"
    assert any(k.startswith("excluded.round_002") and k.endswith(".hospital_b") for k in parent.data.tags)
    trained = client.get_metric_history(parent.info.run_id, "sites_trained")
    assert trained[-1].value == 1  # the last round went on with the survivor


def test_sites_end_failed_when_the_server_is_gone(tmp_path):
    """The aggregator is killed mid-federation and not restarted: each site ends within connect_timeout
    (plus its probe interval), exits 1 with the reason, and its MLflow run is FAILED, not RUNNING forever."""
    port = free_port()
    args = [*common(tmp_path, rounds=3, epochs=1), f"federation.server=127.0.0.1:{port}",
            f"federation.checkpoint_dir={tmp_path / 'ckpt'}", f"paths.output_dir={tmp_path}",
            "federation.sites=[hospital_a,hospital_b]", "federation.connect_timeout=30"]  # slack for a busy machine
    sites = ["hospital_a", "hospital_b"]
    procs, logs = federation(tmp_path, args, sites)
    until(logs["server"], "round 2/3: training", logs["server"])
    procs["server"].send_signal(signal.SIGKILL)
    gone = time.monotonic()
    for s in sites:
        assert procs[s].wait(90) == 1, logs[s].read_text()[-2000:]
    assert time.monotonic() - gone < 60
    assert all("the server is gone" in logs[s].read_text() for s in sites), logs["hospital_a"].read_text()[-2000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("fedmed")
    runs = client.search_runs(exp.experiment_id, "tags.role = 'site'")
    assert sorted(r.data.tags["site"] for r in runs) == sites and all(r.info.status == "FAILED" for r in runs)
    assert not free_port_taken(port)  # the SuperLink went with the server
    # and so did the ServerApp process it started, though the killed server is not reaped (a zombie) yet
    deadline = time.monotonic() + 20
    while serverapps_of(procs["server"].pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not serverapps_of(procs["server"].pid)
    procs["server"].wait(5)


def serverapps_of(pid: int) -> list[str]:
    """Command lines of the running flwr-serverapp processes started by process ``pid`` (Linux /proc)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().decode(errors="replace").split("\0")
            state = (cmdline.parent / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if (state != "Z" and any(a.endswith("flwr-serverapp") for a in args[:2]) and "--parent-pid" in args
                and args[args.index("--parent-pid") + 1] == str(pid)):
            found.append(" ".join(args))
    return found


def free_port_taken(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0
