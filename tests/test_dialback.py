"""Dial-back reachability checks: the verdict's rules (sans-I/O, hypothesis), the control
frames, and the exchange over real QUIC and UDP on loopback against a real daemon that
answers: its probes arrive at the port asked for, come from a port of their own, never go
to an address other than the connection's, and a peer asking too often is refused."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from p2pfs.daemon.addresses import AddressBook, interface_networks, on_our_links
from p2pfs.daemon.dialback import (
    Answer,
    DialBackService,
    family_of,
    probe_target,
    same_slash64,
)
from p2pfs.daemon.reachability import (
    CONFIRM_SOON,
    OUTCOME_TTL,
    PLACES_KEPT,
    RECHECK,
    Outcome,
    Reachability,
    Verdict,
)
from p2pfs.errors import ConnectionClosedError, StreamResetError
from p2pfs.identity import Identity
from p2pfs.net import Endpoint, PeerConnection, open_endpoint, recent
from p2pfs.net.control import (
    NONCE_LEN,
    ControlError,
    ControlKind,
    Decoder,
    DialBack,
    Probed,
    Refuse,
    RefuseCode,
    Register,
    encode,
    parse_untrusted,
    probe_datagram,
    probe_nonce_untrusted,
)
from tests.support.daemons import DaemonProcess

# -- the verdict ------------------------------------------------------------------------------


def test_no_outcome_is_unknown_and_due_at_once() -> None:
    reach = Reachability()
    assert reach.verdict(4, 100.0) is Verdict.UNKNOWN
    assert not reach.unreachable(100.0)
    assert reach.due(4, 100.0) == 100.0


def test_one_probe_that_never_arrived_is_unreachable_and_asks_another_place_soon() -> None:
    reach = Reachability()
    reach.record(4, "198.51.100.0/24", Outcome(False, 10.0, "a"))
    assert reach.verdict(4, 11.0) is Verdict.UNREACHABLE
    assert reach.unreachable(11.0)
    assert reach.verdict(6, 11.0) is Verdict.UNKNOWN
    assert reach.due(4, 11.0) == 10.0 + CONFIRM_SOON


def test_places_that_disagree_are_asked_soon_and_the_majority_decides() -> None:
    """A tie (a neighbour inside our firewall against a peer beyond it, or a peer whose own
    network drops its probes against one that reached us) is unreachable, whichever spoke
    first; more places are asked soon; the majority decides."""
    reach = Reachability()
    reach.record(6, "2001:db8:1::/48", Outcome(True, 10.0, "a"))  # inside our firewall
    assert reach.verdict(6, 10.5) is Verdict.REACHABLE
    reach.record(6, "2001:db8:2::/48", Outcome(False, 11.0, "b"))
    assert reach.verdict(6, 11.5) is Verdict.UNREACHABLE
    assert reach.unreachable(11.5)
    assert reach.due(6, 11.5) == 11.0 + CONFIRM_SOON
    assert reach.confirming(6, 11.5)
    reach.record(6, "2001:db8:3::/48", Outcome(True, 12.0, "c"))
    assert reach.verdict(6, 13.0) is Verdict.REACHABLE
    assert not reach.unreachable(13.0)
    assert reach.due(6, 13.0) == 12.0 + CONFIRM_SOON
    reach.record(6, "2001:db8:2::/48", Outcome(True, 14.0, "b"))  # b's network let it out
    assert reach.due(6, 15.0) == 14.0 + RECHECK
    assert not reach.confirming(6, 15.0)


def test_a_place_heard_from_is_asked_again_once_the_recheck_is_due() -> None:
    """Confirming (one place, or places that disagree) asks new places only, but not for
    ever: after RECHECK any place may answer again, before its outcome expires and the
    family falls back to unknown (a node whose one peer is its own server flapped hourly)."""
    reach = Reachability()
    reach.record(4, "198.51.100.0/24", Outcome(False, 0.0, "a"))
    assert reach.confirming(4, 1.0) and reach.due(4, 1.0) == CONFIRM_SOON
    assert reach.confirming(4, RECHECK - 1)
    assert not reach.confirming(4, RECHECK)
    assert reach.due(4, RECHECK) == RECHECK
    assert reach.verdict(4, RECHECK) is Verdict.UNREACHABLE


def test_a_place_speaks_by_its_newest_outcome_and_outcomes_expire() -> None:
    reach = Reachability()
    place = "203.0.113.0/24"
    reach.record(4, place, Outcome(True, 0.0, "a"))
    reach.record(4, place, Outcome(False, 5.0, "b"))  # the firewall went up since
    assert reach.verdict(4, 6.0) is Verdict.UNREACHABLE
    assert reach.verdict(4, 5.0 + OUTCOME_TTL) is Verdict.UNKNOWN
    reach.record(4, place, Outcome(True, 7.0, "a"))
    reach.forget()  # another network
    assert reach.verdict(4, 8.0) is Verdict.UNKNOWN


@given(
    st.lists(
        st.tuples(st.sampled_from([4, 6]), st.integers(0, 12), st.booleans(), st.floats(0, 600)),
        max_size=40,
    ),
    st.floats(0, 2 * OUTCOME_TTL),
)
def test_the_verdict_follows_each_places_newest_outcome(
    records: list[tuple[int, int, bool, float]], later: float
) -> None:
    """Against a plain model: per family the newest outcome of each of the last
    PLACES_KEPT places heard from; reachable if more of those within the TTL arrived
    than not, else unreachable; checked again soon while they disagree or one place
    alone speaks."""
    reach = Reachability()
    model: dict[int, dict[str, tuple[bool, float]]] = {4: {}, 6: {}}
    now = 0.0
    for family, place_number, reached, step in records:
        now += step
        place = f"place-{place_number}"
        reach.record(family, place, Outcome(reached, now, "x"))
        model[family].pop(place, None)
        model[family][place] = (reached, now)
        while len(model[family]) > PLACES_KEPT:
            del model[family][next(iter(model[family]))]
    at = now + later
    for family in (4, 6):
        live = [reached for reached, when in model[family].values() if at - when < OUTCOME_TTL]
        arrived = sum(live)
        expected = (
            Verdict.UNKNOWN
            if not live
            else Verdict.REACHABLE
            if arrived > len(live) - arrived
            else Verdict.UNREACHABLE
        )
        assert reach.verdict(family, at) is expected
        assert reach.due(family, at) <= at + RECHECK
        if live and 0 < arrived < len(live) < PLACES_KEPT:
            assert reach.due(family, at) <= at + CONFIRM_SOON
    info = reach.info(at)
    assert {f: info[f"ipv{f}"]["verdict"] for f in (4, 6)} == {
        f: reach.verdict(f, at).value for f in (4, 6)
    }


# -- frames -----------------------------------------------------------------------------------


@given(
    st.binary(min_size=NONCE_LEN, max_size=NONCE_LEN),
    st.integers(1, 65535),
    st.none() | st.ip_addresses(v=6).map(str),
)
def test_dial_back_frames_round_trip(nonce: bytes, port: int, host: str | None) -> None:
    decoder = Decoder()
    decoder.feed(encode(DialBack(nonce, port, host)) + encode(Probed()))
    assert decoder.next_untrusted() == DialBack(nonce, port, host)
    assert decoder.next_untrusted() == Probed()
    assert probe_nonce_untrusted(probe_datagram(nonce)) == nonce


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        (0x08, bytes(NONCE_LEN)),  # no port
        (0x08, bytes(NONCE_LEN + 3)),  # a byte too many
        (0x08, bytes(NONCE_LEN + 1) + b"\x01" + bytes(4)),  # an address, but not IPv6
        (0x08, bytes(NONCE_LEN + 2)),  # port 0
        (0x09, b"\x00"),  # PROBED carries nothing
    ],
)
def test_malformed_dial_back_frames_are_protocol_errors(kind: int, body: bytes) -> None:
    with pytest.raises(ControlError):
        parse_untrusted(kind, body)


@given(st.binary(max_size=40))
def test_only_a_whole_probe_datagram_has_a_nonce(data: bytes) -> None:
    nonce = probe_nonce_untrusted(data)
    assert (nonce is not None) == (len(data) == 1 + NONCE_LEN and data[0] == 0x05)


def test_slash64() -> None:
    v6 = ipaddress.IPv6Address
    assert same_slash64(v6("2001:db8:1:2::1"), v6("2001:db8:1:2:aaaa:bbbb:cccc:dddd"))
    assert not same_slash64(v6("2001:db8:1:2::1"), v6("2001:db8:1:3::1"))


@given(st.ip_addresses(), st.none() | st.ip_addresses(v=6), st.integers(1, 65535))
def test_probes_go_to_the_connections_address_or_its_own_slash64(
    remote: ipaddress.IPv4Address | ipaddress.IPv6Address,
    named: ipaddress.IPv6Address | None,
    port: int,
) -> None:
    request = DialBack(bytes(NONCE_LEN), port, None if named is None else str(named))
    assert probe_target("relayed", str(remote), request) is None
    target = probe_target("direct", str(remote), request)
    if target is None:
        return
    host = ipaddress.ip_address(target[0])
    assert target[1] == port
    assert not (host.is_multicast or host.is_unspecified or host.is_link_local)
    if named is None:
        assert host == (getattr(remote, "ipv4_mapped", None) or remote)
    else:
        assert host == named and isinstance(remote, ipaddress.IPv6Address)
        assert same_slash64(named, remote)
        assert named.ipv4_mapped is None and named.teredo is None and not named.is_loopback


@pytest.mark.parametrize(
    ("remote", "named"),
    [
        ("::1", "::ffff:192.0.2.1"),  # v4-mapped: would go to an IPv4 host
        ("64:ff9b::c000:201", "64:ff9b::c633:6401"),  # NAT64: any IPv4 host
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "2001:0:4136:e378::1"),  # Teredo
        ("2001:db8:1:2::1", "2001:db8:1:3::1"),  # another /64
    ],
)
def test_a_named_address_that_stands_for_other_hosts_is_refused(remote: str, named: str) -> None:
    assert probe_target("direct", remote, DialBack(bytes(NONCE_LEN), 7337, named)) is None


def test_on_our_links_and_families() -> None:
    networks = interface_networks()
    assert on_our_links("127.0.0.1", networks) and on_our_links("fe80::1%eth0", networks)
    assert not on_our_links("192.0.2.1", [])
    assert family_of("::ffff:192.0.2.1") == 4 and family_of("2001:db8::1") == 6
    assert family_of("example.org") is None


# -- the exchange, against a real daemon ------------------------------------------------------


@pytest.fixture
def answerer(tmp_path: Path) -> Iterator[tuple[DaemonProcess, tuple[str, int]]]:
    daemon = DaemonProcess(tmp_path / "answerer", extra_args=("--no-lan",))
    daemon.start()
    try:
        host, port = daemon.call("id")["addresses"][0].rsplit(":", 1)
        yield daemon, (host, int(port))
    finally:
        daemon.stop()


def run_asker(
    address: tuple[str, int],
    body: Callable[[Endpoint, PeerConnection, DialBackService], Awaitable[None]],
    *,
    port: int | None = None,
    bound: str | None = None,
) -> None:
    """An asking node: a real endpoint and its dial-back service (``port``: the port it
    names, its own by default; ``bound``: the address it believes it has), connected to
    the daemon at ``address``."""

    async def main() -> None:
        with trio.fail_after(60):
            async with open_endpoint(Identity.generate()) as endpoint:
                host, own_port = endpoint.local_address[:2]
                book = AddressBook(bound or host, port or own_port)
                service = DialBackService(endpoint, book, Reachability())
                async with trio.open_nursery() as nursery:
                    await nursery.start(service.serve)
                    conn = await endpoint.connect(address, None)
                    await body(endpoint, conn, service)
                    nursery.cancel_scope.cancel()

    trio.run(main)


def test_the_probe_of_a_daemon_arrives_and_a_second_ask_is_refused(
    answerer: tuple[DaemonProcess, tuple[str, int]],
) -> None:
    daemon, address = answerer

    async def body(endpoint: Endpoint, conn: PeerConnection, service: DialBackService) -> None:
        request = service.request_for(conn)
        assert request is not None and request.host is None
        assert request.port == endpoint.local_address[1]
        assert await service.ask(conn, request) is Answer.REACHED
        # BUSY: once per ANSWER_EVERY per place, whatever the NodeId (this is another).
        async with open_endpoint(Identity.generate()) as other:
            again = await other.connect(address, None)
            assert await service.ask(again, service.request_for(conn)) is Answer.BUSY  # type: ignore[arg-type]

    run_asker(address, body)
    assert daemon.process is not None and daemon.process.poll() is None


def test_a_probe_that_cannot_arrive_counts_as_unreachable(
    answerer: tuple[DaemonProcess, tuple[str, int]],
) -> None:
    """The asker names a port where nothing listens (as a firewall would drop the probe):
    the daemon says PROBED, no probe comes, the answer is False."""
    _daemon, address = answerer
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    nowhere = closed.getsockname()[1]
    closed.close()

    async def body(endpoint: Endpoint, conn: PeerConnection, service: DialBackService) -> None:
        request = service.request_for(conn)
        assert request is not None and request.port == nowhere
        assert await service.ask(conn, request) is Answer.NOT_REACHED

    run_asker(address, body, port=nowhere)


def test_nothing_is_asked_about_an_address_we_do_not_advertise(
    answerer: tuple[DaemonProcess, tuple[str, int]],
) -> None:
    """The peer sees us at 127.0.0.1, we advertise 127.0.0.2 only: a verdict would be about
    an address nobody is told of. And an IPv6 address named on an IPv4 connection (it
    must share the /64 of the connection's address) is refused, not probed."""
    _daemon, address = answerer

    async def body(endpoint: Endpoint, conn: PeerConnection, service: DialBackService) -> None:
        assert service.request_for(conn) is None
        stray = DialBack(bytes(NONCE_LEN), endpoint.local_address[1], "2001:db8::1")
        stream = await conn.open_control(ControlKind.DIAL_BACK, encode(stray))
        decoder = Decoder()
        while (answer := decoder.next_untrusted()) is None:
            decoder.feed(await stream.receive_some())
        assert isinstance(answer, Refuse) and answer.code is RefuseCode.UNEXPECTED

    run_asker(address, body, bound="127.0.0.2")


def test_the_probes_come_from_another_port_and_only_to_the_connections_address(
    answerer: tuple[DaemonProcess, tuple[str, int]],
) -> None:
    """Listening ourselves at the port we name: three probes with our nonce, none from the
    daemon's own port (a firewall that saw our packets to that port would let them in)."""
    _daemon, address = answerer
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("127.0.0.1", 0))
    listener.settimeout(5)
    nonce = bytes(range(NONCE_LEN))

    async def body(endpoint: Endpoint, conn: PeerConnection, service: DialBackService) -> None:
        stream = await conn.open_control(
            ControlKind.DIAL_BACK, encode(DialBack(nonce, listener.getsockname()[1]))
        )
        decoder = Decoder()
        while (answer := decoder.next_untrusted()) is None:
            decoder.feed(await stream.receive_some())
        assert answer == Probed()

    try:
        run_asker(address, body)
        sources = set()
        for _ in range(3):
            data, source = listener.recvfrom(64)
            assert data == probe_datagram(nonce)
            sources.add(source)
        assert len(sources) == 1
        (source,) = sources
        assert source[0] == address[0] and source[1] != address[1]
    finally:
        listener.close()


