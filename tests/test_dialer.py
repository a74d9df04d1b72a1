"""Advertised addresses and the one dialer, against real QUIC endpoints on loopback."""

from __future__ import annotations

import functools
import ipaddress
import itertools
import socket

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from p2pfs.address import PeerAddress, parse_address
from p2pfs.daemon import addresses
from p2pfs.daemon.addresses import (
    OBSERVED_LIMIT,
    AddressBook,
    best_of_each_family_first,
    local_addresses,
    rank,
    unadvertised_ipv6,
)
from p2pfs.daemon.dialer import Candidate, Dialer, DialError, interleave_families
from p2pfs.errors import AuthenticationError, LocalProtocolError
from p2pfs.identity import Identity
from p2pfs.ids import NodeId
from p2pfs.net import PeerConnection, auth, open_endpoint

# -- addresses -------------------------------------------------------------------------------


def test_wildcard_bind_advertises_interfaces_best_first() -> None:
    found = local_addresses(
        "0.0.0.0",
        7337,
        ["127.0.0.1", "192.168.1.5", "169.254.9.9", "100.64.0.3", "9.9.9.9", "::1"],
    )
    assert [a.host for a in found] == ["9.9.9.9", "192.168.1.5", "100.64.0.3"]
    assert {a.port for a in found} == {7337}


def test_loopback_only_when_nothing_else_and_a_bound_address_alone() -> None:
    assert local_addresses("0.0.0.0", 1, ["127.0.0.1"]) == [PeerAddress("127.0.0.1", 1)]
    assert local_addresses("0.0.0.0", 1, []) == [PeerAddress("127.0.0.1", 1)]
    assert local_addresses("10.0.0.7", 2, ["10.0.0.7", "10.0.0.8"]) == [PeerAddress("10.0.0.7", 2)]
    assert local_addresses("127.0.0.1", 3, ["192.168.0.2"]) == [PeerAddress("127.0.0.1", 3)]
    assert local_addresses("::", 4, ["fe80::1", "2001:db8::5", "::1", "10.0.0.1"]) == [
        PeerAddress("2001:db8::5", 4)
    ]


def test_a_dual_stack_socket_advertises_both_families() -> None:
    interfaces = ["fe80::1", "2001:db8::5", "::1", "10.0.0.1", "127.0.0.1", "9.9.9.9"]
    found = local_addresses("::", 4, interfaces, dual_stack=True)
    assert [a.host for a in found] == ["9.9.9.9", "2001:db8::5", "10.0.0.1"]
    # Nothing listed at all: IPv4's loopback, which a dual-stack socket answers too.
    assert local_addresses("::", 4, [], dual_stack=True) == [PeerAddress("127.0.0.1", 4)]
    # Not dual-stack (IPV6_V6ONLY): IPv6 alone, as before.
    assert local_addresses("::", 4, interfaces) == [PeerAddress("2001:db8::5", 4)]


def test_short_lived_ipv6_addresses_are_not_advertised() -> None:
    text = (
        "00000000000000000000000000000001 01 80 10 80       lo\n"
        "20010db8000000000000000000000002 04 40 00 80     eth0\n"  # stable
        "20010db8000000001111222233334444 04 40 00 01     eth0\n"  # temporary
        "20010db8000000000000000000000005 04 40 00 20     eth0\n"  # deprecated
        "20010db8000000000000000000000006 04 40 00 c0     eth0\n"  # tentative
        "20010db8000000000000000000000007 04 40 00 08     eth0\n"  # DAD failed
        "fe8000000000000000fc00fffe000001 04 40 20 80     eth0\n"
        "not a line\n"
    )
    assert unadvertised_ipv6(text) == {
        "2001:db8::1111:2222:3333:4444",
        "2001:db8::5",
        "2001:db8::6",
        "2001:db8::7",
    }


