"""``python -m benchmarks placers``: one change taken by several members at once.

One namespace bed (tests/support/netbed.py; needs root and ``ip``), real daemons at their
defaults: a maker whose uplink is held to ``--uplink-mbit`` (a tbf qdisc, as a home
uplink) and ``--members`` others (3), all in one folder and linked to each other. Each run
the maker writes a new file of ``--size-mib`` random bytes, then moves in a new directory of
``--files`` files of 1-64 KiB; measured: the time until every other member has all of it
(a final name appears only at its commit; each copy is checked byte for byte after the
run) and what the maker's daemon uploaded, over the change's size.

Same-run references, through the same uplink: the same change taken by one member alone
(a second folder that only it joined), and the uplink's floor (size / rate). Members
placing the same change swap what each has placed (SPEC, Folder sync, Placers): the goal
is that N members take it about as fast as one, with the maker sending it about once.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tests.support.netbed import Machine, NetBed, can_build_namespaces, scratch_bed

MiB = 1 << 20
POLL = 0.005


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks placers")
    parser.add_argument("--members", type=int, default=3, help="members taking each change")
    parser.add_argument("--size-mib", type=int, default=64, help="the new file's size")
    parser.add_argument("--uplink-mbit", type=int, default=100, help="the maker's uplink")
    parser.add_argument("--files", type=int, default=2000, help="small files in a change")
    parser.add_argument("--runs", type=int, default=3, help="changes per case (p50)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    reason = can_build_namespaces()
    if reason is not None:
        print(f"bench placers: cannot build the namespace bed here: {reason}")
        return 0
    with scratch_bed("p2pfs-bench-placers-", "p2s") as (bed, scratch):
        figures = run(bed, scratch, args)
    if args.json:
        print(json.dumps(figures))
    else:
        print_table(figures, args)
    return 0


def run(bed: NetBed, root: Path, args: argparse.Namespace) -> dict[str, object]:
    maker, *members = [bed.machine(f"m{n}") for n in range(args.members + 1)]
    for machine in (maker, *members):
        machine.start()
    team = [root / machine.name / "team" for machine in (maker, *members)]
    solo = [root / maker.name / "solo", root / members[0].name / "solo"]
    team[0].mkdir(parents=True)
    solo[0].mkdir(parents=True)
    team_ticket = json.loads(maker.cli("sync", str(team[0]), "--json").stdout)["rw"]
    solo_ticket = json.loads(maker.cli("sync", str(solo[0]), "--json").stdout)["rw"]
    for machine, directory in zip(members, team[1:], strict=True):
        machine.cli("sync", str(directory), team_ticket)
    members[0].cli("sync", str(solo[1]), solo_ticket)
    everyone = [maker, *members]
    _wait(lambda: all(_linked(m, d) == args.members for m, d in zip(everyone, team, strict=True)))
    _wait(lambda: _linked(members[0], solo[1]) == 1)
    maker.cap_uplink(args.uplink_mbit * 1_000_000)
    sizes = {"big": args.size_mib * MiB, "small": _size(_new_content("small", args))}
    cases: dict[str, list[dict[str, float]]] = {}
    for number in range(args.runs):
        for kind in ("big", "small"):
            for who, directories in (("one", solo), ("all", team)):
                # New bytes each time: a member holding them already would copy them.
                content = _new_content(kind, args)
                name = f"{kind}-{who}-{number}"
                figures = _change(maker, root, directories, name, content)
                cases.setdefault(f"{who}-{kind}", []).append(figures)
    uplink = args.uplink_mbit * 1_000_000
    return {
        "members": args.members,
        "sizes": sizes,
        "uplink_bits": uplink,
        "floor_seconds": {kind: size * 8 / uplink for kind, size in sizes.items()},
        "cases": cases,
    }


def _new_content(kind: str, args: argparse.Namespace) -> dict[str, bytes]:
    """Random bytes: one file (named by the change), or files of 1-64 KiB by name."""
    if kind == "big":
        return {"": os.urandom(args.size_mib * MiB)}
    return {f"f{n:05d}.bin": os.urandom(1024 + n * 7919 % (63 * 1024)) for n in range(args.files)}


def _size(content: dict[str, bytes]) -> int:
    return sum(map(len, content.values()))


def _change(
    maker: Machine, root: Path, directories: list[Path], name: str, content: dict[str, bytes]
) -> dict[str, float]:
    """The maker adds ``content`` to its folder as ``name`` (one file, written in place;
    or a directory of files, written beside the folder and moved in); returns the seconds
    until every other member's copy of all of it appeared, and the maker's upload over
    its size."""
    sent = _sent(maker)
    if "" in content:
        (directories[0] / name).write_bytes(content[""])
    else:
        staging = root / name
        staging.mkdir()
        for file_name, data in content.items():
            (staging / file_name).write_bytes(data)
    start = time.monotonic()
    if "" not in content:
        os.rename(staging, directories[0] / name)
    copies = [
        (directory / name / file_name if file_name else directory / name, data)
        for directory in directories[1:]
        for file_name, data in content.items()
    ]
    _wait(lambda: all(_arrived(copy, len(data)) for copy, data in copies), timeout=600)
    seconds = time.monotonic() - start
    time.sleep(0.2)  # the last replies' counters settle
    upload = (_sent(maker) - sent) / _size(content)
    for copy, data in copies:
        if copy.read_bytes() != data:
            raise RuntimeError(f"{copy} differs from what the maker wrote")
    return {"seconds": seconds, "upload": upload}


def _arrived(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except (FileNotFoundError, NotADirectoryError):
        return False


def _sent(machine: Machine) -> int:
    assert machine.daemon is not None
    return int(machine.daemon.call("status")["counters"]["payload_sent"])


def _linked(machine: Machine, directory: Path) -> int:
    assert machine.daemon is not None
    for folder in machine.daemon.call("sync_list")["folders"]:
        if folder["path"] == str(directory):
            return len(folder["members"])
    return 0


def _wait(condition: object, timeout: float = 60) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the bed did not reach the state the benchmark needs")
        time.sleep(POLL)


def _medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in ("seconds", "upload")}


def print_table(figures: dict[str, object], args: argparse.Namespace) -> None:
    cases = figures["cases"]
    floors = figures["floor_seconds"]
    assert isinstance(cases, dict) and isinstance(floors, dict)
    table = Table(title=f"one change taken by {args.members} members at once (namespace bed)")
    for column in ("measure", "p2pfs", "reference (same run)", "ratio", "goal", "met"):
        table.add_column(column)
    described = {
        "big": f"a new {args.size_mib} MiB file",
        "small": f"{args.files:,} new files of 1-64 KiB",
    }
    for kind, what in described.items():
        one, all_ = _medians(cases[f"one-{kind}"]), _medians(cases[f"all-{kind}"])
        for key, unit in (
            ("seconds", "time until all hold it (s)"),
            ("upload", "maker's upload / size"),
        ):
            ratio = all_[key] / one[key]
            table.add_row(
                f"{what}, {args.uplink_mbit} Mbit/s uplink: {unit}, p50 of {args.runs}",
                f"{all_[key]:.2f}",
                f"one member alone: {one[key]:.2f}"
                + (f"; the uplink's floor {floors[kind]:.2f}" if key == "seconds" else ""),
                f"{ratio:.2f}x",
                "<= 1.25x one member",
                "yes" if ratio <= 1.25 else "NO",
            )
    Console().print(table)
