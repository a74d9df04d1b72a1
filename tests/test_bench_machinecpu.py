"""The benchmarks' machine CPU split (benchmarks/machinecpu.py) against /proc/stat lines."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.machinecpu import MachineShare, MachineTicks


def test_shares_between_two_readings(tmp_path: Path) -> None:
    before = MachineTicks.parse("cpu  100 0 50 800 50 0 0 0 0 0")
    after = MachineTicks.parse("cpu  400 0 150 900 60 0 10 80 0 0")
    share = MachineShare.between(before, after)
    # 600 ticks passed: 110 idle or waiting, 80 stolen by the host.
    assert share.idle == pytest.approx(110 / 600)
    assert share.steal == pytest.approx(80 / 600)
    assert str(share) == "machine idle 18%, steal 13%"
    stat = tmp_path / "stat"
    stat.write_text("cpu  1 2 3 4 5 6 7 8 9 10\ncpu0 1 1 1 1 1 1 1 1 1 1\n")
    assert MachineTicks.now(stat).total == 36


def test_no_time_passed_and_foreign_lines() -> None:
    same = MachineTicks.parse("cpu 1 1 1 1 1 1 1 1")
    assert MachineShare.between(same, same) == MachineShare(0.0, 0.0)
    with pytest.raises(ValueError):
        MachineTicks.parse("cpu0 1 1 1 1 1 1 1 1")
    with pytest.raises(ValueError):
        MachineTicks.parse("cpu 1 2 3")


def test_this_machine_reads() -> None:
    reading = MachineTicks.now()
    assert reading.total > 0 and reading.idle >= 0
