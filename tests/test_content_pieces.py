from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from p2pfs.content.chunking import ChunkRef
from p2pfs.content.pieces import tree_order_key, unique_pieces
from p2pfs.ids import ContentHash


def test_path_order_is_depth_first_by_name() -> None:
    paths = ["a.txt", "a/b", "a/c/d", "b", "a/c.txt", "\u00e9", "Z"]
    assert sorted(paths, key=tree_order_key) == [
        "Z",
        "a/b",
        "a/c/d",
        "a/c.txt",
        "a.txt",
        "b",
        "\u00e9",
    ]


refs = st.builds(
    ChunkRef, st.integers(0, 20).map(lambda i: ContentHash(bytes([i]) * 32)), st.just(7)
)


@given(st.lists(st.lists(refs, max_size=10), max_size=10))
def test_unique_pieces_keeps_first_occurrences_in_order(files: list[list[ChunkRef]]) -> None:
    pieces = unique_pieces(files)
    flat = [ref for chunks in files for ref in chunks]
    assert len({ref.id for ref in pieces}) == len(pieces)
    assert {ref.id for ref in pieces} == {ref.id for ref in flat}
    assert [flat.index(ref) for ref in pieces] == sorted(flat.index(ref) for ref in pieces)
