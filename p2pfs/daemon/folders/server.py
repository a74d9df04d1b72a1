"""The serving side of folder sync: membership proofs, root subscriptions, and the nodes,
records and chunks of a folder, for connections that proved membership.

Access rule: nothing about a folder (not even whether this node has it) reaches a
connection until its peer has proven it holds the folder's read key. A FolderHello for an
unknown folder gets a challenge like any other, with a proof nobody can check, and its
FolderProof gets the same NOT_FOUND as a wrong proof.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

import msgpack
import trio

from p2pfs.content.folder import FILE_TREE
from p2pfs.content.tree import Child, LeafNode
from p2pfs.ids import HASH_LEN, ContentHash, short_hex
from p2pfs.net import PeerConnection
from p2pfs.sync.keys import FolderKeys
from p2pfs.sync.records import SignedRecord
from p2pfs.sync.rootpush import index_push
from p2pfs.waits import first_of
from p2pfs.wire.codes import ErrorCode
from p2pfs.wire.messages import (
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
    GetNodes,
    NodesReply,
    WatchFolder,
)

from ..storage import AsyncIndex
from .underway import PlacingChunks

logger = logging.getLogger(__name__)

FILE_NODE_CACHE = 64
MAX_CHALLENGES_PER_CONNECTION = 16
"""Open FolderHello challenges one connection may hold (an honest client opens one per
folder and answers it within a round trip); a new one beyond this replaces the oldest."""
MAX_CHALLENGES = 4096
"""Open challenges across all connections; beyond this a FolderHello is answered BUSY."""
PROGRESS_INTERVAL = 0.5
"""A FolderRoot that only updates the need is sent at most this often per subscription."""
FOLDER_PUSH_LIMIT = 1 << 20
"""Node bytes pushed after one FolderRoot at most, whatever the client's budget."""
PUSH_FRAME_NODES = 256
"""Items in one FolderNodes frame (the protocol's bound)."""
PUSHES_KEPT = 8
"""Pushes kept made (per folder, previous root, root and budget) for other watchers."""
SERVER_ROLE = "server"
CLIENT_ROLE = "client"


class ServedFolder(Protocol):
    """What the server needs of a folder (implemented by the sync engine)."""

    keys: FolderKeys
    device: bytes
    """This node's device id in the folder (told to members in FolderWelcome)."""
    placing: PlacingChunks
    """What it is placing now (told to watchers that ask, FolderPlacing)."""

    def served_node(self, node_hash: ContentHash) -> bytes | None: ...

    async def held_file_trees(
        self, roots: list[ContentHash]
    ) -> dict[ContentHash, dict[ContentHash, bytes]]:
        """The trees (node hash -> encoding) of those of ``roots`` that are the tree root
        of a file the folder holds."""
        ...

    def current_root(self) -> tuple[ContentHash, int, trio.Event]: ...

    def root_signature(self, root: ContentHash, count: int) -> bytes | None:
        """The write key's signature over this index root; None on a read-only member."""
        ...

    def progress(self) -> tuple[FolderNeed, trio.Event]:
        """This node's need now, and an event set when it changes."""
        ...

    def members_except(self, node_id: bytes) -> list[FolderMember]: ...

    def member_connected(self, conn: PeerConnection) -> None: ...

    def share_root(self) -> ContentHash | None:
        """The root of the folder's last scan, which locates its chunks in the index."""
        ...

    def share_id(self) -> int | None:
        """The index's id of the folder's scan (the same across rescans): its chunks are
        located by it, so a request served while a rescan commits finds them (by the
        root, the new root was in the index before the folder knew it). None: by root."""
        ...


@dataclass(slots=True)
class FolderGrants:
    """One connection's folder state: open challenges and the folders it proved."""

    challenges: dict[bytes, tuple[bytes, bytes]] = field(default_factory=dict)
    members: set[bytes] = field(default_factory=set)
    file_nodes: dict[ContentHash, ContentHash] = field(default_factory=dict)
    """File-tree nodes this connection reached: node hash -> the file root it belongs to."""


