"""`first_of` returns when any one of its events is set, and not before."""

from __future__ import annotations

import trio
import trio.testing

from p2pfs.waits import first_of


def test_returns_when_the_second_event_is_set() -> None:
    trio.run(_second_event_set)


async def _second_event_set() -> None:
    first, second = trio.Event(), trio.Event()
    returned = trio.Event()

    async def waiter() -> None:
        await first_of(first, second)
        returned.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert not returned.is_set()
        second.set()
        await returned.wait()
    assert not first.is_set()


def test_returns_at_once_when_an_event_is_already_set() -> None:
    trio.run(_already_set)


async def _already_set() -> None:
    already = trio.Event()
    already.set()
    with trio.fail_after(5):
        await first_of(trio.Event(), already, trio.Event())
