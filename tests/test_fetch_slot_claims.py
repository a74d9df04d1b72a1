"""Two writes of one piece at once (an endgame duplicate), the first failing: the slot is
filled by the second, never left empty while the piece counts as delivered.

The race it pins down: the first write claims the piece's slot and goes to its thread; the
duplicate, arriving on another stream, finds the slot claimed and writes nothing; then the
first fails on another chunk of its batch and gives its claim back. The duplicate's peer had
delivered the piece, so the picker counted it held, and the fetch ended with "1 files
incomplete" (seen once in a full test run, tests/test_e2e_swarm.py's corrupt seeder).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio

from p2pfs.content.chunking import ChunkRef, chunk_id
from p2pfs.content.folder import DirEntry, EntryKind
from p2pfs.daemon.fetcher import Fetcher, _FileTask
from p2pfs.daemon.streams import TransferCounters
from p2pfs.daemon.swarmstate import SwarmShare
from p2pfs.errors import IntegrityError
from p2pfs.ids import ContentHash
from p2pfs.store.assemble import PartialFile

ROOT = ContentHash(bytes(32))


def one_file_fetch(tmp_path: Path, chunks: list[bytes]) -> tuple[Fetcher, _FileTask]:
    """A fetcher placing ``chunks`` (one piece each) in order into one file."""
    refs = [ChunkRef(chunk_id(data), len(data)) for data in chunks]
    size = sum(len(data) for data in chunks)
    entry = DirEntry("f.bin", EntryKind.FILE, 0, size, ROOT)
    offsets = [sum(len(d) for d in chunks[:n]) for n in range(len(chunks))]
    task = _FileTask("f.bin", str(tmp_path / "f.bin"), entry, list(zip(offsets, refs, strict=True)))
    task.remaining = len(chunks)
    task.number = 0
    task.partial = PartialFile(str(tmp_path), "f.bin", ROOT, size)
    fetcher = Fetcher(
        None,  # type: ignore[arg-type]  # no peer is dialled
        ROOT,
        str(tmp_path),
        None,  # type: ignore[arg-type]  # no index is read
        TransferCounters(),
    )
    fetcher._swarm = SwarmShare(ROOT, b"")
    fetcher._swarm.set_pieces(refs)
    fetcher._placements = [[(task, offset)] for offset in offsets]
    return fetcher, task


@pytest.mark.parametrize("first_fails", [True, False])
def test_a_duplicate_fills_the_slot_a_failed_write_gave_back(
    tmp_path: Path, first_fails: bool
) -> None:
    rng = random.Random(4)
    shared, other = rng.randbytes(70_000), rng.randbytes(50_000)
    fetcher, task = one_file_fetch(tmp_path, [shared, other])
    pieces = fetcher._swarm.pieces  # type: ignore[union-attr]
    damaged = b"\xff" + other[1:] if first_fails else other
    outcome: dict[str, BaseException | None] = {}

    async def write(name: str, arrived: list[tuple[int, bytes]]) -> None:
        try:
            await fetcher._write(arrived, pieces)  # type: ignore[arg-type]
            outcome[name] = None
        except IntegrityError as exc:
            outcome[name] = exc

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            # The first claims both slots and goes to its thread; the duplicate of the
            # shared piece starts while that write is in progress.
            nursery.start_soon(write, "first", [(0, shared), (1, damaged)])
            nursery.start_soon(write, "duplicate", [(0, shared)])

    trio.run(main)
    assert outcome["duplicate"] is None
    assert isinstance(outcome["first"], IntegrityError) == first_fails
    # The shared piece's slot is filled and counted once, whoever wrote it.
    assert 0 in task.filled
    assert task.remaining == (1 if first_fails else 0)
    assert (len(shared) in task.filled) == (not first_fails)
    assert not fetcher._settling
    assert task.partial is not None
    with open(task.partial.temp_path, "rb") as handle:
        assert handle.read(len(shared)) == shared
