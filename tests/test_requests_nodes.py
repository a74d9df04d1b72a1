"""RequestStream.nodes against a scripted server over real QUIC on loopback: any number of
hashes cost one round trip (every GetNodes is sent before the first reply is read), and a
server that breaks the protocol's reply order is a protocol error, not a mixed-up tree."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import trio

from p2pfs.daemon.requests import PeerRequestError, RequestStream
from p2pfs.daemon.streams import TransferCounters
from p2pfs.errors import RemoteProtocolError
from p2pfs.identity import Identity
from p2pfs.ids import ContentHash
from p2pfs.net import PeerConnection, Stream, open_endpoint
from p2pfs.wire.codes import ErrorCode
from p2pfs.wire.messages import MAX_HASHES_PER_REQUEST, ErrorReply, GetNodes, NodesReply
from p2pfs.wire.session import Role, StreamSession

Replies = Callable[[list[GetNodes]], list[NodesReply | ErrorReply]]


def node_for(node_hash: ContentHash) -> bytes:
    return b"node of " + node_hash


def in_order(requests: list[GetNodes]) -> list[NodesReply | ErrorReply]:
    return [NodesReply(r.request_id, tuple(node_for(h) for h in r.hashes)) for r in requests]


async def answer_when_all_arrived(stream: Stream, expect: int, replies: Replies) -> None:
    """Read ``expect`` GetNodes before answering any: a client that waits for one reply
    before it sends the next request never gets one."""
    session = StreamSession(Role.SERVER)
    await stream.send_all(session.hello())
    requests: list[GetNodes] = []
    while len(requests) < expect:
        data = await stream.receive_some()
        if not data:
            return
        session.receive_data(data, trio.current_time())
        while (message := session.next_message()) is not None:
            if isinstance(message, GetNodes):
                requests.append(message)
    await stream.send_all(b"".join(session.send(reply) for reply in replies(requests)))


async def ask(
    hashes: list[ContentHash], expect: int, replies: Replies
) -> list[bytes] | RemoteProtocolError:
    """The nodes, or the error the client raised (caught inside the endpoints' nurseries,
    which would wrap it in a group)."""
    server_id, client_id = Identity.generate(), Identity.generate()

    async def handler(conn: PeerConnection) -> None:
        stream = await conn.accept_stream()
        await answer_when_all_arrived(stream, expect, replies)
        await trio.sleep_forever()

    async with (
        open_endpoint(server_id, handler=handler) as server,
        open_endpoint(client_id) as client,
    ):
        conn = await client.connect(server.local_address, server_id.node_id)
        control = await RequestStream.open(conn, TransferCounters())
        with trio.fail_after(20):
            # Each reply may take 5 s: a client asking in turn would wait for the first
            # reply before sending the second request, and time out.
            try:
                return await control.nodes(ContentHash(bytes(32)), hashes, reply_within=5)
            except RemoteProtocolError as exc:
                return exc


def hashes_of(count: int) -> list[ContentHash]:
    return [ContentHash(os.urandom(32)) for _ in range(count)]


@pytest.mark.parametrize("count", [1, MAX_HASHES_PER_REQUEST, 5 * MAX_HASHES_PER_REQUEST + 3])
def test_every_request_goes_out_before_the_first_reply(count: int) -> None:
    hashes = hashes_of(count)
    expect = -(-count // MAX_HASHES_PER_REQUEST)
    nodes = trio.run(ask, hashes, expect, in_order)
    assert nodes == [node_for(h) for h in hashes]


def test_replies_out_of_request_order_are_a_protocol_error() -> None:
    def swapped(requests: list[GetNodes]) -> list[NodesReply | ErrorReply]:
        first, second, *rest = in_order(requests)
        return [second, first, *rest]

    failed = trio.run(ask, hashes_of(3 * MAX_HASHES_PER_REQUEST), 3, swapped)
    assert isinstance(failed, RemoteProtocolError) and "out of order" in str(failed)


def test_an_error_for_any_request_is_the_peers_answer() -> None:
    def refuse_second(requests: list[GetNodes]) -> list[NodesReply | ErrorReply]:
        replies = in_order(requests)
        replies[1] = ErrorReply(requests[1].request_id, ErrorCode.NOT_FOUND, "node not reached")
        return replies

    failed = trio.run(ask, hashes_of(2 * MAX_HASHES_PER_REQUEST), 2, refuse_second)
    assert isinstance(failed, PeerRequestError) and "not reached" in str(failed)
    assert failed.code is ErrorCode.NOT_FOUND
