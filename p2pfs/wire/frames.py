"""Framing: ``length (u32 big-endian) | tag (u8) | body``, length counting tag and body.

A decoder is fed whatever bytes arrive and hands out whole frames; it checks the declared
length against its bound before buffering anything, so a hostile length costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from p2pfs.errors import LocalProtocolError
from p2pfs.wire.codes import ErrorCode, WireError

LENGTH_BYTES = 4
MAX_CHUNK_PAYLOAD = 16 << 20
MAX_FRAME_BYTES = MAX_CHUNK_PAYLOAD + 4096
"""Bound on any frame: one maximal chunk plus its small header."""


@dataclass(frozen=True, slots=True)
class Frame:
    tag: int
    body: memoryview


def encode_frame(tag: int, body: bytes | bytearray | memoryview) -> bytes:
    length = len(body) + 1
    if length > MAX_FRAME_BYTES:
        raise LocalProtocolError(f"frame of {length} bytes exceeds the bound")
    return length.to_bytes(LENGTH_BYTES, "big") + bytes((tag,)) + bytes(body)


def frame_header(tag: int, body_length: int) -> bytes:
    """Header alone, for senders that write a large payload without copying it."""
    return (body_length + 1).to_bytes(LENGTH_BYTES, "big") + bytes((tag,))


class FrameDecoder:
    """Incremental decoder: ``feed`` bytes, then take frames with ``next_frame``."""

    __slots__ = ("_buffer", "_max_frame", "_start")

    def __init__(self, max_frame: int = MAX_FRAME_BYTES) -> None:
        self._buffer = bytearray()
        self._start = 0
        self._max_frame = max_frame

    @property
    def buffered(self) -> int:
        return len(self._buffer) - self._start

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._start and self._start > len(self._buffer) // 2:
            del self._buffer[: self._start]
            self._start = 0
        self._buffer += data

    def next_frame_untrusted(self) -> Frame | None:
        """The next whole frame, or None until more bytes arrive."""
        available = len(self._buffer) - self._start
        if available < LENGTH_BYTES:
            return None
        start = self._start
        length = int.from_bytes(self._buffer[start : start + LENGTH_BYTES], "big")
        if length == 0:
            raise WireError(ErrorCode.PROTOCOL_VIOLATION, "empty frame")
        if length > self._max_frame:
            raise WireError(ErrorCode.FRAME_TOO_LARGE, f"frame of {length} bytes")
        if available < LENGTH_BYTES + length:
            return None
        body_start = start + LENGTH_BYTES + 1
        end = start + LENGTH_BYTES + length
        tag = self._buffer[start + LENGTH_BYTES]
        # One copy (through a view, not a bytearray slice, which would copy twice): the
        # frame outlives later feeds, which may move the buffer.
        with memoryview(self._buffer) as whole:
            body = memoryview(bytes(whole[body_start:end]))
        self._start = end
        return Frame(tag, body)
