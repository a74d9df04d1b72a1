from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfs.content.chunking import Chunker, ChunkRef, chunk_id
from p2pfs.content.folder import FILE_TREE
from p2pfs.content.tree import (
    BOUNDARY_MASK,
    MAX_FANOUT,
    MIN_FANOUT,
    BranchNode,
    Child,
    LeafNode,
    TreeBuilder,
    build_tree,
    is_leaf_encoding,
    iter_leaves,
)
from p2pfs.errors import IntegrityError, LocalProtocolError, RemoteProtocolError
from p2pfs.ids import ContentHash
from tests.helpers_content import random_bytes, random_chunk_refs


def reference_root(leaves: list[ChunkRef]) -> Child:
    """The tree built the obvious way, level by level over whole lists."""

    def groups(items: list, key) -> list[list]:  # type: ignore[no-untyped-def,type-arg]
        out: list[list] = []  # type: ignore[type-arg]
        current: list = []  # type: ignore[type-arg]
        for item in items:
            current.append(item)
            boundary = key(item)[-1] & BOUNDARY_MASK == 0
            if len(current) >= MAX_FANOUT or (len(current) >= MIN_FANOUT and boundary):
                out.append(current)
                current = []
        if current or not out:
            out.append(current)
        return out

    def child(node: LeafNode[ChunkRef] | BranchNode) -> Child:
        encoded = FILE_TREE.encode(node)
        return Child(FILE_TREE.node_hash(encoded), FILE_TREE.node_size(node))

    level = [child(LeafNode(tuple(g))) for g in groups(leaves, lambda leaf: leaf.id)]
    height = 2
    while len(level) > 1:
        level = [child(BranchNode(height, tuple(g))) for g in groups(level, lambda c: c.hash)]
        height += 1
    return level[0]


leaf_counts = st.integers(0, 3000)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32), count=leaf_counts)
def test_streaming_builder_equals_level_by_level_reference(seed: int, count: int) -> None:
    leaves = random_chunk_refs(seed, count)
    root, nodes = build_tree(FILE_TREE, leaves)
    assert root == reference_root(leaves)
    assert root.size == sum(leaf.length for leaf in leaves)
    walked = list(iter_leaves(FILE_TREE, root, nodes.__getitem__))
    assert [leaf for _, leaf in walked] == leaves
    offsets = [offset for offset, _ in walked]
    assert offsets == [sum(leaf.length for leaf in leaves[:i]) for i in range(len(leaves))]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32), count=st.integers(1, 800), data=st.data())
def test_root_changes_iff_leaves_change(seed: int, count: int, data: st.DataObject) -> None:
    leaves = random_chunk_refs(seed, count)
    root, _ = build_tree(FILE_TREE, leaves)
    assert build_tree(FILE_TREE, list(leaves))[0] == root
    index = data.draw(st.integers(0, count - 1))
    mutated = list(leaves)
    choice = data.draw(st.sampled_from(["length", "id", "drop", "swap"]))
    old = mutated[index]
    if choice == "length":
        mutated[index] = ChunkRef(old.id, old.length + 1)
    elif choice == "id":
        flipped = bytes([old.id[0] ^ 1]) + old.id[1:]
        mutated[index] = ChunkRef(ContentHash(flipped), old.length)
    elif choice == "drop":
        del mutated[index]
    else:
        other = data.draw(st.integers(0, count - 1))
        mutated[index], mutated[other] = mutated[other], mutated[index]
    assert (build_tree(FILE_TREE, mutated)[0] == root) == (mutated == leaves)


def test_nodes_are_bounded_and_tree_is_shallow() -> None:
    leaves = random_chunk_refs(5, 20_000)
    _root, nodes = build_tree(FILE_TREE, leaves)
    heights = set()
    for encoded in nodes.values():
        node = FILE_TREE.decode_untrusted(encoded)
        heights.add(node.height)
        items = node.leaves if isinstance(node, LeafNode) else node.children
        assert len(items) <= MAX_FANOUT
    assert max(heights) <= 6  # about log16(20000) + 1


def test_builder_refuses_use_after_finish() -> None:
    builder = TreeBuilder(FILE_TREE)
    builder.finish()
    with pytest.raises(LocalProtocolError):
        builder.add(random_chunk_refs(1, 1)[0])


def test_every_single_bit_flip_of_a_node_is_rejected() -> None:
    refs = Chunker().chunk_refs(random_bytes(11, 3 << 20))
    root, nodes = build_tree(FILE_TREE, refs)
    assert len(nodes) > 1
    for node_hash, node in nodes.items():
        for bit in range(len(node) * 8):
            corrupted = bytearray(node)
            corrupted[bit // 8] ^= 1 << (bit % 8)
            served = {**nodes, node_hash: bytes(corrupted)}
            with pytest.raises((IntegrityError, RemoteProtocolError)):
                list(iter_leaves(FILE_TREE, root, served.__getitem__))


def test_a_chunk_can_never_pass_as_a_node() -> None:
    # Domain separation: bytes that encode a valid node, presented as a chunk, hash to a
    # different value than the node does.
    root, nodes = build_tree(FILE_TREE, random_chunk_refs(2, 10))
    encoded = nodes[root.hash]
    assert chunk_id(encoded) != root.hash


@settings(max_examples=60)
@given(seed=st.integers(0, 2**32), count=st.integers(1, 3_000))
def test_a_nodes_own_encoding_says_whether_it_is_a_leaf(seed: int, count: int) -> None:
    """The serving path reads leafness from a node's first bytes instead of decoding it:
    for every node of every tree (one leaf node up to several levels) the answer matches
    the decoded node."""
    _root, nodes = build_tree(FILE_TREE, random_chunk_refs(seed, count))
    for encoded in nodes.values():
        decoded = FILE_TREE.decode_untrusted(encoded)
        assert is_leaf_encoding(encoded) == isinstance(decoded, LeafNode)
