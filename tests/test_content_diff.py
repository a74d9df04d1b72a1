from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfs.content.chunking import Chunker, ChunkRef
from p2pfs.content.diff import DiffStats, diff_trees
from p2pfs.content.folder import FILE_TREE
from p2pfs.content.tree import build_tree
from p2pfs.errors import IntegrityError
from p2pfs.ids import ContentHash
from tests.helpers_content import random_bytes, random_chunk_refs


def remote_of(nodes: dict[ContentHash, bytes]):  # type: ignore[no-untyped-def]
    def fetch(hashes: Sequence[ContentHash]) -> list[bytes]:
        return [nodes[h] for h in hashes]

    return fetch


def tree_height(root_hash: ContentHash, nodes: dict[ContentHash, bytes]) -> int:
    return FILE_TREE.decode_untrusted(nodes[root_hash]).height


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32), count=st.integers(0, 3000), edits=st.integers(0, 6))
def test_leaf_diff_is_the_exact_multiset_difference(seed: int, count: int, edits: int) -> None:
    rng = random.Random(seed)
    local = random_chunk_refs(seed, count)
    remote = list(local)
    fresh = iter(random_chunk_refs(seed + 1, edits * 2))
    for _ in range(edits):
        action = rng.choice(["insert", "delete", "replace", "duplicate"])
        position = rng.randint(0, len(remote))
        if action == "insert" or not remote:
            remote.insert(position, next(fresh))
        elif action == "delete":
            del remote[min(position, len(remote) - 1)]
        elif action == "replace":
            remote[min(position, len(remote) - 1)] = next(fresh)
        else:
            remote.insert(position, rng.choice(remote))
    local_root, local_nodes = build_tree(FILE_TREE, local)
    remote_root, remote_nodes = build_tree(FILE_TREE, remote)
    diff = diff_trees(
        FILE_TREE, local_root, local_nodes.__getitem__, remote_root, remote_of(remote_nodes)
    )
    assert Counter(leaf for _, leaf in diff.remote_only) == Counter(remote) - Counter(local)
    assert Counter(leaf for _, leaf in diff.local_only) == Counter(local) - Counter(remote)
    offsets: dict[ChunkRef, set[int]] = {}
    position = 0
    for leaf in remote:
        offsets.setdefault(leaf, set()).add(position)
        position += leaf.length
    for offset, leaf in diff.remote_only:
        assert offset in offsets[leaf]


@pytest.mark.parametrize("edits", [1, 4, 16])
def test_descent_touches_o_changes_times_depth_nodes(edits: int) -> None:
    leaves = random_chunk_refs(21, 50_000)
    local_root, local_nodes = build_tree(FILE_TREE, leaves)
    rng = random.Random(edits)
    remote = list(leaves)
    for new in random_chunk_refs(99, edits):
        remote.insert(rng.randint(0, len(remote)), new)
    remote_root, remote_nodes = build_tree(FILE_TREE, remote)
    stats = DiffStats()
    diff_trees(
        FILE_TREE, local_root, local_nodes.__getitem__, remote_root, remote_of(remote_nodes), stats
    )
    depth = tree_height(remote_root.hash, remote_nodes)
    total = len(remote_nodes)
    # An insertion reshapes its path and, rarely, a neighbour per level.
    assert stats.remote_nodes <= 2 * edits * depth + 2
    assert stats.remote_batches <= depth
    assert stats.remote_nodes < total / 10


def test_diff_of_an_insertion_in_a_file_is_one_small_range() -> None:
    data = random_bytes(31, 16 << 20)
    middle = len(data) // 2
    edited = data[:middle] + b"x" * 100 + data[middle:]
    chunker = Chunker()
    local_root, local_nodes = build_tree(FILE_TREE, chunker.chunk_refs(data))
    remote_refs = chunker.chunk_refs(edited)
    remote_root, remote_nodes = build_tree(FILE_TREE, remote_refs)
    diff = diff_trees(
        FILE_TREE, local_root, local_nodes.__getitem__, remote_root, remote_of(remote_nodes)
    )
    changed_bytes = sum(chunk.length for _, chunk in diff.remote_only)
    assert 0 < changed_bytes <= 2 * chunker.params.max_size
    # Each remote-only leaf is the edited file's chunk at that offset.
    offsets: dict[int, ChunkRef] = {}
    offset = 0
    for ref in remote_refs:
        offsets[offset] = ref
        offset += ref.length
    assert all(offsets[at] == chunk for at, chunk in diff.remote_only)


def test_forged_remote_node_is_rejected() -> None:
    local_root, local_nodes = build_tree(FILE_TREE, random_chunk_refs(1, 500))
    remote_root, remote_nodes = build_tree(FILE_TREE, random_chunk_refs(2, 500))
    forged = {h: local_nodes[local_root.hash] for h in remote_nodes}
    with pytest.raises(IntegrityError):
        diff_trees(FILE_TREE, local_root, local_nodes.__getitem__, remote_root, remote_of(forged))
