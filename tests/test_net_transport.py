"""The QUIC transport over real UDP on 127.0.0.1, under both engines."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import trio

from benchmarks.linkemu import LinkConditions, LinkForwarder
from p2pfs.daemon.liveness import close_when_silent
from p2pfs.errors import (
    AuthenticationError,
    ConnectionClosedError,
    LocalProtocolError,
    StreamResetError,
)
from p2pfs.identity import Identity
from p2pfs.ids import NodeId
from p2pfs.net import CloseCode, PeerConnection, Stream, TransportConfig, load_engine, open_endpoint
from p2pfs.net.endpoint import bind_udp
from tests.support.rebinding import RebindingForwarder

MiB = 1 << 20
ENGINES = ["qh3", "aioquic"]
# aioquic moves ~10 MB/s with both ends in one process; keep its share of the suite short.
BULK = {"qh3": 32 * MiB, "aioquic": 6 * MiB}

engine_param = pytest.mark.parametrize("engine", ENGINES)


def pattern(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


async def read_all(stream: Stream) -> bytes:
    parts = []
    while chunk := await stream.receive_some():
        parts.append(chunk)
    return b"".join(parts)


Body = Callable[[Any, PeerConnection], Awaitable[None]]


def run_pair(
    engine: str,
    handler: Callable[[PeerConnection], Awaitable[None]],
    body: Body,
    *,
    timeout: float = 30,
    server_config: TransportConfig | None = None,
    client_config: TransportConfig | None = None,
) -> None:
    """Run ``body(server_endpoint, client_conn)`` against a server running ``handler``."""
    server_id, client_id = Identity.generate(), Identity.generate()

    async def main() -> None:
        with trio.fail_after(timeout):
            async with (
                open_endpoint(
                    server_id, handler=handler, engine=engine, config=server_config
                ) as server,
                open_endpoint(client_id, engine=engine, config=client_config) as client,
            ):
                conn = await client.connect(server.local_address, server_id.node_id)
                await body(server, conn)

    trio.run(main)


async def echo_handler(conn: PeerConnection) -> None:
    async with trio.open_nursery() as nursery:
        while True:
            try:
                stream = await conn.accept_stream()
            except ConnectionClosedError:
                return
            nursery.start_soon(echo, stream)


async def echo(stream: Stream) -> None:
    while chunk := await stream.receive_some():
        await stream.send_all(chunk)
    await stream.send_eof()


@engine_param
def test_bulk_transfer_is_byte_identical_both_directions(engine: str) -> None:
    size = BULK[engine]
    up, down = pattern(1, size), pattern(2, size)
    received: dict[str, bytes] = {}

    async def handler(conn: PeerConnection) -> None:
        stream = await conn.accept_stream()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: stream.send_all(down))
            received["server"] = await read_all(stream)
        await stream.send_eof()
        await conn.wait_closed()

    async def body(server: Any, conn: PeerConnection) -> None:
        stream = await conn.open_stream()

        async def upload() -> None:
            await stream.send_all(up)
            await stream.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(upload)
            received["client"] = await read_all(stream)
        await conn.close()

    run_pair(engine, handler, body)
    assert hashlib.sha256(received["server"]).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(received["client"]).digest() == hashlib.sha256(down).digest()


def port_of(endpoint: Any) -> int:
    return int(endpoint.local_address[1])


async def echoed(conn: PeerConnection, payload: bytes) -> bytes:
    stream = await conn.open_stream()
    await stream.send_all(payload)
    await stream.send_eof()
    return await read_all(stream)


@engine_param
def test_a_dual_stack_endpoint_speaks_both_families(engine: str) -> None:
    """An endpoint bound to ``::`` (the daemon's default) is dialled at 127.0.0.1 and at
    ::1, sees its IPv4 peer at its plain address (never ::ffff:127.0.0.1, which rate
    limits, path sizes and address reports would take for another host), and dials an
    IPv4-only endpoint itself."""
    server_id, v4_id, v6_id = Identity.generate(), Identity.generate(), Identity.generate()

    async def main() -> None:
        with trio.fail_after(20):
            async with (
                open_endpoint(server_id, "::", handler=echo_handler, engine=engine) as server,
                open_endpoint(v4_id, "127.0.0.1", handler=echo_handler, engine=engine) as v4,
                open_endpoint(v6_id, "::1", engine=engine) as v6,
            ):
                assert server.families == {socket.AF_INET, socket.AF_INET6}
                assert v4.families == {socket.AF_INET}
                assert not v4.speaks("::1") and server.speaks("127.0.0.1")
                port = server.local_address[1]
                from_v4 = await v4.connect(("127.0.0.1", port), server_id.node_id)
                assert await echoed(from_v4, b"over IPv4" * 500) == b"over IPv4" * 500
                from_v6 = await v6.connect(("::1", port), server_id.node_id)
                assert await echoed(from_v6, b"over IPv6" * 500) == b"over IPv6" * 500
                seen = {str(conn.remote_address[0]) for conn in server.connections}
                assert seen == {"127.0.0.1", "::1"}
                # The dual-stack endpoint dials out over IPv4 too (as a mapped address).
                out = await server.connect(v4.local_address, v4_id.node_id)
                assert out.remote_address[0] == "127.0.0.1"
                assert await echoed(out, b"back" * 900) == b"back" * 900
                # An IPv4 peer written as an IPv4-mapped address (a ticket may say so) is the
                # same peer: dialled and answered at its plain address.
                mapped = await server.connect(("::ffff:127.0.0.1", port_of(v4)), v4_id.node_id)
                assert mapped.remote_address[:2] == ("127.0.0.1", port_of(v4))
                assert await echoed(mapped, b"mapped" * 900) == b"mapped" * 900

    trio.run(main)


def test_without_ipv6_the_dual_stack_default_listens_on_ipv4(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A kernel booted without IPv6 refuses IPv6 sockets (EAFNOSUPPORT): the default
    ``::`` then listens on IPv4's wildcard; an IPv6 address asked for by name fails."""
    real_socket = socket.socket

    def no_ipv6(family: int = socket.AF_INET, *args: Any, **kwargs: Any) -> socket.socket:
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        return real_socket(family, *args, **kwargs)

    monkeypatch.setattr(socket, "socket", no_ipv6)
    sock = bind_udp("::", 0)
    try:
        assert sock.family == socket.AF_INET
        assert sock.getsockname()[0] == "0.0.0.0"
    finally:
        sock.close()
    with pytest.raises(OSError):
        bind_udp("::1", 0)


@engine_param
def test_many_concurrent_streams_on_one_connection(engine: str) -> None:
    results: dict[int, bytes] = {}

    async def one(conn: PeerConnection, i: int) -> None:
        stream = await conn.open_stream()
        payload = pattern(i, 1000 + 997 * i)
        await stream.send_all(payload)
        await stream.send_eof()
        results[i] = await read_all(stream)

    async def body(server: Any, conn: PeerConnection) -> None:
        async with trio.open_nursery() as nursery:
            for i in range(64):
                nursery.start_soon(one, conn, i)

    run_pair(engine, echo_handler, body)
    assert {i: results[i] for i in range(64)} == {i: pattern(i, 1000 + 997 * i) for i in range(64)}


@engine_param
def test_several_clients_and_server_learns_their_node_ids(engine: str) -> None:
    server_id = Identity.generate()
    clients = [Identity.generate() for _ in range(4)]
    seen: list[Any] = []

    async def handler(conn: PeerConnection) -> None:
        seen.append(conn.peer_id)
        await echo_handler(conn)

    async def client(ident: Identity, address: Any, i: int) -> None:
        async with open_endpoint(ident, engine=engine) as endpoint:
            conn = await endpoint.connect(address, server_id.node_id)
            assert conn.peer_id == server_id.node_id
            stream = await conn.open_stream()
            payload = pattern(10 + i, 256 * 1024)
            await stream.send_all(payload)
            await stream.send_eof()
            assert await read_all(stream) == payload
            await conn.close()

    async def main() -> None:
        with trio.fail_after(30):
            async with (
                open_endpoint(server_id, handler=handler, engine=engine) as server,
                trio.open_nursery() as nursery,
            ):
                for i, ident in enumerate(clients):
                    nursery.start_soon(client, ident, server.local_address, i)

    trio.run(main)
    assert sorted(seen) == sorted(c.node_id for c in clients)


@engine_param
def test_warm_up_sends_nothing_and_connections_still_work(engine: str) -> None:
    """warm_up builds a client hello in memory only: no datagram leaves the socket, no
    connection is kept, and both ends connect and move data afterwards."""
    server_id, client_id = Identity.generate(), Identity.generate()

    async def main() -> None:
        with trio.fail_after(20):
            async with (
                open_endpoint(server_id, handler=echo_handler, engine=engine) as server,
                open_endpoint(client_id, engine=engine) as client,
            ):
                await trio.to_thread.run_sync(client.warm_up)
                await trio.to_thread.run_sync(server.warm_up)
                assert (client.datagrams_sent, server.datagrams_sent) == (0, 0)
                assert not client.connections and not server.connections
                conn = await client.connect(server.local_address, server_id.node_id)
                stream = await conn.open_stream()
                await stream.send_all(b"after warm-up")
                await stream.send_eof()
                assert await read_all(stream) == b"after warm-up"
                await conn.close()

    trio.run(main)


@engine_param
def test_wrong_expected_peer_fails_and_server_app_never_sees_it(engine: str) -> None:
    server_id, client_id, impostor = Identity.generate(), Identity.generate(), Identity.generate()
    handled: list[PeerConnection] = []

    async def handler(conn: PeerConnection) -> None:
        handled.append(conn)
        await conn.wait_closed()

    async def main() -> None:
        with trio.fail_after(20):
            async with (
                open_endpoint(server_id, handler=handler, engine=engine) as server,
                open_endpoint(client_id, engine=engine) as client,
            ):
                with pytest.raises(AuthenticationError):
                    await client.connect(server.local_address, impostor.node_id)
                # The server notices the close (or its auth deadline) and forgets the attempt.
                while server.connections:
                    await trio.sleep(0.05)
                # A correct pin on the same endpoints still works.
                conn = await client.connect(server.local_address, server_id.node_id)
                await conn.close()

    trio.run(main)
    assert [c.peer_id for c in handled] == [client_id.node_id]


@engine_param
def test_writer_to_a_peer_that_does_not_read_is_held_back(engine: str) -> None:
    config = TransportConfig(
        max_data=2 * MiB,
        max_stream_data=1 * MiB,
        send_buffer_limit=256 * 1024,
        stream_receive_limit=256 * 1024,
        connection_receive_limit=1 * MiB,
    )
    total = 24 * MiB
    data = pattern(7, total)
    server_streams: list[Stream] = []
    reader_may_start = trio.Event()
    received: list[bytes] = []

    async def handler(conn: PeerConnection) -> None:
        stream = await conn.accept_stream()
        server_streams.append(stream)
        await reader_may_start.wait()
        received.append(await read_all(stream))
        await stream.send_all(b"got it")
        await stream.send_eof()
        await conn.wait_closed()

    async def body(server: Any, conn: PeerConnection) -> None:
        stream = await conn.open_stream()
        done = trio.Event()

        async def writer() -> None:
            await stream.send_all(data)
            await stream.send_eof()
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            # Let the flow settle against the stalled reader; the checks below hold at any
            # moment, the pause only makes them meaningful.
            await trio.sleep(1.5)
            assert not done.is_set()
            accepted = stream.bytes_sent
            buffered = server_streams[0].receive_buffered
            reader_may_start.set()
        assert await read_all(stream) == b"got it"
        await conn.close()
        # Nothing buffers without bound: the writer's backlog stayed under its limit, the
        # reader's adapter under its own (plus at most one receive batch), and what the
        # writer got accepted is covered by those plus the peer's flow-control window.
        assert stream.max_send_backlog <= config.send_buffer_limit
        batch_slack = config.receive_batch * config.max_datagram_size
        assert buffered <= config.stream_receive_limit + batch_slack
        assert accepted < total
        assert accepted <= (
            config.send_buffer_limit + config.stream_receive_limit + batch_slack + 4 * MiB
        )

    run_pair(engine, handler, body, server_config=config, client_config=config)
    assert received == [data]


@engine_param
def test_echo_with_small_receive_limits_does_not_deadlock(engine: str) -> None:
    # The echo's writer needs ACKs that a paused intake would hold back: the adapter must
    # keep reading (up to its hard limit) while a writer on the connection is blocked.
    config = TransportConfig(
        send_buffer_limit=128 * 1024,
        stream_receive_limit=128 * 1024,
        connection_receive_limit=256 * 1024,
        connection_receive_hard_limit=32 * MiB,
    )
    payload = pattern(5, BULK[engine] // 2)

    async def body(server: Any, conn: PeerConnection) -> None:
        stream = await conn.open_stream()

        async def upload() -> None:
            await stream.send_all(payload)
            await stream.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(upload)
            # Read the echo by length, not to EOF: what this test guards is the adapter's
            # intake (every byte flows both ways). Under CPU load qh3 2.1.0's native core
            # loses this stream's FIN about once in 60 runs (the client's core counts the
            # FIN sent and acknowledged; the server's core never reports it; no adapter
            # state is stuck), which made this test hang to its deadline in CI.
            # tests/test_net_engine.py pins a related qh3 stall deterministically.
            echoed = bytearray()
            while len(echoed) < len(payload):
                chunk = await stream.receive_some()
                assert chunk, "EOF before the whole echo"
                echoed += chunk
            assert echoed == payload
        await conn.close()

    run_pair(engine, echo_handler, body, server_config=config, client_config=config)


def junk_datagrams(engine: str, rng: random.Random) -> list[bytes]:
    """Random bytes, QUIC-looking headers with random bodies, and truncated real Initials."""
    eng = load_engine(engine)
    client = eng.connection_class(
        configuration=eng.configuration(Identity.generate(), TransportConfig(), is_client=True)
    )
    client.connect(("127.0.0.1", 9), now=0.0)
    initial = client.datagrams_to_send(now=0.0)[0][0]
    junk = [rng.randbytes(rng.randrange(0, 1500)) for _ in range(200)]
    junk += [
        bytes([0xC0 | rng.randrange(64)]) + rng.randbytes(rng.randrange(0, 1400))
        for _ in range(100)
    ]
    junk += [bytes([0x40]) + rng.randbytes(rng.randrange(0, 1400)) for _ in range(100)]
    junk += [initial[:n] for n in (1, 5, 6, 20, 100, 600, 1199)]
    corrupted = bytearray(initial)
    for _ in range(20):
        corrupted[rng.randrange(30, len(corrupted))] ^= 0xFF
    junk.append(bytes(corrupted))
    # A whole valid Initial from a client that never finishes: must time out, not linger.
    junk.append(initial)
    rng.shuffle(junk)
    return junk


@engine_param
def test_junk_datagrams_do_not_disturb_an_honest_transfer(engine: str) -> None:
    size = BULK[engine] // 4
    payload = pattern(3, size)
    rng = random.Random(42)
    junk = junk_datagrams(engine, rng)
    config = TransportConfig(handshake_timeout=2.0)

    async def body(server: Any, conn: PeerConnection) -> None:
        stream = await conn.open_stream()
        dropped_before = server.datagrams_dropped

        async def spray() -> None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                for data in junk:
                    sock.sendto(data, server.local_address)
                    await trio.sleep(0)

        async def upload() -> None:
            await stream.send_all(payload)
            await stream.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(spray)
            nursery.start_soon(upload)
            echoed = await read_all(stream)
        assert echoed == payload
        assert server.datagrams_dropped > dropped_before
        # The half-open connection from the bare Initial times out and is forgotten.
        while len(server.connections) > 1:
            await trio.sleep(0.1)
        await conn.close()

    run_pair(engine, echo_handler, body, server_config=config)


@engine_param
def test_peer_close_and_endpoint_shutdown_fail_pending_operations(engine: str) -> None:
    server_id, client_id = Identity.generate(), Identity.generate()

    async def handler(conn: PeerConnection) -> None:
        stream = await conn.accept_stream()
        assert await stream.receive_some() == b"close please"
        await conn.close(0x42, "as asked")

    async def main() -> None:
        with trio.fail_after(20):
            async with open_endpoint(client_id, engine=engine) as client:
                async with open_endpoint(server_id, handler=handler, engine=engine) as server:
                    conn = await client.connect(server.local_address, server_id.node_id)
                    stream = await conn.open_stream()
                    await stream.send_all(b"close please")
                    with pytest.raises(ConnectionClosedError) as info:
                        await stream.receive_some()
                    assert info.value.error_code == 0x42
                    assert not info.value.locally
                    with pytest.raises(ConnectionClosedError):
                        await conn.open_stream()

                    conn2 = await client.connect(server.local_address, server_id.node_id)
                    stream2 = await conn2.open_stream()
                    await stream2.send_all(b"hello")
                # The server endpoint is gone: its CONNECTION_CLOSE reaches us.
                with pytest.raises(ConnectionClosedError) as info:
                    await stream2.receive_some()
                assert info.value.error_code == CloseCode.SHUTDOWN

    trio.run(main)


@engine_param
def test_stream_reset_reaches_the_peer(engine: str) -> None:
    async def handler(conn: PeerConnection) -> None:
        stream = await conn.accept_stream()
        await stream.receive_some()
        stream.reset(0x7)
        await conn.wait_closed()

    async def body(server: Any, conn: PeerConnection) -> None:
        stream = await conn.open_stream()
        await stream.send_all(b"x")
        with pytest.raises(StreamResetError) as info:
            await stream.receive_some()
        assert info.value.error_code == 0x7
        # Other streams are unaffected.
        other = await conn.open_stream()
        await other.send_all(b"still fine")
        await conn.close()

    run_pair(engine, handler, body)


class DropOneForwarder:
    """A UDP forwarder between one client and ``target`` that, once armed, drops the next
    datagram of at least ``size`` bytes going ``towards`` ("server" or "client") and sets
    ``dropped``: stream data, not an ACK, is what it loses."""

    def __init__(self, target: tuple[str, int], towards: str, size: int = 600) -> None:
        self.target, self.towards, self.size = target, towards, size
        self.sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.armed = False
        self.dropped = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[tuple[str, int]]) -> None:
        with self.sock:
            await self.sock.bind(("127.0.0.1", 0))
            task_status.started(self.sock.getsockname())
            client = None
            while True:
                data, sender = await self.sock.recvfrom(65535)
                towards = "client" if sender == self.target else "server"
                if towards == "server":
                    client = sender
                if self.armed and towards == self.towards and len(data) >= self.size:
                    self.armed = False
                    self.dropped.set()
                    continue
                destination = self.target if towards == "server" else client
                if destination is not None:
                    await self.sock.sendto(data, destination)


@contextlib.asynccontextmanager
async def connected_through(
    engine: str,
    handler: Callable[[PeerConnection], Awaitable[None]],
    forwarder_for: Callable[[tuple[str, int]], Any],
    forwarders: list[Any],
) -> AsyncIterator[PeerConnection]:
    """A client connected to a server running ``handler`` through the forwarder that
    ``forwarder_for(server address)`` makes (put in ``forwarders`` before the handler can
    run); closed, and the forwarder stopped, at the end."""
    server_id = Identity.generate()
    async with (
        open_endpoint(server_id, handler=handler, engine=engine) as server,
        open_endpoint(Identity.generate(), engine=engine) as client,
        trio.open_nursery() as nursery,
    ):
        host, port = server.local_address[:2]
        forwarder = forwarder_for((host, port))
        forwarders.append(forwarder)
        address = await nursery.start(forwarder.run)
        conn = await client.connect(address, server_id.node_id)
        yield conn
        await conn.close()
        nursery.cancel_scope.cancel()


async def echo_streams(conn: PeerConnection) -> None:
    with contextlib.suppress(ConnectionClosedError):
        await echo_handler(conn)


async def earlier_stream_last(conn: PeerConnection, link: DropOneForwarder) -> list[bytes]:
    """Open a stream whose first bytes the link drops, then a later stream: the peer sees
    the later stream first and the earlier one's bytes only when they are sent again."""
    earlier_data, later_data = pattern(3, 1000), pattern(4, 1000)
    link.armed = True
    earlier = await conn.open_stream()
    await earlier.send_all(earlier_data)
    await link.dropped.wait()
    later = await conn.open_stream()
    await later.send_all(later_data)
    echoed = []
    for stream in (later, earlier):
        await stream.send_eof()
        echoed.append(await read_all(stream))
    assert echoed == [later_data, earlier_data]
    return echoed


@engine_param
@pytest.mark.parametrize("opener", ["client", "server"])
def test_a_stream_whose_first_bytes_come_after_a_later_streams_is_served(
    engine: str, opener: str
) -> None:
    # QUIC opens a peer's streams in id order, so under loss or reordering an earlier
    # stream's first bytes can come after a later one's. Both ends took it for a stream
    # already finished with and dropped its data: the request on it went unanswered
    # (a fetch over a lossy path stalled 10 s, one run in two).
    echoed: list[bytes] = []
    links: list[DropOneForwarder] = []
    towards = "client" if opener == "server" else "server"

    async def main() -> None:
        async def handler(conn: PeerConnection) -> None:
            if opener == "server":
                echoed.extend(await earlier_stream_last(conn, links[0]))
            else:
                await echo_streams(conn)

        def forwarder(address: tuple[str, int]) -> DropOneForwarder:
            return DropOneForwarder(address, towards)

        with trio.fail_after(10):
            async with connected_through(engine, handler, forwarder, links) as conn:
                if opener == "client":
                    echoed.extend(await earlier_stream_last(conn, links[0]))
                else:
                    async with trio.open_nursery() as echoing:
                        echoing.start_soon(echo_streams, conn)
                        while not echoed:
                            await trio.sleep(0.01)
                        echoing.cancel_scope.cancel()

    trio.run(main)
    assert len(echoed) == 2


@engine_param
def test_opening_a_second_stream_before_writing_the_first_is_refused(engine: str) -> None:
    """The engine takes a stream's id at its first write: two opens in a row got one id,
    and the second Stream object took the first one's data."""

    async def body(server: Any, conn: PeerConnection) -> None:
        first = await conn.open_stream()
        with pytest.raises(LocalProtocolError):
            await conn.open_stream()
        await first.send_all(b"x")
        second = await conn.open_stream()
        assert second.stream_id != first.stream_id
        await conn.close()

    run_pair(engine, echo_handler, body)


def test_unknown_engine_is_refused() -> None:
    with pytest.raises(LocalProtocolError):
        load_engine("quiche")


def test_engine_env_selects_aioquic(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("P2PFS_QUIC_ENGINE", "aioquic")
    assert load_engine().name == "aioquic"
    monkeypatch.delenv("P2PFS_QUIC_ENGINE")
    assert load_engine().name == "qh3"
    assert os.environ.get("P2PFS_QUIC_ENGINE") is None


def test_unpinned_client_learns_the_servers_node_id() -> None:
    server_id, client_id = Identity.generate(), Identity.generate()
    seen: list[NodeId] = []

    async def handler(conn: PeerConnection) -> None:
        seen.append(conn.peer_id)
        await conn.wait_closed()

    async def main() -> None:
        with trio.fail_after(20):
            async with (
                open_endpoint(server_id, handler=handler) as server,
                open_endpoint(client_id) as client,
            ):
                conn = await client.connect(server.local_address, None)
                assert conn.peer_id == server_id.node_id
                await conn.close()
        assert seen == [client_id.node_id]

    trio.run(main)


class _Blackhole:
    """A UDP forwarder between one client and a server that can stop passing anything,
    as a peer that restarted or vanished (no CONNECTION_CLOSE ever comes)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.target: tuple[str, int] | None = None
        self.silent = False
        self.delay = delay
        """Each datagram's one-way delay (s): a long path."""
        self.socket = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.client: Any = None
        self._nursery: trio.Nursery | None = None

    def __enter__(self) -> _Blackhole:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.socket.close()

    async def start(self, nursery: trio.Nursery, target: tuple[str, int]) -> tuple[str, int]:
        """Forward to ``target`` from now on; returns the address a client dials."""
        self.target = target
        self._nursery = nursery
        await self.socket.bind(("127.0.0.1", 0))
        nursery.start_soon(self._forward)
        return self.socket.getsockname()  # type: ignore[no-any-return]

    async def _forward(self) -> None:
        while True:
            data, source = await self.socket.recvfrom(65536)
            if self.silent:
                continue
            if source == self.target:
                if self.client is not None:
                    await self._send(data, self.client)
            elif self.target is not None:
                self.client = source
                await self._send(data, self.target)

    async def _send(self, data: bytes, destination: Any) -> None:
        if not self.delay:
            await self.socket.sendto(data, destination)
            return

        async def later() -> None:
            await trio.sleep(self.delay)
            await self.socket.sendto(data, destination)

        assert self._nursery is not None
        self._nursery.start_soon(later)


@contextlib.asynccontextmanager
async def through(
    forwarder: _Blackhole, engine: str, handler: Callable[[PeerConnection], Awaitable[None]]
) -> AsyncIterator[tuple[PeerConnection, trio.Nursery]]:
    """A client connected through ``forwarder`` to a server running ``handler``, and a
    nursery that ends with the block."""
    server_id = Identity.generate()
    async with (
        open_endpoint(server_id, handler=handler, engine=engine) as server,
        open_endpoint(Identity.generate(), engine=engine) as client,
        trio.open_nursery() as nursery,
    ):
        via = await forwarder.start(nursery, server.local_address)
        conn = await client.connect(via, server_id.node_id)
        yield conn, nursery
        nursery.cancel_scope.cancel()


@engine_param
def test_a_ping_resent_on_a_long_path_is_waited_for_and_a_dead_peer_still_found(
    engine: str,
) -> None:
    """A 600 ms round trip; the PING of an idle connection and its first resend are lost
    (1.5 s of silence), the next gets through ~3-3.5 s after the PING. The engine was still
    resending, so the peer is alive: it was closed at 2 s. Once the peer is gone for good,
    the connection is still closed, after the engine's resends."""

    async def main() -> None:
        with trio.fail_after(45), _Blackhole(delay=0.3) as forwarder:
            async with through(forwarder, engine, echo_streams) as (conn, nursery):
                for _ in range(3):  # a few round-trip samples
                    stream = await conn.open_stream()
                    await stream.send_all(b"ping")
                    await stream.send_eof()
                    assert await read_all(stream) == b"ping"
                nursery.start_soon(close_when_silent, conn, 1.0)
                await trio.sleep(0.9)
                forwarder.silent = True  # the PING goes out at 1.0 s, into the silence
                await trio.sleep(1.6)
                forwarder.silent = False
                await trio.sleep(3.5)
                assert not conn.is_closed
                forwarder.silent = True
                with trio.fail_after(25):
                    await conn.wait_closed()

    trio.run(main)


@engine_param
def test_responsive_tells_a_live_peer_from_a_silent_one(engine: str) -> None:

    async def main() -> None:
        with trio.fail_after(20), _Blackhole() as forwarder:
            async with through(forwarder, engine, echo_handler) as (conn, _nursery):
                assert await conn.responsive(2.0)
                forwarder.silent = True
                assert not await conn.responsive(1.0)
                assert not conn.is_closed  # silent is not closed: the idle timeout is far off
                forwarder.silent = False
                assert await conn.responsive(2.0)
                conn.close_nowait()
                assert not await conn.responsive(2.0)

    trio.run(main)


@engine_param
def test_close_when_silent_spares_a_peer_we_do_not_read_and_closes_a_silent_one(
    engine: str,
) -> None:
    """A throttled transfer (we stop reading, so intake pauses and the peer's datagrams
    wait unprocessed) is a live peer and keeps its connection; once we read again, a peer
    whose packets stop coming has its connection closed long before the idle timeout."""

    async def flood(conn: PeerConnection) -> None:
        stream = await conn.accept_stream()
        with contextlib.suppress(ConnectionClosedError, StreamResetError):
            while True:
                await stream.send_all(bytes(1 << 20))

    async def main() -> None:
        with trio.fail_after(30), _Blackhole() as forwarder:
            async with through(forwarder, engine, flood) as (conn, nursery):
                stream = await conn.open_stream()
                await stream.send_all(b"go")
                nursery.start_soon(close_when_silent, conn, 0.3, 0.5)
                await trio.sleep(3)  # never reading: intake paused for most of it
                assert not conn.is_closed

                async def drain() -> None:
                    with contextlib.suppress(ConnectionClosedError, StreamResetError):
                        while await stream.receive_some():
                            pass

                nursery.start_soon(drain)  # reading again: intake resumes
                forwarder.silent = True
                # Its RTT estimate grew while we did not read (the peer's packets waited
                # unread): the peer is given up to liveness.LONGEST_ANSWER.
                with trio.fail_after(TransportConfig().idle_timeout / 3):
                    await conn.wait_closed()

    trio.run(main)


@engine_param
def test_the_round_trip_read_from_the_engine_is_the_paths(engine: str) -> None:
    """`latest_rtt` (a reach into each engine) reads a real sample: on loopback it is far
    below a path with 30 ms each way (the link emulator), and there never below 60 ms."""
    server_id, client_id = Identity.generate(), Identity.generate()
    samples: dict[str, float | None] = {}

    async def round_trips(conn: PeerConnection, name: str) -> None:
        for _ in range(3):
            stream = await conn.open_stream()
            await stream.send_all(b"ping")
            await stream.send_eof()
            assert await read_all(stream) == b"ping"
        samples[name] = conn.latest_rtt

    async def main() -> None:
        with trio.fail_after(30):
            async with (
                open_endpoint(server_id, handler=echo_handler, engine=engine) as server,
                open_endpoint(client_id, engine=engine) as client,
            ):
                direct = await client.connect(server.local_address, server_id.node_id)
                await round_trips(direct, "direct")
                delayed = LinkConditions(delay=0.030)
                with LinkForwarder(server.local_address, delayed, seed=1) as link:
                    far = await client.connect(link.address, server_id.node_id)
                    await round_trips(far, "far")

    trio.run(main)
    direct, far = samples["direct"], samples["far"]
    assert direct is not None and far is not None
    assert far >= 0.060
    assert 0 < direct < far


@engine_param
@pytest.mark.parametrize("link_sized", [True, False])
def test_loopback_datagrams_are_as_big_as_the_link_allows(engine: str, link_sized: bool) -> None:
    """Over loopback each side sends datagrams up to the engine's largest (net/pathsize.py),
    which the other side receives whole (its receive buffer and GRO runs hold them); with
    link-sized datagrams off, the base size."""
    config = TransportConfig(link_sized_datagrams=link_sized)
    size = 3 << 20
    up, down = pattern(5, size), pattern(6, size)
    received: dict[str, bytes] = {}
    ratios: dict[str, float] = {}

    async def handler(conn: PeerConnection) -> None:
        stream = await conn.accept_stream()
        received["server"] = await read_all(stream)
        await stream.send_all(down)
        await stream.send_eof()
        await conn.wait_closed()

    async def main() -> None:
        server_id, client_id = Identity.generate(), Identity.generate()
        with trio.fail_after(30):
            async with (
                open_endpoint(server_id, handler=handler, engine=engine, config=config) as server,
                open_endpoint(client_id, engine=engine, config=config) as client,
            ):
                conn = await client.connect(server.local_address, server_id.node_id)
                assert conn.datagram_size == client.datagram_size(server.local_address)
                stream = await conn.open_stream()
                await stream.send_all(up)
                await stream.send_eof()
                received["client"] = await read_all(stream)
                await conn.close()
                for name, endpoint in (("server", server), ("client", client)):
                    ratios[name] = endpoint.bytes_received / endpoint.datagrams_received
                assert client.datagram_size(server.local_address) == (
                    min(config.loopback_datagram_size, load_engine(engine).largest_datagram)
                    if link_sized
                    else config.max_datagram_size
                )

    trio.run(main)
    assert received == {"server": up, "client": down}
    for name, ratio in ratios.items():
        # Acknowledgements are small datagrams in the count: the mean is well under the
        # data's size, but with big datagrams far above any Ethernet frame.
        if link_sized:
            assert ratio > 4 * 1472, (name, ratios)
        else:
            assert ratio <= 1472, (name, ratios)


@engine_param
def test_parts_arrive_as_their_concatenation(engine: str) -> None:
    """send_all_parts: empty parts, parts over the send bound (split across several engine
    writes) and many small ones arrive in order, as one send_all of their join would."""
    rng = random.Random(8)
    sizes = [0, 5, 3 << 20, 0, 1, 70_000, *[rng.randrange(1, 9000) for _ in range(300)], 0]
    parts = [pattern(n, size) for n, size in enumerate(sizes)]
    received: dict[str, bytes] = {}

    async def handler(conn: PeerConnection) -> None:
        stream = await conn.accept_stream()
        received["server"] = await read_all(stream)
        await stream.send_eof()
        await conn.wait_closed()

    async def body(server: Any, conn: PeerConnection) -> None:
        stream = await conn.open_stream()
        await stream.send_all_parts([memoryview(p) for p in parts[:3]] + parts[3:])
        await stream.send_eof()
        assert stream.bytes_sent == sum(sizes)
        await read_all(stream)
        await conn.close()

    run_pair(engine, handler, body)
    assert received["server"] == b"".join(parts)


@pytest.mark.parametrize(("engine", "round_trips"), [("qh3", 2), ("aioquic", 3)])
def test_a_connection_is_authenticated_in_two_round_trips(engine: str, round_trips: int) -> None:
    """The server's challenge rides its first flight (0.5-RTT data), so the client answers
    with its Finished: TLS's round trip, then the proof's. It waited for the handshake's
    end before (a third round trip). Through the link emulator with a 0.5 s round trip, so
    that the count shows above any scheduling noise: three round trips take at least
    1.5 s however fast the machine is. aioquic's server holds stream data until its
    handshake completes, so there it stays three (and still connects)."""
    rtt = 0.5

    async def main() -> tuple[float, NodeId]:
        server_id, client_id = Identity.generate(), Identity.generate()

        async def handler(conn: PeerConnection) -> None:
            await trio.sleep_forever()

        async with (
            open_endpoint(server_id, handler=handler, engine=engine) as server,
            open_endpoint(client_id, engine=engine) as client,
        ):
            host, port = server.local_address[:2]
            with LinkForwarder(
                (host, port), LinkConditions.path(rtt, 0.0, None), seeds=(1, 2)
            ) as link:
                started = trio.current_time()
                conn = await client.connect(link.address, server_id.node_id)
                took = trio.current_time() - started
                assert conn.peer_id == server_id.node_id
                await conn.close()
        return took, server_id.node_id

    took, _ = trio.run(main)
    assert took < (round_trips + 0.7) * rtt, f"{took / rtt:.2f} round trips"


def test_datagrams_for_a_relay_circuit_that_is_gone_are_dropped_not_sent() -> None:
    """A relayed connection outliving its circuit (a CONNECTION_CLOSE at shutdown) sends to
    its tunnel address: with no circuit left, that went to the UDP socket and failed the
    connection's engine with a TypeError (an IPv6 tunnel address on an IPv4 socket)."""

    async def main() -> None:
        async with open_endpoint(Identity.generate()) as endpoint:
            endpoint.transmit([(b"\x40" + bytes(40), ("100::1", 1))])
            endpoint.transmit([(b"\x40" + bytes(40), ("100::1", 1, 0, 0))])
            endpoint.transmit([])
            assert endpoint.datagrams_sent == 0

    trio.run(main)


@engine_param
def test_a_transfer_carries_on_when_the_clients_nat_gives_it_a_new_port(engine: str) -> None:
    # A NAT whose mapping times out in a lull gives the next packet a new source port:
    # the server sees the same connection ids come from a new address. QUIC moves the
    # connection there (RFC 9000, 9.3); the server must send to the new address.
    size = BULK[engine]
    data = pattern(7, size)
    seen: dict[str, Any] = {}
    nats: list[RebindingForwarder] = []

    async def main() -> None:
        async def handler(conn: PeerConnection) -> None:
            stream = await conn.accept_stream()
            await stream.receive_some()
            await stream.send_all(data)
            await stream.send_eof()
            with contextlib.suppress(ConnectionClosedError):
                await conn.wait_closed()
            seen["server_view"] = conn.remote_address

        with trio.fail_after(30):
            async with connected_through(engine, handler, RebindingForwarder, nats) as conn:
                nat = nats[0]
                stream = await conn.open_stream()
                await stream.send_all(b"go")
                parts: list[bytes] = []
                got = 0
                while got < size:
                    chunk = await stream.receive_some()
                    assert chunk
                    parts.append(chunk)
                    got += len(chunk)
                    if got >= size // 4 and "first_port" not in seen:
                        seen["first_port"] = nat.port
                        await nat.rebind()
                seen["data"] = b"".join(parts)
                seen["port"] = nat.port

    trio.run(main)
    assert seen["port"] != seen["first_port"]
    assert seen["data"] == data
    # The connection's address follows (the relay reads it to tell a circuit's ends apart).
    assert tuple(seen["server_view"][:2]) == ("127.0.0.1", seen["port"])
