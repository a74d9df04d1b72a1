"""An edit crosses a long path in about one and a half round trips: the member's new root
and what the other will ask for (its index path, the record, the file's tree) arrive in
one flight (FolderNodes), then the chunk is asked for. Asked level by level, then the
record, then the tree, it took three round trips more.

Real daemons through the link emulator with a 0.5 s round trip, so that the count shows
above any scheduling noise (a round trip takes 0.5 s however fast the machine is)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from benchmarks.linkemu import LinkConditions, LinkForwarder
from p2pfs.wire.ticket import parse_ticket_untrusted
from tests.e2e_helpers import content_of, wait_until
from tests.support.daemons import DaemonProcess
from tests.test_e2e_stripes import WAN_FLAGS, join_through
from tests.test_e2e_sync import folder_state

pytestmark = pytest.mark.timeout(180)

RTT = 0.5


def test_an_edit_crosses_a_long_path_in_one_flight_and_a_chunk(tmp_path: Path) -> None:
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    for number in range(40):
        directory = a_dir / f"d{number % 4}"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"f{number:02d}.txt").write_bytes(f"note {number}\n".encode() * 20)
    a = DaemonProcess(tmp_path / "home-a", extra_args=("--no-lan", *WAN_FLAGS)).start()
    b = DaemonProcess(tmp_path / "home-b", extra_args=("--no-lan", *WAN_FLAGS)).start()
    try:
        real = parse_ticket_untrusted(str(a.cli_json("sync", str(a_dir))["rw"]))
        target = real.addresses[0]
        path = LinkConditions.path(RTT, 0.0, None)
        with LinkForwarder((target.host, target.port), path, seeds=(1, 2)) as link:
            join_through(b, b_dir, real, link)
            edited = b_dir / "d1" / "f05.txt"
            wait_until(lambda: content_of(edited) == b"note 5\n" * 20, timeout=120)
            wait_until(lambda: folder_state(b, b_dir)["root"] == folder_state(a, a_dir)["root"], 60)
            time.sleep(2 * RTT)  # the join's last roots and pushes have crossed
            before = folder_state(b, b_dir)["work"]
            new_text = b"edited across the long path\n"
            changed = time.monotonic()
            (a_dir / "d1" / "f05.txt").write_bytes(new_text)
            wait_until(lambda: content_of(edited) == new_text, timeout=60)
            took = time.monotonic() - changed
        after = folder_state(b, b_dir)["work"]
    finally:
        b.stop()
        a.stop()
    assert after["nodes_asked"] == before["nodes_asked"], (before, after)
    assert after["nodes_pushed"] > before["nodes_pushed"], (before, after)
    # Half a round trip for the root and its push, one for the chunk; the rest is A's
    # watcher (30 ms of quiet) and both daemons' work. Asked for, it took 4.5 round trips.
    assert took < 2.6 * RTT, f"{took / RTT:.2f} round trips"
