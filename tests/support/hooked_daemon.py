"""Test-only entry point: the p2pfs daemon with hooks the shipped CLI does not have.

- ``--serve-unverified``: the share service sends chunks as they lie on disk, never
  hash-checked: a peer that serves corrupt data (tests/test_e2e_swarm.py's hostile seeder).
- ``--case-insensitive``: folders behave as on a case-insensitive file system, whatever this
  one is (tests/test_e2e_sync.py's name-collision test).
- ``--small-join-batches``: a member's records are planned and applied 256 at a time (not
  8,192), so a test folder's join runs in many batches (tests/test_e2e_sync.py's
  work-per-change test).
- ``--push-bad-trees``: a GetTree is answered with junk and altered nodes, then more node
  bytes than its budget allows (tests/test_e2e_fetch.py's hostile push).
- ``--stall-first-manifest``: the first GetManifest is never answered (a stalled holder).
- ``--short-stalls``: a fetch gives a holder's metadata SHORT_STALL seconds, not
  fetcher.STALL_TIMEOUT (10 s), so that the stalled-holder test does not wait out 10 s.
- ``--short-patience``: a fetch's swarm calls a peer stalled after SHORT_PATIENCE seconds
  without its data, and a frame overdue after as long without its bytes (both 10 s), so a
  slow path shows in seconds what a slower one does in minutes.

Run as ``python tests/support/hooked_daemon.py [hooks] --home HOME daemon [daemon options]`` (the
hooks may stand anywhere; the rest are the CLI's arguments), or give :data:`PROGRAM` to
``DaemonProcess(program=...)`` with the hooks among its ``extra_args``. Not in the wheel.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any

import trio

from p2pfs.cli import daemon_config, parse_args
from p2pfs.content.folder import Manifest
from p2pfs.content.tree import MAX_NODE_BYTES
from p2pfs.daemon import fetcher, swarmfetch
from p2pfs.daemon.node import Node
from p2pfs.daemon.service import ShareService
from p2pfs.ids import ContentHash
from p2pfs.net import PeerConnection, Stream
from p2pfs.store.index import ChunkLocation
from p2pfs.wire import session as wire_session
from p2pfs.wire.messages import (
    MAX_NODES_PER_REPLY,
    GetChunks,
    GetManifest,
    GetNodes,
    GetTree,
    TreeNodes,
)
from p2pfs.wire.session import StreamSession

PROGRAM = (sys.executable, str(Path(__file__).resolve()))
HOOKS = frozenset(
    {
        "--serve-unverified",
        "--case-insensitive",
        "--small-join-batches",
        "--push-bad-trees",
        "--stall-first-manifest",
        "--short-stalls",
        "--short-patience",
    }
)
SHORT_STALL = 2.0
SHORT_PATIENCE = 1.0
SMALL_JOIN_BATCH = 256
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class UnverifiedShareService(ShareService):
    async def read_chunks(
        self, wanted: list[tuple[ContentHash, list[ChunkLocation]]]
    ) -> list[bytes | None]:
        return await trio.to_thread.run_sync(_read_raw, wanted)


class UnverifiedNode(Node):
    share_service = UnverifiedShareService


class BadPushShareService(ShareService):
    async def _tree(
        self, request: GetTree, stream: Stream, session: StreamSession, grants: Any
    ) -> None:
        """Push what a hostile holder would: nodes that hash to nothing asked, the share's
        real top node with one byte changed, then frames past the client's budget."""
        encoded = await self._manifest_bytes(request.share_root)
        assert encoded is not None
        top = Manifest.decode_untrusted(encoded).tree.hash
        real = await self._index.run(self._index.index.dir_node, top)
        assert real is not None
        altered = real[:-1] + bytes([real[-1] ^ 1])
        junk = tuple(os.urandom(200) for _ in range(10))
        first = TreeNodes(request.request_id, (altered, *junk), junk, False)
        await stream.send_all(session.send(first))
        big = tuple(os.urandom(MAX_NODE_BYTES) for _ in range(MAX_NODES_PER_REPLY // 2))
        for _ in range(request.budget // (len(big) * MAX_NODE_BYTES) + 1):
            await stream.send_all(session.send(TreeNodes(request.request_id, big, (), False)))


class BadPushNode(Node):
    share_service = BadPushShareService


class FirstManifestStalledService(ShareService):
    """Never answers the first GetManifest it is asked (as a stream the engine stopped
    sending on looks to the fetcher); answers every later one."""

    stalled = False

    async def _answer(
        self,
        message: GetManifest | GetNodes | GetChunks | GetTree,
        stream: Stream,
        session: StreamSession,
        grants: Any,
        conn: PeerConnection,
    ) -> None:
        if isinstance(message, GetManifest) and not FirstManifestStalledService.stalled:
            FirstManifestStalledService.stalled = True
            await trio.sleep_forever()
        await super()._answer(message, stream, session, grants, conn)


class FirstManifestStalledNode(Node):
    share_service = FirstManifestStalledService


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
    hooks = {arg for arg in argv if arg in HOOKS}
    args = parse_args([arg for arg in argv if arg not in HOOKS])
    if args.command != "daemon":
        raise SystemExit("usage: hooked_daemon.py [hooks] --home HOME daemon [options]")
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    logging.getLogger("quic").setLevel(logging.ERROR)
    logging.getLogger("kademlia").setLevel(logging.ERROR)
    config = daemon_config(args)
    if "--case-insensitive" in hooks:
        folders = dataclasses.replace(config.folders, assume_case_insensitive=True)
        config = dataclasses.replace(config, folders=folders)
    if "--small-join-batches" in hooks:
        folders = dataclasses.replace(config.folders, join_batch=SMALL_JOIN_BATCH)
        config = dataclasses.replace(config, folders=folders)
    node = UnverifiedNode(config) if "--serve-unverified" in hooks else Node(config)
    if "--push-bad-trees" in hooks:
        node = BadPushNode(config)
    if "--stall-first-manifest" in hooks:
        node = FirstManifestStalledNode(config)
    if "--short-stalls" in hooks:
        # The fetcher reads its (imported) bound at each wait: set where it reads it.
        setattr(fetcher, "STALL_TIMEOUT", SHORT_STALL)  # noqa: B010
    if "--short-patience" in hooks:
        setattr(swarmfetch, "STALL_TIMEOUT", SHORT_PATIENCE)  # noqa: B010
        setattr(wire_session, "FRAME_DEADLINE", SHORT_PATIENCE)  # noqa: B010
    trio.run(node.run)


if __name__ == "__main__":
    main(sys.argv[1:])
