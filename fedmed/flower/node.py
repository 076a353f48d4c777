"""The site's end of Flower: one hospital's :class:`~fedmed.federated.site.SiteClient` answering
the server's messages.

:class:`NodeSite` turns each message into the site call it asks for (:func:`answer`) and opens
the site's MLflow run at the hello. Started by ``fedmed fit site=<name> federation.server=...``
the site lives in that process, which answers each message itself (:mod:`fedmed.flower.gate`);
on a SuperNode started by hand (``flower-supernode --node-config
"site='hospital_a'"``) :func:`answer_here` builds it for every message, keeping what it carries
between rounds in the node's ``context.state`` (:func:`keep_state`, :func:`restore_state`).
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import ConfigRecord, Context, RecordDict
from hydra.utils import instantiate
from omegaconf import DictConfig

from fedmed import build, contract
from fedmed.config import site_config
from fedmed.errors import FedmedError
from fedmed.federated.site import SiteClient
from fedmed.flower import records
from fedmed.flower.keys import secagg_identity
from fedmed.flower.protocol import (
    ATTEST,
    DROPOUT,
    EVALUATE,
    FINETUNE,
    FINISH,
    HELLO,
    PUBLIC_KEY,
    REFUSED,
    SCORE,
    STATISTICS,
    STYLE,
    TRAIN,
    read_finish,
    read_hello,
)
from fedmed.flower.runtime import OVERRIDES
from fedmed.tracking import RunLog, Tracker

log = logging.getLogger("fedmed")

STATE, KEYS = "fedmed.site_state", "fedmed.secagg_keys"  # what a node keeps in context.state between messages
SITE_RUN = "fedmed.site_run"  # context.state: the site's MLflow run id


class NodeSite:
    """The site end of a SuperNode: answers the server's messages with one :class:`SiteClient`.

    Args:
        client: the site (its ``run`` is opened at the server's hello, nested under the server's run).
        strategy: the strategy this site is configured with (None: it takes the server's).
        tracker: opens the site's MLflow run at the hello.
        params: logged to the site's run with the client's own (e.g. its manifest).
        tags: set on the site's run (e.g. its dataset).
        terms: what this site agrees to (:func:`fedmed.contract.terms`), declared in its hello.
    """

    def __init__(self, client: SiteClient, strategy: str | None, tracker: Callable[[], Tracker],
                 params: Mapping[str, str], tags: Mapping[str, str], terms: Mapping[str, str] | None = None):
        self.client, self.strategy, self.tracker = client, strategy, tracker
        self.params, self.tags, self.terms = dict(params), dict(tags), dict(terms or {})
        self.messages = 0  # how many the server sent
        self.finished: str | None = None  # the server's status, once it said the federation is over
        self.refused: str | None = None  # why the server did not admit this site
        self.federation: str | None = None  # the server's MLflow run this site takes part in (from its hello)

    @property
    def run(self) -> RunLog:
        return self.client.run

    def handle(self, message_type: str, content: RecordDict) -> RecordDict:
        self.messages += 1
        if message_type == HELLO:
            return self._hello(content)
        if message_type == FINISH:
            self.finished = read_finish(content)
            return RecordDict()
        if message_type == REFUSED:
            self.refused = str(content.config_records["refused"]["reason"])
            return RecordDict()
        return answer(self.client, message_type, content)

    def _hello(self, content: RecordDict) -> RecordDict:
        """Check the server's strategy is this site's; open the site's run, nested under the server's."""
        hello, name = read_hello(content), self.client.name
        federation = hello.get("run_id") or ""
        if self.federation is not None and federation != self.federation:
            raise PermissionError(f"this site takes part in federation {self.federation} (MLflow run); a server "
                                  f"running {federation or 'another'} is not answered")
        theirs = hello.get("strategy")
        if self.strategy is not None and theirs and theirs != self.strategy:
            raise FedmedError(f"the server runs strategy={theirs}, this site is configured with "
                              f"strategy={self.strategy}; use the server's")
        if not self.run.active:  # opened only now: sites sharing the server's store find it created
            tracker = self.tracker()
            self.run.tracker = tracker
            self.run.run_id = tracker.start_run(name, {**self.tags, "site": name, "role": "site",
                                                       "transport": "flower"}, parent_id=hello.get("run_id") or None)
            tracker.log_params(self.run.run_id, {**self.client.initialize(), **self.params})
        self.federation = federation
        return hello_reply(self.client, self.terms)


def hello_reply(client: SiteClient, terms: Mapping[str, str] | None = None) -> RecordDict:
    return RecordDict({"hello": ConfigRecord({"site": client.name, **client.initialize(),
                                              **contract.as_hello(terms or {})})})


def _train(client: SiteClient, content: RecordDict) -> RecordDict:
    weights, round_idx, epochs, instructions = records.read_fit_request(content)
    return records.fit_result_records(client.train(weights, round_idx, epochs, instructions))


def _evaluate(client: SiteClient, content: RecordDict) -> RecordDict:
    weights, round_idx, explain = records.read_evaluate_request(content)
    return records.eval_result_records(client.evaluate(weights, round_idx, explain=explain))


def _finetune(client: SiteClient, content: RecordDict) -> RecordDict:
    weights, round_idx, epochs, instructions = records.read_fit_request(content)
    return records.eval_result_records(client.finetune(weights, round_idx, epochs, instructions))


def _score(client: SiteClient, content: RecordDict) -> RecordDict:
    scores = client.score(records.record_state(content.array_records["weights"]))
    out = RecordDict()
    if scores is not None:
        records.put_tree(out, "scores", scores)
    return out


def _statistics(client: SiteClient, content: RecordDict) -> RecordDict:
    features = bool(content.config_records["statistics"].get("features", False))
    weights = records.record_state(content.array_records["weights"]) if "weights" in content.array_records else None
    out = RecordDict()
    secagg = records.get_tree(content, "secagg") if records.has_tree(content, "secagg") else None
    records.put_tree(out, "statistics", client.statistics(weights, features, secagg))
    return out


def _style(client: SiteClient, content: RecordDict) -> RecordDict:
    out = RecordDict()
    records.put_tree(out, "style", client.style())
    return out


def _public_key(client: SiteClient, content: RecordDict) -> RecordDict:
    public, signature = client.public_key(records.config_int(content.config_records["round"], "round"))
    return RecordDict({"key": ConfigRecord({"public": public, "signature": signature})})


def _attest(client: SiteClient, content: RecordDict) -> RecordDict:
    round_idx = records.config_int(content.config_records["round"], "round")
    out = RecordDict()
    records.put_tree(out, "tags", client.attest(round_idx, list(records.get_tree(content, "survivors"))))
    return out


def _dropout_correction(client: SiteClient, content: RecordDict) -> RecordDict:
    cfg, asked = content.config_records["round"], records.get_tree(content, "dropped")
    correction = client.dropout_correction(list(asked["dropped"]), records.config_int(cfg, "round"),
                                           records.config_int(cfg, "length"), list(asked["survivors"]),
                                           dict(asked["tags"]))
    out = RecordDict()
    records.put_tree(out, "correction", correction)
    return out


CALLS: dict[str, Callable[[SiteClient, RecordDict], RecordDict]] = {
    TRAIN: _train, EVALUATE: _evaluate, FINETUNE: _finetune, SCORE: _score, STATISTICS: _statistics,
    STYLE: _style, PUBLIC_KEY: _public_key, ATTEST: _attest, DROPOUT: _dropout_correction}


def answer(client: SiteClient, message_type: str, content: RecordDict) -> RecordDict:
    """The records that answer the server's message (a site call); raises what the call raises."""
    call = CALLS.get(message_type)
    if call is None:
        raise ValueError(f"unknown request {message_type!r}")
    return call(client, content)


def keep_state(client: SiteClient, state: RecordDict) -> None:
    """Keep what the site needs in its next message's process: its state and its secure-aggregation keys."""
    records.put_tree(state, STATE, client.state_dict())
    records.put_tree(state, KEYS, client.channel.secret_state())


def restore_state(client: SiteClient, state: RecordDict) -> None:
    """Give a freshly built site what :func:`keep_state` kept (nothing on its first message)."""
    if records.has_tree(state, STATE):
        client.load_state_dict(records.get_tree(state, STATE))
    if records.has_tree(state, KEYS):
        client.channel.load_secret_state(records.get_tree(state, KEYS))


def build_site(cfg: DictConfig, run: RunLog) -> NodeSite:
    """This hospital's site (``site=<name>``) as the end of its SuperNode's messages: its data decoded from
    its own manifest, its model and trainer, its MLflow run (opened at the server's hello) in ``run``."""
    name, sites = cfg.site.name, list(cfg.federation.sites)  # name is one of sites (fedmed.schema)
    strategy = build.check_settings(cfg, "federated")
    source = instantiate(cfg.data.source)
    source.ensure_available()
    signer, roster = secagg_identity(cfg)
    _, loaded = build.load_sites(cfg, source, [name])  # a real site brings its own manifest, never overwritten
    client = build.site_client(cfg, name, sites.index(name), loaded[name], run, source.class_names, strategy,
                               signer, roster)
    return NodeSite(client, strategy.name if strategy is not None else None,
                    lambda: Tracker(cfg.logger.tracking_uri, cfg.logger.experiment, cfg.logger.artifact_location),
                    {"manifest": str(site_config(cfg, name).manifest), "server": str(cfg.federation.server)},
                    {"dataset": str(cfg.data.name)}, contract.terms(cfg, client.module.net.state_dict()))


# -- a SuperNode started by hand ---------------------------------------------------------------
def overrides(config: Mapping[str, Any]) -> list[str]:
    """The Hydra overrides a run config or node config carries under ``config-overrides``."""
    return shlex.split(str(config.get(OVERRIDES) or ""))


def node_config(context: Context) -> DictConfig:
    """``fedmed fit``'s config for this node's site: the run's overrides, then the node's own."""
    from fedmed.config import compose
    from fedmed.schema import validate

    site = str(context.node_config.get("site") or "")
    if not site:
        raise FedmedError("this SuperNode names no site: start it with --node-config \"site='<name>'\"")
    cfg = compose("fit", [*overrides(context.run_config), *overrides(context.node_config), f"site={site}"])
    validate(cfg, "fit")
    return cfg


def answer_here(message_type: str, content: RecordDict, context: Context) -> RecordDict:
    """Build this node's site, give it what it kept, answer the message, keep what it must keep.

    Flower runs the ClientApp in a fresh process for every message, so the site is built again
    for each one; what it carries between rounds (its state, its masking key, its MLflow run) is
    kept in the node's ``context.state``, on the site's machine.
    """
    cfg = node_config(context)
    run = RunLog()
    if SITE_RUN in context.state.config_records:
        run = RunLog(Tracker(cfg.logger.tracking_uri, cfg.logger.experiment, cfg.logger.artifact_location),
                     str(context.state.config_records[SITE_RUN]["run_id"]))
    node = build_site(cfg, run)
    restore_state(node.client, context.state)
    reply = node.handle(message_type, content)
    keep_state(node.client, context.state)
    if run.run_id is not None:
        context.state[SITE_RUN] = ConfigRecord({"run_id": run.run_id})
    if node.refused is not None:
        log.error("[%s] the server refused this node: %s", node.client.name, node.refused)
    if node.finished is not None:
        run.end(node.finished)
    return reply
