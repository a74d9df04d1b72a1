from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfs.content.chunking import Chunker, ChunkRef, chunk_id
from p2pfs.content.folder import FILE_TREE, verify_chunks_untrusted
from p2pfs.content.tree import (
    BOUNDARY_MASK,
    MAX_FANOUT,
    MIN_FANOUT,
    BranchNode,
    Child,
    LeafNode,
    TreeBuilder,
    build_tree,
    iter_leaves,
    prove_range,
    verify_range_untrusted,
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


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32), count=st.integers(1, 1500), data=st.data())
def test_range_proofs_verify_exactly_the_overlapping_leaves(
    seed: int, count: int, data: st.DataObject
) -> None:
    leaves = random_chunk_refs(seed, count)
    root, nodes = build_tree(FILE_TREE, leaves)
    start = data.draw(st.integers(0, root.size - 1))
    end = data.draw(st.integers(start + 1, root.size))
    proof = prove_range(FILE_TREE, root, nodes.__getitem__, start, end)
    verified = verify_range_untrusted(FILE_TREE, root, proof, start, end)
    expected = [
        (offset, leaf)
        for offset, leaf in iter_leaves(FILE_TREE, root, nodes.__getitem__)
        if offset < end and start < offset + leaf.length
    ]
    assert verified == expected


def test_every_single_bit_flip_of_chunk_or_proof_is_rejected() -> None:
    data = random_bytes(11, 3 << 20)
    refs = Chunker().chunk_refs(data)
    root, nodes = build_tree(FILE_TREE, refs)
    index = len(refs) // 2
    start = sum(ref.length for ref in refs[:index])
    chunk = data[start : start + refs[index].length]
    proof = prove_range(FILE_TREE, root, nodes.__getitem__, start, start + len(chunk))
    assert verify_chunks_untrusted(root, proof, start, [chunk]) == [refs[index]]
    # Every bit of the proof (a few KiB) and a sample of bits across the chunk.
    for position in range(len(proof)):
        node = proof[position]
        for bit in range(len(node) * 8):
            corrupted = bytearray(node)
            corrupted[bit // 8] ^= 1 << (bit % 8)
            bad_proof = [*proof[:position], bytes(corrupted), *proof[position + 1 :]]
            with pytest.raises((IntegrityError, RemoteProtocolError)):
                verify_chunks_untrusted(root, bad_proof, start, [chunk])
    for bit in range(0, len(chunk) * 8, 997):
        corrupted = bytearray(chunk)
        corrupted[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(IntegrityError):
            verify_chunks_untrusted(root, proof, start, [bytes(corrupted)])


def test_proof_rejects_wrong_offset_missing_and_extra_nodes() -> None:
    data = random_bytes(12, 2 << 20)
    refs = Chunker().chunk_refs(data)
    root, nodes = build_tree(FILE_TREE, refs)
    first = refs[0]
    proof = prove_range(FILE_TREE, root, nodes.__getitem__, 0, first.length)
    chunk = data[: first.length]
    with pytest.raises(IntegrityError):  # the same bytes claimed at another offset
        verify_chunks_untrusted(root, proof, 1, [chunk])
    with pytest.raises(RemoteProtocolError):
        verify_chunks_untrusted(root, proof[:-1], 0, [chunk])
    with pytest.raises(RemoteProtocolError):
        verify_chunks_untrusted(root, [*proof, proof[-1]], 0, [chunk])
    with pytest.raises(RemoteProtocolError):
        verify_range_untrusted(FILE_TREE, root, proof, 0, root.size + 1)


def test_a_chunk_can_never_pass_as_a_node() -> None:
    # Domain separation: bytes that encode a valid node, presented as a chunk, hash to a
    # different value than the node does.
    root, nodes = build_tree(FILE_TREE, random_chunk_refs(2, 10))
    encoded = nodes[root.hash]
    assert chunk_id(encoded) != root.hash
