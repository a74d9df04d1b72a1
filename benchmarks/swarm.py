"""Swarm benchmark (issue 5): ``python -m benchmarks swarm``.

Real daemons in real processes on loopback, each with its own home, joined by a private DHT
(the first daemon of a group is its bootstrap; LAN discovery off so that no other daemon on
the machine joins in). Seeders share the same folder (hard links to one set of bytes: same
name, same bytes, one share root); fetchers find them through the DHT. Three scenarios:

1. 3 seeders each capped at 20 MB/s upload, one fetcher: aggregate rate, per-seeder share.
2. The same uncapped, beside python-libtorrent moving the same bytes from 3 seeding
   processes to a downloader process (TCP only, ``connect_peer`` to each seeder).
3. 1 seeder and 4 fetchers started at once: the seeder's upload over the content size, beside
   libtorrent's seeder in the same setup (every downloader connected to every other).

``--workers N`` starts the fetcher with ``--data-workers N`` (issue 13's data-plane workers).
``--only workers`` runs instead the comparison of issue 13's swarm goal: 1 seeder and 3
seeders uncapped, the fetcher with workers off and with ``--workers N`` (default 3), off and
on alternating, with the fetcher's CPU split between its main process and its workers.

Every copy is checked file by file (BLAKE3) against the source. Helpers come from the fetch
benchmark (``benchmarks.fetch``); only the multi-peer libtorrent role lives here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import libtorrent as lt  # type: ignore[import-not-found,unused-ignore]

from benchmarks import child_env
from benchmarks.fetch import (
    CHILD_TIMEOUT,
    CLOCK_TICKS,
    LT_PIECE_SIZE,
    MB,
    GiB,
    MiB,
    child_report,
    emit,
    file_digests,
    load_average,
    lt_add,
    lt_session,
    lt_wait_seeding,
    make_torrent,
    own_cpu,
    process_tree_cpu,
    ratio,
    reaped_children_cpu,
    verify_copy,
    write_pseudo_random,
)
from benchmarks.fetch import print_table as fetch_print_table
from benchmarks.index import Row
from tests.support.daemons import DaemonProcess

SEEDERS = 3
FETCHERS = 4
CAP_BYTES_PER_S = 20_000_000  # 20 MB/s, the cap per seeder
CAPPED_GOAL = 0.9 * SEEDERS * CAP_BYTES_PER_S / MB  # MB/s
UPLOAD_RATIO_GOAL = 1.6
FOLDER = "payload"
FILE = "data.bin"


# -- data ----------------------------------------------------------------------------------


def seed_copies(work: Path, copies: int, size: int) -> list[Path]:
    """``copies`` folders ``work/seedN/payload`` holding hard links to one pseudo-random file:
    the same folder name and bytes for every seeder (one share root), one set of pages."""
    folders = [work / f"seed{number}" / FOLDER for number in range(copies)]
    for folder in folders:
        folder.mkdir(parents=True)
    write_pseudo_random(folders[0] / FILE, size, b"p2pfs bench swarm")
    for folder in folders[1:]:
        os.link(folders[0] / FILE, folder / FILE)
    file_digests(folders[0])  # page-cached before anything is timed
    return folders


# -- p2pfs ---------------------------------------------------------------------------------


@contextmanager
def daemon_group(work: Path, name: str) -> Iterator[Callable[..., DaemonProcess]]:
    """A factory of daemons in one private DHT (the first is its bootstrap), LAN off; every
    daemon it started is stopped on the way out."""
    started: list[DaemonProcess] = []

    def start(role: str, *extra: str) -> DaemonProcess:
        args = ["--no-lan", *extra]
        if started:
            args += ["--bootstrap", f"127.0.0.1:{started[0].call('id')['discovery']['dht_port']}"]
        daemon = DaemonProcess(work / f"home-{name}-{role}", extra_args=tuple(args))
        started.append(daemon)
        return daemon.start()

    try:
        yield start
    finally:
        for daemon in reversed(started):
            daemon.stop()


def payload_sent(daemon: DaemonProcess) -> int:
    return int(daemon.call("status")["counters"]["payload_sent"])


@dataclass(frozen=True, slots=True)
class Fetched:
    seconds: float
    """Wall time of ``p2pfs fetch`` (CLI start to exit)."""
    report: dict[str, Any]

    def from_peer(self, node_id: str) -> int:
        return sum(int(p["bytes"]) for p in self.report["peers"] if p["node_id"] == node_id)


def timed_fetch(getter: DaemonProcess, ticket: str, dest: Path) -> Fetched:
    started = time.perf_counter()
    report = getter.cli_json("fetch", ticket, str(dest))
    return Fetched(time.perf_counter() - started, report)


@dataclass(frozen=True, slots=True)
class SwarmRun:
    """One fetch from several seeders."""

    seconds: float
    daemon_seconds: float
    bytes: int
    bytes_from_peer: int
    seeder_bytes: list[int]
    """Each seeder's chunk upload during the fetch (its payload_sent counter)."""
    reported_bytes: list[int]
    """What the fetcher's report says it got from each seeder."""
    seeders_cpu: float
    fetcher_cpu: float
    """The fetching daemon and every process it started (its data-plane workers)."""
    cli_cpu: float
    load: str
    phases: list[str]
    fetcher_main_cpu: float = 0.0
    """The fetching daemon's own process alone (the rest of fetcher_cpu: its workers)."""
    workers: int = 0
    worker_start_cpu: float = 0.0
    """CPU seconds one worker process takes to start (left out of fetcher_cpu)."""
    """The fetching daemon's log lines on the fetch's phases (times since it started)."""

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / MB


