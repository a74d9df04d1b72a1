"""Tickets: what one user hands another to fetch a share (one line, versioned, checksummed).

``p2pfs1`` + lowercase base32 (no padding) of ``payload || checksum``, where ``payload`` is
msgpack ``[kind, root, node_id or nil, [[host, port], ...]]`` (read-only folder tickets
append the folder's public write key; a ticket naming relays then appends ``nil`` in that
place for other kinds, and ``[[relay_node_id, host, port], ...]``) and ``checksum`` the
first 4 bytes of BLAKE3(payload). The digit
after ``p2pfs`` is the ticket format version, so a ticket from a newer p2pfs is reported as
such rather than as a typo.
"""

from __future__ import annotations

import base64
import enum
import ipaddress
from dataclasses import dataclass

import blake3
import msgpack

from p2pfs.address import PeerAddress
from p2pfs.errors import RemoteProtocolError
from p2pfs.ids import HASH_LEN, ContentHash, NodeId, content_hash_untrusted

PREFIX = "p2pfs"
TICKET_VERSION = 1
CHECKSUM_BYTES = 4
MAX_ADDRESSES = 16
MAX_RELAYS = 4
MAX_TICKET_CHARS = 2048


class TicketKind(enum.IntEnum):
    SHARE = 0
    """Read access to an immutable share: the root is the capability."""
    FOLDER_RW = 1
    """Membership of a sync folder with the right to change it: ``root`` is the write seed."""
    FOLDER_RO = 2
    """Read-only membership of a sync folder: ``root`` is the read key, ``write_public``
    the folder's public write key (to verify records)."""


@dataclass(frozen=True, slots=True)
class RelayHint:
    """A relay through which the ticket's node is reachable."""

    node_id: NodeId
    address: PeerAddress


@dataclass(frozen=True, slots=True)
class Ticket:
    kind: TicketKind
    root: ContentHash
    node_id: NodeId | None
    """The sharer's NodeId, unless the ticket was made with --no-hints."""
    addresses: tuple[PeerAddress, ...]
    write_public: bytes | None = None
    """Only in read-only folder tickets."""
    relays: tuple[RelayHint, ...] = ()
    """Relays the node is registered with (only with a node_id: a relay circuit names
    its target by NodeId)."""

    def encode(self) -> str:
        fields: list[object] = [
            int(self.kind),
            self.root,
            None if self.node_id is None else self.node_id.raw,
            [[address.host, address.port] for address in self.addresses],
        ]
        if self.write_public is not None or self.relays:
            fields.append(self.write_public)
        if self.relays:
            fields.append(
                [[r.node_id.raw, r.address.host, r.address.port] for r in self.relays[:MAX_RELAYS]]
            )
        payload = msgpack.packb(fields, use_bin_type=True)
        checksum = blake3.blake3(payload).digest()[:CHECKSUM_BYTES]
        text = base64.b32encode(payload + checksum).decode("ascii").rstrip("=").lower()
        return f"{PREFIX}{TICKET_VERSION}{text}"


class TicketError(RemoteProtocolError):
    """A ticket that cannot be used; the message is one line meant for the user."""


def parse_ticket_untrusted(text: str) -> Ticket:
    text = text.strip()
    if len(text) > MAX_TICKET_CHARS:
        raise TicketError("ticket is too long")
    if not text.lower().startswith(PREFIX):
        raise TicketError("not a p2pfs ticket (it should start with 'p2pfs1')")
    rest = text[len(PREFIX) :]
    if not rest[:1].isdigit():
        raise TicketError("ticket has no version digit after 'p2pfs'")
    if int(rest[0]) != TICKET_VERSION:
        raise TicketError(
            f"ticket format {rest[0]} is not understood by this p2pfs (it reads format "
            f"{TICKET_VERSION}); upgrade p2pfs"
        )
    body = rest[1:].upper()
    try:
        raw = base64.b32decode(body + "=" * (-len(body) % 8))
    except ValueError as exc:
        raise TicketError("ticket is damaged (not base32); copy it again") from exc
    # Base32's last character carries spare bits: only the canonical spelling is accepted,
    # so every changed character is caught.
    if base64.b32encode(raw).decode("ascii").rstrip("=").lower() != body.lower():
        raise TicketError("ticket is damaged; copy it again")
    payload, checksum = raw[:-CHECKSUM_BYTES], raw[-CHECKSUM_BYTES:]
    if len(raw) <= CHECKSUM_BYTES or blake3.blake3(payload).digest()[:CHECKSUM_BYTES] != checksum:
        raise TicketError("ticket checksum does not match; copy it again")
    try:
        value = msgpack.unpackb(
            payload, raw=False, max_bin_len=HASH_LEN, max_str_len=256, max_array_len=64
        )
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise TicketError("ticket content is malformed") from exc
    if not isinstance(value, list) or len(value) < 4:
        raise TicketError("ticket content is malformed")
    kind, root, node_id, addresses = value[:4]
    if type(kind) is not int or kind not in TicketKind.__members__.values():
        raise TicketError(f"ticket kind {kind!r} is not understood by this p2pfs")
    if node_id is not None:
        node_id = NodeId(bytes(content_hash_untrusted(node_id)))
    if not isinstance(addresses, list) or len(addresses) > MAX_ADDRESSES:
        raise TicketError("ticket addresses are malformed")
    write_public = None
    if kind == TicketKind.FOLDER_RO:
        if len(value) < 5:
            raise TicketError("read-only folder ticket lacks the folder's write key")
        write_public = bytes(content_hash_untrusted(value[4]))
    relays: tuple[RelayHint, ...] = ()
    if len(value) >= 6:
        if kind != TicketKind.FOLDER_RO and value[4] is not None:
            raise TicketError("ticket content is malformed")
        relays = _relays_untrusted(value[5])
        if relays and node_id is None:
            raise TicketError("ticket names relays but no node")
    ticket = Ticket(
        TicketKind(kind),
        content_hash_untrusted(root),
        node_id,
        tuple(_address_untrusted(item) for item in addresses),
        write_public,
        relays,
    )
    # Fields after the known ones are ignored (the checksum already vouches for the bytes):
    # a later format 1 extension reaches this version as the ticket it can use.
    return ticket


def _relays_untrusted(value: object) -> tuple[RelayHint, ...]:
    if not isinstance(value, list) or not 0 < len(value) <= MAX_RELAYS:
        raise TicketError("ticket relays are malformed")
    hints = []
    for item in value:
        if not isinstance(item, list) or len(item) != 3:
            raise TicketError("ticket relay is malformed")
        hints.append(
            RelayHint(NodeId(bytes(content_hash_untrusted(item[0]))), _address_untrusted(item[1:]))
        )
    return tuple(hints)


def _address_untrusted(value: object) -> PeerAddress:
    if not isinstance(value, list) or len(value) != 2:
        raise TicketError("ticket address is malformed")
    host, port = value
    if not isinstance(host, str) or type(port) is not int or not 0 < port < 65536:
        raise TicketError("ticket address is malformed")
    try:
        ipaddress.ip_address(host)
    except ValueError as exc:
        raise TicketError(f"ticket address {host!r} is not an IP address") from exc
    return PeerAddress(host, port)
