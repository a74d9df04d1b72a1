"""Data-plane worker pieces without processes: the pipe's messages, the verify-then-write
step (nothing of a batch is written unless every chunk verifies; only the inode main
opened is written), and how a worker's failure is reported and read back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import trio.testing

from p2pfs.cli import daemon_config, parse_args
from p2pfs.config import CONFIG_NAME
from p2pfs.content.chunking import ChunkRef, chunk_id
from p2pfs.daemon.requests import PeerRequestError
from p2pfs.daemon.swarmfetch import PeerStalledError, worker_failure
from p2pfs.daemon.workers import WorkerEndedError, WorkerLink
from p2pfs.daemon.workers.channel import Channel, WorkerChannelError
from p2pfs.daemon.workers.process import (
    Batch,
    TempFile,
    WorkerStalledError,
    failure_of,
    write_verified,
)
from p2pfs.errors import ConnectionClosedError, IntegrityError, StorageError
from p2pfs.ids import NodeId
from p2pfs.wire.codes import ErrorCode

PEER = NodeId(bytes(32))


def temp_file(path: Path, size: int) -> TempFile:
    path.write_bytes(b"\0" * size)
    info = path.stat()
    return TempFile(str(path), (info.st_dev, info.st_ino))


def batch(chunks: list[bytes], places: list[list[tuple[int, int]]]) -> Batch:
    refs = tuple(ChunkRef(chunk_id(data), len(data)) for data in chunks)
    return Batch(7, refs, places)


def test_a_batch_is_written_to_every_place_only_when_all_chunks_verify(tmp_path: Path) -> None:
    files = {0: temp_file(tmp_path / "a", 12), 1: temp_file(tmp_path / "b", 4)}
    chunks = [b"abcd", b"efgh"]
    good = batch(chunks, [[(0, 0), (1, 0)], [(0, 8)]])
    assert write_verified(good, list(chunks), files) == []
    assert (tmp_path / "a").read_bytes() == b"abcd\0\0\0\0efgh"
    assert (tmp_path / "b").read_bytes() == b"abcd"
    # One chunk of the batch is bad: nothing of it is written, the good one included.
    bad = batch(chunks, [[(0, 4)], [(1, 0)]])
    with pytest.raises(IntegrityError):
        write_verified(bad, [b"abcd", b"efgX"], files)
    assert (tmp_path / "a").read_bytes() == b"abcd\0\0\0\0efgh"


def test_only_the_inode_main_opened_is_written(tmp_path: Path) -> None:
    files = {0: temp_file(tmp_path / "a", 4), 1: temp_file(tmp_path / "b", 4)}
    os.rename(tmp_path / "a", tmp_path / "committed")  # main committed it meanwhile
    chunks = [b"abcd"]
    assert write_verified(batch(chunks, [[(0, 0), (1, 0)]]), chunks, files) == [0]
    assert (tmp_path / "b").read_bytes() == b"abcd"
    assert not (tmp_path / "a").exists()
    (tmp_path / "other").write_bytes(b"\0" * 4)  # made while b exists: another inode
    os.rename(tmp_path / "other", tmp_path / "b")  # another file under the name: refused
    with pytest.raises(StorageError, match="not the temp file"):
        write_verified(batch(chunks, [[(1, 0)]]), chunks, files)
    assert (tmp_path / "b").read_bytes() == b"\0" * 4
    (tmp_path / "b").unlink()
    (tmp_path / "b").symlink_to(tmp_path / "committed")  # a link under the name: refused
    with pytest.raises(StorageError):
        write_verified(batch(chunks, [[(1, 0)]]), chunks, files)


def test_messages_cross_the_pipe_whole_and_garbage_is_an_error() -> None:
    trio.run(_cross_the_pipe)


async def _cross_the_pipe() -> None:
    left, right = trio.testing.memory_stream_pair()
    main, worker = Channel(left, left), Channel(right, right)
    payload = {"op": "batch", "id": 3, "chunks": [[b"\x01" * 32, 5, [[0, 0]]]] * 64}
    await main.send({"op": "file", "id": 0, "path": "x", "dev": 1, "ino": 2})
    await main.send(payload)
    assert (await worker.receive()) == {"op": "file", "id": 0, "path": "x", "dev": 1, "ino": 2}
    assert (await worker.receive()) == payload
    await left.send_all(b"\x93\x01\x02\x03")  # msgpack, but not a message
    with pytest.raises(WorkerChannelError):
        await worker.receive()
    await main.aclose()
    assert await Channel(right, right).receive() is None  # the pipe ended


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (IntegrityError("chunk 0123 fails its hash"), IntegrityError),
        (PeerRequestError(ErrorCode.NOT_FOUND, "gone"), PeerRequestError),
        (WorkerStalledError("peer sent nothing for 10 s"), PeerStalledError),
        (StorageError("cannot write"), StorageError),
        (ConnectionClosedError("connection lost"), ConnectionClosedError),
        (trio.TooSlowError(), ConnectionClosedError),
        (ValueError("a bug"), WorkerEndedError),
    ],
)
def test_a_failure_reads_back_as_the_main_path_would_raise_it(
    raised: Exception, expected: type[Exception]
) -> None:
    report = failure_of(BaseExceptionGroup("session", [raised]))
    error = worker_failure(report, PEER)
    assert type(error) is expected
    assert str(raised).split(": ")[-1] in str(error)
    if isinstance(error, PeerRequestError):
        assert error.code is ErrorCode.NOT_FOUND


def test_a_dead_worker_fails_its_peer_not_the_fetch() -> None:
    """Sending a batch to, or reading a report from, a worker process that is gone raises
    the error the fetch handles as that peer failing (a broken pipe would end the fetch)."""

    async def run() -> None:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-c", "pass"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert process.stdin is not None and process.stdout is not None
        await process.wait()
        link = WorkerLink(process, Channel(process.stdout, process.stdin))
        with pytest.raises(WorkerEndedError, match="ended"):
            await link.next_report()
        ref = ChunkRef(chunk_id(b"x"), 1)
        with pytest.raises(WorkerEndedError, match="gone"):
            for number in range(64):  # the first writes may still fit the pipe's buffer
                await link.send_batch(number, [ref], [[(0, 0)]], lambda _n: ("p", (1, 2)))
        await process.stdout.aclose()

    trio.run(run)


def test_workers_are_off_by_default_and_set_by_flag_or_config(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert daemon_config(parse_args(["--home", str(home), "daemon"])).data_workers == 0
    home.mkdir(exist_ok=True)  # parse_args may create it
    (home / CONFIG_NAME).write_text("data-workers = 3\n")
    assert daemon_config(parse_args(["--home", str(home), "daemon"])).data_workers == 3
    flags = ["--home", str(home), "daemon", "--data-workers", "0"]
    assert daemon_config(parse_args(flags)).data_workers == 0  # the flag wins
