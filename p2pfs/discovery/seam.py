"""The seam every discovery backend implements, and a real in-memory backend for tests."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import trio

from p2pfs.address import PeerAddress
from p2pfs.ids import NodeId


@dataclass(frozen=True, slots=True)
class Provider:
    """A node that says it holds the content behind a discovery key.

    ``node_id`` is known when the record carries it (our DHT, LAN beacons) and lets the
    fetcher pin the peer's key; Mainline records carry only an address, and then the
    content's hashes are the only check (which is enough: nothing unverified is written).
    """

    address: PeerAddress
    node_id: NodeId | None = None
    source: str = ""


class Finder(Protocol):
    """A discovery backend. ``serve`` is started with ``nursery.start`` and runs until
    cancelled; the others may be called once it has started."""

    name: str
    ends_by_silence: bool
    """Its lookup ends only by waiting out a timeout when no one answers (the LAN's query);
    the others end when their search does."""

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

    def addresses_changed(self) -> None:
        """This machine's addresses changed (another network, another lease): what was
        announced names an address that may be gone; say it all again now."""
        ...


@dataclass
class MemoryDirectory:
    """The shared 'network' of MemoryFinders: key -> providers, in announcement order (a
    dict used as an ordered set, so lookups are deterministic)."""

    records: dict[bytes, dict[Provider, None]] = field(default_factory=dict)


class MemoryFinder:
    """A real, in-process backend: announcements are visible to every finder sharing the
    directory. For tests of code above the seam (``tests/test_discovery_dialing.py``); not a
    mock of any network backend. ``me`` is the record this finder announces: what a
    network backend would publish for this node (an address, and a NodeId if it carries
    one)."""

    name = "memory"
    ends_by_silence = False

    def __init__(self, directory: MemoryDirectory, me: Provider) -> None:
        self._directory = directory
        self.me = me

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    async def announce(self, key: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self._directory.records.setdefault(key, {})[self.me] = None

    async def withdraw(self, key: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self._directory.records.get(key, {}).pop(self.me, None)

    async def find(self, key: bytes, limit: int = 16) -> Sequence[Provider]:
        await trio.lowlevel.checkpoint()
        found = [p for p in self._directory.records.get(key, {}) if p != self.me]
        return found[:limit]

    def addresses_changed(self) -> None:
        pass  # its records name ``me``, which does not move
