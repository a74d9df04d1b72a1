"""A file-vs-directory clash fails only its own path (issue 12, item 10), real daemons.

Member B holds a directory ``m/`` (with a file of its own in it) where member A's folder has
a file ``m``; A's file wins the path (a directory never makes a conflict copy). B must place
every other file of the batch, keep its directory and what is in it, and list ``m`` in
`sync list` problems. Bounds: both daemons stay alive; honest files arrive.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.e2e_helpers import wait_until
from tests.support.daemons import DaemonProcess

pytestmark = pytest.mark.timeout(300)


def _state(daemon: DaemonProcess, path: Path) -> dict[str, object]:
    for folder in daemon.cli_json("sync", "list")["folders"]:
        if os.path.realpath(folder["path"]) == os.path.realpath(path):
            return dict(folder)
    raise AssertionError(f"{path} not synced")


def test_a_directory_in_the_way_fails_only_its_path(
    tmp_path: Path, pair: tuple[DaemonProcess, DaemonProcess]
) -> None:
    a, b = pair
    left, right = tmp_path / "left", tmp_path / "right"
    left.mkdir()
    names = [f"f{i:02d}" for i in range(20)]
    for name in [*names[:10], "m", *names[10:]]:
        (left / name).write_bytes(name.encode() * 100)
    ticket = a.cli_json("sync", str(left))["rw"]
    (right / "m").mkdir(parents=True)
    (right / "m" / "mine").write_bytes(b"local")
    b.cli_json("sync", str(right), ticket)

    def arrived() -> bool:
        return all((right / n).is_file() for n in names)

    wait_until(arrived, timeout=120)
    wait_until(
        lambda: any(
            str(p).startswith("m: not placed")
            for p in _state(b, right)["problems"]  # type: ignore[attr-defined]
        ),
        timeout=120,
    )
    assert all((right / n).read_bytes() == n.encode() * 100 for n in names)
    assert (right / "m" / "mine").read_bytes() == b"local"
    assert a.call("status") and b.call("status")  # both daemons alive and answering
