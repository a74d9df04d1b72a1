"""Items 7 and 9 of issue 12: a failing stream handler ends its stream only; FolderHello
challenges are bounded.

Real share service and folder server on a real endpoint. Bounds checked: the stream that hit
the failure ends with INTERNAL, the connection and the node serve on (an honest request is
answered), and open challenges stay within their caps however many FolderHellos arrive.
"""

from __future__ import annotations

import os
from pathlib import Path

import trio

from p2pfs.daemon.folders.server import MAX_CHALLENGES_PER_CONNECTION
from p2pfs.daemon.requests import RequestStream
from p2pfs.daemon.streams import TransferCounters
from p2pfs.errors import ConnectionClosedError, P2pfsError, StreamResetError
from p2pfs.identity import Identity
from p2pfs.ids import ContentHash
from p2pfs.net import PeerConnection, open_endpoint
from p2pfs.sync.keys import FolderKeys
from p2pfs.wire.codes import ErrorCode
from p2pfs.wire.messages import (
    ErrorReply,
    FolderChallenge,
    FolderHello,
    FolderMember,
    FolderNeed,
    GetNodes,
    NodesReply,
)
from tests.hostile.service_harness import honest_request_answered, join_folder, served


class Folder:
    """A served folder whose node lookup misbehaves the way the test needs."""

    def __init__(self, keys: FolderKeys, *, raise_on_lookup: bool) -> None:
        self.keys = keys
        self.device = bytes(32)
        self._raise = raise_on_lookup
        self._reads: dict[ContentHash, int] = {}
        self.node = ContentHash(os.urandom(32))

    def served_node(self, node_hash: ContentHash) -> bytes | None:
        if self._raise:
            raise RuntimeError("a bug in the folder engine")
        # The record is replaced after its first read (the race the server must survive).
        self._reads[node_hash] = self._reads.get(node_hash, 0) + 1
        return b"record" if node_hash == self.node and self._reads[node_hash] == 1 else None

    async def held_file_trees(
        self, roots: list[ContentHash]
    ) -> dict[ContentHash, dict[ContentHash, bytes]]:
        return {}

    def current_root(self) -> tuple[ContentHash, int, trio.Event]:
        return ContentHash(bytes(32)), 0, trio.Event()

    def root_signature(self, root: ContentHash, count: int) -> bytes | None:
        return None

    def progress(self) -> tuple[FolderNeed, trio.Event]:
        return FolderNeed(0, 0, 0, 0), trio.Event()

    def members_except(self, node_id: bytes) -> list[FolderMember]:
        return []

    def member_connected(self, conn: PeerConnection) -> None:
        return None

    def share_root(self) -> ContentHash | None:
        return None

    def share_id(self) -> int | None:
        return None  # its chunks are located by its share root


def _get_nodes(tmp_path: Path, *, raise_on_lookup: bool) -> tuple[object, bool]:
    keys = FolderKeys.from_write_seed(os.urandom(32))
    folder = Folder(keys, raise_on_lookup=raise_on_lookup)

    async def main() -> tuple[object, bool]:
        async with served(tmp_path, lambda fid: folder if fid == keys.folder_id else None) as s:
            stream = await join_folder(s.conn, keys, s.client_id)
            request = GetNodes(stream.new_request_id(), keys.folder_id, (folder.node,))
            await stream.send(request)
            try:
                reply: object = await stream.next_reply()
            except P2pfsError as exc:
                reply = exc
            return reply, await honest_request_answered(s.conn)

    return trio.run(main)


def test_an_unexpected_exception_ends_only_its_stream(tmp_path: Path) -> None:
    reply, honest = _get_nodes(tmp_path, raise_on_lookup=True)
    # The ErrorReply races the reset that follows it: either tells the client INTERNAL.
    if isinstance(reply, StreamResetError):
        assert reply.error_code == ErrorCode.INTERNAL
    else:
        assert isinstance(reply, ErrorReply), reply
        assert reply.code is ErrorCode.INTERNAL
    assert honest


def test_a_record_replaced_during_a_request_is_served_as_checked(tmp_path: Path) -> None:
    reply, honest = _get_nodes(tmp_path, raise_on_lookup=False)
    assert isinstance(reply, NodesReply), reply
    assert reply.nodes == (b"record",)
    assert honest


def test_a_handler_raising_a_group_ends_only_its_connection() -> None:
    """The endpoint's own boundary: a handler whose nursery raises an ExceptionGroup."""
    server_id = Identity.generate()
    calls = 0

    async def handler(conn: PeerConnection) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_fail)
        stream = await conn.accept_stream()
        await stream.send_all(await stream.receive_some())
        await stream.send_eof()
        await conn.wait_closed()

    async def main() -> bytes:
        with trio.fail_after(30):
            return await exchange()

    async def exchange() -> bytes:
        async with (
            open_endpoint(server_id, handler=handler) as server,
            open_endpoint(Identity.generate()) as client,
        ):
            first = await client.connect(server.local_address, server_id.node_id)
            await first.wait_closed()
            second = await client.connect(server.local_address, server_id.node_id)
            stream = await second.open_stream()
            await stream.send_all(b"still here")
            await stream.send_eof()
            return await stream.receive_some()

    assert trio.run(main) == b"still here"


async def _fail() -> None:
    raise RuntimeError("a bug in a connection handler")


def test_folder_hellos_are_bounded_per_connection_and_released(tmp_path: Path) -> None:
    async def main() -> tuple[list[int], int, bool]:
        async with served(tmp_path) as s:
            held = []
            stream = await RequestStream.open(s.conn, TransferCounters())
            for batch in range(20):
                for _ in range(500):
                    folder_id = ContentHash(os.urandom(32))
                    hello = FolderHello(stream.new_request_id(), folder_id, os.urandom(32))
                    await stream.send(hello)
                for _ in range(500):
                    assert isinstance(await stream.next_reply(), FolderChallenge)
                held.append(s.folders.challenges_held)
                if batch == 0:
                    assert await honest_request_answered(s.conn)
            honest = await honest_request_answered(s.conn)
            await s.conn.close()
            with trio.fail_after(10):
                while s.folders.challenges_held:
                    await trio.sleep(0.01)  # the server notices the close
            return held, s.folders.challenges_held, honest

    try:
        held, after, honest = trio.run(main)
    except ConnectionClosedError as exc:
        raise AssertionError("the node dropped an honest connection") from exc
    assert max(held) <= MAX_CHALLENGES_PER_CONNECTION
    assert after == 0
    assert honest
