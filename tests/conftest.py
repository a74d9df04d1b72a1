"""Fixtures shared by test modules."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netbed import netbed
from tests.support.daemons import DaemonProcess

__all__ = ["netbed"]


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[DaemonProcess, DaemonProcess]]:
    """Two daemons on loopback, LAN discovery off, stopped after the test."""
    a = DaemonProcess(tmp_path / "a", extra_args=("--no-lan",)).start()
    try:
        b = DaemonProcess(tmp_path / "b", extra_args=("--no-lan",)).start()
        try:
            yield a, b
        finally:
            b.stop()
    finally:
        a.stop()
