"""Control streams: relaying and hole punching, sans-I/O (protocol/WIRE.md, "Relays").

A bidirectional stream whose first byte is a control kind (``RELAY`` or ``PUNCH``) is a
control stream rather than a p2pfs request stream: a request stream starts with a frame
length below 16 MiB + 4096, so its first byte is 0x00 or 0x01 and the two never collide.
The connection routes each new stream by that byte (``PeerConnection.accept_control``).

After the kind byte, both sides send frames ``u16 length (big-endian) | u8 type | body``,
``length`` counting the type and the body (1..MAX_FRAME). Once a CONNECT or INCOMING is
accepted, the stream carries DATA frames only: each one QUIC datagram of the end-to-end
connection (the relay copies those bytes without reading them).
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


class FrameType(enum.IntEnum):
    REGISTER = 0x01
    CONNECT = 0x02
    INCOMING = 0x03
    ACCEPT = 0x04
    REFUSE = 0x05
    CANDIDATES = 0x06
    DATA = 0x07


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
MAX_DATAGRAM = 2048
"""Largest end-to-end datagram carried (QUIC here sends at most 1350 bytes)."""
MAX_FRAME = 1 + MAX_DATAGRAM
MAX_CANDIDATES = 8
MAX_REASON = 200
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


@dataclass(frozen=True, slots=True)
class Accept:
    pass


@dataclass(frozen=True, slots=True)
class Refuse:
    code: RefuseCode
    reason: str


@dataclass(frozen=True, slots=True)
class Candidates:
    addresses: tuple[tuple[str, int], ...]
    """Where the sender may be reached directly: interface and observed addresses."""


@dataclass(frozen=True, slots=True)
class Data:
    datagram: bytes


ControlMessage = Register | Connect | Incoming | Accept | Refuse | Candidates | Data


def encode(message: ControlMessage) -> bytes:
    """One frame."""
    if isinstance(message, Data):
        return _frame(FrameType.DATA, message.datagram)
    if isinstance(message, Register):
        return _frame(FrameType.REGISTER, b"")
    if isinstance(message, Connect):
        return _frame(FrameType.CONNECT, _node_id(message.target))
    if isinstance(message, Incoming):
        return _frame(FrameType.INCOMING, _node_id(message.source))
    if isinstance(message, Accept):
        return _frame(FrameType.ACCEPT, b"")
    if isinstance(message, Refuse):
        reason = message.reason.encode("utf-8")[:MAX_REASON]
        return _frame(FrameType.REFUSE, bytes([message.code]) + reason)
    addresses = message.addresses[:MAX_CANDIDATES]
    body = bytes([len(addresses)]) + b"".join(encode_address(h, p) for h, p in addresses)
    return _frame(FrameType.CANDIDATES, body)


def encode_datagrams(datagrams: list[bytes]) -> bytes:
    """DATA frames for a run of datagrams, in one buffer (one stream write)."""
    return b"".join([_frame(FrameType.DATA, d) for d in datagrams])


def _frame(kind: FrameType, body: bytes) -> bytes:
    length = 1 + len(body)
    if length > MAX_FRAME:
        raise ValueError(f"control frame of {length} bytes")
    return length.to_bytes(2, "big") + bytes([kind]) + body


def _node_id(raw: bytes) -> bytes:
    if len(raw) != NODE_ID_LEN:
        raise ValueError("a NodeId is 32 bytes")
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
    if kind == FrameType.DATA:
        if not body:
            raise ControlError("empty datagram")
        return Data(body)
    if kind in (FrameType.REGISTER, FrameType.ACCEPT):
        if body:
            raise ControlError("trailing bytes in an empty message")
        return Register() if kind == FrameType.REGISTER else Accept()
    if kind in (FrameType.CONNECT, FrameType.INCOMING):
        if len(body) != NODE_ID_LEN:
            raise ControlError("a NodeId is 32 bytes")
        return Connect(body) if kind == FrameType.CONNECT else Incoming(body)
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
