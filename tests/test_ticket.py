from __future__ import annotations

import base64

import blake3
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfs.address import PeerAddress, parse_address
from p2pfs.errors import LocalProtocolError
from p2pfs.ids import ContentHash, NodeId
from p2pfs.wire.ticket import (
    MAX_RELAYS,
    RelayHint,
    Ticket,
    TicketError,
    TicketKind,
    parse_ticket_untrusted,
)

ROOT = ContentHash(bytes(range(32)))
node_ids = st.binary(min_size=32, max_size=32).map(NodeId)


def documented_text(ticket: Ticket) -> str:
    """A ticket spelt by the rules of protocol/WIRE.md (Tickets), without the codec: so a
    change to the format made alike in encoder and decoder still fails these tests (the
    exact bytes are pinned by protocol/vectors/ticket.json)."""
    fields: list[object] = [
        int(ticket.kind),
        bytes(ticket.root),
        None if ticket.node_id is None else ticket.node_id.raw,
        [[address.host, address.port] for address in ticket.addresses],
    ]
    if ticket.kind == TicketKind.FOLDER_RO or ticket.relays:
        fields.append(ticket.write_public)
    if ticket.relays:
        fields.append([[r.node_id.raw, r.address.host, r.address.port] for r in ticket.relays])
    payload = msgpack.packb(fields, use_bin_type=True)
    checksum = blake3.blake3(payload).digest()[:4]
    return "p2pfs1" + base64.b32encode(payload + checksum).decode("ascii").rstrip("=").lower()


addresses = st.lists(
    st.builds(
        PeerAddress,
        st.ip_addresses().map(str),
        st.integers(1, 65535),
    ),
    max_size=4,
).map(tuple)


@settings(max_examples=100, deadline=None)
@given(
    root=st.binary(min_size=32, max_size=32).map(ContentHash),
    node=st.none() | node_ids,
    addrs=addresses,
)
def test_tickets_round_trip(
    root: ContentHash, node: NodeId | None, addrs: tuple[PeerAddress, ...]
) -> None:
    ticket = Ticket(TicketKind.SHARE, root, node, addrs)
    text = ticket.encode()
    assert text == documented_text(ticket)
    assert text.startswith("p2pfs1")
    assert "\n" not in text and " " not in text
    assert parse_ticket_untrusted(f"  {text}\n") == ticket
    assert parse_ticket_untrusted(text.upper().replace("P2PFS1", "p2pfs1")) == ticket


def test_every_single_character_change_is_caught() -> None:
    text = Ticket(
        TicketKind.SHARE, ROOT, NodeId(bytes(32)), (PeerAddress("127.0.0.1", 4000),)
    ).encode()
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    for position in range(len("p2pfs1"), len(text)):
        replacement = alphabet[(alphabet.index(text[position]) + 1) % 32]
        damaged = text[:position] + replacement + text[position + 1 :]
        with pytest.raises(TicketError):
            parse_ticket_untrusted(damaged)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("hello", "not a p2pfs ticket"),
        ("p2pfsx", "no version digit"),
        ("p2pfs2aaaa", "upgrade p2pfs"),
        ("p2pfs1!!!!", "not base32"),
        ("p2pfs1" + "a" * 3000, "too long"),
        ("p2pfs1", "checksum"),
    ],
)
def test_bad_tickets_give_one_clear_line(text: str, words: str) -> None:
    with pytest.raises(TicketError) as info:
        parse_ticket_untrusted(text)
    assert words in str(info.value)
    assert "\n" not in str(info.value)


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:4000") == PeerAddress("127.0.0.1", 4000)
    assert parse_address("[::1]:5") == PeerAddress("::1", 5)
    assert str(PeerAddress("::1", 5)) == "[::1]:5"
    for bad in ("localhost:1", "1.2.3.4", "1.2.3.4:70000", ":5"):
        with pytest.raises(LocalProtocolError):
            parse_address(bad)


