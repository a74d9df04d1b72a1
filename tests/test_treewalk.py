"""walk_trees: many trees walked in batches of distinct nodes, each node fetched once a round."""

from __future__ import annotations

import os

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfs.content.chunking import ChunkRef
from p2pfs.content.folder import FILE_TREE
from p2pfs.content.tree import build_tree
from p2pfs.daemon.treewalk import TreeJob, walk_trees
from p2pfs.ids import ContentHash


def refs(count: int, seed: int) -> list[ChunkRef]:
    return [
        ChunkRef(ContentHash(bytes([seed % 256, n % 256, n // 256]) + bytes(29)), 65_536 + n)
        for n in range(count)
    ]


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 2_000), min_size=1, max_size=40),
    copies=st.integers(1, 3),
    batch_size=st.integers(1, 300),
)
def test_every_tree_walked_each_node_fetched_once_in_batches_of_distinct_nodes(
    sizes: list[int], copies: int, batch_size: int
) -> None:
    """Trees of many leaves (several levels), some the same tree more than once: each job
    gets its leaves in order with their offsets; a call asks at most ``batch_size``
    distinct nodes; a node wanted by several trees at once is asked once."""
    trees = [build_tree(FILE_TREE, refs(size, seed)) for seed, size in enumerate(sizes)]
    nodes = {h: encoded for _root, tree_nodes in trees for h, encoded in tree_nodes.items()}
    jobs = [
        TreeJob(FILE_TREE, root, tag=n) for n, (root, _) in enumerate(trees) for _ in range(copies)
    ]
    asked: list[list[ContentHash]] = []

    async def fetch(hashes: list[ContentHash]) -> list[bytes]:
        asked.append(hashes)
        return [nodes[h] for h in hashes]

    fetched = trio.run(walk_trees, jobs, fetch, batch_size)
    assert all(0 < len(call) <= batch_size and len(set(call)) == len(call) for call in asked)
    flat = [h for call in asked for h in call]
    assert fetched == len(flat) == len(set(flat)) == len(nodes)
    for job in jobs:
        expected = refs(sizes[job.tag], job.tag)
        offsets = [sum(r.length for r in expected[:i]) for i in range(len(expected))]
        assert job.leaves == list(zip(offsets, expected, strict=True))


def test_ten_thousand_small_trees_take_one_call_per_batch() -> None:
    """A share of 10,000 one-chunk files: 10,000 nodes in ceil(10,000 / 256) calls."""
    trees = [
        build_tree(FILE_TREE, [ChunkRef(ContentHash(os.urandom(32)), 100)]) for _ in range(10_000)
    ]
    nodes = {h: e for _root, tree_nodes in trees for h, e in tree_nodes.items()}
    jobs = [TreeJob(FILE_TREE, root) for root, _ in trees]
    calls = []

    async def fetch(hashes: list[ContentHash]) -> list[bytes]:
        calls.append(len(hashes))
        return [nodes[h] for h in hashes]

    trio.run(walk_trees, jobs, fetch)
    assert calls == [256] * 39 + [16]
