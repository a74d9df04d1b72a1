"""A folder link asks for records and tree nodes on its stripes' connections too (a lossy
long path holds each connection to its own congestion window), over real QUIC to a real
share service and folder server."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from p2pfs.daemon.folders.client import MAX_BATCH, FolderLink
from p2pfs.daemon.streams import TransferCounters
from p2pfs.ids import ContentHash
from p2pfs.net import open_endpoint
from p2pfs.sync.keys import FolderKeys
from p2pfs.sync.records import record_hash
from tests.hostile.service_harness import served
from tests.test_sync_hostile_member import HostileFolder


def test_node_batches_spread_over_the_link_and_its_stripes(tmp_path: Path) -> None:
    keys = FolderKeys.from_write_seed(bytes(range(32)))
    folder = HostileFolder(keys)
    # Blobs that stand in for records: the server serves any node of its folder by hash.
    blobs = {record_hash(blob): blob for blob in (os.urandom(300) for _ in range(8 * MAX_BATCH))}
    folder.nodes = dict(blobs)
    wanted = list(blobs)

    async def main() -> None:
        with trio.fail_after(60):
            lookup = {keys.folder_id: folder}.get
            async with served(tmp_path, lookup) as s:
                counters = TransferCounters()
                own = s.client_id.node_id.raw
                link = FolderLink(s.conn, keys, counters, own)
                await link.join()
                server = s.conn.remote_address
                async with open_endpoint(s.client_id) as second:
                    stripe_conn = await second.connect(
                        (str(server[0]), int(server[1])), s.server_id.node_id
                    )
                    await link.add_stripe(stripe_conn)
                    before = second.bytes_received
                    got = await link.nodes(wanted)
                    assert got == [blobs[ContentHash(h)] for h in wanted]
                    # The stripe carried a share of the records (not just its handshake).
                    assert second.bytes_received - before > MAX_BATCH * 300

                    # A stripe whose connection is gone leaves its batches to the link.
                    await stripe_conn.close()
                    assert await link.nodes(wanted) == got

    trio.run(main)
