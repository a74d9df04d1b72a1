"""Control streams: relaying, hole punching and dial-back checks, sans-I/O (protocol/WIRE.md,
"Control streams").

A bidirectional stream whose first byte is a control kind (``RELAY``, ``PUNCH`` or
``DIAL_BACK``) is a
control stream rather than a p2pfs request stream: a request stream starts with a frame
length below 16 MiB + 4096, so its first byte is 0x00 or 0x01 and the two never collide.
The connection routes each new stream by that byte (``PeerConnection.accept_control``).

After the kind byte, both sides send frames ``u16 length (big-endian) | u8 type | body``,
``length`` counting the type and the body (1..MAX_FRAME). Once a CONNECT or INCOMING is
accepted, nothing more is said on the stream: the end-to-end connection's datagrams travel
as relay datagrams (``RELAY_DATAGRAM``, net/tunnel.py) named by the circuit id the relay
chose, and the stream's end is the circuit's end.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

from p2pfs.errors import RemoteProtocolError
from p2pfs.net.auth import address_length_untrusted, decode_address_untrusted, encode_address


class ControlKind(enum.IntEnum):
    RELAY = 0x52  # "R"
    PUNCH = 0x50  # "P"
    DIAL_BACK = 0x44  # "D"


class FrameType(enum.IntEnum):
    REGISTER = 0x01
    CONNECT = 0x02
    INCOMING = 0x03
    ACCEPT = 0x04
    REFUSE = 0x05
    CANDIDATES = 0x06
    # 0x07 carried tunnelled datagrams on the stream before relay datagrams: never reuse.
    DIAL_BACK = 0x08
    PROBED = 0x09


class RefuseCode(enum.IntEnum):
    NOT_A_RELAY = 1
    """This node does not relay (no --relay)."""
    NOT_REGISTERED = 2
    """The target holds no registration with this relay: it is no open proxy."""
    BUSY = 3
    """The client's circuit limit, or the relay's, is reached."""
    UNAVAILABLE = 4
    """The target did not answer, or refused the circuit."""
    UNEXPECTED = 5
    """A request this side does not take here (INCOMING from a node that is not our relay)."""


NODE_ID_LEN = 32
CIRCUIT_LEN = 8
"""A relay circuit's id: random, chosen by the relay, named in every relay datagram."""
RELAY_DATAGRAM = 0x03
"""First byte of a relay datagram on the node's UDP port: ``0x03 | circuit | datagram``
(neither QUIC, whose fixed bit it clears, nor the DHT's 0x00/0x01, nor a punch's 0x02)."""
PROBE_DATAGRAM = 0x05
"""First byte of a dial-back probe on the node's UDP port: ``0x05 | nonce`` (neither QUIC,
the DHT's 0x00/0x01/0x04, a punch's 0x02 nor a relay datagram's 0x03)."""
NONCE_LEN = 16
"""A dial-back's nonce: random, chosen by the node that asks, echoed in the probe."""
MAX_CANDIDATES = 8
MAX_REASON = 200
MAX_FRAME = 1 + 1 + MAX_REASON
"""The longest frame, a REFUSE (a candidate list of 8 IPv6 addresses is 161 bytes)."""
_HEADER = 2


class ControlError(RemoteProtocolError):
    """The peer broke the control-stream rules."""


@dataclass(frozen=True, slots=True)
class Register:
    pass


@dataclass(frozen=True, slots=True)
class Connect:
    target: bytes
    """The NodeId (32 bytes) the client wants a circuit to."""


@dataclass(frozen=True, slots=True)
class Incoming:
    source: bytes
    """The NodeId (32 bytes) of the node asking for a circuit (the relay authenticated it)."""
    circuit: bytes
    """The circuit's id (CIRCUIT_LEN bytes) for the relay datagrams that follow."""


@dataclass(frozen=True, slots=True)
class Accept:
    circuit: bytes = b""
    """Empty, except in the relay's answer to CONNECT: the circuit's id (CIRCUIT_LEN)."""


@dataclass(frozen=True, slots=True)
class Refuse:
    code: RefuseCode
    reason: str


