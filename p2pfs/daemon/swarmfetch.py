"""Fetching pieces from every holder at once (BitTorrent-style), decided by the PiecePicker.

One worker per connected peer: it subscribes to the peer's availability (GetHave), then runs
a few request streams, each asking for what the picker hands this peer (rarest first,
endgame duplicates at the end) in requests sized by the peer's measured bandwidth-delay
product (PipelineController), so a fast peer is kept busy and a slow one holds little.
A peer that fails (disconnects, stalls, refuses) has its outstanding pieces returned to the
pool at once; one that sends a chunk failing verification is disconnected and never used
again for this share. New holders found by discovery join while the fetch runs.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from p2pfs.address import PeerAddress
from p2pfs.content.chunking import ChunkRef
from p2pfs.errors import (
    ConnectionClosedError,
    IntegrityError,
    P2pfsError,
    RemoteProtocolError,
    StorageError,
    first_leaf,
)
from p2pfs.ids import ContentHash, NodeId
from p2pfs.net import PeerConnection
from p2pfs.swarm.picker import PiecePicker
from p2pfs.swarm.pipeline import PipelineController
from p2pfs.swarm.stripes import stripes_for
from p2pfs.wire.codes import ErrorCode
from p2pfs.wire.messages import (
    ChunkData,
    ErrorReply,
    GetChunks,
    GetHave,
    HaveReply,
    HaveUpdate,
    Message,
)

from .dialer import DialError
from .liveness import TRANSFER_QUIET_AFTER, close_when_silent
from .ratelimit import TokenBucket, throttle
from .requests import PeerRequestError, RequestStream
from .streams import TransferCounters
from .workers import WorkerEndedError, WorkerLink, WorkerPool

logger = logging.getLogger(__name__)

STREAMS_PER_PEER = 4
REQUESTS_IN_FLIGHT = 2
"""Per stream: the next request is queued at the peer before the current one is answered."""
PLACING_PER_STREAM = 2
"""Per stream: answered requests whose pieces are being verified and written while the
stream reads on (bounds the memory a slow disk can hold)."""
MAX_REQUEST_CHUNKS = 64
MIN_REQUEST_BYTES = 512 << 10
"""Small pieces are asked for in batches at least this big: per-request costs dominate below."""
INITIAL_IN_FLIGHT = 4 << 20
MIN_IN_FLIGHT = 2 << 20
MAX_IN_FLIGHT = 64 << 20
QUEUE_SECONDS = 0.5
"""In flight to a peer: its bandwidth-delay product, but at least QUEUE_SECONDS of its
measured delivery rate. On loopback the per-request cost, not the path, is the delay, so BDP
alone starves a fast peer; a slow peer (a rate-limited seeder) then holds only half a second
of work, which keeps pieces free for faster peers to supply."""
STALL_TIMEOUT = 10.0
"""A peer that sends nothing for this long while we wait on it has failed."""
HAVE_TIMEOUT = 10.0
REDISCOVER_INTERVAL = 2.0
"""How often discovery is asked again for holders while a fetch runs (late joiners)."""
MAX_PEERS = 16
GIVE_UP_AFTER = 60.0
"""A fetch ends (resumable) once no piece, nor any byte of a reply, has arrived for this
long: every holder found is gone, refuses, or lacks what is missing."""
REST_AFTER_REFUSAL = 30.0
"""A holder that refused is not dialled again for this long (a refusing holder re-dialled
every round would loop forever)."""
WORKER_FAILURES = 3
"""Worker processes that may die or fail in one fetch before it stops using workers (a
worker failing the same way each time would otherwise be replaced in a loop)."""
FRAME_OVERHEAD = 16
"""Approximate framing bytes of one ChunkData (length, tag, fields), for the counters."""

Place = Callable[[list[tuple[int, bytes | memoryview]], NodeId], Awaitable[None]]
"""Verify and write arrived pieces (raising IntegrityError, writing nothing, if any fails)."""
MorePeers = Callable[[set[NodeId], Callable[[PeerConnection], None]], Awaitable[None]]
"""Connect to holders not yet connected (those named are excluded), handing each
connection over as soon as it is up."""
Release = Callable[[PeerConnection], None]
"""The pool is done with a connection (whoever else uses it keeps it)."""
OpenStripe = Callable[[PeerConnection], Awaitable[PeerConnection]]
"""One more connection to the peer of the one given (the same address, its NodeId pinned)."""
Reconnect = Callable[[NodeId, PeerConnection], PeerConnection | None]
"""Another open connection to a peer than the one given (which ended), leased to the
fetch; None if there is none."""


@dataclass(slots=True)
class Lane:
    """One connection's part of fetching from a peer: its own pipeline (the rate and round
    trip of its own window), whom the picker hands its pieces to (the peer, or a stripe's
    own seat), and over how many connections the peer is fetched (they share its floor)."""

    seat: Hashable
    pipeline: PipelineController = field(default_factory=PipelineController)
    connections: int = 1


def request_count(lane: Lane, average_piece: int) -> int:
    """How many pieces to ask a peer for now (0: wait for room). The peer's bandwidth-delay
    product bounds what is in flight to it (all streams together): a slow peer holds few
    pieces, a fast one many. A request waits for room for half a share at least: asking as
    soon as any 512 KiB was free made requests of ~6 chunks on a fast peer, each paying its
    round of lookups, reads and a write on both sides."""
    target = in_flight_target(lane.pipeline, lane.connections)
    room = target - lane.pipeline.in_flight
    share = target // (STREAMS_PER_PEER * REQUESTS_IN_FLIGHT)
    if room < min(max(MIN_REQUEST_BYTES, share // 2), target):
        return 0
    wanted_bytes = min(room, max(MIN_REQUEST_BYTES, share))
    return max(1, min(MAX_REQUEST_CHUNKS, wanted_bytes // average_piece))


class WorkerPlacement(Protocol):
    """The fetch's side of data-plane workers: where pieces go, and what landed."""

    async def targets(self, pieces: list[int]) -> list[list[tuple[int, int]]]:
        """Per piece, its (file number, offset) slots; their temp files exist when this
        returns."""
        ...

    def file_info(self, number: int) -> tuple[str, tuple[int, int]]:
        """A file number's temp path and (st_dev, st_ino)."""
        ...

    async def landed(self, pieces: list[int], peer: NodeId, gone: set[int]) -> None:
        """A worker verified and wrote these pieces (``gone``: temp files it found gone)."""
        ...


