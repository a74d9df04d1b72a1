from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfs.content.chunking import (
    DEFAULT_CHUNKER,
    Chunker,
    ChunkerParams,
    StreamCutter,
    chunk_id,
)
from p2pfs.errors import LocalProtocolError, RemoteProtocolError
from tests.helpers_content import random_bytes

SMALL = ChunkerParams("fastcdc", "2020", 64, 256, 1024, 1)


def test_chunk_id_is_blake3_of_bytes() -> None:
    # Published BLAKE3 test vector: the hash of the empty input.
    assert chunk_id(b"").hex() == (
        "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    )


def test_cuts_cover_the_buffer_and_respect_bounds() -> None:
    data = random_bytes(1, 8 << 20)
    views = list(Chunker().cut(data))
    assert b"".join(views) == data
    params = DEFAULT_CHUNKER
    for view in views[:-1]:
        assert params.min_size <= len(view) <= params.max_size
    assert 0 < len(views[-1]) <= params.max_size


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    size=st.integers(0, 40_000),
    blocks=st.lists(st.integers(1, 5_000), min_size=1, max_size=30),
)
def test_stream_cutter_equals_whole_buffer_cut(seed: int, size: int, blocks: list[int]) -> None:
    data = random_bytes(seed, size)
    chunker = Chunker(SMALL)
    expected = [bytes(view) for view in chunker.cut(data)]
    cutter = StreamCutter(chunker)
    got: list[bytes] = []
    position = 0
    index = 0
    while position < len(data):
        step = blocks[index % len(blocks)]
        got.extend(bytes(view) for view in cutter.feed(data[position : position + step]))
        position += step
        index += 1
    got.extend(bytes(view) for view in cutter.finish())
    assert got == expected
    assert cutter.offset == len(data)


@pytest.mark.parametrize("where", [0.13, 0.5, 0.87])
def test_insertion_changes_at_most_two_chunks(where: float) -> None:
    data = random_bytes(7, 32 << 20)
    cut = int(len(data) * where)
    edited = data[:cut] + random_bytes(8, 100) + data[cut:]
    chunker = Chunker()
    before = set(chunker.chunk_refs(data))
    after = chunker.chunk_refs(edited)
    assert len([ref for ref in after if ref not in before]) <= 2


def test_identical_content_gives_identical_chunks_anywhere() -> None:
    # Dedup across files: the same 4 MiB after different prefixes shares all but the
    # chunks that straddle the seam.
    shared = random_bytes(3, 4 << 20)
    chunker = Chunker()
    alone = set(chunker.chunk_refs(shared))
    behind_prefix = chunker.chunk_refs(random_bytes(4, 300_001) + shared)
    assert len(alone & set(behind_prefix)) >= len(alone) - 2


def test_params_round_trip_and_reject_junk() -> None:
    assert ChunkerParams.from_wire_untrusted(DEFAULT_CHUNKER.to_wire()) == DEFAULT_CHUNKER
    bad_values: list[object] = [
        None,
        [],
        ["fastcdc", "2020", 16, 64, 256, 1],  # sizes below the accepted range
        ["fastcdc", "2020", 65536, 16384, 262144, 1],  # min > avg
        ["fastcdc", "2020", 16384, 65536, 262144, 9],
        ["fastcdc", "2020", 16384, 65536, True, 1],
        ["x" * 100, "2020", 16384, 65536, 262144, 1],
    ]
    for value in bad_values:
        with pytest.raises(RemoteProtocolError):
            ChunkerParams.from_wire_untrusted(value)


def test_unknown_chunker_is_refused_locally() -> None:
    with pytest.raises(LocalProtocolError):
        Chunker(ChunkerParams("rabin", "1", 1024, 4096, 16384, 0))
