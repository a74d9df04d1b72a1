"""A share's pieces are counted when it is shared, not when its first fetcher asks."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

from p2pfs.daemon.requests import RequestStream
from p2pfs.daemon.streams import TransferCounters
from p2pfs.ids import ContentHash
from p2pfs.store.scanner import scan_share
from p2pfs.wire.messages import GetHave, HaveReply
from tests.hostile.service_harness import served


def _small_tree(top: Path, files: int) -> None:
    top.mkdir()
    for number in range(files):
        (top / f"f{number:03d}.bin").write_bytes(bytes([number]) * (100 + number))  # one chunk


async def _have_count(served_conn: object, root: ContentHash) -> int:
    stream = await RequestStream.open(served_conn, TransferCounters())  # type: ignore[arg-type]
    await stream.send(GetHave(stream.new_request_id(), root))
    reply = await stream.next_reply()
    assert isinstance(reply, HaveReply) and reply.complete
    return reply.piece_count


def test_counted_ahead_answers_have_without_the_index(tmp_path: Path) -> None:
    _small_tree(tmp_path / "share", 12)

    async def main() -> None:
        with trio.fail_after(20):
            async with served(tmp_path) as s:
                store = s.service._index.index
                result = scan_share(tmp_path / "share", store)
                await s.service.count_pieces(result.root)
                # The index loses every file's chunk list: a count taken now would fail.
                store._conn.execute("UPDATE files SET chunks = x''")
                assert await _have_count(s.conn, result.root) == 12

    trio.run(main)


def test_a_count_that_fails_ends_with_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _small_tree(tmp_path / "share", 4)

    async def main() -> None:
        with trio.fail_after(20):
            async with served(tmp_path) as s:
                store = s.service._index.index
                result = scan_share(tmp_path / "share", store)
                store._conn.execute("DELETE FROM files")
                with caplog.at_level(logging.WARNING, logger="p2pfs.daemon.service"):
                    await s.service.count_pieces(result.root)  # does not raise
                assert "cannot count its pieces" in caplog.text

    trio.run(main)
