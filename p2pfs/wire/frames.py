"""Framing: ``length (u32 big-endian) | tag (u8) | body``, length counting tag and body.

A decoder is fed whatever bytes arrive and hands out whole frames; it checks the declared
length against the bound for the frame's tag (``limit_for``, from the message schema and the
receiver's role) as soon as the five header bytes are in, so a hostile length costs nothing.
It also remembers when the frame it is waiting for began to arrive (time is a parameter),
so the I/O layer can reset a stream that leaves a frame half-sent.
"""

from __future__ import annotations

from collections.abc import Callable
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
    """Incremental decoder: ``feed`` bytes, then take frames with ``next_frame``.

    Bytes fed as an immutable ``bytes`` object while nothing else is buffered are kept as
    they are, and a frame that lies whole inside them is handed out as a view into them:
    bulk chunk data (a stream read of up to 1 MiB holding many whole ChunkData frames) is
    then never copied here. Only a frame's unfinished tail moves into the decoder's own
    buffer, where frames are copied out as before.
    """

    __slots__ = (
        "_buffer",
        "_direct",
        "_direct_pos",
        "_last_feed",
        "_limit_for",
        "_max_frame",
        "_since",
        "_start",
    )

    def __init__(
        self,
        max_frame: int = MAX_FRAME_BYTES,
        limit_for: Callable[[int], int] | None = None,
    ) -> None:
        self._buffer = bytearray()
        self._start = 0
        self._direct: bytes | None = None
        """Fed bytes kept uncopied; unread from _direct_pos on (_buffer is then empty)."""
        self._direct_pos = 0
        self._max_frame = max_frame
        self._limit_for = limit_for
        self._since: float | None = None
        self._last_feed = 0.0

    @property
    def buffered(self) -> int:
        direct = 0 if self._direct is None else len(self._direct) - self._direct_pos
        return len(self._buffer) - self._start + direct

    @property
    def unfinished_since(self) -> float | None:
        """When the first byte of a frame still incomplete was fed (None: no partial frame)."""
        return self._since if self.buffered else None

    @property
    def pending_frame_length(self) -> int:
        """Declared length of the incomplete frame, once its header is in (else 0)."""
        data: bytes | bytearray = self._buffer
        start = self._start
        if self._direct is not None:
            data, start = self._direct, self._direct_pos
        if len(data) - start < LENGTH_BYTES:
            return 0
        return int.from_bytes(data[start : start + LENGTH_BYTES], "big")

    def feed(self, data: bytes | bytearray | memoryview, now: float = 0.0) -> None:
        if data and not self.buffered:
            self._since = now
            if type(data) is bytes:
                self._buffer.clear()
                self._start = 0
                self._direct = data
                self._direct_pos = 0
                self._last_feed = now
                return
        self._spill()
        if self._start and self._start > len(self._buffer) // 2:
            del self._buffer[: self._start]
            self._start = 0
        self._last_feed = now
        self._buffer += data

    def next_frame_untrusted(self) -> Frame | None:
        """The next whole frame, or None until more bytes arrive."""
        direct = self._direct
        if direct is not None:
            start = self._direct_pos
            header = self._header_untrusted(direct, start)
            if header is None:
                self._spill()
                return None
            tag, end = header
            # A view into the fed bytes object, which nothing can change: no copy.
            body = memoryview(direct)[start + LENGTH_BYTES + 1 : end]
            if end == len(direct):
                self._direct = None
            else:
                self._direct_pos = end
            self._since = self._last_feed
            return Frame(tag, body)
        start = self._start
        header = self._header_untrusted(self._buffer, start)
        if header is None:
            return None
        tag, end = header
        body_start = start + LENGTH_BYTES + 1
        # One copy (through a view, not a bytearray slice, which would copy twice): the
        # frame outlives later feeds, which may move the buffer.
        with memoryview(self._buffer) as whole:
            body = memoryview(bytes(whole[body_start:end]))
        self._start = end
        # What is left arrived by the last feed at the latest: its frame's clock starts there.
        self._since = self._last_feed
        return Frame(tag, body)

    def _header_untrusted(self, data: bytes | bytearray, start: int) -> tuple[int, int] | None:
        """(tag, end) of the whole frame at ``start``; None while it is incomplete."""
        available = len(data) - start
        if available < LENGTH_BYTES:
            return None
        length = int.from_bytes(data[start : start + LENGTH_BYTES], "big")
        if length == 0:
            raise WireError(ErrorCode.PROTOCOL_VIOLATION, "empty frame")
        if length > self._max_frame:
            raise WireError(ErrorCode.FRAME_TOO_LARGE, f"frame of {length} bytes")
        if available <= LENGTH_BYTES:
            return None
        tag = data[start + LENGTH_BYTES]
        if self._limit_for is not None and length > self._limit_for(tag):
            raise WireError(ErrorCode.FRAME_TOO_LARGE, f"frame of {length} bytes, tag 0x{tag:02x}")
        if available < LENGTH_BYTES + length:
            return None
        return tag, start + LENGTH_BYTES + length

    def _spill(self) -> None:
        """Move kept bytes still unread into the decoder's own buffer (more bytes follow)."""
        direct = self._direct
        if direct is not None:
            self._direct = None
            self._buffer += memoryview(direct)[self._direct_pos :]