def close_connection(conn: PeerConnection) -> None:
    """The default release: nobody else uses the connection."""
    conn.close_nowait(0, "fetch done with it")


class PeerStalledError(RemoteProtocolError):
    """The peer stopped answering while requests were outstanding."""


class HoldersExhaustedError(RemoteProtocolError):
    """No reachable holder served a missing piece for ``GIVE_UP_AFTER`` seconds."""


@dataclass(slots=True)
class PeerStats:
    node_id: str
    address: str
    bytes: int = 0
    requests: int = 0
    pieces_requested: int = 0
    failed: str | None = None
    worker: int | None = None
    """The pid of the worker process fetching from this peer (None: the daemon itself)."""
    connections: int = 1
    """Connections this fetch ran to the peer: the first and its stripes (swarm/stripes.py)."""


@dataclass(frozen=True, slots=True)
class Subscribed:
    """A GetHave already sent to a peer (its reply not read yet), and a round trip to the
    peer measured before (for the stripes' plan in place of GetHave's)."""

    stream: RequestStream
    round_trip: float

    def cancel(self) -> None:
        """Not needed after all: the peer ends its subscription."""
        self.stream.stream.reset(int(ErrorCode.CANCELLED))


async def subscribe_early(
    conn: PeerConnection, root: ContentHash, counters: TransferCounters
) -> RequestStream:
    """Send GetHave for ``root`` on a new stream; the reply is read later. A fetch sends it
    to its first holder right after the manifest: the reply then waits while the trees are
    walked, and the transfer starts without that round trip."""
    have = await RequestStream.open(conn, counters)
    await have.send(GetHave(have.new_request_id(), root))
    return have


