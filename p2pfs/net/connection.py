"""One QUIC connection driven from trio: events in, datagrams out, one timer, authentication.

Every input (a datagram batch, the timer, a stream write) ends in ``_after_input``: drain the
engine's events, send what is pending, re-arm the single timer at ``get_timer()``. The timer
is a CancelScope deadline in a per-connection task, so re-arming is one attribute write and
nothing ever polls.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import trio

from p2pfs.certs import node_id_from_certificate_untrusted
from p2pfs.errors import (
    AuthenticationError,
    ConnectionClosedError,
    LocalProtocolError,
    P2pfsError,
    RemoteProtocolError,
)
from p2pfs.identity import Identity
from p2pfs.ids import NodeId
from p2pfs.net import auth
from p2pfs.net.boundary import EngineGuard, describe
from p2pfs.net.codes import CloseCode
from p2pfs.net.control import ControlKind
from p2pfs.net.engine import ALPN, Engine, EngineConnection, TransportConfig
from p2pfs.net.intake import Intake, IntakeLimits
from p2pfs.net.pathsize import path_host
from p2pfs.net.peerstreams import PeerStreamIds
from p2pfs.net.stream import Stream
from p2pfs.waits import first_of

logger = logging.getLogger(__name__)

Address = tuple[Any, ...]
# After a local close, keep the connection's ids routed this long so retransmitted
# CONNECTION_CLOSEs answer the peer, then forget it even if the engine never reports back.
CLOSE_LINGER = 1.0
# Control streams (relay, punch) waiting for the node to take them; an honest peer opens one
# or two at a time, so beyond this they are reset rather than queued.
CONTROL_BACKLOG = 16
_CONTROL_KINDS = frozenset(int(kind) for kind in ControlKind)
STREAM_BUSY = 8
"""Reset code for a control stream nobody takes (the wire's BUSY)."""


class EndpointHooks(Protocol):
    """What a connection needs from the endpoint that owns its socket."""

    def transmit(self, datagrams: list[tuple[bytes, Address]]) -> None: ...
    def register_cid(self, cid: bytes, conn: PeerConnection) -> None: ...
    def unregister_cid(self, cid: bytes) -> None: ...
    def connection_ready(self, conn: PeerConnection) -> None: ...
    def connection_finished(self, conn: PeerConnection) -> None: ...
    def engine_failed(self, conn: PeerConnection) -> None: ...
    def peer_stalled(self, conn: PeerConnection) -> None: ...
    def path_kept_small(self, remote: Address) -> bool: ...


class PeerConnection:
    """An authenticated connection to one peer; ``peer_id`` is proven, not claimed."""

    def __init__(
        self,
        *,
        hooks: EndpointHooks,
        quic: EngineConnection,
        engine: Engine,
        config: TransportConfig,
        identity: Identity,
        remote_address: Address,
        expected_peer: NodeId | None,
        now: float,
        is_client: bool,
        datagram_size: int | None = None,
    ) -> None:
        self._hooks = hooks
        self.datagram_size = datagram_size or config.max_datagram_size
        """The size this side's datagrams on the connection were configured to (its path's,
        net/pathsize.py; qh3's own probing may raise a client's from 1,350 to ~1,450)."""
        self._quic = quic
        self._pings = 0
        self._ping_acks: dict[int, trio.Event] = {}
        self._engine = engine
        self.config = config
        self._identity = identity
        self.remote_address = remote_address
        self.is_client = is_client
        # Client: the pinned id, confirmed from the TLS certificate before connect() returns,
        # or None (unpinned: learnt from the certificate; the caller trusts content hashes).
        # Server: None until the client's proof verifies.
        self._peer_id = expected_peer
        self._streams: dict[int, Stream] = {}
        # Unbounded is safe: the engine caps how many streams the peer may open at once.
        self._incoming_send, self._incoming_recv = trio.open_memory_channel[Stream](math.inf)
        self._control_send, self._control_recv = trio.open_memory_channel[
            tuple[ControlKind, Stream]
        ](CONTROL_BACKLOG)
        self.path = "relayed" if is_tunnel(remote_address) else "direct"
        """How the connection reaches the peer: direct, punched (a direct path opened by
        hole punching) or relayed (through a relay's tunnel)."""
        self.bytes_sent = 0
        self.bytes_received = 0
        """UDP payload bytes of this connection's datagrams (QUIC headers included), for
        per-peer rates and metrics."""
        self.payload_sent = 0
        self.payload_received = 0
        """Chunk bytes the daemon sent and received over this connection (it counts them)."""
        self.stream_bytes_received = 0
        """Stream data handed to this connection's streams, any of them: a transfer's
        progress as the peer's ACKs and PING answers are not."""
        self.largest_datagram_received = 0
        """The biggest datagram the peer's packets came in: under the base size on a
        connection that stalled, the path may be dropping the big ones (``stalled``)."""
        self._error: P2pfsError | None = None
        self._authenticated = False
        self.ready = trio.Event()
        self._closed = trio.Event()
        self._terminated = False
        # The engine raised: its state is undefined, so it is never called again.
        self._broken = False
        self._guard = EngineGuard(self._engine_failed)
        self._closed_locally = False
        self._linger_deadline = math.inf
        self._start_auth(now)
        # The server's first stream (1) is the authentication exchange's, handled apart.
        self._peer_streams = PeerStreamIds(first=5 if is_client else 0)
        self._intake: Intake[Stream, tuple[bytes, Address]] = Intake(
            IntakeLimits(
                stream=config.stream_receive_limit,
                connection=config.connection_receive_limit,
                hard=config.connection_receive_hard_limit,
                held=config.held_datagram_limit,
                held_bytes=config.held_datagram_bytes,
            ),
            measure=_datagram_size,
        )
        self._processing = False
        self._unsettled = False
        self._resume_pending = False
        self._deferred_close: tuple[int, str] | None = None
        self._timer_scope: trio.CancelScope | None = None
        self.cids: set[bytes] = set()
        events = engine.events
        self._stream_data_type: type = events.StreamDataReceived
        self._dispatch: dict[type, Callable[[Any], None]] = {
            events.StreamDataReceived: self._on_stream_data,
            events.HandshakeCompleted: self._on_handshake,
            events.StreamReset: self._on_stream_reset,
            events.StopSendingReceived: self._on_stop_sending,
            events.ConnectionIdIssued: self._on_cid_issued,
            events.ConnectionIdRetired: self._on_cid_retired,
            events.ConnectionTerminated: self._on_terminated,
            events.PingAcknowledged: self._on_ping_acknowledged,
        }
        if not is_client:
            self._challenge()

    def _start_auth(self, now: float) -> None:
        """The client-authentication exchange's state (net/auth.py)."""
        self._auth_deadline = now + self.config.handshake_timeout
        self._auth_stream_id: int | None = None if not self.is_client else 1
        # A client's, once TLS has finished; a server's from the start (_challenge).
        self._auth: auth.ClientAuth | auth.ServerAuth | None = None
        self._early_auth = bytearray()
        """A client's authentication data that came before its handshake's end."""
        self._early_auth_end = False
        self.observed_address: auth.Observed | None = None
        """Where the peer says it sees our packets come from (its word, after auth)."""

    def __repr__(self) -> str:
        who = self._peer_id.short() if self._peer_id else "?"
        return f"<PeerConnection {who}@{self.remote_address[0]}:{self.remote_address[1]}>"

    # -- public API -----------------------------------------------------------------------

    @property
    def peer_id(self) -> NodeId:
        if self._peer_id is None or not self._authenticated:
            raise ConnectionClosedError("peer not authenticated yet")
        return self._peer_id

    @property
    def authenticated(self) -> bool:
        """Whether the peer proved its NodeId (and the connection has not failed since)."""
        return self._authenticated and self._error is None

    @property
    def latest_rtt(self) -> float | None:
        """The QUIC engine's latest round-trip sample (s); None before the first."""
        return self._engine.latest_rtt(self._quic)

    @property
    def dial_address(self) -> tuple[str, int]:
        """Where to dial this peer again (a stripe, a worker, a remembered member): its
        host, a link-local one with its interface, and port."""
        return path_host(self.remote_address), int(self.remote_address[1])

    @property
    def smoothed_rtt(self) -> float | None:
        """The QUIC engine's smoothed round-trip time (s); None before the first sample."""
        return self._engine.smoothed_rtt(self._quic)

    @property
    def held_dropped(self) -> int:
        """Datagrams dropped because intake was paused and the hold queue was full."""
        return self._intake.held_dropped

    @property
    def is_closed(self) -> bool:
        return self._error is not None

    async def open_stream(self) -> Stream:
        """A new bidirectional stream (the peer sees it on its first byte or FIN).

        The engine takes the id when the stream is first written (aioquic refuses a lower
        id once a higher one is written), so write on it before opening the next one."""
        await trio.lowlevel.checkpoint()
        self._check_open()
        stream_id = -1
        with self._guard:
            stream_id = self._quic.get_next_available_stream_id()
        self._check_open()
        if stream_id in self._streams:
            raise LocalProtocolError(f"stream {stream_id} opened twice: write on it first")
        stream = Stream(self, stream_id, self.config.send_buffer_limit)
        self._streams[stream_id] = stream
        return stream

    async def accept_stream(self) -> Stream:
        """The next stream the peer opened; ConnectionClosedError once the connection ends."""
        try:
            return await self._incoming_recv.receive()
        except trio.EndOfChannel:
            assert self._error is not None
            raise self._error from None

    async def accept_control(self) -> tuple[ControlKind, Stream]:
        """The next control stream (relay, punch) the peer opened, with its kind byte read;
        ConnectionClosedError once the connection ends."""
        try:
            return await self._control_recv.receive()
        except trio.EndOfChannel:
            assert self._error is not None
            raise self._error from None

    async def open_control(self, kind: ControlKind, first: bytes = b"") -> Stream:
        """A new control stream of ``kind``, its kind byte sent with ``first``."""
        stream = await self.open_stream()
        await stream.send_all(bytes([kind]) + first)
        return stream

    async def close(self, error_code: int = CloseCode.NO_ERROR, reason: str = "") -> None:
        """Close with ``error_code``; pending stream operations fail with ConnectionClosedError."""
        self.close_nowait(error_code, reason)
        await trio.lowlevel.checkpoint()

    def close_nowait(self, error_code: int = CloseCode.NO_ERROR, reason: str = "") -> None:
        if self._terminated or self._closed_locally:
            return
        self._closed_locally = True
        logger.debug("%r: closing (code %#x, %s)", self, error_code, reason)
        with self._guard:
            self._quic.close(error_code=error_code, reason_phrase=reason)
        self._lost(
            ConnectionClosedError(
                f"connection closed locally: {reason or 'no reason'}",
                error_code=error_code,
                locally=True,
            )
        )
        self._after_input()

    @property
    def path_kept_small(self) -> bool:
        """Whether new connections to this peer's address keep to QUIC's minimum datagram
        size (its path seems to drop bigger ones: net/pathsize.py)."""
        return self._hooks.path_kept_small(self.remote_address)

    def stalled(self) -> None:
        """The daemon found the peer stalled on this connection (it owed data and sent
        none for its stall timeout); the caller closes or drops it. Said so that the
        endpoint can tell a path that loses big datagrams from a peer that stopped."""
        self._hooks.peer_stalled(self)

    def ping(self) -> None:
        """Send a PING: keeps an otherwise quiet connection from reaching its idle timeout
        (a folder link may carry nothing for hours between changes)."""
        if self._terminated or self._closed_locally:
            return
        self._pings += 1
        with self._guard:
            self._quic.send_ping(self._pings)
        self._after_input()

    async def responsive(self, timeout: float) -> bool:
        """Whether the peer acknowledges a PING within ``timeout`` seconds. A peer that
        restarted (or vanished) never does, while its old connection would only end at the
        idle timeout; the engine retransmits the PING on its own probe timer meanwhile."""
        if self._terminated or self._closed_locally or self._error is not None:
            return False
        if self._intake.paused:
            # We are not reading (the application is behind), so its datagrams wait
            # unprocessed: the peer is sending, the silence is ours.
            return True
        self._pings += 1
        uid = self._pings
        acknowledged = self._ping_acks[uid] = trio.Event()
        try:
            with self._guard:
                self._quic.send_ping(uid)
            self._after_input()
            with trio.move_on_after(timeout):
                await first_of(acknowledged, self._closed)
            return acknowledged.is_set() or (self._intake.paused and self._error is None)
        finally:
            self._ping_acks.pop(uid, None)

    def send_pending(self) -> None:
        """Transmit what the engine has queued (a new client's first flight)."""
        self._after_input()

    async def wait_authenticated(self) -> None:
        """Wait until the peer is authenticated; raise why not if the connection ended first."""
        await self.ready.wait()
        if not self._authenticated:
            assert self._error is not None
            raise self._error

    async def wait_closed(self) -> None:
        """Wait until the connection is closed by either side or lost."""
        await self._closed.wait()

    # -- inputs from the endpoint ---------------------------------------------------------

    def datagrams_received(self, datagrams: list[bytes], addr: Address, now: float) -> None:
        if self._terminated:
            return
        intake = self._intake
        if intake.resume_for_writer():
            self._resume_intake()
        if intake.paused:
            intake.hold((d, addr) for d in datagrams)
            return
        sizes = list(map(len, datagrams))
        self.bytes_received += sum(sizes)
        self.largest_datagram_received = max(self.largest_datagram_received, max(sizes, default=0))
        with self._guard:
            self._engine.receive(
                self._quic, datagrams, addr, now, batched=self.config.batched_receive
            )
        self._after_input()

    def gro_received(
        self, buffer: bytes, segment: int, addr: Address, now: float, *, settle: bool = True
    ) -> None:
        """A GRO run: datagrams of ``segment`` bytes each (the last may be shorter), all
        short-header packets for this connection, in one buffer. ``settle=False``: more of
        this connection's runs follow in the same read, so its events, transmit (an ACK)
        and timer wait for ``settle()`` after the last of them."""
        if self._terminated:
            return
        if (
            not self.config.batched_receive
            or self._intake.paused
            or self._intake.resume_for_writer()
        ):
            # The general path (it holds datagrams while paused, or resumes first).
            self.datagrams_received(
                [buffer[start : start + segment] for start in range(0, len(buffer), segment)],
                addr,
                now,
            )
            return
        self.bytes_received += len(buffer)
        if segment > self.largest_datagram_received:
            self.largest_datagram_received = min(segment, len(buffer))
        with self._guard:
            self._engine.receive_run(self._quic, buffer, segment, addr, now)
        self._unsettled = not settle
        if settle:
            self._after_input()

    def settle(self) -> None:
        """What ``gro_received(settle=False)`` left: events handed over, one transmit."""
        if self._unsettled:
            self._unsettled = False
            self._after_input()

    async def run_timer(self) -> None:
        """The connection's single timer: sleeps until the next deadline, never polls."""
        while not self._terminated:
            with trio.CancelScope(deadline=self._next_deadline()) as scope:
                self._timer_scope = scope
                await trio.sleep_forever()
            self._timer_scope = None
            if self._terminated:
                break
            self._on_timer(trio.current_time())

    # -- StreamOwner: called by Stream ----------------------------------------------------

    def stream_send(
        self, stream_id: int, pieces: Sequence[memoryview | bytes], *, end_stream: bool
    ) -> None:
        self._check_open()
        with self._guard:
            send = self._quic.send_stream_data
            for piece in pieces:
                send(stream_id, piece, end_stream=False)
            if end_stream:
                send(stream_id, b"", end_stream=True)
        self._check_open()
        if end_stream:
            self._maybe_forget(stream_id)
        self._after_input()

    def stream_abandon(
        self, stream_id: int, error_code: int, *, send_open: bool, receive_open: bool
    ) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            self._intake.forget(stream)
        if self._error is not None:
            return
        with self._guard:
            if send_open:
                self._quic.reset_stream(stream_id, error_code)
            if receive_open:
                self._quic.stop_stream(stream_id, error_code)
        self._after_input()

    def stream_backlog(self, stream_id: int) -> int:
        backlog = 0
        if self._error is None:
            with self._guard:
                backlog = self._engine.send_backlog(self._quic, stream_id)
        return backlog

    def stream_writer_blocked(self, stream: Stream) -> None:
        if self._intake.writer_blocked(stream):
            # The writer needs ACKs to make progress, and those are in the held datagrams.
            if self._processing:
                self._resume_pending = True
            else:
                self._resume_intake()

    def stream_consumed(self, stream: Stream, size: int) -> None:
        resume = self._intake.consumed(stream, size, stream.receive_buffered)
        if stream.receive_buffered == 0 and stream.receive_finished:
            self._maybe_forget(stream.stream_id)
        if resume:
            if self._processing:
                self._resume_pending = True
            else:
                self._resume_intake()

    # -- the input -> output cycle --------------------------------------------------------

    def _after_input(self) -> None:
        """Drain engine events, transmit, re-arm the timer, wake writers with room."""
        if self._processing or self._broken:
            return  # an outer _after_input is draining; it transmits at the end
        self._processing = True
        try:
            with self._guard:
                self._drain_and_transmit()
        finally:
            self._processing = False
        if self._broken:
            return
        if self._timer_scope is not None:
            self._timer_scope.deadline = self._next_deadline()
        if self._deferred_close is not None:
            code, reason = self._deferred_close
            self._deferred_close = None
            self.close_nowait(code, reason)
        if self._resume_pending:
            self._resume_pending = False
            self._resume_intake()

    def _drain_and_transmit(self) -> None:
        quic = self._quic
        dispatch = self._dispatch
        # Learn of a close first: handlers must not write to a closed engine (qh3 raises).
        if self._error is None:
            pending = self._engine.close_pending(quic)
            if pending is not None:
                self._lost(_closed_by_peer(pending))
        # Data for streams already open is gathered per stream and handed over once per
        # pass: a bulk transfer yields an event per packet or two, and per event the
        # stream and intake bookkeeping was a large share of the receiver's own work.
        gathered: dict[int, tuple[Stream, list[bytes], bool]] = {}
        data_type = self._stream_data_type
        streams = self._streams
        while not self._broken and (event := quic.next_event()) is not None:
            kind = type(event)
            if kind is data_type and self._authenticated and self._error is None:
                stream = streams.get(event.stream_id)
                if stream is not None and event.stream_id != self._auth_stream_id:
                    entry = gathered.get(event.stream_id)
                    if entry is None:
                        gathered[event.stream_id] = (stream, [event.data], event.end_stream)
                    else:
                        entry[1].append(event.data)
                        if event.end_stream:
                            gathered[event.stream_id] = (stream, entry[1], True)
                    continue
            if gathered:
                # Anything else (a reset, a new stream, a close) sees the data before it.
                self._hand_over(gathered)
                gathered = {}
            handler = dispatch.get(kind)
            if handler is not None:
                handler(event)
        if gathered and not self._broken:
            self._hand_over(gathered)
        if self._broken:
            return
        datagrams = self._engine.datagrams_to_send(quic, trio.current_time())
        if datagrams:
            self.bytes_sent += sum(len(datagram) for datagram, _address in datagrams)
            if datagrams[-1][1][:2] != self.remote_address[:2]:
                self._moved(datagrams[-1][1])
            self._hooks.transmit(datagrams)
        if self._intake.blocked_writers:
            self._intake.retain_blocked(lambda s: not s.send_room_maybe())

    def _moved(self, address: Address) -> None:
        """The engine now sends to ``address``: the peer's packets come from there (a NAT
        gave it a new port; RFC 9000, 9.3). ``remote_address`` follows, as the relay reads
        it at each datagram to tell a circuit's ends apart."""
        logger.info("%r: the peer moved to %s:%s", self, address[0], address[1])
        self.remote_address = address

    def _hand_over(self, gathered: dict[int, tuple[Stream, list[bytes], bool]]) -> None:
        for stream, parts, end_stream in gathered.values():
            if self._error is not None:
                return
            kept = stream.data_received_parts(parts, end_stream)
            if kept:
                self.stream_bytes_received += kept
                was_paused = self._intake.paused
                self._intake.received(stream, kept, stream.receive_buffered)
                if self._intake.paused and not was_paused:
                    logger.debug("%r: reader behind, pausing intake", self)

    def _next_deadline(self) -> float:
        if self._broken:
            return -math.inf  # wake the timer task at once: it sees the end and leaves
        timer = None
        with self._guard:
            timer = self._quic.get_timer()
        if self._broken:
            return -math.inf
        deadline: float = math.inf if timer is None else float(timer)
        if not self._authenticated and self._error is None:
            deadline = min(deadline, self._auth_deadline)
        return min(deadline, self._linger_deadline)

    def _on_timer(self, now: float) -> None:
        if now >= self._linger_deadline:
            self._finish()
            return
        with self._guard:
            timer = self._quic.get_timer()
            if timer is not None and timer <= now:
                self._quic.handle_timer(now=now)
        if self._broken:
            return
        if not self._authenticated and self._error is None and now >= self._auth_deadline:
            self._fail(
                ConnectionClosedError("handshake or authentication timed out"),
                CloseCode.TIMEOUT,
            )
            return
        self._after_input()

    # -- engine events --------------------------------------------------------------------

    def _on_handshake(self, event: Any) -> None:
        if self._error is not None:
            return
        if event.alpn_protocol != ALPN:
            self._fail(RemoteProtocolError("peer does not speak p2pfs/1"), CloseCode.PROTOCOL_ERROR)
            return
        if self.is_client:
            self._check_server_certificate()

    def _challenge(self) -> None:
        """Server: challenge the client on our first bidirectional stream at once. The
        engine sends it with the server's first flight (0.5-RTT data), so the client can
        answer with its Finished: a connection is 2 round trips, not 3 (the challenge
        waited for the handshake to complete)."""
        server = auth.ServerAuth(
            self._identity.node_id, os.urandom(auth.NONCE_LEN), _host_port(self.remote_address)
        )
        self._auth = server
        self._auth_stream_id = self._quic.get_next_available_stream_id()
        self._quic.send_stream_data(self._auth_stream_id, server.challenge)

    def _check_server_certificate(self) -> None:
        der = self._engine.peer_certificate_der(self._quic)
        try:
            presented = node_id_from_certificate_untrusted(der or b"")
        except AuthenticationError as exc:
            self._fail(exc, CloseCode.AUTH_FAILED)
            return
        if self._peer_id is None:
            self._peer_id = presented  # unpinned: whoever holds this key, proven by TLS
        elif presented != self._peer_id:
            error = AuthenticationError(f"expected peer {self._peer_id}, it is {presented}")
            self._fail(error, CloseCode.AUTH_FAILED)
            return
        self._auth = auth.ClientAuth(self._identity, presented, _host_port(self.remote_address))
        if self._early_auth or self._early_auth_end:
            early, self._early_auth = bytes(self._early_auth), bytearray()
            self._on_auth_data(early, self._early_auth_end)

    def _on_stream_data(self, event: Any) -> None:
        stream_id = event.stream_id
        if self._error is not None:
            return
        if stream_id == self._auth_stream_id:
            self._on_auth_data(event.data, event.end_stream)
            return
        if not self._authenticated or stream_id & 2:
            # Honest peers open nothing before authentication, and p2pfs uses no
            # unidirectional streams.
            self._fail(
                RemoteProtocolError(f"unexpected stream {stream_id}"), CloseCode.PROTOCOL_ERROR
            )
            return
        stream = self._streams.get(stream_id)
        if stream is None:
            if self._is_local(stream_id):
                return  # a stream we already finished with: late data, nobody wants it
            try:
                opens = self._peer_streams.opens(stream_id)
            except RemoteProtocolError as exc:
                self._fail(exc, CloseCode.PROTOCOL_ERROR)
                return
            if not opens:
                return  # the same, of the peer's
            stream = Stream(self, stream_id, self.config.send_buffer_limit)
            self._streams[stream_id] = stream
            data = event.data
            if data and data[0] in _CONTROL_KINDS:
                # A control stream: routed by its first byte, which no request stream can
                # start with (protocol/WIRE.md, "Control streams").
                try:
                    self._control_send.send_nowait((ControlKind(data[0]), stream))
                except trio.WouldBlock:
                    logger.info("%r: too many control streams waiting, resetting one", self)
                    self._streams.pop(stream_id, None)
                    self._quic.reset_stream(stream_id, STREAM_BUSY)
                    self._quic.stop_stream(stream_id, STREAM_BUSY)
                    return
                data = data[1:]
            else:
                self._incoming_send.send_nowait(stream)
            kept = stream.data_received(data, event.end_stream)
        else:
            kept = stream.data_received(event.data, event.end_stream)
        if kept:
            self.stream_bytes_received += kept
            was_paused = self._intake.paused
            self._intake.received(stream, kept, stream.receive_buffered)
            if self._intake.paused and not was_paused:
                logger.debug("%r: reader behind, pausing intake", self)

    def _on_stream_reset(self, event: Any) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream.peer_reset(event.error_code)

    def _on_stop_sending(self, event: Any) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is not None and self._error is None:
            stream.peer_stop_sending(event.error_code)
            self._intake.writer_gone(stream)
            # RFC 9000 3.5: answer STOP_SENDING with RESET_STREAM, unless our side of the
            # stream is already complete (FIN sent): the engines refuse that with ValueError,
            # and a peer must not be able to crash the endpoint by asking.
            try:
                self._quic.reset_stream(event.stream_id, event.error_code)
            except ValueError:
                logger.debug("%r: STOP_SENDING for finished stream %d", self, event.stream_id)

    def _on_cid_issued(self, event: Any) -> None:
        self.cids.add(event.connection_id)
        self._hooks.register_cid(event.connection_id, self)

    def _on_cid_retired(self, event: Any) -> None:
        self.cids.discard(event.connection_id)
        self._hooks.unregister_cid(event.connection_id)

    def _on_ping_acknowledged(self, event: Any) -> None:
        acknowledged = self._ping_acks.get(event.uid)
        if acknowledged is not None:
            acknowledged.set()

    def _on_terminated(self, event: Any) -> None:
        if self._error is None:
            self._lost(_closed_by_peer(event))
        self._finish()

    # -- authentication -------------------------------------------------------------------

    def _on_auth_data(self, data: bytes, end_stream: bool) -> None:
        if self._authenticated or self._error is not None:
            return  # the server's trailing FIN, or nothing we care about
        assert self._auth_stream_id is not None
        if self._auth is None:
            # A client: the server's challenge came with its first flight, and this engine
            # handed it over before the handshake's end (it may: the datagram that carries
            # the server's Finished carries the challenge too). Kept for the handshake.
            self._early_auth += data
            self._early_auth_end = end_stream
            if len(self._early_auth) > auth.NONCE_LEN + auth.MAX_ACCEPT_LEN:
                error = AuthenticationError("oversized authentication data before the handshake")
                self._fail(error, CloseCode.AUTH_FAILED)
            return
        try:
            step = self._auth.receive_untrusted(data, end_stream)
        except AuthenticationError as exc:
            self._fail(exc, CloseCode.AUTH_FAILED)
            return
        if step.send:
            self._quic.send_stream_data(self._auth_stream_id, step.send, end_stream=True)
        if step.done is None:
            return
        self._peer_id = step.done.peer
        self.observed_address = step.done.observed
        self._authenticated = True
        logger.debug("%r: authenticated %s", self, "server" if self.is_client else "client")
        self.ready.set()
        if not self.is_client:
            self._hooks.connection_ready(self)

    # -- endings --------------------------------------------------------------------------

    def _fail(self, error: P2pfsError, code: int) -> None:
        """Close because of ``error``, which pending and future operations then raise."""
        logger.info("%r: %s", self, error)
        if self._error is None:
            self._lost(error)
        if self._processing:
            # Let this pass's datagrams (a client's TLS Finished above all) go out first:
            # a peer still in its handshake cannot read a 1-RTT CONNECTION_CLOSE and would
            # wait for its timeout instead.
            self._deferred_close = (code, str(error)[:100])
        else:
            self.close_nowait(code, str(error)[:100])

    def _engine_failed(self, exc: BaseException) -> None:
        """The engine raised on some input: this connection is over, nothing else is.

        Its state may be half-updated, so it is never called again (not even to send a
        CONNECTION_CLOSE): the peer, if it is one, times out.
        """
        if self._broken:
            return
        self._broken = True
        host, port = self.remote_address[0], self.remote_address[1]
        logger.warning(
            "connection with %s:%s dropped: the QUIC engine failed (%s)", host, port, describe(exc)
        )
        self._hooks.engine_failed(self)
        self._lost(ConnectionClosedError(f"QUIC engine failed: {type(exc).__name__}"))
        self._finish()

    def _lost(self, error: P2pfsError) -> None:
        if self._error is None:
            self._error = error
        error = self._error
        for stream in list(self._streams.values()):
            stream.connection_lost(error)
        self._intake.lost()
        self._incoming_send.close()
        self._control_send.close()
        # Keep routing its ids a little while (late packets, our retransmitted close), then
        # forget it even if the engine's draining period would take longer.
        self._linger_deadline = min(self._linger_deadline, trio.current_time() + CLOSE_LINGER)
        self.ready.set()
        self._closed.set()

    def _finish(self) -> None:
        """Forget the connection: no more datagrams are routed to it."""
        if self._terminated:
            return
        if self._error is None:
            self._lost(ConnectionClosedError("connection terminated"))
        self._terminated = True
        if self._timer_scope is not None:
            self._timer_scope.cancel()
        self._hooks.connection_finished(self)

    def _resume_intake(self) -> None:
        intake = self._intake
        held = intake.resume()
        logger.debug("%r: reader caught up, feeding %d held datagrams", self, len(held))
        now = trio.current_time()
        while held and not intake.paused and not self._terminated:
            addr = held[0][1]
            batch: list[bytes] = []
            while held and held[0][1] == addr and len(batch) < self.config.receive_batch:
                batch.append(held.popleft()[0])
            with self._guard:
                self._engine.receive(
                    self._quic, batch, addr, now, batched=self.config.batched_receive
                )
            self._after_input()
        if held and not self._terminated:
            intake.put_back(held)

    def _maybe_forget(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if (
            stream is not None
            and stream.send_finished
            and stream.receive_finished
            and not stream.receive_buffered
        ):
            del self._streams[stream_id]

    def _is_local(self, stream_id: int) -> bool:
        return (stream_id & 1) == (0 if self.is_client else 1)

    def _check_open(self) -> None:
        if self._error is not None:
            raise self._error


TUNNEL_PREFIX = "100::"
"""Tunnel addresses (a relay's circuits, see net/tunnel.py) are drawn from RFC 6666's
discard-only 100::/64, which no real datagram on either socket family can come from."""


def is_tunnel(address: Address) -> bool:
    return isinstance(address[0], str) and address[0].startswith(TUNNEL_PREFIX)


def _host_port(address: Address) -> auth.Observed:
    return str(address[0]), int(address[1])


def _closed_by_peer(event: Any) -> ConnectionClosedError:
    reason = getattr(event, "reason_phrase", "") or "no reason"
    return ConnectionClosedError(
        f"connection closed: {reason} (code {event.error_code:#x})",
        error_code=event.error_code,
    )


def _datagram_size(item: tuple[bytes, Address]) -> int:
    return len(item[0])
