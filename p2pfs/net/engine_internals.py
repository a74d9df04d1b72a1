"""Every read of a QUIC engine's private fields, in one audited place.

Neither qh3 nor aioquic exposes all that the adapter needs. Each function below reaches into
one private field, says why, and degrades to the public API (or a safe answer) when the
field is missing, so an engine upgrade that renames it costs speed or precision, not
correctness. Nothing else in p2pfs may touch a ``_``-prefixed engine attribute; when an
engine grows a public accessor, the reach-in here goes.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding

RECEIVE_MAXIMUM = 65527
"""What a QUIC endpoint that advertises no ``max_udp_payload_size`` accepts (RFC 9000, 18.2)."""


def qh3_fast_transmit(quic: Any, now: float) -> list[tuple[bytes, Any]] | None:
    """qh3 without a qlog: its native core's datagrams, skipping the Python wrapper.

    Reach-in: ``quic._core`` and ``quic._quic_logger`` (qh3). The wrapper parses every
    outgoing packet header for logging even when no logger is set: a third of the sender's
    CPU in the bulk profile. None when this is not such a qh3 connection (the caller then
    uses the public ``datagrams_to_send``).
    """
    core = getattr(quic, "_core", None)
    if core is None or getattr(quic, "_quic_logger", True) is not None:
        return None
    datagrams = []
    poll = core.poll_transmit
    while (transmit := poll(now)) is not None:
        datagrams.append((transmit[0], transmit[1]))
    return datagrams


def qh3_fast_receive_run(quic: Any, buffer: bytes, segment: int, addr: Any, now: float) -> bool:
    """qh3 without a qlog, handshake done: a GRO run straight into the native core.

    Reach-in: ``quic._core``, ``quic._quic_logger``, ``quic._handshake_complete``,
    ``quic._call_core`` and ``quic._drain_core`` (qh3). The public ``receive_gro_buffer``
    does the same but first slices every datagram out of the buffer to log it, even with
    no logger set: an object per datagram, the cost this path exists to avoid. False (the
    caller then takes the public route) when this is not such a connection.
    """
    core = getattr(quic, "_core", None)
    if (
        core is None
        or getattr(quic, "_quic_logger", True) is not None
        or getattr(quic, "_handshake_complete", False) is not True
        or not hasattr(core, "receive_gro_buffer")
        or not hasattr(quic, "_drain_core")
        or not hasattr(quic, "_call_core")
    ):
        return False
    quic._call_core(core.receive_gro_buffer, buffer, segment, addr, now)
    quic._drain_core()
    return True


def aioquic_peer_certificate_der(quic: Any) -> bytes | None:
    """The DER certificate an aioquic connection's peer presented, if any.

    Reach-in: ``quic.tls._peer_certificate`` (aioquic has no public accessor; qh3's public
    ``get_peercert`` is used before this is tried).
    """
    cert = getattr(getattr(quic, "tls", None), "_peer_certificate", None)
    if cert is None:
        return None
    return bytes(cert.public_bytes(Encoding.DER))


def aioquic_send_backlog(quic: Any, stream_id: int) -> int:
    """Bytes written to an aioquic stream that were never transmitted.

    Reach-in: ``quic._streams[id].sender._buffer_stop`` against its public
    ``highest_offset`` (aioquic has no accessor; qh3 has ``get_send_buffer_size``). Without
    it a writer could not be bounded, so a missing field answers 0 (never blocks) rather
    than failing the connection.
    """
    streams = getattr(quic, "_streams", None)
    stream = None if streams is None else streams.get(stream_id)
    if stream is None:
        return 0
    sender = stream.sender
    return max(0, int(getattr(sender, "_buffer_stop", 0)) - int(sender.highest_offset))


def pending_close(quic: Any) -> Any:
    """The ConnectionTerminated an engine has decided on but not emitted yet, if any.

    Reach-in: ``quic._close_event`` (both engines). They emit ConnectionTerminated only
    after the closing/draining period (3 PTO); waiting for it would leave callers blocked
    on a connection that is already gone.
    """
    return getattr(quic, "_close_event", None)


def latest_rtt(quic: Any) -> float | None:
    """The engine's latest round-trip sample in seconds, or None before the first.

    Reach-in: ``quic._core.latest_rtt`` (qh3's native core; its Python wrapper has no
    accessor) or ``quic._loss._rtt_latest`` (aioquic). The swarm reads the smallest of a few
    samples to tell a long path from a short one (swarm/stripes.py); the smoothed RTT would
    not do: it starts from the handshake's samples, which include the key exchange's CPU
    (15 ms measured on loopback). None (unknown) opens no extra connection.
    """
    return _rtt_field(quic, "latest_rtt", "_rtt_latest")


def smoothed_rtt(quic: Any) -> float | None:
    """The engine's smoothed round-trip time in seconds (RFC 9002 5.3), or None before
    the first sample.

    Reach-in: ``quic._core.smoothed_rtt`` (qh3's native core) or
    ``quic._loss._rtt_smoothed`` (aioquic). The liveness probe sizes its patience by it: a
    PING's answer on a 600 ms path with loss takes seconds. None: the fixed floor alone.
    """
    return _rtt_field(quic, "smoothed_rtt", "_rtt_smoothed")


def _rtt_field(quic: Any, qh3_name: str, aioquic_name: str) -> float | None:
    """A round-trip figure in seconds from qh3's native core or aioquic's loss recovery;
    None when missing or not yet sampled (0)."""
    core = getattr(quic, "_core", None)
    if core is not None:
        rtt = getattr(core, qh3_name, None)
    else:
        rtt = getattr(getattr(quic, "_loss", None), aioquic_name, None)
    return float(rtt) if isinstance(rtt, (int, float)) and rtt > 0 else None


def qh3_connection_class(
    base: type,
    packet: ModuleType,
    tls: ModuleType,
    buffer_class: type,
    receive_limit: int,
    smallest_datagram: int,
) -> type:
    """qh3's QuicConnection (``base``; ``packet``, ``tls`` and ``buffer_class``: qh3's own
    modules), advertising in its transport parameters the largest UDP payload it accepts:
    ``receive_limit``, or ``smallest_datagram`` when the connection is configured to send
    datagrams of that size (a path that loses bigger ones: both directions keep to it).

    Reach-in: ``QuicConnection._create_tls`` and ``QuicConnection._configuration`` (qh3),
    and the transport parameters already set in the new TLS context's
    ``handshake_extensions`` (public fields, rewritten before the ClientHello or the
    server's EncryptedExtensions is sent). qh3's client advertises 1,472 bytes whatever it
    can receive, which caps what the server may send to an Ethernet frame even on loopback
    (servers advertise nothing: the QUIC maximum). The endpoint reads up to the QUIC
    maximum, so the advertisement says what is true. If the hook is gone, clients keep
    qh3's 1,472 (big datagrams then flow towards servers only) and a small path's peer is
    not told to keep its datagrams small.
    """
    if not callable(getattr(base, "_create_tls", None)):
        return base

    def advertised(value: bytes, limit: int) -> bytes:
        parameters = packet.pull_quic_transport_parameters(buffer_class(data=value))
        if (parameters.max_udp_payload_size or RECEIVE_MAXIMUM) == limit:
            return value
        parameters.max_udp_payload_size = limit
        buffer = buffer_class(capacity=len(value) + 16)
        packet.push_quic_transport_parameters(buffer, parameters)
        return bytes(buffer.data)

    class Connection(base):  # type: ignore[misc]
        def _create_tls(self, remote_source_cid: bytes | None) -> Any:
            bridge = super()._create_tls(remote_source_cid)
            sending = getattr(getattr(self, "_configuration", None), "max_datagram_size", None)
            limit = smallest_datagram if sending == smallest_datagram else receive_limit
            context: Any = getattr(bridge, "tls", None)
            extensions = getattr(context, "handshake_extensions", None)
            if isinstance(extensions, list):
                context.handshake_extensions = [
                    (kind, advertised(value, limit))
                    if kind == tls.ExtensionType.QUIC_TRANSPORT_PARAMETERS
                    else (kind, value)
                    for kind, value in extensions
                ]
            return bridge

    Connection.__name__ = Connection.__qualname__ = base.__name__
    return Connection
