"""Flower's deployment runtime as processes: a SuperLink, SuperNodes, and fedmed's app submitted with ``flwr run``.

``fedmed serve`` starts a :func:`superlink`, registers each site's SuperNode key with it
(:meth:`Control.register`) and submits fedmed's Flower App (:meth:`Control.run`); ``fedmed fit
site=<name> federation.server=<host:port>`` starts a :func:`supernode` for its site. The
commands are Flower's own (``flower-superlink``, ``flower-supernode``, ``flwr``) from this Python
environment, so a hospital IT team can run the same ones by hand (docs: Deployment).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedmed.errors import FedmedError

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ERROR = re.compile(r"ERROR|Error|Failed|failed|refused|denied|Exit Code")
BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode and flwr of this environment
CONNECTION = "fedmed"  # the flwr CLI's name for the SuperLink fedmed serve started
# the App's run config (``[tool.flwr.app.config]``): the config fedmed serve wrote, or Hydra overrides in one
# string (flwr run by hand); where the ServerApp writes its result; whether the sites' data is on this machine
CONFIG_FILE, RESULT_FILE, LOCAL_DATA, OVERRIDES = "config-file", "result-file", "local-data", "config-overrides"
#: what fedmed's App runs: the only App a site started by fedmed answers (fedmed.flower.gate)
APP_COMPONENTS = {"serverapp": "fedmed.flower.app:server_app", "clientapp": "fedmed.flower.app:client_app"}

APP_PYPROJECT = """[project]
name = "fedmed-app"
version = "1.0.0"
description = "fedmed's federation as a Flower App"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedmed"

[tool.flwr.app.components]
serverapp = "fedmed.flower.app:server_app"
clientapp = "fedmed.flower.app:client_app"

