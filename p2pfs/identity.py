"""A node's identity in memory: its Ed25519 private key, certificate and NodeId.

No file I/O here: the node home loads and stores the key (:func:`p2pfs.home.load_identity`);
the NodeId type is vocabulary (:mod:`p2pfs.ids`) and certificate checks live in
:mod:`p2pfs.certs`.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pfs.certs import certificate_pem, self_signed_certificate
from p2pfs.ids import NodeId


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
        return certificate_pem(self.certificate_der)

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
        return cls(key, self_signed_certificate(key, node_id), node_id)

    @classmethod
    def generate(cls) -> Identity:
        """A fresh in-memory identity (tests, benchmarks); nodes use
        :func:`p2pfs.home.load_identity`."""
        return cls.from_private_key(Ed25519PrivateKey.generate())
