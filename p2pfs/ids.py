"""Identifiers that every layer speaks: content hashes, NodeIds and their display forms.

Pure (no I/O, no randomness): the sans-I/O cores name nodes with :class:`NodeId` rather
than raw bytes.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import NewType

import blake3

from p2pfs.errors import RemoteProtocolError

HASH_LEN = 32
NODE_ID_LEN = 32
NODE_ID_TEXT_LEN = 52
PUBLIC_KEY_LEN = 32

_B32_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyz234567")

ContentHash = NewType("ContentHash", bytes)
"""32 bytes: BLAKE3-256 of a chunk, or the keyed BLAKE3 hash of a tree node."""


def content_hash_untrusted(value: object) -> ContentHash:
    """Accept ``value`` as a ContentHash only if it is exactly 32 bytes."""
    if not isinstance(value, bytes) or len(value) != HASH_LEN:
        raise RemoteProtocolError(f"expected a {HASH_LEN}-byte hash, got {_describe(value)}")
    return ContentHash(value)


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


def short_hex(value: bytes, digits: int = 12) -> str:
    """A prefix for logs; never for identity decisions."""
    return value.hex()[:digits]


def _describe(value: object) -> str:
    if isinstance(value, bytes):
        return f"{len(value)} bytes"
    return type(value).__name__
