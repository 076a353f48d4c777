"""fedmed as a Flower App: ``flwr run`` starts a federation on a SuperLink; each hospital runs a SuperNode.

- :data:`server_app` composes ``fedmed fit``'s config from the run config's ``config-overrides``
  (Hydra overrides in one string, e.g. ``"experiment=smoke strategy=fedprox"``), waits until a
  SuperNode of every site of ``federation.sites`` has introduced itself, runs the orchestrator
  with a :class:`~fedmed.federated.flower_app.GridSite` per site, and reports as ``fedmed serve``
  does (test metrics, privacy record, summary, MLflow run).
- :data:`client_app` is one hospital's site. Its SuperNode says which:
  ``flower-supernode ... --node-config "site='hospital_a'"``, optionally with the site's own
  ``config-overrides`` (applied after the run's, e.g. where its data is). The site's MLflow run is
  nested under the server's, as with ``fedmed fit site=<name> federation.server=<host:port>``.
"""

from __future__ import annotations

import logging
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fedmed import build, deploy, outcome
from fedmed.config import compose, site_config
from fedmed.data.manifest import read_manifest
from fedmed.errors import FedmedError
from fedmed.federated import SiteClient, Strategy, flower_app
from fedmed.federated.flower_app import GridSite
from fedmed.logs import setup_logging
from fedmed.schema import validate
from fedmed.tracking import RunLog, Tracker, exit_status, run_status

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no phoning home from hospitals

log = logging.getLogger("fedmed")

OVERRIDES = "config-overrides"  # run config and node config: Hydra overrides of `fedmed fit`, in one string
SITE_RUN = "fedmed.site_run"  # context.state: the site's MLflow run id

server_app = ServerApp()
client_app = ClientApp()


def overrides(config: Mapping[str, Any]) -> list[str]:
    """The Hydra overrides a run config or node config carries under ``config-overrides``."""
    return shlex.split(str(config.get(OVERRIDES) or ""))


# -- server ------------------------------------------------------------------------------------
@server_app.main()
def main(grid: Grid, context: Context) -> None:
    setup_logging()
    cfg = compose("fit", overrides(context.run_config))
    validate(cfg, "fit")
    run_federation(grid, cfg)


