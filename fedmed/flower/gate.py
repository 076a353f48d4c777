"""Only the federation's own App runs, at a site and on the aggregator: fedmed is the task executor of
Flower's process isolation.

``fedmed serve`` and ``fedmed fit site=...`` start the SuperLink and the SuperNode with
``--isolation process``: they then run no App themselves, and every task waits until an executor
takes it from their Runtime API. Taking a task needs a shared secret
(``--superexec-auth-secret-file``, a random 32 bytes in a folder only this user can open), so only
the fedmed process that started the component can. What each one runs:

- on the aggregator, :class:`ServerGate` starts Flower's own ``flwr-serverapp`` for the one run
  ``fedmed serve`` submitted, and ends every other run's ServerApp task unrun: an App that someone
  else who reaches the port submits with ``flwr run`` never executes;
- at a hospital, :class:`SiteTasks` answers each ClientApp task in the site's own process, with the
  site it holds (:class:`~fedmed.flower.node.NodeSite`). The run's FAB is never installed or
  executed there; a run whose App is not fedmed's, or other than the run the site joined (but for
  the hello of a resumed server, which must name the same federation), gets an error reply and
  nothing else.
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from flwr.app import Error, Message, RecordDict
from flwr.common.config import get_fab_config
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.interceptors.http.superexec_auth import SuperExecAuthHttpInterceptor
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from fedmed.flower.protocol import HELLO, error_reply
from fedmed.flower.runtime import APP_COMPONENTS, BIN, own_group_ending_with_us

log = logging.getLogger("fedmed")

ACQUIRE = "/flwr.proto.Runtime/AcquireTask"  # the call the shared secret protects


class Secret:
    """A random shared secret in a file only this user can read, removed with :meth:`remove`."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="fedmed-exec-"))  # 0700
        self.path = self.folder / "superexec.secret"
        self.value = secrets.token_bytes(32)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.value)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        self.folder.rmdir()


def _client(address: str, ca_cert: Path | None, interceptors: list) -> RuntimeHttpClient:
    """A Runtime API client without Flower's retry policy: that one blocks while the component is away and
    signals its own process on an authentication error; this process polls again instead."""
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=ca_cert is None,
        root_certificates=ca_cert.read_bytes() if ca_cert is not None else None, interceptors=interceptors)


class _Executor:
    """Takes tasks of one type from a Flower component's Runtime API, with the shared secret."""

    task_type: TaskType

    def __init__(self, address: str, secret: Secret, ca_cert: Path | None = None):
        self.address, self.ca_cert = address, ca_cert
        self.tasks = _client(address, ca_cert, [RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                                                SuperExecAuthHttpInterceptor(master_secret=secret.value,
                                                                             protected_methods={ACQUIRE})])

    def acquire(self) -> tuple[str, Any] | None:
        """(token, task) of the next waiting task, or None (none waiting, or the component is not reachable)."""
        try:
            res = self.tasks.AcquireTask(AcquireTaskRequest(supported_task_types=[self.task_type],
                                                            agentapp_fab_hashes=[]))
        except (httpx.HTTPError, OSError, RuntimeError) as exc:
            log.debug("no task from %s: %s", self.address, exc)
            return None
        return (res.token, res.task) if res.HasField("task") and res.token else None

    def task_client(self, token: str, component: str) -> RuntimeHttpClient:
        return _client(self.address, self.ca_cert, [RuntimeVersionHttpInterceptor(component_name=component),
                                                    RuntimeTokenHttpInterceptor(token)])

    def close(self) -> None:
        self.tasks.close()


class ServerGate(_Executor):
    """On the aggregator: the ServerApp of run ``run_id`` is started (Flower's ``flwr-serverapp``); any other
    run's is ended unrun. :meth:`start` watches in a thread until :meth:`stop`."""

    task_type = TaskType.SERVER_APP

    def __init__(self, address: str, secret: Secret, run_id: int, ca_cert: Path | None = None,
                 poll: float = 0.5, log: Path | None = None):
        super().__init__(address, secret, ca_cert)
        self.run_id, self.poll, self.log = run_id, poll, log  # log: the ServerApp's output (it is also streamed)
        self.process: subprocess.Popen | None = None
        self.refused: list[int] = []  # runs whose ServerApp was not run
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="fedmed-server-gate", daemon=True)

    def start(self) -> ServerGate:
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(self.poll):
            got = self.acquire()
            if got is None:
                continue
            token, task = got
            try:
                self._dispatch(token, task)
            except (httpx.HTTPError, OSError, RuntimeError) as exc:
                log.warning("a ServerApp task could not be dispatched: %s: %s", type(exc).__name__, exc)

    def _dispatch(self, token: str, task: Any) -> None:
        if int(task.run_id) == self.run_id and self.process is None:
            cmd = [str(BIN / "flwr-serverapp"), "--runtime-api-address", self.address, "--token", token,
                   "--parent-pid", str(os.getpid())]
            cmd += ["--root-certificates", str(self.ca_cert)] if self.ca_cert is not None else ["--insecure"]
            # --parent-pid alone lets the ServerApp outlive a killed fedmed serve that its parent has not reaped
            # yet (a zombie's pid still exists): the kernel ends it with us (PR_SET_PDEATHSIG)
            with open(self.log or os.devnull, "ab") as out:
                self.process = subprocess.Popen(cmd, env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}, stdout=out,
                                                stderr=subprocess.STDOUT, preexec_fn=own_group_ending_with_us)
            return
        self.refused.append(int(task.run_id))
        log.warning("refused the ServerApp of Flower run %s: this SuperLink runs only the federation's run %s "
                    "(fedmed serve submitted it)", task.run_id, self.run_id)
        _end(self.task_client(token, "flwr-serverapp"), f"refused by fedmed: only run {self.run_id} runs on this "
                                                          "SuperLink")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.close()


