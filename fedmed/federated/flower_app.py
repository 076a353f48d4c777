"""Sites reached through Flower's deployment runtime (SuperLink, SuperNodes, a ``Grid``).

The server side is :class:`GridSite`, the orchestrator's transport to one SuperNode: every call
is one Flower ``Message`` to that node and its reply, carried as records
(:mod:`fedmed.federated.records`). The site side is :func:`answer`, which turns one message into
the :class:`~fedmed.federated.site.SiteClient` call it asks for. A site that raises answers with an
error reply naming the exception's kind, which :class:`GridSite` raises again on the server as
:class:`RemoteSiteError` (``PrivacyBudgetExhausted`` as itself), so the orchestrator treats a
remote site's failure as an in-process one's. A node Flower reports gone is a ``ConnectionError``.

Flower runs a ``ClientApp`` in a fresh process for each message, so what a site keeps between
rounds (:meth:`SiteClient.state_dict` and its secure-aggregation key) is kept in the node's
``context.state`` (:func:`keep_state`, :func:`restore_state`); it stays on the site's machine.

Message types: ``query.hello`` (which site a node is, its sample counts), ``train``,
``evaluate``, ``query.public_key``, ``query.attest`` and ``query.dropout_correction`` (secure
aggregation's unmasking), ``query.refused`` (why a node is not admitted) and ``query.finish``
(the federation is over).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import ConfigRecord, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedmed.errors import FedmedError
from fedmed.federated import records
from fedmed.federated.messages import EvalResult, FitResult
from fedmed.federated.site import SiteClient
from fedmed.privacy.dp import PrivacyBudgetExhausted
from fedmed.privacy.secagg import MaskingKey
from fedmed.tracking import RunLog, Tracker

log = logging.getLogger("fedmed")

HELLO, TRAIN, EVALUATE = "query.hello", "train", "evaluate"
PUBLIC_KEY, DROPOUT, FINISH = "query.public_key", "query.dropout_correction", "query.finish"
ATTEST = "query.attest"  # secure aggregation: a survivor's tags over the survivor set
REFUSED = "query.refused"  # the server tells a node why it is not admitted (it is sent nothing else)
POLL = 0.25  # seconds between two looks for replies at the SuperLink
STATE, KEY = "fedmed.site_state", "fedmed.masking_key"  # what a node keeps in context.state between messages

_OURS = re.compile(r"(\w+): (.*)", re.S)  # "Kind: message", from error_reply
_FLOWERS = re.compile(r"<class '(?:[\w.]*\.)?(\w+)'>:<'?(.*?)'?>", re.S)  # an exception that escaped a handler


class RemoteSiteError(FedmedError):
    """A site answered with an error; ``kind`` names the exception it raised (``ConnectionError``: none came)."""

    def __init__(self, site: str, kind: str, message: str):
        super().__init__(f"{kind} at site {site}: {message}")
        self.kind = kind


# -- replies and errors ------------------------------------------------------------------------
def error_reply(message: Message, exc: BaseException) -> Message:
    """The reply that tells the server ``exc`` happened, with its kind."""
    return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(exc).__name__}: {exc}"), reply_to=message)


def reply_error(site: str, error: Error) -> FedmedError:
    """The exception a site's error reply stands for."""
    reason = error.reason or ""
    found = _FLOWERS.fullmatch(reason) or _OURS.fullmatch(reason)
    if error.code != ErrorCode.CLIENT_APP_RAISED_EXCEPTION or found is None:
        return RemoteSiteError(site, "ConnectionError", f"Flower error {error.code}: {reason or 'no reason given'}")
    kind, text = found.group(1), found.group(2)
    if kind == PrivacyBudgetExhausted.__name__:  # the one remote error the round loop acts on
        return PrivacyBudgetExhausted(f"at site {site}: {text}")
    return RemoteSiteError(site, kind, text)


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
        return self._own(records.records_fit_result(content))

    def evaluate(self, weights: Mapping[str, torch.Tensor], round_idx: int, explain: bool = False) -> EvalResult:
        content = self.ask(EVALUATE, records.evaluate_request(weights, round_idx, explain), str(round_idx))
        return self._own(records.records_eval_result(content))

    def _own(self, result):
        if result.site != self.name:  # the round loop goes by these names (secure aggregation's dropouts)
            raise RemoteSiteError(self.name, "ValueError", f"answered as site {result.site!r}")
        return result

    def public_key(self) -> bytes:
        key = self.ask(PUBLIC_KEY, RecordDict()).config_records["key"]["public"]
        if not isinstance(key, bytes):
            raise RemoteSiteError(self.name, "ValueError", "its public key is not bytes")
        return key

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


def hello_request(hello: Mapping[str, str]) -> RecordDict:
    return RecordDict({"hello": ConfigRecord({k: str(v) for k, v in hello.items()})})


