"""Sites on other machines, through Flower (``flwr``, its gRPC transport, TLS).

Flower carries the calls; fedmed keeps one implementation of everything else. The server side
is the same :class:`~fedmed.federated.orchestrator.Orchestrator` as in-process (sampling, failures,
strategies, secure aggregation, checkpoints), with :class:`FlowerSite` as its transport: each
connected Flower node is one site. The site side is the same
:class:`~fedmed.federated.site.SiteClient`, wrapped as a Flower ``Client`` by
:class:`FlowerSiteApp`.

Every request and answer travels as one blob: ``torch.save`` of plain containers and tensors,
read back with ``torch.load(weights_only=True)`` (no arbitrary pickles from the network).
Weights, compressed updates and masked updates cross bit-exactly.

This uses Flower's gRPC-bidi server and client (``start_grpc_server``, ``start_client``), which
Flower marks deprecated in favour of SuperLink/SuperNode deployments; pinned to ``flwr==1.41.0``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import io
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from fedmed.errors import FedmedError
from fedmed.federated.messages import EvalResult, FitResult
from fedmed.federated.site import SiteClient
from fedmed.privacy.dp import PrivacyBudgetExhausted

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no phoning home from hospitals

log = logging.getLogger("fedmed")

BLOB = "fedmed"  # key / tensor type of the one blob in each Flower message


# -- the wire format -------------------------------------------------------------------------
def _to_wire(obj: Any) -> Any:
    if isinstance(obj, bytes):
        return {"__bytes__": torch.frombuffer(bytearray(obj), dtype=torch.uint8)}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": torch.from_numpy(obj.view(np.int64) if obj.dtype == np.uint64 else obj),
                "dtype": str(obj.dtype)}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"__dataclass__": type(obj).__name__, **{f.name: _to_wire(getattr(obj, f.name))
                                                         for f in dataclasses.fields(obj)}}
    if isinstance(obj, Mapping):
        return {k: _to_wire(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_wire(v) for v in obj)
    return obj


_DATACLASSES = {"FitResult": FitResult, "EvalResult": EvalResult}


def _from_wire(obj: Any) -> Any:
    if isinstance(obj, dict):
        if "__bytes__" in obj:
            return obj["__bytes__"].numpy().tobytes()
        if "__ndarray__" in obj:
            arr = obj["__ndarray__"].numpy()
            return arr.view(np.uint64) if obj["dtype"] == "uint64" else arr
        if "__dataclass__" in obj:
            cls = _DATACLASSES[obj["__dataclass__"]]
            return cls(**{k: _from_wire(v) for k, v in obj.items() if k != "__dataclass__"})
        return {k: _from_wire(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_from_wire(v) for v in obj)
    return obj


def pack(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(_to_wire(obj), buf)
    return buf.getvalue()


def unpack(blob: bytes) -> Any:
    return _from_wire(torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True))


class RemoteSiteError(FedmedError):
    """A site raised while serving a request; ``kind`` is the exception's class name there."""

    def __init__(self, site: str, kind: str, message: str):
        super().__init__(f"{kind} at site {site}: {message}")
        self.kind = kind


