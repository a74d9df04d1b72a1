"""A real share service and folder server on a real endpoint, and a raw client for it.

The service runs in this process (so a test can read its counters and this process's RSS),
over real QUIC on loopback; the hostile client writes whatever bytes it likes on streams.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from p2pfs.content.tree import Child
from p2pfs.daemon.folders.server import CLIENT_ROLE, FolderServer, ServedFolder
from p2pfs.daemon.requests import PeerRequestError, RequestStream
from p2pfs.daemon.service import ShareService
from p2pfs.daemon.storage import AsyncIndex
from p2pfs.daemon.streams import TransferCounters
from p2pfs.errors import ConnectionClosedError, StreamResetError
from p2pfs.identity import Identity
from p2pfs.ids import ContentHash
from p2pfs.net import PeerConnection, Stream, open_endpoint
from p2pfs.store.index import IndexStore
from p2pfs.sync.keys import FolderKeys
from p2pfs.wire.codes import ErrorCode, WireError
from p2pfs.wire.messages import (
    ErrorReply,
    FolderChallenge,
    FolderHello,
    FolderProof,
    FolderWelcome,
    Message,
)
from p2pfs.wire.session import Role, StreamSession

MiB = 1 << 20


@dataclass
class Served:
    service: ShareService
    folders: FolderServer
    conn: PeerConnection
    server_id: Identity
    client_id: Identity


@asynccontextmanager
async def served(
    tmp_path: Path,
    lookup: Callable[[bytes], ServedFolder | None] = lambda _fid: None,
    service_class: type[ShareService] = ShareService,
    member_root: Callable[[bytes, bytes], Child | None] = lambda _folder, _member: None,
) -> AsyncIterator[Served]:
    """A share service (``service_class``: one a test made hostile) on a real endpoint and
    an authenticated client connection to it; ``member_root``: the root the folder server
    takes each member to have announced."""
    server_id, client_id = Identity.generate(), Identity.generate()
    with IndexStore(tmp_path / "index.sqlite3") as store:
        index = AsyncIndex(store)
        folders = FolderServer(index, lookup, server_id.node_id.raw, member_root)
        service = service_class(index, TransferCounters(), folders=folders)
        async with (
            open_endpoint(server_id, handler=service.handle_connection) as server,
            open_endpoint(client_id) as client,
        ):
            conn = await client.connect(server.local_address, server_id.node_id)
            yield Served(service, folders, conn, server_id, client_id)


async def honest_request_answered(conn: PeerConnection) -> bool:
    """A GetManifest for a share the node does not have gets its NOT_FOUND."""
    stream = await RequestStream.open(conn, TransferCounters())
    try:
        await stream.manifest(ContentHash(bytes(32)))
    except PeerRequestError as exc:
        return exc.code is ErrorCode.NOT_FOUND
    return False


async def raw_stream(conn: PeerConnection) -> tuple[Stream, StreamSession]:
    """A stream on which the Hello is sent; the rest is up to the test."""
    session = StreamSession(Role.CLIENT)
    stream = await conn.open_stream()
    await stream.send_all(session.hello())
    return stream, session


async def ending(stream: Stream) -> ErrorCode | None:
    """How the server ended the stream: the code of its ErrorReply or reset (None: EOF)."""
    session = StreamSession(Role.CLIENT)
    try:
        while data := await stream.receive_some():
            session.receive_data(data)
            while (message := _next_or_none(session)) is not None:
                if isinstance(message, ErrorReply):
                    return message.code
    except StreamResetError as exc:
        return ErrorCode.from_wire(exc.error_code or 0)
    return None


def _next_or_none(session: StreamSession) -> Message | None:
    # Replies to requests this raw client never registered fail the session's pairing
    # check; only an ErrorReply about the whole stream (request 0) matters here.
    try:
        return session.next_message()
    except WireError:
        return None


async def join_folder(conn: PeerConnection, keys: FolderKeys, client: Identity) -> RequestStream:
    """Prove membership honestly on a new stream; returns it for more requests."""
    stream = await RequestStream.open(conn, TransferCounters())
    nonce = os.urandom(32)
    await stream.send(FolderHello(stream.new_request_id(), keys.folder_id, nonce))
    challenge = await stream.next_reply()
    assert isinstance(challenge, FolderChallenge), challenge
    proof = keys.membership_proof(
        CLIENT_ROLE, nonce, challenge.nonce, client.node_id.raw, conn.peer_id.raw
    )
    await stream.send(FolderProof(stream.new_request_id(), keys.folder_id, proof))
    welcome = await stream.next_reply()
    assert isinstance(welcome, FolderWelcome), welcome
    return stream


def rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


async def send_ignoring_reset(stream: Stream, data: bytes) -> None:
    """Write what a hostile peer writes; the server may stop reading at any point."""
    try:
        await stream.send_all(data)
    except (StreamResetError, ConnectionClosedError):
        return
