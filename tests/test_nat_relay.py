"""A relay daemon (a real process, loopback UDP) against clients that misbehave: circuits to
nodes not registered with it, INCOMING from a node that is not our relay, a non-relay
asked to relay, and a client past its byte budget. The clients are real QUIC endpoints."""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trio

from p2pfs.bench.daemons import DaemonProcess
from p2pfs.errors import ConnectionClosedError, LocalProtocolError, StreamResetError
from p2pfs.identity import Identity
from p2pfs.ids import NodeId
from p2pfs.net import Endpoint, PeerConnection, Stream, open_endpoint
from p2pfs.net.control import (
    Accept,
    Connect,
    ControlKind,
    ControlMessage,
    Data,
    Decoder,
    Incoming,
    Refuse,
    RefuseCode,
    Register,
    encode,
    encode_datagrams,
)

BUDGET = 1_000_000


def start(home: Path, *flags: str) -> DaemonProcess:
    daemon = DaemonProcess(home, extra_args=("--no-lan", *flags))
    daemon.start()
    return daemon


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[tuple[DaemonProcess, tuple[str, int]]]:
    daemon = start(tmp_path / "relay", "--relay", "--relay-client-budget", str(BUDGET))
    try:
        host, port = daemon.call("id")["addresses"][0].rsplit(":", 1)
        yield daemon, (host, int(port))
    finally:
        daemon.stop()


async def first_message(stream: Stream) -> ControlMessage:
    decoder = Decoder()
    while (message := decoder.next_untrusted()) is None:
        data = await stream.receive_some()
        assert data, "stream ended without a message"
        decoder.feed(data)
    return message


def run(body: Callable[[Endpoint, Endpoint], Awaitable[None]]) -> None:
    async def main() -> None:
        with trio.fail_after(60):
            async with (
                open_endpoint(Identity.generate(), handler=_serve_control) as one,
                open_endpoint(Identity.generate(), handler=_serve_control) as two,
            ):
                await body(one, two)

    trio.run(main)


_incoming_handler: list[Callable[[PeerConnection, Stream], Awaitable[None]]] = []


async def _serve_control(conn: PeerConnection) -> None:
    """A client endpoint's handler: control streams go to the test's handler, if any."""
    while True:
        try:
            _kind, stream = await conn.accept_control()
        except ConnectionClosedError:
            return
        if _incoming_handler:
            await _incoming_handler[0](conn, stream)


async def register(endpoint: Endpoint, relay: tuple[str, int]) -> tuple[PeerConnection, Stream]:
    conn = await endpoint.connect(relay, None)
    stream = await conn.open_control(ControlKind.RELAY, encode(Register()))
    assert await first_message(stream) == Accept()
    return conn, stream


def test_relay_refuses_circuits_to_nodes_not_registered_with_it(
    relay: tuple[DaemonProcess, tuple[str, int]],
) -> None:
    daemon, address = relay

    async def body(client: Endpoint, other: Endpoint) -> None:
        conn = await client.connect(address, None)
        # `other` is a real, running node, but it never registered: no circuit to it.
        stream = await conn.open_control(ControlKind.RELAY, encode(Connect(other.node_id.raw)))
        answer = await first_message(stream)
        assert isinstance(answer, Refuse) and answer.code is RefuseCode.NOT_REGISTERED
        # A node may not ask for a circuit to itself either, registered or not.
        await register(client, address)
        stream = await conn.open_control(ControlKind.RELAY, encode(Connect(client.node_id.raw)))
        answer = await first_message(stream)
        assert isinstance(answer, Refuse)

    run(body)
    assert daemon.call("id")["relay"]["refused"]["not_registered"] == 1
    assert daemon.call("id")["relay"]["circuits_total"] == 0


def test_a_node_that_is_no_relay_refuses_to_relay(tmp_path: Path) -> None:
    daemon = start(tmp_path / "plain")
    try:
        host, port = daemon.call("id")["addresses"][0].rsplit(":", 1)

        async def body(client: Endpoint, other: Endpoint) -> None:
            conn = await client.connect((host, int(port)), None)
            stream = await conn.open_control(ControlKind.RELAY, encode(Register()))
            answer = await first_message(stream)
            assert isinstance(answer, Refuse) and answer.code is RefuseCode.NOT_A_RELAY

        run(body)
    finally:
        daemon.stop()


def test_a_node_takes_circuits_only_from_its_own_relays(tmp_path: Path) -> None:
    """INCOMING from a peer the node never registered with is refused: a stranger cannot
    push a tunnel (and a QUIC connection inside it) at a node by claiming to relay."""
    daemon = start(tmp_path / "plain")
    try:
        host, port = daemon.call("id")["addresses"][0].rsplit(":", 1)

        async def body(client: Endpoint, other: Endpoint) -> None:
            conn = await client.connect((host, int(port)), None)
            stream = await conn.open_control(ControlKind.RELAY, encode(Incoming(other.node_id.raw)))
            answer = await first_message(stream)
            assert isinstance(answer, Refuse) and answer.code is RefuseCode.UNEXPECTED

        run(body)
    finally:
        daemon.stop()


def test_a_client_past_its_byte_budget_is_cut_off(
    relay: tuple[DaemonProcess, tuple[str, int]],
) -> None:
    daemon, address = relay
    received: list[int] = [0]

    async def sink(conn: PeerConnection, stream: Stream) -> None:
        decoder = Decoder()
        decoder.feed(await stream.receive_some())
        assert isinstance(decoder.next_untrusted(), Incoming)
        await stream.send_all(encode(Accept()))
        try:
            while data := await stream.receive_some():
                received[0] += len(data)
        except (StreamResetError, LocalProtocolError, ConnectionClosedError):
            pass

    async def body(client: Endpoint, target: Endpoint) -> None:
        _incoming_handler.append(sink)
        registered, _stream = await register(target, address)
        async with trio.open_nursery() as nursery:
            # The target serves the control streams the relay opens on its connection.
            nursery.start_soon(_serve_control, registered)
            await overrun(client, target)
            nursery.cancel_scope.cancel()

    async def overrun(client: Endpoint, target: Endpoint) -> None:
        conn = await client.connect(address, None)
        stream = await conn.open_control(ControlKind.RELAY, encode(Connect(target.node_id.raw)))
        assert await first_message(stream) == Accept()
        datagram = os.urandom(1200)
        with pytest.raises((StreamResetError, ConnectionClosedError, LocalProtocolError)):
            for _ in range(4 * BUDGET // 1200 // 32):
                await stream.send_all(encode_datagrams([datagram] * 32))
            await stream.send_eof()
            while await stream.receive_some():
                pass
        with trio.move_on_after(2):
            # A new circuit for the same client is refused as BUSY.
            again = await conn.open_control(ControlKind.RELAY, encode(Connect(target.node_id.raw)))
            answer = await first_message(again)
            assert isinstance(answer, Refuse) and answer.code is RefuseCode.BUSY

    try:
        run(body)
    finally:
        _incoming_handler.clear()
    info = daemon.call("id")["relay"]
    assert info["cut_off"] == 1
    assert info["bytes_forwarded"] <= BUDGET
    assert received[0] <= BUDGET
    assert json.dumps(info)  # the relay's own account is plain JSON for `id --json`
    assert Data(b"x")  # the message type the client sent
    assert NodeId  # typed import used above
