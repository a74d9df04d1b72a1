"""Folder sync benchmark (issue 6): ``python -m benchmarks sync``.

Two real daemons in two processes, each with its own home in a temp dir, on loopback (or,
with ``--netns`` as root, in two network namespaces joined by a veth pair). A synced file of
``--size-mib`` random bytes is changed on A: (a) 1 MiB overwritten in the middle, (b) 100
bytes inserted in the middle, (c) renamed. For each, the bytes B received (its daemon's
``bytes_received`` counter: every QUIC stream payload, sync included) and the time until
B's copy is byte-identical (B's file polled every 5 ms; BLAKE3 checked). Then (d) the
latency of small writes (A writes a new small file, B's copy polled every 5 ms) and (e) the
initial sync of ``--files`` files of 1-64 KiB to B joining a new folder.

Reference in the same run on the same bytes and changes: rsync through an ``rsync --daemon``
on loopback, ``rsync -a --stats --no-whole-file --delete-delay --fuzzy`` pulling into the
previous copy; its bytes are what the rsync client (the receiving side) reports as "Total
bytes received", its time the client's wall time (which includes rsync's own full-file
checksums). And Syncthing (unless ``--no-syncthing``): two instances on loopback, each with
its own home in the temp dir, GUI/REST on a free loopback port with an API key set here, sync
listener ``tcp://127.0.0.1:PORT``, global/local discovery, relays, NAT, usage and crash
reporting and upgrades off, each device given the other's static address; one sendreceive
folder per step, otherwise Syncthing's defaults (watcher on, 10 s delay). It gets the same
file and the same changes; after each of (a)-(c) a rescan is requested through REST (what the
GUI's Rescan does), so those times leave out the watcher delay; (d) goes through the watcher
alone, with 5 writes as each waits ~10 s. Its bytes are B's ``inBytesTotal`` for A (from
``/rest/system/connections``: the whole TLS connection), read once they stop moving; its
times poll B's file or tree like the p2pfs steps. The figures stand beside rsync's in the
reference column, each ratio naming its reference.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol
from xml.etree import ElementTree

import blake3
from rich.console import Console
from rich.table import Table

from benchmarks.fetch import free_tcp_port, make_small_tree, wait_for_port
from benchmarks.index import Row
from tests.support.daemons import DaemonProcess

KiB = 1 << 10
MiB = 1 << 20
MB = 1e6
POLL_S = 0.005
SYNC_TIMEOUT = 600.0
SETTLE_S = 0.5
SKIPPED_DIRS = frozenset({".p2pfs", ".stfolder"})
"""p2pfs's state directory and Syncthing's folder marker: not synced content."""
SKIPPED_PREFIXES = (".p2pfs-part-", ".syncthing.")
"""Partial downloads (p2pfs's, and Syncthing's ``.syncthing.NAME.tmp``)."""
LATENCY_ROUNDS = 20
INSERT_BYTES = 100

GOAL_OVERWRITE_BYTES = int(1.2 * MiB)
GOAL_OVERWRITE_S = 1.0
GOAL_INSERT_BYTES = 256 * KiB
GOAL_INSERT_S = 1.0
GOAL_RENAME_BYTES = 32 * KiB
GOAL_LATENCY_P50_S = 0.5
GOAL_SMALL_FILES_S = 5.0

NETNS_SUBNET = "10.78.0"


# -- data ----------------------------------------------------------------------------------


def pseudo_random(label: bytes, size: int, seek: int = 0) -> bytes:
    """``size`` bytes of BLAKE3 XOF output: incompressible, different per label."""
    return blake3.blake3(label).digest(length=size, seek=seek)


def write_pseudo_random(path: Path, size: int, label: bytes) -> None:
    with path.open("wb") as handle:
        for position in range(0, size, 64 * MiB):
            handle.write(pseudo_random(label, min(64 * MiB, size - position), position))


def digest_file(path: Path) -> bytes:
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    if path.stat().st_size > MiB:
        hasher.update_mmap(str(path))
    else:
        hasher.update(path.read_bytes())
    return hasher.digest()


def copy_range(source: Any, length: int, sink: Callable[[bytes], object]) -> None:
    while length > 0:
        block = source.read(min(16 * MiB, length))
        if not block:
            raise RuntimeError("file shorter than expected")
        sink(block)
        length -= len(block)


def spliced_digest(path: Path, offset: int, remove: int, insert: bytes) -> bytes:
    """BLAKE3 of ``path`` with ``remove`` bytes at ``offset`` replaced by ``insert``, without
    writing it: the digest B's copy must reach, known before the change is made."""
    size = path.stat().st_size
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    with path.open("rb") as source:
        copy_range(source, offset, hasher.update)
        hasher.update(insert)
        source.seek(offset + remove)
        copy_range(source, size - offset - remove, hasher.update)
    return hasher.digest()


def write_spliced(path: Path, target: Path, offset: int, insert: bytes) -> None:
    """``path`` with ``insert`` inserted at ``offset``, written to ``target``."""
    size = path.stat().st_size
    with path.open("rb") as source, target.open("wb") as sink:
        copy_range(source, offset, sink.write)
        sink.write(insert)
        copy_range(source, size - offset, sink.write)


