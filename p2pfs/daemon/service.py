"""Serving shares to peers: answers GetManifest / GetNodes / GetChunks on every stream.

Access rule: knowing a share's root is the capability to read it. A peer gets a manifest
only by naming its root, and a tree node only once that node has been reached from a root
it named *on this connection* (each node served grants its children), so a peer cannot pull
a node of some other share by guessing or learning its hash. Chunks are served only from
files of the share the request names. Every chunk read from disk is hashed before it is
sent: a file changed behind the index's back yields NOT_FOUND, never wrong bytes.
"""

from __future__ import annotations

import contextlib
import enum
import logging
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import trio

from p2pfs.content.folder import DIR_TREE, FILE_TREE, EntryKind, Manifest
from p2pfs.content.tree import BranchNode, Child, is_leaf_encoding, iter_leaves
from p2pfs.errors import (
    ConnectionClosedError,
    LocalProtocolError,
    StorageError,
    StreamResetError,
)
from p2pfs.ids import HASH_LEN, ContentHash, short_hex
from p2pfs.net import PeerConnection, Stream
from p2pfs.net.boundary import describe, first_leaf, split_fatal
from p2pfs.store.index import CHUNK_RECORD, ChunkLocation, ChunkReader, IndexStore
from p2pfs.wire.codes import ErrorCode, WireError
from p2pfs.wire.messages import (
    MAX_HAVE_UPDATE,
    MAX_NODES_PER_REPLY,
    Cancel,
    ErrorReply,
    FolderHello,
    FolderNodes,
    FolderPlacing,
    FolderProof,
    FolderRoot,
    GetChunks,
    GetHave,
    GetManifest,
    GetNodes,
    GetTree,
    HaveReply,
    HaveUpdate,
    ManifestReply,
    Message,
    NodesReply,
    TreeNodes,
    WatchFolder,
    encode_chunk_data_header,
)
from p2pfs.wire.session import FOLDER_PUSH_VERSION, FRAME_DEADLINE, Role, StreamSession

from .folders.server import FolderGrants, FolderServer
from .folders.underway import PlacingChunks
from .ratelimit import TokenBucket, throttle
from .storage import AsyncIndex, in_thread
from .streams import TransferCounters, receive_within_frame_deadline
from .swarmstate import SwarmRegistry

logger = logging.getLogger(__name__)
SHARE_CHANGED = "this share's files changed since its ticket was made; ask its sharer for a new one"

RECEIVE_BYTES = 256 * 1024
READ_BATCH_BYTES = 4 << 20
"""Chunks of one request are read from disk in groups of about this size."""
ERROR_REPLY_TIMEOUT = 5.0
"""Seconds spent trying to tell a failed stream's peer why before resetting it anyway."""
TREE_PUSH_LIMIT = 4 << 20
"""The most node bytes one GetTree pushes, whatever its budget: the trees of ~90,000 small
files (~45 bytes a file-tree leaf, ~60 a directory entry); a bigger share's walk asks
GetNodes for the rest. It bounds the index reads one request costs."""
TREE_PUSH_BATCH = 2048
"""Nodes looked up per worker-thread call while pushing (a thread hop each)."""
FILE_NODE_CACHE = 64
"""Files whose rebuilt tree nodes are kept in memory (rebuilding costs ~2 ms per 256 MiB)."""


class _NodeKind(enum.Enum):
    DIRECTORY = "directory"
    FILE = "file"


@dataclass(slots=True)
class _Grant:
    kind: _NodeKind
    file_root: ContentHash | None  # for file-tree nodes: the file they belong to


@dataclass(slots=True)
class _ConnectionGrants:
    """Nodes this connection may ask for, per share root it has named."""

    by_share: dict[ContentHash, dict[ContentHash, _Grant]] = field(default_factory=dict)
    folders: FolderGrants = field(default_factory=FolderGrants)

    def open_share(self, share_root: ContentHash, tree_root: ContentHash) -> None:
        grants = self.by_share.setdefault(share_root, {})
        grants[tree_root] = _Grant(_NodeKind.DIRECTORY, None)

    def lookup(self, share_root: ContentHash, node_hash: ContentHash) -> _Grant | None:
        return self.by_share.get(share_root, {}).get(node_hash)

    def grant(self, share_root: ContentHash, node_hash: ContentHash, grant: _Grant) -> None:
        self.by_share.setdefault(share_root, {})[node_hash] = grant

    def is_file(self, share_root: ContentHash, node_hash: ContentHash) -> bool:
        """Whether a granted node belongs to a file's tree."""
        grant = self.lookup(share_root, node_hash)
        return grant is not None and grant.kind is _NodeKind.FILE


