"""Real links (issue 13): ``python -m benchmarks links``.

p2pfs fetch between two real daemons (two processes on loopback, LAN discovery off), beside
the raw QUIC engine's bulk stream (the ``transport`` bench's receiver and sender roles, the
same engine and default TransportConfig), both through the same seeded link emulator
(benchmarks/linkemu.py) and under the same conditions:

- ``lan``: 20 ms RTT, 0.1% loss each way, 100 Mbit/s each way;
- ``wan``: 80 ms RTT, 1% loss each way, 100 Mbit/s each way;
- ``direct``: no emulator (loopback, datagrams of up to 60,000 bytes), for the CPU cost per
  GiB of each side;
- ``direct-base``: the same with 1,350-byte datagrams, as to a peer beyond a router (the
  multi-core model in simulations/multicore reads these).

The bottleneck queue is one bandwidth-delay product (drop-tail). Each condition runs
``--runs`` times with seeds 1..N, p2pfs and the raw engine alternating with the same seed;
the table gives the median MB/s of each and their ratio (goal: p2pfs >= 0.8x the raw engine),
p2pfs at its defaults (on a long path a fetch runs up to 4 connections to the peer: SPEC
"Stripes") and p2pfs with one connection (``--stripes 1``, the same seed) beside it,
and ``wire``: the median over seeds of the ratio of the two rates on the link itself, while
the data direction delivers the 10th to the 90th percent of the size (no set-up, no tail).
p2pfs's time is the fetching daemon's own (manifest request to last file renamed); the raw
engine's is its receiver's (first byte to EOF), so p2pfs also pays the manifest's round trip.
Every p2pfs copy is checked byte for byte, and the link's counters must show that every byte
crossed it. ``--sync`` adds folder sync through the same links: a folder holding the
condition's file joined through the link, at the defaults and with ``--stripes 1``;
``--sync-edits N`` a folder of small files joined through it, then N edits on one member
timed until the other holds them, against the path's round trip.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import child_env
from benchmarks.fetch import (
    load_average,
    process_tree_cpu,
    verify_copy,
    write_pseudo_random,
)
from benchmarks.linkemu import LinkConditions, LinkForwarder
from p2pfs.address import PeerAddress
from p2pfs.wire.ticket import Ticket, parse_ticket_untrusted
from tests.support.daemons import DaemonProcess

MiB = 1 << 20
GiB = 1 << 30
MB = 1e6
CHILD_TIMEOUT = 600.0
GOAL = 0.8


@dataclass(frozen=True, slots=True)
class Condition:
    name: str
    link: LinkConditions | None
    size_mib: int
    describe: str
    base_datagrams: bool = False
    """Datagrams of 1,350 bytes (as to a peer beyond a router), not loopback's 60,000: set
    for every emulated path, and for ``direct-base``."""

    @property
    def internet_sized(self) -> bool:
        return self.link is not None or self.base_datagrams


CONDITIONS = {
    "lan": Condition("lan", LinkConditions.path(0.020, 0.001, 100), 64, "20 ms, 0.1%, 100 Mbit/s"),
    "wan": Condition("wan", LinkConditions.path(0.080, 0.01, 100), 8, "80 ms, 1%, 100 Mbit/s"),
    "direct": Condition("direct", None, 256, "loopback, no emulator"),
    "direct-base": Condition(
        "direct-base", None, 256, "loopback, no emulator, 1,350-byte datagrams", True
    ),
}


@dataclass(frozen=True, slots=True)
class Run:
    who: str
    condition: str
    seed: int
    bytes: int
    seconds: float
    sender_cpu: float
    receiver_cpu: float
    lost: int
    """Datagrams the link's random loss dropped, both directions."""
    queue_dropped: int
    """Datagrams dropped at the bottleneck's full queue, both directions."""
    wire_mb_per_s: float | None
    """The data direction's rate on the link between 10% and 90% of the size delivered."""

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / MB


