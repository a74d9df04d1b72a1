"""Walking many remote trees at once: nodes are fetched in batches (one request per batch,
across all trees), each verified against the hash, size and height its parent gave.

Untrusted trees are bounded as they are opened (``WalkBound``): a job's leaves never exceed
its bound (by default what its root's size allows: a file of S bytes has at most
ceil(S / min chunk) + 1 chunks), a node below a root is never empty, and in a tree whose
leaves are strictly ordered (directories, folder indexes) no node may occur twice and the
leaves must increase across the whole tree. Every violation is the peer's fault
(RemoteProtocolError), raised before the offending node's children are queued."""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from p2pfs.content.tree import Child, LeafNode, TreeSchema, WalkBound, bound_for
from p2pfs.errors import RemoteProtocolError
from p2pfs.ids import ContentHash

L = TypeVar("L")

FetchNodes = Callable[[list[ContentHash]], Awaitable[list[bytes]]]
BATCH = 256
"""Nodes per request (the wire protocol's bound)."""
WINDOW = 16 * BATCH
"""Nodes asked per round trip by a walk on one request stream, which pipelines them as
requests of BATCH (RequestStream.nodes). Measured through the link emulator at 80 ms, 1%
(2,000 files): the chunk trees took 8 round trips at BATCH; a fetch's whole tree walk now
takes one per level of depth while each level holds at most WINDOW nodes."""


@dataclass(slots=True)
class TreeJob(Generic[L]):
    """One tree to walk; ``leaves`` fills with (offset, leaf) in tree order.

    ``bound``: the leaves this walk may produce (shared by several jobs if they share one
    object, as a share's directories do); None: what the root's size allows."""

    schema: TreeSchema[L]
    root: Child
    tag: Any = None
    bound: WalkBound | None = None
    leaves: list[tuple[int, L]] = field(default_factory=list)
    _keyed: list[tuple[tuple[int, ...], int, L]] = field(default_factory=list)
    _seen: set[ContentHash] = field(default_factory=set)


@dataclass(slots=True)
class _Pending:
    job: TreeJob[Any]
    child: Child
    offset: int
    height: int | None
    key: tuple[int, ...]


async def walk_trees(jobs: list[TreeJob[Any]], fetch: FetchNodes, batch_size: int = BATCH) -> int:
    """Fill every job's leaves; returns the number of nodes fetched. ``batch_size``: distinct
    nodes per call of ``fetch`` (which may split it into several requests)."""
    for job in jobs:
        if job.bound is None:
            job.bound = bound_for(job.schema, job.root)
    # Pending nodes by hash, in the order first queued: a batch is the first batch_size
    # hashes, each with every place it is wanted (one fetch however many trees hold it).
    # A list scanned whole for each batch made a walk of n nodes cost n^2 / batch_size
    # steps: the trees of 150,000 one-chunk files took 4.07 s against 1.47 s now (50,000:
    # 0.69 against 0.40 s), nodes served from memory.
    frontier: dict[ContentHash, list[_Pending]] = {}
    for job in jobs:
        frontier.setdefault(job.root.hash, []).append(_Pending(job, job.root, 0, None, ()))
    fetched = 0
    while frontier:
        wanted = list(itertools.islice(frontier, batch_size))
        encodings = dict(zip(wanted, await fetch(wanted), strict=True))
        fetched += len(wanted)
        for node_hash in wanted:
            for pending in frontier.pop(node_hash):
                _open(pending, encodings[node_hash], frontier)
    for job in jobs:
        job._keyed.sort(key=lambda item: item[0])
        job.leaves = [(offset, leaf) for _key, offset, leaf in job._keyed]
        job._keyed = []
        job._seen = set()
        if job.schema.codec.strict_order:
            for (_o, previous), (_p, current) in zip(job.leaves, job.leaves[1:], strict=False):
                job.schema.codec.check_leaf_order_untrusted(previous, current)
    return fetched


def _open(pending: _Pending, encoded: bytes, frontier: dict[ContentHash, list[_Pending]]) -> None:
    """Verify one fetched node where ``pending`` wants it; queue its children, or keep its
    leaves."""
    schema = pending.job.schema
    node = schema.verify_node_untrusted(pending.child, encoded, pending.height)
    _account(pending, node)
    offset = pending.offset
    if isinstance(node, LeafNode):
        for position, leaf in enumerate(node.leaves):
            pending.job._keyed.append(((*pending.key, position), offset, leaf))
            offset += schema.codec.leaf_size(leaf)
        return
    for position, child in enumerate(node.children):
        frontier.setdefault(child.hash, []).append(
            _Pending(pending.job, child, offset, node.height - 1, (*pending.key, position))
        )
        offset += child.size


def _account(pending: _Pending, node: Any) -> None:
    """Bound the job before this node's children or leaves are queued."""
    job = pending.job
    if job.schema.codec.strict_order:
        # Strictly ordered leaves cannot repeat, so neither can any subtree holding them.
        if pending.child.hash in job._seen:
            raise RemoteProtocolError(f"{job.schema.name}: a node occurs twice in one tree")
        job._seen.add(pending.child.hash)
    assert job.bound is not None
    job.bound.open(job.schema.name, node, is_root=pending.height is None)
