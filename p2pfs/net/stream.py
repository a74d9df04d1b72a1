"""A bidirectional QUIC stream with bounded buffers in both directions: a trio
``HalfCloseableStream``.

Sending: the engines buffer whatever ``send_stream_data`` is given, without limit, so a writer
here waits while the stream's not-yet-transmitted backlog is above ``send_buffer_limit``; the
connection wakes it after each transmit that drains the backlog.

Receiving: the engines hand data over as soon as it arrives (and grant flow-control credit at
that moment), so the stream keeps what the application has not read yet and the connection
stops feeding the engine while too much is unread (see net/intake.py).

The stream talks to its connection only through ``StreamOwner`` (below), and the connection
to the stream only through the methods under "called by the owner": no module reads the
other's private fields.

trio's stream contract, as ``trio.testing.check_half_closeable_stream`` checks it:
- ``aclose`` ends both directions gracefully: FIN on ours, STOP_SENDING on theirs (so a peer
  still writing gets ``BrokenResourceError``); afterwards every call raises
  ``ClosedResourceError``, and ``aclose`` may be repeated.
- A peer's RESET_STREAM or STOP_SENDING raises ``StreamBrokenError``, which is both our
  ``StreamResetError`` and trio's ``BrokenResourceError``.
- Two tasks in ``send_all``/``send_eof``/``wait_send_all_might_not_block`` at once, or two
  in ``receive_some``, raise ``BusyResourceError``.
"""

from __future__ import annotations

import contextlib
import logging
import operator
from collections import deque
from collections.abc import Sequence
from typing import Protocol

import trio

from p2pfs.errors import LocalProtocolError, P2pfsError, StreamResetError

logger = logging.getLogger(__name__)

DEFAULT_RECEIVE = 1 << 20


class StreamClosedError(LocalProtocolError, trio.ClosedResourceError):
    """This side closed (aclose, reset) or finished (send_eof) what the call needs."""


class StreamBrokenError(StreamResetError, trio.BrokenResourceError):
    """The peer abandoned the stream (RESET_STREAM or STOP_SENDING)."""


class StreamOwner(Protocol):
    """What a stream needs from the connection that carries it."""

    def stream_send(
        self, stream_id: int, pieces: Sequence[memoryview | bytes], *, end_stream: bool
    ) -> None:
        """Queue ``pieces`` in order (and the FIN) in the engine, then transmit once; raises
        the connection's error if closed."""

    def stream_abandon(
        self, stream_id: int, error_code: int, *, send_open: bool, receive_open: bool
    ) -> None:
        """Forget the stream; RESET_STREAM our side if ``send_open``, STOP_SENDING theirs if
        ``receive_open``."""

    def stream_backlog(self, stream_id: int) -> int:
        """Bytes written to the stream that the engine has not transmitted yet."""

    def stream_writer_blocked(self, stream: Stream) -> None:
        """``stream``'s writer waits for room: call ``send_room_maybe`` after transmits."""

    def stream_consumed(self, stream: Stream, size: int) -> None:
        """The application took (or the stream dropped) ``size`` received bytes."""


