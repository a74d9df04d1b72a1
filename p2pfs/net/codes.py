"""QUIC application error codes the transport itself uses in CONNECTION_CLOSE / RESET_STREAM.

The wire protocol's own codes live in protocol/; these are the transport's, below it.
"""

from __future__ import annotations

from enum import IntEnum


class CloseCode(IntEnum):
    NO_ERROR = 0x0
    # The peer's key did not match the expected NodeId, or its proof did not verify.
    AUTH_FAILED = 0x101
    # The peer broke the transport's rules (bad authentication stream, unidirectional stream).
    PROTOCOL_ERROR = 0x102
    # The endpoint is shutting down.
    SHUTDOWN = 0x103
    # Handshake or authentication did not finish in time.
    TIMEOUT = 0x104
    # Too many connections from the peer's address, or in total.
    BUSY = 0x105
    # This node failed while serving the connection (its own fault, not the peer's).
    INTERNAL = 0x106
