"""A member pushes, right behind each FolderRoot, what a watcher in step with it will ask
for (FolderNodes): over real QUIC to a real folder server, the watcher's diff and record
fetch then ask for nothing; a push of junk or past its budget never stands in for a node."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from p2pfs.content.tree import Child
from p2pfs.daemon import service as service_module
from p2pfs.daemon.folders.client import FolderLink
from p2pfs.daemon.folders.server import FolderServer, ServedFolder
from p2pfs.daemon.folders.work import FolderWork
from p2pfs.daemon.streams import TransferCounters
from p2pfs.errors import RemoteProtocolError
from p2pfs.ids import ContentHash
from p2pfs.sync.keys import FolderKeys
from p2pfs.sync.records import EMPTY_INDEX, INDEX_TREE, LeafQueue, remote_changes
from p2pfs.wire.messages import FolderNodes
from p2pfs.wire.session import Role, StreamSession
from tests.hostile.service_harness import Served, served
from tests.test_sync_hostile_member import HostileFolder

KEYS = FolderKeys.from_write_seed(bytes(range(32)))


def blobs(count: int, size: int = 200) -> list[tuple[str, bytes]]:
    """Stand-ins for records (a watcher's push holds them unverified; the reconcile checks
    them): the folder serves any node of its tree by hash."""
    return [(f"dir{n % 7}/file{n}", os.urandom(size)) for n in range(count)]


def index_nodes(folder: HostileFolder) -> dict[ContentHash, bytes]:
    """The index nodes (not the record stand-ins) of the folder's current tree."""
    return {h: n for h, n in folder.nodes.items() if INDEX_TREE.node_hash(n) == h}


async def watch_roots(link: FolderLink, nursery: trio.Nursery) -> trio.MemoryReceiveChannel[Child]:
    send, receive = trio.open_memory_channel[Child](10)

    def on_root(root: ContentHash, records: int, _need: object, _signed: bool) -> None:
        send.send_nowait(Child(root, records))

    nursery.start_soon(link.watch, on_root)
    return receive


@dataclass
class Joined:
    link: FolderLink
    work: FolderWork
    roots: trio.MemoryReceiveChannel[Child]


@asynccontextmanager
async def joined(
    tmp_path: Path,
    folder: HostileFolder,
    before_join: Callable[[Served], None] = lambda _served: None,
    **serving: Any,
) -> AsyncIterator[Joined]:
    """A watcher joined to ``folder``'s real folder server over real QUIC, its roots (each
    after its push) arriving in ``roots``. ``before_join`` sees the server first (the
    WatchFolder goes with the proof, so a server's behaviour is set before the join)."""
    async with served(tmp_path, {KEYS.folder_id: folder}.get, **serving) as s:
        before_join(s)
        work = FolderWork()
        link = FolderLink(s.conn, KEYS, TransferCounters(), s.client_id.node_id.raw, work=work)
        await link.join()
        async with trio.open_nursery() as nursery:
            yield Joined(link, work, await watch_roots(link, nursery))
            nursery.cancel_scope.cancel()


def test_a_watcher_in_step_asks_for_nothing_the_push_brought(tmp_path: Path) -> None:
    folder = HostileFolder(KEYS)
    first = blobs(600)
    folder.serve(first)

    async def main() -> None:
        with trio.fail_after(60):
            async with joined(tmp_path, folder) as j:
                old_root = await j.roots.receive()
                assert old_root == folder.root
                # A first root: the whole index and every record fit the budget.
                old_nodes = index_nodes(folder)
                leaves = await walked(j.link, old_root)
                assert len(leaves) == len(first)
                records = await j.link.nodes([leaf.record_hash for leaf in leaves])
                assert sorted(records) == sorted(blob for _path, blob in first)
                assert j.work.nodes_asked == 0
                assert j.work.nodes_pushed == len(old_nodes) + len(first)

                # One record changed: its index path and record come with the root.
                edited = list(first)
                edited[123] = (edited[123][0], os.urandom(200))
                kept = dict(folder.nodes)
                folder.serve(edited)
                folder.nodes.update(kept)  # the tree before stays servable
                new_root = await j.roots.receive()
                pushed_before = j.work.nodes_pushed
                changed = await walked(j.link, new_root, old_root, old_nodes)
                assert len(changed) == 1
                [record] = await j.link.nodes([leaf.record_hash for leaf in changed])
                assert record == edited[123][1]
                assert j.work.nodes_asked == 0
                # A path's few nodes and one record, not the folder again.
                assert 2 <= j.work.nodes_pushed - pushed_before <= 6

    trio.run(main)


