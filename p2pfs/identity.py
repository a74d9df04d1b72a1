"""Node identity: an Ed25519 key in the node home, its self-signed certificate, and NodeIds.

A NodeId is BLAKE3-256 of the raw 32-byte Ed25519 public key. It names a node everywhere
(tickets, the DHT, logs); the certificate only exists because TLS wants one, so nothing in
it is trusted except the public key, and the key's possession is proven by TLS itself
(server side) or by a signature on the authentication stream (client side).
"""

from __future__ import annotations

import base64
import datetime
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import blake3
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

from p2pfs.errors import AuthenticationError, RemoteProtocolError, StorageError

logger = logging.getLogger(__name__)

NODE_ID_LEN = 32
NODE_ID_TEXT_LEN = 52
PUBLIC_KEY_LEN = 32
SIGNATURE_LEN = 64
KEY_FILE = "node.key"
CERT_FILE = "node.crt"
# Bound a peer's certificate before the parser sees it: ours are ~300 bytes.
MAX_CERTIFICATE_LEN = 4096

_B32_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyz234567")
# Validity is not checked by anyone (identity is the key, not the dates); fixed dates make the
# certificate a pure function of the key, and 9999-12-31 is RFC 5280's "no expiry".
_NOT_BEFORE = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
_NOT_AFTER = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)


@dataclass(frozen=True, slots=True, order=True)
class NodeId:
    """BLAKE3-256 of a node's raw Ed25519 public key; ``str()`` is 52 chars of base32."""

    raw: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.raw, bytes) or len(self.raw) != NODE_ID_LEN:
            raise RemoteProtocolError(f"a NodeId is {NODE_ID_LEN} bytes")

    def __str__(self) -> str:
        return base64.b32encode(self.raw).decode("ascii").rstrip("=").lower()

    def __repr__(self) -> str:
        return f"NodeId({str(self)[:12]}…)"

    def short(self) -> str:
        """A prefix for logs; never for identity decisions."""
        return str(self)[:12]

    @classmethod
    def from_public_key(cls, public_key: bytes) -> NodeId:
        if len(public_key) != PUBLIC_KEY_LEN:
            raise RemoteProtocolError(f"an Ed25519 public key is {PUBLIC_KEY_LEN} bytes")
        return cls(blake3.blake3(public_key).digest())


def node_id_untrusted(text: str) -> NodeId:
    """Parse the 52-char lowercase base32 form; anything else is RemoteProtocolError."""
    if not isinstance(text, str) or len(text) != NODE_ID_TEXT_LEN:
        raise RemoteProtocolError(f"a NodeId is {NODE_ID_TEXT_LEN} base32 characters")
    if not _B32_ALPHABET.issuperset(text):
        raise RemoteProtocolError(f"not a NodeId (lowercase base32 expected): {text!r}")
    raw = base64.b32decode(text.upper() + "====")
    node_id = NodeId(raw)
    # 52 chars carry 260 bits for 256: the 4 spare bits must be zero, or two spellings
    # would name one node.
    if str(node_id) != text:
        raise RemoteProtocolError(f"not a canonical NodeId: {text!r}")
    return node_id


@dataclass(frozen=True, slots=True)
class Identity:
    """A node's private key, its certificate (DER and PEM) and its NodeId."""

    private_key: Ed25519PrivateKey
    certificate_der: bytes
    node_id: NodeId

    @property
    def public_key(self) -> bytes:
        return self.private_key.public_key().public_bytes_raw()

    @property
    def certificate_pem(self) -> bytes:
        cert = x509.load_der_x509_certificate(self.certificate_der)
        return cert.public_bytes(serialization.Encoding.PEM)

    @property
    def private_key_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)

    @classmethod
    def from_private_key(cls, key: Ed25519PrivateKey) -> Identity:
        node_id = NodeId.from_public_key(key.public_key().public_bytes_raw())
        return cls(key, _self_signed_certificate(key, node_id), node_id)

    @classmethod
    def generate(cls) -> Identity:
        """A fresh in-memory identity (tests, benchmarks); nodes use :func:`load_identity`."""
        return cls.from_private_key(Ed25519PrivateKey.generate())


def load_identity(home: Path) -> Identity:
    """Load the node key from ``home`` (creating key and certificate on first use)."""
    home.mkdir(parents=True, exist_ok=True)
    key_path = home / KEY_FILE
    cert_path = home / CERT_FILE
    if key_path.exists():
        key = _read_private_key(key_path)
    else:
        key = Ed25519PrivateKey.generate()
        _write_atomic(key_path, Identity.from_private_key(key).private_key_pem)
        logger.info("created node key %s", key_path)
    identity = Identity.from_private_key(key)
    if not cert_path.exists() or cert_path.read_bytes() != identity.certificate_pem:
        # The certificate is derived from the key; rewriting it heals a missing or stale file.
        _write_atomic(cert_path, identity.certificate_pem)
    return identity


def public_key_from_certificate_untrusted(der: bytes) -> bytes:
    """The raw Ed25519 public key of a peer's DER certificate; AuthenticationError otherwise."""
    if not isinstance(der, bytes) or not der or len(der) > MAX_CERTIFICATE_LEN:
        raise AuthenticationError("peer certificate missing or oversized")
    try:
        cert = x509.load_der_x509_certificate(der)
        key = cert.public_key()
    except ValueError as exc:
        raise AuthenticationError(f"peer certificate does not parse: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise AuthenticationError(f"peer key is {type(key).__name__}, not Ed25519")
    return key.public_bytes_raw()


def node_id_from_certificate_untrusted(der: bytes) -> NodeId:
    """The NodeId a peer's DER certificate speaks for."""
    return NodeId.from_public_key(public_key_from_certificate_untrusted(der))


def verify_signature_untrusted(public_key: bytes, message: bytes, signature: bytes) -> None:
    """Raise AuthenticationError unless ``signature`` is ``public_key``'s over ``message``."""
    if len(public_key) != PUBLIC_KEY_LEN or len(signature) != SIGNATURE_LEN:
        raise AuthenticationError("malformed public key or signature")
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError) as exc:
        raise AuthenticationError("signature does not verify") from exc


def _self_signed_certificate(key: Ed25519PrivateKey, node_id: NodeId) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(node_id))])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        # Serial from the NodeId (positive, < 2**159) keeps the certificate deterministic.
        .serial_number(int.from_bytes(node_id.raw[:19], "big") | 1)
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .sign(key, None)
    )
    return cert.public_bytes(serialization.Encoding.DER)


def _read_private_key(path: Path) -> Ed25519PrivateKey:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("node key %s is readable by others (mode %o)", path, mode & 0o777)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise StorageError(f"node key {path} is unreadable: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise StorageError(f"node key {path} is not an Ed25519 key")
    return key


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (mode 0600) so a crash leaves either nothing or all of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
