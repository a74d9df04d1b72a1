"""Error codes: sent in Error messages, and as QUIC application codes on stream resets and
connection closes. Normative table: protocol/WIRE.md."""

from __future__ import annotations

import enum

from p2pfs.errors import RemoteProtocolError


class ErrorCode(enum.IntEnum):
    NO_ERROR = 0
    PROTOCOL_VIOLATION = 1
    """A frame or message was malformed, out of order or out of bounds."""
    FRAME_TOO_LARGE = 2
    UNKNOWN_MESSAGE = 3
    """A message tag this version does not know (tags are never reused)."""
    VERSION_TOO_OLD = 4
    """The peer's protocol version is older than the oldest we still speak."""
    VERSION_UNKNOWN = 5
    """The peer requires a version newer than ours, or is not speaking p2pfs at all."""
    NOT_FOUND = 6
    """No such share, node or chunk here, or the requester may not read it (the same answer
    for both, so a peer cannot probe for shares it does not know the root of)."""
    INTEGRITY = 7
    """Data failed verification against its hash."""
    BUSY = 8
    INTERNAL = 9
    AUTHENTICATION_FAILED = 10
    CANCELLED = 11
    SHUTTING_DOWN = 12

    @classmethod
    def from_wire(cls, value: int) -> ErrorCode:
        """Unknown codes from newer peers read as PROTOCOL_VIOLATION rather than failing."""
        try:
            return cls(value)
        except ValueError:
            return cls.PROTOCOL_VIOLATION


class WireError(RemoteProtocolError):
    """The peer broke the wire protocol; ``code`` is what to close the stream with."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