[tool.flwr.app.config]
config-overrides = ""
config-file = ""
result-file = ""
local-data = ""
"""


def own_group_ending_with_us() -> None:
    """In the child, before exec: its own process group (stopped as one), and on Linux a SIGTERM when
    the fedmed process that started it dies, even by SIGKILL, so no SuperLink or SuperNode outlives it."""
    os.setsid()
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class Tls:
    """PEM files: the CA every side trusts, and (SuperLink only) its certificate and key."""

    ca_cert: Path
    server_cert: Path | None = None
    server_key: Path | None = None


class Process:
    """One Flower process in its own process group, its output in ``log`` (or this terminal)."""

    def __init__(self, name: str, cmd: Sequence[str], log: Path | None = None, env: Mapping[str, str] | None = None,
                 cwd: Path | None = None):
        self.name, self.log = name, log
        out = log.open("a") if log is not None else None  # a restarted process goes on in the same log
        try:
            self.proc = subprocess.Popen([str(BIN / cmd[0]), *cmd[1:]], stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0", **(env or {})},
                                         cwd=cwd, preexec_fn=own_group_ending_with_us)
        finally:
            if out is not None:
                out.close()

    def check(self) -> None:
        """Raise if the process has ended, with the last line it wrote."""
        code = self.proc.poll()
        if code is not None:
            raise FedmedError(f"{self.name} exited with status {code}: {self.last_line()}")

    def last_line(self) -> str:
        """Its last error line (else its last line), and where its log is."""
        if self.log is None or not self.log.exists():
            return "see its output above"
        lines = [_ANSI.sub("", line).strip(" \0") for line in self.log.read_text(errors="replace").splitlines()]
        lines = [line for line in lines if any(c.isalnum() for c in line)]
        errors = [line for line in lines if _ERROR.search(line)]
        said = (errors or lines or ["it wrote nothing"])[-1]
        return f"{said} (log: {self.log})"

    def stop(self, grace: float = 15) -> None:
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


def reachable(address: str, timeout: float = 2) -> bool:
    """Whether something listens at ``address`` (host:port)."""
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection(("127.0.0.1" if host in ("0.0.0.0", "") else host.strip("[]"), int(port)),
                                      timeout=timeout):
            return True
    except OSError:
        return False


def _wait_for_port(proc: Process, address: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.check()
        if reachable(address, timeout=1):
            return
        time.sleep(0.3)
    raise FedmedError(f"{proc.name} did not open {address} within {timeout:g}s: {proc.last_line()}")


def superlink(address: str, home: Path, tls: Tls | None, supernode_auth: bool, log: Path | None = None,
              secret: Path | None = None) -> Process:
    """Start ``flower-superlink`` on ``address`` (host:port: Fleet and Control API) and wait until it listens.

    The SuperLink runs the ServerApp from this environment (no dependency installation at run time).
    With ``secret`` it runs in process isolation: no App runs until an executor holding the secret
    takes its task (:class:`fedmed.flower.gate.ServerGate`).
    """
    host, port = address.rsplit(":", 1)
    cmd = ["flower-superlink", "--host", host, "--port", port, "--disable-runtime-dependency-installation",
           "--database", str(home / "superlink.db")]
    if secret is not None:
        cmd += ["--isolation", "process", "--superexec-auth-secret-file", str(secret)]
    if tls is None:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.server_cert),
                "--ssl-keyfile", str(tls.server_key)]
    if supernode_auth:
        cmd.append("--enable-supernode-auth")
    home.mkdir(parents=True, exist_ok=True)
    proc = Process("flower-superlink", cmd, log, {"FLWR_HOME": str(home)}, cwd=home)
    _wait_for_port(proc, address)
    return proc


def node_config(values: Mapping[str, str]) -> str:
    """``--node-config`` text: ``key='value'`` pairs (values are quoted TOML strings)."""
    for k, v in values.items():
        if any(c in str(v) for c in "'\"\n"):
            raise FedmedError(f"node config {k}={v!r}: quotes and newlines are not allowed")
    return " ".join(f"{k}='{v}'" for k, v in values.items())


def supernode(superlink_address: str, values: Mapping[str, str], ca_cert: Path | None, private_key: Path | None,
              log: Path | None = None, runtime_port: int | None = None, secret: Path | None = None) -> Process:
    """Start ``flower-supernode`` connected to ``superlink_address``, with ``values`` as its node config.

    ``ca_cert``: TLS to the SuperLink (else ``--insecure``); ``private_key``: the node's SuperNode
    authentication key (OpenSSH EC private key, its public half registered at the SuperLink).
    ``runtime_port``: its Runtime API on loopback; with ``secret`` it runs in process isolation (no
    App runs but what an executor holding the secret answers: :class:`fedmed.flower.gate.SiteTasks`).
    """
    cmd = ["flower-supernode", "--superlink", superlink_address, "--host", "127.0.0.1",
           "--port", str(runtime_port or free_port()), "--node-config", node_config(values)]
    if secret is not None:
        cmd += ["--isolation", "process", "--superexec-auth-secret-file", str(secret)]
    cmd += ["--root-certificates", str(ca_cert)] if ca_cert is not None else ["--insecure"]
    if private_key is not None:
        cmd += ["--auth-supernode-private-key", str(private_key)]
    return Process("flower-supernode", cmd, log)


class Control:
    """The ``flwr`` CLI pointed at one SuperLink (its own ``FLWR_HOME`` with one connection)."""

    def __init__(self, address: str, home: Path, ca_cert: Path | None):
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        host, port = address.rsplit(":", 1)
        self.target = f"127.0.0.1:{port}" if host in ("0.0.0.0", "") else address  # where this machine reaches it
        security = f'root-certificates = "{ca_cert}"' if ca_cert is not None else "insecure = true"
        (home / "config.toml").write_text(f'[superlink.{CONNECTION}]\naddress = "{self.target}"\n{security}\n')

    def _flwr(self, args: Sequence[str], timeout: float = 120) -> dict:
        env = {**os.environ, "FLWR_HOME": str(self.home), "FLWR_TELEMETRY_ENABLED": "0"}
        out = subprocess.run([str(BIN / "flwr"), *args, "--format", "json"], env=env, cwd=self.home,
                             capture_output=True, text=True, timeout=timeout)
        text = out.stdout[out.stdout.find("{"):] if "{" in out.stdout else ""
        try:
            answer = json.loads(text) if text else {}
        except json.JSONDecodeError:
            answer = {}
        if out.returncode != 0 or answer.get("success") is False:
            reason = answer.get("error-message") or (out.stderr or out.stdout).strip().splitlines()[-1:] or ["?"]
            raise FedmedError(f"flwr {args[0]} {args[1] if len(args) > 1 else ''}: {reason}")
        return answer

    def register(self, public_key: Path, name: str) -> None:
        """Register a SuperNode's public key under ``name`` (fedmed's site name)."""
        self._flwr(["supernode", "register", str(public_key), CONNECTION, "--name", name])

    def run(self, app: Path, run_config: Mapping[str, str]) -> str:
        """Submit the app in folder ``app`` with ``run_config``; returns the run id."""
        config = " ".join(f"{k}={json.dumps(str(v))}" for k, v in run_config.items())
        return str(self._flwr(["run", str(app), CONNECTION, "--run-config", config])["run-id"])

    def status(self, run_id: str) -> str:
        (run,) = self._flwr(["list", CONNECTION, "--run-id", run_id])["runs"]
        return str(run["status"])

    def stream_log(self, run_id: str) -> Process:
        """``flwr log <run> --stream``: the run's ServerApp log, on this terminal, while it runs."""
        return Process("flwr log", ["flwr", "log", run_id, CONNECTION, "--stream"],
                       env={"FLWR_HOME": str(self.home)}, cwd=self.home)

    def wait(self, run_id: str, check, poll: float = 5, ended=lambda: False) -> str:
        """Wait until the run is finished; ``check()`` runs every half second (it raises if the SuperLink
        died). The run's status is asked every ``poll`` seconds (each look starts the flwr CLI, about a
        second of CPU), and at once when ``ended()`` says the ServerApp has exited."""
        last = 0.0
        while True:
            check()
            now = time.monotonic()
            if ended() or now - last >= poll:
                last = now
                status = self.status(run_id)
                if status.startswith("finished"):
                    return status
            time.sleep(0.5)


def write_app(folder: Path) -> Path:
    """fedmed's Flower App as a folder ``flwr run`` can submit (its code is the installed fedmed)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(APP_PYPROJECT)
    return folder