def overwrite_in_place(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def synced_files(root: Path) -> Iterator[tuple[str, Path]]:
    for directory, dirnames, filenames in os.walk(root):
        dirnames[:] = [name for name in dirnames if name not in SKIPPED_DIRS]
        for name in filenames:
            if not name.startswith(SKIPPED_PREFIXES):
                path = Path(directory, name)
                yield path.relative_to(root).as_posix(), path


def count_files(root: Path) -> int:
    """Files under ``root`` without a stat each (the cheap check, polled)."""
    return sum(1 for _ in synced_files(root))


def sizes(root: Path) -> dict[str, int]:
    found = {}
    for relative, path in synced_files(root):
        with contextlib.suppress(FileNotFoundError):
            found[relative] = path.stat().st_size
    return found


def tree_digests(root: Path) -> dict[str, bytes]:
    return {relative: digest_file(path) for relative, path in synced_files(root)}


def percentile(values: list[float], percent: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[percent - 1]


def load_average() -> str:
    return "/".join(f"{value:.2f}" for value in os.getloadavg())


# -- network namespaces --------------------------------------------------------------------


def run_ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


class Namespaces:
    """Two network namespaces joined by a veth pair (10.78.0.1 <-> 10.78.0.2)."""

    def __init__(self) -> None:
        pid = os.getpid()
        self.names = (f"p2pfs-sync-{pid}-a", f"p2pfs-sync-{pid}-b")
        self.links = (f"p2s{pid % 100000}a", f"p2s{pid % 100000}b")
        self.hosts = (f"{NETNS_SUBNET}.1", f"{NETNS_SUBNET}.2")

    def __enter__(self) -> Namespaces:
        try:
            for name in self.names:
                run_ip("netns", "add", name)
            a, b = self.links
            run_ip(
                *f"link add {a} netns {self.names[0]} type veth peer name {b}".split(),
                "netns",
                self.names[1],
            )
            for name, link, host in zip(self.names, self.links, self.hosts, strict=True):
                run_ip("-n", name, "addr", "add", f"{host}/24", "dev", link)
                run_ip("-n", name, "link", "set", link, "up")
                run_ip("-n", name, "link", "set", "lo", "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        for name in self.names:  # deleting a namespace deletes its end of the veth pair
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)

    def rx_bytes(self, side: int) -> int:
        """The veth's receive counter inside namespace ``side`` (frames incl. IP/UDP)."""
        statistics_file = f"/sys/class/net/{self.links[side]}/statistics/rx_bytes"
        completed = subprocess.run(
            ["ip", "netns", "exec", self.names[side], "cat", statistics_file],
            check=True,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return int(completed.stdout)


class NamespacedDaemon(DaemonProcess):
    """A daemon run through ``ip netns exec`` (which execs it: the PID is the daemon's).
    The control socket is a path in its home, reachable from any network namespace."""

    def __init__(self, home: Path, namespace: str, host: str) -> None:
        repo = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))
        prefix = ("ip", "netns", "exec", namespace)
        super().__init__(home, f"{host}:0", ("--no-lan",), {"PYTHONPATH": path}, prefix)
        self.namespace = namespace


# -- p2pfs ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChangeRun:
    seconds: float
    """From the change on A to B's copy seen complete (its content checked afterwards)."""
    bytes_received: int
    """B's ``bytes_received`` delta, read once the counter stopped moving."""
    wire_bytes: int | None
    """B's veth rx delta (frames), with --netns only."""


@dataclass(frozen=True, slots=True)
class SmallFilesRun:
    seconds: float
    bytes_received: int
    files: int
    bytes: int
    share_seconds: float


def settled(read: Callable[[], int]) -> int:
    """A counter once it has not moved for SETTLE_S (trailing acks and index updates)."""
    deadline = time.monotonic() + 10 * SETTLE_S
    last = read()
    while time.monotonic() < deadline:
        time.sleep(SETTLE_S)
        now = read()
        if now == last:
            break
        last = now
    return last


class Receiver(Protocol):
    """Either pair of peers, as measure_change sees it."""

    def settled_received(self) -> int: ...

    def wire(self) -> int | None: ...


class Pair:
    """Daemon A (which changes things) and daemon B (which receives them)."""

    def __init__(self, work: Path, namespaces: Namespaces | None) -> None:
        self.namespaces = namespaces
        if namespaces is None:
            self.a = DaemonProcess(work / "home-a", extra_args=("--no-lan",))
            self.b = DaemonProcess(work / "home-b", extra_args=("--no-lan",))
        else:
            self.a = NamespacedDaemon(work / "home-a", namespaces.names[0], namespaces.hosts[0])
            self.b = NamespacedDaemon(work / "home-b", namespaces.names[1], namespaces.hosts[1])

    def received(self) -> int:
        return int(self.b.call("status")["bytes_received"])

    def wire(self) -> int | None:
        return None if self.namespaces is None else self.namespaces.rx_bytes(1)

    def settled_received(self) -> int:
        return settled(self.received)

    def folder(self, daemon: DaemonProcess, path: Path) -> dict[str, Any]:
        for folder in daemon.cli_json("sync", "list")["folders"]:
            if os.path.realpath(folder["path"]) == os.path.realpath(path):
                found: dict[str, Any] = folder
                return found
        raise RuntimeError(f"{path} is not a sync folder of {daemon.home}")

    def wait_same_root(self, a_dir: Path, b_dir: Path) -> None:
        deadline = time.monotonic() + SYNC_TIMEOUT
        while self.folder(self.a, a_dir)["root"] != self.folder(self.b, b_dir)["root"]:
            if time.monotonic() > deadline:
                raise RuntimeError("A and B did not converge")
            time.sleep(0.2)  # a harness waiting on two processes


Identity = tuple[int, int, int]


def identity_of(path: Path) -> Identity | None:
    """Changes whenever the file is replaced, renamed, resized or written."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return (info.st_ino, info.st_size, info.st_ctime_ns)


def wait_for_file(
    path: Path, size: int, digest: bytes, started: float, before: Identity | None = None
) -> float:
    """Seconds from ``started`` until ``path`` first had the (stat) identity whose content is
    ``digest``: polled every POLL_S; the content is hashed only when the identity changes
    (and never for ``before``, the identity the file had before the change)."""
    seen = before
    seen_at = started
    deadline = started + SYNC_TIMEOUT
    while True:
        try:
            info = path.stat()
            identity = (info.st_ino, info.st_size, info.st_ctime_ns)
            if identity != seen:
                seen, seen_at = identity, time.perf_counter()
                if info.st_size == size and digest_file(path) == digest:
                    return seen_at - started
        except FileNotFoundError:
            seen = None
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{path} did not reach the expected content")
        time.sleep(POLL_S)


def measure_change(
    pair: Receiver, change: Callable[[], object], b_file: Path, size: int, digest: bytes
) -> ChangeRun:
    before, wire_before = pair.settled_received(), pair.wire()
    identity = identity_of(b_file)
    started = time.perf_counter()
    change()
    seconds = wait_for_file(b_file, size, digest, started, identity)
    received = pair.settled_received() - before
    wire_after = pair.wire()
    wire = None if wire_before is None or wire_after is None else wire_after - wire_before
    return ChangeRun(seconds, received, wire)


@dataclass(frozen=True, slots=True)
class BigFileRuns:
    initial_seconds: float
    overwrite: ChangeRun
    insert: ChangeRun
    rename: ChangeRun


def big_file_runs(pair: Pair, work: Path, size: int) -> BigFileRuns:
    a_dir, b_dir, staging = work / "a", work / "b", work / "staging"
    for directory in (a_dir, staging):
        directory.mkdir()
    big = a_dir / "big.bin"
    write_pseudo_random(big, size, b"p2pfs bench sync big file")
    digest = digest_file(big)
    tickets = pair.a.cli_json("sync", str(a_dir))
    started = time.perf_counter()
    pair.b.cli_json("sync", str(b_dir), tickets["rw"])
    initial = wait_for_file(b_dir / "big.bin", size, digest, started)
    pair.wait_same_root(a_dir, b_dir)

    middle = size // 2
    patch = pseudo_random(b"p2pfs bench sync overwrite", MiB)
    digest = spliced_digest(big, middle, len(patch), patch)
    overwrite = measure_change(
        pair, lambda: overwrite_in_place(big, middle, patch), b_dir / "big.bin", size, digest
    )
    pair.wait_same_root(a_dir, b_dir)

    insert = pseudo_random(b"p2pfs bench sync insert", INSERT_BYTES)
    digest = spliced_digest(big, middle, 0, insert)
    write_spliced(big, staging / "big.bin", middle, insert)  # saved like an editor does
    size += INSERT_BYTES
    inserted = measure_change(
        pair, lambda: os.replace(staging / "big.bin", big), b_dir / "big.bin", size, digest
    )
    pair.wait_same_root(a_dir, b_dir)

    renamed = measure_change(
        pair,
        lambda: big.rename(a_dir / "big-renamed.bin"),
        b_dir / "big-renamed.bin",
        size,
        digest,
    )
    pair.wait_same_root(a_dir, b_dir)
    if (b_dir / "big.bin").exists():
        raise RuntimeError("B still has the file under its old name after the rename")
    return BigFileRuns(initial, overwrite, inserted, renamed)


def latency_runs(pair: Pair, work: Path, rounds: int) -> list[float]:
    a_dir, b_dir = work / "a", work / "b"
    (a_dir / "latency").mkdir()
    pair.wait_same_root(a_dir, b_dir)
    return time_small_writes(a_dir / "latency", b_dir / "latency", rounds)


def time_small_writes(a_dir: Path, b_dir: Path, rounds: int) -> list[float]:
    """A writes a new small file; seconds until B has it byte for byte (5 ms polling)."""
    seconds = []
    for number in range(rounds):
        data = pseudo_random(b"p2pfs bench sync latency %d" % number, 200 + number)
        target = b_dir / f"note-{number:02d}.txt"
        started = time.perf_counter()
        (a_dir / f"note-{number:02d}.txt").write_bytes(data)
        deadline = started + SYNC_TIMEOUT
        while True:
            with contextlib.suppress(FileNotFoundError):
                if target.read_bytes() == data:
                    break
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{target} did not arrive")
            time.sleep(POLL_S)
        seconds.append(time.perf_counter() - started)
    return seconds


def wait_for_tree(b_dir: Path, expected: dict[str, int], started: float) -> float:
    """Seconds from ``started`` until ``b_dir`` holds the files (and sizes) ``expected``."""
    deadline = started + SYNC_TIMEOUT
    while count_files(b_dir) != len(expected) or sizes(b_dir) != expected:
        if time.perf_counter() > deadline:
            raise RuntimeError("B did not receive the small files")
        time.sleep(0.02)  # a harness waiting on a process; a poll is one directory walk
    return time.perf_counter() - started


def small_files_run(pair: Pair, work: Path, files: int) -> SmallFilesRun:
    """A shares a new folder of ``files`` small files; B joins it fresh."""
    a_dir, b_dir = work / "a-small", work / "b-small"
    total = make_small_tree(a_dir, files, 100, seed=3)
    expected = sizes(a_dir)
    started = time.perf_counter()
    ticket = pair.a.cli_json("sync", str(a_dir))["rw"]
    deadline = started + SYNC_TIMEOUT
    while pair.folder(pair.a, a_dir)["files"] < files:  # A has indexed them all
        if time.perf_counter() > deadline:
            raise RuntimeError("A did not index the small files")
        time.sleep(0.2)  # a harness waiting on a process
    share_seconds = time.perf_counter() - started
    before = pair.settled_received()
    started = time.perf_counter()
    pair.b.cli_json("sync", str(b_dir), ticket)
    seconds = wait_for_tree(b_dir, expected, started)
    received = pair.settled_received() - before
    if tree_digests(b_dir) != tree_digests(a_dir):
        raise RuntimeError("B's small files differ from A's")
    return SmallFilesRun(seconds, received, files, total, share_seconds)


# -- rsync reference -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RsyncRun:
    seconds: float
    """Client wall time (includes rsync's checksum pass over both copies)."""
    bytes_received: int
    """"Total bytes received" as the client (the receiving side) reports it."""
    literal: int
    """"Literal data": bytes not matched against the old copy."""


def stat_number(output: str, label: str) -> int:
    match = re.search(rf"^{re.escape(label)}: ([\d,.]+)", output, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"rsync --stats printed no {label!r}")
    return int(re.sub(r"\D", "", match.group(1)))


class RsyncDaemon:
    """``rsync --daemon`` on loopback serving two read-only modules."""

    def __init__(self, rsync: str, work: Path, modules: dict[str, Path]) -> None:
        self.rsync = rsync
        self.port = free_tcp_port()
        config = work / "rsyncd.conf"
        lines = [
            "use chroot = no",
            f"uid = {os.getuid()}",
            f"gid = {os.getgid()}",
            f"log file = {work / 'rsyncd.log'}",
        ]
        for name, path in modules.items():
            lines += [f"[{name}]", f"path = {path}", "read only = yes"]
        config.write_text("\n".join(lines) + "\n")
        arguments = ["--daemon", "--no-detach", "--address=127.0.0.1", f"--port={self.port}"]
        self.process = subprocess.Popen([rsync, *arguments, "--config", str(config)])
        try:
            wait_for_port(self.port, 10)
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait()

    def pull(self, module: str, dest: Path, *extra: str) -> RsyncRun:
        command = [self.rsync, "-a", "--stats", "--no-whole-file", "--delete-delay", "--fuzzy"]
        command += [*extra, f"rsync://127.0.0.1:{self.port}/{module}/", f"{dest}/"]
        started = time.perf_counter()
        completed = subprocess.run(
            command, capture_output=True, text=True, timeout=SYNC_TIMEOUT, check=True
        )
        seconds = time.perf_counter() - started
        output = completed.stdout
        return RsyncRun(
            seconds,
            stat_number(output, "Total bytes received"),
            stat_number(output, "Literal data"),
        )


@dataclass(frozen=True, slots=True)
class RsyncRuns:
    overwrite: RsyncRun
    insert: RsyncRun
    rename: RsyncRun
    small_files: RsyncRun


def rsync_reference(work: Path, size: int, files: int) -> RsyncRuns | str:
    """The same file, the same three changes and the same small tree, through rsync."""
    rsync = shutil.which("rsync")
    if rsync is None:
        return "not installed"
    source, copy, small, small_copy = (
        work / name for name in ("rs-src", "rs-dst", "rs-small", "rs-small-dst")
    )
    for directory in (source, copy, small_copy):
        directory.mkdir()
    big = source / "big.bin"
    write_pseudo_random(big, size, b"p2pfs bench sync big file")
    make_small_tree(small, files, 100, seed=3)
    daemon = RsyncDaemon(rsync, work, {"big": source, "small": small})
    try:
        daemon.pull("big", copy)
        middle = size // 2
        overwrite_in_place(big, middle, pseudo_random(b"p2pfs bench sync overwrite", MiB))
        overwrite = daemon.pull("big", copy)
        insert = pseudo_random(b"p2pfs bench sync insert", INSERT_BYTES)
        write_spliced(big, work / "rs-staging.bin", middle, insert)
        os.replace(work / "rs-staging.bin", big)
        inserted = daemon.pull("big", copy)
        big.rename(source / "big-renamed.bin")
        renamed = daemon.pull("big", copy)
        small_files = daemon.pull("small", small_copy)
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        return f"rsync failed: {exc}"
    finally:
        daemon.close()
    if digest_file(copy / "big-renamed.bin") != digest_file(source / "big-renamed.bin"):
        return "rsync's copy differs from the source"
    for directory in (source, copy, small, small_copy):
        shutil.rmtree(directory, ignore_errors=True)
    return RsyncRuns(overwrite, inserted, renamed, small_files)


# -- Syncthing reference -------------------------------------------------------------------


SYNCTHING_LATENCY_ROUNDS = 5
"""Few: every write waits for Syncthing's watcher (10 s by default)."""
SYNCTHING_START_TIMEOUT = 60.0
SYNCTHING_POLL_S = 0.1
SYNCTHING_OPTIONS = {
    "globalAnnounceEnabled": "false",
    "localAnnounceEnabled": "false",
    "relaysEnabled": "false",
    "natEnabled": "false",
    "urAccepted": "-1",
    "autoUpgradeIntervalH": "0",
    "crashReportingEnabled": "false",
    "startBrowser": "false",
}
"""Off: everything that would reach past loopback (the rest stays at its default)."""


@dataclass(frozen=True, slots=True)
class SyncthingRuns:
    version: str
    watcher_delay_s: int
    """B's folder's fsWatcherDelayS as Syncthing filled it in (its default)."""
    scan_seconds: float
    """A's scan of the new folder with the big file, before B joins."""
    big: BigFileRuns
    latency_seconds: list[float]
    small_files: SmallFilesRun


def child(element: ElementTree.Element, tag: str) -> ElementTree.Element:
    found = element.find(tag)
    if found is None:
        raise RuntimeError(f"Syncthing's config.xml has no <{tag}>")
    return found


def set_child_text(element: ElementTree.Element, tag: str, text: str) -> None:
    found = element.find(tag)
    if found is None:
        found = ElementTree.SubElement(element, tag)
    found.text = text


class SyncthingInstance:
    """One ``syncthing serve`` with its own home, its GUI/REST and sync listener on loopback."""

    def __init__(self, binary: str, home: Path) -> None:
        self.binary = binary
        self.home = home
        self.gui_port = free_tcp_port()
        self.listen_port = free_tcp_port()
        self.api_key = secrets.token_urlsafe(24)
        self.device_id = ""
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.listen_port}"

    def generate(self) -> None:
        command = [self.binary, "generate", "--home", str(self.home), "--no-default-folder"]
        subprocess.run(command, check=True, capture_output=True, timeout=60)
        self.configure()

    def configure(self) -> None:
        path = self.home / "config.xml"
        tree = ElementTree.parse(path)
        root = tree.getroot()
        self.device_id = child(root, "device").get("id", "")
        gui = child(root, "gui")
        set_child_text(gui, "address", f"127.0.0.1:{self.gui_port}")
        set_child_text(gui, "apikey", self.api_key)
        options = child(root, "options")
        set_child_text(options, "listenAddress", self.address)
        for name, value in SYNCTHING_OPTIONS.items():
            set_child_text(options, name, value)
        tree.write(path)

    def start(self) -> None:
        log = (self.home / "syncthing.log").open("ab")
        command = [self.binary, "serve", "--home", str(self.home)]
        command += ["--no-browser", "--no-restart", "--no-upgrade", "--logflags=3"]
        environment = {**os.environ, "STNOUPGRADE": "1", "STNORESTART": "1"}
        with log:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=environment
            )
        deadline = time.monotonic() + SYNCTHING_START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"syncthing exited at start:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                self.get("/rest/system/ping")
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"syncthing did not start:\n{self.log_tail()}")
            time.sleep(0.1)  # a harness waiting for a process to come up

    def log_tail(self) -> str:
        return "\n".join((self.home / "syncthing.log").read_text().splitlines()[-20:])

    def request(self, method: str, path: str, body: object = None) -> Any:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.gui_port}{path}",
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={"X-API-Key": self.api_key, "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=SYNC_TIMEOUT) as response:
            payload = response.read()
        return json.loads(payload) if payload.strip() else None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: object = None) -> Any:
        return self.request("POST", path, body)

    def stop(self) -> None:
        """Shut down through REST; the process (by its PID) if it does not go in 10 s."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(OSError):
            self.post("/rest/system/shutdown")
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class SyncthingPair:
    """Syncthing A (which changes things) and B (which receives), introduced statically."""

    def __init__(self, binary: str, work: Path) -> None:
        self.a = SyncthingInstance(binary, work / "st-home-a")
        self.b = SyncthingInstance(binary, work / "st-home-b")

    def start(self) -> None:
        for instance in (self.a, self.b):
            instance.generate()
            instance.start()
        for local, peer in ((self.a, self.b), (self.b, self.a)):
            device = {"deviceID": peer.device_id, "addresses": [peer.address]}
            local.post("/rest/config/devices", device)
        self.wait(self.connected, "A and B did not connect")

    def stop(self) -> None:
        for instance in (self.b, self.a):
            instance.stop()

    def connected(self) -> bool:
        connections = self.b.get("/rest/system/connections")["connections"]
        return bool(connections.get(self.a.device_id, {}).get("connected"))

    def received(self) -> int:
        """B's inBytesTotal on its connection to A (everything on that TLS connection)."""
        connections = self.b.get("/rest/system/connections")["connections"]
        return int(connections[self.a.device_id]["inBytesTotal"])

    def settled_received(self) -> int:
        return settled(self.received)

    def wire(self) -> int | None:
        return None

    def share(self, instance: SyncthingInstance, folder: str, path: Path) -> None:
        """Adds ``folder`` at ``path``, shared with the other device; settings as default."""
        devices = [{"deviceID": self.a.device_id}, {"deviceID": self.b.device_id}]
        body = {"id": folder, "label": folder, "path": str(path), "type": "sendreceive"}
        instance.post("/rest/config/folders", {**body, "devices": devices})

    def status(self, instance: SyncthingInstance, folder: str) -> dict[str, Any]:
        found: dict[str, Any] = instance.get(f"/rest/db/status?folder={folder}")
        return found

    def scanned(self, folder: str, files: int) -> bool:
        status = self.status(self.a, folder)
        return bool(status["state"] == "idle" and status["localFiles"] == files)

    def converged(self, folder: str) -> bool:
        """Both idle, B needs nothing, and A sees B complete."""
        a, b = self.status(self.a, folder), self.status(self.b, folder)
        completion = self.a.get(f"/rest/db/completion?folder={folder}&device={self.b.device_id}")
        return bool(
            a["state"] == b["state"] == "idle"
            and b["needTotalItems"] == 0
            and completion["needItems"] == completion["needDeletes"] == 0
            and a["localFiles"] == b["localFiles"]
        )

    def wait(self, condition: Callable[[], bool], failure: str) -> float:
        started = time.perf_counter()
        while not condition():
            if time.perf_counter() > started + SYNC_TIMEOUT:
                raise RuntimeError(failure)
            time.sleep(SYNCTHING_POLL_S)  # a harness waiting on two processes
        return time.perf_counter() - started

    def wait_converged(self, folder: str, when: str) -> None:
        self.wait(lambda: self.converged(folder), f"A and B did not converge {when}")

    def rescan(self, folder: str) -> None:
        """What the GUI's Rescan does; returns once A's scan is done."""
        self.a.post(f"/rest/db/scan?folder={folder}")