class FolderServer:
    def __init__(
        self,
        index: AsyncIndex,
        lookup: Callable[[bytes], ServedFolder | None],
        own_id: bytes,
        member_root: Callable[[bytes, bytes], Child | None] = lambda _folder, _member: None,
    ) -> None:
        self._index = index
        self._lookup = lookup
        self._own_id = own_id
        self._member_root = member_root
        """(folder id, node id) -> the root that member last announced to us: a push of
        the same root would bring it only what it holds."""
        self._file_nodes: OrderedDict[ContentHash, dict[ContentHash, bytes]] = OrderedDict()
        self._pushes: OrderedDict[tuple[bytes, Child | None, Child, int], list[FolderNodes]] = (
            OrderedDict()
        )
        self._challenges_held = 0

    def is_member(self, grants: FolderGrants, folder_id: bytes) -> ServedFolder | None:
        if folder_id not in grants.members:
            return None
        return self._lookup(folder_id)

    @property
    def challenges_held(self) -> int:
        """Open FolderHello challenges across all connections."""
        return self._challenges_held

    def forget(self, grants: FolderGrants) -> None:
        """The connection holding ``grants`` ended: its open challenges go with it."""
        self._challenges_held -= len(grants.challenges)
        grants.challenges.clear()

    def hello(
        self, request: FolderHello, conn: PeerConnection, grants: FolderGrants
    ) -> FolderChallenge | ErrorReply:
        challenges = grants.challenges
        if request.folder_id in challenges:
            del challenges[request.folder_id]  # a new hello replaces its folder's challenge
            self._challenges_held -= 1
        elif len(challenges) >= MAX_CHALLENGES_PER_CONNECTION:
            del challenges[next(iter(challenges))]  # the oldest
            self._challenges_held -= 1
        if self._challenges_held >= MAX_CHALLENGES:
            logger.warning(
                "folder challenges at their cap: FolderHello from %s refused", conn.peer_id.short()
            )
            return ErrorReply(request.request_id, ErrorCode.BUSY, "too many open challenges")
        server_nonce = os.urandom(32)
        folder = self._lookup(request.folder_id)
        if folder is None:
            proof = os.urandom(32)  # indistinguishable from a real one without the key
        else:
            proof = folder.keys.membership_proof(
                SERVER_ROLE, request.nonce, server_nonce, self._own_id, conn.peer_id.raw
            )
        challenges[request.folder_id] = (request.nonce, server_nonce)
        self._challenges_held += 1
        return FolderChallenge(request.request_id, server_nonce, proof)

    def proof(
        self, request: FolderProof, conn: PeerConnection, grants: FolderGrants
    ) -> FolderWelcome | ErrorReply:
        nonces = grants.challenges.pop(request.folder_id, None)
        if nonces is not None:
            self._challenges_held -= 1
        folder = self._lookup(request.folder_id)
        if (
            nonces is None
            or folder is None
            or not folder.keys.check_proof(
                request.proof, CLIENT_ROLE, nonces[0], nonces[1], conn.peer_id.raw, self._own_id
            )
        ):
            logger.warning("peer %s failed a folder membership proof", conn.peer_id.short())
            return ErrorReply(request.request_id, ErrorCode.NOT_FOUND, "no such folder here")
        grants.members.add(request.folder_id)
        folder.member_connected(conn)
        members = tuple(folder.members_except(conn.peer_id.raw))
        return FolderWelcome(request.request_id, members, folder.device)

    async def watch(
        self,
        request: WatchFolder,
        grants: FolderGrants,
        send: Callable[[FolderRoot | FolderNodes | FolderPlacing | ErrorReply], Awaitable[None]],
        member: bytes,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Send the folder's index root and need now and after every change (latest values
        only; a change of the need alone at most every PROGRESS_INTERVAL) to ``member`` (its
        node id), each followed by its push if the request asked for one; and, if asked,
        what the folder is placing as it grows (FolderPlacing, between roots)."""
        folder = self.is_member(grants, request.folder_id)
        if folder is None:
            task_status.started()
            await send(ErrorReply(request.request_id, ErrorCode.NOT_FOUND, "no such folder"))
            return
        task_status.started()
        sent: tuple[ContentHash, FolderNeed] | None = None
        sent_at = -PROGRESS_INTERVAL
        budget = min(request.push_budget, FOLDER_PUSH_LIMIT)
        pushed_for: Child | None = None
        """The root the last push was for: the client, if in step, holds it."""
        placing_seen: tuple[int, int] | None = None
        """What the client was last told of our placement (generation, ids)."""
        while self._lookup(request.folder_id) is folder:
            root, count, changed = folder.current_root()
            need, progressed = folder.progress()
            placed = (folder.placing.changed,) if request.placing else ()
            if request.placing:
                told = folder.placing.frames(request.request_id, placing_seen)
                placing_seen = folder.placing.seen  # what ``told`` brings the client to
                for placing in told:
                    await send(placing)
            if sent is None or (root, need) != sent:
                wait = sent_at + PROGRESS_INTERVAL - trio.current_time()
                if sent is not None and root == sent[0] and wait > 0:
                    # The need alone changed: not sent more often (a new root is not held).
                    with trio.move_on_after(wait):
                        await first_of(changed, *placed)
                    continue
                signature = folder.root_signature(root, count)
                await send(FolderRoot(request.request_id, root, count, need, signature))
                sent, sent_at = (root, need), trio.current_time()
                if request.push_budget:
                    current = Child(root, count)
                    if self._member_root(request.folder_id, member) == current:
                        # Our root is the member's own (it took our change, or we took
                        # its): it holds every node, record and tree of it.
                        frames = _frames([], [], [])
                    else:
                        frames = await self._push(folder, pushed_for, current, budget)
                    for frame in frames:
                        await send(replace(frame, request_id=request.request_id))
                    pushed_for = current
            await first_of(changed, progressed, *placed)
        # The folder was removed here (maybe joined again since): this subscription is over.
        await send(ErrorReply(request.request_id, ErrorCode.NOT_FOUND, "folder removed"))

    async def _push(
        self, folder: ServedFolder, previous: Child | None, root: Child, budget: int
    ) -> list[FolderNodes]:
        """The FolderNodes frames that follow a FolderRoot of ``root`` (at least one, the
        last marked): what a client holding ``previous`` will ask for, within ``budget``.
        Every watcher of a folder gets the same push for the same change: made once."""
        key = (folder.keys.folder_id, previous, root, budget)
        frames = self._pushes.get(key)
        if frames is None:
            frames = await _make_push(folder, previous, root, budget)
            self._pushes[key] = frames
            if len(self._pushes) > PUSHES_KEPT:
                self._pushes.popitem(last=False)
        return frames

    async def nodes(self, request: GetNodes, grants: FolderGrants) -> NodesReply | ErrorReply:
        """Index nodes, signed records, and the file trees of files the folder holds."""
        folder = self.is_member(grants, request.share_root)
        if folder is None:
            return ErrorReply(request.request_id, ErrorCode.NOT_FOUND, "no such folder")
        # File-tree nodes: a file root the folder holds, or a node reached from one on this
        # connection. All trees a request needs are loaded in one worker-thread call.
        wanted_files: dict[ContentHash, ContentHash] = {}
        # Nodes the folder serves itself, read once: a record can be replaced while the
        # file trees load below, and the answer must use what was checked here.
        served: dict[ContentHash, bytes] = {}
        for node_hash in request.hashes:
            own = folder.served_node(node_hash)
            if own is not None:
                served[node_hash] = own
        others = [h for h in dict.fromkeys(request.hashes) if h not in served]
        # Which are roots of the folder's files is read from the scan index with their trees,
        # in one call (two queries a file before): nodes reached from a tree already served
        # here need no lookup.
        trees = await folder.held_file_trees([h for h in others if h not in grants.file_nodes])
        for node_hash in others:
            file_root = node_hash if node_hash in trees else grants.file_nodes.get(node_hash)
            if file_root is None:
                message = f"node {short_hex(node_hash)} not here"
                return ErrorReply(request.request_id, ErrorCode.NOT_FOUND, message)
            wanted_files[node_hash] = file_root
        to_load = []
        for file_root in dict.fromkeys(wanted_files.values()):
            if file_root in trees:
                continue
            cached = self._file_nodes.get(file_root)
            if cached is None:
                to_load.append(file_root)
            else:
                self._file_nodes.move_to_end(file_root)
                trees[file_root] = cached
        if to_load:
            trees.update(await self._index.run(self._index.index.file_trees_many, to_load))
        for file_root in dict.fromkeys(wanted_files.values()):
            nodes = trees.get(file_root)
            if nodes is not None and len(nodes) > 1:
                # Only a tree of several nodes is asked again (its children): a one-chunk
                # file's single node is never wanted twice.
                self._file_nodes[file_root] = nodes
                self._file_nodes.move_to_end(file_root)
                if len(self._file_nodes) > FILE_NODE_CACHE:
                    self._file_nodes.popitem(last=False)
        found: list[bytes] = []
        for node_hash in request.hashes:
            encoded = served.get(node_hash)
            if encoded is None:
                file_root = wanted_files[node_hash]
                nodes = trees.get(file_root, {})
                encoded = nodes.get(node_hash)
                if encoded is None:
                    message = f"node {short_hex(node_hash)} is gone"
                    return ErrorReply(request.request_id, ErrorCode.NOT_FOUND, message)
                if len(nodes) == 1:
                    found.append(encoded)  # a one-chunk file: its root is its only leaf
                    continue
                node = FILE_TREE.decode_untrusted(encoded)
                if not isinstance(node, LeafNode):
                    for child in node.children:
                        grants.file_nodes[child.hash] = file_root
            found.append(encoded)
        return NodesReply(request.request_id, tuple(found))


async def _make_push(
    folder: ServedFolder, previous: Child | None, root: Child, budget: int
) -> list[FolderNodes]:
    """Index nodes, then the records at the changed leaves, then those records' file trees
    (each tree whole or not at all), until the next would pass ``budget``."""
    index = index_push(previous, root, folder.served_node, budget)
    size = index.size
    records: list[bytes] = []
    for record_hash in index.record_hashes:
        encoded = folder.served_node(record_hash)
        if encoded is None or size + len(encoded) > budget:
            break
        records.append(encoded)
        size += len(encoded)
    roots = [root for root in map(_file_root, records) if root is not None]
    file_nodes: list[bytes] = []
    if roots and size < budget:
        trees = await folder.held_file_trees(list(dict.fromkeys(roots)))
        for file_root in dict.fromkeys(roots):
            nodes = trees.get(file_root)
            if not nodes:
                continue
            tree_size = sum(map(len, nodes.values()))
            if size + tree_size > budget:
                break
            file_nodes.extend(nodes.values())
            size += tree_size
    return _frames(index.nodes, records, file_nodes)


def _file_root(encoded: bytes) -> ContentHash | None:
    """The file root a stored record names (None: a directory, a delete, or a record that
    does not parse, whose tree is then simply not pushed)."""
    try:
        version = SignedRecord.decode_stored(encoded).version
        if version.deleted or version.is_directory:
            return None
        root = version.root
    except (ValueError, TypeError, AttributeError, msgpack.UnpackException) as exc:
        logger.info("folder push: a stored record does not parse: %s", exc)
        return None
    return root if isinstance(root, bytes) and len(root) == HASH_LEN else None


def _frames(index: list[bytes], records: list[bytes], files: list[bytes]) -> list[FolderNodes]:
    """The push cut into frames of at most PUSH_FRAME_NODES items, the last one marked."""
    items = [(0, n) for n in index] + [(1, r) for r in records] + [(2, f) for f in files]
    frames: list[FolderNodes] = []
    for start in range(0, len(items), PUSH_FRAME_NODES):
        part = items[start : start + PUSH_FRAME_NODES]
        kinds = [tuple(encoded for kind, encoded in part if kind == want) for want in range(3)]
        frames.append(FolderNodes(0, kinds[0], kinds[1], kinds[2], last=False))
    if frames:
        frames[-1] = replace(frames[-1], last=True)
    else:
        frames.append(FolderNodes(0, (), (), (), last=True))
    return frames
