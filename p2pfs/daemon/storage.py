"""The daemon's access to the index: blocking SQLite calls run in a worker thread, one at a
time (the index has one connection), without ever blocking the trio loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import ParamSpec, TypeVar

import trio

from p2pfs.store.index import IndexStore

P = ParamSpec("P")
T = TypeVar("T")


class AsyncIndex:
    def __init__(self, index: IndexStore) -> None:
        self.index = index
        self._lock = trio.Lock()

    async def run(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Call ``function(*args)`` in a thread while holding the index."""
        async with self._lock:
            return await trio.to_thread.run_sync(lambda: function(*args, **kwargs))


async def in_thread(function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Blocking file I/O that does not touch the index (reads and writes of data)."""
    return await trio.to_thread.run_sync(lambda: function(*args, **kwargs))
