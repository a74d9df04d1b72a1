"""GetTree: a share's tree nodes pushed with its manifest, within a budget, over real QUIC
to a real share service; what the push leaves out stays reachable by GetNodes."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from p2pfs.content.folder import DIR_TREE, FILE_TREE, EntryKind, Manifest
from p2pfs.daemon import service as service_module
from p2pfs.daemon.requests import PeerRequestError, RequestStream
from p2pfs.daemon.service import ShareService
from p2pfs.daemon.streams import TransferCounters
from p2pfs.daemon.treepush import TreePush
from p2pfs.daemon.treewalk import TreeJob, walk_trees
from p2pfs.ids import ContentHash
from p2pfs.net import PeerConnection, Stream
from p2pfs.store.scanner import scan_share
from p2pfs.wire.codes import ErrorCode
from p2pfs.wire.messages import GetTree, TreeNodes
from p2pfs.wire.session import StreamSession
from tests.hostile.service_harness import served


def _tree(top: Path) -> int:
    """Three directories of five files (one of several chunks); returns the file count."""
    count = 0
    for d in range(3):
        folder = top / f"dir{d}" / "inner"
        folder.mkdir(parents=True)
        for f in range(5):
            size = 3 << 20 if (d, f) == (1, 2) else 100 + 37 * f + d
            (folder / f"file{f}.bin").write_bytes(os.urandom(size))
            count += 1
    return count


async def _push(
    conn: PeerConnection, root: ContentHash, budget: int, *, file_trees: bool = True
) -> tuple[dict[Any, bytes], int]:
    """Every node one GetTree brings, keyed by its hash; and the bytes it took."""
    stream = await RequestStream.open(conn, TransferCounters())
    await stream.ask_tree(root, budget, file_trees=file_trees)
    nodes: dict[ContentHash, bytes] = {}
    used = 0
    while True:
        frame = await stream.tree_frame(reply_within=10)
        used += frame.size
        nodes.update((DIR_TREE.node_hash(n), n) for n in frame.dir_nodes)
        nodes.update((FILE_TREE.node_hash(n), n) for n in frame.file_nodes)
        if frame.last:
            await stream.close()
            return nodes, used


async def _walk_share(
    conn: PeerConnection, root: ContentHash, pushed: dict[Any, bytes], *, file_trees: bool = True
) -> tuple[int, int]:
    """Walk the share as a fetch does (or its directories, as a listing does), pushed nodes
    first: (files found, nodes asked)."""
    control = RequestStream.open
    stream = await control(conn, TransferCounters())
    manifest = Manifest.decode_untrusted(await stream.manifest(root))
    asked = 0

    async def fetch(hashes: list[ContentHash]) -> list[bytes]:
        nonlocal asked
        missing = [h for h in hashes if h not in pushed]
        asked += len(missing)
        got = dict(zip(missing, await stream.nodes(root, missing), strict=True)) if missing else {}
        return [pushed.get(h) or got[h] for h in hashes]

    files = []
    level: list[TreeJob[Any]] = [TreeJob(DIR_TREE, manifest.tree)]
    while level:
        await walk_trees(level, fetch)
        entries = [entry for job in level for _offset, entry in job.leaves]
        level = [TreeJob(DIR_TREE, e.root) for e in entries if e.kind is EntryKind.DIRECTORY]
        files += [e for e in entries if e.kind is not EntryKind.DIRECTORY]
    if file_trees:
        file_jobs: list[TreeJob[Any]] = [TreeJob(FILE_TREE, entry.root) for entry in files]
        await walk_trees(file_jobs, fetch)
        assert all(job.leaves for job in file_jobs)
    await stream.close()
    return len(files), asked


Body = Callable[[PeerConnection, ContentHash], Awaitable[None]]


def _with_share(tmp_path: Path, body: Body) -> None:
    """Run ``body(connection, root)`` against a real service sharing ``tmp_path/share``."""

    async def main() -> None:
        with trio.fail_after(30):
            async with served(tmp_path) as s:
                root = scan_share(tmp_path / "share", s.service._index.index).root
                await body(s.conn, root)

    trio.run(main)


def test_a_small_share_comes_whole_with_one_request(tmp_path: Path) -> None:
    count = _tree(tmp_path / "share")

    async def body(conn: PeerConnection, root: ContentHash) -> None:
        pushed, _used = await _push(conn, root, 1 << 20)
        assert await _walk_share(conn, root, pushed) == (count, 0)

    _with_share(tmp_path, body)


def test_a_listing_gets_its_directories_and_no_file_trees(tmp_path: Path) -> None:
    count = _tree(tmp_path / "share")

    async def body(conn: PeerConnection, root: ContentHash) -> None:
        pushed, _used = await _push(conn, root, 1 << 20, file_trees=False)
        assert len(pushed) == 1 + 3 + 3  # top, dir0..2, their inner directories
        assert await _walk_share(conn, root, pushed, file_trees=False) == (count, 0)

    _with_share(tmp_path, body)


@pytest.mark.parametrize("budget", [0, 300, 2000])
def test_a_push_stops_at_its_budget_and_the_rest_is_asked(tmp_path: Path, budget: int) -> None:
    count = _tree(tmp_path / "share")

    async def body(conn: PeerConnection, root: ContentHash) -> None:
        pushed, used = await _push(conn, root, budget)
        assert used <= budget
        found, asked = await _walk_share(conn, root, pushed)
        assert found == count and asked > 0

    _with_share(tmp_path, body)


def test_the_server_caps_what_a_budget_asks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _tree(tmp_path / "share")
    monkeypatch.setattr(service_module, "TREE_PUSH_LIMIT", 500)

    async def body(conn: PeerConnection, root: ContentHash) -> None:
        _pushed, used = await _push(conn, root, 1 << 30)
        assert 0 < used <= 500

    _with_share(tmp_path, body)


def test_an_unknown_root_is_not_found(tmp_path: Path) -> None:
    async def main() -> None:
        with trio.fail_after(30):
            async with served(tmp_path) as s:
                with pytest.raises(PeerRequestError) as info:
                    await _push(s.conn, ContentHash(bytes(range(32))), 1 << 20)
                assert info.value.code is ErrorCode.NOT_FOUND

    trio.run(main)


class DripPushService(ShareService):
    """Pushes a node that nothing asked for every 50 ms, each frame in time, forever."""

    async def _tree(
        self, request: GetTree, stream: Stream, session: StreamSession, grants: Any
    ) -> None:
        while True:
            junk = TreeNodes(request.request_id, (os.urandom(50),), (), False)
            await stream.send_all(session.send(junk))
            await trio.sleep(0.05)


def test_a_push_that_drips_is_stopped_and_the_walk_asks(tmp_path: Path) -> None:
    _tree(tmp_path / "share")

    async def main() -> None:
        with trio.fail_after(30):
            async with served(tmp_path, service_class=DripPushService) as s:
                root = scan_share(tmp_path / "share", s.service._index.index).root
                push = await TreePush.ask(s.conn, root, TransferCounters(), reply_within=0.5)
                control = await RequestStream.open(s.conn, TransferCounters())
                top = Manifest.decode_untrusted(await control.manifest(root)).tree

                async def ask(hashes: list[ContentHash]) -> list[bytes]:
                    return await control.nodes(root, hashes)

                [node] = await push.take([top.hash], ask)
                DIR_TREE.verify_node_untrusted(top, node)
                assert push.asked == 1 and push.pushed > 0
                # Stopped: a later wait reads no more frames and asks at once.
                started = trio.current_time()
                await push.take([top.hash], ask)
                assert push.asked == 2 and trio.current_time() - started < 0.5
                push.end()

    trio.run(main)
