"""The requesting side of folder sync on one connection: prove membership, follow the
peer's index root, and read its nodes, records and chunks."""

from __future__ import annotations

import collections
import hashlib
import itertools
import logging
import math
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

import trio

from p2pfs.content.chunking import ChunkRef
from p2pfs.content.folder import FILE_TREE
from p2pfs.content.tree import Child
from p2pfs.errors import (
    AuthenticationError,
    ConnectionClosedError,
    RemoteProtocolError,
    StreamResetError,
    first_leaf,
)
from p2pfs.ids import ContentHash
from p2pfs.net import PeerConnection
from p2pfs.net.codes import CloseCode
from p2pfs.swarm.pipeline import PipelineController
from p2pfs.sync.keys import FolderKeys
from p2pfs.sync.records import INDEX_TREE, record_hash, root_signature_valid
from p2pfs.waits import first_of
from p2pfs.wire.messages import (
    ChunkData,
    ErrorReply,
    FolderChallenge,
    FolderHello,
    FolderMember,
    FolderNeed,
    FolderNodes,
    FolderPlacing,
    FolderProof,
    FolderRoot,
    FolderWelcome,
    GetChunks,
    Message,
    WatchFolder,
)

from ..ratelimit import TokenBucket, throttle
from ..requests import PeerRequestError, RequestStream
from ..streams import TransferCounters
from ..swarmfetch import INITIAL_IN_FLIGHT, MAX_IN_FLIGHT, MIN_IN_FLIGHT, in_flight_target
from .server import CLIENT_ROLE, SERVER_ROLE
from .underway import MemberPlacing
from .work import FolderWork

logger = logging.getLogger(__name__)

STALL_TIMEOUT = 20.0
"""A member that answers nothing for this long has stalled: its link ends (and the folder
lock it held is released), to be linked again later."""
REQUEST_STREAMS = 4
"""Streams for node and chunk requests: one request in flight on each."""
MAX_BATCH = 256
_LINK_SERIALS = itertools.count(1)
"""Each link's serial (unique in this process)."""
PUSH_BUDGET = 256 << 10
"""Node bytes a watch takes pushed after each root (WatchFolder): one edit's index path,
record and file tree are a few KiB; a join gets the top of the index and the first
records. Read before the reconcile starts, so it is kept to what a slow path carries in
about a round trip's worth of time, not the megabytes a whole join would want."""
STRIPE_WAIT = 1.0
"""Seconds a chunk transfer of several batches waits for stripes still being opened."""
HELPERS_POLL = 0.25
"""Seconds between looks for members that can help a chunk transfer, when no batch
completes sooner."""
PLACER_PATIENCE = 1.0
"""Seconds since a member placing the same root last placed a batch, within which its
share of the batches is left to it."""
REQUESTS_IN_FLIGHT = 2
"""Chunk requests queued per request stream: the member reads the next request while the
current one's replies are still on their way, so it never idles between requests."""

Arrived = list[tuple[int, bytes | memoryview]]
"""A batch's chunks as they arrived: (position in the batch, unverified bytes)."""


@dataclass(frozen=True, eq=False, slots=True)
class Helper:
    """Another member that may send chunks of the root being taken, beside the member it
    is taken from: one at that root holds every chunk of it; one placing it now holds
    what it told us it has placed (FolderPlacing)."""

    link: FolderLink
    root: ContentHash
    at_root: Callable[[], bool]
    """Whether the member's latest root is ``root`` (read anew: it may commit meanwhile)."""

    def holds(self, chunk_ids: Sequence[bytes]) -> bool:
        return self.at_root() or self.link.placing.holds(self.root, chunk_ids)

    def placing_only(self) -> bool:
        """Whether it is placing the root (and holds only what it told of)."""
        return not self.at_root() and self.link.placing.root == self.root