@settings(max_examples=100, deadline=None)
@given(
    root=st.binary(min_size=32, max_size=32).map(ContentHash),
    node=node_ids,
    addrs=addresses,
    relays=st.lists(
        st.builds(
            RelayHint,
            node_ids,
            st.builds(PeerAddress, st.ip_addresses().map(str), st.integers(1, 65535)),
        ),
        min_size=1,
        max_size=MAX_RELAYS,
    ).map(tuple),
    kind=st.sampled_from([TicketKind.SHARE, TicketKind.FOLDER_RW]),
)
def test_tickets_with_relays_round_trip(
    root: ContentHash,
    node: NodeId,
    addrs: tuple[PeerAddress, ...],
    relays: tuple[RelayHint, ...],
    kind: TicketKind,
) -> None:
    ticket = Ticket(kind, root, node, addrs, relays=relays)
    assert ticket.encode() == documented_text(ticket)
    assert parse_ticket_untrusted(ticket.encode()) == ticket


def test_a_ticket_without_relays_is_spelt_as_before() -> None:
    """Old tickets keep parsing and new ones without relays are byte-identical to them."""
    ticket = Ticket(TicketKind.SHARE, ROOT, NodeId(bytes(32)), (PeerAddress("192.0.2.1", 7337),))
    assert len(msgpack_fields(ticket.encode())) == 4
    assert parse_ticket_untrusted(ticket.encode()).relays == ()


def test_relays_without_a_node_are_refused() -> None:
    hint = RelayHint(NodeId(bytes(32)), PeerAddress("192.0.2.9", 7337))
    text = Ticket(TicketKind.SHARE, ROOT, None, (), relays=(hint,)).encode()
    with pytest.raises(TicketError, match="relays but no node"):
        parse_ticket_untrusted(text)


def msgpack_fields(text: str) -> list[object]:
    body = text[len("p2pfs1") :].upper()
    raw = base64.b32decode(body + "=" * (-len(body) % 8))
    fields: list[object] = msgpack.unpackb(raw[:-4], raw=False)
    return fields


@settings(max_examples=50, deadline=None)
@given(
    read_key=st.binary(min_size=32, max_size=32).map(ContentHash),
    write_public=st.binary(min_size=32, max_size=32),
    node=node_ids,
    addrs=addresses,
    relay_count=st.integers(0, MAX_RELAYS),
)
def test_read_only_folder_tickets_round_trip(
    read_key: ContentHash,
    write_public: bytes,
    node: NodeId,
    addrs: tuple[PeerAddress, ...],
    relay_count: int,
) -> None:
    relays = tuple(
        RelayHint(NodeId(bytes([i]) * 32), PeerAddress(f"192.0.2.{i + 1}", 7337))
        for i in range(relay_count)
    )
    ticket = Ticket(TicketKind.FOLDER_RO, read_key, node, addrs, write_public, relays)
    assert ticket.encode() == documented_text(ticket)
    assert parse_ticket_untrusted(ticket.encode()) == ticket


def test_fields_after_the_known_ones_are_ignored() -> None:
    """A later format 1 ticket may append fields; this version uses what it knows."""
    root, node, relay = bytes(range(32)), bytes([7]) * 32, bytes([9]) * 32
    fields = [0, root, node, [["192.0.2.1", 7337]], None, [[relay, "192.0.2.9", 7337]], "new"]
    payload = msgpack.packb(fields)
    raw = payload + blake3.blake3(payload).digest()[:4]
    text = "p2pfs1" + base64.b32encode(raw).decode().rstrip("=").lower()
    ticket = parse_ticket_untrusted(text)
    assert (ticket.root, ticket.node_id) == (root, NodeId(node))
    assert [str(a) for a in ticket.addresses] == ["192.0.2.1:7337"]
    assert [hint.node_id for hint in ticket.relays] == [NodeId(relay)]
