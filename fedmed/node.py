"""A site on a SuperNode started by hand (``flower-supernode --node-config "site='hospital_a'"``).

Flower runs the ClientApp in a fresh process for every message, so here the site is built again
for each one, from ``fedmed fit``'s config (the run's ``config-overrides``, then the node's own,
then ``site=<name>``), and what it carries between rounds (its state, its masking key, its MLflow
run) is kept in the node's ``context.state``, on the site's machine. ``fedmed fit site=<name>
federation.server=<host:port>`` avoids the rebuilding: it holds the site in memory behind a relay.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Mapping
from typing import Any

from flwr.app import ConfigRecord, Context, RecordDict
from hydra.utils import instantiate
from omegaconf import DictConfig

from fedmed import build, deploy
from fedmed.config import compose, site_config
from fedmed.errors import FedmedError
from fedmed.federated import flower_app
from fedmed.logs import setup_logging
from fedmed.schema import validate
from fedmed.tracking import RunLog, Tracker

log = logging.getLogger("fedmed")

SITE_RUN = "fedmed.site_run"  # context.state: the site's MLflow run id


def overrides(config: Mapping[str, Any]) -> list[str]:
    """The Hydra overrides a run config or node config carries under ``config-overrides``."""
    return shlex.split(str(config.get(deploy.OVERRIDES) or ""))


def node_config(context: Context) -> DictConfig:
    """``fedmed fit``'s config for this node's site: the run's overrides, then the node's own."""
    site = str(context.node_config.get("site") or "")
    if not site:
        raise FedmedError("this SuperNode names no site: start it with --node-config \"site='<name>'\"")
    cfg = compose("fit", [*overrides(context.run_config), *overrides(context.node_config), f"site={site}"])
    validate(cfg, "fit")
    return cfg


def answer_here(message_type: str, content: RecordDict, context: Context) -> RecordDict:
    """Build this node's site, give it what it kept, answer the message, keep what it must keep."""
    setup_logging()
    cfg = node_config(context)
    name, sites = cfg.site.name, list(cfg.federation.sites)
    if name not in sites:
        raise FedmedError(f"site={name} is not in federation.sites {sites}; the server expects exactly those")
    strategy = build.check_settings(cfg, "federated")
    source = instantiate(cfg.data.source)
    source.ensure_available()
    _, loaded = build.load_sites(cfg, source, [name])  # a real site brings its own manifest, never overwritten
    run = RunLog()
    if SITE_RUN in context.state.config_records:
        run = RunLog(Tracker(cfg.logger.tracking_uri, cfg.logger.experiment, cfg.logger.artifact_location),
                     str(context.state.config_records[SITE_RUN]["run_id"]))
    client = build.site_client(cfg, name, sites.index(name), loaded[name], run, source.class_names, strategy)
    node = deploy.local_node(cfg, client, strategy.name if strategy is not None else None,
                             str(site_config(cfg, name).manifest))
    flower_app.restore_state(client, context.state)
    reply = node.handle(message_type, content)
    flower_app.keep_state(client, context.state)
    if run.run_id is not None:
        context.state[SITE_RUN] = ConfigRecord({"run_id": run.run_id})
    if node.refused is not None:
        log.error("[%s] the server refused this node: %s", name, node.refused)
    if node.finished is not None:
        run.end(node.finished)
    return reply
