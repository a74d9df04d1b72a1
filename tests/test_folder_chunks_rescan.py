"""A member's chunks are found while its rescan commits: the index holds the scan's new root
a moment before the folder knows it, and a GetChunks served then by the old root found
nothing (NOT_FOUND: the taker dropped the file and fetched it whole again later). Chunks
are located by the folder's scan id, the same across rescans."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import trio

from p2pfs.content.chunking import Chunker
from p2pfs.daemon.folders.client import FolderLink
from p2pfs.daemon.streams import TransferCounters
from p2pfs.store.index import IndexStore
from p2pfs.store.scanner import scan_share
from p2pfs.sync.keys import FolderKeys
from tests.hostile.service_harness import served
from tests.test_sync_hostile_member import HostileFolder

KEYS = FolderKeys.from_write_seed(bytes(range(1, 33)))


@dataclass
class RescanningFolder(HostileFolder):
    """A folder caught between its rescan's commit and learning the new root."""

    stale_root: bytes = b""
    scan_id: int | None = None

    def share_root(self):  # type: ignore[no-untyped-def]  # the root before the rescan
        return self.stale_root

    def share_id(self) -> int | None:
        return self.scan_id


def test_a_request_served_while_a_rescan_commits_finds_the_chunks(tmp_path: Path) -> None:
    content = tmp_path / "folder"
    content.mkdir()
    data = os.urandom(300_000)
    (content / "film.bin").write_bytes(data)
    with IndexStore(tmp_path / "index.sqlite3") as store:
        before = scan_share(content, store)
        (content / "notes.txt").write_bytes(b"a new file: the rescan's root differs")
        after = scan_share(content, store)
    assert after.root != before.root and after.share_id == before.share_id
    folder = RescanningFolder(KEYS, stale_root=before.root, scan_id=after.share_id)
    refs = Chunker().chunk_refs(data)
    got: dict[int, bytes] = {}
    refused: list[object] = []

    async def main() -> None:
        with trio.fail_after(30):
            async with served(tmp_path, {KEYS.folder_id: folder}.get) as s:
                link = FolderLink(s.conn, KEYS, TransferCounters(), s.client_id.node_id.raw)
                await link.join(watch=False)

                async def arrived(number: int, chunks: object, _source: object) -> None:
                    assert isinstance(chunks, list)
                    for position, payload in chunks:
                        got[number * 1000 + position] = bytes(payload)

                await link.chunk_batches([refs], arrived, lambda number, exc: refused.append(exc))

    trio.run(main)
    assert refused == []
    assert b"".join(got[position] for position in sorted(got)) == data