def _link(
    condition: Condition, target: tuple[str, int], seed: int, data_to_target: bool
) -> LinkForwarder | None:
    """The emulated link, its direction that carries the bulk data seeded ``2 seed`` and
    the one that carries the ACKs ``2 seed + 1``, whichever end dials: p2pfs's fetcher
    dials the sender, the transport bench's sender dials the receiver. The n-th datagram of
    the data then meets the same fate in both runs (same seed)."""
    if condition.link is None:
        return None
    data, acks = seed * 2, seed * 2 + 1
    seeds = (data, acks) if data_to_target else (acks, data)
    return LinkForwarder(target, condition.link, seeds=seeds)


WIRE_MARKS = (0.1, 0.9)


def _watch(link: LinkForwarder | None, size: int, data_to_target: bool) -> None:
    if link is not None:
        direction = link.forward if data_to_target else link.backward
        direction.watch(*(int(size * mark) for mark in WIRE_MARKS))


def _wire_rate(link: LinkForwarder | None, size: int, data_to_target: bool) -> float | None:
    if link is None:
        return None
    passed = (link.forward if data_to_target else link.backward).passed
    low, high = (int(size * mark) for mark in WIRE_MARKS)
    if low not in passed or high not in passed or passed[high] <= passed[low]:
        return None
    return (high - low) / (passed[high] - passed[low]) / MB


def _drops(link: LinkForwarder | None) -> tuple[int, int]:
    """(random losses, queue drops) of both directions."""
    if link is None:
        return 0, 0
    f, b = link.forward.stats, link.backward.stats
    return f.lost + b.lost, f.queue_dropped + b.queue_dropped


ONE_CONNECTION = "p2pfs, 1 connection"


def _daemon_flags(condition: Condition) -> tuple[str, ...]:
    """LAN discovery off; through the emulator, datagrams of the base size. The emulator
    sits on loopback, where a daemon would send datagrams of up to 60,000 bytes
    (net/pathsize.py); the internet path it stands for carries 1,500-byte frames."""
    return ("--no-lan", "--no-link-datagrams") if condition.internet_sized else ("--no-lan",)


def p2pfs_run(
    condition: Condition, seed: int, source: Path, work: Path, *, one_connection: bool = False
) -> Run:
    """A fresh pair of daemons (no connection left from an earlier run), one fetch;
    ``one_connection``: the fetcher runs with ``--stripes 1``."""
    size = source.stat().st_size
    flags = _daemon_flags(condition)
    sharer = DaemonProcess(work / "sharer", extra_args=flags)
    stripes = ("--stripes", "1") if one_connection else ()
    getter = DaemonProcess(work / "getter", extra_args=(*flags, *stripes))
    try:
        sharer.start()
        getter.start()
        ticket = parse_ticket_untrusted(sharer.cli_json("share", str(source))["ticket"])
        target = ticket.addresses[0]
        link = _link(condition, (target.host, target.port), seed, data_to_target=False)
        _watch(link, size, data_to_target=False)
        if link is not None:
            address = PeerAddress(*link.address)
            ticket = Ticket(ticket.kind, ticket.root, ticket.node_id, (address,))
        before = (process_tree_cpu(sharer.pid), process_tree_cpu(getter.pid))
        destination = work / "copy.bin"
        if link is None:
            report = getter.cli_json("fetch", ticket.encode(), str(destination))
        else:
            with link:
                report = getter.cli_json("fetch", ticket.encode(), str(destination))
            # Every byte crossed the emulated link, none went around it.
            if link.backward.stats.delivered_bytes < size:
                raise RuntimeError("p2pfs: the payload did not go through the link")
        after = (process_tree_cpu(sharer.pid), process_tree_cpu(getter.pid))
        verify_copy(source, destination, "p2pfs")
        # More is the endgame's duplicates (asked on two connections, both answered).
        if report["bytes_from_peer"] < size:
            raise RuntimeError(f"p2pfs moved {report['bytes_from_peer']} of {size} bytes")
        return Run(
            ONE_CONNECTION if one_connection else "p2pfs",
            condition.name,
            seed,
            size,
            float(report["seconds"]),
            after[0] - before[0],
            after[1] - before[1],
            *_drops(link),
            _wire_rate(link, size, data_to_target=False),
        )
    finally:
        for daemon in (getter, sharer):
            daemon.stop()
        shutil.rmtree(work, ignore_errors=True)


