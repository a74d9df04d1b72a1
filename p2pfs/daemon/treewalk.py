"""Walking many remote trees at once: nodes are fetched in batches (one request per batch,
across all trees), each verified against the hash, size and height its parent gave."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from p2pfs.content.tree import Child, LeafNode, TreeSchema
from p2pfs.ids import ContentHash

L = TypeVar("L")

FetchNodes = Callable[[list[ContentHash]], Awaitable[list[bytes]]]
BATCH = 256
"""Nodes per request (the wire protocol's bound)."""


@dataclass(slots=True)
class TreeJob(Generic[L]):
    """One tree to walk; ``leaves`` fills with (offset, leaf) in tree order."""

    schema: TreeSchema[L]
    root: Child
    tag: Any = None
    leaves: list[tuple[int, L]] = field(default_factory=list)
    _keyed: list[tuple[tuple[int, ...], int, L]] = field(default_factory=list)


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
    frontier = [_Pending(job, job.root, 0, None, ()) for job in jobs]
    fetched = 0
    while frontier:
        batch, frontier = _take_batch(frontier, batch_size)
        wanted = list(dict.fromkeys(p.child.hash for p in batch))
        encodings = dict(zip(wanted, await fetch(wanted), strict=True))
        fetched += len(wanted)
        for pending in batch:
            schema = pending.job.schema
            node = schema.verify_node_untrusted(
                pending.child, encodings[pending.child.hash], pending.height
            )
            offset = pending.offset
            if isinstance(node, LeafNode):
                for position, leaf in enumerate(node.leaves):
                    pending.job._keyed.append(((*pending.key, position), offset, leaf))
                    offset += schema.codec.leaf_size(leaf)
                continue
            for position, child in enumerate(node.children):
                frontier.append(
                    _Pending(pending.job, child, offset, node.height - 1, (*pending.key, position))
                )
                offset += child.size
    for job in jobs:
        job._keyed.sort(key=lambda item: item[0])
        job.leaves = [(offset, leaf) for _key, offset, leaf in job._keyed]
        job._keyed = []
    return fetched


def _take_batch(frontier: list[_Pending], batch_size: int) -> tuple[list[_Pending], list[_Pending]]:
    """Up to ``batch_size`` distinct hashes; everything else waits for the next round trip."""
    seen: set[ContentHash] = set()
    batch: list[_Pending] = []
    rest: list[_Pending] = []
    for pending in frontier:
        if pending.child.hash in seen or len(seen) < batch_size:
            seen.add(pending.child.hash)
            batch.append(pending)
        else:
            rest.append(pending)
    return batch, rest
