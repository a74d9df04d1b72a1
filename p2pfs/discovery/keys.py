"""Discovery keys: what a DHT sees instead of a share's root.

The key is derived from the root with BLAKE3's derive-key mode, so an observer of the DHT
learns neither the root (the read capability) nor anything it could fetch with; a holder of
the root computes the key in one hash. Mainline's 20-byte info-hash space gets a prefix of
a key derived under its own context.
"""

from __future__ import annotations

import blake3

from p2pfs.ids import ContentHash

SHARE_KEY_CONTEXT = "p2pfs 2026-11-22 share discovery key v1"
MAINLINE_KEY_CONTEXT = "p2pfs 2026-11-22 mainline info-hash v1"
RELAYS_KEY_CONTEXT = "p2pfs 2026-12-03 relays discovery key v1"
RELAY_FOR_KEY_CONTEXT = "p2pfs 2026-12-03 relay for node discovery key v1"
KEY_LEN = 32
MAINLINE_KEY_LEN = 20


def share_discovery_key(root: ContentHash) -> bytes:
    return blake3.blake3(root, derive_key_context=SHARE_KEY_CONTEXT).digest()


def mainline_info_hash(discovery_key: bytes) -> bytes:
    """BEP 5 keys are 20 bytes; derived from the discovery key, never from the root."""
    return blake3.blake3(discovery_key, derive_key_context=MAINLINE_KEY_CONTEXT).digest()[
        :MAINLINE_KEY_LEN
    ]


def relays_discovery_key() -> bytes:
    """The key every relay announces itself under, for nodes to find relays by."""
    return blake3.blake3(b"", derive_key_context=RELAYS_KEY_CONTEXT).digest()


def relay_for_discovery_key(node_id: bytes) -> bytes:
    """The key a relay announces itself under while ``node_id`` is registered with it, for
    peers that know only the NodeId to find the way in."""
    return blake3.blake3(node_id, derive_key_context=RELAY_FOR_KEY_CONTEXT).digest()