def make_tree(top: Path, files: int, seed: int) -> int:
    """``files`` files of 200 B-4 KiB, in files/50 directories of 3 subdirectories each (a
    source tree's shape: most of a fetch is its metadata); returns the total bytes."""
    rng = random.Random(seed)
    total = 0
    for number in range(files):
        directory = top / f"d{number % max(1, files // 50):03d}" / f"e{number % 3}"
        directory.mkdir(parents=True, exist_ok=True)
        data = rng.randbytes(rng.randint(200, 4096))
        (directory / f"f{number:05d}.txt").write_bytes(data)
        total += len(data)
    return total


def tree_run(condition: Condition, seed: int, source: Path, work: Path) -> dict[str, float]:
    """A fresh pair of daemons, one fetch of the tree ``source`` through the link: the
    daemon's seconds and its phases (listed, chunk trees, swarm done)."""
    flags = _daemon_flags(condition)
    sharer = DaemonProcess(work / "sharer", extra_args=flags)
    getter = DaemonProcess(work / "getter", extra_args=flags)
    try:
        sharer.start()
        getter.start()
        ticket = parse_ticket_untrusted(sharer.cli_json("share", str(source))["ticket"])
        target = ticket.addresses[0]
        link = _link(condition, (target.host, target.port), seed, data_to_target=False)
        assert link is not None
        ticket = Ticket(ticket.kind, ticket.root, ticket.node_id, (PeerAddress(*link.address),))
        destination = work / "copy"
        with link:
            report = getter.cli_json("fetch", ticket.encode(), str(destination))
        for original in source.rglob("*"):
            if original.is_file():
                copy = destination / original.relative_to(source)
                if copy.read_bytes() != original.read_bytes():
                    raise RuntimeError(f"p2pfs tree: {copy} differs")
        seconds, listed, trees = (
            float(report[key]) for key in ("seconds", "listed_seconds", "trees_seconds")
        )
        return {
            "seconds": seconds,
            "listed": listed,
            "trees": trees - listed,
            "swarm": seconds - trees,
        }
    finally:
        for daemon in (getter, sharer):
            daemon.stop()
        shutil.rmtree(work, ignore_errors=True)


def tree_condition(condition: Condition, files: int, runs: int, scratch: Path) -> dict[str, Any]:
    """The tree through the link, seed by seed, beside the raw engine moving its bytes as
    one stream through the same link and seed (what the data alone costs there)."""
    assert condition.link is not None
    source = scratch / "tree"
    size = make_tree(source, files, 1)
    ours, raw = [], []
    for seed in range(1, runs + 1):
        ours.append(tree_run(condition, seed, source, scratch / "tree-daemons"))
        raw.append(raw_run(condition, seed, size, batched=False).seconds)
        sys.stderr.write(
            f"{condition.name} tree seed {seed}: p2pfs {ours[-1]['seconds']:.2f} s "
            f"(listed {ours[-1]['listed']:.2f}, chunk trees {ours[-1]['trees']:.2f}, swarm "
            f"{ours[-1]['swarm']:.2f}), raw one stream {raw[-1]:.2f} s\n"
        )
    shutil.rmtree(source)
    rtt = 2 * condition.link.delay

    def median(key: str) -> float:
        return statistics.median(run[key] for run in ours)

    return {
        "condition": condition.name,
        "describe": condition.describe,
        "files": files,
        "mb": size / MB,
        "runs": runs,
        "seconds": median("seconds"),
        "listed": median("listed"),
        "trees": median("trees"),
        "trees_round_trips": median("trees") / rtt,
        "swarm": median("swarm"),
        "raw_seconds": statistics.median(raw),
        "all_runs": ours,
        "raw_runs_s": [round(t, 3) for t in raw],
    }


