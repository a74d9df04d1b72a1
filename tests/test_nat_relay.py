"""A relay daemon (a real process, loopback UDP) against clients that misbehave: circuits to
nodes not registered with it, INCOMING from a node that is not our relay, a non-relay
asked to relay, a stranger sending on someone's circuit, and a client past its byte budget.
The clients are real QUIC endpoints sending real relay datagrams from their one port."""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trio

from p2pfs.errors import ConnectionClosedError, LocalProtocolError, StreamResetError
from p2pfs.identity import Identity
from p2pfs.ids import NodeId
from p2pfs.net import Endpoint, PeerConnection, Stream, open_endpoint
from p2pfs.net.control import (
    RELAY_DATAGRAM,
    Accept,
    Connect,
    ControlKind,
    ControlMessage,
    Decoder,
    Incoming,
    Refuse,
    RefuseCode,
    Register,
    encode,
    parse_relay_datagram_untrusted,
    relay_datagram,
)
from tests.support.daemons import DaemonProcess
from tests.support.rebinding import RebindingForwarder

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
            incoming = Incoming(other.node_id.raw, bytes(8))
            stream = await conn.open_control(ControlKind.RELAY, encode(incoming))
            answer = await first_message(stream)
            assert isinstance(answer, Refuse) and answer.code is RefuseCode.UNEXPECTED

        run(body)
    finally:
        daemon.stop()


class CircuitSink:
    """The target's side of a circuit in these tests: accepts INCOMING, counts the relay
    datagrams that reach it."""

    def __init__(self) -> None:
        self.circuits: list[bytes] = []
        self.received = 0

    async def accept(self, conn: PeerConnection, stream: Stream) -> None:
        incoming = await first_message(stream)
        assert isinstance(incoming, Incoming)
        self.circuits.append(incoming.circuit)
        await stream.send_all(encode(Accept()))
        try:
            while await stream.receive_some():
                pass
        except (StreamResetError, LocalProtocolError, ConnectionClosedError):
            pass

    def datagram(self, data: bytes, source: tuple[str, int]) -> None:
        circuit, datagram = parse_relay_datagram_untrusted(data)
        assert circuit in self.circuits
        self.received += len(datagram)


def test_a_client_past_its_byte_budget_is_cut_off(
    relay: tuple[DaemonProcess, tuple[str, int]],
) -> None:
    """Relay datagrams flow only between a circuit's two ends, never from a stranger who
    learnt its id, and the circuit ends once a client has moved its byte budget."""
    daemon, address = relay
    sink = CircuitSink()

    async def body(client: Endpoint, target: Endpoint) -> None:
        _incoming_handler.append(sink.accept)
        target.set_datagram_handler(bytes([RELAY_DATAGRAM]), sink.datagram)
        registered, _stream = await register(target, address)
        async with trio.open_nursery() as nursery:
            # The target serves the control streams the relay opens on its connection.
            nursery.start_soon(_serve_control, registered)
            await overrun(client, target.node_id)
            nursery.cancel_scope.cancel()

    async def overrun(client: Endpoint, target: NodeId) -> None:
        conn = await client.connect(address, None)
        stream = await conn.open_control(ControlKind.RELAY, encode(Connect(target.raw)))
        accept = await first_message(stream)
        assert isinstance(accept, Accept) and accept.circuit == sink.circuits[0]
        relay_address = conn.remote_address[:2]
        # A stranger that knows the circuit id gets nothing through.
        async with open_endpoint(Identity.generate()) as stranger:
            for _ in range(50):
                stranger.send_threadsafe(relay_datagram(accept.circuit, b"s" * 1000), relay_address)
            await trio.sleep(0.3)
        assert sink.received == 0
        payload = os.urandom(1200)
        with pytest.raises((StreamResetError, ConnectionClosedError, LocalProtocolError)):
            for _ in range(4 * BUDGET // 1200):
                client.send_threadsafe(relay_datagram(accept.circuit, payload), relay_address)
                await trio.sleep(0.0005)  # within the relay's rate: nothing dropped for it
            while await stream.receive_some():
                pass
        with trio.move_on_after(2):
            # A new circuit for the same client is refused as BUSY.
            again = await conn.open_control(ControlKind.RELAY, encode(Connect(target.raw)))
            answer = await first_message(again)
            assert isinstance(answer, Refuse) and answer.code is RefuseCode.BUSY

    try:
        run(body)
    finally:
        _incoming_handler.clear()
    info = daemon.call("id")["relay"]
    assert info["cut_off"] == 1
    assert info["datagrams_dropped"] >= 50  # the stranger's, at least
    assert 0.5 * BUDGET < sink.received <= BUDGET
    assert info["bytes_forwarded"] == sink.received
    assert json.dumps(info)  # the relay's own account is plain JSON for `id --json`


def test_a_circuit_follows_an_end_whose_nat_gives_it_a_new_port(
    relay: tuple[DaemonProcess, tuple[str, int]],
) -> None:
    """A registered home's NAT mapping times out and its next packet leaves from a new
    port: the relay's connection to it moves there (QUIC), and so must the circuit, which
    takes an end's datagrams only from, and sends them only to, that connection's address."""
    daemon, address = relay
    sink = CircuitSink()
    back = CircuitSink()

    async def body(client: Endpoint, target: Endpoint) -> None:
        _incoming_handler.append(sink.accept)
        target.set_datagram_handler(bytes([RELAY_DATAGRAM]), sink.datagram)
        client.set_datagram_handler(bytes([RELAY_DATAGRAM]), back.datagram)
        async with trio.open_nursery() as nursery:
            nat = RebindingForwarder(address)
            nated_relay = await nursery.start(nat.run)
            registered, _stream = await register(target, nated_relay)
            nursery.start_soon(_serve_control, registered)
            conn = await client.connect(address, None)
            stream = await conn.open_control(ControlKind.RELAY, encode(Connect(target.node_id.raw)))
            accept = await first_message(stream)
            assert isinstance(accept, Accept)
            back.circuits.append(accept.circuit)

            async def both_ways(expected: int) -> None:
                for _ in range(20):
                    client.send_threadsafe(relay_datagram(accept.circuit, b"c" * 1000), address)
                    target.send_threadsafe(relay_datagram(accept.circuit, b"t" * 1000), nated_relay)
                    await trio.sleep(0.002)
                with trio.move_on_after(5):
                    while sink.received < expected or back.received < expected:
                        await trio.sleep(0.01)

            await both_ways(20_000)
            assert (sink.received, back.received) == (20_000, 20_000)
            await nat.rebind()
            # The home's next packet (its keepalive, here at once) comes from the new port.
            assert await registered.responsive(5)
            await both_ways(40_000)
            nursery.cancel_scope.cancel()

    try:
        run(body)
    finally:
        _incoming_handler.clear()
    assert (sink.received, back.received) == (40_000, 40_000)
    assert daemon.call("id")["relay"]["bytes_forwarded"] == 80_000
