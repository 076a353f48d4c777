"""The server's end of Flower: each site is a SuperNode of the ServerApp's ``Grid``.

:class:`GridSite` is the orchestrator's transport to one SuperNode: every call is one Flower
``Message`` to that node and its reply, carried as records (:mod:`fedmed.flower.records`).
:func:`accept` admits the federation's sites among the grid's nodes; :func:`finish` tells them
the federation is over. A node Flower reports gone is a ``ConnectionError``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedmed import contract
from fedmed.errors import FedmedError
from fedmed.federated.messages import EvalResult, FitResult
from fedmed.flower import records
from fedmed.flower.keys import public_key_der
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
    RemoteSiteError,
    finish_request,
    hello_request,
    reply_error,
)

log = logging.getLogger("fedmed")

POLL = 0.25  # seconds between two looks for replies at the SuperLink
RETRY = 5.0  # seconds before a refused node is asked again who it is


def exchange(grid: Grid, messages: Sequence[Message], timeout: float | None) -> dict[int, Message]:
    """Send ``messages`` and wait for their replies: {position: reply} (a message left out got none in time)."""
    pending = {mid: i for i, mid in enumerate(grid.push_messages(list(messages))) if mid}
    replies: dict[int, Message] = {}
    deadline = None if timeout is None else time.monotonic() + timeout
    while pending:
        for reply in grid.pull_messages(list(pending)):
            i = pending.pop(reply.metadata.reply_to_message_id, None)
            if i is not None:
                replies[i] = reply
        if not pending or (deadline is not None and time.monotonic() > deadline):
            break
        time.sleep(POLL)
    return replies


# -- server side -------------------------------------------------------------------------------
class GridSite:
    """The orchestrator's transport to one site, a SuperNode of the ``grid`` (sites run concurrently).

    Args:
        grid: the ``Grid`` the ServerApp was given.
        node_id: the site's SuperNode.
        name: the site's name (from its hello).
        timeout: seconds to wait for an answer (None: until it comes, or Flower reports the node gone).
        info: what the site said in its hello (sample counts).
    """

    parallel = True

    def __init__(self, grid: Grid, node_id: int, name: str, timeout: float | None = None,
                 info: Mapping[str, Any] | None = None):
        self.grid, self.node_id, self.name, self.timeout = grid, node_id, name, timeout
        self.info = dict(info or {})

    def ask(self, message_type: str, content: RecordDict, group: str = "") -> RecordDict:
        """Send one message to the site and return its reply's records; raise what an error reply stands for."""
        reply = exchange(self.grid, [Message(content, self.node_id, message_type, group_id=group)], self.timeout).get(0)
        if reply is None:
            raise RemoteSiteError(self.name, "TimeoutError", f"no answer to {message_type} within {self.timeout:g}s")
        if reply.has_error():
            raise reply_error(self.name, reply.error)
        return reply.content

    def fit(self, weights: Mapping[str, torch.Tensor], round_idx: int, epochs: int,
            instructions: Mapping[str, Any] | None = None) -> FitResult:
        content = self.ask(TRAIN, records.fit_request(weights, round_idx, epochs, instructions), str(round_idx))
        result = self._own(records.records_fit_result(content))
        declared = self.info.get("num_train")
        n = result.num_samples  # it weighs the site's update: at most the training images it declared
        if declared is not None and not (isinstance(n, int) and not isinstance(n, bool) and 0 < n <= int(declared)):
            raise RemoteSiteError(self.name, "ValueError", f"num_samples={n!r}, but it declared {declared} training "
                                  "images in its hello")
        return result

    def evaluate(self, weights: Mapping[str, torch.Tensor], round_idx: int, explain: bool = False) -> EvalResult:
        content = self.ask(EVALUATE, records.evaluate_request(weights, round_idx, explain), str(round_idx))
        return self._own(records.records_eval_result(content))

    def finetune(self, weights: Mapping[str, torch.Tensor], round_idx: int, epochs: int,
                 instructions: Mapping[str, Any] | None = None) -> EvalResult:
        content = self.ask(FINETUNE, records.fit_request(weights, round_idx, epochs, instructions), str(round_idx))
        return self._own(records.records_eval_result(content))

    def score(self, weights: Mapping[str, torch.Tensor]) -> dict[str, Any] | None:
        content = self.ask(SCORE, RecordDict({"weights": records.state_record(weights)}), "final")
        return records.get_tree(content, "scores") if records.has_tree(content, "scores") else None

    def statistics(self, weights: Mapping[str, torch.Tensor] | None, features: bool,
                   secagg: Mapping[str, Any] | None = None) -> dict[str, Any]:
        content = RecordDict({"statistics": ConfigRecord({"features": bool(features)})})
        if weights is not None:
            content["weights"] = records.state_record(weights)
        if secagg is not None:
            records.put_tree(content, "secagg", dict(secagg))
        stats = records.get_tree(self.ask(STATISTICS, content, "statistics"), "statistics")
        if not isinstance(stats, dict):
            raise RemoteSiteError(self.name, "ValueError", "its statistics are not a mapping")
        return self._own_stats(stats)

    def style(self) -> dict[str, Any]:
        answer = records.get_tree(self.ask(STYLE, RecordDict(), "style"), "style")
        if not isinstance(answer, dict):
            raise RemoteSiteError(self.name, "ValueError", "its style spectrum is not a mapping")
        return self._own_stats(answer)

    def _own_stats(self, stats: dict[str, Any]) -> dict[str, Any]:
        if stats.get("site") != self.name:
            raise RemoteSiteError(self.name, "ValueError", f"answered as site {stats.get('site')!r}")
        return stats

    def _own(self, result):
        if result.site != self.name:  # the round loop goes by these names (secure aggregation's dropouts)
            raise RemoteSiteError(self.name, "ValueError", f"answered as site {result.site!r}")
        return result

    def public_key(self, round_idx: int) -> tuple[bytes, bytes]:
        asked = RecordDict({"round": ConfigRecord({"round": round_idx})})
        key = self.ask(PUBLIC_KEY, asked, str(round_idx)).config_records["key"]
        public, signature = key.get("public"), key.get("signature", b"")
        if not isinstance(public, bytes) or not isinstance(signature, bytes):
            raise RemoteSiteError(self.name, "ValueError", "its masking key or signature is not bytes")
        return public, signature

    def attest(self, round_idx: int, survivors: list[str]) -> dict[str, bytes]:
        content = RecordDict({"round": ConfigRecord({"round": round_idx})})
        records.put_tree(content, "survivors", list(survivors))
        return dict(records.get_tree(self.ask(ATTEST, content, str(round_idx)), "tags"))

    def dropout_correction(self, dropped: list[str], round_idx: int, length: int, survivors: list[str],
                           tags: Mapping[str, bytes]) -> np.ndarray:
        content = RecordDict({"round": ConfigRecord({"round": round_idx, "length": length})})
        records.put_tree(content, "dropped", {"dropped": list(dropped), "survivors": list(survivors),
                                              "tags": dict(tags)})
        return records.get_tree(self.ask(DROPOUT, content, str(round_idx)), "correction")

    def state_dict(self) -> dict[str, Any]:
        return {}  # a remote site keeps its own state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