def print_tree_table(rows: list[dict[str, Any]]) -> None:
    header = (
        f"{'tree: fetch through the link':<28}{'files':>7}{'MB':>6}{'p2pfs s':>9}"
        f"{'listed':>8}{'trees':>7}{'(RTTs)':>8}{'swarm':>7}{'raw 1 stream s':>16}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['describe']:<28}{row['files']:>7}{row['mb']:>6.1f}{row['seconds']:>9.2f}"
            f"{row['listed']:>8.2f}{row['trees']:>7.2f}{row['trees_round_trips']:>8.1f}"
            f"{row['swarm']:>7.2f}{row['raw_seconds']:>16.2f}"
        )


SYNC_POLL = 0.05


@contextlib.contextmanager
def _folder_joined_through(
    condition: Condition,
    seed: int,
    work: Path,
    joiner_extra: tuple[str, ...] = (),
) -> Iterator[tuple[DaemonProcess, float]]:
    """A fresh pair of daemons: A makes a sync folder of ``work/a`` (filled by the caller),
    B joins it as ``work/b`` through the link. Yields B and when the join was asked; both
    daemons stop and ``work`` is removed after."""
    flags = _daemon_flags(condition)
    holder = DaemonProcess(work / "home-a", extra_args=flags)
    joiner = DaemonProcess(work / "home-b", extra_args=(*flags, *joiner_extra))
    try:
        holder.start()
        joiner.start()
        ticket = parse_ticket_untrusted(str(holder.cli_json("sync", str(work / "a"))["rw"]))
        target = ticket.addresses[0]
        link = _link(condition, (target.host, target.port), seed, data_to_target=False)
        if link is not None:
            ticket = dataclasses.replace(ticket, addresses=(PeerAddress(*link.address),))
        with link if link is not None else contextlib.nullcontext():
            started = time.monotonic()
            joiner.cli_json("sync", str(work / "b"), ticket.encode())
            yield joiner, started
    finally:
        for daemon in (joiner, holder):
            daemon.stop()
        shutil.rmtree(work, ignore_errors=True)


def sync_run(
    condition: Condition, seed: int, source: Path, work: Path, *, one_connection: bool
) -> float:
    """A fresh pair of daemons; one makes a sync folder holding ``source``, the other joins
    it through the link. Seconds from the join to the file complete and exact on the joiner
    (its own rounds: membership, records, index nodes, then the chunks)."""
    (work / "a").mkdir(parents=True)
    shutil.copyfile(source, work / "a" / source.name)
    expected = source.read_bytes()
    stripes = ("--stripes", "1") if one_connection else ()
    with _folder_joined_through(condition, seed, work, stripes) as (_joiner, started):
        _wait_for(work / "b" / source.name, expected, started)
        return time.monotonic() - started


EDIT_FILES = 200
"""The folder the edits bench joins first: small files in a source tree's shape."""
EDIT_PAUSE = 0.5
"""Seconds between edits: each one settles (the other member's root comes back) first."""


def sync_edits_run(condition: Condition, seed: int, work: Path, edits: int) -> dict[str, Any]:
    """A fresh pair of daemons: A makes a folder of EDIT_FILES small files, B joins it
    through the link; then A rewrites one file ``edits`` times, each timed from A's write
    to B holding the new bytes (A's watcher, its root and what comes with it, the chunk)."""
    folder_a, folder_b = work / "a", work / "b"
    make_tree(folder_a, EDIT_FILES, seed)
    paths = sorted(path.relative_to(folder_a) for path in folder_a.rglob("*.txt"))
    rng = random.Random(seed)
    with _folder_joined_through(condition, seed, work) as (joiner, started):
        for path in paths:
            _wait_for(folder_b / path, (folder_a / path).read_bytes(), started)
        joined = time.monotonic() - started
        latencies = []
        for _ in range(edits):
            time.sleep(EDIT_PAUSE)
            path = paths[rng.randrange(len(paths))]
            data = rng.randbytes(rng.randint(200, 4096))
            changed = time.monotonic()
            (folder_a / path).write_bytes(data)
            _wait_for(folder_b / path, data, changed, poll=0.002)
            latencies.append(time.monotonic() - changed)
        work_b = joiner.cli_json("sync", "list")["folders"][0]["work"]
        return {"join_s": joined, "edits_s": latencies, "nodes_asked": work_b.get("nodes_asked")}


