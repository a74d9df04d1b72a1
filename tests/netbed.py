"""The multi-machine test bed's pytest fixtures; the bed itself is ``tests/support/netbed.py``
(``python -m benchmarks nat`` builds it too), re-exported here for the tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.netbed import (
    DEFAULT_PORT,
    NAT_RULES,
    Gateway,
    Machine,
    NetBed,
    can_build_namespaces,
    can_build_nat,
    can_build_upnp,
    new_tag,
)

__all__ = [
    "DEFAULT_PORT",
    "NAT_RULES",
    "Gateway",
    "Machine",
    "NetBed",
    "can_build_namespaces",
    "can_build_nat",
    "can_build_upnp",
    "natbed",
    "netbed",
    "upnpbed",
]


def _bed(tmp_path: Path, reason: str | None, kind: str) -> Iterator[NetBed]:
    if reason is not None:
        pytest.skip(reason)
    bed = NetBed(tmp_path, new_tag(kind))
    try:
        yield bed
    finally:
        bed.close()


@pytest.fixture
def natbed(tmp_path: Path) -> Iterator[NetBed]:
    """A bed that can also build homes behind NAT routers (skips without nft)."""
    yield from _bed(tmp_path, can_build_nat(), "p2n")


@pytest.fixture
def upnpbed(tmp_path: Path) -> Iterator[NetBed]:
    """A bed whose homes' routers can run miniupnpd (skips without nft or miniupnpd)."""
    yield from _bed(tmp_path, can_build_upnp(), "p2u")


@pytest.fixture
def netbed(tmp_path: Path) -> Iterator[NetBed]:
    yield from _bed(tmp_path, can_build_namespaces(), "p2b")