def run_federation(grid: Grid, cfg: DictConfig) -> dict[str, Any]:
    """Wait for every site of ``federation.sites`` among the grid's nodes, then run the federation."""
    strategy = build.check_settings(cfg, "federated")
    assert strategy is not None
    fed = cfg.federation
    tracker = Tracker(cfg.logger.tracking_uri, cfg.logger.experiment, cfg.logger.artifact_location)
    run_id = tracker.start_run(outcome.run_name(cfg, "federated", strategy=strategy.name),
                               {"dataset": cfg.data.name, "model": cfg.model.name, "mode": "federated",
                                "strategy": strategy.name, "transport": "flower-app",
                                "partition": cfg.partition.dirname, "seed": str(cfg.seed)})
    tracker.log_params(run_id, OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    sites: list[GridSite] = []
    try:
        with run_status(RunLog(tracker, run_id)):
            log.info("waiting for %d sites (%s) among the SuperNodes", len(fed.sites), ", ".join(fed.sites))
            sites = flower_app.accept(grid, list(fed.sites), float(fed.connect_timeout),
                                      {"run_id": run_id, "experiment": cfg.logger.experiment,
                                       "strategy": strategy.name}, fed.site_timeout)
            out = deploy.federate_remote(cfg, strategy, sites, tracker, run_id)
    except BaseException as exc:
        flower_app.finish(grid, sites, exit_status(exc))
        raise
    flower_app.finish(grid, sites, "FINISHED")
    return out


# -- site --------------------------------------------------------------------------------------
@dataclass
class LocalSite:
    """This node's site: its config, its client, the federation's strategy, its manifest."""

    cfg: DictConfig
    client: SiteClient
    strategy: Strategy | None
    manifest: str


def node_config(context: Context) -> DictConfig:
    """``fedmed fit``'s config for this node's site: the run's overrides, then the node's own."""
    site = str(context.node_config.get("site") or "")
    if not site:
        raise FedmedError("this SuperNode names no site: start it with --node-config \"site='<name>'\"")
    cfg = compose("fit", [*overrides(context.run_config), *overrides(context.node_config), f"site={site}"])
    validate(cfg, "fit")
    return cfg


def build_site(cfg: DictConfig, run: RunLog) -> LocalSite:
    """The site's client from its manifest and its copy of the data, as ``fedmed fit site=<name>`` builds it."""
    name, sites = cfg.site.name, list(cfg.federation.sites)
    if name not in sites:
        raise FedmedError(f"site={name} is not in federation.sites {sites}; the server expects exactly those")
    strategy = build.check_settings(cfg, "federated")
    source = instantiate(cfg.data.source)
    source.ensure_available()
    build.write_partition(cfg, source)  # never overwrites: a real site brings its own manifest
    scfg = site_config(cfg, name)
    data = build.site_data(cfg, read_manifest(scfg.manifest), scfg)
    client = build.site_client(cfg, name, sites.index(name), data, run, source.class_names, strategy)
    return LocalSite(cfg, client, strategy, str(scfg.manifest))


def _tracker(cfg: DictConfig) -> Tracker:
    return Tracker(cfg.logger.tracking_uri, cfg.logger.experiment, cfg.logger.artifact_location)


def site_run(cfg: DictConfig, state: RecordDict) -> RunLog:
    """The site's MLflow run, once its hello opened one."""
    if SITE_RUN not in state.config_records:
        return RunLog()
    return RunLog(_tracker(cfg), str(state.config_records[SITE_RUN]["run_id"]))


def _hello(site: LocalSite, content: RecordDict, state: RecordDict) -> RecordDict:
    """Check the server's strategy is this site's, and open the site's run, nested under the server's."""
    hello, name = flower_app.read_hello(content), site.client.name
    theirs, ours = hello.get("strategy"), site.strategy
    if ours is not None and theirs and theirs != ours.name:
        raise FedmedError(f"the server runs strategy={theirs}, this site is configured with strategy={ours.name}; "
                          "use the server's")
    if SITE_RUN not in state.config_records:
        tracker = _tracker(site.cfg)
        run_id = tracker.start_run(name, {"site": name, "dataset": site.cfg.data.name, "role": "site",
                                          "transport": "flower-app"}, parent_id=hello.get("run_id") or None)
        tracker.log_params(run_id, {**site.client.initialize(), "manifest": site.manifest})
        state[SITE_RUN] = ConfigRecord({"run_id": run_id})
    return flower_app.hello_reply(site.client)


def _reply(message: Message, context: Context) -> Message:
    """Build the site, give it what it kept, answer ``message``, keep what it must keep."""
    setup_logging()
    try:
        cfg = node_config(context)
        site = build_site(cfg, site_run(cfg, context.state))
        flower_app.restore_state(site.client, context.state)
        if message.metadata.message_type == flower_app.HELLO:
            content = _hello(site, message.content, context.state)
        else:
            content = flower_app.answer(site.client, message)
        flower_app.keep_state(site.client, context.state)
        return Message(content, reply_to=message)
    except Exception as exc:  # noqa: BLE001 - reported to the server, which leaves this site out
        log.warning("%s failed: %s: %s", message.metadata.message_type, type(exc).__name__, exc)
        return flower_app.error_reply(message, exc)


@client_app.query("hello")
def hello(message: Message, context: Context) -> Message:
    return _reply(message, context)


@client_app.train()
def train(message: Message, context: Context) -> Message:
    return _reply(message, context)


@client_app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    return _reply(message, context)


@client_app.query("public_key")
def public_key(message: Message, context: Context) -> Message:
    return _reply(message, context)


@client_app.query("dropout_correction")
def dropout_correction(message: Message, context: Context) -> Message:
    return _reply(message, context)


@client_app.query("finish")
def finish(message: Message, context: Context) -> Message:
    """The federation is over: end the site's run with the server's status."""
    try:
        site_run(node_config(context), context.state).end(flower_app.read_finish(message.content))
        return Message(RecordDict(), reply_to=message)
    except Exception as exc:  # noqa: BLE001
        return flower_app.error_reply(message, exc)