def fetch_phases(daemon: DaemonProcess) -> list[str]:
    lines = daemon.log_tail(400).splitlines()
    return [line.split(f"fetch {FOLDER}: ", 1)[1] for line in lines if f"fetch {FOLDER}: " in line]


def own_process_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` itself (utime + stime), not its children."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(value) for value in fields[11:13]) / CLOCK_TICKS


def settle(pid: int, quiet: float = 0.02, step: float = 0.3, limit: float = 10.0) -> None:
    """Wait until ``pid`` and its descendants use under ``quiet`` CPU seconds per ``step``."""
    deadline = time.monotonic() + limit
    last = process_tree_cpu(pid)
    while time.monotonic() < deadline:
        time.sleep(step)
        now = process_tree_cpu(pid)
        if now - last < quiet:
            return
        last = now


def p2pfs_swarm(
    work: Path, name: str, folders: list[Path], cap: int | None, workers: int = 0
) -> SwarmRun:
    """``len(folders)`` seeders (upload capped at ``cap`` bytes/s if set), one fetcher (with
    ``workers`` data-plane workers)."""
    limit = () if cap is None else ("--max-upload-rate", str(cap))
    dest = work / f"out-{name}"
    with daemon_group(work, name) as start:
        seeders = [start(f"seed{number}", *limit) for number in range(len(folders))]
        getter = start("fetcher", *(("--data-workers", str(workers)) if workers else ()))
        pairs = zip(seeders, folders, strict=True)
        tickets = [str(seeder.cli_json("share", str(f))["ticket"]) for seeder, f in pairs]
        ids = [seeder.node_id() for seeder in seeders]
        sent = [payload_sent(seeder) for seeder in seeders]
        pids = [seeder.pid for seeder in seeders]
        load = load_average()
        warm_each = 0.0
        if workers:
            # The warm workers' start-up (imports, identity), per process: the fetch starts
            # a replacement for each one it used, whose start-up is no part of the transfer.
            settle(getter.pid)
            warm_each = (process_tree_cpu(getter.pid) - own_process_cpu(getter.pid)) / workers
        before = (sum(map(process_tree_cpu, pids)), process_tree_cpu(getter.pid))
        main_before = own_process_cpu(getter.pid)
        cli_before = reaped_children_cpu()
        fetched = timed_fetch(getter, tickets[0], dest)
        if workers:
            settle(getter.pid)  # the replacements have started
        after = (sum(map(process_tree_cpu, pids)), process_tree_cpu(getter.pid))
        main_cpu = own_process_cpu(getter.pid) - main_before
        replaced = sum(1 for peer in fetched.report["peers"] if peer.get("worker") is not None)
        cli_cpu = reaped_children_cpu() - cli_before
        sent = [payload_sent(seeder) - was for seeder, was in zip(seeders, sent, strict=True)]
        phases = fetch_phases(getter)
    verify_copy(folders[0], dest, f"p2pfs {name}")
    shutil.rmtree(dest)
    report = fetched.report
    if report["bytes_from_peer"] < report["bytes"]:  # more: endgame duplicates
        raise RuntimeError(f"p2pfs moved {report['bytes_from_peer']} of {report['bytes']} bytes")
    return SwarmRun(
        seconds=fetched.seconds,
        daemon_seconds=float(report["seconds"]),
        bytes=int(report["bytes"]),
        bytes_from_peer=int(report["bytes_from_peer"]),
        seeder_bytes=sent,
        reported_bytes=[fetched.from_peer(node) for node in ids],
        seeders_cpu=after[0] - before[0],
        fetcher_cpu=after[1] - before[1] - replaced * warm_each,
        cli_cpu=cli_cpu,
        load=load,
        phases=phases,
        fetcher_main_cpu=main_cpu,
        workers=workers,
        worker_start_cpu=warm_each,
    )


@dataclass(frozen=True, slots=True)
class FanOutRun:
    """One seeder, several fetchers at once."""

    seconds: float
    """First fetch started to last fetch finished."""
    fetch_seconds: list[float]
    size: int
    seeder_upload: int
    fetcher_uploads: list[int]
    from_seeder: list[int]
    """What each fetcher's report says it got from the seeder."""
    seeder_cpu: float
    load: str

    @property
    def upload_ratio(self) -> float:
        return self.seeder_upload / self.size


def p2pfs_fan_out(work: Path, folder: Path, fetchers: int) -> FanOutRun:
    dests = [work / f"out-fan{number}" for number in range(fetchers)]
    with daemon_group(work, "fan") as start:
        seeder = start("seed")
        getters = [start(f"fetcher{number}") for number in range(fetchers)]
        ticket = str(seeder.cli_json("share", str(folder))["ticket"])
        seeder_id = seeder.node_id()
        sent = [payload_sent(daemon) for daemon in (seeder, *getters)]
        load = load_average()
        cpu = process_tree_cpu(seeder.pid)
        lineup = threading.Barrier(fetchers)

        def fetch(number: int) -> Fetched:
            lineup.wait()
            return timed_fetch(getters[number], ticket, dests[number])

        started = time.perf_counter()
        with ThreadPoolExecutor(fetchers) as pool:
            runs = list(pool.map(fetch, range(fetchers)))
        seconds = time.perf_counter() - started
        cpu = process_tree_cpu(seeder.pid) - cpu
        sent = [payload_sent(d) - was for d, was in zip((seeder, *getters), sent, strict=True)]
    for number, dest in enumerate(dests):
        verify_copy(folder, dest, f"p2pfs fetcher {number}")
        shutil.rmtree(dest)
    return FanOutRun(
        seconds=seconds,
        fetch_seconds=[run.seconds for run in runs],
        size=int(runs[0].report["bytes"]),
        seeder_upload=sent[0],
        fetcher_uploads=sent[1:],
        from_seeder=[run.from_peer(seeder_id) for run in runs],
        seeder_cpu=cpu,
        load=load,
    )


# -- libtorrent reference ------------------------------------------------------------------


def lt_peer_role(torrent: str, save_path: str, mode: str) -> None:
    """Child, seeder (``seed``) or downloader (``get``), driven by lines on stdin:

    prints ``{"port"}`` once listening (a seeder: once its data is checked); then reads
    ``go PORT...``, connects to those ports (a downloader adds its torrent only now), and
    prints ``{"seconds", "cpu", "bytes"}`` once it holds every piece (at once for a seeder);
    keeps serving until ``stop``, then prints ``{"uploaded", "downloaded", "cpu"}``."""
    session = lt_session()
    seeding = mode == "seed"
    handle = lt_add(session, torrent, save_path, lt.torrent_flags.seed_mode) if seeding else None
    if handle is not None:
        lt_wait_seeding(session, handle, CHILD_TIMEOUT)
    emit({"port": session.listen_port()})
    ports = [int(port) for port in sys.stdin.readline().split()[1:]]
    cpu = own_cpu()
    started = time.perf_counter()
    if handle is None:
        handle = lt_add(session, torrent, save_path)
    for port in ports:
        handle.connect_peer(("127.0.0.1", port))
    lt_wait_seeding(session, handle, CHILD_TIMEOUT)
    status = handle.status()
    emit(
        {
            "seconds": time.perf_counter() - started,
            "cpu": own_cpu() - cpu,
            "bytes": status.total_wanted,
        }
    )
    sys.stdin.readline()
    status = handle.status()
    emit(
        {
            "uploaded": status.total_payload_upload,
            "downloaded": status.total_payload_download,
            "cpu": own_cpu() - cpu,
        }
    )
    session.remove_torrent(handle)
    del handle, session  # the last reference: the destructor waits for an orderly shutdown


@dataclass(slots=True)
class LtPeer:
    process: subprocess.Popen[str]
    port: int = 0
    done: dict[str, Any] = field(default_factory=dict)
    final: dict[str, Any] = field(default_factory=dict)

    def read(self, who: str) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"libtorrent {who} stopped (exit {self.process.wait()})")
        record: dict[str, Any] = json.loads(line)
        return record

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()


@contextmanager
def lt_peers(torrent: Path, saves: list[tuple[Path, str]]) -> Iterator[list[LtPeer]]:
    """One ``--lt-peer`` child per (save path, mode), each listening; every child still
    running on the way out is killed (by its own PID)."""
    peers: list[LtPeer] = []
    try:
        for save, mode in saves:
            command = [sys.executable, "-m", "benchmarks.swarm", "--lt-peer"]
            process = subprocess.Popen(
                [*command, str(torrent), str(save), mode],
                env=child_env(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            peers.append(LtPeer(process))
        for peer, (_, mode) in zip(peers, saves, strict=True):
            peer.port = int(peer.read(mode)["port"])
        yield peers
    finally:
        for peer in peers:
            if peer.process.poll() is None:
                peer.process.kill()
            peer.process.wait()
            for stream in (peer.process.stdin, peer.process.stdout):
                if stream is not None:
                    stream.close()


def lt_finish(peers: list[LtPeer]) -> None:
    """Wait until every peer holds every piece, then stop them all and collect their totals."""
    for peer in peers:
        peer.done = peer.read("peer")
    for peer in peers:
        peer.send("stop")
    for peer in peers:
        peer.final = child_report(peer.process, "libtorrent peer")


@dataclass(frozen=True, slots=True)
class LtRun:
    seconds: float
    """The slowest downloader: add_torrent to is_seeding."""
    bytes: int
    seeder_uploads: list[int]
    downloader_uploads: list[int]
    seeders_cpu: float
    downloaders_cpu: float
    load: str

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / MB


def libtorrent_swarm(work: Path, folders: list[Path], downloaders: int, name: str) -> LtRun:
    """A seeding process per folder and ``downloaders`` downloading processes, each of those
    connected to every seeder and every other downloader."""
    torrent = work / f"{name}.torrent"
    make_torrent(folders[0], torrent, LT_PIECE_SIZE)
    saves = [work / f"lt-{name}{number}" for number in range(downloaders)]
    for save in saves:
        save.mkdir()
    roles = [(folder.parent, "seed") for folder in folders] + [(save, "get") for save in saves]
    with lt_peers(torrent, roles) as peers:
        seeders, getters = peers[: len(folders)], peers[len(folders) :]
        load = load_average()
        for peer in seeders:
            peer.send("go")
        for getter in getters:
            ports = [peer.port for peer in peers if peer is not getter]
            getter.send(" ".join(["go", *map(str, ports)]))
        lt_finish(peers)
    for number, save in enumerate(saves):
        verify_copy(folders[0], save / FOLDER, f"libtorrent downloader {number}")
        shutil.rmtree(save)
    return LtRun(
        seconds=max(float(getter.done["seconds"]) for getter in getters),
        bytes=int(getters[0].done["bytes"]),
        seeder_uploads=[int(peer.final["uploaded"]) for peer in seeders],
        downloader_uploads=[int(peer.final["uploaded"]) for peer in getters],
        seeders_cpu=sum(float(peer.final["cpu"]) for peer in seeders),
        downloaders_cpu=sum(float(getter.done["cpu"]) for getter in getters),
        load=load,
    )


# -- rows ----------------------------------------------------------------------------------


def shares(parts: list[int]) -> str:
    total = sum(parts) or 1
    return " / ".join(f"{part / MB:.0f} MB ({100 * part / total:.0f}%)" for part in parts)


def sent_row(run: SwarmRun, reference: str) -> Row:
    """Seeders' upload over the content size: above 1.0, bytes sent that the fetcher did not
    use (requests still queued when the fetch ended, endgame duplicates)."""
    got = run.bytes_from_peer / run.bytes
    return Row(
        "  seeders' upload / content size",
        f"{sum(run.seeder_bytes) / run.bytes:.2f} (fetcher got {got:.2f})",
        reference,
        "",
        "",
        None,
    )


def capped_rows(size: int, run: SwarmRun) -> list[Row]:
    cap = CAP_BYTES_PER_S / MB
    return [
        Row(
            f"{SEEDERS} seeders capped {cap:.0f} MB/s, {size // MiB} MiB (MB/s, CLI wall)",
            f"{run.mb_per_s:.1f} (daemon {run.bytes / run.daemon_seconds / MB:.1f})",
            f"sum of caps {SEEDERS * cap:.0f}",
            f"{run.mb_per_s / (SEEDERS * cap):.2f}x",
            f">= {CAPPED_GOAL:.0f} (0.9x caps)",
            run.mb_per_s >= CAPPED_GOAL,
        ),
        Row(
            "  per-seeder upload (payload_sent)",
            shares(run.seeder_bytes),
            f"fetcher's report: {shares(run.reported_bytes)}",
            "",
            "",
            None,
        ),
        sent_row(run, ""),
    ]


def uncapped_rows(size: int, run: SwarmRun, torrent: LtRun) -> list[Row]:
    gib = size / GiB
    fetcher = (run.fetcher_cpu + run.cli_cpu) / gib
    return [
        Row(
            f"{SEEDERS} seeders uncapped, {size // MiB} MiB (MB/s, CLI wall)",
            f"{run.mb_per_s:.1f} (daemon {run.bytes / run.daemon_seconds / MB:.1f})",
            f"libtorrent {SEEDERS} seeders, {SEEDERS + 1} processes: {torrent.mb_per_s:.1f}",
            ratio(run.mb_per_s, torrent.mb_per_s),
            ">= 1.0x libtorrent",
            run.mb_per_s >= torrent.mb_per_s,
        ),
        Row(
            "  per-seeder upload",
            shares(run.seeder_bytes),
            f"libtorrent: {shares(torrent.seeder_uploads)}",
            "",
            "",
            None,
        ),
        sent_row(run, f"libtorrent {sum(torrent.seeder_uploads) / torrent.bytes:.2f}"),
        Row(
            "  fetcher CPU (s/GiB)",
            f"{fetcher:.2f} (daemon {run.fetcher_cpu / gib:.2f} + CLI {run.cli_cpu / gib:.2f})",
            f"libtorrent downloader {torrent.downloaders_cpu / gib:.2f}",
            ratio(fetcher, torrent.downloaders_cpu / gib),
            "",
            None,
        ),
        Row(
            "  seeders CPU, all 3 (s/GiB)",
            f"{run.seeders_cpu / gib:.2f}",
            f"libtorrent seeders {torrent.seeders_cpu / gib:.2f}",
            ratio(run.seeders_cpu / gib, torrent.seeders_cpu / gib),
            "",
            None,
        ),
    ]


def fan_out_rows(run: FanOutRun, torrent: LtRun | None, note: str) -> list[Row]:
    lt_ratio = None if torrent is None else torrent.seeder_uploads[0] / torrent.bytes
    lt_upload = note if lt_ratio is None else f"libtorrent seeder: {lt_ratio:.2f}"
    mib = run.size // MiB
    slowest = max(run.fetch_seconds)
    return [
        Row(
            f"1 seeder + {FETCHERS} fetchers at once, {mib} MiB: seeder upload / size",
            f"{run.upload_ratio:.2f}",
            lt_upload,
            "" if lt_ratio is None else ratio(run.upload_ratio, lt_ratio),
            f"<= {UPLOAD_RATIO_GOAL}",
            run.upload_ratio <= UPLOAD_RATIO_GOAL,
        ),
        Row(
            "  fetchers' upload to each other (MB)",
            " / ".join(f"{sent / MB:.0f}" for sent in run.fetcher_uploads),
            ""
            if torrent is None
            else " / ".join(f"{u / MB:.0f}" for u in torrent.downloader_uploads),
            "",
            "",
            None,
        ),
        Row(
            "  from the seeder, per fetcher's report (MB)",
            " / ".join(f"{got / MB:.0f}" for got in run.from_seeder),
            "",
            "",
            "",
            None,
        ),
        Row(
            f"  all {FETCHERS} done (s, wall; slowest CLI)",
            f"{run.seconds:.2f} ({slowest:.2f})",
            "" if torrent is None else f"libtorrent slowest downloader {torrent.seconds:.2f}",
            "" if torrent is None else ratio(slowest, torrent.seconds),
            "",
            None,
        ),
    ]


def workers_rows(size: int, runs: dict[str, SwarmRun]) -> list[Row]:
    """Issue 13's swarm goal, workers off and on: 3 seeders over 1 seeder, and the CPU split."""
    gib = size / GiB
    rows = []
    for mode in ("off", "on"):
        one, three = runs[f"one-{mode}"], runs[f"three-{mode}"]
        label = "workers off" if mode == "off" else f"--data-workers {three.workers}"
        gain = three.mb_per_s / one.mb_per_s
        rows.append(
            Row(
                f"{label}: {SEEDERS} seeders uncapped vs 1, {size // MiB} MiB (MB/s, CLI wall)",
                f"{three.mb_per_s:.1f} (daemon {three.bytes / three.daemon_seconds / MB:.1f})",
                f"1 seeder: {one.mb_per_s:.1f}",
                f"{gain:.2f}x",
                ">= 1.5x",
                gain >= 1.5,
            )
        )
        for run, who in ((one, "1 seeder"), (three, f"{SEEDERS} seeders")):
            workers = run.fetcher_cpu - run.fetcher_main_cpu
            rows.append(
                Row(
                    f"  {who}: fetcher CPU s/GiB (main + workers; CLI)",
                    f"{run.fetcher_main_cpu / gib:.2f} + {workers / gib:.2f}; "
                    f"{run.cli_cpu / gib:.2f}",
                    f"seeders {run.seeders_cpu / gib:.2f} (load {run.load})",
                    "",
                    "",
                    None,
                )
            )
    return rows


def run_workers_comparison(work: Path, size: int, workers: int) -> tuple[list[Row], dict[str, Any]]:
    folders = seed_copies(work, SEEDERS, size)
    runs: dict[str, SwarmRun] = {}
    for mode, count in (("off", 0), ("on", workers)):
        # One seeder, then three, off then on: each pair in the same conditions.
        runs[f"one-{mode}"] = p2pfs_swarm(work, f"one-{mode}", folders[:1], None, count)
        runs[f"three-{mode}"] = p2pfs_swarm(work, f"three-{mode}", folders, None, count)
    figures: dict[str, Any] = {"bytes": size}
    figures.update({name: {**asdict(run), "mb_per_s": run.mb_per_s} for name, run in runs.items()})
    return workers_rows(size, runs), figures


def run_benchmark(
    work: Path, size: int, with_lt_fan_out: bool, workers: int = 0
) -> tuple[list[Row], dict[str, Any]]:
    folders = seed_copies(work, SEEDERS, size)
    capped = p2pfs_swarm(work, "capped", folders, CAP_BYTES_PER_S, workers)
    uncapped = p2pfs_swarm(work, "uncapped", folders, None, workers)
    lt_uncapped = libtorrent_swarm(work, folders, 1, "three")
    fan_out = p2pfs_fan_out(work, folders[0], FETCHERS)
    lt_fan_out = None
    note = "not measured (--no-lt-fan-out)"
    if with_lt_fan_out:
        lt_fan_out = libtorrent_swarm(work, folders[:1], FETCHERS, "fan")
    rows = capped_rows(size, capped) + uncapped_rows(size, uncapped, lt_uncapped)
    rows += fan_out_rows(fan_out, lt_fan_out, note)
    figures: dict[str, Any] = {
        "bytes": size,
        "capped": {**asdict(capped), "mb_per_s": capped.mb_per_s},
        "uncapped": {**asdict(uncapped), "mb_per_s": uncapped.mb_per_s},
        "libtorrent_uncapped": {**asdict(lt_uncapped), "mb_per_s": lt_uncapped.mb_per_s},
        "fan_out": {**asdict(fan_out), "upload_ratio": fan_out.upload_ratio},
        "libtorrent_fan_out": None if lt_fan_out is None else asdict(lt_fan_out),
    }
    return rows, figures


# -- output and entry ----------------------------------------------------------------------


def print_table(rows: list[Row], caption: str) -> None:
    fetch_print_table(rows, caption, title="p2pfs swarm benchmark (loopback)")


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks swarm", description=__doc__)
    parser.add_argument("--size-mib", type=int, help="content size (512; --quick 64)")
    parser.add_argument("--quick", action="store_true", help="a smoke run with smaller data")
    parser.add_argument(
        "--no-lt-fan-out", action="store_true", help="skip libtorrent's 1 seeder + 4 fetchers"
    )
    parser.add_argument("--workdir", help="scratch directory (default: a temp dir)")
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="the fetcher runs with --data-workers N (default 0; --only workers: 3)",
    )
    parser.add_argument(
        "--only",
        choices=["workers"],
        help="workers: 1 vs 3 uncapped seeders, workers off and on (issue 13's swarm goal)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--lt-peer", nargs=3, metavar=("TORRENT", "SAVE", "MODE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.size_mib is None:
        args.size_mib = 64 if args.quick else 512
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    if args.lt_peer:
        lt_peer_role(*args.lt_peer)
        return 0
    scratch = Path(tempfile.mkdtemp(prefix="p2pfs-bench-swarm-", dir=args.workdir))
    load_before = load_average()
    started = time.perf_counter()
    try:
        if args.only == "workers":
            workers = SEEDERS if args.workers is None else args.workers
            rows, figures = run_workers_comparison(scratch, args.size_mib * MiB, workers)
        else:
            size = args.size_mib * MiB
            rows, figures = run_benchmark(scratch, size, not args.no_lt_fan_out, args.workers or 0)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    load_after = load_average()
    figures.update(
        load_before=load_before,
        load_after=load_after,
        cpus=os.cpu_count(),
        total_seconds=time.perf_counter() - started,
    )
    if args.json:
        print(json.dumps({"rows": [asdict(row) for row in rows], "figures": figures}))
    else:
        print_table(
            rows,
            f"load average (1/5/15 min) {load_before} before, {load_after} after, "
            f"{os.cpu_count()} CPUs; {figures['total_seconds']:.0f} s in all; "
            "loads per measurement in --json",
        )
    return 0 if all(row.met is not False for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
