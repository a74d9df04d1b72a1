"""Certificates and signatures: the self-signed certificate TLS wants, and the checks on a
peer's certificate and signature.

A NodeId is BLAKE3-256 of the raw 32-byte Ed25519 public key. The certificate only exists
because TLS wants one, so nothing in it is trusted except the public key, and the key's
possession is proven by TLS itself (server side) or by a signature on the authentication
stream (client side). Pure: no file or network I/O, no clock (the validity dates are fixed).
"""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

from p2pfs.errors import AuthenticationError
from p2pfs.ids import PUBLIC_KEY_LEN, NodeId

SIGNATURE_LEN = 64
# Bound a peer's certificate before the parser sees it: ours are ~300 bytes.
MAX_CERTIFICATE_LEN = 4096

# Validity is not checked by anyone (identity is the key, not the dates); fixed dates make the
# certificate a pure function of the key, and 9999-12-31 is RFC 5280's "no expiry".
_NOT_BEFORE = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
_NOT_AFTER = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)


def self_signed_certificate(key: Ed25519PrivateKey, node_id: NodeId) -> bytes:
    """The DER certificate for ``key``: a pure function of the key."""
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


def certificate_pem(der: bytes) -> bytes:
    """The PEM form of one of our own DER certificates."""
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)


def public_key_from_certificate_untrusted(der: bytes) -> bytes:
    """The raw Ed25519 public key of a peer's DER certificate; AuthenticationError otherwise."""
    if not isinstance(der, bytes) or not der or len(der) > MAX_CERTIFICATE_LEN:
        raise AuthenticationError("peer certificate missing or oversized")
    try:
        cert = x509.load_der_x509_certificate(der)
        key = cert.public_key()
    # InvalidVersion (a bad version field) and UnsupportedAlgorithm (an unknown key type)
    # are not ValueErrors; any of them is the peer's malformed certificate.
    except (ValueError, x509.InvalidVersion, UnsupportedAlgorithm) as exc:
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