def test_a_malformed_dial_back_stream_ends_alone(
    answerer: tuple[DaemonProcess, tuple[str, int]],
) -> None:
    """A dial-back stream that starts with another frame, or with junk, is reset; the
    connection and the daemon carry on and answer a proper ask."""
    daemon, address = answerer

    async def body(endpoint: Endpoint, conn: PeerConnection, service: DialBackService) -> None:
        for first in (encode(Register()), b"\xff\xff\x08"):
            stream = await conn.open_control(ControlKind.DIAL_BACK, first)
            with pytest.raises((StreamResetError, ConnectionClosedError)):
                while await stream.receive_some():
                    pass
        request = service.request_for(conn)
        assert request is not None
        assert await service.ask(conn, request) is Answer.REACHED

    run_asker(address, body)
    assert daemon.process is not None and daemon.process.poll() is None
    assert "Traceback" not in daemon.log_path.read_text()


@pytest.mark.parametrize("probe_from", ["its node port", "a port it made us send to", "its own"])
def test_a_probe_from_where_we_sent_proves_nothing(
    probe_from: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A lying peer sends the probe from its connection's own port, or from a port it got
    our node port to send to (as a DHT contact or a punch candidate it named would), where
    a stateful firewall lets it in: the asker must not count it as reached. The same peer
    probing from a socket of its own is believed (the test can fail both ways)."""
    decoy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    decoy.bind(("127.0.0.1", 0))

    async def liar(conn: PeerConnection) -> None:
        kind, stream = await conn.accept_control()
        assert kind is ControlKind.DIAL_BACK
        decoder = Decoder()
        while (request := decoder.next_untrusted()) is None:
            decoder.feed(await stream.receive_some())
        assert isinstance(request, DialBack)
        target = (str(conn.remote_address[0]), request.port)
        if probe_from == "its own":
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as own:
                own.sendto(probe_datagram(request.nonce), target)
        elif probe_from == "a port it made us send to":
            decoy.sendto(probe_datagram(request.nonce), target)
        else:
            liar_endpoint[0].send_threadsafe(probe_datagram(request.nonce), target)
        await stream.send_all(encode(Probed()))
        await stream.aclose()
        await trio.sleep(5)

    liar_endpoint: list[Endpoint] = []

    async def main() -> None:
        with trio.fail_after(30):
            async with (
                open_endpoint(Identity.generate(), handler=liar) as lying,
                open_endpoint(Identity.generate()) as endpoint,
            ):
                liar_endpoint.append(lying)
                host, own_port = endpoint.local_address[:2]
                service = DialBackService(endpoint, AddressBook(host, own_port), Reachability())
                async with trio.open_nursery() as nursery:
                    await nursery.start(service.serve)
                    conn = await endpoint.connect(lying.local_address, None)
                    # What a DHT request to a contact the liar named does.
                    endpoint.send_threadsafe(b"\x64", decoy.getsockname())
                    request = service.request_for(conn)
                    assert request is not None
                    honest = probe_from == "its own"
                    expected = Answer.REACHED if honest else Answer.NOT_REACHED
                    assert await service.ask(conn, request) is expected
                    ignored = "where we sent, ignored" in caplog.text
                    assert ignored is not honest
                    nursery.cancel_scope.cancel()

    caplog.set_level("INFO", logger="p2pfs.daemon.dialback")
    try:
        trio.run(main)
    finally:
        decoy.close()


def test_while_the_sent_to_record_overflows_an_ask_decides_nothing_but_never_unknown(
    answerer: tuple[DaemonProcess, tuple[str, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Flooded with Initials from changing source ports, our record of where we sent
    overflows and cannot vouch for any probe: the ask is undecided, and a family whose
    every outcome expired meanwhile reads unreachable (a relay), never unknown."""
    _daemon, address = answerer
    monkeypatch.setattr(recent, "LIMIT", 8)

    async def body(endpoint: Endpoint, conn: PeerConnection, service: DialBackService) -> None:
        for port in range(1, 20):
            endpoint.sent_to.note(("203.0.113.77", port))
        assert endpoint.sent_to.overflowed()
        request = service.request_for(conn)
        assert request is not None
        assert await service.ask(conn, request) is Answer.UNDECIDED
        assert service.reachability.verdict(4, trio.current_time()) is Verdict.UNKNOWN
        await service._ask(conn, 4)
        assert service.reachability.verdict(4, trio.current_time()) is Verdict.UNREACHABLE

    run_asker(address, body)
