"""Swarming end to end: several holders at once, real daemons joined by the private DHT."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from p2pfs.store.filehash import SETTLED_FINE_NS
from p2pfs.store.index import INDEX_FILENAME
from tests.e2e_helpers import fetch_in_background, transfer_progress, wait_until
from tests.support.daemons import DaemonProcess
from tests.support.hooked_daemon import PROGRAM as HOOKED_DAEMON

MiB = 1 << 20

Group = Callable[..., DaemonProcess]
SHIPPED = (sys.executable, "-m", "p2pfs")


@pytest.fixture
def group(tmp_path: Path) -> Iterator[Group]:
    """Daemons in one private DHT (the first is its bootstrap), LAN off."""
    started: list[DaemonProcess] = []

    def make(name: str, *extra: str, program: tuple[str, ...] = SHIPPED) -> DaemonProcess:
        args = ["--no-lan", *extra]
        if started:
            args += ["--bootstrap", f"127.0.0.1:{started[0].call('id')['discovery']['dht_port']}"]
        daemon = DaemonProcess(tmp_path / name, extra_args=tuple(args), program=program).start()
        started.append(daemon)
        return daemon

    yield make
    for daemon in started:
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.kill(signal.SIGCONT)  # a test may have frozen it
        daemon.stop()


def seed_copies(tmp_path: Path, seeders: list[DaemonProcess], data: bytes) -> str:
    """The same folder (same name, same bytes) shared by every seeder: one root. The
    copies are written a moment before they are shared, as most shared files are: their
    ctimes are settled when scanned (store/filehash.py settled_ctime), so a seeder sends
    their chunks unhashed while their stat has not moved."""
    folders = []
    for number in range(len(seeders)):
        folder = tmp_path / f"copy{number}" / "payload"
        folder.mkdir(parents=True)
        (folder / "data.bin").write_bytes(data)
        folders.append(folder)
    time.sleep(2 * SETTLED_FINE_NS / 1e9)
    ticket = ""
    for seeder, folder in zip(seeders, folders, strict=True):
        ticket = str(seeder.cli_json("share", str(folder))["ticket"])
    return ticket


def settled_ctime_of(daemon: DaemonProcess, name: str) -> int | None:
    """The settled ctime the daemon's index records for its shared file ``name``."""
    uri = f"file:{daemon.home / INDEX_FILENAME}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
        (value,) = conn.execute(
            "SELECT settled_ctime_ns FROM files WHERE name = ?", (name,)
        ).fetchone()
    return None if value is None else int(value)


def finish(running: subprocess.Popen[str]) -> dict[str, object]:
    out, err = running.communicate(timeout=180)
    assert running.returncode == 0, err
    report: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    return report


def test_three_seeders_one_killed_mid_fetch(tmp_path: Path, group: Group) -> None:
    data = random.Random(1).randbytes(40 * MiB)
    seeders = [group(f"seed{n}", "--max-upload-rate", str(6 * MiB)) for n in range(3)]
    fetcher = group("fetcher")
    ticket = seed_copies(tmp_path, seeders, data)
    running = fetch_in_background(fetcher, ticket, tmp_path / "out", "--json")
    wait_until(lambda: transfer_progress(fetcher) > 8 * MiB)
    seeders[1].kill(signal.SIGKILL)
    report = finish(running)
    assert (tmp_path / "out" / "data.bin").read_bytes() == data
    contributions = {p["node_id"]: p["bytes"] for p in report["peers"]}  # type: ignore[union-attr]
    assert len(contributions) == 3, report["peers"]
    assert sum(1 for sent in contributions.values() if sent > 0) >= 2


@pytest.mark.parametrize("hostile", [False, True], ids=["refuses", "sends-corrupt-bytes"])
def test_corrupted_seeder_is_dropped(tmp_path: Path, group: Group, hostile: bool) -> None:
    data = random.Random(2).randbytes(24 * MiB)
    honest = [group(f"seed{n}", "--max-upload-rate", str(8 * MiB)) for n in range(2)]
    # Sending chunks unchecked is a test-only hook: the shipped daemon cannot.
    if hostile:
        corrupt = group("corrupt", "--serve-unverified", program=HOOKED_DAEMON)
    else:
        corrupt = group("corrupt")
    fetcher = group("fetcher")
    ticket = seed_copies(tmp_path, [*honest, corrupt], data)
    # Damage the corrupt seeder's copy behind its back: same size, same mtime. Only its
    # ctime moves, and the seeder trusted the file's settled row until then.
    victim = tmp_path / "copy2" / "payload" / "data.bin"
    stat = victim.stat()
    assert settled_ctime_of(corrupt, "data.bin") == stat.st_ctime_ns
    with victim.open("r+b") as handle:
        for offset in range(0, len(data), 1 << 20):
            handle.seek(offset + 1000)
            handle.write(b"\xff" * 16)
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    report = finish(fetch_in_background(fetcher, ticket, tmp_path / "out", "--json"))
    assert (tmp_path / "out" / "data.bin").read_bytes() == data
    by_id = {p["node_id"]: p for p in report["peers"]}  # type: ignore[union-attr]
    failed = str(by_id[corrupt.node_id()]["failed"])
    if hostile:
        # It sent the damaged bytes: the fetcher's hash check caught them.
        assert re.fullmatch(r"chunk [0-9a-f]{12} fails its hash", failed), report["peers"]
    else:
        # Its own check of the file before sending (the moved ctime, then the hash) found
        # the change: it refused the chunk.
        assert re.fullmatch(r"peer answered NOT_FOUND: chunk \d+ unavailable", failed), failed


def test_four_fetchers_trade_among_themselves(tmp_path: Path, group: Group) -> None:
    data = random.Random(3).randbytes(24 * MiB)
    seeder = group("seed", "--max-upload-rate", str(8 * MiB))
    fetchers = [group(f"fetch{n}") for n in range(4)]
    ticket = seed_copies(tmp_path, [seeder], data)
    running = [
        fetch_in_background(f, ticket, tmp_path / f"out{n}", "--json")
        for n, f in enumerate(fetchers)
    ]
    for process in running:
        finish(process)
    for number in range(4):
        assert (tmp_path / f"out{number}" / "data.bin").read_bytes() == data
    uploaded = seeder.call("status")["counters"]["payload_sent"]
    assert uploaded < 2.5 * len(data), f"seeder uploaded {uploaded / len(data):.2f}x the content"


def test_a_frozen_peer_does_not_stall_the_fetch(tmp_path: Path, group: Group) -> None:
    data = random.Random(4).randbytes(24 * MiB)
    seeders = [group(f"seed{n}", "--max-upload-rate", str(6 * MiB)) for n in range(2)]
    fetcher = group("fetcher")
    ticket = seed_copies(tmp_path, seeders, data)
    running = fetch_in_background(fetcher, ticket, tmp_path / "out", "--json")
    wait_until(lambda: transfer_progress(fetcher) > 4 * MiB)
    seeders[0].kill(signal.SIGSTOP)
    try:
        report = finish(running)
    finally:
        seeders[0].kill(signal.SIGCONT)
    assert (tmp_path / "out" / "data.bin").read_bytes() == data
    by_id = {p["node_id"]: p["bytes"] for p in report["peers"]}  # type: ignore[union-attr]
    # The frozen peer's pieces went to the live one (reassigned on stall, or duplicated
    # in endgame): it supplied the bulk.
    assert by_id[seeders[1].node_id()] > by_id[seeders[0].node_id()], report["peers"]
