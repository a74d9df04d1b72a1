"""Content-defined Merkle trees (one mechanism for files' chunk lists and for directories).

A tree is built bottom-up: level 0 is the list of leaves (chunks of a file, or entries of a
directory); a level is cut into groups where an item's key has its low four bits clear (about
one item in 16), with at least two and at most ``MAX_FANOUT`` items a group; each group
becomes a node one level up. This repeats until one node remains: the root.

Because cuts depend on content, not position, inserting or removing a leaf changes only the
nodes on its path (and rarely a neighbour): the rest of the tree keeps its hashes, so two
trees that differ in a few places share almost every node, wherever those nodes sit. That
is what lets the diff descend only into differing subtrees even after an insertion, which a
positional binary tree cannot do.

Every node records each child's hash and size (bytes below it), so a receiver that trusts
only the root can verify every node an untrusted peer sends as it walks down (see
:func:`iter_leaves`) and knows each leaf's offset. Node hashes use BLAKE3's derive-key mode
with a context per tree kind; chunk ids use BLAKE3's plain mode; so a leaf can never pass as
a node, and a directory node never as a file node.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import blake3
import msgpack

from p2pfs.errors import IntegrityError, LocalProtocolError, RemoteProtocolError
from p2pfs.ids import HASH_LEN, ContentHash, content_hash_untrusted

BOUNDARY_MASK = 0x0F
"""A key whose last byte has these bits clear ends a group: mean fanout 16."""
MIN_FANOUT = 2
"""A boundary ends a group only once it holds this many items, so every level shrinks."""
MAX_FANOUT = 64
"""A group is cut here regardless of keys, bounding every node's size."""
MAX_HEIGHT = 40
"""Far above any real tree (each level at least halves); bounds hostile input."""
MAX_NODE_BYTES = 64 * 1024
"""Hard bound on one encoded node (64 directory entries of 255-byte names fit easily)."""
MAX_SIZE = (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class Child:
    """A subtree as its parent sees it: the subtree's root hash and the bytes below it."""

    hash: ContentHash
    size: int


L = TypeVar("L")


class LeafCodec(Protocol[L]):
    """What a tree needs to know about its leaves."""

    def leaf_to_wire(self, leaf: L) -> list[Any]: ...

    def leaf_from_wire_untrusted(self, value: object) -> L: ...

    def leaf_key(self, leaf: L) -> bytes:
        """32 bytes that decide whether the leaf ends a group (stable across edits)."""
        ...

    def leaf_size(self, leaf: L) -> int: ...

    def check_leaf_order_untrusted(self, previous: L, current: L) -> None:
        """Raise RemoteProtocolError if ``current`` may not follow ``previous``."""
        ...

    @property
    def strict_order(self) -> bool:
        """Leaves strictly increase across the whole tree (so no subtree can repeat)."""
        ...

    def leaf_bound(self, size: int) -> int | None:
        """The most leaves a tree of ``size`` can hold (None: its size does not bound it)."""
        ...


@dataclass(frozen=True, slots=True)
class LeafNode(Generic[L]):
    """A node at height 1: the leaves themselves."""

    leaves: tuple[L, ...]

    height = 1


@dataclass(frozen=True, slots=True)
class BranchNode:
    """A node at height >= 2: references to nodes one level down."""

    height: int
    children: tuple[Child, ...]


Node = LeafNode[L] | BranchNode


class TreeSchema(Generic[L]):
    """A kind of tree: its leaf codec and the hash context that separates it from others."""

    __slots__ = ("codec", "context", "name")

    def __init__(self, name: str, context: str, codec: LeafCodec[L]) -> None:
        self.name = name
        self.context = context
        self.codec = codec

    # -- hashing and encoding -------------------------------------------------------------

    def node_hash(self, encoded: bytes) -> ContentHash:
        return ContentHash(blake3.blake3(encoded, derive_key_context=self.context).digest())

    def encode(self, node: LeafNode[L] | BranchNode) -> bytes:
        """The canonical encoding: msgpack ``[height, [item, ...]]``."""
        if isinstance(node, LeafNode):
            items = [self.codec.leaf_to_wire(leaf) for leaf in node.leaves]
            return msgpack.packb([1, items], use_bin_type=True)  # type: ignore[no-any-return]
        children = [[child.hash, child.size] for child in node.children]
        return msgpack.packb([node.height, children], use_bin_type=True)  # type: ignore[no-any-return]

    def decode_untrusted(self, data: bytes) -> LeafNode[L] | BranchNode:
        """Parse one encoded node from outside; any defect raises RemoteProtocolError."""
        if len(data) > MAX_NODE_BYTES:
            raise RemoteProtocolError(f"{self.name} node of {len(data)} bytes exceeds bound")
        try:
            value = msgpack.unpackb(
                data,
                use_list=True,
                raw=False,
                strict_map_key=True,
                max_bin_len=MAX_NODE_BYTES,
                max_str_len=MAX_NODE_BYTES,
                max_array_len=MAX_FANOUT * 8,
                max_map_len=0,
                max_ext_len=0,
            )
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise RemoteProtocolError(f"{self.name} node: malformed msgpack: {exc}") from exc
        if not isinstance(value, list) or len(value) != 2:
            raise RemoteProtocolError(f"{self.name} node: expected [height, items]")
        height, items = value
        if type(height) is not int or not 1 <= height <= MAX_HEIGHT:
            raise RemoteProtocolError(f"{self.name} node: bad height {height!r}")
        if not isinstance(items, list) or len(items) > MAX_FANOUT:
            raise RemoteProtocolError(f"{self.name} node: items must be a list of <= {MAX_FANOUT}")
        node: LeafNode[L] | BranchNode
        if height == 1:
            leaves = tuple(self.codec.leaf_from_wire_untrusted(item) for item in items)
            for previous, current in itertools.pairwise(leaves):
                self.codec.check_leaf_order_untrusted(previous, current)
            node = LeafNode(leaves)
        else:
            if not items:
                raise RemoteProtocolError(f"{self.name} node: empty branch")
            node = BranchNode(height, tuple(_child_untrusted(item) for item in items))
        if self.encode(node) != data:
            raise RemoteProtocolError(f"{self.name} node: encoding is not canonical")
        return node

    def node_size(self, node: LeafNode[L] | BranchNode) -> int:
        if isinstance(node, LeafNode):
            return sum(self.codec.leaf_size(leaf) for leaf in node.leaves)
        return sum(child.size for child in node.children)

    def verify_node_untrusted(
        self, expected: Child, data: bytes, height: int | None = None
    ) -> LeafNode[L] | BranchNode:
        """Decode ``data`` and check it is the node ``expected`` names (hash and size)."""
        if self.node_hash(data) != expected.hash:
            raise IntegrityError(f"{self.name} node does not match its hash")
        node = self.decode_untrusted(data)
        if height is not None and node.height != height:
            raise IntegrityError(f"{self.name} node has height {node.height}, expected {height}")
        if self.node_size(node) != expected.size:
            raise IntegrityError(f"{self.name} node sizes do not add up to {expected.size}")
        return node


def is_leaf_encoding(encoded: bytes) -> bool:
    """Whether a node this node encoded itself is a leaf node, read from its first bytes:
    canonical msgpack ``[height, items]`` is 0x92 then the height as a positive fixint
    (1..MAX_HEIGHT), and a leaf's height is 1. Only for trusted encodings: it checks
    nothing else (a serving node reads this instead of decoding each node it sends)."""
    return encoded[:2] == b"\x92\x01"


class WalkBound:
    """Bounds the leaves a walk of untrusted trees may produce, checked as each node is
    opened, before its children or leaves are queued (so a bomb of a few nodes whose
    children repeat is refused after a few nodes, not after 16 M leaves).

    ``outstanding`` counts queued subtrees plus leaves produced. Every subtree below a
    root holds at least one leaf (:meth:`open` refuses an empty one), so ``outstanding``
    never exceeds the leaves an honest tree really has: a tree within ``limit`` passes.
    One bound may be shared by many trees (all directories of a share).
    """

    __slots__ = ("limit", "outstanding")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.outstanding = 0

    def open(self, name: str, node: LeafNode[Any] | BranchNode, *, is_root: bool) -> None:
        """Account for one node about to be expanded; RemoteProtocolError past the bound."""
        items = len(node.leaves) if isinstance(node, LeafNode) else len(node.children)
        if not is_root and items == 0:
            raise RemoteProtocolError(f"{name}: an empty node below the root")
        self.outstanding += items - (0 if is_root else 1)
        if self.outstanding > self.limit:
            raise RemoteProtocolError(f"{name}: more than {self.limit} leaves")


def bound_for(schema: TreeSchema[Any], root: Child, cap: int | None = None) -> WalkBound:
    """The bound a tree's own (verified) size gives: a file tree ceil(size / min chunk) + 1
    leaves, an index tree its record count; never more than ``cap``."""
    limit = schema.codec.leaf_bound(root.size)
    if cap is not None:
        limit = cap if limit is None else min(limit, cap)
    return WalkBound(MAX_SIZE if limit is None else limit)


def _child_untrusted(value: object) -> Child:
    if not isinstance(value, list) or len(value) != 2:
        raise RemoteProtocolError("tree child: expected [hash, size]")
    raw_hash, size = value
    if type(size) is not int or not 0 <= size <= MAX_SIZE:
        raise RemoteProtocolError(f"tree child: bad size {size!r}")
    return Child(content_hash_untrusted(raw_hash), size)


def _is_boundary(key: bytes) -> bool:
    return key[HASH_LEN - 1] & BOUNDARY_MASK == 0


NodeSink = Callable[[ContentHash, bytes, "LeafNode[Any] | BranchNode"], None]


class _OpenLevel:
    """The open group at one height, and how many nodes that height has completed."""

    __slots__ = ("completed", "group")

    def __init__(self) -> None:
        self.group: list[Child] = []
        self.completed = 0


class TreeBuilder(Generic[L]):
    """Builds a tree from leaves in order, holding only one open group per level.

    ``sink`` (if given) receives every node as it is completed: (hash, encoding, node).
    The result equals building level by level over the whole list (tested).
    """

    __slots__ = ("_finished", "_leaf_group", "_levels", "_schema", "_sink")

    def __init__(self, schema: TreeSchema[L], sink: NodeSink | None = None) -> None:
        self._schema = schema
        self._sink = sink
        self._leaf_group: list[L] = []
        # _levels[i] holds the nodes of height i + 1 not yet grouped under a parent.
        self._levels: list[_OpenLevel] = []
        self._finished = False

    def add(self, leaf: L) -> None:
        if self._finished:
            raise LocalProtocolError("tree builder already finished")
        self._leaf_group.append(leaf)
        count = len(self._leaf_group)
        if count >= MAX_FANOUT or (
            count >= MIN_FANOUT and _is_boundary(self._schema.codec.leaf_key(leaf))
        ):
            self._emit_leaf_node()

    def extend(self, leaves: Iterable[L]) -> None:
        for leaf in leaves:
            self.add(leaf)

    def finish(self) -> Child:
        """Close the open groups bottom-up; the first height with a single node is the root."""
        if self._finished:
            raise LocalProtocolError("tree builder already finished")
        self._finished = True
        if self._leaf_group or not self._levels:
            self._emit_leaf_node()  # an empty tree is one empty leaf node
        height_index = 0
        while True:
            level = self._levels[height_index]
            if level.completed == 1:
                return level.group[0]
            if level.group:
                self._emit_branch(height_index)
            height_index += 1

    def _emit_leaf_node(self) -> None:
        node: LeafNode[L] = LeafNode(tuple(self._leaf_group))
        self._leaf_group = []
        self._emit(node, 0)

    def _emit_branch(self, height_index: int) -> None:
        level = self._levels[height_index]
        node = BranchNode(height_index + 2, tuple(level.group))
        level.group = []
        self._emit(node, height_index + 1)

    def _emit(self, node: LeafNode[L] | BranchNode, height_index: int) -> None:
        encoded = self._schema.encode(node)
        child = Child(self._schema.node_hash(encoded), self._schema.node_size(node))
        if self._sink is not None:
            self._sink(child.hash, encoded, node)
        if height_index == len(self._levels):
            self._levels.append(_OpenLevel())
        level = self._levels[height_index]
        level.completed += 1
        level.group.append(child)
        count = len(level.group)
        if count >= MAX_FANOUT or (count >= MIN_FANOUT and _is_boundary(child.hash)):
            self._emit_branch(height_index)


def build_tree(
    schema: TreeSchema[L], leaves: Iterable[L]
) -> tuple[Child, dict[ContentHash, bytes]]:
    """Build a whole tree in memory: its root and every node's encoding by hash."""
    nodes: dict[ContentHash, bytes] = {}

    def keep(node_hash: ContentHash, encoded: bytes, _node: object) -> None:
        nodes[node_hash] = encoded

    builder = TreeBuilder(schema, keep)
    builder.extend(leaves)
    return builder.finish(), nodes


NodeSource = Callable[[ContentHash], bytes]
"""Returns a node's encoding by hash (a local store, or a peer behind a request)."""


def iter_leaves(
    schema: TreeSchema[L], root: Child, get_node: NodeSource, bound: WalkBound | None = None
) -> Iterator[tuple[int, L]]:
    """Walk a tree depth-first, verifying every node; yield (byte offset, leaf) in order."""
    bound = bound if bound is not None else bound_for(schema, root)
    stack: list[tuple[Child, int, int | None]] = [(root, 0, None)]
    previous: L | None = None
    while stack:
        child, offset, height = stack.pop()
        node = schema.verify_node_untrusted(child, get_node(child.hash), height)
        bound.open(schema.name, node, is_root=height is None)
        if isinstance(node, LeafNode):
            for leaf in node.leaves:
                if previous is not None:
                    schema.codec.check_leaf_order_untrusted(previous, leaf)
                previous = leaf
                yield offset, leaf
                offset += schema.codec.leaf_size(leaf)
            continue
        pending: list[tuple[Child, int, int | None]] = []
        for grandchild in node.children:
            pending.append((grandchild, offset, node.height - 1))
            offset += grandchild.size
        stack.extend(reversed(pending))
