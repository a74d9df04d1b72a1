"""DHT datagrams: encoding, and validation of everything a peer sends (sans-I/O).

The framing is rpcudp's (the transport under the ``kademlia`` package), so the package's
logic runs unchanged above it::

    request:  0x00 || msg_id (20 bytes) || msgpack([method: str, args: list])
    response: 0x01 || msg_id (20 bytes) || msgpack(result)

Methods (ids are the package's 160-bit node ids; ``key`` is a DHT key, see ``dht_key``)::

    ping          [sender_id]                          -> our_id
    find_node     [sender_id, target, token?]          -> [[id, ip, port], ...]
    get_providers [sender_id, key, token?]             -> {"token": bytes, "nodes": [...],
                                                           "providers": [[node_id32, ip,
                                                                          port, ttl], ...],
                                                           "truncated": true (if so)}
    add_provider  [sender_id, key, token, node_id32, port, ttl] -> bool

The optional ``token`` of ``find_node`` and ``get_providers`` is the write token the asked node
gave this requester earlier: it proves the requester receives at its source address. Without a
valid one, a reply is at most ``AMPLIFICATION`` times the request's size (nodes and providers
trimmed, ``truncated`` set), so a forged source address cannot make a node amplify a flood.

``store`` and ``find_value`` of the package are not served: values are provider records only.
Every decoder below ends in ``_untrusted`` and raises ``DhtMessageError`` and nothing else.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import blake3
import msgpack

from p2pfs.errors import RemoteProtocolError

ID_LEN = 20
"""The package's ids (and so our DHT keys) are 160 bits."""
NODE_ID_LEN = 32
"""A p2pfs NodeId, carried in provider records."""
MSG_ID_LEN = 20
HEADER_LEN = 1 + MSG_ID_LEN
MAX_DATAGRAM = 4096
"""Anything longer is dropped unread; our largest honest datagram is under 3 KiB."""
MAX_CONTACTS = 32
MAX_PROVIDERS_PER_RESPONSE = 32
MAX_TOKEN_LEN = 32
MAX_TTL = 24 * 3600
"""The largest TTL a datagram may carry; a record store caps what it keeps far lower."""
AMPLIFICATION = 3
"""A reply to a requester that has not echoed a valid token is at most this many times the
request's size (a bare get_providers request is 81 bytes)."""
REQUEST = 0
RESPONSE = 1
CLIENT_REQUEST = 4
"""A request from a node in client mode (behind a NAT): answered like any, but its sender
joins no routing table, so nobody learns of it as a node to contact unasked (libp2p's
client mode, BEP 43's read-only nodes). 2 and 3 are the UDP port's punch and relay
datagrams (protocol/WIRE.md "One UDP port")."""

DHT_KEY_CONTEXT = "p2pfs 2026-11-22 private dht key v1"
DHT_NODE_ID_CONTEXT = "p2pfs 2026-11-22 private dht node id v1"

METHODS = frozenset({"ping", "find_node", "get_providers", "add_provider"})


class DhtMessageError(RemoteProtocolError):
    """A DHT datagram that breaks the protocol; it is dropped and its sender is to blame."""


def dht_key(discovery_key: bytes) -> bytes:
    """Our 32-byte discovery key mapped into the package's 160-bit keyspace.

    A derive-key hash under its own context rather than a plain prefix, so the private DHT's
    key differs from the Mainline info-hash of the same share and the two DHTs cannot be
    joined on it.
    """
    return blake3.blake3(discovery_key, derive_key_context=DHT_KEY_CONTEXT).digest()[:ID_LEN]


def dht_node_id(node_id: bytes) -> bytes:
    """A node's 160-bit DHT id, derived from its NodeId so it is stable across restarts."""
    return blake3.blake3(node_id, derive_key_context=DHT_NODE_ID_CONTEXT).digest()[:ID_LEN]


@dataclass(frozen=True, slots=True)
class Contact:
    id: bytes
    ip: str
    port: int

    def to_wire(self) -> list[Any]:
        return [self.id, self.ip, self.port]