def accept(grid: Grid, expected: list[str], timeout: float, hello: Mapping[str, str],
           site_timeout: float | None = None, keys: Mapping[str, bytes] | None = None,
           terms: Mapping[str, str] | None = None) -> list[GridSite]:
    """Wait until every site of ``expected`` is a node of the grid that introduced itself; return them in that order.

    Every new node is asked which site it is (``query.hello``). A node is refused, told why
    (``query.refused``) and never sent weights if it names a site outside ``expected`` or one
    already taken, if its hello fails, with ``keys`` (site -> the public key its SuperNode must
    authenticate with, PEM or OpenSSH) if its key is not the one of the site it names, and with
    ``terms`` (:func:`fedmed.contract.terms`) if it declared other terms. A refused node is asked
    again after :data:`RETRY` seconds: Flower keeps a node's id for its key, so the real site may
    come back on it (with the right ``site=``).
    """
    sites: dict[str, GridSite] = {}
    nodes: dict[int, Any] = {}
    refused: dict[int, float] = {}  # node -> when it was refused
    pending: dict[str, int] = {}  # hello message id -> node
    deadline = time.monotonic() + timeout
    while len(sites) < len(expected):
        now = time.monotonic()
        if now > deadline:
            missing = sorted(set(expected) - set(sites))
            raise FedmedError(f"federation.connect_timeout={timeout:g}s passed and these sites never connected: "
                              f"{', '.join(missing)} (connected: {', '.join(sorted(sites)) or 'none'})")
        for nid in [n for n, at in refused.items() if now - at > RETRY and n not in pending.values()]:
            del refused[nid], nodes[nid]
        new = [n for n in grid.get_nodes() if n.node_id not in nodes]
        nodes.update({n.node_id: n for n in new})
        if new:
            messages = [Message(hello_request(hello), n.node_id, HELLO) for n in new]
            pushed = zip(grid.push_messages(messages), [n.node_id for n in new], strict=True)
            pending.update({mid: nid for mid, nid in pushed if mid})
        refusals = []
        for reply in grid.pull_messages(list(pending)) if pending else []:
            nid = pending.pop(reply.metadata.reply_to_message_id)
            info = _introduction(nid, reply)
            if info is None:
                refused[nid] = time.monotonic()
                continue
            name, why = str(info.get("site")), _refusal(info, expected, sites, nodes[nid], keys, terms)
            if why is None:
                log.info("site %s connected (%s train / %s val samples)", name, info.get("num_train"),
                         info.get("num_val"))
                sites[name] = GridSite(grid, nid, name, site_timeout, info)
            else:
                refused[nid] = time.monotonic()
                log.warning("node %s says it is site %r: %s; refused", nid, name, why)
                refusals.append(Message(RecordDict({"refused": ConfigRecord({"reason": f"site {name}: {why}"})}),
                                        nid, REFUSED))
        if refusals:
            grid.push_messages(refusals)  # best effort: the node ends with the reason; no reply awaited
        time.sleep(POLL)
    return [sites[n] for n in expected]