def rescanned(pair: SyncthingPair, change: Callable[[], object]) -> Callable[[], None]:
    def change_and_rescan() -> None:
        change()
        pair.rescan("big")

    return change_and_rescan


def syncthing_initial_sync(
    pair: SyncthingPair, a_dir: Path, b_dir: Path, size: int
) -> tuple[float, float]:
    """A shares the folder with the big file; once scanned, B joins. (A's scan, B's sync.)"""
    digest = digest_file(a_dir / "big.bin")
    started = time.perf_counter()
    pair.share(pair.a, "big", a_dir)
    pair.wait(lambda: pair.scanned("big", 1), "A did not scan the big file")
    scan_seconds = time.perf_counter() - started
    started = time.perf_counter()
    pair.share(pair.b, "big", b_dir)
    initial = wait_for_file(b_dir / "big.bin", size, digest, started)
    pair.wait_converged("big", "after the initial sync")
    return scan_seconds, initial


def syncthing_big_file_runs(
    pair: SyncthingPair, work: Path, size: int
) -> tuple[float, BigFileRuns]:
    """The p2pfs steps on the same bytes; each change is followed by a rescan request."""
    a_dir, b_dir, staging = work / "st-a", work / "st-b", work / "st-staging"
    for directory in (a_dir, b_dir, staging):
        directory.mkdir()
    big = a_dir / "big.bin"
    write_pseudo_random(big, size, b"p2pfs bench sync big file")
    scan_seconds, initial = syncthing_initial_sync(pair, a_dir, b_dir, size)

    middle = size // 2
    patch = pseudo_random(b"p2pfs bench sync overwrite", MiB)
    digest = spliced_digest(big, middle, len(patch), patch)
    change = rescanned(pair, lambda: overwrite_in_place(big, middle, patch))
    overwrite = measure_change(pair, change, b_dir / "big.bin", size, digest)
    pair.wait_converged("big", "after the overwrite")

    insert = pseudo_random(b"p2pfs bench sync insert", INSERT_BYTES)
    digest = spliced_digest(big, middle, 0, insert)
    write_spliced(big, staging / "big.bin", middle, insert)  # saved like an editor does
    size += INSERT_BYTES
    change = rescanned(pair, lambda: os.replace(staging / "big.bin", big))
    inserted = measure_change(pair, change, b_dir / "big.bin", size, digest)
    pair.wait_converged("big", "after the insertion")

    change = rescanned(pair, lambda: big.rename(a_dir / "big-renamed.bin"))
    renamed = measure_change(pair, change, b_dir / "big-renamed.bin", size, digest)
    pair.wait_converged("big", "after the rename")
    if (b_dir / "big.bin").exists():
        raise RuntimeError("Syncthing's B still has the file under its old name")
    return scan_seconds, BigFileRuns(initial, overwrite, inserted, renamed)


