"""A hospital's site on Flower's deployment runtime: ``fedmed fit site=<name> federation.server=<host:port>``.

:func:`join_federation` builds the site once (its data decoded, its model and trainer set up),
starts a SuperNode for it with ``site=<name>`` in its node config, and answers every message the
server sends itself (:mod:`fedmed.flower.gate`) until the server ends the federation.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fedmed.errors import FedmedError
from fedmed.flower import runtime
from fedmed.flower.gate import Secret, SiteTasks
from fedmed.flower.keys import existing_file, tls_files
from fedmed.flower.node import NodeSite, build_site
from fedmed.tracking import RunLog, run_status

log = logging.getLogger("fedmed")

NOT_ACTIVATED = "Failed to activate SuperNode"  # Flower: the SuperLink does not (yet) know this node's key
UNREACHABLE = "Connection attempt failed"  # Flower: the SuperLink cannot be reached (e.g. it is restarting)
PROBE = 5.0  # seconds between two looks at whether the server's port answers


def join_federation(cfg: DictConfig) -> dict[str, Any]:
    """``fedmed fit site=<name> federation.server=<host:port>``: this hospital's site, until the server ends.

    The site is built once (its data decoded, its model and trainer set up); a SuperNode is started
    for it in process isolation, and every message the server sends it is answered here, by this
    process (:class:`~fedmed.flower.gate.SiteTasks`): no App's code runs at the site.
    """
    name = cfg.site.name
    tls = tls_files(cfg, server=False)
    key = existing_file(cfg.federation.auth.get("private_key"), "federation.auth.private_key")
    if key is not None and tls is None:
        raise FedmedError("federation.auth.private_key needs federation.tls.ca_cert: Flower authenticates "
                          "SuperNodes only over TLS")
    run = RunLog()  # opened at the server's hello, nested under the server's run
    node = build_site(cfg, run)
    port, secret = runtime.free_port(), Secret()
    tasks = SiteTasks(f"127.0.0.1:{port}", secret, node.handle)
    with run_status(run):
        def start() -> runtime.Process:
            return runtime.supernode(str(cfg.federation.server), {"site": name}, tls.ca_cert if tls else None, key,
                                     _supernode_log(cfg, name), port, secret.path)

        keeper = _Keeper(name, start, float(cfg.federation.connect_timeout), node, str(cfg.federation.server))
        log.info("[%s] SuperNode started for %s; waiting for the server (%s)", name, cfg.federation.server,
                 "TLS" + (", authenticated" if key else "") if tls else "no TLS")
        try:
            tasks.serve(lambda: node.finished is not None or node.refused is not None, keeper.check,
                        watch=keeper.watch)
            time.sleep(1.5)  # the SuperNode delivers the last answer before it stops
        finally:
            keeper.proc.stop()
            tasks.close()
            secret.remove()
        if node.refused is not None:
            raise FedmedError(f"the server refused this node: {node.refused}")
        if node.finished != "FINISHED":
            raise FedmedError(f"the server ended the federation as {node.finished}; see the server's log")
    log.info("[%s] the federation server ended the federation", name)
    return {"mode": "site", "site": name, "run_id": run.run_id}


def _supernode_log(cfg: DictConfig, name: str) -> Path:
    folder = Path(cfg.paths.output_dir) / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"supernode-{name}-{os.getpid()}.log"


class _Keeper:
    """This site's SuperNode, kept running until the federation ends.

    Between two messages it checks the SuperNode. One that gave up reaching the SuperLink (exit
    status 0 or SIGINT, or Flower's "Connection attempt failed", e.g. while the aggregator restarts to
    ``resume=``) or was not yet known to it
    (Flower's "Failed to activate SuperNode": the SuperLink is up but has not registered the key
    yet) is started again, for up to ``connect_timeout`` seconds without a message; then, or if it
    failed otherwise (a bad key file, a bad certificate), the site ends with its reason.

    A SuperNode keeps retrying a SuperLink that is gone, so the server's port is also probed every
    :data:`PROBE` seconds: when it has not answered for ``connect_timeout`` seconds (the server was
    killed or stopped), the site ends and its run is marked FAILED.
    """

    def __init__(self, name: str, start, connect_timeout: float, node: NodeSite, server: str):
        self.name, self.start, self.timeout, self.node, self.server = name, start, connect_timeout, node, server
        self.proc: runtime.Process = start()
        self.seen, self.lost = node.messages, time.monotonic()  # lost: since when no message has come
        self.waiting = True  # for the first message, or for the SuperLink again
        self.refused_key = ""  # Flower's last "not activated" reason, if any
        self.probed = 0.0  # when the server's port was last probed
        self.unreachable: float | None = None  # since when it has not answered

    def _server_gone(self, now: float) -> bool:
        if now - self.probed < PROBE:
            return False
        self.probed = now
        if runtime.reachable(self.server):
            self.unreachable = None
            return False
        if self.unreachable is None:
            self.unreachable = now
        return now - self.unreachable > self.timeout

    def watch(self) -> None:
        """While a message is being answered: only whether the server is gone (then the site ends)."""
        now = time.monotonic()
        if self._server_gone(now):
            self._give_up(f"is gone: {self.server} has not answered for {now - (self.unreachable or now):.0f}s")

    def check(self) -> None:
        now = time.monotonic()
        if self.node.messages != self.seen:
            self.seen, self.waiting = self.node.messages, False
        if self._server_gone(now):
            self._give_up(f"is gone: {self.server} has not answered for {now - (self.unreachable or now):.0f}s")
        code = self.proc.proc.poll()
        if code is None:
            if self.waiting and now - self.lost > self.timeout:
                self._give_up("never reached this site" if not self.node.run.active
                              else "has not reached this site again")
            return
        reason = self.proc.last_line()
        if NOT_ACTIVATED in reason:
            self.refused_key = reason
        # 0 or SIGINT: the SuperNode gave up reaching the SuperLink (Flower ends it either way; it runs
        # in its own process group, so a Ctrl-C at the terminal does not reach it)
        if code not in (0, -signal.SIGINT) and NOT_ACTIVATED not in reason and UNREACHABLE not in reason:
            self.proc.check()  # raises with the SuperNode's reason
        if not self.waiting:
            self.waiting, self.lost = True, now
        if now - self.lost > self.timeout:
            if NOT_ACTIVATED in reason:
                raise FedmedError(f"the SuperLink did not accept this SuperNode's key within federation.connect_"
                                  f"timeout={self.timeout:g}s ({reason}); the server must list this site's public "
                                  "key in federation.auth.supernode_keys")
            self._give_up(f"could not be reached again ({reason})")
        log.warning("[%s] the SuperNode stopped (%s); starting it again", self.name, reason)
        time.sleep(2)
        self.proc = self.start()

    def _give_up(self, what: str) -> None:
        if self.refused_key and not self.node.run.active:
            raise FedmedError(f"the SuperLink did not accept this SuperNode's key within federation.connect_"
                              f"timeout={self.timeout:g}s ({self.refused_key}); the server must list this site's "
                              "public key in federation.auth.supernode_keys")
        raise FedmedError(f"federation.connect_timeout={self.timeout:g}s passed and the server {what} "
                          f"(SuperNode log: {self.proc.log})")
