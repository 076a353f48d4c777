"""Who may take part: TLS files and the sites' SuperNode keys, from ``federation.tls`` and ``federation.auth``."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fedmed.errors import FedmedError
from fedmed.flower.runtime import Tls
from fedmed.privacy.identity import Signer, public_key_der, roster_from_files

log = logging.getLogger("fedmed")

LOOPBACK = ("127.0.0.1", "localhost", "::1")  # a server address that never leaves this machine


def existing_file(path: str | None, what: str) -> Path | None:
    if not path:
        return None
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise FedmedError(f"{what}={path}: no such file")
    return p.resolve()


def tls_files(cfg: DictConfig, server: bool) -> Tls | None:
    """``federation.tls`` as files (the server needs all three, a site the CA), or None (no TLS)."""
    tls = cfg.federation.tls
    keys = ("ca_cert", "server_cert", "server_key") if server else ("ca_cert",)
    given = {k: tls.get(k) for k in keys}
    if not any(given.values()):
        return None
    missing = [k for k, v in given.items() if not v]
    if missing:
        raise FedmedError(f"TLS needs federation.tls.{', federation.tls.'.join(keys)}; missing {missing}")
    files = {k: existing_file(v, f"federation.tls.{k}") for k, v in given.items()}
    return Tls(files["ca_cert"], files.get("server_cert"), files.get("server_key"))  # type: ignore[arg-type]


def supernode_keys(cfg: DictConfig) -> dict[str, Path] | None:
    """Site -> its SuperNode's public key file, from ``federation.auth.supernode_keys`` (None: no node auth)."""
    given = cfg.federation.auth.get("supernode_keys")
    if not given:
        return None
    sites = list(cfg.federation.sites)
    keys = {str(k): v for k, v in OmegaConf.to_container(given).items()}  # type: ignore[union-attr]
    unknown, missing = sorted(set(keys) - set(sites)), [s for s in sites if s not in keys]
    if unknown or missing:
        raise FedmedError(f"federation.auth.supernode_keys must name exactly the sites {sites}: "
                          + "; ".join(p for p in (f"not sites: {unknown}" if unknown else "",
                                                  f"missing: {missing}" if missing else "") if p))
    out = {s: existing_file(v, f"federation.auth.supernode_keys.{s}") for s, v in keys.items()}
    for s, path in out.items():
        try:
            public_key_der(path.read_bytes())  # type: ignore[union-attr]
        except ValueError as exc:
            raise FedmedError(f"federation.auth.supernode_keys.{s}={path}: not a public key ({exc})") from None
    return out  # type: ignore[return-value]


def check_security(cfg: DictConfig, tls: Tls | None, keys: Mapping[str, Path] | None) -> None:
    if keys is not None and tls is None:
        raise FedmedError("federation.auth.supernode_keys needs TLS (federation.tls.*): Flower authenticates "
                          "SuperNodes only over TLS")
    host = str(cfg.federation.server).rsplit(":", 1)[0]
    if tls is None and host not in LOOPBACK:
        log.warning("federation.server=%s without TLS: updates cross the network in the clear and any node can "
                    "join; set federation.tls.* and federation.auth.supernode_keys", cfg.federation.server)



def secagg_identity(cfg: DictConfig) -> tuple[Signer | None, dict[str, bytes] | None]:
    """This site's signer and the federation's roster, for secure aggregation across machines.

    Without them a lying server could hand the site masking keys it made itself; so off loopback a
    site refuses to start with ``privacy.secure_aggregation`` and no ``federation.auth.private_key``
    (its SuperNode key) and ``federation.auth.supernode_keys`` (every site's public key).
    """
    if not cfg.privacy.secure_aggregation:
        return None, None
    name = str(cfg.site.name)
    key = existing_file(cfg.federation.auth.get("private_key"), "federation.auth.private_key")
    files = supernode_keys(cfg)
    if key is None or files is None:
        if str(cfg.federation.server).rsplit(":", 1)[0] in LOOPBACK:
            log.warning("[%s] privacy.secure_aggregation on loopback without federation.auth keys: masking keys are "
                        "not signed, so the sites trust the server to relay them (across machines this is refused)",
                        name)
            return None, None
        raise FedmedError("privacy.secure_aggregation across machines needs, at every site, "
                          "federation.auth.private_key (its SuperNode key signs its masking keys) and "
                          "federation.auth.supernode_keys (every site's public key, to check theirs); without them the "
                          "server could hand this site masking keys it made")
    signer = Signer.from_file(key, "federation.auth.private_key")
    roster = roster_from_files(files)
    if roster.get(name) != signer.public_der:
        raise FedmedError(f"federation.auth.private_key={key} is not the key federation.auth.supernode_keys.{name} "
                          "names; the other sites would refuse this site's masking keys")
    return signer, roster
