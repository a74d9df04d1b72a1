"""Data-plane workers end to end (issue 13): a fetch from several seeders with its bulk
transfers in worker processes, real daemons joined by the private DHT."""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path
from typing import Any

from tests.e2e_helpers import fetch_in_background, transfer_progress, wait_until
from tests.support.daemons import DaemonProcess
from tests.test_e2e_swarm import Group, finish, group, seed_copies

__all__ = ["group"]  # the fixture, shared with the swarm tests

MiB = 1 << 20


def peers_with_workers(fetcher: DaemonProcess) -> list[dict[str, Any]]:
    transfers = fetcher.call("status")["transfers"]
    peers = transfers[0]["peers"] if transfers else []
    return [peer for peer in peers if peer["worker"] is not None and not peer["failed"]]


def test_workers_fetch_from_two_seeders_and_one_is_killed(tmp_path: Path, group: Group) -> None:
    """Every peer's bytes come through a worker process; one worker killed mid-fetch costs
    nothing but time: its peer is dialled again with a fresh worker and the copy is exact."""
    data = random.Random(12).randbytes(16 * MiB)
    seeders = [group(f"seed{n}", "--max-upload-rate", str(6 * MiB)) for n in range(2)]
    fetcher = group("fetcher", "--data-workers", "2")
    ticket = seed_copies(tmp_path, seeders, data)
    running = fetch_in_background(fetcher, ticket, tmp_path / "out", "--json")
    wait_until(
        lambda: transfer_progress(fetcher) > 3 * MiB and len(peers_with_workers(fetcher)) == 2
    )
    workers = {int(peer["worker"]) for peer in peers_with_workers(fetcher)}
    assert fetcher.pid not in workers and len(workers) == 2
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)  # a child of the daemon this test started
    report = finish(running)
    assert (tmp_path / "out" / "data.bin").read_bytes() == data
    assert not [p.name for p in (tmp_path / "out").iterdir() if p.name != "data.bin"]
    peers = report["peers"]
    assert isinstance(peers, list) and len(peers) == 2, peers
    # Both peers served through workers to the end, the victim's peer through a new one.
    assert all(p["worker"] is not None and not p["failed"] for p in peers), peers
    assert victim not in {p["worker"] for p in peers}, peers
    assert all(p["bytes"] > 0 for p in peers), peers
    assert report["bytes_from_peer"] >= len(data)
