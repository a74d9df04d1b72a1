"""Stripes end to end: real daemons, a real UDP path through the seeded link emulator.

A long path (40 ms round trip, some loss) gets several connections to the one holder; a
short one (loopback) keeps one. Both copies are checked byte for byte, and the holder's log
must show the connections it accepted (the fetcher's own report could be wrong)."""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.linkemu import LinkConditions, LinkForwarder
from p2pfs.address import PeerAddress
from p2pfs.swarm.stripes import DEFAULT_MAX_STRIPES
from p2pfs.wire.ticket import Ticket, parse_ticket_untrusted
from tests.e2e_helpers import content_of, wait_until
from tests.support.daemons import DaemonProcess

MiB = 1 << 20


class FirstConnectionOnly(LinkForwarder):
    """A path that lets one QUIC connection through and no later one (as some middleboxes
    do): once the client has sent a short-header (1-RTT) packet, every long-header packet
    it sends (a new connection's Initial) is dropped."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.established = False
        self.refused = 0

    def _send(self, datagram: bytes, to: tuple[str, int]) -> None:
        if to == self.target:
            if datagram[0] & 0x80 == 0:
                self.established = True
            elif self.established:
                self.refused += 1
                return
        super()._send(datagram, to)


WAN_FLAGS = ("--no-link-datagrams",)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[DaemonProcess, DaemonProcess]]:
    # The emulated path stands for the internet: datagrams of the base size, as the
    # daemons would send there (on loopback they would send up to 60,000 bytes).
    sharer = DaemonProcess(tmp_path / "sharer", extra_args=WAN_FLAGS).start()
    fetcher = DaemonProcess(tmp_path / "fetcher", extra_args=WAN_FLAGS).start()
    yield sharer, fetcher
    fetcher.stop()
    sharer.stop()


def connections_accepted(daemon: DaemonProcess, peer: str) -> int:
    log = (daemon.home / "daemon.log").read_text()
    return sum(1 for line in log.splitlines() if f"peer {peer} connected from" in line)


def shared_file(tmp_path: Path, daemon: DaemonProcess, size: int) -> tuple[bytes, Ticket]:
    data = random.Random(size).randbytes(size)
    source = tmp_path / "payload.bin"
    source.write_bytes(data)
    ticket = parse_ticket_untrusted(str(daemon.cli_json("share", str(source))["ticket"]))
    return data, ticket


def via(real: Ticket, link: LinkForwarder) -> Ticket:
    """The ticket with the link's address in place of the holder's own."""
    return dataclasses.replace(real, addresses=(PeerAddress(*link.address),))


def fetch_through(
    link: LinkForwarder, real: Ticket, fetcher: DaemonProcess, out: Path
) -> dict[str, Any]:
    report: dict[str, Any] = fetcher.cli_json(
        "fetch", via(real, link).encode(), str(out), timeout=240
    )
    return report


def test_a_long_path_is_fetched_over_several_connections(
    tmp_path: Path, pair: tuple[DaemonProcess, DaemonProcess]
) -> None:
    sharer, fetcher = pair
    data, real = shared_file(tmp_path, sharer, 24 * MiB)
    target = real.addresses[0]
    long_path = LinkConditions.path(0.040, 0.002, None)
    with LinkForwarder((target.host, target.port), long_path, seed=7) as link:
        report = fetch_through(link, real, fetcher, tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == data
    [peer] = report["peers"]
    assert peer["connections"] == DEFAULT_MAX_STRIPES
    fetcher_id = str(fetcher.cli_json("status")["node_id"])
    assert connections_accepted(sharer, fetcher_id[:12]) >= DEFAULT_MAX_STRIPES


def test_a_short_path_keeps_one_connection(
    tmp_path: Path, pair: tuple[DaemonProcess, DaemonProcess]
) -> None:
    sharer, fetcher = pair
    data, real = shared_file(tmp_path, sharer, 24 * MiB)
    report = fetcher.cli_json("fetch", real.encode(), str(tmp_path / "out.bin"), timeout=120)
    assert (tmp_path / "out.bin").read_bytes() == data
    [peer] = report["peers"]
    assert peer["connections"] == 1


def test_stripes_that_cannot_connect_end_alone(
    tmp_path: Path, pair: tuple[DaemonProcess, DaemonProcess]
) -> None:
    sharer, fetcher = pair
    # 8 MiB: ~11 s through this path on its one connection, past the stripes' 4 s dial.
    data, real = shared_file(tmp_path, sharer, 8 * MiB)
    target = real.addresses[0]
    with FirstConnectionOnly(
        (target.host, target.port), LinkConditions(delay=0.020, loss=0.005), seed=3
    ) as link:
        report = fetch_through(link, real, fetcher, tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == data
    assert link.refused > 0  # the stripes were tried, and their handshakes dropped
    [peer] = report["peers"]
    assert peer["failed"] is None
    assert peer["connections"] == 1
    assert "a stripe ended" in (fetcher.home / "daemon.log").read_text()


@contextlib.contextmanager
def folder_members(
    tmp_path: Path, size: int
) -> Iterator[tuple[DaemonProcess, DaemonProcess, Ticket, Path, bytes]]:
    """A folder holding one file of ``size`` bytes on A, and B not yet joined: (A, B, the
    folder's read-write ticket, B's folder path, the file's bytes)."""
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir()
    data = random.Random(size).randbytes(size)
    (a_dir / "big.bin").write_bytes(data)
    a = DaemonProcess(tmp_path / "home-a", extra_args=("--no-lan", *WAN_FLAGS)).start()
    b = DaemonProcess(tmp_path / "home-b", extra_args=("--no-lan", *WAN_FLAGS)).start()
    try:
        ticket = parse_ticket_untrusted(str(a.cli_json("sync", str(a_dir))["rw"]))
        yield a, b, ticket, b_dir, data
    finally:
        b.stop()
        a.stop()


def join_through(b: DaemonProcess, b_dir: Path, real: Ticket, link: LinkForwarder) -> None:
    b.cli_json("sync", str(b_dir), via(real, link).encode())


def test_a_folder_joined_over_a_long_path_moves_its_chunks_over_several_connections(
    tmp_path: Path,
) -> None:
    with folder_members(tmp_path, 16 * MiB) as (a, b, real, b_dir, data):
        target = real.addresses[0]
        long_path = LinkConditions.path(0.040, 0.002, None)
        with LinkForwarder((target.host, target.port), long_path, seed=5) as link:
            join_through(b, b_dir, real, link)
            wait_until(lambda: content_of(b_dir / "big.bin") == data, timeout=180)
            b_log = (b.home / "daemon.log").read_text()
            assert f"{DEFAULT_MAX_STRIPES} connections to" in b_log
            status = b.cli_json("status")
            b_id = str(status["node_id"])
            assert connections_accepted(a, b_id[:12]) >= DEFAULT_MAX_STRIPES
            assert "a stripe ended" not in b_log
            assert "no stripe to" not in b_log
            # Each connection carried its share of the chunks: stripes that came up after
            # the transfer began (the trees come pushed, so chunks are asked for at once)
            # took part too, and the link did not queue the file on its own connection.
            a_id = str(real.node_id)
            carried = sorted(
                (
                    int(peer["payload_received"])
                    for peer in status["peers"]
                    if peer["node_id"] == a_id
                ),
                reverse=True,
            )  # B's connections to A, and A's to B (which carry A's requests)
            assert carried[DEFAULT_MAX_STRIPES - 1] >= len(data) // 10, carried


def test_a_folder_link_whose_stripes_cannot_connect_carries_on_alone(tmp_path: Path) -> None:
    with folder_members(tmp_path, 8 * MiB) as (_a, b, real, b_dir, data):
        target = real.addresses[0]
        path = LinkConditions(delay=0.020)
        with FirstConnectionOnly((target.host, target.port), path, seed=4) as link:
            join_through(b, b_dir, real, link)
            wait_until(lambda: content_of(b_dir / "big.bin") == data, timeout=180)
            log = b.home / "daemon.log"
            wait_until(lambda: log.read_text().count("no stripe to") >= 1, timeout=30)
            assert link.refused > 0
            assert "link with" not in log.read_text()  # the link itself never ended