def test_a_short_lived_address_peers_report_stays_unadvertised(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Peers report the address our packets came from, for IPv6 often a temporary one (the
    kernel's preferred source): two places agreeing must not advertise it after all."""
    temporary, stable = "2001:db8::1111:2222:3333:4444", "2001:db8::2"
    monkeypatch.setattr(addresses, "interface_addresses", lambda *_: [stable, temporary])
    monkeypatch.setattr(addresses, "_unadvertised_here", lambda: frozenset({temporary}))
    book = AddressBook("::", 7337, dual_stack=True)
    public = PeerAddress("203.0.113.5", 40000)  # an IPv4 NAT's mapping: advertised
    for reporter in ("198.51.100.1", "192.0.2.1"):
        book.observed(PeerAddress(temporary, 7337), reporter)
        book.observed(public, reporter)
    assert set(book.all()) == {public, PeerAddress(stable, 7337)}
    # Once the kernel has deleted the temporary address it is no longer flagged anywhere:
    # still not ours to advertise (it is in our /64, and not configured).
    monkeypatch.setattr(addresses, "interface_addresses", lambda *_: [stable])
    monkeypatch.setattr(addresses, "_unadvertised_here", frozenset)
    assert set(book.all()) == {public, PeerAddress(stable, 7337)}
    # Our own address, however short-lived, is no sign of a NAT; the IPv4 mapping is.
    alone = AddressBook("::", 7337, dual_stack=True)
    alone.observed(PeerAddress(temporary, 7337), "198.51.100.1")
    assert not alone.seen_through_nat()
    assert book.seen_through_nat()


def test_a_mapping_behind_another_nat_is_no_way_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """A home router behind the ISP's carrier-grade NAT (or another router) grants a port
    mapping at its own shared or private address: peers elsewhere still see the carrier's
    address, so the node is still behind a NAT (it looks for relays, stays a DHT client);
    a mapping at a public address is the way in. Before, any mapping meant "no NAT"."""
    monkeypatch.setattr(addresses, "interface_addresses", lambda *_: ["192.168.1.2"])
    # Public addresses (the documentation ranges are not global): the carrier's mapping
    # of our packets, and a router's own public WAN address.
    seen = PeerAddress("81.2.69.160", 40000)
    for mapping, behind in (("100.64.3.2", True), ("10.0.0.7", True), ("81.2.69.161", False)):
        book = AddressBook("0.0.0.0", 7337)
        book.mapped(PeerAddress(mapping, 7337))
        for reporter in ("198.51.100.1", "192.0.2.1"):
            book.observed(seen, reporter)
        assert book.seen_through_nat() is behind, mapping
        # Advertised still, ranked by what it is: the carrier's address the peers saw first.
        assert book.all()[0] == (seen if behind else PeerAddress(mapping, 7337))


def test_a_ticket_names_the_best_address_of_each_family_first() -> None:
    ranked = [PeerAddress(h, 1) for h in ("9.9.9.9", "9.9.9.8", "10.0.0.1", "2001:db8::5")]
    assert [a.host for a in best_of_each_family_first(ranked)][:2] == ["9.9.9.9", "2001:db8::5"]
    only_v4 = ranked[:3]
    assert best_of_each_family_first(only_v4) == only_v4


@given(st.lists(st.sampled_from(["10.0.0.1", "10.0.0.2", "10.0.0.3", "::1", "::2"])))
def test_interleaved_families_keep_each_familys_order(hosts: list[str]) -> None:
    mixed = interleave_families(hosts)
    unique = list(dict.fromkeys(hosts))
    assert sorted(mixed) == sorted(unique)
    for v6 in (True, False):
        assert [h for h in mixed if (":" in h) == v6] == [h for h in unique if (":" in h) == v6]
    # Alternating while both families last, from the first address's family.
    if mixed:
        assert mixed[0] == unique[0]
    for before, after in itertools.pairwise(mixed):
        if (":" in before) == (":" in after):
            rest = mixed[mixed.index(after) :]
            assert all((":" in h) == (":" in after) for h in rest)


ipv4s = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))


@given(st.lists(ipv4s, max_size=12))
def test_advertised_addresses_are_usable_and_ranked(interfaces: list[str]) -> None:
    found = [ipaddress.ip_address(a.host) for a in local_addresses("0.0.0.0", 9, interfaces)]
    assert found
    assert not any(a.is_link_local or a.is_multicast or a.is_unspecified for a in found)
    if any(a.is_loopback for a in found):
        assert all(a.is_loopback for a in found)  # loopback only when nothing else
    assert [rank(a) for a in found] == sorted(rank(a) for a in found)
    assert len(set(found)) == len(found)


def test_observed_addresses_join_once_two_places_confirm_them() -> None:
    book = AddressBook("127.0.0.1", 5000)
    public = PeerAddress("198.51.100.4", 40000)  # a NAT's public mapping
    book.observed(public, "203.0.113.1")
    book.observed(public, "203.0.113.99")  # the same /24: the same place
    assert book.all() == [PeerAddress("127.0.0.1", 5000)]
    assert book.observations() == [(public, 1)]
    book.observed(public, "192.0.2.50")
    assert book.all() == [public, PeerAddress("127.0.0.1", 5000)]
    book.observed(PeerAddress("127.0.0.1", 1), "192.0.2.1")  # never loopback
    book.observed(PeerAddress("169.254.1.1", 2), "192.0.2.1")  # nor link-local
    assert len(book.observations()) == 1
    for n in range(OBSERVED_LIMIT + 5):
        book.observed(PeerAddress(f"198.51.100.{n + 10}", 1000), "192.0.2.1")
    assert len(book.observations()) == OBSERVED_LIMIT


