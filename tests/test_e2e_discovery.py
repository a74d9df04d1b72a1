"""Discovery end to end: real daemons joined only by the private DHT (no LAN, no hints)."""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

from p2pfs.bench.daemons import DaemonProcess


def dht_address(daemon: DaemonProcess) -> str:
    return f"127.0.0.1:{daemon.call('id')['discovery']['dht_port']}"


def test_twenty_daemons_find_and_fetch_a_no_hints_share(tmp_path: Path) -> None:
    rng = random.Random(4)
    daemons: list[DaemonProcess] = []
    try:
        for number in range(20):
            extra = ["--no-lan"]
            if daemons:
                extra += ["--bootstrap", dht_address(daemons[-1])]
            daemons.append(DaemonProcess(tmp_path / f"n{number}", extra_args=tuple(extra)).start())
        sharer = daemons[7]
        source = tmp_path / "shared"
        source.mkdir()
        (source / "data.bin").write_bytes(os.urandom(3 << 20))
        ticket = sharer.cli_json("share", str(source), "--no-hints")["ticket"]
        sharer_id = sharer.node_id()

        def lookups(nodes: list[DaemonProcess], count: int) -> None:
            for _ in range(count):
                asker = rng.choice(nodes)
                found = asker.call("find", {"ticket": ticket})["providers"]
                if asker is not sharer:
                    assert sharer_id in [p["node_id"] for p in found], found

        lookups(daemons, 100)

        fetcher = daemons[18]
        report = fetcher.cli_json("fetch", ticket, str(tmp_path / "copy"))
        assert (tmp_path / "copy" / "data.bin").read_bytes() == (source / "data.bin").read_bytes()
        assert report["bytes_from_peer"] == 3 << 20

        # 30% of the nodes die without a word; lookups from the rest still succeed.
        others = [d for d in daemons if d is not sharer]
        victims = rng.sample(others, 6)
        for victim in victims:
            victim.kill(signal.SIGKILL)
            victim.wait()
        lookups([d for d in daemons if d not in victims], 30)
    finally:
        for daemon in daemons:
            daemon.stop()
