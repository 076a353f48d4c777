"""Who a site is, cryptographically: its SuperNode key signs its masking keys; peers check them against the roster.

The roster is ``federation.auth.supernode_keys`` (site -> public key file), the list the operator
already keeps to register the sites' SuperNodes; each site gets the same list. The private key is
the site's own SuperNode key (``federation.auth.private_key``, ``ssh-keygen -t ecdsa -b 384``).
Keys are EC (ECDSA with SHA-384) or Ed25519, in OpenSSH or PEM form.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fedmed.errors import FedmedError

_ECDSA = ec.ECDSA(hashes.SHA384())


def load_public(key: bytes):
    """A public key from OpenSSH (``ecdsa-...``, ``ssh-ed25519 ...``), PEM or DER bytes."""
    text = key.strip()
    if text.startswith((b"ecdsa-", b"ssh-")):
        return serialization.load_ssh_public_key(text)
    if text.startswith(b"-----"):
        return serialization.load_pem_public_key(text)
    return serialization.load_der_public_key(key)


def public_key_der(key: bytes) -> bytes:
    """A public key (PEM, as Flower keeps it, OpenSSH, as ``flwr supernode register`` reads it, or DER) as DER."""
    return load_public(key).public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


class Signer:
    """A site's private key, which signs what the site vouches for.

    Args:
        private: the key file's bytes (OpenSSH or PEM, unencrypted).
    """

    def __init__(self, private: bytes):
        text = private.strip()
        key = (serialization.load_ssh_private_key(text, None) if b"OPENSSH PRIVATE KEY" in text
               else serialization.load_pem_private_key(text, None))
        if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
            raise ValueError(f"a {type(key).__name__}: expected an EC or Ed25519 key")
        self._key = key
        self.public_der = key.public_key().public_bytes(serialization.Encoding.DER,
                                                        serialization.PublicFormat.SubjectPublicKeyInfo)

    @classmethod
    def from_file(cls, path: Path, key: str) -> Signer:
        try:
            return cls(Path(path).read_bytes())
        except (OSError, ValueError, TypeError) as exc:
            raise FedmedError(f"{key}={path}: not a private key this site can sign with ({exc})") from None

    def sign(self, message: bytes) -> bytes:
        if isinstance(self._key, ec.EllipticCurvePrivateKey):
            return self._key.sign(message, _ECDSA)
        return self._key.sign(message)


def verify(public: bytes, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``public``'s over ``message`` (False for any malformed input)."""
    try:
        key = load_public(public)
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, message, _ECDSA)
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, message)
        else:
            return False
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def roster_from_files(files: Mapping[str, Path]) -> dict[str, bytes]:
    """Site -> its public key (DER), from the roster's files."""
    return {site: public_key_der(Path(path).read_bytes()) for site, path in files.items()}
