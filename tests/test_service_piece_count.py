"""A share's pieces are counted when it is shared, not when its first fetcher asks."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from p2pfs.daemon.requests import RequestStream
from p2pfs.daemon.streams import TransferCounters
from p2pfs.ids import ContentHash
from p2pfs.store.index import IndexStore
from p2pfs.store.scanner import scan_share
from p2pfs.wire.messages import GetHave, HaveReply
from tests.hostile.service_harness import Served, served


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


Body = Callable[[Served, IndexStore, ContentHash], Awaitable[None]]


def _with_share(tmp_path: Path, files: int, body: Body) -> None:
    """Run ``body(served, index, root)`` once ``files`` small files are shared."""
    _small_tree(tmp_path / "share", files)

    async def main() -> None:
        with trio.fail_after(20):
            async with served(tmp_path) as s:
                store = s.service._index.index
                await body(s, store, scan_share(tmp_path / "share", store).root)

    trio.run(main)


def test_counted_ahead_answers_have_without_the_index(tmp_path: Path) -> None:
    async def body(s: Served, store: IndexStore, root: ContentHash) -> None:
        await s.service.count_pieces(root)
        # The index loses every file's chunk list: a count taken now would find none.
        store._conn.execute("UPDATE files SET chunks = x''")
        assert await _have_count(s.conn, root) == 12

    _with_share(tmp_path, 12, body)


def test_a_count_that_fails_ends_with_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def body(s: Served, store: IndexStore, root: ContentHash) -> None:
        store._conn.execute("DELETE FROM files")
        with caplog.at_level(logging.WARNING, logger="p2pfs.daemon.service"):
            await s.service.count_pieces(root)  # does not raise
        assert "cannot count its pieces" in caplog.text

    _with_share(tmp_path, 4, body)