class Stream(trio.abc.HalfCloseableStream):
    """One bidirectional stream; one reader task and one writer task may use it at once."""

    def __init__(self, owner: StreamOwner, stream_id: int, send_buffer_limit: int) -> None:
        self._owner = owner
        self.stream_id = stream_id
        self._send_limit = send_buffer_limit
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
        self._closed = False
        self._sending = False
        self._receiving = False

    def __repr__(self) -> str:
        return f"<Stream {self.stream_id} of {self._owner!r}>"

    @property
    def receive_buffered(self) -> int:
        """Received bytes the application has not read yet."""
        return self._recv_buffered

    @property
    def send_backlog(self) -> int:
        """Bytes accepted by send_all that the engine has not transmitted yet."""
        return self._owner.stream_backlog(self.stream_id)

    @property
    def send_finished(self) -> bool:
        """Our FIN is queued (send_eof or aclose)."""
        return self._send_closed

    @property
    def receive_finished(self) -> bool:
        """The peer's FIN has arrived (its data may still be unread)."""
        return self._recv_eof

    # -- trio.abc.SendStream --------------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data``, waiting whenever the stream's backlog would exceed the bound."""
        await self.send_all_parts([data])

    async def send_all_parts(self, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        """Queue ``parts`` one after the other, as ``send_all`` of their concatenation would,
        without joining them first: a server's reply is frame headers and chunk payloads,
        and joining a 4 MiB group copied it once more on the event loop (0.33 CPU-s per GiB
        of the sender's main thread)."""
        limit = self._send_limit
        views = deque(view for view in (memoryview(p).cast("B") for p in parts) if view)
        remaining = sum(len(view) for view in views)
        with self._send_slot():
            await trio.lowlevel.checkpoint_if_cancelled()
            while True:
                self._check_sendable()
                if not remaining:
                    break
                backlog = self.send_backlog
                room = limit - backlog
                # Wait for room for the whole remainder or a quarter of the bound, whichever
                # is less: topping up in slivers would cost a transmit pass per few bytes.
                if room < min(remaining, limit // 4):
                    await self._wait_send_room()
                    continue
                pieces = _take(views, room)
                size = sum(len(piece) for piece in pieces)
                self._owner.stream_send(self.stream_id, pieces, end_stream=False)
                self.bytes_sent += size
                self.max_send_backlog = max(self.max_send_backlog, backlog + size)
                remaining -= size
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        """Return once the backlog is at most half the bound (or sending would fail)."""
        with self._send_slot():
            await trio.lowlevel.checkpoint_if_cancelled()
            if self._closed:
                raise StreamClosedError(f"stream {self.stream_id} is closed")
            while (
                self._send_error is None
                and not self._send_closed
                and self.send_backlog > self._send_limit // 2
            ):
                await self._wait_send_room()
            if self._closed:
                raise StreamClosedError(f"stream {self.stream_id} is closed")
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def send_eof(self) -> None:
        """Finish the sending side (FIN); receiving continues until the peer's EOF.
        A second call does nothing."""
        with self._send_slot():
            await trio.lowlevel.checkpoint()
            if self._send_closed and not self._closed:
                return
            self._check_sendable()
            self._send_closed = True
            self._owner.stream_send(self.stream_id, (), end_stream=True)

    # -- trio.abc.ReceiveStream -----------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Up to ``max_bytes`` bytes (default 1 MiB), waiting for at least one; ``b""`` at
        the peer's EOF."""
        if max_bytes is None:
            max_bytes = DEFAULT_RECEIVE
        max_bytes = operator.index(max_bytes)
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            while not self._recv:
                if self._closed:
                    raise StreamClosedError(f"stream {self.stream_id} is closed")
                if self._recv_error is not None:
                    raise self._recv_error
                if self._recv_eof:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return b""
                waiter = self._recv_waiter = trio.Event()
                await waiter.wait()
            out = self._take(max_bytes)
            self._owner.stream_consumed(self, len(out))
            await trio.lowlevel.cancel_shielded_checkpoint()
            return out
        finally:
            self._receiving = False

    # -- closing --------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close both directions: FIN ours (queued data still goes out), STOP_SENDING
        theirs. Every later call raises ClosedResourceError; cancelled, it still closes."""
        self.close_nowait()
        await trio.lowlevel.checkpoint()

    def close_nowait(self) -> None:
        """``aclose`` without the checkpoint, for cleanup paths that cannot wait."""
        if self._closed:
            return
        self._closed = True
        send_open = self._send_error is None and not self._send_closed
        receive_open = self._recv_error is None and not self._recv_eof
        self._send_closed = True
        self._drop_received()
        if send_open:
            # If the connection is gone there is nothing left to finish.
            with contextlib.suppress(P2pfsError):
                self._owner.stream_send(self.stream_id, (), end_stream=True)
        if receive_open:
            self._owner.stream_abandon(self.stream_id, 0, send_open=False, receive_open=True)
        self._wake_all()

    def reset(self, error_code: int) -> None:
        """Abandon the stream both ways: RESET_STREAM our side, STOP_SENDING theirs."""
        if self._closed:
            return  # aclose already ended both directions; the engine must not hear it twice
        send_open = self._send_error is None and not self._send_closed
        receive_open = self._recv_error is None and not self._recv_eof
        if self._send_error is None:
            self._send_error = StreamClosedError(f"stream {self.stream_id} was reset locally")
        if self._recv_error is None:
            self._recv_error = StreamClosedError(f"stream {self.stream_id} was reset locally")
        self._drop_received()
        self._owner.stream_abandon(
            self.stream_id, error_code, send_open=send_open, receive_open=receive_open
        )
        self._wake_all()

    # -- called by the owner --------------------------------------------------------------

    def data_received(self, data: bytes, end_stream: bool) -> int:
        """Buffer ``data``; returns how many bytes were kept (for the owner's count)."""
        if self._recv_error is not None or self._closed:
            return 0  # abandoned locally: drop late data without buffering it
        if data:
            self._recv.append(data)
            self._recv_buffered += len(data)
            self.bytes_received += len(data)
        if end_stream:
            self._recv_eof = True
        self._wake_reader()
        return len(data)

    def data_received_parts(self, parts: list[bytes], end_stream: bool) -> int:
        """``data_received`` for several pieces that arrived in order; returns bytes kept."""
        if self._recv_error is not None or self._closed:
            return 0
        size = 0
        for part in parts:
            if part:
                self._recv.append(part)
                size += len(part)
        self._recv_buffered += size
        self.bytes_received += size
        if end_stream:
            self._recv_eof = True
        self._wake_reader()
        return size

    def peer_reset(self, error_code: int) -> None:
        if self._recv_error is None and not self._recv_eof:
            self._recv_error = StreamBrokenError(
                f"peer reset stream {self.stream_id}", error_code=error_code
            )
        self._drop_received()
        self._wake_reader()

    def peer_stop_sending(self, error_code: int) -> None:
        if self._send_error is None:
            self._send_error = StreamBrokenError(
                f"peer stopped reading stream {self.stream_id}", error_code=error_code
            )
        self._wake_writer()

    def connection_lost(self, error: P2pfsError) -> None:
        if self._send_error is None:
            self._send_error = error
        if self._recv_error is None and not self._recv_eof:
            self._recv_error = error
        self._wake_all()

    def send_room_maybe(self) -> bool:
        """Wake a blocked writer if the backlog fell to half the bound; True if woken."""
        if self._send_waiter is None:
            return True
        if self.send_backlog <= self._send_limit // 2:
            self._wake_writer()
            return True
        return False

    # -- internals ------------------------------------------------------------------------

    def _send_slot(self) -> _SendSlot:
        return _SendSlot(self)

    def _check_sendable(self) -> None:
        if self._closed:
            raise StreamClosedError(f"stream {self.stream_id} is closed")
        if self._send_error is not None:
            raise self._send_error
        if self._send_closed:
            raise StreamClosedError(f"stream {self.stream_id}: send after send_eof")

    async def _wait_send_room(self) -> None:
        # Keep our own reference: stream_writer_blocked may resume intake, which can wake
        # (and clear) the waiter before we get to wait on it.
        waiter = self._send_waiter = trio.Event()
        self._owner.stream_writer_blocked(self)
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
            self._owner.stream_consumed(self, dropped)

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


class _SendSlot:
    """The one send-side call a stream allows at a time (trio's BusyResourceError rule)."""

    __slots__ = ("_stream",)

    def __init__(self, stream: Stream) -> None:
        self._stream = stream

    def __enter__(self) -> None:
        if self._stream._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._stream._sending = True

    def __exit__(self, *exc_info: object) -> None:
        self._stream._sending = False


def _take(views: deque[memoryview], size: int) -> list[memoryview]:
    """Up to ``size`` bytes from the front of ``views``, the last one split if need be."""
    taken: list[memoryview] = []
    while views and size > 0:
        view = views[0]
        if len(view) <= size:
            taken.append(views.popleft())
            size -= len(view)
        else:
            taken.append(view[:size])
            views[0] = view[size:]
            size = 0
    return taken