def syncthing_latency_runs(pair: SyncthingPair, work: Path, rounds: int) -> list[float]:
    """Small writes picked up by A's watcher (default delay), no rescan requested."""
    a_dir, b_dir = work / "st-a" / "latency", work / "st-b" / "latency"
    a_dir.mkdir()
    pair.wait(lambda: b_dir.is_dir() and pair.converged("big"), "B did not get latency/")
    return time_small_writes(a_dir, b_dir, rounds)


def syncthing_small_files_run(pair: SyncthingPair, work: Path, files: int) -> SmallFilesRun:
    """A shares a new folder of ``files`` small files; B joins it with an empty directory."""
    a_dir, b_dir = work / "st-a-small", work / "st-b-small"
    total = make_small_tree(a_dir, files, 100, seed=3)
    b_dir.mkdir()
    expected = sizes(a_dir)
    started = time.perf_counter()
    pair.share(pair.a, "small", a_dir)
    pair.wait(lambda: pair.scanned("small", files), "A did not scan the small files")
    share_seconds = time.perf_counter() - started
    before = pair.settled_received()
    started = time.perf_counter()
    pair.share(pair.b, "small", b_dir)
    seconds = wait_for_tree(b_dir, expected, started)
    received = pair.settled_received() - before
    if tree_digests(b_dir) != tree_digests(a_dir):
        raise RuntimeError("Syncthing's B's small files differ from A's")
    return SmallFilesRun(seconds, received, files, total, share_seconds)