class FolderLink:
    """This node as a client of one member, on one authenticated connection."""

    def __init__(
        self,
        conn: PeerConnection,
        keys: FolderKeys,
        counters: TransferCounters,
        own_id: bytes,
        download_limit: TokenBucket | None = None,
        work: FolderWork | None = None,
    ) -> None:
        self.conn = conn
        self._work = work
        """The folder's counts: nodes taken from pushes and asked for are added there."""
        self._pushed: dict[ContentHash, bytes] = {}
        """What the member pushed after its latest root, by hash (unverified)."""
        self._stripes_changed = trio.Event()
        """Set (and replaced) when a stripe joins or fails to: calls under way take it in."""
        self.stripes_pending = 0
        """Stripes the manager is still opening: a chunk transfer waits a moment for them."""
        self._watch_stream: RequestStream | None = None
        """The join's stream, its WatchFolder sent behind the proof, for watch() to read."""
        self._download_limit = download_limit
        """The daemon's --max-download-rate, shared with fetches."""
        self.keys = keys
        self.peer_id = conn.peer_id
        self._counters = counters
        self._own_id = own_id
        self._slots = trio.Semaphore(REQUEST_STREAMS)
        self._idle: list[RequestStream] = []
        self.device: bytes | None = None
        """The member's device id in the folder, as its FolderWelcome told (None from a
        peer older than that field). Informational: it names conflict copies' makers."""
        self.serial = next(_LINK_SERIALS)
        """Names this link's vectors in the folder's store: the last vector the member sent
        per path is kept there while the link lasts (one going backwards is refused)."""
        self.sent_records = False
        """Whether the member sent records on this link (its vectors are kept)."""
        self.stripes: list[FolderLink] = []
        """More connections to the same member, joined, that carry chunk batches too
        (a long path: swarm/stripes.py); the manager opens and closes them."""
        self.pipeline = PipelineController(
            initial_bytes=INITIAL_IN_FLIGHT, min_bytes=MIN_IN_FLIGHT, max_bytes=MAX_IN_FLIGHT
        )
        """Chunk bytes asked of this connection and not received, and its measured rate."""
        self._room_changed = trio.Event()
        self.placing = MemberPlacing()
        """What the member says it is placing now (FolderPlacing on its watch)."""

    async def join(self, *, watch: bool = True) -> list[FolderMember]:
        """Prove membership both ways; returns the other members the peer knows. With
        ``watch`` the WatchFolder goes right behind the proof on the same stream (the
        server answers a stream's requests in order, so it is a member by then): the first
        root and its push come a round trip sooner than asked after the welcome, and
        :meth:`watch` reads them there."""
        stream = await RequestStream.open(self.conn, self._counters)
        folder_id = self.keys.folder_id
        client_nonce = os.urandom(32)
        await stream.send(FolderHello(stream.new_request_id(), folder_id, client_nonce))
        challenge = await stream.next_reply()
        if isinstance(challenge, ErrorReply):
            raise PeerRequestError(challenge.code, challenge.message)
        assert isinstance(challenge, FolderChallenge)
        peer = self.peer_id.raw
        if not self.keys.check_proof(
            challenge.proof, SERVER_ROLE, client_nonce, challenge.nonce, peer, self._own_id
        ):
            raise AuthenticationError(f"peer {self.peer_id.short()} is not a member of the folder")
        proof = self.keys.membership_proof(
            CLIENT_ROLE, client_nonce, challenge.nonce, self._own_id, peer
        )
        requests: list[Message] = [FolderProof(stream.new_request_id(), folder_id, proof)]
        if watch:
            watch_request = WatchFolder(
                stream.new_request_id(), folder_id, PUSH_BUDGET, placing=True
            )
            requests.append(watch_request)
        await stream.send_each(requests)
        welcome = await stream.next_reply()
        if isinstance(welcome, ErrorReply):
            raise AuthenticationError(f"peer {self.peer_id.short()} refused our membership")
        assert isinstance(welcome, FolderWelcome)
        self.device = welcome.device
        if watch:
            self._watch_stream = stream
        else:
            self._idle.append(stream)
        return list(welcome.members)

    @asynccontextmanager
    async def _stream(self) -> AsyncIterator[RequestStream]:
        """An idle request stream (opened on demand); one whose request failed midway is
        dropped, since replies may still be on their way on it."""
        async with self._slots:
            stream = self._idle.pop() if self._idle else None
            if stream is None:
                stream = await RequestStream.open(self.conn, self._counters)
            yield stream
            self._idle.append(stream)

    @contextmanager
    def _stall_guard(self) -> Iterator[trio.CancelScope]:
        """A deadline STALL_TIMEOUT away (the caller may push it on); past it the member
        has stalled."""
        try:
            with trio.fail_after(STALL_TIMEOUT) as scope:
                yield scope
        except trio.TooSlowError:
            self.conn.stalled()
            self.conn.close_nowait(CloseCode.NO_ERROR, "stalled")
            raise ConnectionClosedError(
                f"member {self.peer_id.short()} answered nothing for {STALL_TIMEOUT:.0f} s"
            ) from None

    async def watch(
        self, on_root: Callable[[ContentHash, int, FolderNeed | None, bool], None]
    ) -> None:
        """Call ``on_root`` with the peer's index root, its need and whether the root came
        signed by the write key (checked here: a signature that does not verify is a
        forgery, RemoteProtocolError) now and after each change, and keep
        :attr:`placing` as the member tells it; returns only when the peer ends the
        subscription."""
        stream, self._watch_stream = self._watch_stream, None
        if stream is None:
            stream = await RequestStream.open(self.conn, self._counters)
            request = WatchFolder(
                stream.new_request_id(), self.keys.folder_id, PUSH_BUDGET, placing=True
            )
            await stream.send(request)
        try:
            await self._watch_replies(stream, on_root)
        finally:
            self.placing.forget()

    async def _watch_replies(
        self,
        stream: RequestStream,
        on_root: Callable[[ContentHash, int, FolderNeed | None, bool], None],
    ) -> None:
        while True:
            reply = await stream.next_reply()
            if isinstance(reply, ErrorReply):
                raise PeerRequestError(reply.code, reply.message)
            if isinstance(reply, FolderPlacing):
                self.placing.update(reply)
                continue
            assert isinstance(reply, FolderRoot)  # the session checked the order
            signed = reply.root_signature is not None
            if signed and not root_signature_valid(
                self.keys, Child(reply.root, reply.records), reply.root_signature or b""
            ):
                raise RemoteProtocolError(
                    f"member {self.peer_id.short()}: index root signature does not verify"
                )
            await self._take_push(stream)
            on_root(reply.root, reply.records, reply.need, signed)

    async def _take_push(self, stream: RequestStream) -> None:
        """Read the FolderNodes that follow a FolderRoot (older members send none: the
        session lets through only what the WatchFolder asked for). Read whole before the
        root is told: they come right behind it, within the budget. Each is keyed by the
        hash computed here under its own kind's key, so it can only stand in for that
        hash, and is verified where it is used as a node asked for would be."""
        pushed: dict[ContentHash, bytes] = {}
        with self._stall_guard():
            while stream.push_open:
                frame = await stream.next_reply()
                if isinstance(frame, ErrorReply):
                    raise PeerRequestError(frame.code, frame.message)
                assert isinstance(frame, FolderNodes)
                pushed.update((INDEX_TREE.node_hash(node), node) for node in frame.index_nodes)
                pushed.update((record_hash(record), record) for record in frame.records)
                pushed.update((FILE_TREE.node_hash(node), node) for node in frame.file_nodes)
        # A new root's push replaces the last one's: what a reconcile still wants of an
        # older root is asked for.
        self._pushed = pushed

    async def nodes(self, hashes: list[ContentHash]) -> list[bytes]:
        """Nodes or records by hash, in batches of MAX_BATCH, one batch per request stream
        at a time, this link's streams and its stripes' (the caller verifies each against
        its hash). On a lossy long path one connection is held to its own congestion
        window: a join's records and trees, on it alone, took longer than their files
        (2,000 files at 80 ms, 1%: records 2.06 s, trees 0.71 s). A stripe that fails is
        dropped and its batches asked again on the others."""
        pushed = self._pushed
        if pushed:
            # Taken out as used: a push is held only until its reconcile has taken it.
            here = {h: pushed.pop(h) for h in dict.fromkeys(hashes) if h in pushed}
            if here:
                missing = [node_hash for node_hash in hashes if node_hash not in here]
                if self._work is not None:
                    self._work.nodes_pushed += len(hashes) - len(missing)
                here.update(zip(missing, await self._ask_nodes(missing), strict=True))
                return [here[h] for h in hashes]
        return await self._ask_nodes(hashes)

    async def _ask_nodes(self, hashes: list[ContentHash]) -> list[bytes]:
        if not hashes:
            return []
        if self._work is not None:
            self._work.nodes_asked += len(hashes)
        batches = [hashes[start : start + MAX_BATCH] for start in range(0, len(hashes), MAX_BATCH)]
        found: list[list[bytes]] = [[] for _ in batches]
        work = _BatchQueue(len(batches))

        async def one_stream(link: FolderLink, _helper: Helper | None) -> None:
            async with link._stream() as stream:
                while (number := await work.take()) is not None:
                    try:
                        with link._stall_guard():  # a stalled stripe closes that stripe only
                            found[number] = await stream.nodes(self.keys.folder_id, batches[number])
                    except BaseException:
                        work.give_back([number])
                        raise
                    work.done()

        await self._on_every_stream(work, one_stream)
        return [node for batch in found for node in batch]

    async def _on_every_stream(
        self,
        work: _BatchQueue,
        one_stream: Callable[[FolderLink, Helper | None], Awaitable[None]],
        helpers: Callable[[], Sequence[Helper]] = tuple,
    ) -> None:
        """Run ``one_stream`` on each request stream of this link and, for more than one
        batch, of its stripes, those that join while the call runs too, and of
        ``helpers``; a stripe whose connection fails or stalls is dropped (its stream gave
        its batches back to the queue first), a helper that fails stops helping, a failure
        of this link's own connection ends the call."""
        batches = work.count

        async def helper_stream(helper: Helper) -> None:
            # Its stream's own tasks raise in a group: a plain except missed it, and a
            # helper that failed ended the link to this member too (dropping a corrupt
            # helper restarted a join from scratch after the member re-linked, 4 s on).
            try:
                await one_stream(helper.link, helper)
            except* (ConnectionClosedError, StreamResetError, PeerRequestError) as group:
                logger.info(
                    "member %s stopped helping: %s", helper.link.peer_id.short(), first_leaf(group)
                )

        async def stripe_stream(stripe: FolderLink) -> None:
            try:
                await one_stream(stripe, None)
            except* (ConnectionClosedError, StreamResetError) as group:
                if stripe in self.stripes:
                    logger.info(
                        "member %s: a stripe ended: %s", self.peer_id.short(), first_leaf(group)
                    )
                    self.stripes.remove(stripe)
                    stripe.conn.close_nowait(CloseCode.NO_ERROR, "stripe failed")

        links = [self]
        if batches > 1:
            links += [stripe for stripe in self.stripes if not stripe.conn.is_closed]
        async with trio.open_nursery() as nursery:
            # Round the connections: the streams started first take the first batches,
            # and a small transfer should still spread over every connection.
            for _ in range(min(REQUEST_STREAMS, batches)):
                for link in links:
                    if link is self:
                        nursery.start_soon(one_stream, link, None)
                    else:
                        nursery.start_soon(stripe_stream, link)
            if batches > 1:

                async def take_in_helpers() -> None:
                    helping: set[FolderLink] = set()
                    while not work.finished:
                        for helper in helpers():
                            if helper.link not in helping and not helper.link.conn.is_closed:
                                helping.add(helper.link)
                                for _ in range(REQUEST_STREAMS):
                                    nursery.start_soon(helper_stream, helper)
                        with trio.move_on_after(HELPERS_POLL):
                            await work.changed.wait()

                nursery.start_soon(take_in_helpers)

                async def take_in_new_stripes() -> None:
                    while not work.finished:
                        for stripe in self.stripes:
                            if stripe not in links and not stripe.conn.is_closed:
                                links.append(stripe)
                                for _ in range(REQUEST_STREAMS):
                                    nursery.start_soon(stripe_stream, stripe)
                        await first_of(self._stripes_changed, work.changed)

                nursery.start_soon(take_in_new_stripes)

    async def add_stripe(self, conn: PeerConnection) -> FolderLink:
        """Prove membership on one more connection to the same member, whose request
        streams then carry chunk batches beside this link's (swarm/stripes.py: a long
        path's one connection is held to its own congestion window)."""
        if conn.peer_id != self.peer_id:
            raise AuthenticationError("a stripe must reach the same member")
        stripe = FolderLink(conn, self.keys, self._counters, self._own_id, self._download_limit)
        await stripe.join(watch=False)  # a stripe carries requests only
        self.stripes.append(stripe)
        self._stripes_moved()
        return stripe

    def stripe_attempt_over(self) -> None:
        """One stripe the manager was opening is joined or given up."""
        self.stripes_pending -= 1
        self._stripes_moved()

    def _stripes_moved(self) -> None:
        moved, self._stripes_changed = self._stripes_changed, trio.Event()
        moved.set()

    async def _wait_for_stripes(self) -> None:
        """Until the stripes being opened are up (or given up), STRIPE_WAIT at most. Chunks
        asked for before they are up queue on this link's one connection and stay there:
        with trees pushed, a join asked for a 16 MiB file's chunks before its stripes had
        joined (three round trips each), all on one connection: 15.7 s through 40 ms,
        0.2%, not 6 s."""
        with trio.move_on_after(STRIPE_WAIT):
            while self.stripes_pending > 0:
                await self._stripes_changed.wait()

    async def chunk_batches(
        self,
        batches: Sequence[Sequence[ChunkRef]],
        on_batch: Callable[[int, Arrived, FolderLink], Awaitable[None]],
        on_refused: Callable[[int, PeerRequestError], None],
        helpers: Callable[[], Sequence[Helper]] = tuple,
    ) -> None:
        """Ask for every batch (each at most MAX_BATCH chunks) on all request streams at
        once, this link's and its stripes', REQUESTS_IN_FLIGHT requests queued on each.
        ``on_batch(number, arrived, source)`` is awaited with each complete batch
        (unverified: the caller checks each chunk against its id before writing it, and
        ``source`` is the link that sent it); a batch the member refuses (content it no
        longer holds) goes to ``on_refused`` and the others go on. A stripe whose
        connection fails or stalls is dropped and its batches are asked again on the
        others; a failure of this link's own connection ends the call.

        ``helpers()``: other members that hold the same content (at the same root, or
        placing it now), read again as batches complete (a member linked meanwhile joins
        in): their streams take the batches they hold from the same queue, so a join or a
        big change comes from every such member at once, as a fetch swarms. This link's
        own streams take their own share of the batches first, and leave to each placer
        that keeps up its share and what it holds (``_PlacersShares``): members taking one
        change at once each take a share of it from its maker and swap them. A helper that
        refuses a batch, fails or stalls stops helping and gives its batches back; this
        link's member still answers for all of them."""
        if len(batches) > 1:
            await self._wait_for_stripes()
        work = _BatchQueue(len(batches))
        stopped: set[FolderLink] = set()
        """Helpers that stopped helping: nothing is left to them any more."""
        shares = _PlacersShares(self, batches, helpers, stopped)

        async def take(helper: Helper | None) -> int | None:
            if helper is not None:
                return await work.take(
                    accept=lambda number: helper.holds(shares.ids_of[number]),
                    wake=lambda: helper.link.placing.changed,
                )
            return await shares.take(work)

        async def one_stream(link: FolderLink, helper: Helper | None) -> None:
            refusal = on_refused if helper is None else _stop_helping

            async def arrived(number: int, chunks: Arrived) -> None:
                await on_batch(number, chunks, link)

            async with link._stream() as stream:
                queued_send, queued = trio.open_memory_channel[tuple[int, float]](
                    REQUESTS_IN_FLIGHT - 1
                )
                asked: list[int] = []
                """Requested on this stream and not yet handed on, oldest first."""
                left: dict[int, int] = {}
                """Bytes of each asked batch not received yet (the link's in flight)."""

                async def ask() -> None:
                    async with queued_send:
                        while True:
                            await link._room_for_a_batch()
                            if (number := await take(helper)) is None:
                                return
                            asked.append(number)
                            refs = tuple(batches[number])
                            left[number] = sum(ref.length for ref in refs)
                            now = trio.current_time()
                            link.pipeline.on_request(left[number], now)
                            request = GetChunks(stream.new_request_id(), self.keys.folder_id, refs)
                            await stream.send(request)
                            try:
                                await queued_send.send((number, now))
                            except trio.BrokenResourceError:
                                return  # the reader stopped; its own error says why

                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(ask)
                        async with queued:
                            async for number, sent_at in queued:
                                await link._receive_batch(
                                    stream, number, batches[number], arrived, refusal, sent_at, left
                                )
                                asked.remove(number)
                                work.done()
                except BaseException:
                    if helper is not None:
                        stopped.add(link)  # what was left to it is asked elsewhere now
                    raise
                finally:
                    work.give_back(asked)
                    link._settle(sum(left.values()))

        await self._on_every_stream(work, one_stream, helpers)

    async def _receive_batch(
        self,
        stream: RequestStream,
        number: int,
        refs: Sequence[ChunkRef],
        on_batch: Callable[[int, Arrived], Awaitable[None]],
        on_refused: Callable[[int, PeerRequestError], None],
        sent_at: float,
        left: dict[int, int],
    ) -> None:
        """One batch's replies; each counts toward this link's delivery rate and frees
        room for the next batch (``left``: the bytes each asked batch still owes)."""
        arrived: Arrived = []
        # One deadline for the batch, pushed on before each wait (a cancel scope per chunk
        # was a fifth of the event loop's work per small file); replies already here are
        # taken without waiting at all.
        with self._stall_guard() as guard:
            for _ in refs:
                reply = stream.buffered_reply()
                if reply is None:
                    guard.deadline = trio.current_time() + STALL_TIMEOUT
                    reply = await stream.next_reply()
                if isinstance(reply, ErrorReply):  # ends this request; the next ones follow
                    self._settle(left.pop(number))
                    on_refused(number, PeerRequestError(reply.code, reply.message))
                    return
                assert isinstance(reply, ChunkData)  # the session checked order and length
                now = trio.current_time()
                self.pipeline.on_response(len(reply.payload), now - sent_at, now)
                left[number] -= len(reply.payload)
                self._room_changed.set()
                self._counters.payload_received += len(reply.payload)
                self.conn.payload_received += len(reply.payload)
                self._counters.chunks_received += 1
                # Waiting here stops reading the stream: flow control slows the member.
                # Our own limit's wait is not the member stalling: no deadline meanwhile.
                if self._download_limit is not None:
                    guard.deadline = math.inf
                    await throttle(self._download_limit, len(reply.payload))
                # The payload is a view into the frame's own copy: kept as it is, no copy.
                arrived.append((reply.index, reply.payload))
        left.pop(number)
        await on_batch(number, arrived)

    async def _room_for_a_batch(self) -> None:
        """Wait while this link has its fill in flight: the fetch's rule (its measured
        bandwidth-delay product, at least half a second of its rate, 2-64 MiB), so a slow
        member holds few batches and the rest stay queued for faster ones (helpers,
        stripes) instead of waiting seconds behind its uplink."""
        while self.pipeline.in_flight and self.pipeline.in_flight >= in_flight_target(
            self.pipeline
        ):
            if self._room_changed.is_set():  # shared by the link's streams: renewed once
                self._room_changed = trio.Event()
            await self._room_changed.wait()

    def _settle(self, unreceived: int) -> None:
        """Asked bytes that will not come on this stream (refused, failed, given back)."""
        if unreceived:
            self.pipeline.on_cancel(unreceived, trio.current_time())
            self._room_changed.set()