def _introduction(nid: int, reply: Message) -> dict[str, Any] | None:
    """What a node said in its hello, or None (logged) if it erred or said nothing usable."""
    if reply.has_error():
        log.warning("node %s did not introduce itself: %s", nid, reply.error.reason)
        return None
    if "hello" not in reply.content.config_records:
        log.warning("node %s answered its hello with something else; refused", nid)
        return None
    return dict(reply.content.config_records["hello"])


def _refusal(info: Mapping[str, Any], expected: list[str], sites: Mapping[str, GridSite], node: Any,
             keys: Mapping[str, bytes] | None, terms: Mapping[str, str] | None) -> str | None:
    """Why a node that says it is site ``info["site"]`` is refused (None: it is admitted)."""
    name = str(info.get("site"))
    if name not in expected:
        return f"not one of {expected}"
    if name in sites:
        return "already connected"
    if keys is not None:
        theirs = bytes(getattr(node, "public_key", b"") or b"")
        if not theirs:
            return "its SuperNode did not authenticate with a key (the SuperLink must run with --enable-supernode-auth)"
        if public_key_der(theirs) != public_key_der(keys[name]):
            owner = next((s for s, k in keys.items() if public_key_der(k) == public_key_der(theirs)), None)
            return (f"its SuperNode's key is the one of site {owner}" if owner else
                    f"its SuperNode's key is not the one configured for {name} (federation.auth.supernode_keys)")
    for key in ("num_train", "num_val"):
        value = info.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if key == "num_train" else 0):
            return f"its hello says {key}={value!r}"
    if terms is not None:
        return contract.first_difference(terms, contract.declared(info))
    return None


def finish(grid: Grid, sites: Sequence[GridSite], status: str, timeout: float = 60) -> None:
    """Tell the sites the federation is over (they end their own runs with ``status``); best effort."""
    if not sites:
        return
    replies = exchange(grid, [Message(finish_request(status), s.node_id, FINISH) for s in sites], timeout)
    for i, s in enumerate(sites):
        if i not in replies or replies[i].has_error():
            log.warning("site %s did not confirm the end of the federation", s.name)