def watcher_delay(pair: SyncthingPair) -> int:
    folder = pair.b.get("/rest/config/folders/big")
    if not folder["fsWatcherEnabled"]:
        raise RuntimeError("Syncthing's watcher is off by default here")
    return int(folder["fsWatcherDelayS"])


def run_syncthing(binary: str, work: Path, size: int, files: int) -> SyncthingRuns:
    pair = SyncthingPair(binary, work)
    try:
        pair.start()
        version = str(pair.a.get("/rest/system/version")["version"])
        scan_seconds, big = syncthing_big_file_runs(pair, work, size)
        delay = watcher_delay(pair)
        latencies = syncthing_latency_runs(pair, work, SYNCTHING_LATENCY_ROUNDS)
        small = syncthing_small_files_run(pair, work, files)
    finally:
        pair.stop()
    return SyncthingRuns(version, delay, scan_seconds, big, latencies, small)


def syncthing_reference(work: Path, size: int, files: int, enabled: bool) -> SyncthingRuns | str:
    """The same file, changes, writes and small tree, through two Syncthing instances."""
    binary = shutil.which("syncthing")
    if binary is None:
        return "not installed"
    if not enabled:
        return "skipped (--no-syncthing)"
    try:
        return run_syncthing(binary, work, size, files)
    except (OSError, subprocess.SubprocessError, RuntimeError, KeyError) as exc:
        return f"failed: {exc}"
    finally:
        for name in ("st-a", "st-b", "st-staging", "st-a-small", "st-b-small"):
            shutil.rmtree(work / name, ignore_errors=True)


