"""Signed file records and the folder index tree that members compare.

A *signed record* is one :class:`FileVersion` with the folder write key's Ed25519 signature
over it (and over the folder id, so a record cannot be replayed into another folder).
Ed25519 signatures are deterministic, so two read-write members that reach the same record
produce the same bytes, and their trees the same root.

The *index tree* is a content-defined tree (the foundation's :class:`TreeSchema`) whose
leaves are ``[path_key, record_hash]`` sorted by ``path_key`` = BLAKE3(path). Leaves stay
64 bytes whatever the path or vector length, so every node is small; the records themselves
are fetched by hash once the diff has named them. Two members with the same records have
the same root; where roots differ, :func:`p2pfs.content.diff.diff_trees` descends only into
subtrees that differ.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, overload

import blake3
import msgpack

from p2pfs.content.diff import LocalNode, RemoteNodes, diff_trees
from p2pfs.content.tree import (
    BOUNDARY_MASK,
    MAX_FANOUT,
    MIN_FANOUT,
    BranchNode,
    Child,
    LeafNode,
    NodeSink,
    TreeBuilder,
    TreeSchema,
    bound_for,
)
from p2pfs.errors import RemoteProtocolError
from p2pfs.ids import HASH_LEN, ContentHash, content_hash_untrusted
from p2pfs.sync.keys import FolderKeys
from p2pfs.sync.versions import MAX_FILE_VERSION_BYTES, FileVersion

SIGNATURE_LEN = 64
RECORD_CONTEXT = "p2pfs 2026-11-22 folder record v1"
PATH_KEY_CONTEXT = "p2pfs 2026-11-22 folder path key v1"
SIGNATURE_DOMAIN = b"p2pfs folder record signature v1\x00"
ROOT_SIGNATURE_DOMAIN = b"p2pfs folder index root signature v1\x00"
"""Prefix of a signed index root's statement: no record's signed message starts with it
(those start with SIGNATURE_DOMAIN), so neither signature can stand for the other."""
MAX_SIGNED_RECORD_BYTES = MAX_FILE_VERSION_BYTES + SIGNATURE_LEN + 16
MAX_FOLDER_RECORDS = 1 << 20
"""Records one folder may hold (every member stores them all, and keeps the index tree's
leaves and nodes in memory, ~0.1 KiB a record): a remote index root claiming more is
refused before any node is fetched."""
EMPTY_INDEX = Child(ContentHash(bytes(HASH_LEN)), 0)
"""The root of an index with no records (no node has this hash)."""


def path_key(path: str) -> bytes:
    return blake3.blake3(path.encode("utf-8"), derive_key_context=PATH_KEY_CONTEXT).digest()


def record_hash(encoded: bytes) -> ContentHash:
    return ContentHash(blake3.blake3(encoded, derive_key_context=RECORD_CONTEXT).digest())


@dataclass(frozen=True, slots=True)
class SignedRecord:
    version: FileVersion
    signature: bytes
    encoded: bytes | None = field(default=None, compare=False, repr=False)
    """The canonical encoding, when this record was decoded from it (kept, not made again:
    a join stores every record it received)."""

    @classmethod
    def sign(cls, version: FileVersion, keys: FolderKeys) -> SignedRecord:
        return cls(version, keys.sign(_signed_message(keys.folder_id, version)))

    def encode(self) -> bytes:
        if self.encoded is not None:
            return self.encoded
        packed: bytes = msgpack.packb([self.version.encode(), self.signature], use_bin_type=True)
        return packed

    @property
    def hash(self) -> ContentHash:
        return record_hash(self.encode())

    @classmethod
    def decode_stored(cls, data: bytes) -> SignedRecord:
        """A record this node stored (verified when a member sent it, or signed here),
        parsed without checking it again: ~3 us instead of ~0.3 ms with the signature."""
        encoded_version, signature = msgpack.unpackb(data, raw=False)
        return cls(FileVersion.decode_stored(encoded_version), signature, data)

    @classmethod
    def decode_untrusted(
        cls, data: bytes, keys: FolderKeys, *, vouched: bool = False
    ) -> SignedRecord:
        """Parse and check a record from a peer: canonical, well-formed, signed for this folder.

        ``vouched``: the caller matched ``data``'s hash to a leaf of an index tree whose
        root the write key signed (:func:`root_signature_valid`), so the write key stands
        behind these exact bytes already and the record's own signature is not checked
        again (~41 us a record here, a tenth of a join's receiving CPU)."""
        if len(data) > MAX_SIGNED_RECORD_BYTES:
            raise RemoteProtocolError(f"signed record of {len(data)} bytes exceeds bound")
        try:
            value = msgpack.unpackb(
                data,
                raw=False,
                max_bin_len=MAX_FILE_VERSION_BYTES,
                max_str_len=0,
                max_array_len=2,
                max_map_len=0,
                max_ext_len=0,
            )
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise RemoteProtocolError(f"signed record: malformed msgpack: {exc}") from exc
        if not isinstance(value, list) or len(value) != 2:
            raise RemoteProtocolError("signed record: expected [version, signature]")
        encoded_version, signature = value
        if not isinstance(encoded_version, bytes) or not isinstance(signature, bytes):
            raise RemoteProtocolError("signed record: fields must be bytes")
        if len(signature) != SIGNATURE_LEN:
            raise RemoteProtocolError("signed record: bad signature length")
        # The version's own bytes are checked canonical here, so they are what the record
        # encodes and what was signed: not encoded twice more for those two checks.
        version = FileVersion.decode_untrusted(encoded_version)
        if msgpack.packb([encoded_version, signature], use_bin_type=True) != data:
            raise RemoteProtocolError("signed record: encoding is not canonical")
        if not vouched and not keys.verify(
            signature, SIGNATURE_DOMAIN + keys.folder_id + encoded_version
        ):
            raise RemoteProtocolError(f"record for {version.path!r}: signature does not verify")
        return cls(version, signature, bytes(data))


def _signed_message(folder_id: bytes, version: FileVersion) -> bytes:
    return SIGNATURE_DOMAIN + folder_id + version.encode()


def root_statement(folder_id: bytes, root: Child) -> bytes:
    """What a signed index root says: this folder's index tree with this root and record
    count is the write key's. Every node below is checked against its parent and every
    record against its leaf's hash, so the one signature covers every record in the tree."""
    return ROOT_SIGNATURE_DOMAIN + folder_id + bytes(root.hash) + root.size.to_bytes(8, "big")


def sign_root(keys: FolderKeys, root: Child) -> bytes:
    """The write key's signature over ``root`` (a read-write member's own index root)."""
    return keys.sign(root_statement(keys.folder_id, root))


def root_signature_valid(keys: FolderKeys, root: Child, signature: bytes) -> bool:
    return keys.verify(signature, root_statement(keys.folder_id, root))


@dataclass(frozen=True, slots=True, order=True)
class IndexLeaf:
    path_key: bytes
    record_hash: ContentHash


class IndexLeafCodec:
    """Leaves of the folder index tree: ``[path_key, record_hash]`` sorted by path key."""

    def leaf_to_wire(self, leaf: IndexLeaf) -> list[Any]:
        return [leaf.path_key, leaf.record_hash]

    def leaf_from_wire_untrusted(self, value: object) -> IndexLeaf:
        if not isinstance(value, list) or len(value) != 2:
            raise RemoteProtocolError("index leaf: expected [path_key, record_hash]")
        key, digest = value
        return IndexLeaf(bytes(content_hash_untrusted(key)), content_hash_untrusted(digest))

    def leaf_key(self, leaf: IndexLeaf) -> bytes:
        return leaf.path_key

    def leaf_size(self, leaf: IndexLeaf) -> int:
        return 1  # a subtree's size is how many records it holds

    strict_order = True

    def leaf_bound(self, size: int) -> int | None:
        return size  # a leaf's size is 1: the size is the record count, exactly

    def check_leaf_order_untrusted(self, previous: IndexLeaf, current: IndexLeaf) -> None:
        if previous.path_key >= current.path_key:
            raise RemoteProtocolError("index leaves out of order or repeated")


INDEX_TREE: TreeSchema[IndexLeaf] = TreeSchema(
    "folder index tree", "p2pfs 2026-11-22 folder index node v1", IndexLeafCodec()
)


def index_leaf(record: SignedRecord) -> IndexLeaf:
    return IndexLeaf(path_key(record.version.path), record.hash)


def build_index(leaves: Iterable[IndexLeaf], sink: NodeSink | None = None) -> Child:
    """The index root over ``leaves`` (any order, one per path); EMPTY_INDEX if none."""
    ordered = sorted(leaves)
    if not ordered:
        return EMPTY_INDEX
    builder = TreeBuilder(INDEX_TREE, sink)
    builder.extend(ordered)
    return builder.finish()


def remote_changes(
    local_root: Child, local_node: LocalNode, remote_root: Child, remote_nodes: RemoteNodes
) -> LeafQueue:
    """Leaves of the remote index that the local one lacks (only differing subtrees open),
    packed, in path-key order.

    The remote tree must hold exactly its root's record count (verified node by node), at
    most MAX_FOLDER_RECORDS, with no node twice and leaves strictly increasing: a bomb of a
    few nodes whose children repeat is refused (RemoteProtocolError) after a few nodes.
    """
    if remote_root.size > MAX_FOLDER_RECORDS:
        raise RemoteProtocolError(
            f"folder index of {remote_root.size} records exceeds {MAX_FOLDER_RECORDS}"
        )
    if remote_root in (EMPTY_INDEX, local_root):
        return LeafQueue()
    if remote_root.hash == EMPTY_INDEX.hash:
        raise RemoteProtocolError("folder index: the empty root with a record count")
    if local_root == EMPTY_INDEX:
        return _all_leaves(remote_root, remote_nodes)
    diff = diff_trees(INDEX_TREE, local_root, local_node, remote_root, remote_nodes)
    queue = LeafQueue()
    for _offset, leaf in diff.remote_only:
        queue.append(leaf)
    return queue


NODES_PER_ASK = 2048
"""Remote index nodes asked for (and held, encoded) at once by a walk of a whole tree:
a 200k-record tree's leaf level is ~12k nodes, ~14 MB encoded."""


def _all_leaves(root: Child, remote_nodes: RemoteNodes) -> LeafQueue:
    """Every leaf of a remote tree, packed as each node is verified: one batch of node
    requests per level (per NODES_PER_ASK nodes). An IndexLeaf object per record, held
    for the whole tree, cost ~0.2 KiB a record at once (a 200k-record join's diff took
    B's peak RSS 80 MiB up for a moment)."""
    bound = bound_for(INDEX_TREE, root)
    seen: set[ContentHash] = set()
    frontier: list[tuple[Child, int | None]] = [(root, None)]
    queue = LeafQueue()
    previous = b""
    while frontier:
        next_level: list[tuple[Child, int | None]] = []
        for start in range(0, len(frontier), NODES_PER_ASK):
            part = frontier[start : start + NODES_PER_ASK]
            wanted = list(dict.fromkeys(child.hash for child, _height in part))
            answers = remote_nodes(wanted)
            if len(answers) != len(wanted):
                raise RemoteProtocolError(f"asked for {len(wanted)} nodes, got {len(answers)}")
            by_hash = dict(zip(wanted, answers, strict=True))
            del answers
            for child, height in part:
                if child.hash in seen:
                    raise RemoteProtocolError("folder index tree: a node occurs twice")
                seen.add(child.hash)
                node = INDEX_TREE.verify_node_untrusted(child, by_hash[child.hash], height)
                bound.open(INDEX_TREE.name, node, is_root=height is None)
                if isinstance(node, LeafNode):
                    for leaf in node.leaves:
                        if previous >= leaf.path_key:
                            raise RemoteProtocolError("index leaves out of order or repeated")
                        previous = leaf.path_key
                        queue.append(leaf)
                else:
                    next_level.extend((grandchild, node.height - 1) for grandchild in node.children)
        frontier = next_level
    return queue


def _is_cut(key: bytes, count: int) -> bool:
    """The grouping rule of :class:`TreeBuilder`: a group ends at MAX_FANOUT items, or at a
    boundary key once it holds MIN_FANOUT."""
    return count >= MAX_FANOUT or (count >= MIN_FANOUT and key[HASH_LEN - 1] & BOUNDARY_MASK == 0)


def _leaf_key(leaf: IndexLeaf) -> bytes:
    return leaf.path_key


def _key(item: IndexLeaf | Child) -> bytes:
    return item.path_key if isinstance(item, IndexLeaf) else item.hash


def _node(height: int, group: list[Any]) -> LeafNode[IndexLeaf] | BranchNode:
    return LeafNode(tuple(group)) if height == 0 else BranchNode(height + 1, tuple(group))


@dataclass(slots=True)
class IndexDelta:
    """What one :meth:`IndexTree.update` changed: the nodes made (now in the tree) and
    those no longer in it, with their encodings (a member mid-diff against the tree before
    may still ask for them). Keeps the tree's own maps of its nodes as it goes."""

    leaf_groups: dict[ContentHash, bytes]
    """The tree's leaf nodes: hash -> the group's first path key."""
    branches: dict[ContentHash, bytes]
    """The tree's nodes above the leaves: hash -> encoding."""
    made: set[ContentHash] = field(default_factory=set)
    retired: dict[ContentHash, bytes] = field(default_factory=dict)

    def make(self, height: int, group: list[Any]) -> Child:
        node = _node(height, group)
        encoded = INDEX_TREE.encode(node)
        child = Child(INDEX_TREE.node_hash(encoded), INDEX_TREE.node_size(node))
        if height == 0:
            self.leaf_groups[child.hash] = group[0].path_key
        else:
            self.branches[child.hash] = encoded
        self.made.add(child.hash)
        return child

    def drop_branches(self, children: Iterable[Child]) -> None:
        for child in children:
            self._retire(child.hash, self.branches.pop(child.hash))

    def drop_leaf_group(self, child: Child, leaves: list[IndexLeaf]) -> None:
        """``child`` leaves the tree; ``leaves`` is its group as it was."""
        del self.leaf_groups[child.hash]
        if child.hash in self.made:  # made earlier in this update: never served
            self.made.discard(child.hash)
        else:
            self.retired[child.hash] = INDEX_TREE.encode(LeafNode(tuple(leaves)))

    def _retire(self, node_hash: ContentHash, encoded: bytes) -> None:
        if node_hash in self.made:
            self.made.discard(node_hash)
        else:
            self.retired[node_hash] = encoded

    def settle(self) -> None:
        """A node dropped and made again in one update is still in the tree."""
        for node_hash in self.made:
            self.retired.pop(node_hash, None)


_LEAF = 2 * HASH_LEN
"""Bytes of one packed index leaf: path key, then record hash."""


class PackedLeaves:
    """The index tree's leaves in path-key order, packed 64 bytes each in one bytearray
    (an IndexLeaf object per record, with its two bytes objects and a dict entry, cost
    ~0.2 KiB). Reads as a sequence of IndexLeaf, made when read."""

    __slots__ = ("_data",)

    def __init__(self, leaves: Iterable[IndexLeaf] = ()) -> None:
        self._data = bytearray(b"".join(leaf.path_key + leaf.record_hash for leaf in leaves))

    @classmethod
    def packed(cls, data: bytearray) -> PackedLeaves:
        """Leaves already packed, in path-key order, keys unique (as the folder's store
        streams them)."""
        if len(data) % _LEAF:
            raise ValueError("packed index leaves have a ragged length")
        leaves = cls()
        leaves._data = data
        return leaves

    def merged(self, changes: Mapping[bytes, ContentHash | None]) -> PackedLeaves:
        """These leaves with ``changes`` applied (None removes a key): the runs between
        changed keys are copied as bytes, no object is made per leaf."""
        data, out, at = self._data, bytearray(), 0
        for key in sorted(changes):
            position = self.find(key)
            out += data[at * _LEAF : position * _LEAF]
            start = position * _LEAF
            held = data[start : start + HASH_LEN] == key
            digest = changes[key]
            if digest is not None:
                out += key
                out += digest
            at = position + 1 if held else position
        out += data[at * _LEAF :]
        return PackedLeaves.packed(out)

    def copy(self) -> PackedLeaves:
        return PackedLeaves.packed(bytearray(self._data))

    def __len__(self) -> int:
        return len(self._data) // _LEAF

    def _leaf(self, index: int) -> IndexLeaf:
        start = index * _LEAF
        if not 0 <= start < len(self._data):
            raise IndexError(index)
        return IndexLeaf(
            bytes(self._data[start : start + HASH_LEN]),
            ContentHash(bytes(self._data[start + HASH_LEN : start + _LEAF])),
        )

    @overload
    def __getitem__(self, index: int) -> IndexLeaf: ...
    @overload
    def __getitem__(self, index: slice) -> list[IndexLeaf]: ...
    def __getitem__(self, index: int | slice) -> IndexLeaf | list[IndexLeaf]:
        if isinstance(index, slice):
            return [self._leaf(i) for i in range(*index.indices(len(self)))]
        return self._leaf(index + len(self) if index < 0 else index)

    def __iter__(self) -> Iterator[IndexLeaf]:
        for index in range(len(self)):
            yield self._leaf(index)

    def __setitem__(self, index: slice, leaves: list[IndexLeaf]) -> None:
        start, stop, _step = index.indices(len(self))
        self._data[start * _LEAF : max(stop, start) * _LEAF] = b"".join(
            leaf.path_key + leaf.record_hash for leaf in leaves
        )

    def find(self, key: bytes) -> int:
        """Where ``key`` is, or would be inserted (bisection on the packed keys)."""
        data, low, high = self._data, 0, len(self)
        while low < high:
            middle = (low + high) // 2
            start = middle * _LEAF
            if data[start : start + HASH_LEN] < key:
                low = middle + 1
            else:
                high = middle
        return low

    def get(self, key: bytes) -> ContentHash | None:
        start = self.find(key) * _LEAF
        if self._data[start : start + HASH_LEN] == key:
            return ContentHash(bytes(self._data[start + HASH_LEN : start + _LEAF]))
        return None

    def last_key_bytes(self) -> bytes:
        """The last byte of every leaf's path key (all a cut depends on)."""
        return bytes(self._data[HASH_LEN - 1 :: _LEAF])

    def as_dict(self) -> dict[bytes, ContentHash]:
        return {leaf.path_key: leaf.record_hash for leaf in self}


class LeafQueue:
    """Leaves (a diff's, a join's every record) packed in chunks of QUEUE_CHUNK, taken from
    the end a batch at a time: each chunk's memory goes as soon as it is taken (one
    bytearray of every leaf shrinks only at each halving: 12.8 MB at 200k records kept
    until half of them were taken)."""

    __slots__ = ("_chunks",)

    def __init__(self) -> None:
        self._chunks: list[bytearray] = []

    def append(self, leaf: IndexLeaf) -> None:
        if not self._chunks or len(self._chunks[-1]) >= QUEUE_CHUNK * _LEAF:
            self._chunks.append(bytearray())
        chunk = self._chunks[-1]
        chunk += leaf.path_key
        chunk += leaf.record_hash

    def __len__(self) -> int:
        return sum(len(chunk) for chunk in self._chunks) // _LEAF

    def __iter__(self) -> Iterator[IndexLeaf]:
        for chunk in self._chunks:
            yield from PackedLeaves.packed(chunk)

    def pop(self, count: int) -> list[IndexLeaf]:
        """The last ``count`` leaves (or all, if fewer), removed, in key order."""
        taken: list[IndexLeaf] = []
        while count > 0 and self._chunks:
            chunk = self._chunks[-1]
            cut = max(len(chunk) - count * _LEAF, 0)
            taken[:0] = PackedLeaves.packed(chunk[cut:])
            count -= (len(chunk) - cut) // _LEAF
            if cut:
                self._chunks[-1] = chunk[:cut]
            else:
                self._chunks.pop()
        return taken


QUEUE_CHUNK = 4096
"""Leaves a chunk of a LeafQueue (256 KiB)."""


@dataclass(slots=True)
class _Level:
    """One height: its items (leaves, or the nodes of the level below) cut into groups."""

    items: Any
    """Level 0: the tree's PackedLeaves; above: the list of nodes of the level below."""
    sizes: list[int]
    nodes: list[Child]


class IndexTree:
    """The folder index tree kept up to date along the changed paths, never rebuilt.

    The tree is content-defined: where a group ends depends only on the items since the
    previous cut. So a change is re-cut from the start of the group holding it only until a
    new cut lands on an old one; every group after that is unchanged. Each level repeats
    this for the run of nodes that changed below it, so one change costs O(fanout x height)
    node encodings (plus list moves), not O(records) hashing. The result is always the tree
    :func:`build_index` makes of the same leaves (property-tested).

    Nodes above the leaves are kept encoded; a leaf node is encoded from the packed leaves
    when asked for (:meth:`node`): its encoding repeats its leaves (~70 bytes a record, 14
    MB at 200k records, beside the 12.8 MB of packed leaves).
    """

    __slots__ = ("_branches", "_first_keys", "_leaf_groups", "_leaves", "_levels")

    REBUILD_FRACTION = 8
    """A batch changing over 1/8 of the leaves is built afresh: cheaper than many re-cuts,
    and the same tree."""

    def __init__(self, leaves: Iterable[IndexLeaf] = ()) -> None:
        unique = {leaf.path_key: leaf.record_hash for leaf in leaves}
        self._leaves = PackedLeaves(IndexLeaf(k, unique[k]) for k in sorted(unique))
        """Level 0's items: every leaf, packed."""
        self._levels: list[_Level] = []
        self._first_keys: list[bytes] = []
        """The first path key of each leaf group: a change finds its group by bisection."""
        self._leaf_groups: dict[ContentHash, bytes] = {}
        self._branches: dict[ContentHash, bytes] = {}
        self._build(self._delta())

    @classmethod
    def from_packed(cls, leaves: PackedLeaves) -> IndexTree:
        """The tree of ``leaves`` (in key order, as :meth:`PackedLeaves.packed` takes
        them): built without an object per leaf."""
        tree = cls()
        tree._leaves = leaves
        tree._build(tree._delta())
        return tree

    def _delta(self) -> IndexDelta:
        return IndexDelta(self._leaf_groups, self._branches)

    def node(self, node_hash: ContentHash) -> bytes | None:
        """The encoding of a node of this tree, if it is one."""
        encoded = self._branches.get(node_hash)
        if encoded is not None:
            return encoded
        first = self._leaf_groups.get(node_hash)
        if first is None:
            return None
        size = self._levels[0].sizes[bisect.bisect_left(self._first_keys, first)]
        start = self._leaves.find(first)
        return INDEX_TREE.encode(LeafNode(tuple(self._leaves[start : start + size])))

    @property
    def node_count(self) -> int:
        return len(self._leaf_groups) + len(self._branches)

    @property
    def leaves(self) -> dict[bytes, ContentHash]:
        """Every leaf, path key -> record hash (made afresh: for checks, not per change)."""
        return self._leaves.as_dict()

    def get(self, key: bytes) -> ContentHash | None:
        """The record hash at ``key``, if any."""
        return self._leaves.get(key)

    @property
    def root(self) -> Child:
        return self._levels[-1].nodes[0] if self._levels else EMPTY_INDEX

    def nodes(self) -> dict[ContentHash, bytes]:
        """Every node of the current tree by hash, encoded afresh (a check, or a tree
        replaced whole whose nodes stay servable)."""
        nodes: dict[ContentHash, bytes] = {}
        for height, level in enumerate(self._levels):
            start = 0
            for size, child in zip(level.sizes, level.nodes, strict=True):
                nodes[child.hash] = INDEX_TREE.encode(
                    _node(height, level.items[start : start + size])
                )
                start += size
        return nodes

    def update(self, changes: dict[bytes, ContentHash | None]) -> IndexDelta:
        """Set each path key's record hash (None: remove the leaf); returns the nodes made
        and dropped."""
        delta = self._delta()
        effective = {k: v for k, v in changes.items() if self._leaves.get(k) != v}
        if not effective:
            return delta
        if self._rebuilds(changes):
            # Merged as packed bytes: a dict of every leaf cost ~0.2 KiB a record at once.
            # Nothing of the tree before is changed in place (see :meth:`updated`).
            retired = self.nodes()
            self._leaves = self._leaves.merged(effective)
            self._leaf_groups, self._branches = {}, {}
            delta = self._delta()
            self._build(delta)
            delta.retired.update(retired)
        else:
            for key in sorted(effective):
                self._change_leaf(key, effective[key], delta)
        delta.settle()
        return delta

    def updated(self, changes: dict[bytes, ContentHash | None]) -> tuple[IndexTree, IndexDelta]:
        """:meth:`update` on a copy (for a worker thread: this tree, unchanged, serves
        its nodes meanwhile). A rebuild shares nothing it changes, so copies nothing."""
        tree = IndexTree.__new__(IndexTree)
        if self._rebuilds(changes):
            tree._leaves, tree._levels = self._leaves, self._levels
            tree._first_keys = self._first_keys
            tree._leaf_groups, tree._branches = self._leaf_groups, self._branches
        else:
            tree._leaves, tree._levels = self._leaves.copy(), []
            items: Any = tree._leaves
            for level in self._levels:  # a level's items are the nodes of the one below
                tree._levels.append(_Level(items, list(level.sizes), list(level.nodes)))
                items = tree._levels[-1].nodes
            tree._first_keys = list(self._first_keys)
            tree._leaf_groups, tree._branches = dict(self._leaf_groups), dict(self._branches)
        return tree, tree.update(changes)

    def _rebuilds(self, changes: Mapping[bytes, ContentHash | None]) -> bool:
        return not self._levels or len(changes) * self.REBUILD_FRACTION > len(self._leaves)

    # -- building and re-cutting ----------------------------------------------------------

    def _build(self, delta: IndexDelta) -> None:
        self._levels = []
        if self._leaves:
            self._build_from(0, self._leaves, delta)
        self._first_keys = self._leaf_group_keys()

    def _build_from(self, height: int, items: Any, delta: IndexDelta) -> None:
        """Cut ``items`` into level ``height`` and every level above, up to one node."""
        del self._levels[height:]
        while True:
            sizes = _cut(items)
            level = _Level(items, sizes, [])
            start = 0
            for size in sizes:
                level.nodes.append(delta.make(height, items[start : start + size]))
                start += size
            self._levels.append(level)
            if len(level.nodes) == 1:
                return
            items, height = level.nodes, height + 1

    def _leaf_group_keys(self) -> list[bytes]:
        if not self._levels:
            return []
        bottom, keys, start = self._levels[0], [], 0
        for size in bottom.sizes:
            keys.append(bottom.items[start].path_key)
            start += size
        return keys

    def _change_leaf(self, key: bytes, digest: ContentHash | None, delta: IndexDelta) -> None:
        if not self._levels:  # an earlier key of this batch emptied the tree
            if digest is not None:
                self._leaves[0:0] = [IndexLeaf(key, digest)]
                self._build(delta)
            return
        items = self._levels[0].items
        at = items.find(key)
        present = at < len(items) and items[at].path_key == key
        new = [] if digest is None else [IndexLeaf(key, digest)]
        old = items[at : at + 1] if present else []
        items[at : at + len(old)] = new
        if not items:
            delta.drop_leaf_group(self._levels[0].nodes[0], old)
            for level in self._levels[1:]:
                delta.drop_branches(level.nodes)
            self._levels, self._first_keys = [], []
            return
        # A group that starts at or before the change (its first key is still in the list,
        # or was the key removed, which leaves the same position).
        group = max(bisect.bisect_right(self._first_keys, key) - 1, 0)
        start = items.find(self._first_keys[group]) if group else 0
        first, end, sizes, offset = self._recut(0, group, start, at, old, len(new), delta)
        keys = []
        for size in sizes:
            keys.append(items[offset].path_key)
            offset += size
        self._first_keys[first:end] = keys

    def _recut(
        self,
        height: int,
        group: int,
        start: int,
        at: int,
        old: int | list[IndexLeaf],
        added: int,
        delta: IndexDelta,
    ) -> tuple[int, int, list[int], int]:
        """Level ``height``'s items [at, at + removed) became ``added`` items (already in its
        list); ``old`` is the items removed (leaves), or their count (nodes). ``group``
        starts at item ``start`` <= ``at``. Re-cut from the group holding ``at`` until a new
        cut meets an old one, replace those groups' nodes, and carry the change up. Returns
        the groups replaced (first, end), their new sizes, and the item position where the
        first of them starts."""
        removed = old if isinstance(old, int) else len(old)
        level = self._levels[height]
        sizes = level.sizes
        while group + 1 < len(sizes) and start + sizes[group] <= at:
            start += sizes[group]
            group += 1
        last = group
        old_end = start + sizes[group]  # in old coordinates
        while old_end < at + removed and last + 1 < len(sizes):
            last += 1
            old_end += sizes[last]
        # Where the old groups after `last` end, in new coordinates: a cut there, past the
        # change, means every later group is as it was.
        next_old = old_end + added - removed
        items = level.items
        new_sizes: list[int] = []
        count = 0
        position = start
        while position < len(items):
            count += 1
            if _is_cut(_key(items[position]), count):
                new_sizes.append(count)
                count = 0
                while next_old < position + 1 and last + 1 < len(sizes):
                    last += 1
                    next_old += sizes[last]
                if position + 1 == next_old and position + 1 >= at + added:
                    break
            position += 1
        else:
            if count:
                new_sizes.append(count)
            last = len(sizes) - 1
        first, end = group, last + 1
        # Dropped before making: a group may come out the same.
        if isinstance(old, int):
            delta.drop_branches(level.nodes[first:end])
        else:  # the dropped leaf groups as they were: the change undone
            old_end = start + sum(sizes[first:end])
            was = items[start:at] + old + items[at + added : old_end - removed + added]
            offset = 0
            for child, size in zip(level.nodes[first:end], sizes[first:end], strict=True):
                delta.drop_leaf_group(child, was[offset : offset + size])
                offset += size
        made, offset = [], start
        for size in new_sizes:
            made.append(delta.make(height, items[offset : offset + size]))
            offset += size
        sizes[first:end] = new_sizes
        level.nodes[first:end] = made
        self._carry_up(height, first, end - first, len(made), delta)
        return first, end, new_sizes, start

    def _carry_up(self, height: int, at: int, removed: int, added: int, delta: IndexDelta) -> None:
        """Level ``height``'s nodes [at, at + removed) became ``added`` nodes: the level
        above re-cuts them (or appears, or goes if this level now holds only the root)."""
        nodes = self._levels[height].nodes
        if len(nodes) == 1:
            for above in self._levels[height + 1 :]:
                delta.drop_branches(above.nodes)
            del self._levels[height + 1 :]
            return
        if height + 1 == len(self._levels):
            self._build_from(height + 1, nodes, delta)
            return
        self._recut(height + 1, 0, 0, at, removed, added, delta)


def _cut(items: Any) -> list[int]:
    """Group sizes of a level's items (the grouping rule of :func:`_is_cut`)."""
    # Only each key's last byte decides a cut: read them all at once where leaves are packed.
    lasts = items.last_key_bytes() if isinstance(items, PackedLeaves) else None
    sizes, count = [], 0
    for position in range(len(items)):
        count += 1
        last = lasts[position] if lasts is not None else _key(items[position])[HASH_LEN - 1]
        if count >= MAX_FANOUT or (count >= MIN_FANOUT and last & BOUNDARY_MASK == 0):
            sizes.append(count)
            count = 0
    if count or not sizes:
        sizes.append(count)
    return sizes
