"""Identifiers that every layer speaks: content hashes and their display forms."""

from __future__ import annotations

from typing import NewType

from p2pfs.errors import RemoteProtocolError

HASH_LEN = 32

ContentHash = NewType("ContentHash", bytes)
"""32 bytes: BLAKE3-256 of a chunk, or the keyed BLAKE3 hash of a tree node."""


def content_hash_untrusted(value: object) -> ContentHash:
    """Accept ``value`` as a ContentHash only if it is exactly 32 bytes."""
    if not isinstance(value, bytes) or len(value) != HASH_LEN:
        raise RemoteProtocolError(f"expected a {HASH_LEN}-byte hash, got {_describe(value)}")
    return ContentHash(value)


def short_hex(value: bytes, digits: int = 12) -> str:
    """A prefix for logs; never for identity decisions."""
    return value.hex()[:digits]


def _describe(value: object) -> str:
    if isinstance(value, bytes):
        return f"{len(value)} bytes"
    return type(value).__name__
