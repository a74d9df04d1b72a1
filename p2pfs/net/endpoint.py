"""The endpoint: one UDP socket, every connection of a node, demultiplexed by connection id.

Datagrams are read in batches (one wakeup drains the socket), grouped per connection and
fed to its engine together; each connection then transmits once for the whole batch.
Anything that does not parse as QUIC, or names no connection and is no Initial, is logged
at debug and dropped: strangers cannot make the endpoint do more than parse one header.

The socket is the node's one UDP port: a datagram whose first byte lacks QUIC's fixed bit
(0x40, set in every packet both engines send; neither offers RFC 9287's grease_quic_bit, so
no peer may clear it toward us) and whose first byte has a handler registered with
``set_datagram_handler`` goes to that handler before any QUIC parsing (the private DHT's
0x00/0x01, protocol/WIRE.md "One UDP port"); the rest is QUIC's.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from p2pfs.errors import (
    ConnectionClosedError,
    LocalProtocolError,
    P2pfsError,
    RemoteProtocolError,
    StreamResetError,
)
from p2pfs.identity import Identity
from p2pfs.ids import NodeId
from p2pfs.net.admission import Admission, Admit
from p2pfs.net.boundary import describe, split_fatal
from p2pfs.net.codes import CloseCode
from p2pfs.net.connection import TUNNEL_PREFIX, Address, PeerConnection, is_tunnel
from p2pfs.net.control import RELAY_DATAGRAM
from p2pfs.net.engine import Engine, EngineConnection, TransportConfig, load_engine
from p2pfs.net.pathsize import (
    QUIC_MIN_DATAGRAM,
    SMALL_PATH_SECONDS,
    PathSizes,
    is_loopback,
    path_host,
)
from p2pfs.net.recent import RecentDestinations
from p2pfs.net.sockbuf import SocketBuffers, kernel_drops, size_buffers
from p2pfs.net.stream import Stream
from p2pfs.net.tunnel import HEADER_LEN as TUNNEL_HEADER_LEN
from p2pfs.net.tunnel import Tunnel

logger = logging.getLogger(__name__)

Handler = Callable[[PeerConnection], Awaitable[None]]
# Both engines use 8-byte connection ids (QuicConfiguration.connection_id_length default).
CID_LENGTH = 8
MIN_INITIAL_SIZE = 1200
RECEIVE_SIZE = 65535
# Datagrams queued when the socket send buffer is full; beyond this QUIC's loss recovery
# takes over, as it would for a drop anywhere on the path.
SEND_QUEUE_LIMIT = 8192
# UDP generic segmentation offload (Linux >= 4.18): one sendmsg carries up to 64 equal-size
# datagrams, which on loopback cut the sender's syscall cost several-fold.
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
# UDP generic receive offload (Linux >= 5.0): the kernel hands a run of datagrams from one
# sender over in one buffer, with the segment size in a control message; the receiver's
# per-datagram syscall was 20% of its CPU in the bulk profile.
UDP_GRO = getattr(socket, "UDP_GRO", 104)
GRO_BUFFER = 65535
GRO_ANCILLARY = socket.CMSG_SPACE(4)
GSO_MAX_SEGMENTS = 64
SETTLE_BYTES = 1 << 20
"""One connection's GRO runs fed to its engine in a row before its events are handed over
and its ACK sent (the intake limits then see them: overshoot bounded by this)."""
GSO_MAX_BYTES = 65000
SMALL_HANDSHAKE_AFTER = 1.0
"""A handshake that has heard nothing full-sized for this long (no datagram of QUIC's
minimum or more: the server's padded Initial) gets a second one beside it in QUIC's
minimum datagrams (``_race_small``): well over a round trip on any path, and a quarter of
the dialer's patience."""
PATHS_TOO_SMALL_KEPT = 256
"""Hosts remembered as having a path smaller than our datagrams, for logging once each."""
_U16 = struct.Struct("=H")
V4_MAPPED_PREFIX = "::ffff:"
"""How the socket writes an IPv4 peer's address on a dual-stack socket (RFC 4291 2.5.5.2)."""
V4_MAPPED_LENGTH = len(V4_MAPPED_PREFIX)
IPV6_ANY = ipaddress.IPv6Address("::")
IPV4_ANY_HOST = "0.0.0.0"
NO_IPV6_ERRORS = (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT)
PUNCH_PAYLOAD = b"\x02"
"""A punch datagram's one byte: neither QUIC (fixed bit clear) nor the DHT (0x00/0x01), so
a receiver drops it unread (protocol/WIRE.md "One UDP port")."""
QUIC_FIXED_BIT = 0x40
_SHORT_HEADER_MASK = 0xC0
"""Header form and fixed bit: a short-header QUIC packet has them 0 and 1."""
_NOT_SHORT_HEADER = bytes(b & _SHORT_HEADER_MASK != QUIC_FIXED_BIT for b in range(256))
"""A translation table: 1 for a first byte that is not a short-header QUIC packet's."""
DatagramHandler = Callable[[bytes, Address], None]
"""Takes one non-QUIC datagram and its source; runs on the endpoint's receive path, so it
must return at once (hand the datagram over, never process it there) and never raise."""


class Endpoint:
    """A node's QUIC endpoint. Create with :func:`open_endpoint`."""

    def __init__(
        self,
        *,
        identity: Identity,
        sock: socket.socket,
        engine: Engine,
        config: TransportConfig,
        nursery: trio.Nursery,
        handler: Handler | None,
        buffers: SocketBuffers,
    ) -> None:
        self.identity = identity
        self.buffers = buffers
        """The socket's kernel buffers as granted (net/sockbuf.py)."""
        self.engine = engine
        self.config = config
        self._sock = sock
        self._dual_stack = _is_dual_stack(sock)
        """An IPv6 socket that also speaks IPv4 (``::`` bound, IPV6_V6ONLY off): IPv4 peers
        come and go as IPv4-mapped addresses, which only the socket calls see."""
        self._nursery = nursery
        self._handler = handler
        self._configs: dict[tuple[bool, int], Any] = {}
        self._path_sizes = PathSizes(
            config.max_datagram_size,
            min(config.loopback_datagram_size, engine.largest_datagram),
        )
        self._paths_too_small: set[str] = set()
        """Peer hosts a send found the path MTU smaller than our datagrams (logged once)."""
        self._by_cid: dict[bytes, PeerConnection] = {}
        self._connections: set[PeerConnection] = set()
        self._admission: Admission[PeerConnection] = Admission(config, os.urandom(32))
        self._retry_versions = engine.retry_versions()
        self._send_queue: deque[tuple[bytes, Address]] = deque()
        self._tunnels: dict[Address, Tunnel] = {}
        """Relay circuits by their synthetic address (net/tunnel.py)."""
        self._circuits: dict[bytes, Tunnel] = {}
        """The same circuits by their id, for relay datagrams arriving."""
        self._send_wakeup = trio.Event()
        self._foreign: dict[int, DatagramHandler] = {}
        """First byte -> handler for datagrams of another protocol on this socket."""
        self.sent_to = RecentDestinations()
        """Where our port sent lately (dial-back probes from there prove nothing)."""
        self._trio_token = trio.lowlevel.current_trio_token()
        self._closing = False
        self._gso = config.gso and sys.platform == "linux"
        self._gro = False
        if config.gro and sys.platform == "linux":
            try:
                sock.setsockopt(socket.SOL_UDP, UDP_GRO, 1)
                self._gro = True
            except OSError as exc:
                logger.info("UDP GRO unavailable (%s): one datagram per receive call", exc)
        self.datagrams_received = 0
        self.datagrams_sent = 0
        self.datagrams_dropped = 0
        self.bytes_received = 0
        self.bytes_sent = 0
        self.retries_sent = 0
        self.engine_failures = 0

    @property
    def node_id(self) -> NodeId:
        return self.identity.node_id

    def kernel_drops(self) -> int | None:
        """Datagrams the kernel dropped before this endpoint read them (a full receive
        buffer); None where the platform does not say."""
        return kernel_drops(self._sock)

    @property
    def local_address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()[:2]
        return host, port

    @property
    def families(self) -> frozenset[socket.AddressFamily]:
        """The address families this endpoint reaches: both on a dual-stack socket."""
        if self._dual_stack:
            return frozenset((socket.AF_INET, socket.AF_INET6))
        return frozenset((self._sock.family,))

    def speaks(self, host: str) -> bool:
        """Whether this endpoint can send to the IP literal ``host``."""
        return (socket.AF_INET6 if ":" in host else socket.AF_INET) in self.families

    @property
    def connections(self) -> frozenset[PeerConnection]:
        return frozenset(self._connections)

    def set_datagram_handler(self, first_bytes: bytes, handler: DatagramHandler | None) -> None:
        """Route datagrams arriving on the socket (not through relay tunnels) whose first
        byte is one of ``first_bytes`` to ``handler`` instead of QUIC; None removes the
        route. Bytes with QUIC's fixed bit set are refused: they would take QUIC packets."""
        for byte in first_bytes:
            if byte & QUIC_FIXED_BIT:
                raise LocalProtocolError(f"first byte {byte:#04x} has QUIC's fixed bit set")
            if handler is None:
                self._foreign.pop(byte, None)
            else:
                self._foreign[byte] = handler

    def send_threadsafe(self, data: bytes, address: Address) -> None:
        """Send one datagram of another protocol from any thread (the DHT's).

        A direct ``sendto`` on the shared socket: the kernel sends each datagram (and each
        GSO run) whole, so datagrams of two threads never interleave. It may overtake
        QUIC datagrams waiting in the send queue: those keep their own order, and no
        ordering between the two protocols exists to keep. When the socket buffer is full
        the datagram joins that queue through trio (``transmit``), as QUIC's would. The
        endpoint's datagram counters are trio's alone and do not count these."""
        self.sent_to.note(address)
        try:
            self._sock.sendto(data, self._on_socket(address))
        except BlockingIOError:
            with contextlib.suppress(trio.RunFinishedError):
                self._trio_token.run_sync_soon(self._transmit_foreign, data, address)
        except OSError as exc:
            # As for QUIC: unreachable hosts and ICMP errors are the path's loss.
            logger.debug("send to %s failed: %s", address, exc)

    def _transmit_foreign(self, data: bytes, address: Address) -> None:
        if not self._closing:
            self.transmit([(data, address)])

    def warm_up(self) -> None:
        """Pay the engine's one-time costs now (call in a worker thread at start), not in
        the first connection each way: with qh3 2.1 the first X25519+ML-KEM-768 key share
        a process makes takes ~25 ms (~0.04 ms later), paid once by the client's hello and
        once by the server's; a daemon's first fetch spent ~60 ms more connecting than its
        next. A client hello is built for a documentation address (RFC 5737) and dropped:
        nothing is sent, no connection is registered."""
        for is_client in (True, False):
            self._configuration(self.config.max_datagram_size, is_client=is_client)
        configuration = self._configuration(self.config.max_datagram_size, is_client=True)
        quic = self.engine.client_connection(configuration, ("192.0.2.1", 9), 0.0)
        self.engine.datagrams_to_send(quic, 0.0)  # the hello is encoded and discarded
        "warm".encode("idna")  # the codec getaddrinfo loads for a host name (4 ms)

    async def connect(
        self, address: tuple[str, int], expected_peer: NodeId | None
    ) -> PeerConnection:
        """Connect to ``address`` and prove it is ``expected_peer``, or raise.

        ``expected_peer`` None connects unpinned: the peer's NodeId is learnt from its
        certificate (it still proves it holds that key), for callers that verify everything
        they receive against content hashes and need no particular node.

        Raises AuthenticationError if the server's key is not ``expected_peer``'s or it
        rejects ours, ConnectionClosedError if the handshake fails or times out.
        """
        if self._closing:
            raise LocalProtocolError("endpoint is closed")
        family = self._sock.family if len(self.families) == 1 else socket.AF_UNSPEC
        infos = await trio.socket.getaddrinfo(
            address[0], address[1], family=family, type=socket.SOCK_DGRAM
        )
        spoken = [info[4] for info in infos if info[0] in self.families]
        if not spoken:
            raise LocalProtocolError(f"cannot resolve {address[0]!r} to an address we reach")
        remote: Address = spoken[0]
        host = str(remote[0])
        if host.startswith(V4_MAPPED_PREFIX) and "." in host:
            # The peer answers from its plain IPv4 address (unmapped as read): a connection
            # kept at the mapped spelling took every answer for another path, and timed out.
            remote = (host[V4_MAPPED_LENGTH:], remote[1])
        return await self._connect(remote, expected_peer)

    async def connect_tunnel(self, tunnel: Tunnel, expected_peer: NodeId) -> PeerConnection:
        """Connect through ``tunnel`` (a relay circuit) and prove it is ``expected_peer``:
        the same handshake and authentication as on a direct path."""
        if self._closing or tunnel.closed.is_set():
            raise LocalProtocolError("endpoint or tunnel is closed")
        return await self._connect(tunnel.address, expected_peer)

    def open_tunnel(
        self, stream: Stream, circuit: bytes, relay: Callable[[], Address], label: str
    ) -> Tunnel:
        """Carry a new synthetic address's datagrams through the relay circuit ``circuit``
        (accepted on ``stream``; ``relay`` gives the relay's address now) until the stream
        or the tunnel ends; connections on it close with it."""
        if circuit in self._circuits:
            raise LocalProtocolError("the relay named a circuit id already in use")
        tunnel = Tunnel(stream, circuit, relay, label)
        # qh3 hands IPv6 addresses back as 4-tuples (host, port, flowinfo, scope id).
        for key in _tunnel_keys(tunnel):
            self._tunnels[key] = tunnel
        self._circuits[circuit] = tunnel
        self._nursery.start_soon(self._run_tunnel, tunnel)
        return tunnel

    async def _run_tunnel(self, tunnel: Tunnel) -> None:
        try:
            await tunnel.run()
        finally:
            for key in _tunnel_keys(tunnel):
                del self._tunnels[key]
            del self._circuits[tunnel.circuit]
            for conn in list(self._connections):
                if conn.remote_address == tunnel.address:
                    conn.close_nowait(CloseCode.NO_ERROR, "relay circuit ended")

    def datagram_size(self, remote: Address) -> int:
        """How big this node's datagrams to ``remote`` are (net/pathsize.py): the base size
        through a relay tunnel or where link-sized datagrams are off."""
        if remote in self._tunnels:
            return self.config.max_datagram_size
        size = self._path_sizes.datagram_size(path_host(remote))
        if not self.config.link_sized_datagrams:
            # The base size, or less where the kernel knows the path is smaller.
            return min(size, self.config.max_datagram_size)
        return size

    def _configuration(self, size: int, *, is_client: bool) -> Any:
        """The engine configuration for datagrams of ``size`` bytes (one per size)."""
        key = (is_client, size)
        configuration = self._configs.get(key)
        if configuration is None:
            configuration = self.engine.configuration(
                self.identity, self.config, is_client=is_client, datagram_size=key[1]
            )
            self._configs[key] = configuration
        return configuration

    async def _connect(self, remote: Address, expected_peer: NodeId | None) -> PeerConnection:
        now = trio.current_time()
        size = self.datagram_size(remote)
        conn = self._open(remote, expected_peer, size, now)
        try:
            if size <= QUIC_MIN_DATAGRAM or is_loopback(str(remote[0])):
                await conn.wait_authenticated()
                return conn
            with trio.move_on_after(SMALL_HANDSHAKE_AFTER):
                await conn.wait_authenticated()
                return conn
            if conn.largest_datagram_received >= QUIC_MIN_DATAGRAM:
                # The server's padded Initial came: a slow handshake, not a path that drops
                # big datagrams (its small packets may come through one).
                await conn.wait_authenticated()
                return conn
        except BaseException:
            conn.close_nowait(CloseCode.NO_ERROR, "connect abandoned")
            raise
        return await self._race_small(conn, remote, expected_peer)

    def _open(
        self, remote: Address, expected_peer: NodeId | None, size: int, now: float
    ) -> PeerConnection:
        """A client connection to ``remote`` sending datagrams of ``size`` bytes, its first
        flight sent."""
        quic = self.engine.client_connection(self._configuration(size, is_client=True), remote, now)
        conn = self._new_connection(quic, remote, expected_peer, now, True, size)
        self.register_cid(quic.host_cid, conn)
        conn.cids.add(quic.host_cid)
        conn.send_pending()  # the client's first flight
        return conn

    async def _race_small(
        self, first: PeerConnection, remote: Address, expected_peer: NodeId | None
    ) -> PeerConnection:
        """``first``'s handshake has heard nothing full-sized for SMALL_HANDSHAKE_AFTER: its
        Initial or the server's (padded, 1,280 bytes from qh3 at the base size) may be too
        big for a hop of the path, whose ICMP is filtered. A second handshake in QUIC's
        minimum datagrams, which also asks the peer for no bigger ones, runs beside it; the
        first authenticated is kept. A dead peer costs one more Initial and no more time; a
        path that needs the small size is then kept at it (PathSizes.keep_small)."""
        small = self._open(remote, expected_peer, QUIC_MIN_DATAGRAM, trio.current_time())
        winners: list[PeerConnection] = []
        errors: list[P2pfsError] = []

        async def wait(conn: PeerConnection, nursery: trio.Nursery) -> None:
            try:
                await conn.wait_authenticated()
            except P2pfsError as exc:
                errors.append(exc)
                return
            winners.append(conn)
            nursery.cancel_scope.cancel()

        try:
            async with trio.open_nursery() as nursery:
                for conn in (first, small):
                    nursery.start_soon(wait, conn, nursery)
        except BaseException:
            for conn in (first, small):
                conn.close_nowait(CloseCode.NO_ERROR, "connect abandoned")
            raise
        if not winners:
            raise errors[0]
        won = winners[0]
        lost = small if won is first else first
        lost.close_nowait(CloseCode.NO_ERROR, "connect abandoned: the other size answered first")
        if won is small and self._path_sizes.keep_small(path_host(remote)):
            logger.info(
                "%r: only a handshake in %d-byte datagrams was answered; the path to %s "
                "may drop big ones: new connections there use that size for %.0f s",
                won,
                QUIC_MIN_DATAGRAM,
                remote[0],
                SMALL_PATH_SECONDS,
            )
        return won

    def _on_socket(self, address: Address) -> Address:
        """``address`` as the socket takes it: an IPv4 one mapped on a dual-stack socket."""
        if self._dual_stack and ":" not in address[0]:
            return _v4_mapped(address)
        return address

    # -- EndpointHooks --------------------------------------------------------------------

    def transmit(self, datagrams: list[tuple[bytes, Address]]) -> None:
        if not datagrams:
            return
        # A connection's datagrams share its address: one tunnel check for the call, when
        # no circuit is open (a relayed connection's last CONNECTION_CLOSE, its circuit
        # gone, went to the socket as ("100::1", 1, 0, 0), the engine's form of a tunnel
        # address, and failed its engine with TypeError on an IPv4 socket).
        if self._tunnels or is_tunnel(datagrams[0][1]):
            datagrams = self._tunnel_out(datagrams)
            if not datagrams:
                return
        if self._send_queue:
            self._queue(datagrams, 0)
            return
        sock = self._sock
        dual_stack = self._dual_stack
        note, now = self.sent_to.note, time.monotonic()  # the DHT thread's clock too
        count = len(datagrams)
        i = 0
        while i < count:
            data, addr = datagrams[i]
            end, size = self._gso_run(datagrams, i) if self._gso else (i + 1, len(data))
            note(addr, now)
            target = _v4_mapped(addr) if dual_stack and ":" not in addr[0] else addr
            try:
                if end - i == 1:
                    sock.sendto(data, target)
                else:
                    # The datagrams as the message's buffers (the kernel gathers them):
                    # joining them first copied every byte sent once more.
                    segment = [(socket.SOL_UDP, UDP_SEGMENT, _U16.pack(len(data)))]
                    sock.sendmsg([d for d, _ in datagrams[i:end]], segment, 0, target)
            except BlockingIOError:
                self._queue(datagrams, i)
                return
            except OSError as exc:
                if end - i > 1 and exc.errno == errno.EMSGSIZE:
                    self._too_big_for_path(datagrams[i:end], addr)
                    i = end
                    continue
                if end - i > 1 and exc.errno in (errno.EIO, errno.EINVAL, errno.EOPNOTSUPP):
                    logger.info("UDP GSO unavailable (%s), sending datagrams one by one", exc)
                    self._gso = False
                    continue
                # ICMP errors surfacing on the socket, unreachable hosts: UDP's loss, for
                # QUIC to recover from or time out on.
                logger.debug("send to %s failed: %s", addr, exc)
                i = end
                continue
            self.datagrams_sent += end - i
            self.bytes_sent += size
            i = end

    def _too_big_for_path(self, run: list[tuple[bytes, Address]], addr: Address) -> None:
        """A GSO run whose datagrams exceed the MTU the kernel knows for ``addr``'s route (an
        interface or a learnt path MTU smaller than the size chosen): the kernel refuses the
        whole send, each time, so the connection would lose every full datagram. Sent one
        by one, the kernel fragments them; the next connection there is sized to fit."""
        host = path_host(addr)
        if host not in self._paths_too_small:
            logger.info(
                "datagrams of %d bytes exceed the path MTU to %s: sent as IP fragments; "
                "new connections there use smaller ones",
                len(run[0][0]),
                host,
            )
            if len(self._paths_too_small) >= PATHS_TOO_SMALL_KEPT:
                self._paths_too_small.clear()
            self._paths_too_small.add(host)
        self._path_sizes.forget(host)
        sock = self._sock
        target = self._on_socket(addr)
        for data, _addr in run:
            try:
                sock.sendto(data, target)
            except BlockingIOError:
                return  # the socket buffer is full: the rest are lost, for QUIC to resend
            except OSError as exc:
                logger.debug("send to %s failed: %s", addr, exc)
                return
            self.datagrams_sent += 1
            self.bytes_sent += len(data)

    def _tunnel_out(self, datagrams: list[tuple[bytes, Address]]) -> list[tuple[bytes, Address]]:
        """Datagrams for tunnel addresses become relay datagrams to their relay (still in
        runs of one size to one address, so GSO carries them as it does direct ones); those
        for a circuit that is gone are lost with it."""
        tunnels = self._tunnels
        sent = []
        for item in datagrams:
            tunnel = tunnels.get(item[1])
            if tunnel is None:
                if not is_tunnel(item[1]):
                    sent.append(item)
            elif not tunnel.closed.is_set():
                sent.append(tunnel.wrap(item[0]))
        return sent

    @staticmethod
    def _gso_run(datagrams: list[tuple[bytes, Address]], start: int) -> tuple[int, int]:
        """End of the run from ``start`` that one GSO send can carry (same address, same
        size, the last may be shorter, within the kernel's segment and byte limits), and
        its bytes."""
        data, addr = datagrams[start]
        size = len(data)
        total = size
        end = start + 1
        limit = min(len(datagrams), start + GSO_MAX_SEGMENTS)
        while end < limit:
            next_data, next_addr = datagrams[end]
            length = len(next_data)
            if next_addr != addr or length > size or total + length > GSO_MAX_BYTES:
                break
            total += length
            end += 1
            if length < size:
                break
        return end, total

    def send_punch(self, addresses: list[tuple[str, int]], ttl: int | None) -> None:
        """One tiny datagram to each address with a short ``ttl``, to open our own NAT's
        mapping toward it (hole punching) without reaching the far NAT: a datagram that
        arrives there before the far side's own packet leaves makes Linux conntrack record
        an inbound flow, and masquerade then gives the far side's packet another port.
        ``ttl`` None: the system's hop limit (once the far side's packet has left).
        Receivers that do get one drop it unread (it parses as no QUIC packet)."""
        for address in addresses:
            if not self.speaks(address[0]):
                continue
            self.sent_to.note(address)
            # A hop limit, per destination's family: on a dual-stack socket the kernel
            # takes an IPv4 destination's IP_TTL and ignores IPV6_HOPLIMIT (measured).
            level, option = (
                (socket.IPPROTO_IPV6, socket.IPV6_HOPLIMIT)
                if ":" in address[0]
                else (socket.IPPROTO_IP, socket.IP_TTL)
            )
            ancillary = [] if ttl is None else [(level, option, struct.pack("=i", ttl))]
            try:
                self._sock.sendmsg([PUNCH_PAYLOAD], ancillary, 0, self._on_socket(address))
            except OSError as exc:
                logger.debug("punch to %s failed: %s", address, exc)
            else:
                self.datagrams_sent += 1

    def register_cid(self, cid: bytes, conn: PeerConnection) -> None:
        self._by_cid[cid] = conn

    def unregister_cid(self, cid: bytes) -> None:
        self._by_cid.pop(cid, None)

    @property
    def pending_handshakes(self) -> int:
        """Incoming connections still in their handshake or authentication."""
        return self._admission.pending

    def connection_ready(self, conn: PeerConnection) -> None:
        if not self._admission.authenticated(conn, str(conn.remote_address[0])):
            logger.info("%r: closing: too many connections from its address or in total", conn)
            conn.close_nowait(CloseCode.BUSY, "too many connections")
            return
        if self._handler is None:
            conn.close_nowait(CloseCode.NO_ERROR, "not accepting connections")
            return
        self._nursery.start_soon(self._run_handler, self._handler, conn)

    def engine_failed(self, conn: PeerConnection) -> None:
        self.engine_failures += 1

    def keep_path_small(self, host: str) -> None:
        """New connections to ``host`` use QUIC's minimum datagram size both ways for a
        while (a data-plane worker told so by the daemon: pathsize.PathSizes.keep_small)."""
        self._path_sizes.keep_small(host)

    def path_kept_small(self, remote: Address) -> bool:
        """Whether new connections to ``remote`` keep to QUIC's minimum datagram size."""
        return not is_tunnel(remote) and self.datagram_size(remote) <= QUIC_MIN_DATAGRAM

    def peer_stalled(self, conn: PeerConnection) -> None:
        """A peer stalled having sent nothing as big as the base size: on a path with a hop
        smaller than the datagrams (a tunnel, PPPoE inside a VPN) whose ICMP "fragmentation
        needed" is filtered, big datagrams vanish while the handshake, ACKs, PINGs and short
        answers pass, and every transfer stalls (RFC 8899's black hole; qh3 probes nothing
        for a server). The next connections there keep to QUIC's minimum both ways.
        A peer that really stopped costs its path that size for a while, nothing more."""
        host = path_host(conn.remote_address)
        if is_tunnel(conn.remote_address) or conn.datagram_size <= QUIC_MIN_DATAGRAM:
            return
        if conn.largest_datagram_received >= self.config.max_datagram_size:
            return  # big datagrams came through: the peer, not the path
        if self._path_sizes.keep_small(host):
            logger.info(
                "%r stalled with no datagram from it over %d bytes: the path to %s may drop "
                "big ones; new connections there use %d-byte datagrams for %.0f s",
                conn,
                conn.largest_datagram_received,
                host,
                QUIC_MIN_DATAGRAM,
                SMALL_PATH_SECONDS,
            )

    def connection_finished(self, conn: PeerConnection) -> None:
        for cid in conn.cids:
            if self._by_cid.get(cid) is conn:
                del self._by_cid[cid]
        self._connections.discard(conn)
        self._admission.finished(conn)
        tunnel = self._tunnels.get(conn.remote_address)
        if tunnel is not None:
            tunnel.close()  # a circuit carries one connection

    # -- internals ------------------------------------------------------------------------

    def _new_connection(
        self,
        quic: EngineConnection,
        remote: Address,
        expected_peer: NodeId | None,
        now: float,
        is_client: bool,
        datagram_size: int,
    ) -> PeerConnection:
        conn = PeerConnection(
            hooks=self,
            quic=quic,
            engine=self.engine,
            config=self.config,
            identity=self.identity,
            remote_address=remote,
            expected_peer=expected_peer,
            now=now,
            is_client=is_client,
            datagram_size=datagram_size,
        )
        self._connections.add(conn)
        self._nursery.start_soon(conn.run_timer)
        return conn

    def _accept(self, data: bytes, dcid: bytes, addr: Address, now: float) -> PeerConnection | None:
        """A server connection for a new Initial, a stateless Retry, or nothing."""
        if self._handler is None or self._closing:
            return None
        try:
            header = self.engine.long_header_untrusted(data, CID_LENGTH)
        except ValueError:
            return None
        original, validated = self._validate_token(header.token, addr, dcid, now)
        ip = str(addr[0])
        decision = self._admission.initial(ip, validated)
        if decision is Admit.RETRY:
            self._send_retry(header, dcid, addr, now)
            return None
        if decision is Admit.DROP:
            logger.debug("dropping Initial from %s: too many handshakes in progress", addr)
            return None
        if self._admission.pending >= self.config.max_pending_connections:
            victim = self._admission.oldest_unvalidated()
            if victim is not None:
                self._admission.pending_over(victim)
                victim.close_nowait(CloseCode.TIMEOUT, "evicted by a validated handshake")
        size = self.datagram_size(addr)
        try:
            quic = self.engine.server_connection(
                self._configuration(size, is_client=False), original, dcid if validated else None
            )
        except ConnectionClosedError as exc:
            self.engine_failures += 1
            logger.warning("Initial from %s:%s dropped: %s", addr[0], addr[1], exc)
            return None
        conn = self._new_connection(quic, addr, None, now, False, size)
        self._admission.add_pending(conn, ip, validated)
        for cid in (dcid, quic.host_cid):
            conn.cids.add(cid)
            self.register_cid(cid, conn)
        logger.debug("new connection from %s (address validated: %s)", addr, validated)
        return conn

    def _validate_token(
        self, token: bytes, addr: Address, dcid: bytes, now: float
    ) -> tuple[bytes, bool]:
        """(the client's original destination id, whether a Retry token proved its address)."""
        if not token:
            return dcid, False
        try:
            original = self._admission.original_cid_untrusted(
                bytes(token), (str(addr[0]), int(addr[1])), dcid, now
            )
        except RemoteProtocolError as exc:
            logger.debug("Initial from %s with an unusable token: %s", addr, exc)
            return dcid, False
        return original, True

    def _send_retry(self, header: Any, dcid: bytes, addr: Address, now: float) -> None:
        if header.version not in self._retry_versions:
            return
        retry_cid = os.urandom(CID_LENGTH)
        token = self._admission.issue_token((str(addr[0]), int(addr[1])), dcid, retry_cid, now)
        try:
            packet = self.engine.retry_packet(
                header.version, retry_cid, bytes(header.source_cid), dcid, token
            )
        except ValueError as exc:
            logger.debug("no Retry for %s: %s", addr, exc)
            return
        self.retries_sent += 1
        self.transmit([(packet, addr)])

    def _dispatch(self, batch: list[tuple[bytes, Address]], now: float) -> None:
        groups: dict[tuple[PeerConnection, Address], list[bytes]] = {}
        by_cid = self._by_cid
        for data, addr in batch:
            try:
                dcid, is_initial, _version = self.engine.destination_cid(data, CID_LENGTH)
            except ValueError as exc:
                self.datagrams_dropped += 1
                logger.debug("dropping %d-byte datagram from %s: %s", len(data), addr, exc)
                continue
            conn = by_cid.get(dcid)
            if conn is None:
                if is_initial and len(data) >= MIN_INITIAL_SIZE:
                    conn = self._accept(data, dcid, addr, now)
                if conn is None:
                    self.datagrams_dropped += 1
                    logger.debug("dropping datagram from %s for unknown connection", addr)
                    continue
            group = groups.get((conn, addr))
            if group is None:
                groups[(conn, addr)] = [data]
            else:
                group.append(data)
        for (conn, addr), datagrams in groups.items():
            conn.datagrams_received(datagrams, addr, now)

    async def _receive_loop(self) -> None:
        sock = self._sock
        while True:
            await trio.lowlevel.wait_readable(sock)
            received, runs = self._read_available()
            now = trio.current_time()
            self.sent_to.refresh({addr for _data, addr, _segment in received})
            if not runs:
                self._deliver([(data, addr) for data, addr, _segment in received], now)
                continue
            # Arrival order is kept: with the runs handed over first, qh3 lost stream data
            # (tests/test_net_transport.py's 64 concurrent streams stalled every time).
            batch: list[tuple[bytes, Address]] = []
            # One connection's runs in a row are settled once (events, one ACK sent, the
            # timer), up to SETTLE_BYTES: settled per run, the receiver sent an ACK per run.
            unsettled: PeerConnection | None = None
            unsettled_bytes = 0
            for data, addr, segment in received:
                if not segment:
                    batch.append((data, addr))
                    continue
                conn = self._whole_run_owner(data, segment)
                if conn is None:
                    # GRO coalesced a run of datagrams that is not one connection's
                    # short-header packets: split it again.
                    batch.extend(
                        (data[start : start + segment], addr)
                        for start in range(0, len(data), segment)
                    )
                    continue
                if unsettled is not None and (batch or unsettled is not conn):
                    unsettled.settle()
                    unsettled, unsettled_bytes = None, 0
                if batch:
                    self._deliver(batch, now)
                    batch = []
                unsettled_bytes += len(data)
                if unsettled_bytes < SETTLE_BYTES:
                    conn.gro_received(data, segment, addr, now, settle=False)
                    unsettled = conn
                else:
                    conn.gro_received(data, segment, addr, now)
                    unsettled, unsettled_bytes = None, 0
            if unsettled is not None:
                unsettled.settle()
            if batch:
                self._deliver(batch, now)

    def _read_available(self) -> tuple[list[tuple[bytes, Address, int]], bool]:
        """Up to receive_batch datagrams from the socket: (datagram or GRO run, address, GRO
        segment size or 0) in arrival order, and whether any is a GRO run."""
        sock = self._sock
        limit = self.config.receive_batch
        gro = self._gro
        dual_stack = self._dual_stack
        v6 = sock.family == socket.AF_INET6
        received: list[tuple[bytes, Address, int]] = []
        runs = False
        count = 0  # datagrams, a GRO run counting as the datagrams it holds
        while count < limit:
            try:
                if gro:
                    data, ancillary, _flags, addr = sock.recvmsg(GRO_BUFFER, GRO_ANCILLARY)
                else:
                    data, addr = sock.recvfrom(RECEIVE_SIZE)
                    ancillary = []
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in (errno.EBADF, errno.ENOTSOCK):
                    raise
                logger.debug("receive: %s", exc)
                continue
            self.bytes_received += len(data)
            if v6:
                host = addr[0]
                if host.startswith(TUNNEL_PREFIX):
                    # Relay circuits' synthetic addresses (net/tunnel.py), spoofed: taken
                    # for a circuit's, its Initial's answers went into that circuit and its
                    # end closed it. No real packet comes from this discard-only prefix.
                    continue
                if dual_stack and host.startswith(V4_MAPPED_PREFIX):
                    addr = (host[V4_MAPPED_LENGTH:], addr[1])
            segment = _gro_segment_size(ancillary)
            if segment and segment < len(data):
                received.append((data, addr, segment))
                count += -(-len(data) // segment)
                runs = True
            else:
                received.append((data, addr, 0))
                count += 1
        self.datagrams_received += count
        return received, runs

    def _deliver(self, batch: list[tuple[bytes, Address]], now: float) -> None:
        if self._foreign or self._circuits:
            batch = self._take_foreign(batch)
        if batch:
            self._dispatch(batch, now)

    def _whole_run_owner(self, data: bytes, segment: int) -> PeerConnection | None:
        """The connection a GRO run (datagrams from one sender, coalesced by the kernel) can
        be handed to whole: every datagram in it a short-header QUIC packet with the same
        connection id, as in any bulk transfer. Whole, its datagrams are never split into
        separate objects (per datagram, that was most of the receiver's own Python work).
        None for anything else."""
        dcid = one_connection_run(data, segment)
        return None if dcid is None else self._by_cid.get(dcid)

    def _take_foreign(self, batch: list[tuple[bytes, Address]]) -> list[tuple[bytes, Address]]:
        """Hand datagrams of other protocols to their handlers; return QUIC's (and junk,
        which ``_dispatch`` drops). A first byte is tested before anything else is read."""
        handlers = self._foreign
        circuits = self._circuits
        kept = []
        for item in batch:
            data = item[0]
            if data and not data[0] & QUIC_FIXED_BIT:
                if data[0] == RELAY_DATAGRAM and circuits:
                    tunnel = circuits.get(data[1:TUNNEL_HEADER_LEN])
                    if tunnel is not None and tunnel.from_relay(item[1]):
                        tunnel.bytes_received += len(data) - TUNNEL_HEADER_LEN
                        kept.append((data[TUNNEL_HEADER_LEN:], tunnel.address))
                        continue
                handler = handlers.get(data[0])
                if handler is not None:
                    handler(data, item[1])
                    continue
            kept.append(item)
        return kept

    async def _send_loop(self) -> None:
        sock = self._sock
        while True:
            await self._send_wakeup.wait()
            self._send_wakeup = trio.Event()
            while self._send_queue:
                await trio.lowlevel.wait_writable(sock)
                self._flush_queue()

    def _queue(self, datagrams: list[tuple[bytes, Address]], start: int) -> None:
        room = SEND_QUEUE_LIMIT - len(self._send_queue)
        chunk = datagrams[start : start + max(room, 0)]
        now = time.monotonic()
        for _data, address in chunk:  # noted as they are queued: they leave in order
            self.sent_to.note(address, now)
        self._send_queue.extend(chunk)
        self.datagrams_dropped += len(datagrams) - start - len(chunk)
        self._send_wakeup.set()

    def _flush_queue(self) -> None:
        queue = self._send_queue
        sock = self._sock
        now = time.monotonic()
        while queue:
            data, addr = queue[0]
            try:
                sock.sendto(data, self._on_socket(addr))
            except BlockingIOError:
                return
            except OSError as exc:
                logger.debug("sendto %s failed: %s", addr, exc)
            else:
                self.sent_to.note(addr, now)  # again as it leaves: noted first when queued
                self.datagrams_sent += 1
                self.bytes_sent += len(data)
            queue.popleft()

    def _shutdown(self) -> None:
        """Close every connection; their CONNECTION_CLOSE goes out before this returns."""
        self._closing = True
        for conn in list(self._connections):
            conn.close_nowait(CloseCode.SHUTDOWN, "endpoint shutting down")
        self._flush_queue()

    async def _run_handler(self, handler: Handler, conn: PeerConnection) -> None:
        """A connection's handler is a failure boundary (GUIDE rule 12): whatever it raises,
        bare or inside a nursery's ExceptionGroup, ends this connection alone; only
        cancellation reaches the endpoint's nursery."""
        try:
            await handler(conn)
        except BaseException as exc:
            fatal, failure = split_fatal(exc)
            if failure is not None:
                self._handler_failed(conn, failure)
            if fatal is exc:
                raise
            if fatal is not None:
                raise fatal from None
        finally:
            # The handler owns the connection: when it returns, the connection ends.
            conn.close_nowait(CloseCode.NO_ERROR, "done")

    def _handler_failed(self, conn: PeerConnection, failure: BaseException) -> None:
        """One log line and the right close code for a handler's failure."""
        leaf = failure
        while isinstance(leaf, BaseExceptionGroup):
            leaf = leaf.exceptions[0]
        if isinstance(leaf, ConnectionClosedError | StreamResetError):
            logger.debug("%r: handler ended: %s", conn, leaf)
        elif isinstance(leaf, RemoteProtocolError):
            logger.info("%r: peer broke the protocol: %s", conn, leaf)
            conn.close_nowait(CloseCode.PROTOCOL_ERROR, str(leaf)[:100])
        else:
            logger.error("%r: connection handler failed: %s", conn, describe(failure))
            logger.debug("%r: handler failure", conn, exc_info=failure)
            conn.close_nowait(CloseCode.INTERNAL, "internal error")


@asynccontextmanager
async def open_endpoint(
    identity: Identity,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    handler: Handler | None = None,
    config: TransportConfig | None = None,
    engine: Engine | str | None = None,
) -> AsyncIterator[Endpoint]:
    """Bind a UDP socket and run an endpoint on it until the block exits.

    ``handler(conn)`` runs for every incoming connection once the client is authenticated
    (none: outgoing connections only); the connection is closed when it returns. Leaving
    the block closes every connection (CONNECTION_CLOSE sent) and the socket.
    """
    config = config or TransportConfig()
    if not isinstance(engine, Engine):
        engine = load_engine(engine)
    sock = bind_udp(host, port)
    try:
        sock.setblocking(False)
        buffers = size_buffers(sock, config.socket_buffer)
        if buffers.short:
            logger.warning("%s", buffers.advice())
        async with trio.open_nursery() as nursery:
            endpoint = Endpoint(
                identity=identity,
                sock=sock,
                engine=engine,
                config=config,
                nursery=nursery,
                handler=handler,
                buffers=buffers,
            )
            nursery.start_soon(endpoint._receive_loop)
            nursery.start_soon(endpoint._send_loop)
            logger.debug("endpoint %s on %s (%s)", identity.node_id.short(), host, engine.name)
            try:
                yield endpoint
            finally:
                endpoint._shutdown()
                nursery.cancel_scope.cancel()
    finally:
        sock.close()


def bind_udp(host: str, port: int) -> socket.socket:
    """A UDP socket bound to ``host:port``. ``::`` is both families on one socket (IPv4
    peers as mapped addresses, IPV6_V6ONLY off whatever the system's default); where the
    host has no IPv6 it is IPv4's wildcard instead, said in the log."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    dual_stack = is_ipv6_wildcard(host)
    try:
        sock = socket.socket(family, socket.SOCK_DGRAM)
    except OSError as exc:
        if not dual_stack:
            raise
        logger.info("no IPv6 here (%s): listening on IPv4 only", exc)
        return bind_udp(IPV4_ANY_HOST, port)
    try:
        if dual_stack:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if not dual_stack or exc.errno not in NO_IPV6_ERRORS:
            raise
        logger.info("cannot listen on IPv6 (%s): listening on IPv4 only", exc)
        return bind_udp(IPV4_ANY_HOST, port)
    return sock


def is_ipv6_wildcard(host: str) -> bool:
    """``::`` however it is written (``0::``, ``::0``): both families, on one socket."""
    try:
        return ipaddress.ip_address(host) == IPV6_ANY
    except ValueError:
        return False


def one_connection_run(data: bytes, segment: int) -> bytes | None:
    """The destination connection id shared by every datagram of a GRO run of ``segment``
    bytes each (the last may be shorter), if each is a short-header QUIC packet; else None.

    Datagrams of other protocols (relay, DHT, punches) never have the fixed bit, so a run
    that passes holds only QUIC. Checked with strided slices, a few C calls a run: a test
    per datagram in Python was 0.35 CPU-s per GiB of the receiver at 1,350-byte datagrams
    (py-spy)."""
    if not data or 1 in data[::segment].translate(_NOT_SHORT_HEADER):
        return None
    dcid = data[1 : 1 + CID_LENGTH]
    if len(dcid) < CID_LENGTH:
        return None
    count = -(-len(data) // segment)
    for offset in range(CID_LENGTH):
        # A datagram too short to hold the id makes its slice shorter: no match.
        if data[1 + offset :: segment] != dcid[offset : offset + 1] * count:
            return None
    return dcid


def _v4_mapped(address: Address) -> Address:
    return (V4_MAPPED_PREFIX + address[0], address[1])


def _is_dual_stack(sock: socket.socket) -> bool:
    if sock.family != socket.AF_INET6:
        return False
    if sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY):
        return False
    return ipaddress.ip_address(sock.getsockname()[0]).is_unspecified


def _tunnel_keys(tunnel: Tunnel) -> tuple[Address, Address]:
    return tunnel.address, (*tunnel.address, 0, 0)


def _gro_segment_size(ancillary: list[tuple[int, int, bytes]]) -> int:
    """The GRO segment size from recvmsg's control messages (0: one plain datagram)."""
    for level, kind, payload in ancillary:
        if level == socket.SOL_UDP and kind == UDP_GRO and len(payload) >= 4:
            return int.from_bytes(payload[:4], sys.byteorder)
        if level == socket.SOL_UDP and kind == UDP_GRO and len(payload) >= 2:
            return int.from_bytes(payload[:2], sys.byteorder)
    return 0