def test_user_addresses_accept_host_names_tickets_do_not() -> None:
    assert parse_address("example.org:7337", allow_names=True) == PeerAddress("example.org", 7337)
    assert parse_address("[::1]:5", allow_names=True) == PeerAddress("::1", 5)
    for bad in ("exa mple.org:1", "-bad.org:1", "a..b:1", "x" * 300 + ":1"):
        with pytest.raises(LocalProtocolError):
            parse_address(bad, allow_names=True)
    with pytest.raises(LocalProtocolError):
        parse_address("example.org:7337")


# -- the dialer over real QUIC ---------------------------------------------------------------


async def serve_forever(conn: PeerConnection) -> None:
    await conn.wait_closed()


def silent_address() -> PeerAddress:
    """A loopback UDP port nothing answers on (bound, never read: datagrams vanish)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    _SILENT.append(sock)
    return PeerAddress("127.0.0.1", sock.getsockname()[1])


_SILENT: list[socket.socket] = []


def run_dialer_test(body: object) -> None:
    holder_id, dialer_id, other_id = Identity.generate(), Identity.generate(), Identity.generate()

    async def main() -> None:
        with trio.fail_after(60):
            async with (
                open_endpoint(holder_id, handler=serve_forever) as holder,
                open_endpoint(other_id, handler=serve_forever) as other,
                open_endpoint(dialer_id, handler=serve_forever) as mine,
                trio.open_nursery() as nursery,
            ):
                dialer = Dialer(mine, serve_forever, nursery, stagger=0.05, timeout=1.0)
                await body(dialer, holder, other, mine)  # type: ignore[operator]
                nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        for sock in _SILENT:
            sock.close()
        _SILENT.clear()


def address_of(endpoint: object) -> PeerAddress:
    host, port = endpoint.local_address  # type: ignore[attr-defined]
    return PeerAddress(host, port)


def test_dead_and_wrong_candidates_are_passed_and_the_holder_reached() -> None:
    async def body(dialer: Dialer, holder: object, other: object, mine: object) -> None:
        holder_node = holder.node_id  # type: ignore[attr-defined]
        candidates = [Candidate(silent_address(), holder_node, "ticket") for _ in range(5)]
        candidates.append(Candidate(address_of(other), holder_node, "ticket"))  # wrong node
        candidates.append(Candidate(address_of(mine), None, "peer"))  # this node itself
        candidates.append(Candidate(address_of(holder), holder_node, "ticket"))
        token = object()
        conn = await dialer.first(candidates, token)
        assert conn.peer_id == holder_node
        # Reuse: a second dial to the same node opens nothing new.
        again = await dialer.first([Candidate(silent_address(), holder_node, "x")], object())
        assert again is conn

    run_dialer_test(body)


def test_the_error_names_every_candidate_and_its_reason() -> None:
    async def body(dialer: Dialer, holder: object, other: object, mine: object) -> None:
        holder_node = holder.node_id  # type: ignore[attr-defined]
        dead = silent_address()
        candidates = [
            Candidate(dead, holder_node, "ticket"),
            Candidate(address_of(other), holder_node, "ticket"),
            Candidate(address_of(mine), None, "peer"),
            Candidate(PeerAddress("no-such-host.invalid", 1), None, "peer"),
            # A relayed connection's synthetic address, as once remembered for a member.
            Candidate(PeerAddress("100::1:1", 1), holder_node, "member"),
        ]
        with pytest.raises(DialError) as caught:
            await dialer.first(candidates, object())
        reasons = dict((str(c.address), why) for c, why in caught.value.attempts)
        assert reasons["[100::1:1]:1"] == "a relay circuit's address, not a peer's"
        assert "no answer" in reasons[str(dead)]
        assert "not the node expected" in reasons[str(address_of(other))]
        assert reasons[str(address_of(mine))] == "that is this node"
        assert "cannot resolve" in reasons["no-such-host.invalid:1"]
        assert str(dead) in str(caught.value)

    run_dialer_test(body)


def test_when_every_way_fails_the_relays_found_for_the_node_are_tried() -> None:
    """The dialer's relay fallback: only once every candidate failed, only for pinned
    nodes no relay was named for, and not when dialling a relay itself. The circuit is
    stood in for by a direct connection (circuits are tested in test_nat_relay and the
    namespace bed); what is checked is the dialer's policy."""

    async def body(dialer: Dialer, holder: object, other: object, mine: object) -> None:
        holder_node = holder.node_id  # type: ignore[attr-defined]
        relay_node = other.node_id  # type: ignore[attr-defined]
        asked: list[object] = []
        through: list[Candidate] = []

        async def relays_for(node: object) -> list[Candidate]:
            asked.append(node)
            return [Candidate(address_of(other), holder_node, "relay (dht)", relay_node)]

        async def via_relay(candidate: Candidate) -> PeerConnection:
            through.append(candidate)
            return await mine.connect(  # type: ignore[attr-defined,no-any-return]
                (address_of(holder).host, address_of(holder).port), candidate.node
            )

        dialer.relays_for = relays_for  # type: ignore[assignment]
        dialer.via_relay = via_relay
        dead = [Candidate(silent_address(), holder_node, "ticket") for _ in range(2)]
        with pytest.raises(DialError):
            await dialer.first(dead, object(), relay_lookup=False)
        assert asked == []
        conn = await dialer.first(dead, object())
        assert conn.peer_id == holder_node
        assert asked == [holder_node]
        assert [c.relay for c in through] == [relay_node]

    run_dialer_test(body)


