"""Folder sync through a lossy path that also duplicates and reorders datagrams: real
daemons, the link emulator between them. Loss costs resends, never a stalled link: a
request stream whose first bytes came after a later stream's was dropped, and the member
waiting on it sat out its stall timeout."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from benchmarks.linkemu import LinkConditions, LinkForwarder
from p2pfs.wire.ticket import parse_ticket_untrusted
from tests.e2e_helpers import wait_until
from tests.support.daemons import DaemonProcess
from tests.test_e2e_stripes import WAN_FLAGS, join_through
from tests.test_e2e_sync import folder_state

pytestmark = pytest.mark.timeout(180)

MiB = 1 << 20

STALL_SIGNS = ("answered nothing for", "sent nothing for", "ended:", "dropping member")
"""What a daemon logs when a member link or a request on it gives up."""


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and ".p2pfs" not in path.parts
    }


def test_a_folder_syncs_both_ways_through_a_lossy_reordering_path(tmp_path: Path) -> None:
    rng = random.Random(13)
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    for number in range(120):
        directory = a_dir / f"d{number % 6}"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"f{number:03d}.bin").write_bytes(rng.randbytes(rng.randint(1, 8000)))
    (a_dir / "big.bin").write_bytes(rng.randbytes(4 * MiB))
    a = DaemonProcess(tmp_path / "home-a", extra_args=("--no-lan", *WAN_FLAGS)).start()
    b = DaemonProcess(tmp_path / "home-b", extra_args=("--no-lan", *WAN_FLAGS)).start()
    try:
        real = parse_ticket_untrusted(str(a.cli_json("sync", str(a_dir))["rw"]))
        target = real.addresses[0]
        # 2% lost, 1% duplicated, 2% held back 2 ms (overtaken) in each direction, seeded.
        lossy = LinkConditions(loss=0.02, duplicate=0.01, reorder=0.02, reorder_delay=0.002)
        with LinkForwarder((target.host, target.port), lossy, seed=2) as link:
            join_through(b, b_dir, real, link)

            def same_root() -> bool:
                return bool(folder_state(b, b_dir)["root"] == folder_state(a, a_dir)["root"])

            wait_until(same_root, timeout=120)
            assert snapshot(b_dir) == snapshot(a_dir)
            # An edit each way, over the same lossy connections.
            (a_dir / "d2" / "f002.bin").write_bytes(rng.randbytes(20_000))
            (b_dir / "d3" / "new-on-b.bin").write_bytes(rng.randbytes(300_000))
            wait_until(
                lambda: (
                    (b_dir / "d2" / "f002.bin").read_bytes()
                    == (a_dir / "d2" / "f002.bin").read_bytes()
                    and (a_dir / "d3" / "new-on-b.bin").exists()
                ),
                timeout=120,
            )
            wait_until(same_root, timeout=60)
        assert snapshot(b_dir) == snapshot(a_dir)
        assert link.forward.stats.lost > 0
        assert link.backward.stats.lost > 0
        assert link.backward.stats.delivered_bytes > 4 * MiB  # the join crossed the link
    finally:
        b.stop()
        a.stop()
    for daemon in (a, b):
        log = daemon.log_path.read_text()
        assert not [line for line in log.splitlines() if any(s in line for s in STALL_SIGNS)]
