"""``python -m benchmarks dial``: time from `fetch` start to the first verified byte.

Two daemons on loopback, a small share on one. Measured in the same run:
- reference: the fetch names only the holder's address;
- the holder behind 5 unreachable candidates (silent UDP ports, as a dead address or a
  stale DHT record looks), tried first; goal <= 1 s (issue 10; before the dialer, 10 s a
  dead candidate, tried in turn);
- the holder already linked to the fetcher for folder sync: the connection is reused,
  goal <= 50 ms.
The figure is the daemon's own (`first_byte_seconds` in the fetch report: from the fetch's
start in the daemon to the first chunk from a peer verified and written), so CLI start-up
is not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tests.support.daemons import DaemonProcess

DEAD_CANDIDATES = 5


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks dial")
    parser.add_argument("--runs", type=int, default=5, help="fetches per case (p50 reported)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="p2pfs-bench-dial-") as scratch:
        figures = run(Path(scratch), args.runs)
    if args.json:
        print(json.dumps(figures))
    else:
        print_table(figures)
    return 0


def run(root: Path, runs: int) -> dict[str, list[float]]:
    source = root / "share"
    source.mkdir()
    (source / "data.bin").write_bytes(os.urandom(256 * 1024))
    silent = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(DEAD_CANDIDATES)]
    try:
        for sock in silent:
            sock.bind(("127.0.0.1", 0))
        dead = [f"127.0.0.1:{sock.getsockname()[1]}" for sock in silent]
        with (
            DaemonProcess(root / "holder", extra_args=("--no-lan",)) as holder,
            DaemonProcess(root / "fetcher", extra_args=("--no-lan",)) as fetcher,
        ):
            ticket = holder.cli("share", str(source), "--no-hints").stdout.strip().splitlines()[-1]
            here = holder.address()
            counter = iter(range(10**6))

            def fetch(*peers: str) -> float:
                dest = root / f"copy{next(counter)}"
                args = [arg for peer in peers for arg in ("--peer", peer)]
                report = fetcher.cli_json("fetch", ticket, str(dest), *args)
                return float(report["first_byte_seconds"])

            figures = {
                "reference: the holder's address only": repeat(runs, lambda: fetch(here)),
                f"the holder after {DEAD_CANDIDATES} unreachable candidates": repeat(
                    runs, lambda: fetch(*dead, here)
                ),
            }
            link(holder, fetcher, root)
            figures["the holder already linked for sync (reused)"] = repeat(
                runs, lambda: fetch(here)
            )
    finally:
        for sock in silent:
            sock.close()
    return figures


def repeat(runs: int, measure: Callable[[], float]) -> list[float]:
    return [measure() for _ in range(runs)]


def link(holder: DaemonProcess, fetcher: DaemonProcess, root: Path) -> None:
    """Make both daemons members of one sync folder and wait until they are linked."""
    (root / "folder-a").mkdir()
    tickets = holder.cli_json("sync", str(root / "folder-a"))
    fetcher.cli("sync", str(root / "folder-b"), tickets["rw"])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        folders = fetcher.call("sync_list")["folders"]
        if folders and folders[0]["peers"] >= 1:
            return
        time.sleep(0.05)  # waiting on another process
    raise RuntimeError("the daemons did not link for sync within 30 s")


def print_table(figures: dict[str, list[float]]) -> None:
    table = Table(title="time from fetch start to the first verified byte (loopback)")
    table.add_column("case")
    table.add_column("p50", justify="right")
    table.add_column("min", justify="right")
    table.add_column("max", justify="right")
    table.add_column("runs", justify="right")
    for case, values in figures.items():
        table.add_row(
            case,
            f"{statistics.median(values) * 1000:.1f} ms",
            f"{min(values) * 1000:.1f} ms",
            f"{max(values) * 1000:.1f} ms",
            str(len(values)),
        )
    Console(file=sys.stdout).print(table)
