"""Hostile-peer fuzzing of the QUIC endpoint: mutated ClientHellos and ServerHellos, floods.

tests/hostile runs these fuzzers briefly; ``python -m benchmarks fuzz --minutes N`` runs them
for longer and prints a table.

How a case reaches the TLS parser: Initial packets are encrypted with keys derived from the
client's destination connection id (RFC 9001 5.2), so flipping bits of a captured datagram
only tests the AEAD. The fuzzer instead opens real Initials (produced by each engine's own
client or server), mutates the plaintext ClientHello / ServerHello, and seals the result
again for a fresh connection id, with aioquic's packet protection. Every case is derived
from ``(seed, case number)``; the seed is printed with every failure.
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio
from aioquic._buffer import Buffer
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.packet import QuicPacketType, pull_quic_header

from p2pfs.errors import P2pfsError
from p2pfs.identity import Identity
from p2pfs.net import PeerConnection, TransportConfig, load_engine, open_endpoint
from p2pfs.net.boundary import is_fatal

QUIC_V1 = 1
CID_LEN = 8
MIN_INITIAL = 1200
CRYPTO_PIECE = 1000
KEY_SHARE = 0x0033
FRAME_PADDING, FRAME_PING, FRAME_ACK, FRAME_ACK_ECN, FRAME_CRYPTO = 0x00, 0x01, 0x02, 0x03, 0x06
# The fuzz targets the engines, not admission: every mutated hello gets connection state.
FUZZ_CONFIG = TransportConfig(
    max_pending_connections=1 << 20,
    max_pending_per_ip=1 << 20,
    retry_threshold=1 << 20,
    handshake_timeout=2.0,
)
MiB = 1 << 20


# -- Initial packet protection ----------------------------------------------------------


def _varint(value: int) -> bytes:
    if value < 0x40:
        return bytes((value,))
    if value < 0x4000:
        return (value | 0x4000).to_bytes(2, "big")
    if value < 0x4000_0000:
        return (value | 0x8000_0000).to_bytes(4, "big")
    return (value | 0xC000_0000_0000_0000).to_bytes(8, "big")


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    size = 1 << (data[pos] >> 6)
    value = data[pos] & 0x3F
    for byte in data[pos + 1 : pos + size]:
        value = (value << 8) | byte
    return value, pos + size


@dataclass(frozen=True, slots=True)
class OpenedInitial:
    dcid: bytes
    scid: bytes
    packet_number: int
    payload: bytes


def open_initials(datagram: bytes, client_dcid: bytes, *, from_client: bool) -> list[OpenedInitial]:
    """The Initial packets of a datagram, decrypted (others, e.g. Handshake, are skipped)."""
    opened = []
    pos = 0
    while pos < len(datagram) and datagram[pos] & 0x80:
        header = pull_quic_header(Buffer(data=datagram[pos:]), host_cid_length=CID_LEN)
        end = pos + header.packet_length
        if header.packet_type == QuicPacketType.INITIAL:
            crypto = CryptoPair()
            crypto.setup_initial(cid=client_dcid, is_client=not from_client, version=QUIC_V1)
            packet = datagram[pos:end]
            offset = header.packet_length - _payload_length(packet)
            _plain_header, payload, number = crypto.decrypt_packet(packet, offset, 0)
            opened.append(OpenedInitial(header.destination_cid, header.source_cid, number, payload))
        pos = end
    return opened


def _payload_length(packet: bytes) -> int:
    """Bytes after the Length field of a long-header packet (packet number + payload)."""
    pos = 5
    pos += 1 + packet[pos]  # dcid
    pos += 1 + packet[pos]  # scid
    if (packet[0] & 0x30) == 0:  # Initial: token
        token_len, pos = _read_varint(packet, pos)
        pos += token_len
    length, _ = _read_varint(packet, pos)
    return length


def split_crypto(payload: bytes) -> tuple[bytes, bytes]:
    """(CRYPTO stream bytes in offset order, the other frames' bytes: ACK, PING)."""
    pieces: list[tuple[int, bytes]] = []
    other = bytearray()
    pos = 0
    while pos < len(payload):
        start = pos
        kind, pos = _read_varint(payload, pos)
        if kind == FRAME_PADDING:
            continue
        if kind == FRAME_PING:
            other += payload[start:pos]
        elif kind in (FRAME_ACK, FRAME_ACK_ECN):
            for _ in range(2):  # largest acknowledged, ack delay
                _, pos = _read_varint(payload, pos)
            ranges, pos = _read_varint(payload, pos)
            _, pos = _read_varint(payload, pos)
            for _ in range(2 * ranges + (3 if kind == FRAME_ACK_ECN else 0)):
                _, pos = _read_varint(payload, pos)
            other += payload[start:pos]
        elif kind == FRAME_CRYPTO:
            offset, pos = _read_varint(payload, pos)
            length, pos = _read_varint(payload, pos)
            pieces.append((offset, payload[pos : pos + length]))
            pos += length
        else:
            raise ValueError(f"unexpected frame 0x{kind:x} in an Initial")
    pieces.sort()
    return b"".join(data for _offset, data in pieces), bytes(other)


def seal_initial(
    dcid: bytes,
    scid: bytes,
    payload: bytes,
    *,
    client_dcid: bytes,
    from_client: bool,
    packet_number: int = 0,
    token: bytes = b"",
) -> bytes:
    """One protected Initial packet (2-byte packet number)."""
    length = 2 + len(payload) + 16
    plain_header = (
        bytes((0xC1,))
        + QUIC_V1.to_bytes(4, "big")
        + bytes((len(dcid),))
        + dcid
        + bytes((len(scid),))
        + scid
        + _varint(len(token))
        + token
        + (length | 0x4000).to_bytes(2, "big")
        + packet_number.to_bytes(2, "big")
    )
    crypto = CryptoPair()
    crypto.setup_initial(cid=client_dcid, is_client=from_client, version=QUIC_V1)
    return bytes(crypto.encrypt_packet(plain_header, payload, packet_number))


def client_initials(hello: bytes, dcid: bytes, scid: bytes, token: bytes = b"") -> list[bytes]:
    """Datagrams carrying ``hello`` as a client's first flight (each padded to 1200 bytes)."""
    datagrams = []
    for number, offset in enumerate(range(0, max(len(hello), 1), CRYPTO_PIECE)):
        piece = hello[offset : offset + CRYPTO_PIECE]
        frame = bytes((FRAME_CRYPTO,)) + _varint(offset) + _varint(len(piece)) + piece
        overhead = 1 + 4 + 2 + len(dcid) + len(scid) + len(_varint(len(token))) + len(token)
        padding = max(0, MIN_INITIAL - (overhead + 4 + len(frame) + 16))
        datagrams.append(
            seal_initial(
                dcid,
                scid,
                frame + bytes(padding),
                client_dcid=dcid,
                from_client=True,
                packet_number=number,
                token=token,
            )
        )
    return datagrams


# -- capturing real hellos ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CapturedHello:
    """A real ClientHello and the source connection id its transport parameters name (a
    server checks the two agree, so a case that should get far must keep them together)."""

    hello: bytes
    scid: bytes


def capture_client_hello(engine_name: str) -> CapturedHello:
    """The ClientHello the engine's own client sends in its first flight."""
    engine = load_engine(engine_name)
    config = engine.configuration(Identity.generate(), TransportConfig(), is_client=True)
    quic = engine.connection_class(configuration=config)
    quic.connect(("127.0.0.1", 9), now=0.0)
    datagrams = [data for data, _addr in quic.datagrams_to_send(now=0.0)]
    header = pull_quic_header(Buffer(data=datagrams[0]), host_cid_length=CID_LEN)
    stream = b""
    for datagram in datagrams:
        for initial in open_initials(datagram, header.destination_cid, from_client=True):
            crypto, _other = split_crypto(initial.payload)
            stream += crypto
    return CapturedHello(stream, header.source_cid)


# -- mutations ---------------------------------------------------------------------------


def extension_range(hello: bytes, wanted: int) -> tuple[int, int] | None:
    """Byte range of extension ``wanted``'s data in a Client/ServerHello, if it parses."""
    try:
        pos = 4 + 2 + 32
        pos += 1 + hello[pos]  # session id
        if hello[0] == 1:  # ClientHello: cipher suites, compression methods
            pos += 2 + int.from_bytes(hello[pos : pos + 2], "big")
            pos += 1 + hello[pos]
        else:  # ServerHello: one suite, one method
            pos += 3
        end = pos + 2 + int.from_bytes(hello[pos : pos + 2], "big")
        pos += 2
        while pos + 4 <= min(end, len(hello)):
            kind = int.from_bytes(hello[pos : pos + 2], "big")
            size = int.from_bytes(hello[pos + 2 : pos + 4], "big")
            if kind == wanted:
                return pos + 4, min(pos + 4 + size, len(hello))
            pos += 4 + size
    except IndexError:
        return None
    return None


def mutate(hello: bytes, rng: random.Random, pool: Sequence[bytes]) -> bytes:
    """One hostile variant of ``hello``: flips, truncation, zeroed key share, splices."""
    data = bytearray(hello)
    kind = rng.randrange(6)
    if kind == 0 and data:  # byte flips
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= rng.randint(1, 255)
    elif kind == 1:  # truncation
        del data[rng.randrange(len(data) + 1) :]
    elif kind == 2:  # zeroed key-share range (e.g. the X25519 half of X25519MLKEM768)
        found = extension_range(bytes(data), KEY_SHARE)
        start, end = found if found else (0, len(data))
        if end > start:
            if rng.random() < 0.5 and end - start >= 32:
                data[end - 32 : end] = bytes(32)  # the last share's trailing 32 bytes
            else:
                a = rng.randrange(start, end)
                b = rng.randint(a, end)
                data[a:b] = bytes(b - a)
    elif kind == 3:  # random splice from another hello
        other = rng.choice(pool)
        a = rng.randrange(len(data) + 1)
        b = rng.randrange(len(other) + 1)
        data[a:] = other[b : b + rng.randint(1, 400)] + data[a + rng.randint(0, 64) :]
    elif kind == 4:  # random bytes inserted or overwritten
        a = rng.randrange(len(data) + 1)
        data[a : a + rng.randint(0, 16)] = rng.randbytes(rng.randint(1, 64))
    elif len(data) >= 2:  # a length field set to something else
        a = rng.randrange(len(data) - 1)
        data[a : a + 2] = rng.choice((0, 1, 0xFFFF, rng.randrange(1 << 16))).to_bytes(2, "big")
    return bytes(data)


Mutator = Callable[[bytes, random.Random, Sequence[bytes]], bytes]


# -- fuzz runs ---------------------------------------------------------------------------


@dataclass(slots=True)
class FuzzResult:
    engine: str
    role: str
    seed: int
    cases: int = 0
    seconds: float = 0.0
    deaths: list[str] = field(default_factory=list)
    contained: int = 0
    honest_ok: bool = False
    rss_growth: int = 0

    def describe(self) -> str:
        return (
            f"{self.engine}/{self.role} seed {self.seed}: {self.cases} cases, "
            f"{len(self.deaths)} deaths {self.deaths[:3]}, {self.contained} contained, "
            f"honest client {'connected' if self.honest_ok else 'FAILED'}"
        )


def rss_bytes() -> int:
    """This process's resident set (Linux /proc; psutil is not a dependency)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


async def echo_handler(conn: PeerConnection) -> None:
    """Answer one stream with what it carried, then keep the connection until the peer goes."""
    try:
        stream = await conn.accept_stream()
        data = await stream.receive_some()
        await stream.send_all(data)
        await stream.send_eof()
        await conn.wait_closed()
    except P2pfsError:
        return


async def honest_exchange(client: Any, server_address: tuple[str, int], server: Identity) -> None:
    """Connect, authenticate both ways, echo a few bytes: what a real peer needs to work."""
    conn = await client.connect(server_address, server.node_id)
    stream = await conn.open_stream()
    await stream.send_all(b"honest")
    await stream.send_eof()
    if await stream.receive_some() != b"honest":
        raise AssertionError("honest echo came back wrong")
    await conn.close()


def _udp_socket(host: str = "127.0.0.1") -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MiB)
    return sock


async def fuzz_server_role(
    engine: str,
    cases: int,
    seed: int,
    hellos: Sequence[CapturedHello],
    mutator: Mutator | None = None,
) -> FuzzResult:
    """Mutated ClientHellos at a real server endpoint; then an honest client must connect."""
    result = FuzzResult(engine, "server", seed)
    pool = [captured.hello for captured in hellos]
    server_id = Identity.generate()
    rss_before = rss_bytes()
    start = time.perf_counter()
    try:
        async with open_endpoint(
            server_id, handler=echo_handler, engine=engine, config=FUZZ_CONFIG
        ) as server:
            sock = _udp_socket()
            await sock.bind(("127.0.0.1", 0))
            with sock:
                for case in range(cases):
                    rng = random.Random(f"{seed}:{case}")
                    chosen = rng.choice(hellos)
                    hello = (mutator or mutate)(chosen.hello, rng, pool)
                    for datagram in client_initials(hello, rng.randbytes(CID_LEN), chosen.scid):
                        await sock.sendto(datagram, server.local_address)
                    result.cases += 1
                    if case % 32 == 31:
                        await trio.sleep(0)  # let the endpoint read before the socket fills
            async with open_endpoint(Identity.generate(), engine=engine) as client:
                with trio.fail_after(30):
                    await honest_exchange(client, server.local_address, server_id)
            result.honest_ok = True
            result.contained = server.engine_failures
    except BaseException as exc:
        if is_fatal(exc):
            raise
        result.deaths.append(f"{type(exc).__name__}: {exc}"[:200])
    result.seconds = time.perf_counter() - start
    result.rss_growth = rss_bytes() - rss_before
    return result


class _HostileServer:
    """Answers each client Initial with a real server's response whose ServerHello is mutated."""

    def __init__(self, engine: str, seed: int, pool: list[bytes]) -> None:
        self._engine = load_engine(engine)
        self._config = self._engine.configuration(
            Identity.generate(), TransportConfig(), is_client=False
        )
        self._seed = seed
        self._pool = pool
        self._servers: dict[bytes, Any] = {}
        self._answered: set[bytes] = set()
        self.cases = 0

    async def serve(self, sock: trio.socket.SocketType) -> None:
        while True:
            data, addr = await sock.recvfrom(65535)
            for reply in self._answer(data):
                await sock.sendto(reply, addr)

    def _answer(self, data: bytes) -> list[bytes]:
        header = pull_quic_header(Buffer(data=data), host_cid_length=CID_LEN)
        dcid = header.destination_cid
        if header.packet_type != QuicPacketType.INITIAL or dcid in self._answered:
            return []
        quic = self._servers.get(dcid)
        if quic is None:
            quic = self._engine.connection_class(
                configuration=self._config, original_destination_connection_id=dcid
            )
            self._servers[dcid] = quic
        quic.receive_datagram(data, ("127.0.0.1", 9), now=time.monotonic())
        replies = [reply for reply, _addr in quic.datagrams_to_send(now=time.monotonic())]
        if not replies:
            return []
        first = pull_quic_header(Buffer(data=replies[0]), host_cid_length=CID_LEN)
        opened = open_initials(replies[0][: first.packet_length], dcid, from_client=False)
        server_hello, other = split_crypto(opened[0].payload) if opened else (b"", b"")
        if not server_hello:
            return []  # an ACK of a first ClientHello piece: the rest is still to come
        self._answered.add(dcid)
        del self._servers[dcid]
        rng = random.Random(f"{self._seed}:{self.cases}")
        self.cases += 1
        self._pool.append(server_hello)
        del self._pool[:-16]
        mutated = self._mutated(opened[0], server_hello, other, dcid, rng)
        return [mutated + replies[0][first.packet_length :], *replies[1:]]

    def _mutated(
        self,
        initial: OpenedInitial,
        server_hello: bytes,
        other: bytes,
        client_dcid: bytes,
        rng: random.Random,
    ) -> bytes:
        """The Initial with its ServerHello mutated and sealed again (the coalesced
        Handshake packets after it are sent as they were)."""
        hello = mutate(server_hello, rng, self._pool)
        frame = bytes((FRAME_CRYPTO,)) + _varint(0) + _varint(len(hello)) + hello
        sealed = seal_initial(
            initial.dcid,
            initial.scid,
            other + frame,
            client_dcid=client_dcid,
            from_client=False,
            packet_number=initial.packet_number,
        )
        return sealed


async def fuzz_client_role(engine: str, cases: int, seed: int, batch: int = 32) -> FuzzResult:
    """A real client endpoint dials a server whose ServerHellos are mutated; afterwards it
    must still reach an honest server."""
    result = FuzzResult(engine, "client", seed)
    honest_id = Identity.generate()
    hostile = _HostileServer(engine, seed, [])
    rss_before = rss_bytes()
    start = time.perf_counter()
    sock = _udp_socket()
    try:
        async with (
            open_endpoint(honest_id, handler=echo_handler, engine=engine) as honest,
            open_endpoint(
                Identity.generate(), engine=engine, config=TransportConfig(handshake_timeout=2.0)
            ) as client,
            trio.open_nursery() as nursery,
        ):
            await sock.bind(("127.0.0.1", 0))
            hostile_address = sock.getsockname()
            nursery.start_soon(hostile.serve, sock)
            while hostile.cases < cases:
                wanted = hostile.cases + min(batch, cases - hostile.cases)
                with trio.move_on_after(10):
                    async with trio.open_nursery() as dials:
                        for _ in range(wanted - hostile.cases):
                            dials.start_soon(_dial_quietly, client, hostile_address)
                        while hostile.cases < wanted:
                            await trio.sleep(0.005)
                        # The honest exchange goes through the same socket and loop, so it
                        # completes only after the mutated replies were processed.
                        with trio.fail_after(30):
                            await honest_exchange(client, honest.local_address, honest_id)
                        dials.cancel_scope.cancel()
            result.honest_ok = True
            result.cases = hostile.cases
            result.contained = client.engine_failures
            nursery.cancel_scope.cancel()
    except BaseException as exc:
        if is_fatal(exc):
            raise
        result.deaths.append(f"{type(exc).__name__}: {exc}"[:200])
        result.cases = hostile.cases
    finally:
        sock.close()
    result.seconds = time.perf_counter() - start
    result.rss_growth = rss_bytes() - rss_before
    return result


async def _dial_quietly(client: Any, address: tuple[str, int]) -> None:
    """One connect to the hostile server: failing is the expected outcome."""
    try:
        conn = await client.connect(address, None)
    except P2pfsError:
        return
    await conn.close()


# -- Initial floods ----------------------------------------------------------------------


async def open_flood_sockets(count: int) -> list[trio.socket.SocketType]:
    """UDP sockets on ``count`` distinct loopback addresses (all of 127/8 is loopback)."""
    socks = []
    for n in range(count):
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await sock.bind((f"127.1.{n // 250}.{n % 250 + 1}", 0))
        socks.append(sock)
    return socks


async def flood(
    target: tuple[str, int],
    socks: Sequence[trio.socket.SocketType],
    hello: CapturedHello,
    count: int,
    seed: int,
) -> int:
    """``count`` valid client Initials (each for a new connection id) from many sources;
    answers (Retry, handshake) are never read, as a spoofer would not see them."""
    rng = random.Random(seed)
    sent = 0
    for n in range(count):
        sock = socks[n % len(socks)]
        for datagram in client_initials(hello.hello, rng.randbytes(CID_LEN), hello.scid):
            try:
                await sock.sendto(datagram, target)
            except BlockingIOError:
                continue
        sent += 1
        if n % 64 == 63:
            await trio.sleep(0)
    return sent


async def connect_during_flood(engine: str, initials: int, seed: int) -> tuple[float, int, int]:
    """(honest connect seconds, Initials sent, Retries the server sent) during a flood."""
    server_id = Identity.generate()
    hello = capture_client_hello(engine)
    async with open_endpoint(server_id, handler=echo_handler, engine=engine) as server:
        socks = await open_flood_sockets(250)
        try:
            async with (
                open_endpoint(Identity.generate(), engine=engine) as client,
                trio.open_nursery() as nursery,
            ):
                sent: list[int] = []

                async def run_flood() -> None:
                    sent.append(await flood(server.local_address, socks, hello, initials, seed))

                nursery.start_soon(run_flood)
                await trio.sleep(0.05)  # the flood is under way
                start = time.perf_counter()
                with trio.fail_after(30):
                    await honest_exchange(client, server.local_address, server_id)
                elapsed = time.perf_counter() - start
        finally:
            for sock in socks:
                sock.close()
        return elapsed, sent[0] if sent else 0, server.retries_sent
