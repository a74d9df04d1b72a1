"""MainlineFinder: libtorrent DHT sessions on 127.0.0.1 finding each other's announcements."""

from __future__ import annotations

import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pfs.discovery.keys import share_discovery_key
from p2pfs.discovery.mainline import (
    MainlineFinder,
    Pointer,
    _libtorrent_secret_key,
    _MutableItem,
    pointer_from_item_untrusted,
    pointer_public_key,
    pointer_signed_message,
)
from p2pfs.errors import IntegrityError, LocalProtocolError, RemoteProtocolError
from p2pfs.ids import ContentHash
from p2pfs.wire.ticket import PeerAddress

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
    """BEP 5 has no delete: withdrawing means the key leaves the re-announce schedule."""
    announced: list[bytes] = []

    async def main() -> None:
        async with loopback_dht(3, reannounce_interval=0.5) as finders:
            await finders[0].announce(KEY)
            await finders[0].announce(OTHER_KEY)
            await eventually(lambda: _has(finders[1], KEY))
            await finders[0].withdraw(KEY)
            # The schedule keeps only the other key: it is re-announced, KEY never again.
            assert set(finders[0]._announces) == {OTHER_KEY}
            before = finders[0]._announces[OTHER_KEY]
            await trio.sleep(1.2)
            assert finders[0]._announces[OTHER_KEY] > before
            announced.extend(finders[0]._announces)

    trio.run(main)
    assert announced == [OTHER_KEY]


async def _has(finder: MainlineFinder, key: bytes) -> bool:
    return bool(await finder.find(key))


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


async def resolve_eventually(
    finder: MainlineFinder, public_key: bytes, salt: bytes, seq: int
) -> Pointer:
    """The DHT is eventually consistent: on a loaded machine one traversal may come back
    before the put has settled, so ask again until the expected version shows (bounded)."""
    with trio.fail_after(30):
        while True:
            got = await finder.resolve_pointer(public_key, salt=salt)
            if got is not None and got.seq >= seq:
                return got


def test_pointer_publish_resolve_and_update() -> None:
    seed = b"\x07" * 32
    public_key = pointer_public_key(seed)

    async def main() -> None:
        async with loopback_dht(3) as finders:
            assert await finders[2].resolve_pointer(public_key, timeout=3) is None
            put = await finders[0].publish_pointer(seed, b"root-1", salt=b"folder")
            assert put.seq == 1
            assert put.stored_on >= 1
            got = await resolve_eventually(finders[2], public_key, b"folder", seq=1)
            assert (got.value, got.seq, got.salt) == (b"root-1", 1, b"folder")
            # A second writer with the same key (another device of the folder) moves it on.
            put = await finders[1].publish_pointer(seed, b"root-2", salt=b"folder")
            assert put.seq == 2
            got = await resolve_eventually(finders[0], public_key, b"folder", seq=2)
            assert (got.value, got.seq) == (b"root-2", 2)
            # Another salt under the same key is another pointer.
            assert await finders[0].resolve_pointer(public_key, salt=b"x", timeout=3) is None
            with pytest.raises(LocalProtocolError):
                await finders[0].publish_pointer(seed, b"x" * 2000)

    trio.run(main)


def test_pointer_signature_is_checked() -> None:
    seed = b"\x05" * 32
    key = Ed25519PrivateKey.from_private_bytes(seed)
    public_key = pointer_public_key(seed)
    signature = key.sign(pointer_signed_message(b"s", 3, b"v"))
    good = _MutableItem(public_key, b"s", 3, b"v", signature, True)
    pointer = pointer_from_item_untrusted(good)
    assert pointer is not None
    assert pointer.value == b"v"
    with pytest.raises(IntegrityError):
        pointer_from_item_untrusted(_MutableItem(public_key, b"s", 4, b"v", signature, True))
    with pytest.raises(RemoteProtocolError):
        pointer_from_item_untrusted(_MutableItem(public_key, b"s", 3, {b"a": 1}, signature, True))
    assert pointer_from_item_untrusted(_MutableItem(public_key, b"", 0, b"", b"", True)) is None
    # The expanded secret libtorrent signs with is the clamped SHA-512 of the seed.
    assert len(_libtorrent_secret_key(seed)) == 64


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
