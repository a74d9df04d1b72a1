"""The seam every discovery backend implements, and a real in-memory backend for tests."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import trio

from p2pfs.address import PeerAddress


@dataclass(frozen=True, slots=True)
class Provider:
    """A node that says it holds the content behind a discovery key.

    ``node_id`` is known when the record carries it (our DHT, LAN beacons) and lets the
    fetcher pin the peer's key; Mainline records carry only an address, and then the
    content's hashes are the only check (which is enough: nothing unverified is written).
    """

    address: PeerAddress
    node_id: bytes | None = None
    source: str = ""


class Finder(Protocol):
    """A discovery backend. ``serve`` is started with ``nursery.start`` and runs until
    cancelled; the others may be called once it has started."""

    name: str

    async def serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None: ...

    async def announce(self, key: bytes) -> None:
        """Say (and keep saying, re-announcing before records expire) that we hold ``key``."""
        ...

    async def withdraw(self, key: bytes) -> None:
        """Stop announcing ``key`` (records elsewhere then expire on their own)."""
        ...

    async def find(self, key: bytes, limit: int = 16) -> Sequence[Provider]:
        """Providers of ``key`` known now or found by one lookup (may be empty)."""
        ...


@dataclass
class MemoryDirectory:
    """The shared 'network' of MemoryFinders: key -> providers."""

    records: dict[bytes, dict[bytes | None, Provider]] = field(default_factory=dict)


class MemoryFinder:
    """A real, in-process backend: announcements are visible to every finder sharing the
    directory. For tests of code above the seam; not a mock of any network backend."""

    name = "memory"

    def __init__(self, directory: MemoryDirectory, me: Provider) -> None:
        self._directory = directory
        self._me = me

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    async def announce(self, key: bytes) -> None:
        self._directory.records.setdefault(key, {})[self._me.node_id] = self._me

    async def withdraw(self, key: bytes) -> None:
        self._directory.records.get(key, {}).pop(self._me.node_id, None)

    async def find(self, key: bytes, limit: int = 16) -> Sequence[Provider]:
        await trio.lowlevel.checkpoint()
        found = [p for p in self._directory.records.get(key, {}).values() if p != self._me]
        return found[:limit]