def _stop_helping(number: int, exc: PeerRequestError) -> None:
    """A helper lacks a batch (its content moved on meanwhile): it stops, and gives the
    batch back for the member whose root is being taken."""
    raise exc


def _designated(chunk_id: bytes, nodes: Sequence[bytes]) -> bytes:
    """The node among ``nodes`` whose turn a batch starting with ``chunk_id`` is: the
    highest keyed hash, as every node computes it alike (rendezvous hashing)."""
    return max(
        nodes, key=lambda node: hashlib.blake2b(chunk_id, digest_size=8, key=node[:64]).digest()
    )


def refuse(conn: PeerConnection, reason: str) -> None:
    """Drop a member that sent something forged or malformed (its data is never applied)."""
    logger.warning("dropping member %s: %s", conn.peer_id.short(), reason)
    conn.close_nowait(CloseCode.PROTOCOL_ERROR, reason[:100])


class _PlacersShares:
    """How a link's own streams pick batches while other members place the same root
    (Helper.placing_only): each takes its own share of the batches from the member, and
    those a placer holds from that placer. A batch's share is one placer's by rendezvous
    hashing over the placers, so all agree without a word."""

    def __init__(
        self,
        link: FolderLink,
        batches: Sequence[Sequence[ChunkRef]],
        helpers: Callable[[], Sequence[Helper]],
        stopped: set[FolderLink],
    ) -> None:
        self._link = link
        self.ids_of = [[ref.id for ref in batch] for batch in batches]
        """Each batch's chunk ids (what a placer must hold to take it)."""
        chunks = sum(map(len, batches))
        self._chunk_bytes = sum(ref.length for batch in batches for ref in batch) / max(1, chunks)
        """The mean chunk length of the transfer (placers report chunks, not bytes)."""
        self._helpers = helpers
        self._stopped = stopped
        """Helpers that stopped helping: nothing is left to them any more."""
        self._everyone: tuple[bytes, ...] = ()
        self._owner_of: dict[int, bytes] = {}
        """Each batch's placer among ``_everyone`` (computed once per set of placers)."""

    async def take(self, work: _BatchQueue) -> int | None:
        """The next batch for one of the link's own streams (None once all are done),
        looked for again whenever the queue or a placer's holdings change, or every
        HELPERS_POLL: who keeps up changes while a stream waits."""
        if len(self.ids_of) == 1:
            return await work.take()  # one batch: no helper streams to leave it to
        while True:
            now = self._placers()
            found = work.take_now(*self._choice(now))
            if found is not None or work.finished:
                return found
            with trio.move_on_after(HELPERS_POLL):
                await first_of(work.changed, *(h.link.placing.changed for h in now))

    def _placers(self) -> list[Helper]:
        return [
            helper
            for helper in self._helpers()
            if helper.link not in self._stopped and helper.placing_only()
        ]

    def _choice(
        self, placers: list[Helper]
    ) -> tuple[Callable[[int], bool] | None, Callable[[int], int] | None]:
        """(accept, rank) for a take now, against ``placers``."""
        if not placers:
            return None, None
        own = self._link._own_id
        everyone = (own, *sorted(h.link.peer_id.raw for h in placers))
        if everyone != self._everyone:
            self._everyone, self._owner_of = everyone, {}
        waited_for = self._waited_for(placers)

        def rank(number: int) -> int:
            """0: ours to ask of the member; 1: to ask of it once ours are taken; 2: left
            to a placer that keeps up (its share, or one it holds: its stream takes it)."""
            ids = self.ids_of[number]
            if any(h.link.placing.held.issuperset(ids) for h in waited_for):
                return 2
            owner = self._owner_of.get(number)
            if owner is None:
                owner = self._owner_of[number] = _designated(ids[0], everyone)
            if owner == own:
                return 0
            return 2 if any(h.link.peer_id.raw == owner for h in waited_for) else 1

        # Another placer's share is left to it while it keeps up: asked of the member
        # here too, each batch would cross the member's uplink twice. A placer that
        # stalls or is much slower than this link leaves its share to be asked here.
        return (lambda number: rank(number) != 2), rank

    def _waited_for(self, placers: list[Helper]) -> list[Helper]:
        """The placers whose shares are left to them: placing now, at least half as fast
        as this link takes chunks from its member (or that rate is not known yet)."""
        now = trio.current_time()
        ours = self._link.pipeline.throughput
        return [
            helper
            for helper in placers
            if now - helper.link.placing.grew_at < PLACER_PATIENCE
            and (
                ours is None or 2 * helper.link.placing.chunk_rate(now) * self._chunk_bytes >= ours
            )
        ]


