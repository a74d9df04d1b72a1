"""Test-only entry point: a p2pfs daemon whose share service sends chunks as they lie on
disk, never hash-checked: a peer that serves corrupt data (tests/test_e2e_swarm.py's hostile
seeder). The shipped daemon always checks; this is the only way to turn it off, and it is
not in the wheel.

Run as ``python tests/unverified_daemon.py --home HOME daemon [daemon options]``: the
arguments are the CLI's.
"""

from __future__ import annotations

import logging
import sys

import trio

from p2pfs.cli import daemon_config, parse_args
from p2pfs.daemon.node import Node
from p2pfs.daemon.service import ShareService
from p2pfs.ids import ContentHash
from p2pfs.store.index import ChunkLocation

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class UnverifiedShareService(ShareService):
    async def read_chunks(
        self, wanted: list[tuple[ContentHash, list[ChunkLocation]]]
    ) -> list[bytes | None]:
        return await trio.to_thread.run_sync(_read_raw, wanted)


class UnverifiedNode(Node):
    share_service = UnverifiedShareService


def _read_raw(wanted: list[tuple[ContentHash, list[ChunkLocation]]]) -> list[bytes | None]:
    """Each chunk's bytes at its first recorded location, whatever they are now."""
    datas: list[bytes | None] = []
    for _chunk_id, locations in wanted:
        if not locations:
            datas.append(None)
            continue
        location = locations[0]
        with open(location.path, "rb") as handle:
            handle.seek(location.offset)
            datas.append(handle.read(location.length))
    return datas


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.command != "daemon":
        raise SystemExit("usage: unverified_daemon.py --home HOME daemon [options]")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("quic").setLevel(logging.ERROR)
    logging.getLogger("kademlia").setLevel(logging.ERROR)
    trio.run(UnverifiedNode(daemon_config(args)).run)


if __name__ == "__main__":
    main(sys.argv[1:])