class ShareService:
    def __init__(
        self,
        index: AsyncIndex,
        counters: TransferCounters,
        upload_limit: TokenBucket | None = None,
        swarm: SwarmRegistry | None = None,
        folders: FolderServer | None = None,
        private_paths: Callable[[], set[str]] = set,
    ) -> None:
        self._index = index
        self._folders = folders
        self._private_paths = private_paths
        """Local paths whose scans are sync folders: served only to proven members, never
        as a share by its root."""
        self.counters = counters
        self._upload_limit = upload_limit
        self._swarm = swarm if swarm is not None else SwarmRegistry()
        self.frame_deadline = FRAME_DEADLINE
        """Seconds a peer may leave a request frame unfinished before its stream is reset."""
        self._piece_counts: dict[ContentHash, int] = {}
        self.stale: set[ContentHash] = set()
        """Shares a chunk of which no longer reads back as indexed (their files changed
        since `share`): the node re-indexes them (and `status` says so meanwhile)."""
        self.stale_found = trio.Event()
        """Set (and replaced) when a share is newly found stale."""
        self.replaced: dict[ContentHash, ContentHash] = {}
        """Share roots re-indexed since (old root -> the path's root now): asked for, an old
        root is answered that the share changed, never with its new root (a ticket to
        the old content is not one to the new)."""
        self._file_nodes: OrderedDict[ContentHash, dict[ContentHash, bytes]] = OrderedDict()

    async def handle_connection(self, conn: PeerConnection) -> None:
        """Serve every stream the peer opens until it closes the connection."""
        grants = _ConnectionGrants()
        logger.info("peer %s connected from %s", conn.peer_id.short(), conn.remote_address)
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    try:
                        stream = await conn.accept_stream()
                    except ConnectionClosedError:
                        break
                    nursery.start_soon(self._serve_stream, conn, stream, grants)
                    # The handler ends when the peer closes; folder links watching this
                    # connection end with it.
        finally:
            if self._folders is not None:
                self._folders.forget(grants.folders)
        logger.info("peer %s disconnected", conn.peer_id.short())

    async def _serve_stream(
        self, conn: PeerConnection, stream: Stream, grants: _ConnectionGrants
    ) -> None:
        """One stream's requests: a failure boundary (GUIDE rule 12). Whatever goes wrong,
        bare or inside a nursery's group, ends this stream only; cancellation goes on."""
        session = StreamSession(Role.SERVER, frame_deadline=self.frame_deadline)
        try:
            await self._serve_requests(conn, stream, session, grants)
        except BaseException as exc:
            fatal, failure = split_fatal(exc)
            if failure is not None:
                if fatal is None:
                    await self._stream_failed(conn, stream, session, failure)
                else:
                    stream.reset(int(ErrorCode.INTERNAL))  # cancelled too: no time to explain
            if fatal is exc:
                raise
            if fatal is not None:
                raise fatal from None

    async def _stream_failed(
        self, conn: PeerConnection, stream: Stream, session: StreamSession, failure: BaseException
    ) -> None:
        """One log line, an Error to the peer where it can still hear one, and a reset."""
        exc = first_leaf(failure)
        who = conn.peer_id.short()
        if isinstance(exc, StreamResetError | ConnectionClosedError):
            logger.debug("stream from %s ended: %s", who, exc)
            return
        if isinstance(exc, WireError):
            logger.warning("peer %s broke the protocol: %s", who, exc)
            code, text = exc.code, str(exc)
        elif isinstance(exc, StorageError):
            # Our own disk or index failed this request: the peer hears INTERNAL, this
            # stream ends, and the node serves on.
            logger.warning("serving %s failed: %s", who, exc)
            code, text = ErrorCode.INTERNAL, str(exc)
        else:
            logger.error("serving %s failed unexpectedly: %s", who, describe(failure))
            logger.debug("unexpected failure serving %s", who, exc_info=failure)
            code, text = ErrorCode.INTERNAL, "internal error"
        with contextlib.suppress(StreamResetError, ConnectionClosedError, LocalProtocolError):
            with trio.move_on_after(ERROR_REPLY_TIMEOUT):
                await self._send(stream, session.send(ErrorReply(0, code, text[:200])))
        stream.reset(int(code))

    async def _serve_requests(
        self,
        conn: PeerConnection,
        stream: Stream,
        session: StreamSession,
        grants: _ConnectionGrants,
    ) -> None:
        pending: deque[Message] = deque()
        # A GetHave subscription runs beside this loop under its own scope, ended by the
        # client's Cancel or end of stream.
        subscription = trio.CancelScope()
        async with trio.open_nursery() as subscriptions:
            await self._send(stream, session.hello())
            while True:
                data = await receive_within_frame_deadline(stream, session, RECEIVE_BYTES)
                if not data:
                    subscription.cancel()
                    await stream.send_eof()
                    return
                self.counters.protocol_received += len(data)
                session.receive_data(data, trio.current_time())
                while (message := session.next_message()) is not None:
                    pending.append(message)
                cancelled = {m.request_id for m in pending if isinstance(m, Cancel)}
                while pending:
                    message = pending.popleft()
                    if isinstance(message, GetHave):
                        await subscriptions.start(
                            self._have, message, stream, session, subscription
                        )
                        continue
                    if isinstance(message, FolderHello | FolderProof | WatchFolder):
                        await self._folder_request(
                            message, conn, stream, session, grants, subscriptions, subscription
                        )
                        continue
                    if not isinstance(message, GetManifest | GetNodes | GetChunks | GetTree):
                        if isinstance(message, Cancel):
                            subscription.cancel()
                        continue  # Hello, or a Cancel collected above
                    if message.request_id in cancelled:
                        reply = ErrorReply(message.request_id, ErrorCode.CANCELLED, "cancelled")
                        await self._send(stream, session.send(reply))
                        continue
                    await self._answer(message, stream, session, grants, conn)

    async def _folder_request(
        self,
        message: FolderHello | FolderProof | WatchFolder,
        conn: PeerConnection,
        stream: Stream,
        session: StreamSession,
        grants: _ConnectionGrants,
        subscriptions: trio.Nursery,
        subscription: trio.CancelScope,
    ) -> None:
        folders = self._folders
        if folders is None:
            reply = _not_found(message.request_id, "this node syncs no folders")
            await self._send(stream, session.send(reply))
            return
        if isinstance(message, FolderHello):
            await self._send(stream, session.send(folders.hello(message, conn, grants.folders)))
        elif isinstance(message, FolderProof):
            await self._send(stream, session.send(folders.proof(message, conn, grants.folders)))
        else:
            if (session.version or 0) < FOLDER_PUSH_VERSION:
                message = replace(message, push_budget=0)  # a client older than pushes

            async def send(reply: FolderRoot | FolderNodes | FolderPlacing | ErrorReply) -> None:
                await self._send(stream, session.send(reply))

            async def watch(*, task_status: trio.TaskStatus[None]) -> None:
                with subscription:
                    await folders.watch(
                        message, grants.folders, send, conn.peer_id.raw, task_status=task_status
                    )

            await subscriptions.start(watch)

    async def _send(self, stream: Stream, data: bytes) -> None:
        self.counters.protocol_sent += len(data)
        await stream.send_all(data)

    async def _answer(
        self,
        message: GetManifest | GetNodes | GetChunks | GetTree,
        stream: Stream,
        session: StreamSession,
        grants: _ConnectionGrants,
        conn: PeerConnection,
    ) -> None:
        if isinstance(message, GetTree):
            await self._tree(message, stream, session, grants)  # shares only, as GetManifest
            return
        folder = (
            None
            if self._folders is None or isinstance(message, GetManifest)
            else self._folders.is_member(grants.folders, message.share_root)
        )
        if folder is not None and isinstance(message, GetNodes):
            assert self._folders is not None
            await self._send(
                stream, session.send(await self._folders.nodes(message, grants.folders))
            )
            return
        share_id = None
        if folder is not None and isinstance(message, GetChunks):
            # A member reads chunks of any file the folder holds now (its last scan).
            share_root, share_id = folder.share_root(), folder.share_id()
            if share_root is None:
                await self._send(stream, session.send(_not_found(message.request_id, "empty")))
                return
            message = GetChunks(message.request_id, share_root, message.chunks)
        if isinstance(message, GetChunks):
            placing = folder.placing if folder is not None else None
            await self._chunks(
                message,
                stream,
                session,
                conn,
                check_private=folder is None,
                placing=placing,
                share_id=share_id,
            )
            return
        reply: ManifestReply | NodesReply | ErrorReply
        if isinstance(message, GetManifest):
            reply = await self._manifest(message, grants)
        else:
            reply = await self._nodes(message, grants)
        await self._send(stream, session.send(reply))

    async def _manifest(
        self, request: GetManifest, grants: _ConnectionGrants
    ) -> ManifestReply | ErrorReply:
        encoded = await self._manifest_bytes(request.share_root)
        if encoded is None:
            return _not_found(request.request_id, self._gone(request.share_root))
        manifest = Manifest.decode_untrusted(encoded)
        grants.open_share(request.share_root, manifest.tree.hash)
        return ManifestReply(request.request_id, encoded)

    async def _manifest_bytes(self, root: ContentHash) -> bytes | None:
        record = await self._index.run(self._index.index.share_by_root, root)
        if record is not None and record.local_path in self._private_paths():
            return None
        if record is not None and record.manifest is not None:
            return record.manifest
        swarm = self._swarm.get(root)
        return None if swarm is None else swarm.manifest

    def _gone(self, root: ContentHash, otherwise: str = "no such share here") -> str:
        if root in self.replaced:
            return SHARE_CHANGED
        return otherwise

    async def _have(
        self,
        request: GetHave,
        stream: Stream,
        session: StreamSession,
        scope: trio.CancelScope,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Answer a GetHave, then forward every piece this node gains until ``scope`` ends."""
        swarm = self._swarm.get(request.share_root)
        if swarm is not None and not swarm.complete and swarm.pieces:
            updates = swarm.subscribe()
            reply = HaveReply(request.request_id, len(swarm.pieces), False, swarm.bitfield())
        else:
            updates = None
            count = await self._piece_count(request.share_root)
            if count is None:
                task_status.started()
                await self._send(stream, session.send(_not_found(request.request_id, "no share")))
                return
            reply = HaveReply(request.request_id, count, True, b"")
        await self._send(stream, session.send(reply))
        task_status.started()
        if updates is None:
            return
        with scope:
            async with updates:
                async for pieces in updates:
                    for start in range(0, len(pieces), MAX_HAVE_UPDATE):
                        batch = tuple(pieces[start : start + MAX_HAVE_UPDATE])
                        update = HaveUpdate(request.request_id, batch)
                        await self._send(stream, session.send(update))

    async def count_pieces(self, root: ContentHash) -> None:
        """Count a share's pieces ahead of the first GetHave (a task of its own: a failure
        ends it with a log line; that GetHave then counts, or fails, itself)."""
        try:
            await self._piece_count(root)
        except StorageError as exc:
            logger.warning("share %s: cannot count its pieces: %s", short_hex(root), exc)

    async def _piece_count(self, root: ContentHash) -> int | None:
        """Pieces of a complete share: every holder numbers them alike (content/pieces.py)."""
        if root in self._piece_counts:
            return self._piece_counts[root]
        swarm = self._swarm.get(root)
        if swarm is not None and swarm.pieces:
            return len(swarm.pieces)
        record = await self._index.run(self._index.index.share_by_root, root)
        if record is None:
            # A share being fetched whose pieces are not numbered yet: its trees are in the
            # swarm registry, not the index, so there is nothing to count from yet.
            return None
        encoded = await self._manifest_bytes(root)
        if encoded is None:
            return None
        manifest = Manifest.decode_untrusted(encoded)
        count = await self._index.run(_count_pieces, self._index.index, manifest.tree)
        self._piece_counts[root] = count
        return count

    async def _nodes(self, request: GetNodes, grants: _ConnectionGrants) -> NodesReply | ErrorReply:
        """All nodes of one request come from the index in one worker-thread call (a request
        for the trees of 256 small files would otherwise pay 256 thread hops)."""
        wanted: list[tuple[ContentHash, _Grant]] = []
        for node_hash in request.hashes:
            grant = grants.lookup(request.share_root, node_hash)
            if grant is None:
                return _not_found(request.request_id, f"node {short_hex(node_hash)} not reached")
            wanted.append((node_hash, grant))
        found = await self._load(request.share_root, wanted)
        encoded_nodes: list[bytes] = []
        for node_hash, grant in wanted:
            encoded = found.get(node_hash)
            if encoded is None:
                return _not_found(request.request_id, f"node {short_hex(node_hash)} is gone")
            self._grant_children(request.share_root, encoded, grant, grants)
            encoded_nodes.append(encoded)
        return NodesReply(request.request_id, tuple(encoded_nodes))

    async def _load(
        self, share_root: ContentHash, wanted: list[tuple[ContentHash, _Grant]]
    ) -> dict[ContentHash, bytes]:
        """The encodings of granted nodes that are here: the swarm's (a share being
        fetched), cached file trees, then the index in one worker-thread call."""
        swarm = self._swarm.get(share_root)
        found: dict[ContentHash, bytes] = {}
        missing_dirs: list[ContentHash] = []
        missing_files: list[ContentHash] = []
        for node_hash, grant in wanted:
            if swarm is not None and node_hash in swarm.nodes:
                found[node_hash] = swarm.nodes[node_hash]
            elif grant.kind is _NodeKind.DIRECTORY:
                missing_dirs.append(node_hash)
            else:
                assert grant.file_root is not None
                cached = self._file_nodes.get(grant.file_root)
                if cached is not None and node_hash in cached:
                    self._file_nodes.move_to_end(grant.file_root)
                    found[node_hash] = cached[node_hash]
                else:
                    missing_files.append(grant.file_root)
        if missing_dirs or missing_files:
            dirs, files = await self._index.run(
                _load_nodes, self._index.index, missing_dirs, list(dict.fromkeys(missing_files))
            )
            found.update(dirs)
            for file_root, nodes in files.items():
                found.update(nodes)
                self._file_nodes[file_root] = nodes
                if len(self._file_nodes) > FILE_NODE_CACHE:
                    self._file_nodes.popitem(last=False)
        return found

    async def _tree(
        self, request: GetTree, stream: Stream, session: StreamSession, grants: _ConnectionGrants
    ) -> None:
        """Push a share's tree nodes breadth first, directory and file trees alike (or the
        directory trees alone, for a listing), until the next would pass the budget (the
        client's, at most TREE_PUSH_LIMIT): the walk that follows then costs no round trip
        per level. Work per request is bounded by the budget plus one batch of nodes
        looked up."""
        root = request.share_root
        encoded = await self._manifest_bytes(root)
        if encoded is None:
            await self._send(stream, session.send(_not_found(request.request_id, self._gone(root))))
            return
        manifest = Manifest.decode_untrusted(encoded)
        grants.open_share(root, manifest.tree.hash)
        budget = min(request.budget, TREE_PUSH_LIMIT)
        frontier: deque[ContentHash] = deque([manifest.tree.hash])
        queued = {manifest.tree.hash}
        dirs: list[bytes] = []
        files: list[bytes] = []
        while frontier and budget > 0:
            batch = [frontier.popleft() for _ in range(min(len(frontier), TREE_PUSH_BATCH))]
            wanted = [(h, g) for h in batch if (g := grants.lookup(root, h)) is not None]
            found = await self._load(root, wanted)
            for node_hash, grant in wanted:
                node = found.get(node_hash)
                if node is None or len(node) > budget:
                    budget = 0  # gone, or past the budget: the client asks for the rest
                    break
                budget -= len(node)
                (dirs if grant.kind is _NodeKind.DIRECTORY else files).append(node)
                for child in self._grant_children(root, node, grant, grants):
                    if child in queued:
                        continue
                    if not request.file_trees and grants.is_file(root, child):
                        continue  # a listing: directory trees alone
                    queued.add(child)
                    frontier.append(child)
                if len(dirs) + len(files) == MAX_NODES_PER_REPLY:
                    reply = TreeNodes(request.request_id, tuple(dirs), tuple(files), False)
                    await self._send(stream, session.send(reply))
                    dirs, files = [], []
            if (dirs or files) and frontier and budget > 0:
                # Each batch's nodes go out before the next is looked up: the top levels
                # (a few nodes) reach the client at once, not with the next 256.
                reply = TreeNodes(request.request_id, tuple(dirs), tuple(files), False)
                await self._send(stream, session.send(reply))
                dirs, files = [], []
        reply = TreeNodes(request.request_id, tuple(dirs), tuple(files), True)
        await self._send(stream, session.send(reply))

    def _grant_children(
        self,
        share_root: ContentHash,
        encoded: bytes,
        grant: _Grant,
        grants: _ConnectionGrants,
    ) -> list[ContentHash]:
        """Grant a served node's children to the connection; returns their hashes."""
        children: list[ContentHash] = []
        if grant.kind is _NodeKind.DIRECTORY:
            dir_node = DIR_TREE.decode_untrusted(encoded)
            if isinstance(dir_node, BranchNode):
                for child in dir_node.children:
                    grants.grant(share_root, child.hash, grant)
                    children.append(child.hash)
                return children
            for entry in dir_node.leaves:
                if entry.kind is EntryKind.DIRECTORY:
                    grants.grant(share_root, entry.hash, _Grant(_NodeKind.DIRECTORY, None))
                else:
                    grants.grant(share_root, entry.hash, _Grant(_NodeKind.FILE, entry.hash))
                children.append(entry.hash)
            return children
        if is_leaf_encoding(encoded):
            # Chunks are checked against the share at request time. Not decoded: the trees
            # of 10,000 small files were 10,000 leaf nodes decoded on the sender's loop.
            return children
        file_node = FILE_TREE.decode_untrusted(encoded)
        assert isinstance(file_node, BranchNode)
        for child in file_node.children:
            grants.grant(share_root, child.hash, grant)
            children.append(child.hash)
        return children

    async def read_chunks(
        self, wanted: list[tuple[ContentHash, list[ChunkLocation]]]
    ) -> list[bytes | None]:
        """Each wanted chunk from the first location that still holds it, hash-checked before
        it is sent unless its file is untouched since the scan hashed it (None: no location
        does; a file changed behind the index's back). A
        subclass in the tests overrides this to play a peer that sends corrupt data
        (tests/support/hooked_daemon.py); the shipped daemon has no switch for it."""
        return await in_thread(_read_group, wanted)

    async def _chunks(
        self,
        request: GetChunks,
        stream: Stream,
        session: StreamSession,
        conn: PeerConnection,
        *,
        check_private: bool,
        placing: PlacingChunks | None = None,
        share_id: int | None = None,
    ) -> None:
        """Answer a GetChunks: each group of chunks read (and hash-checked) in one thread
        call, framed into one buffer and written with one send_all. Per chunk, a write
        would cost a transmit pass of the connection and a header+payload copy anyway; per
        group, the bulk path pays those once per ~4 MiB (issue 13's sender profile).
        ``placing``: a folder's placement under way, whose chunks the index does not hold
        yet (a member taking the same change asks for them). ``share_id``: a folder's
        scan, where the chunks are located (else by the root)."""
        private = self._private_paths() if check_private else set()
        # The private-share check and the chunk lookups are one index call: each is a
        # thread hop, and the sender paid three per request.
        refused, locations = await self._index.run(
            _locate_request, self._index.index, request, private, share_id
        )
        if refused:
            await self._send(stream, session.send(_not_found(request.request_id, "no share")))
            return
        swarm = self._swarm.get(request.share_root)
        if swarm is not None:
            for position, ref in enumerate(request.chunks):
                piece = swarm.index_of.get(ref.id)
                if not locations[position] and piece is not None and swarm.held[piece]:
                    held = swarm.locations[piece]
                    locations[position] = [
                        ChunkLocation(path, held.offset, ref.length)
                        for path in held.candidate_paths()
                    ]
        if placing is not None:
            for position, ref in enumerate(request.chunks):
                if not locations[position]:
                    locations[position] = placing.locations(ref.id, ref.length)
        index = 0
        while index < len(request.chunks):
            group_end = index
            group_bytes = 0
            while group_end < len(request.chunks) and (
                group_end == index or group_bytes < READ_BATCH_BYTES
            ):
                group_bytes += request.chunks[group_end].length
                group_end += 1
            wanted = [(request.chunks[i].id, locations[i]) for i in range(index, group_end)]
            datas = await self.read_chunks(wanted)
            parts: list[bytes] = []
            payload = 0
            missing = False
            for data in datas:
                if data is None:
                    missing = True
                    break
                header = encode_chunk_data_header(request.request_id, index, len(data))
                parts += (header, data)
                payload += len(data)
                self.counters.protocol_sent += len(header)
                self.counters.chunks_served += 1
                index += 1
                if self._upload_limit is not None:
                    # Rate-limited: chunk by chunk, so the limit paces evenly instead of
                    # letting a whole group out at once after a long wait.
                    await self._send_chunks(stream, conn, parts, payload)
                    parts, payload = [], 0
            if parts:
                await self._send_chunks(stream, conn, parts, payload)
            if missing:
                self.counters.integrity_failures += 1
                if request.share_root not in self.stale:
                    self.stale.add(request.share_root)
                    found, self.stale_found = self.stale_found, trio.Event()
                    found.set()
                why = self._gone(request.share_root, f"chunk {index} unavailable")
                reply = _not_found(request.request_id, why)
                await self._send(stream, session.send(reply))
                return

    async def _send_chunks(
        self, stream: Stream, conn: PeerConnection, parts: list[bytes], payload: int
    ) -> None:
        await throttle(self._upload_limit, payload)
        self.counters.payload_sent += payload
        conn.payload_sent += payload
        await stream.send_all_parts(parts)


def _not_found(request_id: int, message: str) -> ErrorReply:
    return ErrorReply(request_id, ErrorCode.NOT_FOUND, message)


def _locate_request(
    index: IndexStore, request: GetChunks, private: set[str], share_id: int | None = None
) -> tuple[bool, list[list[ChunkLocation]]]:
    """(refused: the root names a private folder's scan, where each chunk may be read)."""
    if private:
        record = index.share_by_root(request.share_root)
        if record is not None and record.local_path in private:
            return True, []
    ids = [chunk.id for chunk in request.chunks]
    return False, index.locate_chunks(ids, request.share_root, share_id=share_id)


def _read_group(wanted: list[tuple[ContentHash, list[ChunkLocation]]]) -> list[bytes | None]:
    """Each chunk from the first location that still holds it (hash-checked unless its
    file's stat shows it untouched since the scan: ChunkReader)."""
    with ChunkReader(trust_settled=True) as reader:
        return [reader.read_first_intact(cid, locations) for cid, locations in wanted]


def _load_nodes(
    index: IndexStore, dir_hashes: list[ContentHash], file_roots: list[ContentHash]
) -> tuple[dict[ContentHash, bytes], dict[ContentHash, dict[ContentHash, bytes]]]:
    dirs = {h: node for h in dir_hashes if (node := index.dir_node(h)) is not None}
    # One query per 500 roots: a fetch of small files asks for 256 file trees a request.
    return dirs, index.file_trees_many(file_roots)


def _count_pieces(index: IndexStore, tree: Child) -> int:
    """Unique chunks of a share in the index (the count does not depend on the order)."""
    seen: set[bytes] = set()
    directories = [tree]
    while directories:
        directory = directories.pop()
        for _offset, entry in iter_leaves(DIR_TREE, directory, _require(index.dir_node)):
            if entry.kind is EntryKind.DIRECTORY:
                directories.append(entry.root)
                continue
            packed = index.file_chunks(entry.hash)
            if packed is None:
                raise StorageError(f"index lost the chunk list of file {short_hex(entry.hash)}")
            seen.update(
                packed[start : start + HASH_LEN]
                for start in range(0, len(packed), CHUNK_RECORD.size)
            )
    return len(seen)


def _require(get: Callable[[ContentHash], bytes | None]) -> Callable[[ContentHash], bytes]:
    def lookup(node_hash: ContentHash) -> bytes:
        found = get(node_hash)
        if found is None:
            raise StorageError(f"index lost directory node {short_hex(node_hash)}")
        return found

    return lookup
