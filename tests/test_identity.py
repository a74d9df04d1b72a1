"""Node identity: key file lifecycle, NodeId encoding, certificate -> NodeId, signatures."""

from __future__ import annotations

import contextlib
import stat
from pathlib import Path

import blake3
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from p2pfs.certs import node_id_from_certificate_untrusted, verify_signature_untrusted
from p2pfs.errors import AuthenticationError, RemoteProtocolError
from p2pfs.home import CERT_FILE, KEY_FILE, load_identity
from p2pfs.identity import Identity
from p2pfs.ids import NodeId, node_id_untrusted


def test_first_use_creates_private_key_file_and_reuses_it(tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = load_identity(home)
    key_mode = stat.S_IMODE((home / KEY_FILE).stat().st_mode)
    assert key_mode == 0o600
    assert (home / CERT_FILE).exists()
    again = load_identity(home)
    assert again.node_id == first.node_id
    assert again.certificate_der == first.certificate_der
    assert not list(home.glob(".*tmp"))


def test_missing_certificate_is_rebuilt_from_the_key(tmp_path: Path) -> None:
    first = load_identity(tmp_path)
    (tmp_path / CERT_FILE).unlink()
    assert load_identity(tmp_path).certificate_der == first.certificate_der


def test_node_id_is_blake3_of_raw_public_key() -> None:
    ident = Identity.generate()
    assert ident.node_id.raw == blake3.blake3(ident.public_key).digest()


def test_node_id_text_roundtrip_and_form() -> None:
    node_id = Identity.generate().node_id
    text = str(node_id)
    assert len(text) == 52
    assert text == text.lower()
    assert "=" not in text
    assert node_id_untrusted(text) == node_id


@given(st.binary(min_size=32, max_size=32))
def test_any_32_bytes_roundtrip(raw: bytes) -> None:
    assert node_id_untrusted(str(NodeId(raw))) == NodeId(raw)


@pytest.mark.parametrize(
    "junk",
    [
        "",
        "a" * 51,
        "a" * 53,
        "A" * 52,
        "0" * 52,  # 0 and 1 are not base32
        "a" * 51 + "b",  # non-zero spare bits: a second spelling of some id
        "a" * 50 + "==",
    ],
)
def test_junk_node_id_text_is_rejected(junk: str) -> None:
    with pytest.raises(RemoteProtocolError):
        node_id_untrusted(junk)


@given(st.text(max_size=60))
def test_node_id_parser_raises_one_error_type(text: str) -> None:
    with contextlib.suppress(RemoteProtocolError):
        node_id_untrusted(text)


def test_certificate_names_its_key() -> None:
    ident = Identity.generate()
    assert node_id_from_certificate_untrusted(ident.certificate_der) == ident.node_id


def test_non_ed25519_certificate_is_an_authentication_error() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(
            x509.load_der_x509_certificate(Identity.generate().certificate_der).not_valid_before_utc
        )
        .not_valid_after(
            x509.load_der_x509_certificate(Identity.generate().certificate_der).not_valid_after_utc
        )
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(AuthenticationError):
        node_id_from_certificate_untrusted(cert.public_bytes(serialization.Encoding.DER))


@pytest.mark.parametrize("junk", [b"", b"\x30\x03abc", b"x" * 5000])
def test_junk_certificate_is_an_authentication_error(junk: bytes) -> None:
    with pytest.raises(AuthenticationError):
        node_id_from_certificate_untrusted(junk)


def test_sign_and_verify() -> None:
    ident = Identity.generate()
    signature = ident.sign(b"message")
    verify_signature_untrusted(ident.public_key, b"message", signature)
    with pytest.raises(AuthenticationError):
        verify_signature_untrusted(ident.public_key, b"messagf", signature)
    with pytest.raises(AuthenticationError):
        verify_signature_untrusted(Identity.generate().public_key, b"message", signature)
    with pytest.raises(AuthenticationError):
        verify_signature_untrusted(ident.public_key, b"message", signature[:10])