# -- report --------------------------------------------------------------------------------


def size_text(count: int) -> str:
    return f"{count / MiB:.2f} MiB" if count >= MiB else f"{count / KiB:.1f} KiB"


def ratio(value: float, reference: float | None) -> str:
    return "" if not reference else f"{value / reference:.2f}x"


@dataclass(frozen=True, slots=True)
class References:
    """What the same run measured through rsync and Syncthing (or why not)."""

    rsync: RsyncRuns | str
    syncthing: SyncthingRuns | str

    @property
    def rsync_runs(self) -> RsyncRuns | None:
        return self.rsync if isinstance(self.rsync, RsyncRuns) else None

    @property
    def syncthing_runs(self) -> SyncthingRuns | None:
        return self.syncthing if isinstance(self.syncthing, SyncthingRuns) else None

    @property
    def note(self) -> str:
        """Shown in a row that has no reference figure."""
        notes = [
            f"{name} {reference}" for name, reference in self.named() if isinstance(reference, str)
        ]
        return "; ".join(notes)

    def named(self) -> list[tuple[str, RsyncRuns | SyncthingRuns | str]]:
        return [("rsync", self.rsync), ("Syncthing", self.syncthing)]


Part = tuple[str, float, str]
"""A reference's name, its figure (for the ratio) and its text."""


def cells(value: float, parts: list[Part], note: str) -> tuple[str, str]:
    """The reference and ratio cells of a row: one entry per reference that ran."""
    if not parts:
        return note, ""
    reference = "; ".join(f"{name} {text}" for name, _, text in parts)
    ratios = "; ".join(f"{ratio(value, figure)} vs {name}" for name, figure, _ in parts if figure)
    return reference, ratios


