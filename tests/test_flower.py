"""Sites as separate processes connected through Flower on loopback (TLS on), and as parallel
workers (federation.parallel): the global model is the one the in-process orchestrator computes
from the same seed and data, and a site killed mid-round is survived."""

import datetime
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


def started(procs, logs, timeout: float = 120) -> None:
    """Wait until the server listens (it has created the shared MLflow store by then)."""
    deadline = time.monotonic() + timeout
    while "listening on" not in logs["server"].read_text():
        if procs["server"].poll() is not None or time.monotonic() > deadline:
            pytest.fail("the server did not start:\n" + logs["server"].read_text()[-3000:])
        time.sleep(0.2)


def final_weights(checkpoints: Path) -> dict[str, torch.Tensor]:
    (path,) = list(checkpoints.glob("*/server.pt"))
    return torch.load(path, map_location="cpu", weights_only=False)["global"]


def test_flower_federation_equals_in_process_and_uses_tls(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMED_DATA_DIR", str(DATA_DIR))
    port = free_port()
    certs = make_certificates(tmp_path)
    base = common(tmp_path, rounds=2, epochs=1)
    flower = [*base, f"federation.server=127.0.0.1:{port}", f"federation.tls.ca_cert={certs['ca_cert']}",
              f"federation.checkpoint_dir={tmp_path / 'ckpt_flower'}"]
    logs = {n: tmp_path / f"{n}.log" for n in ["server", *SITES]}
    procs = {"server": fedmed(["serve", *flower, f"federation.tls.server_cert={certs['server_cert']}",
                               f"federation.tls.server_key={certs['server_key']}"], logs["server"])}
    started(procs, logs)
    for s in SITES:
        procs[s] = fedmed(["fit", f"site={s}", *flower], logs[s])
    wait(procs, logs)
    assert all(p.returncode == 0 for p in procs.values()), logs["server"].read_text()[-3000:]
    server_log = logs["server"].read_text()
    assert "(TLS)" in server_log and "site hospital_c connected" in server_log

    # the same federation in one process (this one, one thread like the workers), from the same seed and data
    from fedmed.config import compose
    from fedmed.tasks import fit

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fit.run(compose("fit", [*base, f"federation.checkpoint_dir={tmp_path / 'ckpt_local'}"]))
    finally:
        torch.set_num_threads(threads)
    # and with federation.parallel: every site in its own worker process, all training at once
    par_log = tmp_path / "parallel.log"
    par = fedmed(["fit", *base, "federation.parallel=3", f"federation.checkpoint_dir={tmp_path / 'ckpt_parallel'}"],
                 par_log)
    assert par.wait(400) == 0, par_log.read_text()[-3000:]
    assert "in its own process" in par_log.read_text()
    want = final_weights(tmp_path / "ckpt_local")
    for run in ("ckpt_flower", "ckpt_parallel"):
        got = final_weights(tmp_path / run)
        assert set(got) == set(want)
        for k in want:
            assert torch.equal(got[k], want[k]), (run, k)

    # MLflow: the server's federation run, with each site's run nested under it
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("fedmed")
    parent = [r for r in client.search_runs(exp.experiment_id, "tags.transport = 'flower'")
              if r.data.tags.get("role") != "site"][0]
    children = client.search_runs(exp.experiment_id, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.data.tags["site"] for r in children) == SITES
    assert all(r.info.status == "FINISHED" for r in children)


def test_a_site_killed_mid_round_is_survived(tmp_path):
    port = free_port()
    args = [*common(tmp_path, rounds=3, epochs=2), f"federation.server=127.0.0.1:{port}", "federation.min_sites=2",
            "federation.site_timeout=120", f"federation.checkpoint_dir={tmp_path / 'ckpt'}"]
    logs = {n: tmp_path / f"{n}.log" for n in ["server", *SITES]}
    procs = {"server": fedmed(["serve", *args], logs["server"])}
    started(procs, logs)
    for s in SITES:
        procs[s] = fedmed(["fit", f"site={s}", *args], logs[s])
    deadline = time.monotonic() + 300
    while "round 2 epoch 1/2" not in logs["hospital_c"].read_text():  # mid-way through its round-2 training
        assert time.monotonic() < deadline, logs["server"].read_text()[-3000:]
        time.sleep(0.05)
    procs["hospital_c"].send_signal(signal.SIGKILL)
    killed = procs.pop("hospital_c")
    wait(procs, logs)
    killed.wait()
    assert procs["server"].returncode == 0, logs["server"].read_text()[-3000:]
    text = logs["server"].read_text()
    assert "site hospital_c excluded" in text
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("fedmed")
    parent = [r for r in client.search_runs(exp.experiment_id, "tags.transport = 'flower'")
              if r.data.tags.get("role") != "site"][0]
    assert parent.info.status == "FINISHED"
    assert any(k.startswith("excluded.round_") and k.endswith(".hospital_c") for k in parent.data.tags)
    trained = client.get_metric_history(parent.info.run_id, "sites_trained")
    assert trained[-1].value == 2  # the last round went on with the two survivors


@pytest.mark.parametrize("tokens,reason", [
    ({"s0": "the-right-secret"}, "site s0 presented a wrong token; refused"),
    ({"s1": "another-site"}, "site s0 has no token in federation.auth.tokens_file; refused"),  # fails closed
])
def test_a_node_with_a_wrong_token_is_refused(caplog, tokens, reason):
    """Flower's real gRPC server and client, in this process: an impostor never becomes a site, and
    with authentication on, a site absent from the tokens file is refused too."""
    import threading

    from fedmed.errors import FedmedError
    from fedmed.federated.flower import FlowerServer, run_site
    from tests.test_orchestrator import clients

    port = free_port()
    server = FlowerServer(f"127.0.0.1:{port}")
    impostor = clients((20,))[0]  # claims to be site s0
    threading.Thread(target=run_site, args=(impostor, f"127.0.0.1:{port}", None, "guess"), kwargs={"max_wait": 20},
                     daemon=True).start()
    try:
        with pytest.raises(FedmedError, match="never connected: s0"):
            server.accept(["s0"], timeout=8, tokens=tokens)
    finally:
        server.stop([])
    assert reason in caplog.text