def contacts_to_wire(contacts: Iterable[Contact]) -> list[list[Any]]:
    """A ``find_node`` reply: contacts nearest first (what ``contacts_untrusted`` reads)."""
    return [contact.to_wire() for contact in contacts]


@dataclass(frozen=True, slots=True)
class ProviderInfo:
    """A provider record as sent on the wire: the TTL is relative, so clocks need not agree."""

    node_id: bytes
    ip: str
    port: int
    ttl: int

    def to_wire(self) -> list[Any]:
        return [self.node_id, self.ip, self.port, self.ttl]


@dataclass(frozen=True, slots=True)
class ProvidersReply:
    token: bytes
    nodes: tuple[Contact, ...]
    providers: tuple[ProviderInfo, ...]
    truncated: bool = False
    """The replier left nodes or providers out: ask again echoing ``token`` for all of them."""

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "token": self.token,
            "nodes": [node.to_wire() for node in self.nodes],
            "providers": [provider.to_wire() for provider in self.providers],
        }
        if self.truncated:
            wire["truncated"] = True
        return wire


@dataclass(frozen=True, slots=True)
class Request:
    msg_id: bytes
    method: str
    args: tuple[Any, ...]
    """Validated per method: see ``_ARG_CHECKS``."""
    from_client: bool = False
    """Sent as CLIENT_REQUEST: answer, but do not add the sender as a contact."""


@dataclass(frozen=True, slots=True)
class Response:
    msg_id: bytes
    payload: object
    """Still untrusted: validated by ``*_reply_untrusted`` for the method that was asked."""


def encode_request(
    msg_id: bytes, method: str, args: list[Any], *, from_client: bool = False
) -> bytes:
    body: bytes = msgpack.packb([method, args], use_bin_type=True)
    return bytes([CLIENT_REQUEST if from_client else REQUEST]) + msg_id + body


def encode_response(msg_id: bytes, payload: object) -> bytes:
    body: bytes = msgpack.packb(payload, use_bin_type=True)
    return bytes([RESPONSE]) + msg_id + body


def _unpack_untrusted(data: bytes) -> object:
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_str_len=64,
            max_bin_len=64,
            max_array_len=max(MAX_CONTACTS, MAX_PROVIDERS_PER_RESPONSE, 8),
            max_map_len=8,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise DhtMessageError(f"undecodable payload: {exc.__class__.__name__}") from None


def datagram_untrusted(data: bytes) -> Request | Response:
    if len(data) > MAX_DATAGRAM:
        raise DhtMessageError(f"datagram of {len(data)} bytes exceeds {MAX_DATAGRAM}")
    if len(data) <= HEADER_LEN:
        raise DhtMessageError("datagram too short")
    kind, msg_id = data[0], bytes(data[1:HEADER_LEN])
    body = _unpack_untrusted(bytes(data[HEADER_LEN:]))
    if kind == RESPONSE:
        return Response(msg_id, body)
    if kind not in (REQUEST, CLIENT_REQUEST):
        raise DhtMessageError(f"unknown datagram kind {kind}")
    if not isinstance(body, list) or len(body) != 2:
        raise DhtMessageError("request is not [method, args]")
    method, args = body
    if not isinstance(method, str) or method not in METHODS:
        raise DhtMessageError("unknown method")
    if not isinstance(args, list):
        raise DhtMessageError("arguments are not a list")
    return Request(msg_id, method, _ARG_CHECKS[method](args), kind == CLIENT_REQUEST)