@dataclass(slots=True)
class PeerPool:
    root: ContentHash
    pieces: list[ChunkRef]
    picker: PiecePicker
    counters: TransferCounters
    place: Place
    download_limit: TokenBucket | None = None
    release: Release = close_connection
    give_up_after: float = GIVE_UP_AFTER
    workers: WorkerPool | None = None
    """Set: each direct peer's requests run in a worker process while one is free."""
    placement: WorkerPlacement | None = None
    open_stripe: OpenStripe | None = None
    """Dials one more connection to a peer (its address, its NodeId pinned); None: no
    stripes."""
    reconnect: Reconnect | None = None
    """Set: a peer whose connection ends goes on over another open one at once."""
    max_stripes: int = 1
    """Connections to one peer at most (swarm/stripes.py decides how many below that)."""
    stats: dict[NodeId, PeerStats] = field(default_factory=dict)
    banned: set[NodeId] = field(default_factory=set)
    resting: dict[NodeId, float] = field(default_factory=dict)
    """Holders that failed, and until when they are not dialled again."""
    _last_progress: float = 0.0
    _connected: dict[NodeId, PeerConnection] = field(default_factory=dict)
    _change: trio.Event = field(default_factory=trio.Event)
    _done: trio.Event = field(default_factory=trio.Event)
    _need_peers: trio.Event = field(default_factory=trio.Event)
    _last_error: P2pfsError | None = None
    _local_error: StorageError | None = None
    """Our own disk failed (full, read-only, a directory in the way): the fetch ends with
    it; no peer is blamed or dropped for it, and asking other peers would not help."""
    _nursery: trio.Nursery | None = None
    _worker_failures: int = 0

    async def run(
        self, first: PeerConnection, more: MorePeers, subscribed: Subscribed | None = None
    ) -> None:
        """Until every piece is held; raises the last peer's failure if holders run out.
        ``subscribed``: ``first``'s GetHave, already sent (subscribe_early)."""
        if self.picker.complete:
            if subscribed is not None:
                subscribed.cancel()
            self.release(first)
            return
        self._last_progress = trio.current_time()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.add(first, subscribed)
            nursery.start_soon(self._discover, more)
            nursery.start_soon(self._give_up_when_idle)
            await self._done.wait()
            nursery.cancel_scope.cancel()
        for conn in self._connected.values():
            self.release(conn)
        if self._local_error is not None:
            raise self._local_error
        if not self.picker.complete:
            missing = sum(1 for p in range(len(self.pieces)) if not self.picker.holds(p))
            why = f" (last: {self._last_error})" if self._last_error else ""
            raise HoldersExhaustedError(
                f"no reachable holder served any of the {missing} missing pieces for "
                f"{self.give_up_after:g} s{why}"
            )

    def add(self, conn: PeerConnection, subscribed: Subscribed | None = None) -> None:
        peer = conn.peer_id
        if peer in self.banned or peer in self._connected or len(self._connected) >= MAX_PEERS:
            if subscribed is not None:
                subscribed.cancel()
            self.release(conn)
            return
        assert self._nursery is not None
        self._connected[peer] = conn
        self.stats[peer] = PeerStats(str(peer), peer_address_text(conn))
        self._nursery.start_soon(self._worker, conn, subscribed)

    def _changed(self) -> None:
        """Wake every request loop waiting for something to do."""
        self._change.set()
        self._change = trio.Event()
        if self.picker.complete:
            self._done.set()

    async def _discover(self, more: MorePeers) -> None:
        """Ask for more holders now, every REDISCOVER_INTERVAL, and whenever the last
        connected holder is lost."""
        while not self.picker.complete:
            now = trio.current_time()
            resting = {peer for peer, until in self.resting.items() if until > now}
            await more(set(self._connected) | self.banned | resting, self.add)
            with trio.move_on_after(REDISCOVER_INTERVAL):
                await self._need_peers.wait()
            self._need_peers = trio.Event()

    def _still_coming(self) -> None:
        """A reply is slow to arrive but its bytes keep coming: no reason to give up."""
        self._last_progress = trio.current_time()

    async def _give_up_when_idle(self) -> None:
        """End the fetch once no piece has arrived for give_up_after seconds (holders gone,
        refusing, or lacking what is missing). Checked on its own: between discovery
        rounds, a round's dials to dead candidates made a 5 s give-up take 8.6 s."""
        while True:
            idle = trio.current_time() - self._last_progress
            if idle >= self.give_up_after:
                self._done.set()
                return
            await trio.sleep(self.give_up_after - idle)

    async def _worker(self, conn: PeerConnection, subscribed: Subscribed | None = None) -> None:
        peer = conn.peer_id
        joined = False
        carry_on = False
        try:
            have, reply, answered = await self._availability(conn, subscribed)
            self.picker.add_peer(peer, None if reply.complete else reply.pieces())
            joined = True
            self._changed()
            # Decided before the first request: a first connection that starts alone queues
            # the whole in-flight budget (4 MiB), which on a slow window is its tail.
            stripes = self._stripes_for(conn, peer, reply.complete, answered)
            lane = Lane(peer, connections=stripes)
            worker = self._worker_for(conn, seeder=reply.complete)
            async with worker as link, trio.open_nursery() as nursery:
                nursery.start_soon(self._follow_updates, have, peer)
                # A holder that crashed or lost its relay is dropped in ~4 s, not at the
                # stall timeout (its pieces go to the others at once).
                nursery.start_soon(close_when_silent, conn, TRANSFER_QUIET_AFTER)
                if link is not None:
                    nursery.start_soon(self._remote_loop, link, conn, peer, lane)
                else:
                    for _ in range(STREAMS_PER_PEER):
                        nursery.start_soon(self._request_loop, conn, peer, lane)
                for number in range(1, stripes):
                    nursery.start_soon(
                        self._stripe, conn, peer, Lane((peer, number), connections=stripes)
                    )
        except* StorageError as group:
            self._stop_for_local_error(group, conn)
        except* IntegrityError as group:
            self.counters.chunks_rejected += 1
            self._fail(peer, group, ban=True)
            conn.close_nowait(int(ErrorCode.INTEGRITY), "sent data that fails verification")
        except* WorkerEndedError as group:
            # Our worker process died, not the peer: the peer is dialled again at once (a
            # fresh worker takes it, or this process after WORKER_FAILURES of them).
            self._worker_failures += 1
            self._fail(peer, group, ban=False)
            self.release(conn)
            carry_on = True
            self._need_peers.set()
        except* PeerRequestError as group:
            # It answered, and said no (it does not hold the share, or no longer this
            # version): asking again at once would only loop.
            self._fail(peer, group, ban=False)
            self.resting[peer] = trio.current_time() + REST_AFTER_REFUSAL
            self.release(conn)
        except* (P2pfsError, trio.TooSlowError) as group:
            # Stalled or disconnected: often transient (a lost packet, a restart), and it may
            # be the only holder, so it is dialled again at once; give_up_after bounds it.
            self._fail(peer, group, ban=False)
            if conn.path == "relayed":
                # A relayed path that stalls has most likely lost its relay; closing it lets
                # the next dial take another relay now, not after the idle timeout.
                conn.close_nowait(0, "relayed path stalled")
            self.release(conn)
            carry_on = True
        finally:
            self._worker_ended(peer, conn, joined=joined, carry_on=carry_on)

    def _worker_ended(
        self, peer: NodeId, ended: PeerConnection, *, joined: bool, carry_on: bool
    ) -> None:
        """``carry_on``: the connection failed, not the peer, so if another connection to
        it is open (the punched path that replaced its relay, one it made to us) the peer
        goes on over that one at once. Waiting for the next discovery round cost a dial
        timeout per dead candidate: a punched fetch stalled 10 s on a relay that had gone."""
        if joined:
            self.picker.remove_peer(peer)
        del self._connected[peer]
        self._changed()
        if carry_on and self.reconnect is not None and not self._done.is_set():
            other = self.reconnect(peer, ended)
            if other is not None:
                logger.info("peer %s carries on over its %s path", peer.short(), other.path)
                self.add(other)
        if not self._connected:
            self._need_peers.set()  # the last holder went: look for others at once

    def _stop_for_local_error(
        self, group: BaseExceptionGroup[StorageError], conn: PeerConnection
    ) -> None:
        """Writing here failed: a local fault, not the peer's (it was counted as a peer
        failure: the peer dropped and dialled again while the fetch went on failing)."""
        error = first_leaf(group)
        if self._local_error is None:
            self._local_error = error
            logger.warning("fetch: stopping, cannot write here: %s", error)
        self.release(conn)
        self._done.set()

    async def _availability(
        self, conn: PeerConnection, subscribed: Subscribed | None
    ) -> tuple[RequestStream, HaveReply, float]:
        """The peer's GetHave stream, its HaveReply and a round trip to it: subscribed now,
        or the reply read to a GetHave sent earlier (``subscribed``)."""
        if subscribed is not None:
            return (
                subscribed.stream,
                await self._have_reply(subscribed.stream),
                subscribed.round_trip,
            )
        asked = trio.current_time()
        have = await subscribe_early(conn, self.root, self.counters)
        reply = await self._have_reply(have)
        return have, reply, trio.current_time() - asked

    async def _have_reply(self, have: RequestStream) -> HaveReply:
        """The HaveReply to a GetHave sent on ``have``: what the peer holds now (its updates
        follow on the same stream)."""
        with trio.fail_after(HAVE_TIMEOUT):
            reply = await have.next_reply()
        if isinstance(reply, ErrorReply):
            raise PeerRequestError(reply.code, reply.message)
        assert isinstance(reply, HaveReply)
        if reply.piece_count != len(self.pieces):
            raise RemoteProtocolError(
                f"peer numbers {reply.piece_count} pieces, the trees give {len(self.pieces)}"
            )
        return reply

    def _fail(self, peer: NodeId, group: BaseExceptionGroup[BaseException], ban: bool) -> None:
        error = first_leaf(group)
        if isinstance(error, trio.TooSlowError):
            error = PeerStalledError(f"peer {peer.short()} did not answer GetHave in time")
        assert isinstance(error, P2pfsError)
        self._last_error = error
        self.stats[peer].failed = str(error)
        if ban:
            self.banned.add(peer)
            logger.warning("peer %s sent a chunk that fails verification: not used again", peer)
        else:
            logger.info("peer %s dropped: %s", peer.short(), error)

    async def _follow_updates(self, have: RequestStream, peer: NodeId) -> None:
        while True:
            update = await have.next_reply()
            if isinstance(update, ErrorReply):
                return  # the peer ended its subscription: what it said so far stands
            assert isinstance(update, HaveUpdate)
            for piece in update.pieces:
                self.picker.peer_has(peer, piece)
            self._changed()

    def _pick(self, seat: Hashable, count: int) -> list[int]:
        """Up to ``count`` pieces to ask ``seat`` for. Endgame duplicates go only to a seat
        with nothing outstanding: with no way to recall a request, duplicating to every
        seat with room (each holding half a second of its rate, up to 64 MiB) started the
        endgame with a third of a 512 MiB fetch from three seeders still to come and had
        them send 1.5x the file."""
        if not count:
            return []
        return self.picker.pick(seat, count, endgame=self.picker.idle(seat))

    async def _request_loop(
        self,
        conn: PeerConnection,
        peer: NodeId,
        lane: Lane,
    ) -> None:
        """One stream: a sender keeps REQUESTS_IN_FLIGHT requests queued at the peer (so it
        never idles between them), the replies are read in order as they come."""
        seat, pipeline = lane.seat, lane.pipeline
        stream = await RequestStream.open(conn, self.counters)
        average = max(1, sum(p.length for p in self.pieces) // max(1, len(self.pieces)))
        in_flight_send, in_flight = trio.open_memory_channel[tuple[list[int], float]](
            REQUESTS_IN_FLIGHT - 1
        )
        outstanding: list[list[int]] = []

        async def sender() -> None:
            async with in_flight_send:
                while not self.picker.complete:
                    count = request_count(lane, average)
                    picked = self._pick(seat, count)
                    if not picked:
                        await self._change.wait()
                        continue
                    refs = tuple(self.pieces[piece] for piece in picked)
                    now = trio.current_time()
                    pipeline.on_request(sum(ref.length for ref in refs), now)
                    outstanding.append(picked)
                    self.stats[peer].requests += 1
                    self.stats[peer].pieces_requested += len(picked)
                    await stream.send(GetChunks(stream.new_request_id(), self.root, refs))
                    try:
                        await in_flight_send.send((picked, now))
                    except trio.BrokenResourceError:
                        return  # the reader stopped; its own error says why

        # A batch's verification and write run beside the stream, which goes on reading
        # the next reply: waiting for each write stalled the stream (issue 13's small
        # files: a batch of 64 files took 40-160 ms to write and account, its reading
        # 10-80 ms, and the two added up per stream).
        placing = trio.Semaphore(PLACING_PER_STREAM)

        async def place(arrived: list[tuple[int, bytes | memoryview]], picked: list[int]) -> None:
            try:
                await self._place_batch(peer, arrived, picked, seat)
                outstanding.remove(picked)
            finally:
                placing.release()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender)
                async with in_flight:
                    async for picked, sent_at in in_flight:
                        arrived = await self._receive(conn, stream, peer, picked, sent_at, pipeline)
                        await placing.acquire()
                        nursery.start_soon(place, arrived, picked)
        except BaseException:
            for picked in outstanding:
                self.picker.failed(seat, [p for p in picked if not self.picker.holds(p)])
            raise
        await stream.close()

    async def _receive(
        self,
        conn: PeerConnection,
        stream: RequestStream,
        peer: NodeId,
        picked: list[int],
        sent_at: float,
        pipeline: PipelineController,
    ) -> list[tuple[int, bytes | memoryview]]:
        """A request's replies, read in order; the pieces not held yet, with their data."""
        arrived: list[tuple[int, bytes | memoryview]] = []
        for piece in picked:
            reply = stream.buffered_reply()
            if reply is None:
                reply = await _reply_unless_stalled(conn, stream, peer, self._still_coming)
            if isinstance(reply, ErrorReply):
                raise PeerRequestError(reply.code, reply.message)
            assert isinstance(reply, ChunkData)  # the session checked order and length
            self.counters.payload_received += len(reply.payload)
            conn.payload_received += len(reply.payload)
            self.counters.protocol_received += FRAME_OVERHEAD
            self.counters.chunks_received += 1
            if self.download_limit is not None:
                # Waiting here stops reading the stream, so flow control slows the sender.
                await throttle(self.download_limit, len(reply.payload))
            if not self.picker.holds(piece):
                # The payload is a view into the frame's own copy: no further copy needed.
                arrived.append((piece, reply.payload))
            now = trio.current_time()
            pipeline.on_response(len(reply.payload), now - sent_at, now)
        return arrived

    async def _place_batch(
        self,
        peer: NodeId,
        arrived: list[tuple[int, bytes | memoryview]],
        picked: list[int],
        seat: Hashable,
    ) -> None:
        """Verify and write a request's new pieces, then count them held."""
        if arrived:
            await self.place(arrived, peer)
            self.stats[peer].bytes += sum(len(data) for _piece, data in arrived)
            self._last_progress = trio.current_time()
        for piece in picked:
            self.picker.received(piece, seat)
        self._changed()

    # -- stripes: more connections to one peer on a long path ----------------------------

    def _stripes_for(
        self, conn: PeerConnection, peer: NodeId, seeder: bool, answered: float
    ) -> int:
        """How many connections to run to ``peer`` (swarm/stripes.py), from the round trip
        its GetHave took and the engine's latest sample (each is the path's plus whatever
        delay the peer added, so the smaller is taken). Only a peer that holds the whole
        share: each stripe is a seat of its own in the picker, and a seeder's seats need
        no availability updates."""
        if self.open_stripe is None or self.max_stripes <= 1 or not seeder:
            return 1
        sample = conn.latest_rtt
        rtt = answered if sample is None else min(answered, sample)
        average = sum(p.length for p in self.pieces) // max(1, len(self.pieces))
        plan = stripes_for(
            rtt,
            relayed=conn.path == "relayed",
            max_stripes=self.max_stripes,
            peers=len(self._connected),
            remaining_bytes=self.picker.missing * average,
        )
        if plan.stripes > 1:
            logger.info("peer %s: %d connections (%s)", peer.short(), plan.stripes, plan.reason)
        else:
            logger.debug("peer %s: one connection (%s)", peer.short(), plan.reason)
        return plan.stripes

    async def _stripe(self, conn: PeerConnection, peer: NodeId, lane: Lane) -> None:
        """One more connection to ``peer`` running requests as the first does (in a worker
        process while one is free). A stripe that cannot be opened, stalls or loses its
        connection ends alone, its pieces back in the pool, while the first connection
        carries on; what else it raises is the peer's (a bad chunk bans the peer).

        Each connection has a pipeline of its own: its rate and round trip are its own
        window's, and with one pipeline for the peer the first connection's requests took
        the whole in-flight budget (on an 80 ms path with 1% loss the stripes got none).
        And a seat of its own in the picker (the peer's NodeId and the stripe's number):
        pieces queued on a slow connection at the end are asked again on an idle one (the
        endgame), as they would be of another peer."""
        assert self.open_stripe is not None
        stats = self.stats[peer]
        seat = lane.seat
        self.picker.add_peer(seat, None)
        try:
            async with self._worker_for(conn, seeder=True) as link:
                if link is not None:
                    stats.connections += 1
                    await self._remote_loop(link, conn, peer, lane)
                    return
            extra = await self.open_stripe(conn)
            stats.connections += 1
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(close_when_silent, extra, TRANSFER_QUIET_AFTER)
                    async with trio.open_nursery() as requests:
                        for _ in range(STREAMS_PER_PEER):
                            requests.start_soon(self._request_loop, extra, peer, lane)
                    nursery.cancel_scope.cancel()
            finally:
                self.release(extra)
        except* (DialError, ConnectionClosedError, PeerStalledError) as group:
            logger.info("peer %s: a stripe ended: %s", peer.short(), first_leaf(group))
        finally:
            self.picker.remove_peer(seat)  # what it had outstanding goes back to the pool
            self._changed()

    # -- data-plane workers ---------------------------------------------------------------

    @asynccontextmanager
    async def _worker_for(
        self, conn: PeerConnection, *, seeder: bool
    ) -> AsyncIterator[WorkerLink | None]:
        """A worker process for this peer's requests, or None (this process fetches):
        workers off or all busy, a peer still fetching the share itself (it will ask us for
        pieces, and its dialer may pick the worker's connection to us, which serves
        nothing), WORKER_FAILURES workers dead in this fetch, a relayed path (a worker
        dials addresses only), or a download limit (the bucket lives here)."""
        if (
            self.workers is None
            or self.placement is None
            or not seeder
            or self._worker_failures >= WORKER_FAILURES
            or not self.workers.available
            or conn.path == "relayed"
            or self.download_limit is not None
        ):
            yield None
            return
        async with self.workers.session(
            conn.peer_id,
            conn.dial_address,
            self.root,
            streams=STREAMS_PER_PEER,
            in_flight=REQUESTS_IN_FLIGHT,
            stall=STALL_TIMEOUT,
            small_path=conn.path_kept_small,
        ) as link:
            if link is not None:
                self.stats[conn.peer_id].worker = link.pid
            yield link

    async def _remote_loop(
        self,
        link: WorkerLink,
        conn: PeerConnection,
        peer: NodeId,
        lane: Lane,
    ) -> None:
        """The request loop's picking and accounting, with the requests, verification and
        writes in the worker: batches go out as the pipeline has room, landed batches are
        counted as if received here; a failed or vanished worker fails this peer."""
        seat, pipeline = lane.seat, lane.pipeline
        assert self.placement is not None
        placement = self.placement
        average = max(1, sum(p.length for p in self.pieces) // max(1, len(self.pieces)))
        outstanding: dict[int, tuple[list[int], float]] = {}
        numbers = itertools.count()

        async def dispatch() -> None:
            while not self.picker.complete:
                count = request_count(lane, average)
                picked = self._pick(seat, count)
                if not picked:
                    await self._change.wait()
                    continue
                refs = [self.pieces[piece] for piece in picked]
                now = trio.current_time()
                pipeline.on_request(sum(ref.length for ref in refs), now)
                number = next(numbers)
                outstanding[number] = (picked, now)
                self.stats[peer].requests += 1
                self.stats[peer].pieces_requested += len(picked)
                targets = await placement.targets(picked)
                await link.send_batch(number, refs, targets, placement.file_info)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(dispatch)
                while True:
                    report = await link.next_report()
                    batch = landed_batch(report, outstanding, link, peer)
                    await self._landed(conn, peer, *batch, report, pipeline, seat)
        except BaseException as exc:
            if isinstance(exc, PeerStalledError):
                # The worker's endpoint ends with it: this process's learns of a path that
                # drops big datagrams (the next worker is then told to keep it small).
                conn.stalled()
            for picked, _sent_at in outstanding.values():
                self.picker.failed(seat, [p for p in picked if not self.picker.holds(p)])
            raise

    async def _landed(
        self,
        conn: PeerConnection,
        peer: NodeId,
        picked: list[int],
        sent_at: float,
        report: dict[str, Any],
        pipeline: PipelineController,
        seat: Hashable,
    ) -> None:
        size = int(report["bytes"])
        self.counters.payload_received += size
        conn.payload_received += size
        self.counters.protocol_received += FRAME_OVERHEAD * len(picked)
        self.counters.chunks_received += len(picked)
        now = trio.current_time()
        for piece in picked:
            pipeline.on_response(self.pieces[piece].length, now - sent_at, now)
        new = [piece for piece in picked if not self.picker.holds(piece)]
        if new:
            assert self.placement is not None
            await self.placement.landed(new, peer, {int(n) for n in report["gone"]})
            self.stats[peer].bytes += sum(self.pieces[piece].length for piece in new)
            self._last_progress = trio.current_time()
        for piece in picked:
            self.picker.received(piece, seat)
        self._changed()


def landed_batch(
    report: dict[str, Any],
    outstanding: dict[int, tuple[list[int], float]],
    link: WorkerLink,
    peer: NodeId,
) -> tuple[list[int], float]:
    """The batch a ``landed`` report names (taken out of ``outstanding``); a ``failed``
    report raises what it stands for."""
    if report["op"] == "failed":
        raise worker_failure(report, peer)
    batch = outstanding.pop(int(report["id"]), None)
    if batch is None:
        raise WorkerEndedError(f"worker {link.pid} reported an unknown batch")
    return batch


def worker_failure(report: dict[str, Any], peer: NodeId) -> P2pfsError:
    """The error a worker's ``failed`` report stands for (handled as the main path's)."""
    kind, message = str(report.get("kind")), str(report.get("message"))
    if kind == "integrity":
        return IntegrityError(message)
    if kind == "refused":
        return PeerRequestError(ErrorCode.from_wire(int(report.get("code", 0))), message)
    if kind == "stalled":
        return PeerStalledError(f"peer {peer.short()}: {message}")
    if kind == "storage":
        return StorageError(message)
    if kind == "closed":
        # The peer's connection failed, not our worker: not counted against workers.
        return ConnectionClosedError(f"peer {peer.short()}: {message}")
    return WorkerEndedError(f"worker for peer {peer.short()}: {kind}: {message}")


def in_flight_target(pipeline: PipelineController, connections: int = 1) -> int:
    """What to keep in flight on one connection. A peer fetched over several connections
    shares the floor and the first guess out among them: those keep one fast connection's
    streams busy, and on a slow window they are the tail of the fetch (4 MiB queued at
    0.2 MB/s is 20 s)."""
    floor = max(MIN_REQUEST_BYTES, MIN_IN_FLIGHT // connections)
    rate = pipeline.throughput
    if rate is None:
        return max(floor, INITIAL_IN_FLIGHT // connections)
    wanted = max(pipeline.target_bytes(), int(rate * QUEUE_SECONDS))
    return min(MAX_IN_FLIGHT, max(floor, wanted))


def new_rng() -> random.Random:
    """Picking randomness, seeded from the OS at the edge (the picker's tests and the
    swarm simulation pass seeded ones)."""
    return random.Random()


async def _reply_unless_stalled(
    conn: PeerConnection, stream: RequestStream, peer: NodeId, still_coming: Callable[[], None]
) -> Message:
    """The stream's next reply; PeerStalledError once the connection has carried no stream
    data for STALL_TIMEOUT. Not this reply's own time: on a slow path (600 ms round trip,
    3% loss: ~16 KB/s for the connection, shared by its streams) a chunk reply took longer
    than that while its bytes kept coming, and each new connection was dropped as stalled
    before one chunk arrived, until the fetch gave up. ``still_coming`` is called after each
    such wait in which bytes did come: the fetch is slow, not idle."""
    heard = conn.stream_bytes_received
    while True:
        with trio.move_on_after(STALL_TIMEOUT):
            return await stream.next_reply()
        if conn.stream_bytes_received == heard:
            conn.stalled()
            raise PeerStalledError(f"peer {peer.short()} sent nothing for {STALL_TIMEOUT:.0f} s")
        heard = conn.stream_bytes_received
        still_coming()


def peer_address_text(conn: PeerConnection) -> str:
    """Where a peer is, as reports show it: ``HOST:PORT`` (``[V6]:PORT``), or ``relay``
    through a relay circuit (whose synthetic address means nothing to a reader)."""
    if conn.path == "relayed":
        return "relay"
    return str(PeerAddress(str(conn.remote_address[0]), int(conn.remote_address[1])))
