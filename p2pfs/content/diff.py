"""Tree diff: the leaves of a remote tree that a local one lacks, and the reverse.

Both trees are content-defined (see tree.py), so a subtree that exists on both sides has
the same hash on both sides, wherever it sits. The diff descends both trees one height at a
time from the top: at each height it first cancels every node whose hash appears on both
sides (identical subtrees, never opened), then opens only what is left. Remote nodes of one
height are asked for in one batch, so a diff costs one round trip per tree level, and the
nodes it touches are O(changes x depth), not O(tree); ``DiffStats`` counts them.

The remote side is untrusted: every remote node is verified against the hash and size its
parent gave, and a malformed or inconsistent tree raises RemoteProtocolError or
IntegrityError.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from p2pfs.content.tree import Child, LeafNode, TreeSchema, WalkBound, bound_for
from p2pfs.errors import RemoteProtocolError
from p2pfs.ids import ContentHash

L = TypeVar("L")

RemoteNodes = Callable[[Sequence[ContentHash]], Sequence[bytes]]
"""Fetches nodes of the remote tree by hash, a batch at a time (one request per call)."""
LocalNode = Callable[[ContentHash], bytes]
"""Reads one node of a local tree by hash."""


@dataclass(slots=True)
class DiffStats:
    """What a diff touched: the measure of its cost."""

    remote_nodes: int = 0
    remote_batches: int = 0
    local_nodes: int = 0


@dataclass(frozen=True, slots=True)
class LeafDiff(Generic[L]):
    """Leaves (with byte offsets) present on one side only, as multisets."""

    remote_only: list[tuple[int, L]]
    local_only: list[tuple[int, L]]


@dataclass(slots=True)
class _Pending:
    child: Child
    offset: int
    height: int | None  # unknown only for a root


@dataclass(slots=True)
class _Side(Generic[L]):
    frontier: list[_Pending] = field(default_factory=list)
    leaves: list[tuple[int, L]] = field(default_factory=list)
    bound: WalkBound | None = None
    """Set on the remote (untrusted) side only."""
    seen: set[ContentHash] = field(default_factory=set)


def diff_trees(
    schema: TreeSchema[L],
    local_root: Child,
    local_node: LocalNode,
    remote_root: Child,
    remote_nodes: RemoteNodes,
    stats: DiffStats | None = None,
    remote_bound: WalkBound | None = None,
) -> LeafDiff[L]:
    """Leaves of the remote tree missing locally and leaves of the local tree missing remotely.

    The remote tree is bounded as it is opened (``remote_bound``, by default what its
    root's size allows; see tree.WalkBound), and in a strictly ordered tree no remote node
    may occur twice and the remote leaves must increase: RemoteProtocolError otherwise.
    """
    stats = stats if stats is not None else DiffStats()
    if local_root == remote_root:
        return LeafDiff([], [])
    local: _Side[L] = _Side()
    remote: _Side[L] = _Side(
        bound=remote_bound if remote_bound is not None else bound_for(schema, remote_root)
    )
    # Roots first: their heights are unknown until opened.
    _open_local(schema, local, [_Pending(local_root, 0, None)], local_node, stats)
    _open_remote(schema, remote, [_Pending(remote_root, 0, None)], remote_nodes, stats)
    while local.frontier or remote.frontier:
        _cancel_shared(local.frontier, remote.frontier)
        heights = [p.height or 0 for p in local.frontier + remote.frontier]
        if not heights:
            break
        top = max(heights)
        local_open = [p for p in local.frontier if p.height == top]
        remote_open = [p for p in remote.frontier if p.height == top]
        local.frontier = [p for p in local.frontier if p.height != top]
        remote.frontier = [p for p in remote.frontier if p.height != top]
        _open_local(schema, local, local_open, local_node, stats)
        _open_remote(schema, remote, remote_open, remote_nodes, stats)
    if schema.codec.strict_order:
        ordered = sorted(remote.leaves, key=_by_offset)
        for (_o, previous), (_p, current) in itertools.pairwise(ordered):
            schema.codec.check_leaf_order_untrusted(previous, current)
    return _cancel_leaves(local.leaves, remote.leaves)


def _cancel_shared(local: list[_Pending], remote: list[_Pending]) -> None:
    """Drop every subtree present on both sides (multiset: a chunk run may repeat)."""
    available = Counter(p.child for p in local)
    shared: Counter[Child] = Counter()
    kept_remote = []
    for pending in remote:
        if available[pending.child] > shared[pending.child]:
            shared[pending.child] += 1
        else:
            kept_remote.append(pending)
    remote[:] = kept_remote
    kept_local = []
    for pending in local:
        if shared[pending.child]:
            shared[pending.child] -= 1
        else:
            kept_local.append(pending)
    local[:] = kept_local


def _open_local(
    schema: TreeSchema[L],
    side: _Side[L],
    opening: list[_Pending],
    local_node: LocalNode,
    stats: DiffStats,
) -> None:
    encodings = [local_node(p.child.hash) for p in opening]
    stats.local_nodes += len(opening)
    _expand(schema, side, opening, encodings)


def _open_remote(
    schema: TreeSchema[L],
    side: _Side[L],
    opening: list[_Pending],
    remote_nodes: RemoteNodes,
    stats: DiffStats,
) -> None:
    if not opening:
        return
    # A subtree that repeats within the remote frontier is asked for once.
    wanted = list(dict.fromkeys(p.child.hash for p in opening))
    answers = remote_nodes(wanted)
    stats.remote_batches += 1
    stats.remote_nodes += len(wanted)
    if len(answers) != len(wanted):
        raise RemoteProtocolError(f"asked for {len(wanted)} nodes, got {len(answers)}")
    by_hash = dict(zip(wanted, answers, strict=True))
    _expand(schema, side, opening, [by_hash[p.child.hash] for p in opening])


def _expand(
    schema: TreeSchema[L], side: _Side[L], opening: list[_Pending], encodings: list[bytes]
) -> None:
    for pending, encoded in zip(opening, encodings, strict=True):
        node = schema.verify_node_untrusted(pending.child, encoded, pending.height)
        if side.bound is not None:
            if schema.codec.strict_order:
                if pending.child.hash in side.seen:
                    raise RemoteProtocolError(f"{schema.name}: a node occurs twice in one tree")
                side.seen.add(pending.child.hash)
            side.bound.open(schema.name, node, is_root=pending.height is None)
        offset = pending.offset
        if isinstance(node, LeafNode):
            for leaf in node.leaves:
                side.leaves.append((offset, leaf))
                offset += schema.codec.leaf_size(leaf)
            continue
        for child in node.children:
            side.frontier.append(_Pending(child, offset, node.height - 1))
            offset += child.size


def _cancel_leaves(local: list[tuple[int, L]], remote: list[tuple[int, L]]) -> LeafDiff[L]:
    return LeafDiff(
        remote_only=_unmatched(remote, Counter(leaf for _, leaf in local)),
        local_only=_unmatched(local, Counter(leaf for _, leaf in remote)),
    )


def _unmatched(items: list[tuple[int, L]], other: Counter[L]) -> list[tuple[int, L]]:
    """Items not paired with an equal leaf of the other side (multiset difference)."""
    left_over = []
    for offset, leaf in items:
        if other[leaf]:
            other[leaf] -= 1
        else:
            left_over.append((offset, leaf))
    return sorted(left_over, key=_by_offset)


def _by_offset(item: tuple[int, object]) -> int:
    return item[0]