async def walked(
    link: FolderLink,
    root: Child,
    local_root: Child = EMPTY_INDEX,
    local_nodes: dict[ContentHash, bytes] | None = None,
) -> LeafQueue:
    """The member's leaves a watcher holding ``local_root`` lacks, its nodes through
    ``link.nodes`` from a worker thread (as the engine's diff runs)."""

    def remote(hashes: object) -> list[bytes]:
        return trio.from_thread.run(link.nodes, list(hashes))  # type: ignore[call-overload]

    local = (local_nodes or {}).__getitem__
    return await trio.to_thread.run_sync(remote_changes, local_root, local, root, remote)


class JunkPushServer(FolderServer):
    """Pushes bytes that are nobody's nodes (or, with ``overrun``, past the budget)."""

    overrun = False

    async def _push(
        self, folder: ServedFolder, previous: Child | None, root: Child, budget: int
    ) -> list[FolderNodes]:
        size = budget + 1 if self.overrun else 64
        return [FolderNodes(0, (os.urandom(size),), (os.urandom(64),), (os.urandom(64),), True)]


def test_a_pushed_node_stands_only_for_its_own_hash(tmp_path: Path) -> None:
    folder = HostileFolder(KEYS)
    records = blobs(50)
    folder.serve(records)

    def junk_pushing(s: Served) -> None:
        s.folders.__class__ = JunkPushServer

    async def main() -> None:
        with trio.fail_after(60):
            async with joined(tmp_path, folder, junk_pushing) as j:
                leaves = await walked(j.link, await j.roots.receive())
                fetched = await j.link.nodes([leaf.record_hash for leaf in leaves])
                assert sorted(fetched) == sorted(blob for _path, blob in records)
                assert j.work.nodes_pushed == 0
                assert j.work.nodes_asked == len(index_nodes(folder)) + len(records)

    trio.run(main)


def test_a_push_past_its_budget_ends_the_watch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = HostileFolder(KEYS)
    folder.serve(blobs(5))
    monkeypatch.setattr(JunkPushServer, "overrun", True)

    async def main() -> None:
        with trio.fail_after(60):
            async with served(tmp_path, {KEYS.folder_id: folder}.get) as s:
                s.folders.__class__ = JunkPushServer
                link = FolderLink(s.conn, KEYS, TransferCounters(), s.client_id.node_id.raw)
                await link.join()
                got: list[Child] = []
                with pytest.raises(RemoteProtocolError):  # a protocol violation
                    await link.watch(lambda r, n, _need, _s: got.append(Child(r, n)))
                assert not got

    trio.run(main)


def test_an_older_member_pushes_nothing_and_is_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A member speaking protocol version 1 ignores the push budget (and the watcher, told
    the version by its Hello, waits for no push): roots are read as before and every node
    is asked for."""
    folder = HostileFolder(KEYS)
    folder.serve(blobs(20))

    def version_1_session(role: Role, **kwargs: float) -> StreamSession:
        return StreamSession(role, version=1, **kwargs)

    monkeypatch.setattr(service_module, "StreamSession", version_1_session)

    async def main() -> None:
        with trio.fail_after(60):
            async with joined(tmp_path, folder) as j:
                assert await j.roots.receive() == folder.root
                folder.serve(blobs(21))
                assert await j.roots.receive() == folder.root  # the next root, no push
                leaves = await walked(j.link, folder.root)
                await j.link.nodes([leaf.record_hash for leaf in leaves])
                assert j.work.nodes_pushed == 0
                assert j.work.nodes_asked == len(folder.nodes)

    trio.run(main)


def test_a_member_already_at_the_root_gets_no_push(tmp_path: Path) -> None:
    """Once a member announced the very root we are about to send (it took our change, or
    we took its), it holds everything of it: the push is empty."""
    folder = HostileFolder(KEYS)
    folder.serve(blobs(30))
    client = bytearray()

    def member_root(folder_id: bytes, member: bytes) -> Child | None:
        return folder.root if folder_id == KEYS.folder_id and member == client else None

    def note_client(s: Served) -> None:
        client.extend(s.client_id.node_id.raw)

    async def main() -> None:
        with trio.fail_after(60):
            async with joined(tmp_path, folder, note_client, member_root=member_root) as j:
                assert await j.roots.receive() == folder.root
                await j.link.nodes([ContentHash(h) for h in folder.nodes])
                assert j.work.nodes_pushed == 0
                assert j.work.nodes_asked == len(folder.nodes)

    trio.run(main)