def bytes_parts(rsync: RsyncRun | None, syncthing: ChangeRun | None) -> list[Part]:
    parts = []
    if rsync is not None:
        text = f"{size_text(rsync.bytes_received)} (literal {size_text(rsync.literal)})"
        parts.append(("rsync", float(rsync.bytes_received), text))
    if syncthing is not None:
        parts.append(
            ("Syncthing", float(syncthing.bytes_received), size_text(syncthing.bytes_received))
        )
    return parts


def seconds_parts(rsync: RsyncRun | None, syncthing: ChangeRun | None) -> list[Part]:
    parts = []
    if rsync is not None:
        parts.append(("rsync", rsync.seconds, f"{rsync.seconds:.3f} (client wall)"))
    if syncthing is not None:
        text = f"{syncthing.seconds:.3f} (rescan requested)"
        parts.append(("Syncthing", syncthing.seconds, text))
    return parts


def change_rows(
    label: str,
    run: ChangeRun,
    rsync: RsyncRun | None,
    syncthing: ChangeRun | None,
    note: str,
    goal_bytes: int,
    goal_seconds: float | None,
) -> list[Row]:
    wire = "" if run.wire_bytes is None else f" (veth rx {size_text(run.wire_bytes)})"
    return [
        Row(
            f"{label}: bytes received by B",
            size_text(run.bytes_received) + wire,
            *cells(run.bytes_received, bytes_parts(rsync, syncthing), note),
            f"<= {size_text(goal_bytes)}",
            run.bytes_received <= goal_bytes,
        ),
        Row(
            f"{label}: until B's copy matches (s)",
            f"{run.seconds:.3f}",
            *cells(run.seconds, seconds_parts(rsync, syncthing), note),
            "" if goal_seconds is None else f"<= {goal_seconds:g} s",
            None if goal_seconds is None else run.seconds <= goal_seconds,
        ),
    ]


def initial_row(size: int, big: BigFileRuns, references: References) -> Row:
    syncthing = references.syncthing_runs
    parts: list[Part] = []
    if syncthing is not None:
        seconds = syncthing.big.initial_seconds
        text = f"{seconds:.2f} (after A's scan, {syncthing.scan_seconds:.2f})"
        parts.append(("Syncthing", seconds, text))
    return Row(
        f"initial sync of a {size // MiB} MiB file (s)",
        f"{big.initial_seconds:.2f}",
        *cells(big.initial_seconds, parts, ""),
        "",
        None,
    )


def big_file_rows(size: int, big: BigFileRuns, references: References) -> list[Row]:
    rsync, syncthing = references.rsync_runs, references.syncthing_runs
    theirs = None if syncthing is None else syncthing.big
    mib, note = size // MiB, references.note
    rows = [initial_row(size, big, references)]
    rows += change_rows(
        f"(a) 1 MiB overwritten mid-file ({mib} MiB)",
        big.overwrite,
        None if rsync is None else rsync.overwrite,
        None if theirs is None else theirs.overwrite,
        note,
        GOAL_OVERWRITE_BYTES,
        GOAL_OVERWRITE_S,
    )
    rows += change_rows(
        f"(b) {INSERT_BYTES} bytes inserted mid-file",
        big.insert,
        None if rsync is None else rsync.insert,
        None if theirs is None else theirs.insert,
        note,
        GOAL_INSERT_BYTES,
        GOAL_INSERT_S,
    )
    rows += change_rows(
        "(c) file renamed",
        big.rename,
        None if rsync is None else rsync.rename,
        None if theirs is None else theirs.rename,
        note,
        GOAL_RENAME_BYTES,
        None,
    )
    return rows


def latency_rows(latencies: list[float], references: References) -> list[Row]:
    p50, p95 = percentile(latencies, 50), percentile(latencies, 95)
    syncthing = references.syncthing_runs
    rsync_note = "rsync n/a (runs on demand)"
    p50_parts: list[Part] = []
    p95_parts: list[Part] = []
    if syncthing is not None:
        theirs = syncthing.latency_seconds
        watcher = (
            f"{len(theirs)} writes, watcher at its default {syncthing.watcher_delay_s} s delay"
        )
        their_p50, their_p95 = percentile(theirs, 50), percentile(theirs, 95)
        p50_parts.append(("Syncthing", their_p50, f"{their_p50:.3f} ({watcher})"))
        p95_parts.append(("Syncthing", their_p95, f"{their_p95:.3f}"))
    reference, ratios = cells(p50, p50_parts, references.note)
    return [
        Row(
            f"(d) small write -> B identical, p50 of {len(latencies)} (s)",
            f"{p50:.3f}",
            f"{rsync_note}; {reference}" if reference else rsync_note,
            ratios,
            f"<= {GOAL_LATENCY_P50_S:g} s",
            p50 <= GOAL_LATENCY_P50_S,
        ),
        Row(
            f"(d) small write -> B identical, p95 of {len(latencies)} (s)",
            f"{p95:.3f}",
            *cells(p95, p95_parts, ""),
            "",
            None,
        ),
    ]