def accept(grid: Grid, expected: list[str], timeout: float, hello: Mapping[str, str],
           site_timeout: float | None = None, keys: Mapping[str, bytes] | None = None) -> list[GridSite]:
    """Wait until every site of ``expected`` is a node of the grid that introduced itself; return them in that order.

    Every new node is asked which site it is (``query.hello``). A node is refused, told why
    (``query.refused``) and never sent weights if it names a site outside ``expected`` or one
    already taken, if its hello fails, or, with ``keys`` (site -> the public key its SuperNode
    must authenticate with, PEM or OpenSSH), if its key is not the one of the site it names.
    """
    sites: dict[str, GridSite] = {}
    nodes: dict[int, Any] = {}
    pending: dict[str, int] = {}  # hello message id -> node
    deadline = time.monotonic() + timeout
    while len(sites) < len(expected):
        if time.monotonic() > deadline:
            missing = sorted(set(expected) - set(sites))
            raise FedmedError(f"federation.connect_timeout={timeout:g}s passed and these sites never connected: "
                              f"{', '.join(missing)} (connected: {', '.join(sorted(sites)) or 'none'})")
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
                continue
            name, why = str(info.get("site")), _refusal(info, expected, sites, nodes[nid], keys)
            if why is None:
                log.info("site %s connected (%s train / %s val samples)", name, info.get("num_train"),
                         info.get("num_val"))
                sites[name] = GridSite(grid, nid, name, site_timeout, info)
            else:
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


def public_key_der(key: bytes) -> bytes:
    """A public key (PEM, as Flower keeps it, or OpenSSH, as ``flwr supernode register`` reads it) as DER."""
    text = key.strip()
    loaded = (serialization.load_ssh_public_key(text) if text.startswith(b"ecdsa-") or text.startswith(b"ssh-")
              else serialization.load_pem_public_key(text))
    return loaded.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _refusal(info: Mapping[str, Any], expected: list[str], sites: Mapping[str, GridSite], node: Any,
             keys: Mapping[str, bytes] | None) -> str | None:
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
    return None


def finish(grid: Grid, sites: Sequence[GridSite], status: str, timeout: float = 60) -> None:
    """Tell the sites the federation is over (they end their own runs with ``status``); best effort."""
    if not sites:
        return
    content = RecordDict({"finish": ConfigRecord({"status": status})})
    replies = exchange(grid, [Message(content, s.node_id, FINISH) for s in sites], timeout)
    for i, s in enumerate(sites):
        if i not in replies or replies[i].has_error():
            log.warning("site %s did not confirm the end of the federation", s.name)


# -- site side ---------------------------------------------------------------------------------
class NodeSite:
    """The site end of a SuperNode: answers the server's messages with one :class:`SiteClient`.

    Args:
        client: the site (its ``run`` is opened at the server's hello, nested under the server's run).
        strategy: the strategy this site is configured with (None: it takes the server's).
        tracker: opens the site's MLflow run at the hello.
        params: logged to the site's run with the client's own (e.g. its manifest).
        tags: set on the site's run (e.g. its dataset).
    """

    def __init__(self, client: SiteClient, strategy: str | None, tracker: Callable[[], Tracker],
                 params: Mapping[str, str], tags: Mapping[str, str]):
        self.client, self.strategy, self.tracker = client, strategy, tracker
        self.params, self.tags = dict(params), dict(tags)
        self.messages = 0  # how many the server sent
        self.finished: str | None = None  # the server's status, once it said the federation is over
        self.refused: str | None = None  # why the server did not admit this site

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
        return hello_reply(self.client)


def read_hello(content: RecordDict) -> dict[str, str]:
    return {k: str(v) for k, v in content.config_records["hello"].items()}


def hello_reply(client: SiteClient) -> RecordDict:
    return RecordDict({"hello": ConfigRecord({"site": client.name, **client.initialize()})})


def read_finish(content: RecordDict) -> str:
    return str(content.config_records["finish"]["status"])


def _train(client: SiteClient, content: RecordDict) -> RecordDict:
    weights, round_idx, epochs, instructions = records.read_fit_request(content)
    return records.fit_result_records(client.train(weights, round_idx, epochs, instructions))


def _evaluate(client: SiteClient, content: RecordDict) -> RecordDict:
    weights, round_idx, explain = records.read_evaluate_request(content)
    return records.eval_result_records(client.evaluate(weights, round_idx, explain=explain))


def _public_key(client: SiteClient, content: RecordDict) -> RecordDict:
    return RecordDict({"key": ConfigRecord({"public": client.public_key()})})


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
    TRAIN: _train, EVALUATE: _evaluate, PUBLIC_KEY: _public_key, ATTEST: _attest, DROPOUT: _dropout_correction}


def answer(client: SiteClient, message_type: str, content: RecordDict) -> RecordDict:
    """The records that answer the server's message (a site call); raises what the call raises."""
    call = CALLS.get(message_type)
    if call is None:
        raise ValueError(f"unknown request {message_type!r}")
    return call(client, content)


def keep_state(client: SiteClient, state: RecordDict) -> None:
    """Keep what the site needs in its next message's process: its state and its masking key."""
    records.put_tree(state, STATE, client.state_dict())
    key = client.channel._key
    if key is not None:
        raw = key._private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                         serialization.NoEncryption())
        state[KEY] = ConfigRecord({"private": raw})


def restore_state(client: SiteClient, state: RecordDict) -> None:
    """Give a freshly built site what :func:`keep_state` kept (nothing on its first message)."""
    if records.has_tree(state, STATE):
        client.load_state_dict(records.get_tree(state, STATE))
    if KEY in state.config_records:
        raw = state.config_records[KEY]["private"]
        assert isinstance(raw, bytes)
        key = MaskingKey.__new__(MaskingKey)
        key._private = X25519PrivateKey.from_private_bytes(raw)
        key.public = key._private.public_key().public_bytes(serialization.Encoding.Raw,
                                                            serialization.PublicFormat.Raw)
        client.channel._key = key