def _wait_for(path: Path, expected: bytes, since: float, poll: float = SYNC_POLL) -> None:
    while not _holds(path, expected):
        if time.monotonic() - since > CHILD_TIMEOUT:
            raise RuntimeError(f"sync: {path.name} did not arrive")
        time.sleep(poll)


def sync_edits_condition(
    condition: Condition, runs: int, edits: int, scratch: Path
) -> dict[str, Any]:
    """Edits crossing the link, ``edits`` per seed; the round trip is the reference (half
    of one for the root and what comes with it, one for the chunk: 1.5 at the least)."""
    rtt = 2 * condition.link.delay if condition.link is not None else 0.0
    joins, latencies = [], []
    for seed in range(1, runs + 1):
        run = sync_edits_run(condition, seed, scratch / "edits", edits)
        joins.append(run["join_s"])
        latencies += run["edits_s"]
        sys.stderr.write(
            f"{condition.name} edits seed {seed}: join {run['join_s']:.2f} s, edits p50 "
            f"{statistics.median(run['edits_s']):.3f} s\n"
        )
    latencies.sort()
    return {
        "condition": condition.name,
        "describe": condition.describe,
        "rtt_s": rtt,
        "join_s": statistics.median(joins),
        "edit_p50_s": statistics.median(latencies),
        "edit_max_s": latencies[-1],
        "edits": len(latencies),
    }


def _holds(path: Path, expected: bytes) -> bool:
    try:
        return path.stat().st_size == len(expected) and path.read_bytes() == expected
    except OSError:
        return False


def sync_condition(condition: Condition, runs: int, scratch: Path) -> dict[str, Any]:
    """Folder sync through the link: at the defaults and with one connection, seed by
    seed alternating (the same seed meets the same losses)."""
    size = condition.size_mib * MiB
    source = scratch / f"{condition.name}-sync.bin"
    write_pseudo_random(source, size, condition.name.encode())
    striped, single = [], []
    for seed in range(1, runs + 1):
        striped.append(sync_run(condition, seed, source, scratch / "sync", one_connection=False))
        single.append(sync_run(condition, seed, source, scratch / "sync", one_connection=True))
        sys.stderr.write(
            f"{condition.name} sync seed {seed}: {striped[-1]:.2f} s, "
            f"1 connection {single[-1]:.2f} s\n"
        )
    source.unlink()
    return {
        "condition": condition.name,
        "describe": condition.describe,
        "mib": condition.size_mib,
        "seconds": statistics.median(striped),
        "one_connection_seconds": statistics.median(single),
        "runs_s": [round(t, 2) for t in striped],
        "one_connection_runs_s": [round(t, 2) for t in single],
    }


def _child(module: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        env=child_env(),
        stdout=subprocess.PIPE,
        text=True,
    )


