"""QUIC engine selection and configuration: the only module that knows qh3 from aioquic.

qh3 is a fork of aioquic with the same sans-I/O ``QuicConnection`` API and a native packet
core; measured on our machines it moves bulk data ~5-8x faster than aioquic, so it is the
default. ``P2PFS_QUIC_ENGINE=aioquic`` selects aioquic (tests run both). The few places where
the two differ (certificate objects, send-buffer introspection, batched receive, Ed25519 in
the client's signature_algorithms) are bridged here so the rest of p2pfs/net is engine-agnostic.

``EngineConnection`` is the typed face of both engines' ``QuicConnection``: the only methods
the adapter calls. Reads of private engine fields live in net/engine_internals.py alone.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

from p2pfs.errors import ConnectionClosedError, LocalProtocolError
from p2pfs.identity import Identity
from p2pfs.net import engine_internals
from p2pfs.net.boundary import is_fatal
from p2pfs.net.pathsize import QUIC_MIN_DATAGRAM

ENGINES = ("qh3", "aioquic")
DEFAULT_ENGINE = "qh3"
ENGINE_ENV = "P2PFS_QUIC_ENGINE"
ALPN = "p2pfs/1"
MiB = 1 << 20
# The largest UDP payload QUIC allows (RFC 9000, 18.2): what every endpoint advertises it
# accepts (its receive buffer holds a whole GRO run of 64 KiB).
RECEIVE_DATAGRAM_LIMIT = 65527


@dataclass(frozen=True, slots=True)
class TransportConfig:
    """Tunables; the defaults are the settings measured best on loopback (issue 3)."""

    # 1350 bytes fits every path with a 1400+ MTU and beat the 1280/1500 settings in our runs.
    # It is the size for any path not known to carry more (net/pathsize.py).
    max_datagram_size: int = 1350
    # Datagrams as big as the link carries to loopback and on-link peers (net/pathsize.py),
    # up to this on loopback: 1 GiB fetched at 258-264 MB/s with 60,000 bytes, 211-245 with
    # 32,000, 166-208 with 16,384, 147 with 1,350 (benchmarks fetch, SPEC "Link-sized
    # datagrams").
    link_sized_datagrams: bool = True
    loopback_datagram_size: int = 60000
    max_data: int = 64 * MiB
    max_stream_data: int = 32 * MiB
    socket_buffer: int = 4 * MiB
    idle_timeout: float = 30.0
    # Handshake + authentication must finish within this, or the connection is dropped.
    handshake_timeout: float = 10.0
    # A writer waits while the stream's not-yet-transmitted bytes exceed this.
    send_buffer_limit: int = 1 * MiB
    # Unread received bytes the adapter holds per stream / per connection before it stops
    # feeding the connection's datagrams to the engine (the engines grant credit on delivery,
    # not on application reads, so this is the receive-side bound).
    stream_receive_limit: int = 16 * MiB
    connection_receive_limit: int = 32 * MiB
    # Pausing intake also stops ACKs, which would deadlock a task that must finish a write
    # on this connection before it reads again (an echo). So while a writer is blocked the
    # adapter keeps reading up to this hard limit, and only beyond it pauses regardless.
    connection_receive_hard_limit: int = 64 * MiB
    # Datagrams parked while a connection's intake is paused; beyond this they are dropped
    # and QUIC's loss recovery resends them once the reader catches up.
    held_datagram_limit: int = 4096
    # ... and their bytes (datagrams up to 64 KiB: 4,096 of them would be 256 MiB).
    held_datagram_bytes: int = 16 * MiB
    # Unauthenticated connections a server keeps at once (handshake flood bound).
    max_pending_connections: int = 256
    # Half-open handshakes from one source IP; beyond this its Initials get a Retry.
    max_pending_per_ip: int = 8
    # From this many half-open handshakes on, an Initial must carry a Retry token (proof
    # that its source address is real) before it gets any state: spoofed floods then cost
    # a header parse and one small Retry each (RFC 9000 8.1.2).
    retry_threshold: int = 64
    # How long a Retry token stays valid (seconds; it only has to survive one round trip).
    retry_token_lifetime: float = 10.0
    # Authenticated incoming connections kept at once, per source IP and in total; beyond
    # these a new one is closed with BUSY (identities cost nothing to make, addresses do).
    max_connections_per_ip: int = 32
    max_connections: int = 1024
    # Datagrams read from the socket per wakeup before the batch is processed.
    receive_batch: int = 256
    # Send runs of equal-size datagrams with one sendmsg (Linux UDP_SEGMENT), if available.
    gso: bool = True
    # Receive coalesced runs of datagrams with one recvmsg (Linux UDP_GRO), if available.
    gro: bool = True
    # qh3's batched receive: much cheaper; the daemon uses it. Off here so that the transport
    # bench's raw-engine reference stays what issue 13's figures were measured against
    # (see Engine.receive for the FIN losses once blamed on it).
    batched_receive: bool = False


class EngineConnection(Protocol):
    """What p2pfs calls on a QUIC engine's connection (qh3's and aioquic's QuicConnection).

    Addresses are the engines' ``NetworkAddress`` (a tuple, typed Any by both); events
    are the engine's own classes, dispatched by type in net/connection.py.
    """

    host_cid: bytes

    def connect(self, addr: Any, now: float) -> None: ...
    def receive_datagram(self, data: bytes, addr: Any, now: float) -> None: ...
    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]: ...
    def get_timer(self) -> float | None: ...
    def handle_timer(self, now: float) -> None: ...
    def next_event(self) -> Any: ...
    def get_next_available_stream_id(self, is_unidirectional: bool = False) -> int: ...
    # aioquic annotates ``data: bytes`` but appends it to a bytearray, so any bytes-like
    # object works; qh3 takes any buffer.
    def send_stream_data(
        self, stream_id: int, data: bytes | memoryview, end_stream: bool = False
    ) -> None: ...
    def reset_stream(self, stream_id: int, error_code: int) -> None: ...
    def stop_stream(self, stream_id: int, error_code: int) -> None: ...
    def send_ping(self, uid: int) -> None: ...
    def close(
        self, error_code: int = 0, frame_type: int | None = None, reason_phrase: str = ""
    ) -> None: ...


if TYPE_CHECKING:
    import aioquic.quic.connection
    import qh3.quic.connection

    def _qh3_conforms(quic: qh3.quic.connection.QuicConnection) -> EngineConnection:
        return quic  # mypy proves qh3 satisfies the protocol

    def _aioquic_conforms(quic: aioquic.quic.connection.QuicConnection) -> EngineConnection:
        # and aioquic, but for one annotation: its send_stream_data says ``data: bytes``
        # while it takes any bytes-like object (tests/test_net_transport.py streams
        # memoryviews through it); this ignore goes when aioquic widens it.
        return quic  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class Engine:
    """One QUIC engine's modules, plus the adapters where its API differs from the other's."""

    name: str
    connection_class: Callable[..., EngineConnection]
    configuration_class: Callable[..., Any]
    events: ModuleType
    packet: ModuleType
    tls: ModuleType
    buffer_class: Callable[..., Any]
    buffer_read_error: type[Exception]
    largest_datagram: int
    """The biggest datagram this engine's connections were measured to carry: qh3 2.1
    65,000; aioquic 1.7 16,384 (its connections failed at 20,000)."""

    def configuration(
        self,
        identity: Identity,
        config: TransportConfig,
        *,
        is_client: bool,
        datagram_size: int | None = None,
    ) -> Any:
        """A QuicConfiguration presenting ``identity``'s Ed25519 certificate, sending
        datagrams of ``datagram_size`` bytes (default: the config's base size)."""
        cfg = self.configuration_class(
            alpn_protocols=[ALPN],
            is_client=is_client,
            max_datagram_size=datagram_size or config.max_datagram_size,
            max_data=config.max_data,
            max_stream_data=config.max_stream_data,
            idle_timeout=config.idle_timeout,
            # Chain validation means nothing for self-signed node keys: the client checks the
            # peer's key against the pinned NodeId after the handshake instead.
            verify_mode=ssl.CERT_NONE,
        )
        cfg.certificate = self.tls.load_pem_x509_certificates(identity.certificate_pem)[0]
        cfg.private_key = self.tls.load_pem_private_key(identity.private_key_pem)
        if is_client and "signature_algorithms" in {f.name for f in dataclasses.fields(cfg)}:
            # qh3 leaves EdDSA out of the client's default list; every p2pfs node key is Ed25519.
            cfg.signature_algorithms = [self.tls.SignatureAlgorithm.ED25519]
        return cfg

    def destination_cid(self, data: bytes, cid_length: int) -> tuple[bytes, bool, int | None]:
        """(destination connection id, is an Initial packet, version) of a datagram.

        Raises ValueError for anything that is not a parsable QUIC header.
        """
        if not data:
            raise ValueError("empty datagram")
        if not data[0] & 0x80:
            # Short header: the fast path for bulk data, no header object allocated.
            if len(data) < 1 + cid_length:
                raise ValueError("short header truncated")
            return data[1 : 1 + cid_length], False, None
        header = self.long_header_untrusted(data, cid_length)
        is_initial = header.packet_type == self.packet.QuicPacketType.INITIAL
        return header.destination_cid, is_initial, header.version

    def long_header_untrusted(self, data: bytes, cid_length: int) -> Any:
        """The engine's QuicHeader of a long-header datagram; ValueError if it does not parse.

        The engine's parser is fed stranger bytes here, so whatever it raises (qh3 raises
        more than its BufferReadError) becomes ValueError, the datagram's only failure.
        """
        try:
            return self.packet.pull_quic_header(
                self.buffer_class(data=data), host_cid_length=cid_length
            )
        except BaseException as exc:
            if is_fatal(exc):
                raise
            raise ValueError(f"unparsable header ({type(exc).__name__})") from None

    def retry_packet(
        self,
        version: int,
        source_cid: bytes,
        destination_cid: bytes,
        original_cid: bytes,
        token: bytes,
    ) -> bytes:
        """A Retry packet (RFC 9000 17.2.5) with its integrity tag, from the engine's encoder."""
        try:
            return bytes(
                self.packet.encode_quic_retry(
                    version=version,
                    source_cid=source_cid,
                    destination_cid=destination_cid,
                    original_destination_cid=original_cid,
                    retry_token=token,
                )
            )
        except BaseException as exc:
            if is_fatal(exc):
                raise
            raise ValueError(f"cannot encode a Retry ({type(exc).__name__})") from None

    def retry_versions(self) -> frozenset[int]:
        """QUIC versions we answer with a Retry (the ones both engines speak)."""
        versions = self.packet.QuicProtocolVersion
        return frozenset(int(v) for v in (versions.VERSION_1, versions.VERSION_2))

    def client_connection(self, configuration: Any, remote: Any, now: float) -> EngineConnection:
        """A client QuicConnection that has sent its first flight to ``remote``.

        Raises ConnectionClosedError if the engine fails (one connection's failure).
        """
        try:
            quic = self.connection_class(configuration=configuration)
            quic.connect(remote, now=now)
        except BaseException as exc:
            if is_fatal(exc):
                raise
            raise ConnectionClosedError(f"QUIC engine failed: {type(exc).__name__}") from None
        return quic

    def server_connection(
        self, configuration: Any, original_cid: bytes, retry_cid: bytes | None
    ) -> EngineConnection:
        """A server QuicConnection for an Initial whose first destination id was
        ``original_cid`` (``retry_cid``: the id our Retry gave, once the address is validated).

        Raises ConnectionClosedError if the engine fails (one connection's failure).
        """
        try:
            return self.connection_class(
                configuration=configuration,
                original_destination_connection_id=original_cid,
                retry_source_connection_id=retry_cid,
            )
        except BaseException as exc:
            if is_fatal(exc):
                raise
            raise ConnectionClosedError(f"QUIC engine failed: {type(exc).__name__}") from None

    def receive(
        self,
        quic: EngineConnection,
        datagrams: list[bytes],
        addr: Any,
        now: float,
        *,
        batched: bool,
    ) -> None:
        """Feed a batch of datagrams from one address to one connection.

        ``batched`` uses qh3's receive_many_datagrams: ~3x less receiver CPU. Early
        measurements blamed it for lost FINs (one bulk echo in ten; 0 of 24 one datagram at
        a time). Session 40 found none in 350 16 MiB echo transfers batched (200 of them
        with the other core busy) nor in 200 one at a time, once the echoed data could not
        start with a control stream's kind byte: random payloads do 2 times in 256, and the
        connection then routes the stream to the control channel, so the echo never sees
        it and the transfer looks like a lost FIN. Whether that was all of it is not known.
        """
        many = getattr(quic, "receive_many_datagrams", None)  # qh3 only
        if batched and many is not None and len(datagrams) > 1:
            many(datagrams, addr, now)
            return
        for data in datagrams:
            quic.receive_datagram(data, addr, now)

    def receive_run(
        self, quic: EngineConnection, buffer: bytes, segment: int, addr: Any, now: float
    ) -> None:
        """Feed a GRO run (datagrams of ``segment`` bytes back to back in ``buffer``) to one
        connection, batched (this is only called with TransportConfig.batched_receive).

        qh3 takes the buffer whole; otherwise it is split and fed as a batch.
        """
        if engine_internals.qh3_fast_receive_run(quic, buffer, segment, addr, now):
            return
        datagrams = [buffer[start : start + segment] for start in range(0, len(buffer), segment)]
        self.receive(quic, datagrams, addr, now, batched=True)

    def datagrams_to_send(self, quic: EngineConnection, now: float) -> list[tuple[bytes, Any]]:
        """What the connection wants sent now."""
        fast = engine_internals.qh3_fast_transmit(quic, now)
        if fast is not None:
            return fast
        return list(quic.datagrams_to_send(now=now))

    def peer_certificate_der(self, quic: EngineConnection) -> bytes | None:
        """The DER certificate the peer presented in the TLS handshake, if any."""
        getter = getattr(quic, "get_peercert", None)
        if getter is not None:  # qh3: its own Certificate type, public_bytes() is DER
            cert = getter()
            return None if cert is None else bytes(cert.public_bytes())
        return engine_internals.aioquic_peer_certificate_der(quic)

    def send_backlog(self, quic: EngineConnection, stream_id: int) -> int:
        """Bytes written to a stream that the engine has not transmitted even once."""
        getter = getattr(quic, "get_send_buffer_size", None)
        if getter is not None:  # qh3
            return int(getter(stream_id))
        return engine_internals.aioquic_send_backlog(quic, stream_id)

    def latest_rtt(self, quic: EngineConnection) -> float | None:
        """The connection's latest RTT sample in seconds; None before the first."""
        return engine_internals.latest_rtt(quic)

    def smoothed_rtt(self, quic: EngineConnection) -> float | None:
        """The connection's smoothed RTT in seconds; None before the first sample."""
        return engine_internals.smoothed_rtt(quic)

    def close_pending(self, quic: EngineConnection) -> Any:
        """The ConnectionTerminated the engine has decided on but not yet emitted, if any."""
        return engine_internals.pending_close(quic)


def load_engine(name: str | None = None) -> Engine:
    """The engine called ``name``, else ``$P2PFS_QUIC_ENGINE``, else qh3."""
    name = name or os.environ.get(ENGINE_ENV) or DEFAULT_ENGINE
    if name not in ENGINES:
        raise LocalProtocolError(f"unknown QUIC engine {name!r} (choose from {', '.join(ENGINES)})")
    connection = importlib.import_module(f"{name}.quic.connection")
    configuration = importlib.import_module(f"{name}.quic.configuration")
    if name == "qh3":
        buffer_module = importlib.import_module("qh3._hazmat")
    else:
        buffer_module = importlib.import_module("aioquic.buffer")
    packet = importlib.import_module(f"{name}.quic.packet")
    tls = importlib.import_module(f"{name}.tls")
    connection_class = connection.QuicConnection
    if name == "qh3":
        connection_class = engine_internals.qh3_connection_class(
            connection_class,
            packet,
            tls,
            buffer_module.Buffer,
            RECEIVE_DATAGRAM_LIMIT,
            QUIC_MIN_DATAGRAM,
        )
    return Engine(
        name=name,
        connection_class=connection_class,
        configuration_class=configuration.QuicConfiguration,
        events=importlib.import_module(f"{name}.quic.events"),
        packet=packet,
        tls=tls,
        buffer_class=buffer_module.Buffer,
        buffer_read_error=buffer_module.BufferReadError,
        largest_datagram=65000 if name == "qh3" else 16384,
    )
