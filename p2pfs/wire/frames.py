"""Framing: ``length (u32 big-endian) | tag (u8) | body``, length counting tag and body.

A decoder is fed whatever bytes arrive and hands out whole frames; it checks the declared
length against the bound for the frame's tag (``limit_for``, from the message schema and the
receiver's role) as soon as the five header bytes are in, so a hostile length costs nothing.
It also remembers when the frame it is waiting for began to arrive (time is a parameter),
so the I/O layer can reset a stream that leaves a frame half-sent.
"""

from __future__ import annotations

import itertools
from collections import deque
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

    Fed bytes are kept as they came (a ``bytes`` object as is; anything mutable copied once),
    in order. A frame that lies whole inside one of them is handed out as a view into it, so
    bulk chunk data (a stream read holding many whole ChunkData frames) is never copied
    here; a frame spread over several is joined once into a bytes object of its own. (A
    single buffer that every feed was appended to copied each byte of such a frame twice:
    into the buffer and out of it.)
    """

    __slots__ = (
        "_last_feed",
        "_limit_for",
        "_max_frame",
        "_pieces",
        "_pos",
        "_since",
        "_size",
    )

    def __init__(
        self,
        max_frame: int = MAX_FRAME_BYTES,
        limit_for: Callable[[int], int] | None = None,
    ) -> None:
        self._pieces: deque[bytes] = deque()
        self._pos = 0
        """Bytes of the first piece already handed out."""
        self._size = 0
        """Unread bytes over all pieces."""
        self._max_frame = max_frame
        self._limit_for = limit_for
        self._since: float | None = None
        self._last_feed = 0.0

    @property
    def buffered(self) -> int:
        return self._size

    @property
    def unfinished_since(self) -> float | None:
        """When the first byte of a frame still incomplete was fed (None: no partial frame)."""
        return self._since if self._size else None

    @property
    def last_fed(self) -> float:
        """When bytes were last fed (the ``now`` they came with)."""
        return self._last_feed

    @property
    def pending_frame_length(self) -> int:
        """Declared length of the incomplete frame, once its header is in (else 0)."""
        if self._size < LENGTH_BYTES:
            return 0
        return int.from_bytes(self._peek(LENGTH_BYTES), "big")

    def feed(self, data: bytes | bytearray | memoryview, now: float = 0.0) -> None:
        if not data:
            return
        if not self._size:
            self._since = now
        self._last_feed = now
        piece = data if type(data) is bytes else bytes(data)
        self._pieces.append(piece)
        self._size += len(piece)

    def next_frame_untrusted(self) -> Frame | None:
        """The next whole frame, or None until more bytes arrive."""
        if self._size < LENGTH_BYTES:
            return None
        header = self._peek(min(self._size, LENGTH_BYTES + 1))
        length = int.from_bytes(header[:LENGTH_BYTES], "big")
        if length == 0:
            raise WireError(ErrorCode.PROTOCOL_VIOLATION, "empty frame")
        if length > self._max_frame:
            raise WireError(ErrorCode.FRAME_TOO_LARGE, f"frame of {length} bytes")
        if len(header) <= LENGTH_BYTES:
            return None
        tag = header[LENGTH_BYTES]
        if self._limit_for is not None and length > self._limit_for(tag):
            raise WireError(ErrorCode.FRAME_TOO_LARGE, f"frame of {length} bytes, tag 0x{tag:02x}")
        total = LENGTH_BYTES + length
        if self._size < total:
            return None
        first = self._pieces[0]
        start = self._pos
        if len(first) - start >= total:
            # Whole inside one fed object, which nothing can change: a view, no copy.
            body = memoryview(first)[start + LENGTH_BYTES + 1 : start + total]
            self._advance(total)
        else:
            body = memoryview(self._take(total))[LENGTH_BYTES + 1 :]
        # What is left arrived by the last feed at the latest: its frame's clock starts there.
        self._since = self._last_feed
        return Frame(tag, body)

    def _peek(self, count: int) -> bytes:
        """The first ``count`` unread bytes (``count`` <= buffered), not consumed."""
        first = self._pieces[0]
        start = self._pos
        if len(first) - start >= count:
            return first[start : start + count]
        out = bytearray(first[start:])
        for piece in itertools.islice(self._pieces, 1, None):
            out += piece[: count - len(out)]
            if len(out) == count:
                break
        return bytes(out)

    def _take(self, count: int) -> bytes:
        """The first ``count`` unread bytes, joined (one copy), and consumed."""
        parts: list[memoryview] = []
        needed = count
        while needed:
            first = self._pieces[0]
            start = self._pos
            available = len(first) - start
            if available <= needed:
                parts.append(memoryview(first)[start:])
                self._pieces.popleft()
                self._pos = 0
                needed -= available
            else:
                parts.append(memoryview(first)[start : start + needed])
                self._pos = start + needed
                needed = 0
        self._size -= count
        return b"".join(parts)

    def _advance(self, count: int) -> None:
        """Consume ``count`` bytes that lie inside the first piece."""
        self._pos += count
        self._size -= count
        if self._pos == len(self._pieces[0]):
            self._pieces.popleft()
            self._pos = 0