def test_a_leased_connection_closes_with_its_last_user_only() -> None:
    async def body(dialer: Dialer, holder: object, other: object, mine: object) -> None:
        node = holder.node_id  # type: ignore[attr-defined]
        fetch, link = object(), object()
        conn = await dialer.first([Candidate(address_of(holder), node, "ticket")], fetch)
        shared = await dialer.first([Candidate(address_of(holder), node, "member")], link)
        assert shared is conn
        dialer.release_all(fetch)
        assert not conn.is_closed  # the link still uses it
        dialer.release(conn, link)
        assert conn.is_closed

    run_dialer_test(body)


def test_each_reaches_every_node_once() -> None:
    async def body(dialer: Dialer, holder: object, other: object, mine: object) -> None:
        token = object()
        found: list[PeerConnection] = []
        await dialer.each(
            [
                Candidate(address_of(holder), None, "dht"),
                Candidate(address_of(other), None, "dht"),
                Candidate(silent_address(), None, "dht"),
                Candidate(address_of(mine), None, "lan"),
            ],
            token,
            exclude=[],
            deliver=found.append,
        )
        assert {c.peer_id for c in found} == {holder.node_id, other.node_id}  # type: ignore[attr-defined]
        again: list[PeerConnection] = []
        await dialer.each(
            [Candidate(address_of(holder), holder.node_id, "dht")],  # type: ignore[attr-defined]
            token,
            exclude=[holder.node_id],  # type: ignore[attr-defined]
            deliver=again.append,
        )
        assert again == []

    run_dialer_test(body)


def test_each_hands_over_open_and_answering_nodes_before_a_dead_candidate_times_out() -> None:
    """A connection already open, and a candidate that answers, reach the caller while a
    silent candidate's dial still waits out its timeout (a fetch whose relay died waited
    that long beside its new circuit)."""

    async def body(dialer: Dialer, holder: object, other: object, mine: object) -> None:
        token = object()
        holder_node = holder.node_id  # type: ignore[attr-defined]
        other_node = other.node_id  # type: ignore[attr-defined]
        already = await dialer.first([Candidate(address_of(holder), holder_node, "ticket")], token)
        handed: list[NodeId] = []
        both = trio.Event()

        def deliver(conn: PeerConnection) -> None:
            handed.append(conn.peer_id)
            if len(handed) == 2:
                both.set()

        candidates = [
            Candidate(silent_address(), None, "dht"),
            Candidate(address_of(other), other_node, "dht"),
            Candidate(address_of(holder), holder_node, "dht"),
        ]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(dialer.each, candidates, token, exclude=[], deliver=deliver)
            )
            # The silent dial takes the dialer's whole timeout (1 s): both are handed over
            # well before it ends.
            with trio.fail_after(dialer.timeout * 0.8):
                await both.wait()
        assert handed == [holder_node, other_node]  # the open one first
        assert dialer.open_to(holder_node) is already  # reused, not dialled again

    run_dialer_test(body)


# -- observed addresses in the authentication exchange --------------------------------------


@given(
    st.one_of(
        ipv4s,
        st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n))),
    ),
    st.integers(1, 65535),
)
def test_observed_address_round_trips(host: str, port: int) -> None:
    encoded = auth.encode_address(host, port)
    assert auth.decode_address_untrusted(encoded) == (host, port)
    assert auth.parse_accept_untrusted(auth.ACCEPTED + encoded) == (host, port)
    for cut in range(len(encoded)):  # read by length: a prefix is "not yet", never wrong
        assert auth.parse_accept_untrusted(auth.ACCEPTED + encoded[:cut]) is None


@pytest.mark.parametrize(
    "accept",
    [b"\x02", b"\x01\x05" + bytes(6), b"\x01\x04" + bytes(6), b"\x01\x04" + bytes(7) + b"x"],
)
def test_malformed_acceptances_fail_authentication(accept: bytes) -> None:
    with pytest.raises(AuthenticationError):
        auth.parse_accept_untrusted(accept)
