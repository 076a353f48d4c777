"""fedmed as a Flower App (``[tool.flwr.app]`` in pyproject.toml): ``flwr run`` starts a federation on a
SuperLink; each hospital runs a SuperNode.

- :data:`server_app` takes ``fedmed fit``'s config from the run config (``config-file``, written by
  ``fedmed serve``, or ``config-overrides``: Hydra overrides in one string, e.g.
  ``"experiment=smoke strategy=fedprox"``), waits until a SuperNode of every site of
  ``federation.sites`` has introduced itself and runs fedmed's orchestrator over the Grid
  (:func:`fedmed.flower.serve.run_on_grid`).
- :data:`client_app` is one hospital's site on a SuperNode started by hand (``flower-supernode ...
  --node-config "site='hospital_a'"``): it builds the site for each message from the run's
  overrides and the node's own ``config-overrides`` (e.g. where its data is), keeping what it
  carries between rounds in the node's state (:func:`fedmed.flower.node.answer_here`).
  ``fedmed fit site=<name> federation.server=<host:port>`` runs no ClientApp: it answers the
  messages itself (:mod:`fedmed.flower.gate`).

This module imports only Flower at load time: Flower starts a process per message.
"""

from __future__ import annotations

import logging
import os

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no phoning home from hospitals

log = logging.getLogger("fedmed")

server_app = ServerApp()
client_app = ClientApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    from fedmed.flower import serve
    from fedmed.logs import setup_logging

    setup_logging()
    serve.run_on_grid(grid, serve.server_config(context.run_config), context.run_config)


def _reply(message: Message, context: Context) -> Message:
    """Answer ``message`` with this node's site, built here for it."""
    kind = message.metadata.message_type
    try:
        from fedmed.flower import node
        from fedmed.logs import setup_logging

        setup_logging()
        return Message(node.answer_here(kind, message.content, context), reply_to=message)
    except Exception as exc:  # noqa: BLE001 - reported to the server, which leaves this site out
        log.warning("%s failed: %s: %s", kind, type(exc).__name__, exc)
        return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(exc).__name__}: {exc}"), reply_to=message)


# every message a site answers, one handler for all (protocol.py: the types; node.py: the calls)
for _category, _action in (("query", "hello"), ("train", "default"), ("train", "finetune"), ("evaluate", "default"),
                           ("evaluate", "test"), ("query", "public_key"), ("query", "attest"),
                           ("query", "dropout_correction"), ("query", "statistics"), ("query", "style"),
                           ("query", "refused"), ("query", "finish")):
    getattr(client_app, _category)(_action)(_reply)