# -- site side ---------------------------------------------------------------------------------
def _site_app_class():
    from flwr.client import Client
    from flwr.common import Code, EvaluateRes, FitRes, GetPropertiesRes, Parameters, Status

    ok = Status(code=Code.OK, message="")

    class FlowerSiteApp(Client):
        """One hospital's :class:`SiteClient` as a Flower client: fit, evaluate, and small RPCs."""

        def __init__(self, site: SiteClient, token: str | None = None, on_hello=None):
            self.site, self.token, self.on_hello = site, token, on_hello

        def _answer(self, fn):
            try:
                return {"ok": fn()}
            except Exception as exc:  # noqa: BLE001 - reported to the server, which excludes this site
                log.warning("[%s] request failed: %s: %s", self.site.name, type(exc).__name__, exc)
                return {"error": str(exc), "kind": type(exc).__name__}

        def get_properties(self, ins):
            req = unpack(ins.config[BLOB])
            op = req["op"]
            if op == "hello":
                def hello():
                    if self.on_hello:
                        self.on_hello(req)
                    return {"site": self.site.name, "token": self.token, **self.site.initialize()}
                out = self._answer(hello)
            elif op == "public_key":
                out = self._answer(self.site.public_key)
            elif op == "dropout_correction":
                out = self._answer(lambda: self.site.dropout_correction(req["dropped"], req["round"], req["length"]))
            else:
                out = {"error": f"unknown request {op!r}", "kind": "ValueError"}
            return GetPropertiesRes(status=ok, properties={BLOB: pack(out)})

        def fit(self, ins):
            req = unpack(ins.parameters.tensors[0])
            out = self._answer(lambda: self.site.train(req["weights"], req["round"], req["epochs"], req["config"]))
            n = out["ok"].num_samples if "ok" in out else 0
            return FitRes(status=ok, parameters=Parameters(tensors=[pack(out)], tensor_type=BLOB), num_examples=n,
                          metrics={})

        def evaluate(self, ins):
            req = unpack(ins.parameters.tensors[0])
            out = self._answer(lambda: self.site.evaluate(req["weights"], req["round"], explain=req["explain"]))
            loss = float(out["ok"].metrics.get("loss", 0.0)) if "ok" in out else 0.0
            n = out["ok"].num_samples if "ok" in out else 0
            return EvaluateRes(status=ok, loss=loss, num_examples=n, metrics={BLOB: pack(out)})

    return FlowerSiteApp


def run_site(site: SiteClient, server: str, root_certificate: bytes | None = None, token: str | None = None,
             on_hello=None, max_wait: float | None = 300.0) -> None:
    """Serve ``site`` to the federation server at ``server`` (host:port) until it ends the federation."""
    from flwr.compat.client.app import start_client

    app = _site_app_class()(site, token, on_hello)
    log.info("[%s] connecting to the federation server %s (%s)", site.name, server,
             "TLS" if root_certificate else "no TLS: use only on a trusted network")
    start_client(server_address=server, client=app, root_certificates=root_certificate,
                 insecure=root_certificate is None, max_wait_time=max_wait)


# -- server side -----------------------------------------------------------------------------
class FlowerSite:
    """The orchestrator's transport to one site connected through Flower (sites train concurrently).

    Args:
        proxy: Flower's ``ClientProxy`` for the node.
        name: the site's name (from its hello).
        timeout: seconds to wait for a fit or evaluate answer (None: no limit).
    """

    parallel = True  # each site is its own process: the orchestrator may call several at once

    def __init__(self, proxy, name: str, timeout: float | None = None, info: Mapping | None = None):
        self.proxy, self.name, self.timeout = proxy, name, timeout
        self.info = dict(info or {})  # what the site said when it connected (sample counts)

    def _check(self, out: Mapping) -> Any:
        if "error" in out:
            kind = out.get("kind", "Error")
            if kind == PrivacyBudgetExhausted.__name__:  # the one remote error the round loop acts on
                raise PrivacyBudgetExhausted(f"at site {self.name}: {out['error']}")
            raise RemoteSiteError(self.name, kind, out["error"])
        return out["ok"]

    def call(self, op: str, **kw) -> Any:
        from flwr.common import GetPropertiesIns

        res = self.proxy.get_properties(GetPropertiesIns(config={BLOB: pack({"op": op, **kw})}), self.timeout, None)
        if BLOB not in (res.properties or {}):
            raise RemoteSiteError(self.name, "ConnectionError", f"no answer to {op} ({res.status.message})")
        return self._check(unpack(res.properties[BLOB]))

    def fit(self, weights, round_idx: int, epochs: int, config=None) -> FitResult:
        from flwr.common import FitIns, Parameters

        req = {"weights": dict(weights), "round": round_idx, "epochs": epochs, "config": dict(config or {})}
        res = self.proxy.fit(FitIns(Parameters(tensors=[pack(req)], tensor_type=BLOB), {}), self.timeout, round_idx)
        if not res.parameters.tensors:
            raise RemoteSiteError(self.name, "ConnectionError", f"no update ({res.status.message or 'disconnected'})")
        return self._check(unpack(res.parameters.tensors[0]))

    def evaluate(self, weights, round_idx: int, explain: bool = False) -> EvalResult:
        from flwr.common import EvaluateIns, Parameters

        req = {"weights": dict(weights), "round": round_idx, "explain": explain}
        res = self.proxy.evaluate(EvaluateIns(Parameters(tensors=[pack(req)], tensor_type=BLOB), {}), self.timeout,
                                  round_idx)
        if BLOB not in (res.metrics or {}):
            why = res.status.message or "disconnected"
            raise RemoteSiteError(self.name, "ConnectionError", f"no evaluation ({why})")
        return self._check(unpack(res.metrics[BLOB]))

    def public_key(self) -> bytes:
        return self.call("public_key")

    def dropout_correction(self, dropped, round_idx: int, length: int):
        return self.call("dropout_correction", dropped=dict(dropped), round=round_idx, length=length)

    def state_dict(self) -> dict:
        return {}  # a remote site keeps its own state; a resumed federation restarts it (see README)

    def load_state_dict(self, state) -> None:
        pass