def _bytes_untrusted(value: object, length: int, what: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != length:
        raise DhtMessageError(f"{what} must be {length} bytes")
    return value


def _int_untrusted(value: object, low: int, high: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise DhtMessageError(f"{what} must be an integer in [{low}, {high}]")
    return value


def ip_untrusted(value: object) -> str:
    if not isinstance(value, str):
        raise DhtMessageError("ip must be a string")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise DhtMessageError("ip is not an IP address") from None


def _contact_untrusted(value: object) -> Contact:
    if not isinstance(value, list) or len(value) != 3:
        raise DhtMessageError("contact is not [id, ip, port]")
    return Contact(
        _bytes_untrusted(value[0], ID_LEN, "contact id"),
        ip_untrusted(value[1]),
        _int_untrusted(value[2], 1, 65535, "contact port"),
    )


def _provider_untrusted(value: object) -> ProviderInfo:
    if not isinstance(value, list) or len(value) != 4:
        raise DhtMessageError("provider is not [node_id, ip, port, ttl]")
    return ProviderInfo(
        _bytes_untrusted(value[0], NODE_ID_LEN, "provider node id"),
        ip_untrusted(value[1]),
        _int_untrusted(value[2], 1, 65535, "provider port"),
        _int_untrusted(value[3], 0, MAX_TTL, "provider ttl"),
    )


def _arity(args: list[Any], count: int) -> None:
    if len(args) != count:
        raise DhtMessageError(f"expected {count} arguments, got {len(args)}")


def _ping_args(args: list[Any]) -> tuple[Any, ...]:
    _arity(args, 1)
    return (_bytes_untrusted(args[0], ID_LEN, "sender id"),)


def _token_untrusted(value: object) -> bytes:
    if not isinstance(value, bytes) or not 0 < len(value) <= MAX_TOKEN_LEN:
        raise DhtMessageError("token must be 1 to 32 bytes")
    return value


def _find_args(args: list[Any]) -> tuple[Any, ...]:
    # [sender_id, target] or [sender_id, target, token]: the token is optional.
    if len(args) not in (2, 3):
        raise DhtMessageError(f"expected 2 or 3 arguments, got {len(args)}")
    ids = (
        _bytes_untrusted(args[0], ID_LEN, "sender id"),
        _bytes_untrusted(args[1], ID_LEN, "target"),
    )
    return (*ids, _token_untrusted(args[2])) if len(args) == 3 else ids


def _add_provider_args(args: list[Any]) -> tuple[Any, ...]:
    _arity(args, 6)
    return (
        _bytes_untrusted(args[0], ID_LEN, "sender id"),
        _bytes_untrusted(args[1], ID_LEN, "key"),
        _token_untrusted(args[2]),
        _bytes_untrusted(args[3], NODE_ID_LEN, "provider node id"),
        _int_untrusted(args[4], 1, 65535, "provider port"),
        _int_untrusted(args[5], 1, MAX_TTL, "ttl"),
    )


_ARG_CHECKS = {
    "ping": _ping_args,
    "find_node": _find_args,
    "get_providers": _find_args,
    "add_provider": _add_provider_args,
}


def ping_reply_untrusted(payload: object) -> bytes:
    return _bytes_untrusted(payload, ID_LEN, "ping reply")


def contacts_untrusted(payload: object) -> tuple[Contact, ...]:
    if not isinstance(payload, list) or len(payload) > MAX_CONTACTS:
        raise DhtMessageError("contacts must be a list of at most 32")
    return tuple(_contact_untrusted(item) for item in payload)


def providers_reply_untrusted(payload: object) -> ProvidersReply:
    if not isinstance(payload, dict):
        raise DhtMessageError("get_providers reply is not a map")
    token = _token_untrusted(payload.get("token"))
    providers = payload.get("providers", [])
    if not isinstance(providers, list) or len(providers) > MAX_PROVIDERS_PER_RESPONSE:
        raise DhtMessageError("providers must be a list of at most 32")
    truncated = payload.get("truncated", False)
    if not isinstance(truncated, bool):
        raise DhtMessageError("truncated must be a boolean")
    return ProvidersReply(
        token,
        contacts_untrusted(payload.get("nodes", [])),
        tuple(_provider_untrusted(item) for item in providers),
        truncated,
    )


def add_provider_reply_untrusted(payload: object) -> bool:
    if not isinstance(payload, bool):
        raise DhtMessageError("add_provider reply is not a boolean")
    return payload