@dataclass(frozen=True, slots=True)
class Candidates:
    addresses: tuple[tuple[str, int], ...]
    """Where the sender may be reached directly: interface and observed addresses."""


@dataclass(frozen=True, slots=True)
class DialBack:
    """Asks the peer to send a probe carrying ``nonce`` to ``port`` at the IP address it
    sees this connection come from (or at ``host``, an IPv6 address in that address's
    /64), from a port of its own that this connection does not use: whether a node
    elsewhere can open a path to us."""

    nonce: bytes
    port: int
    host: str | None = None
    """IPv6 only: our stable address, when the connection comes from a temporary one of
    the same /64 (the kernel's default source) that no peer is told of."""


@dataclass(frozen=True, slots=True)
class Probed:
    """The answer to DIAL_BACK: the probes have left."""


ControlMessage = Register | Connect | Incoming | Accept | Refuse | Candidates | DialBack | Probed


def encode(message: ControlMessage) -> bytes:
    """One frame."""
    if isinstance(message, Register):
        return _frame(FrameType.REGISTER, b"")
    if isinstance(message, Connect):
        return _frame(FrameType.CONNECT, _node_id(message.target))
    if isinstance(message, Incoming):
        return _frame(FrameType.INCOMING, _node_id(message.source) + _circuit(message.circuit))
    if isinstance(message, Accept):
        return _frame(FrameType.ACCEPT, _circuit(message.circuit) if message.circuit else b"")
    if isinstance(message, Refuse):
        reason = message.reason.encode("utf-8")[:MAX_REASON]
        return _frame(FrameType.REFUSE, bytes([message.code]) + reason)
    if isinstance(message, DialBack):
        if not 0 < message.port < 65536:
            raise ValueError(f"port {message.port}")
        host = b"" if message.host is None else ipaddress.IPv6Address(message.host).packed
        body = _nonce(message.nonce) + message.port.to_bytes(2, "big") + host
        return _frame(FrameType.DIAL_BACK, body)
    if isinstance(message, Probed):
        return _frame(FrameType.PROBED, b"")
    addresses = message.addresses[:MAX_CANDIDATES]
    body = bytes([len(addresses)]) + b"".join(encode_address(h, p) for h, p in addresses)
    return _frame(FrameType.CANDIDATES, body)


def relay_datagram(circuit: bytes, datagram: bytes) -> bytes:
    """One end-to-end datagram as it travels through a relay circuit."""
    return bytes([RELAY_DATAGRAM]) + _circuit(circuit) + datagram


def parse_relay_datagram_untrusted(data: bytes) -> tuple[bytes, bytes]:
    """The circuit id and end-to-end datagram of a relay datagram; ControlError if it is
    none (a receiver on the hot path slices the same bytes directly)."""
    if len(data) <= 1 + CIRCUIT_LEN or data[0] != RELAY_DATAGRAM:
        raise ControlError("not a relay datagram")
    return data[1 : 1 + CIRCUIT_LEN], data[1 + CIRCUIT_LEN :]


def probe_datagram(nonce: bytes) -> bytes:
    """The datagram a dial-back sends: ``0x05 | nonce``."""
    return bytes([PROBE_DATAGRAM]) + _nonce(nonce)


def probe_nonce_untrusted(data: bytes) -> bytes | None:
    """The nonce of a dial-back probe; None if ``data`` is none."""
    if len(data) != 1 + NONCE_LEN or data[0] != PROBE_DATAGRAM:
        return None
    return bytes(data[1:])


def _frame(kind: FrameType, body: bytes) -> bytes:
    length = 1 + len(body)
    if length > MAX_FRAME:
        raise ValueError(f"control frame of {length} bytes")
    return length.to_bytes(2, "big") + bytes([kind]) + body


def _node_id(raw: bytes) -> bytes:
    if len(raw) != NODE_ID_LEN:
        raise ValueError("a NodeId is 32 bytes")
    return raw


def _nonce(raw: bytes) -> bytes:
    if len(raw) != NONCE_LEN:
        raise ValueError(f"a dial-back nonce is {NONCE_LEN} bytes")
    return raw