def raw_run(
    condition: Condition,
    seed: int,
    size: int,
    batched: bool,
    reverse: bool = False,
    engine: str = "qh3",
) -> Run:
    """The transport bench's receiver and sender roles, the sender dialling the link;
    ``batched``: the receiver uses qh3's batched receive, as the daemon does; ``reverse``:
    the receiver dials the sender instead, as a p2pfs fetcher does."""
    extra = ["--batched-receive"] if batched else []
    extra += ["--base-datagrams"] if condition.internet_sized else []
    extra += ["--engine", engine, "--size", str(size / MiB)]
    # The listener is the receiver, or with ``reverse`` the sender; the other role dials.
    listening, dialling = ("sender", "receiver") if reverse else ("receiver", "sender")
    extra += ["--listener", listening]
    listener = _child("benchmarks.transport", "--role", listening, *extra)
    dialler: subprocess.Popen[str] | None = None
    data_to_target = not reverse
    try:
        assert listener.stdout is not None
        hello = json.loads(listener.stdout.readline())
        link = _link(condition, ("127.0.0.1", int(hello["port"])), seed, data_to_target)
        _watch(link, size, data_to_target)
        port = str(hello["port"] if link is None else link.address[1])
        args = ["--role", dialling, "--port", port, *extra]
        args += ["--node-id", hello["node_id"]]
        if link is not None:
            link.__enter__()
        try:
            dialler = _child("benchmarks.transport", *args)
            dialled_out, _ = dialler.communicate(timeout=CHILD_TIMEOUT)
            listened_out, _ = listener.communicate(timeout=CHILD_TIMEOUT)
        finally:
            if link is not None:
                link.__exit__(None, None, None)
        if dialler.returncode or listener.returncode:
            raise RuntimeError(f"raw {engine}: a transport process failed")
        records = [json.loads(out.strip().splitlines()[-1]) for out in (dialled_out, listened_out)]
        sent = next(r for r in records if r["role"] == "sender")
        received = next(r for r in records if r["role"] == "receiver")
        if received["bytes"] != size:
            raise RuntimeError(f"raw {engine}: received {received['bytes']} of {size} bytes")
        return Run(
            f"raw {engine}" + (" reversed" if reverse else ""),
            condition.name,
            seed,
            size,
            float(received["seconds"]),
            float(sent["cpu"]),
            float(received["cpu"]),
            *_drops(link),
            _wire_rate(link, size, data_to_target),
        )
    finally:
        for child in (dialler, listener):
            if child is not None and child.poll() is None:
                child.kill()
                child.wait()


def summarise(condition: Condition, runs: list[Run]) -> dict[str, Any]:
    ours = [r for r in runs if r.who == "p2pfs"]
    single = [r for r in runs if r.who == ONE_CONNECTION]
    raw = [r for r in runs if r.who.startswith("raw")]
    p2pfs_rate = statistics.median(r.mb_per_s for r in ours)
    raw_rate = statistics.median(r.mb_per_s for r in raw)
    single_rate = statistics.median(r.mb_per_s for r in single) if single else None

    def per_gib(selected: list[Run], side: str) -> float:
        cpu: float = sum(getattr(r, f"{side}_cpu") for r in selected)
        return cpu / (sum(r.bytes for r in selected) / GiB)

    return {
        "condition": condition.name,
        "describe": condition.describe,
        "mib": condition.size_mib,
        "runs": len(ours),
        "p2pfs_mb_s": p2pfs_rate,
        "raw_mb_s": raw_rate,
        "ratio": p2pfs_rate / raw_rate,
        "one_connection_mb_s": single_rate,
        "one_connection_ratio": None if single_rate is None else single_rate / raw_rate,
        "one_connection_runs_mb_s": [round(r.mb_per_s, 2) for r in single],
        "p2pfs_runs_mb_s": [round(r.mb_per_s, 2) for r in ours],
        "raw_runs_mb_s": [round(r.mb_per_s, 2) for r in raw],
        "p2pfs_sender_cpu_s_per_gib": per_gib(ours, "sender"),
        "p2pfs_receiver_cpu_s_per_gib": per_gib(ours, "receiver"),
        "raw_sender_cpu_s_per_gib": per_gib(raw, "sender"),
        "raw_receiver_cpu_s_per_gib": per_gib(raw, "receiver"),
        "lost_p2pfs": [r.lost for r in ours],
        "lost_raw": [r.lost for r in raw],
        "queue_dropped_p2pfs": [r.queue_dropped for r in ours],
        "queue_dropped_raw": [r.queue_dropped for r in raw],
        "wire_ratio": _wire_ratio(ours, raw),
    }


