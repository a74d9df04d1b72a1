"""Waiting on several trio events at once (trio has no built-in for it)."""

from __future__ import annotations

import trio


async def first_of(*events: trio.Event) -> None:
    """Return as soon as any of ``events`` is set (at once if one already is)."""
    async with trio.open_nursery() as nursery:

        async def wait_for(event: trio.Event) -> None:
            await event.wait()
            nursery.cancel_scope.cancel()

        for event in events:
            nursery.start_soon(wait_for, event)
