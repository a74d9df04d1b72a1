"""What a member is placing, as it tells its watchers (FolderPlacing) and as they keep it;
how a link's streams pick batches around other members placing the same root."""

from __future__ import annotations

import collections
import itertools

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfs.daemon.folders.client import _BatchQueue, _designated
from p2pfs.daemon.folders.underway import (
    NOTHING,
    MemberPlacing,
    PlacingChunks,
)
from p2pfs.errors import RemoteProtocolError
from p2pfs.ids import ContentHash
from p2pfs.store.assemble import PartialFile
from p2pfs.wire.frames import FrameDecoder
from p2pfs.wire.messages import (
    MAX_PLACING_HELD,
    MAX_PLACING_IDS,
    FolderPlacing,
    decode_message_untrusted,
    encode_message,
)

ROOTS = [ContentHash(bytes([n]) * 32) for n in (1, 2)]
FILE = PartialFile("/folder/sub", "film.bin", bytes(32), 1 << 20)

operations = st.lists(
    st.one_of(
        st.tuples(st.just("begin"), st.sampled_from(ROOTS)),
        st.tuples(st.just("add"), st.integers(0, 2 * MAX_PLACING_IDS + 5)),
        st.tuples(st.just("end"), st.none()),
        st.tuples(st.just("tell"), st.none()),
    ),
    max_size=14,
)


def over_the_wire(message: FolderPlacing) -> FolderPlacing:
    decoder = FrameDecoder()
    decoder.feed(encode_message(message))
    frame = decoder.next_frame_untrusted()
    assert frame is not None
    decoded = decode_message_untrusted(frame)
    assert isinstance(decoded, FolderPlacing)
    return decoded


@settings(max_examples=60, deadline=None)
@given(operations)
def test_a_watcher_told_at_any_moment_knows_exactly_what_the_placer_holds(
    steps: list[tuple[str, object]],
) -> None:
    async def main() -> None:
        placer, watcher = PlacingChunks(), MemberPlacing()
        seen: tuple[int, int] | None = None
        serial = itertools.count()
        for action, argument in [*steps, ("tell", None)]:
            if action == "begin":
                assert isinstance(argument, bytes)
                placer.begin(ContentHash(argument))
            elif action == "add":
                assert isinstance(argument, int)
                ids = [next(serial).to_bytes(32, "big") for _ in range(argument)]
                placer.add((chunk_id, FILE, 0) for chunk_id in [*ids, *ids[:3]])  # repeats
            elif action == "end":
                placer.end()
            else:
                for message in placer.frames(7, seen):
                    assert len(message.chunk_ids) <= MAX_PLACING_IDS
                    watcher.update(over_the_wire(message))
                seen = placer.seen
                assert placer.frames(7, seen) == []  # nothing new: nothing to say
                assert watcher.root == placer.root
                assert watcher.held == set(placer.ids)
                if placer.root is not None:
                    assert watcher.holds(placer.root, placer.ids[:5])

    trio.run(main)


def test_a_placing_that_does_not_continue_its_list_is_a_violation() -> None:
    async def main() -> None:
        watcher = MemberPlacing()
        watcher.update(FolderPlacing(1, ROOTS[0], 0, (bytes(32),)))
        with pytest.raises(RemoteProtocolError):
            watcher.update(FolderPlacing(1, ROOTS[0], 5, (bytes([1]) * 32,)))  # a gap
        with pytest.raises(RemoteProtocolError):
            watcher.update(FolderPlacing(1, ROOTS[1], 1, (bytes([1]) * 32,)))  # another root
        with pytest.raises(RemoteProtocolError):
            MemberPlacing().update(FolderPlacing(1, NOTHING, 0, (bytes(32),)))  # of no root

    trio.run(main)


def test_a_held_chunk_is_read_from_its_temp_file_or_the_file_it_became() -> None:
    placer = PlacingChunks()
    placer.add([(bytes(32), FILE, 0)])
    assert placer.locations(bytes(32), 10) == []  # nothing is placed before a begin
    placer.begin(ROOTS[0])
    placer.add([(bytes(32), FILE, 65536)])
    found = placer.locations(bytes(32), 4096)
    assert [(where.path, where.offset, where.length) for where in found] == [
        (FILE.temp_path, 65536, 4096),
        (FILE.final_path, 65536, 4096),
    ]
    placer.end()
    assert placer.locations(bytes(32), 4096) == []


def test_a_placing_past_what_one_placement_may_tell_is_a_violation() -> None:
    async def main() -> None:
        watcher = MemberPlacing()
        ids = tuple(n.to_bytes(32, "big") for n in range(MAX_PLACING_IDS))
        for start in range(0, MAX_PLACING_HELD, MAX_PLACING_IDS):
            watcher.update(FolderPlacing(1, ROOTS[0], start, ids))
        with pytest.raises(RemoteProtocolError):
            watcher.update(FolderPlacing(1, ROOTS[0], MAX_PLACING_HELD, ids[:1]))

    trio.run(main)


@given(st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=5, unique=True))
def test_every_node_names_the_same_placer_for_a_batch_whatever_its_order(
    nodes: list[bytes],
) -> None:
    for chunk in (bytes(32), bytes([7]) * 32):
        assert _designated(chunk, nodes) == _designated(chunk, list(reversed(nodes)))
        assert _designated(chunk, nodes) in nodes


def test_batches_are_shared_about_evenly_between_placers() -> None:
    nodes = [bytes([n]) * 32 for n in range(3)]
    counts = collections.Counter(_designated(n.to_bytes(32, "big"), nodes) for n in range(3000))
    assert all(800 <= counts[node] <= 1200 for node in nodes), counts


def test_a_taker_gets_only_what_it_accepts_and_the_best_ranked_first() -> None:
    async def main() -> None:
        work = _BatchQueue(6)
        assert await work.take(accept=lambda n: n % 2 == 1) == 1
        assert await work.take(rank=lambda n: 0 if n == 4 else 1) == 4
        assert await work.take(rank=lambda n: 1) == 0  # all alike: the queue's order
        holds: set[int] = set()
        woken = trio.Event()
        taken: list[int | None] = []

        async def helper() -> None:
            taken.append(await work.take(accept=holds.__contains__, wake=lambda: woken))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(helper)
            await trio.sleep(0.01)
            assert taken == []  # it holds nothing waiting: it waits
            holds.add(5)
            woken.set()  # what it holds grew
            await trio.sleep(0.01)
            assert taken == [5]

    trio.run(main)
