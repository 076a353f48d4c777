"""What fedmed's server and sites say to each other over Flower: message types, hellos, error replies.

Message types: ``query.hello`` (which site a node is, its sample counts), ``train``,
``train.finetune`` (personalisation after the federation), ``evaluate``, ``query.public_key``,
``query.attest`` and ``query.dropout_correction`` (secure aggregation's unmasking),
``evaluate.test`` (the final model on a site's own test images), ``query.statistics`` (a site's
training images per class, and per-class feature moments of a model: only what the site agreed to share),
``query.style`` (a site's mean low-frequency amplitude spectrum, where it agreed to share it),
``query.refused`` (why a node is not admitted) and ``query.finish`` (the federation is over).

A site that raises answers with an error reply naming the exception's kind, which the server
raises again as :class:`RemoteSiteError` (``PrivacyBudgetExhausted`` as itself), so the
orchestrator treats a remote site's failure as an in-process one's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from flwr.app import ConfigRecord, Error, Message, RecordDict
from flwr.common.constant import ErrorCode

from fedmed.errors import FedmedError
from fedmed.privacy.dp import PrivacyBudgetExhausted

HELLO, TRAIN, EVALUATE, FINETUNE = "query.hello", "train", "evaluate", "train.finetune"
PUBLIC_KEY, DROPOUT, FINISH = "query.public_key", "query.dropout_correction", "query.finish"
ATTEST = "query.attest"  # secure aggregation: a survivor's tags over the survivor set
SCORE = "evaluate.test"  # the final model on the site's own test images (numbers only)
STATISTICS = "query.statistics"  # class counts / per-class feature moments (fedmed.federated.statistics)
STYLE = "query.style"  # a site's mean low-frequency amplitude spectrum (fedmed.data.style)
REFUSED = "query.refused"  # the server tells a node why it is not admitted (it is sent nothing else)

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



def hello_request(hello: Mapping[str, str]) -> RecordDict:
    return RecordDict({"hello": ConfigRecord({k: str(v) for k, v in hello.items()})})


def read_hello(content: RecordDict) -> dict[str, str]:
    return {k: str(v) for k, v in content.config_records["hello"].items()}


def finish_request(status: str) -> RecordDict:
    return RecordDict({"finish": ConfigRecord({"status": status})})


def read_finish(content: RecordDict) -> str:
    return str(content.config_records["finish"]["status"])