class FlowerServer:
    """Flower's gRPC server with a client manager; :meth:`accept` turns connected nodes into sites.

    Args:
        address: ``host:port`` to listen on.
        certificates: (CA cert, server cert, server key) PEM bytes for TLS, or None.
    """

    def __init__(self, address: str, certificates: tuple[bytes, bytes, bytes] | None = None):
        from flwr.server.client_manager import SimpleClientManager
        from flwr.server.superlink.fleet.grpc_bidi.grpc_server import start_grpc_server

        self.manager = SimpleClientManager()
        self.grpc = start_grpc_server(client_manager=self.manager, server_address=address, certificates=certificates)
        log.info("federation server listening on %s (%s)", address, "TLS" if certificates else "no TLS")

    def accept(self, expected: list[str], timeout: float, site_timeout: float | None = None,
               tokens: Mapping[str, str] | None = None, hello: Mapping | None = None) -> list[FlowerSite]:
        """Wait until every site of ``expected`` has connected and introduced itself; return them in that order.

        A node that names a site outside ``expected``, a site that is already connected, or one
        whose token does not match ``tokens[site]`` is refused (logged) and never sent weights.
        """
        sites: dict[str, FlowerSite] = {}
        seen: set[str] = set()
        deadline = time.monotonic() + timeout
        while len(sites) < len(expected):
            if time.monotonic() > deadline:
                missing = sorted(set(expected) - set(sites))
                raise FedmedError(f"federation.connect_timeout={timeout:g}s passed and these sites never connected: "
                                  f"{', '.join(missing)} (connected: {', '.join(sorted(sites)) or 'none'})")
            for cid, proxy in list(self.manager.all().items()):
                if cid in seen:
                    continue
                seen.add(cid)
                probe = FlowerSite(proxy, cid, timeout=60)
                try:
                    info = probe.call("hello", **dict(hello or {}))
                except Exception as exc:  # noqa: BLE001
                    log.warning("node %s did not introduce itself: %s", cid, exc)
                    continue
                name = info.get("site")
                if name not in expected or name in sites:
                    log.warning("node %s says it is site %r: %s; refused", cid, name,
                                "already connected" if name in sites else f"not one of {expected}")
                    continue
                if tokens is not None:  # authentication on: it fails closed
                    want = tokens.get(name)
                    if want is None:
                        log.warning("site %s has no token in federation.auth.tokens_file; refused", name)
                        continue
                    if not hmac.compare_digest(str(info.get("token") or ""), want):
                        log.warning("site %s presented a wrong token; refused", name)
                        continue
                log.info("site %s connected (%d train / %d val samples)", name, info["num_train"], info["num_val"])
                sites[name] = FlowerSite(proxy, name, site_timeout, info)
            time.sleep(0.2)
        return [sites[n] for n in expected]

    def stop(self, sites: list[FlowerSite]) -> None:
        """Tell the sites the federation is over, then stop listening."""
        from flwr.common import ReconnectIns

        for s in sites:
            with contextlib.suppress(Exception):  # a site already gone
                s.proxy.reconnect(ReconnectIns(seconds=None), 10, None)
        self.grpc.stop(grace=1)
