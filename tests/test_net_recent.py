"""Where the node port sent lately (net/recent.py): a datagram from there proves nothing
about the way in, for KEEP seconds; addresses match however they are written."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from p2pfs.net import recent
from p2pfs.net.recent import KEEP, RecentDestinations


def test_a_destination_counts_for_keep_seconds_however_it_is_written() -> None:
    now = [100.0]
    sent = RecentDestinations(clock=lambda: now[0])
    sent.note(("::ffff:198.51.100.7", 7337, 0, 0))  # as a dual-stack socket writes it
    sent.note(("fe80::1%eth0", 9000))
    assert sent.includes("198.51.100.7", 7337)
    assert not sent.includes("198.51.100.7", 7338)
    assert not sent.includes("198.51.100.8", 7337)
    assert sent.includes("fe80::1", 9000)
    now[0] += KEEP - 1
    assert sent.includes("::ffff:198.51.100.7", 7337)
    now[0] += 1
    assert not sent.includes("198.51.100.7", 7337)


@given(st.lists(st.integers(1, 65535), min_size=1, max_size=300))
def test_stale_destinations_are_swept_and_fresh_ones_kept(ports: list[int]) -> None:
    limit = recent.LIMIT
    recent.LIMIT = 50
    try:
        now = [0.0]
        sent = RecentDestinations(clock=lambda: now[0])
        for port in ports:
            now[0] += KEEP / 40
            sent.note(("203.0.113.1", port))
            assert len(sent) <= 41  # the stale ones leave as new ones come
            assert sent.includes("203.0.113.1", port)
    finally:
        recent.LIMIT = limit


def test_an_overflowing_record_counts_every_address_as_sent_to_for_keep_seconds() -> None:
    """Spoofed Initials make our port answer any number of forged sources: past LIMIT
    the record cannot say where we did not send, so every probe is doubted (the cheaper
    mistake) until KEEP after the last overflow; the record never grows past LIMIT."""
    limit = recent.LIMIT
    recent.LIMIT = 10
    try:
        now = [0.0]
        sent = RecentDestinations(clock=lambda: now[0])
        for port in range(1, 11):
            sent.note(("198.51.100.1", port))
        assert not sent.includes("203.0.113.5", 1)
        now[0] = 1.0
        sent.note(("198.51.100.1", 11))  # one too many
        assert len(sent) == 10
        assert sent.includes("203.0.113.5", 1)
        assert sent.overflowed()
        now[0] = 1.0 + KEEP - 0.5
        assert sent.includes("203.0.113.5", 1)
        now[0] = 1.0 + KEEP
        assert not sent.includes("203.0.113.5", 1)
        sent.note(("198.51.100.1", 12))  # the old ones went stale and leave
        assert len(sent) == 1 and sent.includes("198.51.100.1", 12)
    finally:
        recent.LIMIT = limit


def test_what_comes_in_keeps_a_destination_counted_and_adds_none() -> None:
    """Conntrack keeps a flow alive on traffic either way: a peer that keeps sending from
    a port we sent to once keeps our firewall open to it, and the record follows."""
    now = [0.0]
    sent = RecentDestinations(clock=lambda: now[0])
    sent.note(("198.51.100.1", 4000))
    for _ in range(5):
        now[0] += KEEP / 2
        sent.refresh({("198.51.100.1", 4000), ("198.51.100.2", 4000)})
    assert sent.includes("198.51.100.1", 4000)  # 2.5 KEEP after its only send
    sent.note(("::ffff:203.0.113.9", 5000))  # a DHT contact or punch candidate, so parsed
    for _ in range(5):
        now[0] += KEEP / 2
        sent.refresh({("203.0.113.9", 5000), ("198.51.100.1", 4000)})  # as received
    assert sent.includes("203.0.113.9", 5000)
    assert not sent.includes("198.51.100.2", 4000)  # never sent to: not added
    assert len(sent) == 2
    assert not sent.overflowed()


def test_one_host_changing_its_port_fills_one_entry_not_the_record() -> None:
    """Past PORTS_PER_HOST ports, a host counts with every port: a host that changes its
    source port for each Initial (each gets an answer) cannot overflow the record."""
    now = [0.0]
    sent = RecentDestinations(clock=lambda: now[0])
    for port in range(1, 5001):
        sent.note(("198.51.100.9", port))
    assert len(sent) == recent.PORTS_PER_HOST + 1
    assert not sent.overflowed()
    assert sent.includes("198.51.100.9", 60000)  # any port of that host now
    assert not sent.includes("198.51.100.10", 1)
    now[0] = KEEP
    sent.note(("198.51.100.9", 4000))  # the old entries went stale: one by one again
    assert len(sent) == 1 and not sent.includes("198.51.100.9", 8)
    assert sent.includes("198.51.100.9", 4000)