class _BatchQueue:
    """The batches of one ``chunk_batches`` or ``nodes`` call, shared by every stream: each
    takes the next one not asked for; a failed stripe's batches come back for the others. A
    taker waits while batches are out on other streams (one may come back) and gets None
    once every batch is done."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._waiting: collections.deque[int] = collections.deque(range(count))
        self._left = count
        self._changed = trio.Event()

    @property
    def finished(self) -> bool:
        return self._left == 0

    @property
    def changed(self) -> trio.Event:
        """Set when a batch is done or given back (then replaced)."""
        return self._changed

    async def take(
        self,
        *,
        accept: Callable[[int], bool] | None = None,
        rank: Callable[[int], int] | None = None,
        wake: Callable[[], trio.Event] | None = None,
    ) -> int | None:
        """The next waiting batch that ``accept`` takes (any, without it), the first of
        the lowest ``rank`` (0 is best) if ranked. While none is acceptable it waits for
        the queue to change, or ``wake()`` (what ``accept`` reads) to be set, or
        HELPERS_POLL."""
        while True:
            found = self.take_now(accept, rank)
            if found is not None:
                return found
            if self._left == 0:
                return None
            with trio.move_on_after(HELPERS_POLL):
                await (self._changed.wait() if wake is None else first_of(self._changed, wake()))

    def take_now(
        self,
        accept: Callable[[int], bool] | None = None,
        rank: Callable[[int], int] | None = None,
    ) -> int | None:
        """What :meth:`take` would return now, or None if it would wait."""
        if accept is None and rank is None:
            return self._waiting.popleft() if self._waiting else None
        best: tuple[int, int] | None = None
        """(rank, position in the queue) of the best so far."""
        for position, number in enumerate(self._waiting):
            if accept is not None and not accept(number):
                continue
            score = rank(number) if rank is not None else 0
            if best is None or score < best[0]:
                best = (score, position)
                if score == 0:
                    break
        if best is None:
            return None
        number = self._waiting[best[1]]
        del self._waiting[best[1]]
        return number

    def done(self) -> None:
        self._left -= 1
        self._wake()

    def give_back(self, numbers: list[int]) -> None:
        if numbers:
            self._waiting.extendleft(reversed(numbers))
            numbers.clear()
            self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