def small_files_rows(small: SmallFilesRun, references: References) -> list[Row]:
    rsync = None if references.rsync_runs is None else references.rsync_runs.small_files
    syncthing = references.syncthing_runs
    theirs = None if syncthing is None else syncthing.small_files
    seconds: list[Part] = []
    received: list[Part] = []
    indexing: list[Part] = []
    if rsync is not None:
        seconds.append(("rsync", rsync.seconds, f"{rsync.seconds:.2f}"))
        received.append(("rsync", rsync.bytes_received, size_text(rsync.bytes_received)))
    if theirs is not None:
        seconds.append(("Syncthing", theirs.seconds, f"{theirs.seconds:.2f}"))
        received.append(("Syncthing", theirs.bytes_received, size_text(theirs.bytes_received)))
        text = f"{theirs.share_seconds:.2f} (A's scan)"
        indexing.append(("Syncthing", theirs.share_seconds, text))
    label = f"{small.files:,} files of 1-64 KiB, {small.bytes / MB:.0f} MB"
    return [
        Row(
            f"(e) initial sync of {label} to a joining B (s)",
            f"{small.seconds:.2f}",
            *cells(small.seconds, seconds, references.note),
            f"<= {GOAL_SMALL_FILES_S:g} s",
            small.seconds <= GOAL_SMALL_FILES_S,
        ),
        Row(
            "(e) bytes received by B",
            size_text(small.bytes_received),
            *cells(small.bytes_received, received, references.note),
            "",
            None,
        ),
        Row(
            "(e) A indexing the new folder (s)",
            f"{small.share_seconds:.2f}",
            *cells(small.share_seconds, indexing, ""),
            "",
            None,
        ),
    ]


def context_rows(references: References) -> list[Row]:
    syncthing = references.syncthing_runs
    if syncthing is None:
        rows = [Row("context: Syncthing", "", str(references.syncthing), "", "", None)]
    else:
        text = (
            f"{syncthing.version}, two instances on loopback, default folder settings "
            f"(watcher on, {syncthing.watcher_delay_s} s delay); (a)-(c) a rescan is requested "
            "through REST right after the change, so its watcher delay is left out there; "
            "bytes: B's inBytesTotal from A (TLS connection)"
        )
        rows = [Row("context: Syncthing", "", text, "", "", None)]
    if isinstance(references.rsync, str):
        rows.append(Row("context: rsync", "", references.rsync, "", "", None))
    return rows


def build_rows(
    size: int,
    big: BigFileRuns,
    latencies: list[float],
    small: SmallFilesRun,
    references: References,
) -> list[Row]:
    return [
        *big_file_rows(size, big, references),
        *latency_rows(latencies, references),
        *small_files_rows(small, references),
        *context_rows(references),
    ]


def print_table(rows: list[Row], caption: str, title: str) -> None:
    table = Table(title=title, caption=caption)
    for column in ("measure", "p2pfs", "reference (same run)", "ratio", "goal", "met"):
        table.add_column(column)
    for row in rows:
        met = {True: "yes", False: "NO", None: "n/a" if row.goal else ""}[row.met]
        table.add_row(row.measure, row.p2pfs, row.reference, row.ratio, row.goal, met)
    Console(width=None if sys.stdout.isatty() else 200).print(table)


# -- entry ---------------------------------------------------------------------------------


def run_benchmark(
    work: Path, size: int, files: int, namespaces: Namespaces | None, syncthing: bool
) -> tuple[list[Row], dict[str, Any]]:
    pair = Pair(work, namespaces)
    try:
        pair.a.start()
        pair.b.start()
        big = big_file_runs(pair, work, size)
        latencies = latency_runs(pair, work, LATENCY_ROUNDS)
        small = small_files_run(pair, work, files)
    finally:
        for daemon in (pair.b, pair.a):
            daemon.stop()
    for name in ("a", "b", "staging", "a-small", "b-small"):
        shutil.rmtree(work / name, ignore_errors=True)
    references = References(
        rsync_reference(work, size, files), syncthing_reference(work, size, files, syncthing)
    )
    figures: dict[str, Any] = {
        "size_bytes": size,
        "initial_seconds": big.initial_seconds,
        "overwrite": asdict(big.overwrite),
        "insert": asdict(big.insert),
        "rename": asdict(big.rename),
        "latency_seconds": latencies,
        "latency_p50": percentile(latencies, 50),
        "latency_p95": percentile(latencies, 95),
        "latency_mean": statistics.fmean(latencies),
        "small_files": asdict(small),
        "rsync": asdict(rsync) if (rsync := references.rsync_runs) else references.rsync,
        "syncthing": asdict(runs) if (runs := references.syncthing_runs) else references.syncthing,
        "network": "netns veth" if namespaces is not None else "loopback",
    }
    return build_rows(size, big, latencies, small, references), figures


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks sync", description=__doc__)
    parser.add_argument("--size-mib", type=int, default=256, help="the synced big file (256)")
    parser.add_argument("--files", type=int, default=10_000, help="small files (10,000)")
    parser.add_argument(
        "--netns",
        action="store_true",
        help="run the daemons in two network namespaces joined by a veth pair (root only)",
    )
    parser.add_argument(
        "--no-syncthing",
        action="store_true",
        help="skip the Syncthing reference (two instances, about a minute more)",
    )
    parser.add_argument("--workdir", help="scratch directory (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    if args.netns and (os.geteuid() != 0 or shutil.which("ip") is None):
        print("--netns needs root and the ip command (iproute2)", file=sys.stderr)
        return 2
    scratch = Path(tempfile.mkdtemp(prefix="p2pfs-bench-sync-", dir=args.workdir))
    load_before = load_average()
    try:
        with contextlib.ExitStack() as stack:
            namespaces = stack.enter_context(Namespaces()) if args.netns else None
            size, syncthing = args.size_mib * MiB, not args.no_syncthing
            rows, figures = run_benchmark(scratch, size, args.files, namespaces, syncthing)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    load_after = load_average()
    figures.update(load_before=load_before, load_after=load_after, cpus=os.cpu_count())
    if args.json:
        print(json.dumps({"rows": [asdict(row) for row in rows], "figures": figures}))
    else:
        network = "two network namespaces (veth)" if args.netns else "loopback"
        print_table(
            rows,
            f"{network}; rsync: daemon on loopback, client-reported bytes received; "
            "Syncthing: two instances on loopback, B's inBytesTotal, (a)-(c) rescan requested, "
            "(d) through its watcher; "
            f"load average (1/5/15 min) {load_before} before, {load_after} after, "
            f"{os.cpu_count()} CPUs",
            "p2pfs folder sync benchmark",
        )
    return 0 if all(row.met is not False for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