def _circuit(raw: bytes) -> bytes:
    if len(raw) != CIRCUIT_LEN:
        raise ValueError(f"a circuit id is {CIRCUIT_LEN} bytes")
    return raw


class Decoder:
    """Control frames from a byte stream; holds at most one frame's bytes plus one read."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def take_rest(self) -> bytes:
        """The bytes after the last message read (for whoever reads the stream next)."""
        rest = bytes(self._buffer)
        self._buffer.clear()
        return rest

    def next_untrusted(self) -> ControlMessage | None:
        """The next whole message, None if more bytes are needed; ControlError if malformed."""
        buffer = self._buffer
        if len(buffer) < _HEADER:
            return None
        length = int.from_bytes(buffer[:_HEADER], "big")
        if not 1 <= length <= MAX_FRAME:
            raise ControlError(f"control frame length {length}")
        end = _HEADER + length
        if len(buffer) < end:
            return None
        kind = buffer[_HEADER]
        body = bytes(buffer[_HEADER + 1 : end])
        del buffer[:end]
        return parse_untrusted(kind, body)


def parse_untrusted(kind: int, body: bytes) -> ControlMessage:
    """One frame's message from its type byte and body; ControlError if malformed."""
    if kind == FrameType.REGISTER:
        if body:
            raise ControlError("trailing bytes in REGISTER")
        return Register()
    if kind == FrameType.ACCEPT:
        if len(body) not in (0, CIRCUIT_LEN):
            raise ControlError("ACCEPT carries nothing or a circuit id")
        return Accept(body)
    if kind == FrameType.CONNECT:
        if len(body) != NODE_ID_LEN:
            raise ControlError("a NodeId is 32 bytes")
        return Connect(body)
    if kind == FrameType.INCOMING:
        if len(body) != NODE_ID_LEN + CIRCUIT_LEN:
            raise ControlError("INCOMING is a NodeId and a circuit id")
        return Incoming(body[:NODE_ID_LEN], body[NODE_ID_LEN:])
    if kind == FrameType.REFUSE:
        if not body or len(body) > 1 + MAX_REASON:
            raise ControlError("malformed refusal")
        try:
            code = RefuseCode(body[0])
        except ValueError:
            code = RefuseCode.UNAVAILABLE  # a newer peer's reason: still a refusal
        return Refuse(code, body[1:].decode("utf-8", errors="replace"))
    if kind == FrameType.CANDIDATES:
        return Candidates(_candidates_untrusted(body))
    if kind == FrameType.DIAL_BACK:
        if len(body) not in (NONCE_LEN + 2, NONCE_LEN + 2 + 16):
            raise ControlError("DIAL_BACK is a nonce, a port and perhaps an IPv6 address")
        port = int.from_bytes(body[NONCE_LEN : NONCE_LEN + 2], "big")
        if port == 0:
            raise ControlError("DIAL_BACK names port 0")
        extra = body[NONCE_LEN + 2 :]
        host = str(ipaddress.IPv6Address(extra)) if extra else None
        return DialBack(body[:NONCE_LEN], port, host)
    if kind == FrameType.PROBED:
        if body:
            raise ControlError("trailing bytes in PROBED")
        return Probed()
    raise ControlError(f"unknown control frame type {kind:#x}")


def _candidates_untrusted(body: bytes) -> tuple[tuple[str, int], ...]:
    if not body or body[0] > MAX_CANDIDATES:
        raise ControlError("malformed candidate list")
    count, offset = body[0], 1
    found: list[tuple[str, int]] = []
    try:
        for _ in range(count):
            if offset >= len(body):
                raise ControlError("candidate list ends early")
            size = address_length_untrusted(body[offset])
            found.append(decode_address_untrusted(body[offset : offset + size]))
            offset += size
    except RemoteProtocolError as exc:
        raise ControlError(f"malformed candidate: {exc}") from None
    if offset != len(body):
        raise ControlError("trailing bytes after the candidates")
    return tuple(found)


def punchable(host: str) -> bool:
    """Worth sending punch packets to: not loopback, link-local, multicast or unspecified."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return not (
        address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_unspecified
    )