def _wire_ratio(ours: list[Run], raw: list[Run]) -> float | None:
    """Median of the per-seed ratios of the rates on the wire (same seed, same losses)."""
    pairs = [
        a.wire_mb_per_s / b.wire_mb_per_s
        for a, b in zip(ours, raw, strict=True)
        if a.wire_mb_per_s and b.wire_mb_per_s
    ]
    return statistics.median(pairs) if pairs else None


def run_condition(
    condition: Condition,
    runs: int,
    scratch: Path,
    raw_batched: bool,
    raw_reverse: bool,
    one_connection: bool = True,
) -> dict[str, Any]:
    size = condition.size_mib * MiB
    source = scratch / f"{condition.name}.bin"
    write_pseudo_random(source, size, condition.name.encode())
    results = []
    for seed in range(1, runs + 1):
        results.append(p2pfs_run(condition, seed, source, scratch / "daemons"))
        if one_connection:
            daemons = scratch / "daemons"
            results.append(p2pfs_run(condition, seed, source, daemons, one_connection=True))
        results.append(raw_run(condition, seed, size, raw_batched, raw_reverse))
        rates = ", ".join(f"{r.who} {r.mb_per_s:.2f} MB/s" for r in results if r.seed == seed)
        sys.stderr.write(f"{condition.name} seed {seed}: {rates}\n")
    source.unlink()
    summary = summarise(condition, results)
    summary["all_runs"] = [{**asdict(r), "mb_per_s": r.mb_per_s} for r in results]
    return summary


