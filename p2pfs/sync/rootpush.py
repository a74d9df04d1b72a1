"""Which index nodes and records a member pushes after a FolderRoot (protocol FolderNodes).

A member that watches another's root and is in step with it (holds the root sent before)
asks, for each new root, the index nodes on the changed paths level by level, then the
records at the changed leaves, then those files' trees: a round trip each. The server
knows what it sent before, so it can compute the same list itself, from its own tree's
nodes, and send it right behind the root. Pure: nodes come from a lookup.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from p2pfs.content.diff import diff_trees
from p2pfs.content.tree import Child, LeafNode
from p2pfs.ids import ContentHash
from p2pfs.sync.records import EMPTY_INDEX, INDEX_TREE

NodeLookup = Callable[[ContentHash], bytes | None]
"""An index node of this member's own trees by hash (None: not held any more)."""


@dataclass(slots=True)
class IndexPush:
    """Index nodes (encoded, in the order a member in step would ask for them) and the
    record hashes at the leaves they bring that the member lacks."""

    nodes: list[bytes] = field(default_factory=list)
    record_hashes: list[ContentHash] = field(default_factory=list)
    size: int = 0
    """Bytes of ``nodes``."""


class _Spent(Exception):
    """The budget is spent or a node is gone: the push stops where it is."""


def index_push(previous: Child | None, root: Child, node: NodeLookup, budget: int) -> IndexPush:
    """What a member holding ``previous`` (None: nothing, a first root) needs of ``root``'s
    index: nodes within ``budget`` bytes. Records are named only when the nodes are whole
    (a diff stopped midway has not found its leaves)."""
    push = IndexPush()
    if root in (previous, EMPTY_INDEX):
        return push

    def take(node_hash: ContentHash) -> bytes:
        encoded = node(node_hash)
        if encoded is None or push.size + len(encoded) > budget:
            raise _Spent
        push.nodes.append(encoded)
        push.size += len(encoded)
        return encoded

    if previous in (None, EMPTY_INDEX):
        _top_down(root, take, push)
        return push

    def own(node_hash: ContentHash) -> bytes:
        encoded = node(node_hash)
        if encoded is None:
            raise _Spent  # the tree sent before is no longer held: nothing is pushed
        return encoded

    def remote(hashes: Sequence[ContentHash]) -> list[bytes]:
        return [take(node_hash) for node_hash in hashes]

    try:
        diff = diff_trees(INDEX_TREE, previous, own, root, remote)
    except _Spent:
        return push
    push.record_hashes = [leaf.record_hash for _offset, leaf in diff.remote_only]
    return push


def _top_down(root: Child, take: Callable[[ContentHash], bytes], push: IndexPush) -> None:
    """Breadth first from the root, as a member with no index walks it."""
    level = [root.hash]
    records: list[ContentHash] = []
    try:
        while level:
            below: list[ContentHash] = []
            for node_hash in level:
                decoded = INDEX_TREE.decode_untrusted(take(node_hash))
                if isinstance(decoded, LeafNode):
                    records.extend(leaf.record_hash for leaf in decoded.leaves)
                else:
                    below.extend(child.hash for child in decoded.children)
            level = below
    except _Spent:
        pass
    # The leaves of every leaf node pushed, whole or not: each is one the member lacks.
    push.record_hashes = records
