"""Signing an audit bundle's manifest with a key the operator keeps (Ed25519, offline).

    keygen(Path("keys/audit"))              # keys/audit.key (private, 0600) + keys/audit.pub
    sig = sign(manifest_bytes, Path("keys/audit.key"))
    verify_signature(manifest_bytes, sig, Path("keys/audit.pub").read_bytes())   # True / False

Keys are PEM files (PKCS#8 private key, SubjectPublicKeyInfo public key) that OpenSSL reads too:
``openssl pkey -in audit.key -pubout`` gives the public key. A key's *fingerprint* is the SHA-256
of its raw 32 public bytes, as hex: what an auditor compares with the fingerprint the operator
published. Uses :mod:`cryptography` only.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from pipeline.core.errors import LesionflowError

PRIVATE_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub"
ALGORITHM = "Ed25519"


class SigningError(LesionflowError):
    """A key file that is missing, unreadable or not an Ed25519 key, or a key pair that would
    overwrite an existing one."""


def keygen(stem: Path | str) -> tuple[Path, Path]:
    """A new key pair: ``<stem>.key`` (private, readable by its owner only) and ``<stem>.pub``.
    Refuses to overwrite either file. Returns both paths."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    stem = Path(stem)
    private, public = stem.with_name(stem.name + PRIVATE_SUFFIX), stem.with_name(stem.name + PUBLIC_SUFFIX)
    for path in (private, public):
        if path.exists():
            raise SigningError(f"{path}: already exists; a key is never overwritten (choose another name)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    private.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    public.write_bytes(public_pem(key.public_key()))
    return private, public


def public_pem(public_key) -> bytes:
    """The PEM (SubjectPublicKeyInfo) of a public key."""
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def private_key(path: Path):
    """The Ed25519 private key in the PEM file ``path``, or :class:`SigningError` naming it."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as exc:
        raise SigningError(f"{path}: cannot read the signing key ({exc.strerror or exc})") from None
    except (ValueError, TypeError) as exc:
        raise SigningError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{path}: an {type(key).__name__}, not an {ALGORITHM} key (lesionflow audit keygen)")
    return key


def load_public(pem: bytes, where: str = "public key"):
    """An Ed25519 public key from its PEM bytes; ``where`` names its file in the error."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"{where}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningError(f"{where}: an {type(key).__name__}, not an {ALGORITHM} key")
    return key


def fingerprint(public_key) -> str:
    """The SHA-256 of the key's raw public bytes, hex."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def sign(data: bytes, private_key_file: Path | str) -> dict[str, str]:
    """``{"algorithm", "signature" (base64), "public_key" (PEM), "fingerprint"}`` of ``data``."""
    key = private_key(Path(private_key_file))
    return {
        "algorithm": ALGORITHM,
        "signature": base64.b64encode(key.sign(data)).decode("ascii"),
        "public_key": public_pem(key.public_key()).decode("ascii"),
        "fingerprint": fingerprint(key.public_key()),
    }


def verify_signature(data: bytes, signature_b64: str, public_key_pem: bytes, where: str = "public key") -> bool:
    """Whether ``signature_b64`` is a valid signature of ``data`` by the key ``public_key_pem``."""
    from cryptography.exceptions import InvalidSignature

    key = load_public(public_key_pem, where)
    try:
        key.verify(base64.b64decode(signature_b64, validate=True), data)
    except (InvalidSignature, ValueError):
        return False
    return True
