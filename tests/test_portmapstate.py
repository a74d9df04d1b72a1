"""The port mapping's state without I/O: what the gateway said, what to advertise, when to
ask again (p2pfs/daemon/portmapstate.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from p2pfs.address import PeerAddress
from p2pfs.daemon.addresses import AddressBook
from p2pfs.daemon.portmapstate import (
    RETRY_AFTER,
    ExternalIp,
    MapEvent,
    MapFailed,
    Mapped,
    PortMapState,
)


def test_requesting_until_a_transport_answers() -> None:
    state = PortMapState(7337, now=0.0)
    assert state.state == "requesting" and state.external() is None
    assert state.retry_at() is None


def test_mapped_needs_the_external_ip_too() -> None:
    state = PortMapState(7337, now=0.0)
    state.handle(Mapped("natpmp", 40000))
    assert state.state == "mapped" and state.external() is None
    state.handle(ExternalIp("203.0.113.9"))
    assert state.external() == PeerAddress("203.0.113.9", 40000)
    assert state.info() == {
        "protocol": "udp",
        "local_port": 7337,
        "external": "203.0.113.9:40000",
        "state": "mapped",
        "via": ["natpmp"],
        "errors": {},
    }


def test_one_transport_failing_leaves_the_other_mapped() -> None:
    state = PortMapState(7337, now=0.0)
    state.handle(ExternalIp("198.51.100.1"))
    state.handle(MapFailed("natpmp", "no gateway"))
    assert state.state == "requesting"
    state.handle(Mapped("upnp", 7337))
    assert state.state == "mapped" and state.external() == PeerAddress("198.51.100.1", 7337)
    assert state.retry_at() is None


def test_a_gateway_without_an_external_ip_gives_no_address() -> None:
    state = PortMapState(7337, now=0.0)
    state.handle(Mapped("upnp", 7337))
    state.handle(ExternalIp("0.0.0.0"))
    assert state.external() is None


def test_all_transports_failing_schedules_retries_with_backoff() -> None:
    state = PortMapState(7337, now=10.0)
    state.handle(MapFailed("upnp", "timed out"))
    state.handle(MapFailed("natpmp", "refused"))
    assert state.state == "failed"
    assert state.retry_at() == 10.0 + RETRY_AFTER[0]
    assert state.errors() == {"upnp": "timed out", "natpmp": "refused"}
    # A second error in the same round does not count as another round.
    state.handle(MapFailed("upnp", "timed out"))
    assert state.retry_at() == 10.0 + RETRY_AFTER[0]
    now = 10.0
    for delay in (*RETRY_AFTER[1:], RETRY_AFTER[-1], RETRY_AFTER[-1]):
        now += 1000.0
        state.requested(now)
        assert state.state == "requesting" and state.retry_at() is None
        state.handle(MapFailed("upnp", "timed out"))
        state.handle(MapFailed("natpmp", "timed out"))
        assert state.retry_at() == now + delay


def test_a_success_resets_the_backoff_and_a_refused_renewal_ends_the_mapping() -> None:
    state = PortMapState(7337, now=0.0)
    for transport in ("upnp", "natpmp"):
        state.handle(MapFailed(transport, "x"))
    state.requested(100.0)
    state.handle(Mapped("upnp", 7337))
    state.handle(ExternalIp("192.0.2.7"))
    assert state.state == "mapped"
    state.handle(MapFailed("upnp", "lease refused"))
    assert state.external() is None
    state.handle(MapFailed("natpmp", "x"))
    assert state.retry_at() == 100.0 + RETRY_AFTER[0]


events = st.one_of(
    st.builds(Mapped, st.sampled_from(["upnp", "natpmp"]), st.integers(-5, 70000)),
    st.builds(MapFailed, st.sampled_from(["upnp", "natpmp"]), st.text(max_size=5)),
    st.builds(ExternalIp, st.sampled_from(["0.0.0.0", "192.0.2.1", "junk", "::1", "2001:db8::1"])),
)


@given(st.lists(events, max_size=30))
def test_whatever_the_gateway_says_the_state_stays_coherent(history: list[MapEvent]) -> None:
    state = PortMapState(7337, now=0.0)
    for event in history:
        state.handle(event)
        external = state.external()
        assert (external is not None) <= (state.state == "mapped")
        if external is not None:
            assert 0 < external.port < 65536 and external.host not in ("0.0.0.0", "::1")
        assert (state.retry_at() is not None) == (state.state == "failed")


def test_the_gateway_mapping_is_advertised_first_among_its_rank() -> None:
    book = AddressBook("0.0.0.0", 7337)
    assert book.wildcard and book.gateway_mapping is None
    mapped = PeerAddress("1.2.3.4", 40000)  # a global address: rank 0, first of its rank
    book.mapped(mapped)
    assert book.all()[0] == mapped and book.gateway_mapping == mapped
    assert book.for_ticket()[0] == mapped
    book.mapped(None)
    assert mapped not in book.all()
    assert not AddressBook("127.0.0.1", 7337).wildcard