def _end(client: RuntimeHttpClient, why: str) -> None:
    """End a task without running it (best effort)."""
    try:
        push_task_output(client, None, SubStatus.FAILED, why)
    finally:
        client.close()


class SiteTasks(_Executor):
    """At a hospital: each ClientApp task is answered here by ``handle`` (the site's
    :meth:`~fedmed.flower.node.NodeSite.handle`), never by the run's own code.

    Args:
        handle: ``(message type, records) -> records``; what it raises goes back as an error reply.
    """

    task_type = TaskType.CLIENT_APP

    def __init__(self, address: str, secret: Secret, handle: Callable[[str, RecordDict], RecordDict]):
        super().__init__(address, secret)
        self.handle = handle
        self.run_id: int | None = None  # the run this site joined (the first whose hello it answered)

    def serve(self, done: Callable[[], bool], check: Callable[[], None], idle: float = 0.2,
              watch: Callable[[], None] | None = None) -> None:
        """Answer tasks until ``done()``; ``check()`` runs between them (it raises to stop). With ``watch``, each
        task is answered in a worker thread and ``watch()`` runs every second meanwhile (it raises to stop): a
        task whose message the SuperNode can no longer deliver (the server died mid-message) would otherwise
        block this site for ever."""
        while not done():
            check()
            got = self.acquire()
            if got is None:
                time.sleep(idle)
                continue
            if watch is None:
                self._answer_safely(*got)
                continue
            worker = threading.Thread(target=self._answer_safely, args=got, daemon=True, name="fedmed-task")
            worker.start()
            while worker.is_alive():
                worker.join(1.0)
                if worker.is_alive():
                    watch()

    def _answer_safely(self, token: str, task: Any) -> None:
        try:
            self._answer(token, task)
        except (httpx.HTTPError, OSError, RuntimeError) as exc:  # the SuperNode went away mid-task
            log.warning("a task could not be answered: %s: %s", type(exc).__name__, exc)

    def _answer(self, token: str, task: Any) -> None:
        client = self.task_client(token, "flwr-clientapp")
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        try:
            message, context, run, fab = pull_task_input(client)
            kind = message.metadata.message_type
            why = self.refusal(int(run.run_id), fab.content, kind)
            if why is not None:
                log.warning("refused a %s message of Flower run %s: %s", kind, run.run_id, why)
                reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"PermissionError: {why}"),
                                reply_to=message)
            else:
                try:
                    reply = Message(self.handle(kind, message.content), reply_to=message)
                    if kind == HELLO:
                        self.run_id = int(run.run_id)
                except Exception as exc:  # noqa: BLE001 - the server hears of it and leaves this site out
                    reply = error_reply(message, exc)
            push_message(client, reply, context)
            push_task_output(client, context, SubStatus.COMPLETED if why is None else SubStatus.FAILED, why or "")
        finally:
            heartbeat.stop()
            client.close()

    def refusal(self, run_id: int, fab: bytes, kind: str) -> str | None:
        """Why this site does not answer a message of ``run_id`` (None: it answers).

        A hello from another Flower run is passed on: a server resumed after a restart submits a new
        run, and the site checks that it continues the same federation (its MLflow run).
        """
        if self.run_id is not None and run_id != self.run_id and kind != HELLO:
            return f"this site takes part in Flower run {self.run_id} only"
        components = app_components(fab)
        if components != APP_COMPONENTS:
            return f"the run's App is not fedmed's (its components: {components})"
        if self.run_id is None and kind != HELLO:
            return "the server has not introduced itself (query.hello)"
        return None


def app_components(fab: bytes) -> dict[str, str] | None:
    """The ``[tool.flwr.app.components]`` a FAB declares, read by Flower's own FAB reader (None if it has none)."""
    try:
        return dict(get_fab_config(fab)["tool"]["flwr"]["app"]["components"])
    except (KeyError, TypeError, ValueError, zipfile.BadZipFile, UnicodeDecodeError):
        return None
