"""A hospital's site kept alive between Flower messages.

Flower's SuperNode runs the ClientApp in a fresh process for every message. When a hospital
starts its site with ``fedmed fit site=<name> federation.server=<host:port>``, that command builds
the site once (data decoded, model built, Lightning loaded) and keeps it, with everything it
carries between rounds, in memory; the SuperNode it starts names this relay in its node config
(``fedmed-relay``), and each ClientApp process hands its message's records to the site through
it and returns the answer.

The relay is a Unix domain socket in a folder only this user can open (mode 0700, made by
``tempfile.mkdtemp``); records cross it in Flower's own protobuf serialisation, bit for bit, one
length-prefixed request and one reply per connection. A site that raises answers with the
exception's kind and text, which the ClientApp turns into Flower's error reply.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import struct
import tempfile
from collections.abc import Callable

from flwr.app import ConfigRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

NODE_CONFIG_KEY = "fedmed-relay"  # the SuperNode's node config: where its site listens
_TYPE, _ERROR = "fedmed.relay.type", "fedmed.relay.error"
_HEADER = struct.Struct("!Q")


class RelayError(Exception):
    """The site raised ``kind``: ``text`` (``ConnectionError``: it could not be reached)."""

    def __init__(self, kind: str, text: str):
        super().__init__(f"{kind}: {text}")
        self.kind, self.text = kind, text


def _send(sock: socket.socket, records: RecordDict) -> None:
    data = recorddict_to_proto(records).SerializeToString()
    sock.sendall(_HEADER.pack(len(data)) + data)


def _exactly(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise ConnectionError(f"the other end closed after {got} of {n} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _recv(sock: socket.socket) -> RecordDict:
    (n,) = _HEADER.unpack(_exactly(sock, _HEADER.size))
    proto = ProtoRecordDict()
    proto.ParseFromString(_exactly(sock, n))
    return recorddict_from_proto(proto)


def ask(path: str, message_type: str, content: RecordDict, timeout: float | None = None) -> RecordDict:
    """Hand one message to the site listening at ``path`` and return its answer; raise :class:`RelayError`."""
    request = RecordDict(dict(content.items()))
    request[_TYPE] = ConfigRecord({"type": message_type})
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            _send(sock, request)
            reply = _recv(sock)
    except OSError as exc:
        raise RelayError("ConnectionError", f"the site's fedmed process at {path} is not answering "
                         f"({type(exc).__name__}: {exc})") from None
    if _ERROR in reply.config_records:
        error = reply.config_records[_ERROR]
        raise RelayError(str(error["kind"]), str(error["text"]))
    return reply


class SiteRelay:
    """Where a long-lived site answers its SuperNode's ClientApp processes.

    Args:
        handle: ``(message type, records) -> records``, the site's answer; what it raises goes back
            as an error reply (``BaseException`` other than ``Exception``, e.g. a stop request, ends
            :meth:`serve` instead).
    """

    def __init__(self, handle: Callable[[str, RecordDict], RecordDict]):
        self.handle = handle
        self.folder = tempfile.mkdtemp(prefix="fedmed-site-")  # 0700: only this user reaches the socket
        self.path = os.path.join(self.folder, "site.sock")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.path)
        self._sock.listen(8)
        self._sock.settimeout(0.5)

    def serve(self, done: Callable[[], bool], check: Callable[[], None] = lambda: None) -> None:
        """Answer requests until ``done()``; ``check()`` runs between them (it raises to stop, e.g. if
        the SuperNode process died)."""
        while not done():
            check()
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(None)
                self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        try:
            request = _recv(conn)
        except (OSError, ValueError):
            return  # a ClientApp process that died mid-request: it gets no answer, its SuperNode reports it
        kind = str(request.config_records[_TYPE]["type"]) if _TYPE in request.config_records else ""
        if _TYPE in request.config_records:
            del request[_TYPE]
        try:
            reply = self.handle(kind, request)
        except Exception as exc:  # noqa: BLE001 - the server hears of it and leaves this site out
            reply = RecordDict({_ERROR: ConfigRecord({"kind": type(exc).__name__, "text": str(exc)})})
        with contextlib.suppress(OSError):  # the ClientApp process is gone; its SuperNode tells the server
            _send(conn, reply)

    def close(self) -> None:
        self._sock.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> SiteRelay:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
