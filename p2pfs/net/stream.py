"""A bidirectional QUIC stream with bounded buffers in both directions.

Sending: the engines buffer whatever ``send_stream_data`` is given, without limit, so a writer
here waits while the stream's not-yet-transmitted backlog is above ``send_buffer_limit``; the
connection wakes it after each transmit that drains the backlog.

Receiving: the engines hand data over as soon as it arrives (and grant flow-control credit at
that moment), so the stream keeps what the application has not read yet and the connection
stops feeding the engine while too much is unread (see PeerConnection._check_intake).
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING

import trio

from p2pfs.errors import LocalProtocolError, P2pfsError, StreamResetError

if TYPE_CHECKING:
    from p2pfs.net.connection import PeerConnection

logger = logging.getLogger(__name__)

DEFAULT_RECEIVE = 1 << 20


class Stream:
    """One bidirectional stream; one reader task and one writer task may use it at once."""

    def __init__(self, conn: PeerConnection, stream_id: int) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self.bytes_sent = 0
        self.bytes_received = 0
        # High-water mark of the engine send backlog right after our own writes: the number
        # the backpressure tests check against the bound.
        self.max_send_backlog = 0
        self._recv: deque[bytes] = deque()
        self._recv_buffered = 0
        self._recv_eof = False
        self._recv_error: P2pfsError | None = None
        self._recv_waiter: trio.Event | None = None
        self._send_closed = False
        self._send_error: P2pfsError | None = None
        self._send_waiter: trio.Event | None = None

    def __repr__(self) -> str:
        return f"<Stream {self.stream_id} of {self._conn!r}>"

    @property
    def receive_buffered(self) -> int:
        """Received bytes the application has not read yet."""
        return self._recv_buffered

    @property
    def send_backlog(self) -> int:
        """Bytes accepted by send_all that the engine has not transmitted yet."""
        return self._conn._send_backlog(self.stream_id)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data``, waiting whenever the stream's backlog would exceed the bound."""
        limit = self._conn.config.send_buffer_limit
        view = memoryview(data).cast("B")
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            self._check_sendable()
            backlog = self.send_backlog
            room = limit - backlog
            # Wait for room for the whole remainder or a quarter of the bound, whichever is
            # less: topping up in slivers would cost a transmit pass per few bytes.
            if room < min(len(view), limit // 4):
                await self._wait_send_room()
                continue
            piece = view[:room]
            self._conn._send_stream_data(self.stream_id, piece, end_stream=False)
            self.bytes_sent += len(piece)
            self.max_send_backlog = max(self.max_send_backlog, backlog + len(piece))
            view = view[len(piece) :]
            if not view:
                break
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def send_eof(self) -> None:
        """Finish the sending side (FIN); receiving continues until the peer's EOF."""
        await trio.lowlevel.checkpoint()
        self._check_sendable()
        self._send_closed = True
        self._conn._send_stream_data(self.stream_id, b"", end_stream=True)

    async def receive_some(self, max_bytes: int = DEFAULT_RECEIVE) -> bytes:
        """Up to ``max_bytes`` bytes, waiting for at least one; ``b""`` at the peer's EOF."""
        if max_bytes < 1:
            raise LocalProtocolError("max_bytes must be positive")
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self._recv:
            if self._recv_error is not None:
                raise self._recv_error
            if self._recv_eof:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return b""
            waiter = self._recv_waiter = trio.Event()
            await waiter.wait()
        out = self._take(max_bytes)
        self._conn._consumed(self, len(out))
        await trio.lowlevel.cancel_shielded_checkpoint()
        return out

    def reset(self, error_code: int) -> None:
        """Abandon the stream both ways: RESET_STREAM our side, STOP_SENDING theirs."""
        send_open = self._send_error is None and not self._send_closed
        receive_open = self._recv_error is None and not self._recv_eof
        if self._send_error is None:
            self._send_error = LocalProtocolError(f"stream {self.stream_id} was reset locally")
        if self._recv_error is None:
            self._recv_error = LocalProtocolError(f"stream {self.stream_id} was reset locally")
        self._drop_received()
        self._conn._reset_stream(
            self.stream_id, error_code, send_open=send_open, receive_open=receive_open
        )
        self._wake_all()

    # -- called by the connection ---------------------------------------------------------

    def _data_received(self, data: bytes, end_stream: bool) -> int:
        """Buffer ``data``; returns how many bytes were kept (for the connection's count)."""
        if self._recv_error is not None:
            return 0  # reset locally: drop late data without buffering it
        if data:
            self._recv.append(data)
            self._recv_buffered += len(data)
            self.bytes_received += len(data)
        if end_stream:
            self._recv_eof = True
        self._wake_reader()
        return len(data)

    def _peer_reset(self, error_code: int) -> None:
        if self._recv_error is None and not self._recv_eof:
            self._recv_error = StreamResetError(
                f"peer reset stream {self.stream_id}", error_code=error_code
            )
        self._drop_received()
        self._wake_reader()

    def _peer_stop_sending(self, error_code: int) -> None:
        if self._send_error is None:
            self._send_error = StreamResetError(
                f"peer stopped reading stream {self.stream_id}", error_code=error_code
            )
        self._wake_writer()

    def _connection_lost(self, error: P2pfsError) -> None:
        if self._send_error is None:
            self._send_error = error
        if self._recv_error is None and not self._recv_eof:
            self._recv_error = error
        self._wake_all()

    def _send_room_maybe(self) -> bool:
        """Wake a blocked writer if the backlog fell below half the bound; True if woken."""
        if self._send_waiter is None:
            return True
        if self.send_backlog <= self._conn.config.send_buffer_limit // 2:
            self._wake_writer()
            return True
        return False

    # -- internals ------------------------------------------------------------------------

    def _check_sendable(self) -> None:
        if self._send_error is not None:
            raise self._send_error
        if self._send_closed:
            raise LocalProtocolError(f"stream {self.stream_id}: send after send_eof")

    async def _wait_send_room(self) -> None:
        # Keep our own reference: _writer_blocked may resume intake, which can wake (and
        # clear) the waiter before we get to wait on it.
        waiter = self._send_waiter = trio.Event()
        self._conn._writer_blocked(self)
        await waiter.wait()

    def _take(self, max_bytes: int) -> bytes:
        first = self._recv[0]
        if len(first) >= max_bytes or len(self._recv) == 1:
            if len(first) > max_bytes:
                self._recv[0] = first[max_bytes:]
                first = first[:max_bytes]
            else:
                self._recv.popleft()
            self._recv_buffered -= len(first)
            return first
        parts = []
        size = 0
        while self._recv and size + len(self._recv[0]) <= max_bytes:
            part = self._recv.popleft()
            parts.append(part)
            size += len(part)
        self._recv_buffered -= size
        return b"".join(parts)

    def _drop_received(self) -> None:
        if self._recv_buffered:
            dropped = self._recv_buffered
            self._recv.clear()
            self._recv_buffered = 0
            self._conn._consumed(self, dropped)

    def _wake_reader(self) -> None:
        if self._recv_waiter is not None:
            self._recv_waiter.set()
            self._recv_waiter = None

    def _wake_writer(self) -> None:
        if self._send_waiter is not None:
            self._send_waiter.set()
            self._send_waiter = None

    def _wake_all(self) -> None:
        self._wake_reader()
        self._wake_writer()
