"""MainlineFinder: libtorrent DHT sessions on 127.0.0.1 finding each other's announcements."""

from __future__ import annotations

import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trio

from p2pfs.address import PeerAddress
from p2pfs.discovery.keys import mainline_info_hash, share_discovery_key
from p2pfs.discovery.mainline import MainlineFinder
from p2pfs.errors import LocalProtocolError
from p2pfs.ids import ContentHash

KEY = share_discovery_key(ContentHash(b"\x11" * 32))
OTHER_KEY = share_discovery_key(ContentHash(b"\x22" * 32))


@asynccontextmanager
async def loopback_dht(count: int, **kwargs: float) -> AsyncIterator[list[MainlineFinder]]:
    """``count`` finders on 127.0.0.1, each told about every other, with test timings."""
    finders = [
        MainlineFinder(
            20000 + index,
            loopback_testing=True,
            find_timeout=kwargs.get("find_timeout", 1.5),
            find_settle=0.2,
            reannounce_interval=kwargs.get("reannounce_interval", 600.0),
        )
        for index in range(count)
    ]
    async with trio.open_nursery() as nursery:
        for finder in finders:
            await nursery.start(finder.serve)
        for finder in finders:
            for other in finders:
                if other is not finder:
                    finder.add_dht_node("127.0.0.1", other.dht_port)
        yield finders
        nursery.cancel_scope.cancel()


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not await check():
            await trio.sleep(0.2)


def test_announce_on_one_find_from_others() -> None:
    threads_before = threading.active_count()

    async def main() -> None:
        async with loopback_dht(4) as finders:
            assert all(f.dht_port > 0 for f in finders)
            assert len({f.dht_port for f in finders}) == 4
            await finders[0].announce(KEY)

            async def found_everywhere() -> bool:
                for finder in finders[1:]:
                    providers = await finder.find(KEY)
                    if [p.address for p in providers] != [PeerAddress("127.0.0.1", 20000)]:
                        return False
                    assert providers[0].node_id is None
                    assert providers[0].source == "mainline"
                return True

            await eventually(found_everywhere)
            # A key nobody announced: the lookup ends empty at its deadline.
            assert await finders[1].find(OTHER_KEY) == []
            # Our own record is not offered back to us.
            assert await finders[0].find(KEY) == []

    trio.run(main)
    assert threading.active_count() == threads_before


def test_two_providers_and_limit() -> None:
    async def main() -> None:
        async with loopback_dht(3) as finders:
            await finders[0].announce(KEY)
            await finders[1].announce(KEY)

            async def both() -> bool:
                found = await finders[2].find(KEY)
                return {p.address.port for p in found} == {20000, 20001}

            await eventually(both)
            assert len(await finders[2].find(KEY, limit=1)) == 1

    trio.run(main)


def test_withdraw_stops_reannouncing() -> None:
    """BEP 5 has no delete: withdrawing means the key leaves the re-announce schedule.

    Seen from the DHT: the other nodes count the announces they receive per info-hash. After
    the withdrawal, three more rounds of the kept key arrive; of the withdrawn key at most
    one more (a traversal already under way when it was withdrawn), never one per round.
    """
    kept, withdrawn = mainline_info_hash(OTHER_KEY), mainline_info_hash(KEY)

    async def main() -> None:
        async with loopback_dht(3, reannounce_interval=0.5) as finders:
            provider, storers = finders[0], finders[1:]
            await provider.announce(KEY)
            await provider.announce(OTHER_KEY)

            async def both_arrived() -> bool:
                await trio.lowlevel.checkpoint()
                return all(s.announces_received[h] for s in storers for h in (kept, withdrawn))

            await eventually(both_arrived)
            await provider.withdraw(KEY)
            before = [
                (s.announces_received[kept], s.announces_received[withdrawn]) for s in storers
            ]

            async def three_more_rounds() -> bool:
                await trio.lowlevel.checkpoint()
                return all(
                    s.announces_received[kept] >= counts[0] + 3
                    for s, counts in zip(storers, before, strict=True)
                )

            await eventually(three_more_rounds)
            for storer, (_, withdrawn_before) in zip(storers, before, strict=True):
                assert storer.announces_received[withdrawn] <= withdrawn_before + 1

    trio.run(main)


def test_busy_port_is_an_error_and_serve_is_once() -> None:
    async def main() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
            busy.bind(("127.0.0.1", 0))
            port = busy.getsockname()[1]
            finder = MainlineFinder(7337, listen_port=port, loopback_testing=True)
            with pytest.raises(OSError, match="cannot listen"):
                await finder.serve()
            with pytest.raises(LocalProtocolError):
                await finder.serve()
        idle = MainlineFinder(7337, loopback_testing=True)
        with pytest.raises(LocalProtocolError):
            await idle.find(KEY)

    trio.run(main)
    with pytest.raises(LocalProtocolError):
        MainlineFinder(0)


class BrokenFinder(MainlineFinder):
    @staticmethod
    def _translate(alert: object) -> None:
        raise ZeroDivisionError("alert conversion failed")


def test_alert_thread_failure_ends_serve() -> None:
    threads_before = threading.active_count()

    async def main() -> None:
        finder = BrokenFinder(7337, loopback_testing=True)
        with pytest.RaisesGroup(pytest.RaisesGroup(ZeroDivisionError)):
            async with trio.open_nursery() as nursery:
                await nursery.start(finder.serve)
                # The next alert reaches the broken conversion; serve raises its error.
                finder._require_session().post_dht_stats()
                await trio.sleep(5)
                raise AssertionError("serve did not fail")

    trio.run(main)
    assert threading.active_count() == threads_before