def print_table(rows: list[dict[str, Any]], note: str) -> None:
    header = (
        f"{'condition':<28}{'MiB':>5}{'runs':>5}{'p2pfs MB/s':>12}{'raw MB/s':>10}"
        f"{'ratio':>7}{'goal':>6}{'wire':>7}{'1 conn MB/s':>13}{'ratio':>7}"
        "  CPU s/GiB send/recv p2pfs | raw"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        goal = (
            ""
            if row["condition"].startswith("direct")
            else ("yes" if row["ratio"] >= GOAL else "NO")
        )
        wire = "" if row["wire_ratio"] is None else f"{row['wire_ratio']:.2f}x"
        single = row["one_connection_mb_s"]
        one = (
            f"{'':>13}{'':>7}"
            if single is None
            else (f"{single:>13.2f}{row['one_connection_ratio']:>6.2f}x")
        )
        print(
            f"{row['describe']:<28}{row['mib']:>5}{row['runs']:>5}{row['p2pfs_mb_s']:>12.2f}"
            f"{row['raw_mb_s']:>10.2f}{row['ratio']:>6.2f}x{goal:>6}{wire:>7}{one}  "
            f"{row['p2pfs_sender_cpu_s_per_gib']:.1f}/{row['p2pfs_receiver_cpu_s_per_gib']:.1f}"
            f" | {row['raw_sender_cpu_s_per_gib']:.1f}/{row['raw_receiver_cpu_s_per_gib']:.1f}"
        )
    print(note)


def print_sync_table(rows: list[dict[str, Any]]) -> None:
    header = (
        f"{'sync: join to file complete':<28}{'MiB':>5}{'seconds':>10}{'1 conn s':>10}"
        f"{'speed-up':>10}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        speedup = row["one_connection_seconds"] / row["seconds"]
        print(
            f"{row['describe']:<28}{row['mib']:>5}{row['seconds']:>10.2f}"
            f"{row['one_connection_seconds']:>10.2f}{speedup:>9.2f}x"
        )


def print_edits_table(rows: list[dict[str, Any]]) -> None:
    header = (
        f"{'sync: one edit to identical':<28}{'RTT s':>7}{'p50 s':>8}{'RTTs':>6}{'max s':>8}"
        f"{f'join {EDIT_FILES} s':>13}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        rtts = row["edit_p50_s"] / row["rtt_s"] if row["rtt_s"] else float("nan")
        print(
            f"{row['describe']:<28}{row['rtt_s']:>7.3f}{row['edit_p50_s']:>8.3f}{rtts:>6.2f}"
            f"{row['edit_max_s']:>8.3f}{row['join_s']:>13.2f}"
        )
    print("(reference: the round trip; an edit needs half of one for the root, one for its chunk)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks links", description=__doc__)
    parser.add_argument(
        "--conditions", default="lan,wan", help=f"comma-separated, of {','.join(CONDITIONS)}"
    )
    parser.add_argument("--runs", type=int, default=3, help="seeds per condition (3)")
    parser.add_argument("--size-mib", type=int, help="override every condition's size")
    parser.add_argument(
        "--raw-batched",
        action="store_true",
        help="the raw engine's receiver uses qh3's batched receive (the daemon's setting)",
    )
    parser.add_argument(
        "--raw-reverse",
        action="store_true",
        help="the raw engine's receiver dials its sender, as a p2pfs fetcher does",
    )
    parser.add_argument(
        "--no-one-connection",
        action="store_true",
        help="skip the p2pfs runs with one connection (--stripes 1)",
    )
    parser.add_argument(
        "--sync",
        action="store_true",
        help="also join a sync folder holding the condition's file through the link, at the "
        "defaults and with --stripes 1",
    )
    parser.add_argument(
        "--tree",
        type=int,
        metavar="FILES",
        help="also fetch a tree of FILES files of 200 B-4 KiB through each emulated link "
        "(phases: listing, chunk trees, swarm), beside the raw engine moving its bytes",
    )
    parser.add_argument(
        "--no-fetch",
        action="store_true",
        help="skip the fetch rows (run only what --sync, --tree or --sync-edits ask for)",
    )
    parser.add_argument(
        "--sync-edits",
        type=int,
        metavar="EDITS",
        help=f"also join a folder of {EDIT_FILES} small files through each emulated link, then "
        "time EDITS edits on one member until the other holds them",
    )
    parser.add_argument("--workdir", help="scratch directory (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    chosen = [CONDITIONS[name] for name in args.conditions.split(",")]
    if args.size_mib:
        chosen = [dataclasses.replace(c, size_mib=args.size_mib) for c in chosen]
    scratch = Path(tempfile.mkdtemp(prefix="p2pfs-bench-links-", dir=args.workdir))
    load_before, started = load_average(), time.monotonic()
    try:
        rows = [
            run_condition(
                c,
                args.runs,
                scratch,
                args.raw_batched,
                args.raw_reverse,
                one_connection=not args.no_one_connection,
            )
            for c in chosen
            if not args.no_fetch
        ]
        tree_rows = (
            [tree_condition(c, args.tree, args.runs, scratch) for c in chosen if c.link]
            if args.tree
            else []
        )
        sync_rows = (
            [sync_condition(c, args.runs, scratch) for c in chosen if c.link is not None]
            if args.sync
            else []
        )
        edit_rows = (
            [
                sync_edits_condition(c, args.runs, args.sync_edits, scratch)
                for c in chosen
                if c.link is not None
            ]
            if args.sync_edits
            else []
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    note = (
        f"load average {load_before} before, {load_average()} after; "
        f"{time.monotonic() - started:.0f} s; medians of {args.runs} seeded runs"
    )
    if args.json:
        everything = {"rows": rows, "sync": sync_rows, "tree": tree_rows, "edits": edit_rows}
        print(json.dumps({**everything, "note": note}))
    else:
        if rows:
            print_table(rows, note)
        else:
            print(note)
        if tree_rows:
            print_tree_table(tree_rows)
        if sync_rows:
            print_sync_table(sync_rows)
        if edit_rows:
            print_edits_table(edit_rows)
    return (
        0 if all(r["ratio"] >= GOAL for r in rows if not r["condition"].startswith("direct")) else 1
    )


if __name__ == "__main__":
    raise SystemExit(main())
