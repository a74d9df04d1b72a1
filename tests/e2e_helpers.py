"""Helpers for the end-to-end tests that drive real daemons."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.support.daemons import DaemonProcess


def fetch_in_background(
    fetcher: DaemonProcess, ticket: str, destination: Path, *extra: str
) -> subprocess.Popen[str]:
    """`p2pfs fetch` as its own process, so a test can kill daemons while it runs."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "p2pfs",
            "--home",
            str(fetcher.home),
            "fetch",
            ticket,
            str(destination),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def transfer_progress(daemon: DaemonProcess) -> int:
    transfers = daemon.call("status")["transfers"]
    return int(transfers[0]["bytes_done"]) if transfers else 0


def wait_until(condition: Callable[[], bool], timeout: float = 60) -> None:
    """Poll a daemon's state until ``condition`` holds (a harness waiting on processes)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


def content_of(path: Path) -> bytes | None:
    """A file's bytes, or None while it is not there (yet) as a file."""
    try:
        return path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return None
