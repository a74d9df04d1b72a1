"""Fetch benchmark (issue 3): ``python -m benchmarks fetch``.

Two real daemons in two processes on loopback, each with its own home in a temp dir: one
shares, the other fetches (one big file, then a tree of small files). Every p2pfs figure sits
beside references measured in the same run on the same bytes: the raw QUIC engine (the
transport bench's bulk stream, run as a subprocess) and python-libtorrent moving the same
content seeder -> downloader in two processes (``--lt-seed`` / ``--lt-get`` roles). Every
copy is checked byte for byte (BLAKE3 of each file) so a fast but wrong run cannot pass.

On loopback a daemon sends datagrams of up to 60,000 bytes (SPEC "Link-sized datagrams"),
and so does the raw engine's stream. The big file is also fetched by a second pair of
daemons started with ``--no-link-datagrams`` beside the raw engine with
``--base-datagrams``: 1,350-byte datagrams on both, what a node sends to any peer beyond a
router, where issue 13's goals against the raw engine are judged (0.9x its rate, at most
1.15x its CPU per GiB on each side).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import random
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import blake3
import libtorrent as lt  # type: ignore[import-not-found,unused-ignore]
from rich.console import Console
from rich.table import Table

from benchmarks import child_env
from benchmarks.filesystem import describe
from benchmarks.index import Row
from benchmarks.scratchfs import run_on_fresh_fs_if_asked
from tests.support.daemons import DaemonProcess

MiB = 1 << 20
GiB = 1 << 30
MB = 1e6
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
CHILD_TIMEOUT = 600.0
LT_PIECE_SIZE = 2 * MiB
LT_FATAL_ALERTS = (lt.file_error_alert, lt.torrent_error_alert)
# Issue figures, measured on the same kind of machine; neither program is installed here.
SYNCTHING_MB_S = 317.0
RSYNC_MB_S = 700.0
SYNCTHING_RECV_CPU_S_PER_GIB = 2.9
SYNCTHING_SMALL_S = 14.2
RSYNC_SMALL_S = 1.4
SMALL_FILES_GOAL_S = 4.0


# -- data ----------------------------------------------------------------------------------


def write_pseudo_random(path: Path, size: int, label: bytes) -> None:
    """``size`` bytes of BLAKE3 XOF output: incompressible, different per label, fast."""
    hasher = blake3.blake3(label)
    with path.open("wb") as handle:
        for position in range(0, size, 64 * MiB):
            handle.write(hasher.digest(length=min(64 * MiB, size - position), seek=position))


def make_small_tree(top: Path, files: int, directories: int, seed: int) -> int:
    """``files`` files of 1-64 KiB over ``directories`` directories; returns the total bytes."""
    rng = random.Random(seed)
    stream = blake3.blake3(b"p2pfs bench small files")
    position = 0
    for number in range(files):
        directory = top / f"d{number % directories:03d}"
        directory.mkdir(parents=True, exist_ok=True)
        size = rng.randint(1024, 64 * 1024)
        (directory / f"f{number:05d}.bin").write_bytes(stream.digest(length=size, seek=position))
        position += size
    # On disk before anything is timed: left dirty, the tree's write-back (block allocation
    # included) lands in whatever runs next, and a receiver's syncfs on the same file
    # system waits for it (0.9 s in the first step of a 10,000-file join).
    os.sync()
    return position


def file_digests(root: Path) -> dict[str, bytes]:
    """BLAKE3 of every regular file under ``root`` (or of ``root`` itself), by relative path."""
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    digests = {}
    for path in paths:
        hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
        if path.stat().st_size > MiB:
            hasher.update_mmap(str(path))
        else:
            hasher.update(path.read_bytes())
        digests[str(path.relative_to(root))] = hasher.digest()
    return digests


def verify_copy(source: Path, copy: Path, who: str) -> None:
    """Raise unless ``copy`` holds exactly the files and bytes of ``source``."""
    expected, got = file_digests(source), file_digests(copy)
    if expected != got:
        missing = len(expected.keys() - got.keys())
        differ = sum(1 for key in expected.keys() & got.keys() if expected[key] != got[key])
        raise RuntimeError(
            f"{who}: copy differs from the source ({missing} missing, {differ} differ, "
            f"{len(got.keys() - expected.keys())} extra of {len(expected)} files)"
        )


# -- CPU accounting ------------------------------------------------------------------------


def process_tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid``, its live descendants and the children it has reaped."""
    ticks = 0
    stack = [pid]
    while stack:
        current = stack.pop()
        proc = Path(f"/proc/{current}")
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            for task in (proc / "task").iterdir():
                stack += [int(child) for child in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue  # a descendant that exited meanwhile
        ticks += sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
    return ticks / CLOCK_TICKS


def reaped_children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load_average() -> str:
    return "/".join(f"{value:.2f}" for value in os.getloadavg())


# -- p2pfs ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FetchRun:
    share_seconds: float
    fetch_seconds: float
    """Wall time of ``p2pfs fetch`` as a user sees it (CLI start to exit)."""
    daemon_seconds: float
    """The fetching daemon's own measure (manifest request to last file renamed)."""
    bytes: int
    bytes_from_peer: int
    sender_cpu: float
    receiver_cpu: float
    cli_cpu: float
    load: str

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.fetch_seconds / MB


@dataclass(frozen=True, slots=True)
class BareWrites:
    """The same files written by the simplest loop there is, on the same file system: what
    the kernel and the disk cost before any fetch does anything of its own."""

    seconds: float
    """Create, write and close each file (its bytes already in memory)."""
    cpu: float
    sync_seconds: float
    """Then one syncfs: the files made durable, as a p2pfs fetch's are when it reports."""


def bare_writes_reference(source: Path, top: Path) -> BareWrites:
    """``source``'s files written into a new directory ``top`` by a bare loop."""
    files = sorted(path for path in source.rglob("*") if path.is_file())
    contents = [(path.relative_to(source), path.read_bytes()) for path in files]
    for directory in sorted({rel.parent for rel, _data in contents}):
        (top / directory).mkdir(parents=True, exist_ok=True)
    cpu = own_cpu()
    started = time.perf_counter()
    for rel, data in contents:
        fd = os.open(top / rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            if os.write(fd, data) != len(data):
                raise OSError(f"short write to {rel}")
        finally:
            os.close(fd)
    seconds = time.perf_counter() - started
    cpu = own_cpu() - cpu
    synced = time.perf_counter()
    syncfs(str(top))
    return BareWrites(seconds, cpu, time.perf_counter() - synced)


@contextmanager
def daemon_pair(
    work: Path, profile: Path | None = None, extra: tuple[str, ...] = (), tag: str = ""
) -> Iterator[tuple[DaemonProcess, DaemonProcess]]:
    """A sharing and a fetching daemon, each with its own home (``tag`` in its name), both
    started with ``extra``; both stopped on the way out. With ``profile``, each runs under
    cProfile (its main thread) into profile/SIDE.prof."""

    def options(side: str) -> tuple[str, ...]:
        if profile is None:
            return extra
        return (*extra, "--profile-to", str(profile / f"{side}{tag}.prof"))

    sharer = DaemonProcess(work / f"home-sharer{tag}", extra_args=options("sharer"))
    getter = DaemonProcess(work / f"home-getter{tag}", extra_args=options("getter"))
    try:
        sharer.start()
        getter.start()
        yield sharer, getter
    finally:
        for daemon in (getter, sharer):
            daemon.stop()


def p2pfs_fetch(sharer: DaemonProcess, getter: DaemonProcess, source: Path, dest: Path) -> FetchRun:
    started = time.perf_counter()
    ticket = sharer.cli_json("share", str(source))["ticket"]
    share_seconds = time.perf_counter() - started
    load = load_average()
    before = (process_tree_cpu(sharer.pid), process_tree_cpu(getter.pid), reaped_children_cpu())
    started = time.perf_counter()
    report = getter.cli_json("fetch", ticket, str(dest))
    fetch_seconds = time.perf_counter() - started
    after = (process_tree_cpu(sharer.pid), process_tree_cpu(getter.pid), reaped_children_cpu())
    verify_copy(source, dest, "p2pfs")
    if report["bytes_from_peer"] != report["bytes"]:
        raise RuntimeError(f"p2pfs moved {report['bytes_from_peer']} of {report['bytes']} bytes")
    return FetchRun(
        share_seconds=share_seconds,
        fetch_seconds=fetch_seconds,
        daemon_seconds=float(report["seconds"]),
        bytes=int(report["bytes"]),
        bytes_from_peer=int(report["bytes_from_peer"]),
        sender_cpu=after[0] - before[0],
        receiver_cpu=after[1] - before[1],
        cli_cpu=after[2] - before[2],
        load=load,
    )


# -- libtorrent reference ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TorrentRun:
    seconds: float
    """Downloader: add_torrent to is_seeding."""
    bytes: int
    seeder_cpu: float
    downloader_cpu: float
    load: str
    sync_seconds: float
    """After ``seconds``: a syncfs of the download's file system (libtorrent never syncs;
    a p2pfs fetch is durable when it reports done)."""

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / MB


def lt_session() -> Any:
    """libtorrent at its fastest here: high-performance-seed settings, nothing discovered,
    no limits, TCP only (its uTP moves ~9 MB/s over loopback, and it tries uTP first)."""
    settings = lt.high_performance_seed()
    settings.update(
        {
            "listen_interfaces": "127.0.0.1:0",
            "enable_dht": False,
            "enable_lsd": False,
            "enable_upnp": False,
            "enable_natpmp": False,
            "allow_multiple_connections_per_ip": True,
            "enable_outgoing_utp": False,
            "enable_incoming_utp": False,
            "upload_rate_limit": 0,
            "download_rate_limit": 0,
            "alert_mask": lt.alert_category.error
            | lt.alert_category.status
            | lt.alert_category.storage,
        }
    )
    return lt.session(settings)


def make_torrent(content: Path, torrent: Path, piece_size: int) -> None:
    """A v1 torrent of ``content`` (file or folder); its names are relative to the parent."""
    storage = lt.file_storage()
    lt.add_files(storage, str(content))
    creator = lt.create_torrent(storage, piece_size, lt.create_torrent.v1_only)
    lt.set_piece_hashes(creator, str(content.parent))
    torrent.write_bytes(lt.bencode(creator.generate()))


def lt_add(session: Any, torrent: str, save_path: str, flags: int = 0) -> Any:
    params = lt.add_torrent_params()
    params.ti = lt.torrent_info(torrent)
    params.save_path = save_path
    params.flags |= flags
    return session.add_torrent(params)


def lt_wait_seeding(session: Any, handle: Any, timeout: float) -> None:
    """Block on the session's alerts (no polling) until ``handle`` seeds."""
    deadline = time.monotonic() + timeout
    while not handle.status().is_seeding:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"libtorrent: not seeding after {timeout:.0f} s")
        session.wait_for_alert(int(left * 1000))
        fatal = [a for a in session.pop_alerts() if isinstance(a, LT_FATAL_ALERTS)]
        if fatal:
            raise RuntimeError(f"libtorrent: {fatal[0].message()}")


def emit(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def lt_seed_role(torrent: str, save_path: str) -> None:
    """Child: seed until told to stop on stdin; report CPU seconds spent while seeding."""
    session = lt_session()
    handle = lt_add(session, torrent, save_path, lt.torrent_flags.seed_mode)
    lt_wait_seeding(session, handle, CHILD_TIMEOUT)
    cpu = own_cpu()
    emit({"port": session.listen_port()})
    sys.stdin.readline()
    cpu = own_cpu() - cpu
    session.remove_torrent(handle)
    del handle, session  # the last reference: the destructor waits for an orderly shutdown
    emit({"cpu": cpu})


def lt_get_role(torrent: str, save_path: str, port: int) -> None:
    """Child: download from the seeder at ``port``; report seconds and CPU to is_seeding."""
    session = lt_session()
    cpu = own_cpu()
    started = time.perf_counter()
    handle = lt_add(session, torrent, save_path)
    handle.connect_peer(("127.0.0.1", port))
    lt_wait_seeding(session, handle, CHILD_TIMEOUT)
    seconds = time.perf_counter() - started
    cpu = own_cpu() - cpu
    synced = time.perf_counter()
    syncfs(save_path)
    sync_seconds = time.perf_counter() - synced
    size = handle.status().total_wanted
    session.remove_torrent(handle)
    del handle, session  # the last reference: the destructor waits for an orderly shutdown
    emit({"seconds": seconds, "cpu": cpu, "bytes": size, "sync_seconds": sync_seconds})


def syncfs(path: str) -> None:
    """Write back every dirty page of the file system holding ``path`` (``syncfs(2)``)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if libc.syncfs(fd) != 0:
            raise OSError(ctypes.get_errno(), "syncfs failed")
    finally:
        os.close(fd)


@contextmanager
def bench_child(*args: str, stdin: int | None = None) -> Iterator[subprocess.Popen[str]]:
    """A role of this module in a child process, killed (by its own PID) if still running."""
    child = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.fetch", *args],
        env=child_env(),
        stdin=stdin,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        yield child
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        for stream in (child.stdin, child.stdout):
            if stream is not None:
                stream.close()


def child_report(child: subprocess.Popen[str], who: str) -> dict[str, Any]:
    """The last JSON line a child printed, once it has exited successfully."""
    assert child.stdout is not None
    lines = child.stdout.read().strip().splitlines()
    if child.wait(CHILD_TIMEOUT) or not lines:
        raise RuntimeError(f"{who} failed (exit {child.returncode})")
    record: dict[str, Any] = json.loads(lines[-1])
    return record


def libtorrent_fetch(content: Path, work: Path, tag: str = "") -> TorrentRun:
    """Seeder and downloader in two processes, connected directly over loopback. With a
    ``tag`` (a round of several), the download gets a directory of its own and is kept:
    a removal just before the next round's fetch would slow its creates (ext4 without a
    journal, above)."""
    torrent = work / f"{content.name}{tag}.torrent"
    make_torrent(content, torrent, LT_PIECE_SIZE)
    download = work / f"lt-{content.name}{tag}"
    download.mkdir()
    seed_args = ("--lt-seed", str(torrent), str(content.parent))
    with bench_child(*seed_args, stdin=subprocess.PIPE) as seeder:
        assert seeder.stdout is not None and seeder.stdin is not None
        hello = seeder.stdout.readline()
        if not hello:
            raise RuntimeError(f"libtorrent seeder did not start (exit {seeder.wait()})")
        port = json.loads(hello)["port"]
        load = load_average()
        with bench_child("--lt-get", str(torrent), str(download), str(port)) as getter:
            got = child_report(getter, "libtorrent downloader")
        seeder.stdin.write("stop\n")
        seeder.stdin.flush()
        seeded = child_report(seeder, "libtorrent seeder")
    verify_copy(content, download / content.name, "libtorrent")
    if not tag:
        shutil.rmtree(download)
    return TorrentRun(
        got["seconds"], got["bytes"], seeded["cpu"], got["cpu"], load, got["sync_seconds"]
    )


# -- other references ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reference:
    mb_per_s: float | None
    note: str
    sender_cpu_s_per_gib: float | None = None
    receiver_cpu_s_per_gib: float | None = None

    def cpu(self, side: str) -> str:
        """``; raw engine <side> X.XX`` when the transport bench reported it."""
        value = getattr(self, f"{side}_cpu_s_per_gib")
        return "" if value is None else f"; raw engine {side} {value:.2f}"


def raw_engine_reference(size_mib: int, base_datagrams: bool = False) -> Reference:
    """The transport bench's bulk stream (same engine, default settings; ``base_datagrams``:
    1,350-byte datagrams), as a subprocess."""
    engine = os.environ.get("P2PFS_QUIC_ENGINE", "qh3")
    command = [sys.executable, "-m", "benchmarks", "transport", "--engine", engine]
    command += ["--size", str(size_mib), "--json"]
    command += ["--base-datagrams"] if base_datagrams else []
    try:
        completed = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT,
            check=False,
            env=child_env(),
        )
    except subprocess.TimeoutExpired:
        return Reference(None, "transport bench timed out")
    if completed.returncode != 0:
        sys.stderr.write(f"transport bench exited {completed.returncode}:\n{completed.stderr}")
        tail = (completed.stderr.strip().splitlines() or ["no output"])[-1]
        return Reference(None, f"transport bench failed ({tail[:60]})")
    try:
        parsed = json.loads(completed.stdout)
        rows = parsed["rows"] if isinstance(parsed, dict) else parsed
        row = next(row for row in rows if row.get("transport") == engine)
        return Reference(
            float(row["mb_per_s"]),
            f"raw {engine} bulk stream",
            row.get("sender_cpu_s_per_gib"),
            row.get("receiver_cpu_s_per_gib"),
        )
    except (ValueError, KeyError, TypeError, StopIteration):
        return Reference(None, "transport bench printed no figure for this engine")


def free_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(delay)  # a harness waiting for a process to come up
            delay = min(delay * 2, 0.2)


def rsync_reference(source: Path, work: Path) -> Reference:
    """rsync through an rsync daemon on loopback, when rsync happens to be installed."""
    rsync = shutil.which("rsync")
    if rsync is None:
        return Reference(None, "not installed")
    config = work / "rsyncd.conf"
    config.write_text(
        f"use chroot = no\nuid = {os.getuid()}\ngid = {os.getgid()}\n"
        f"log file = {work / 'rsyncd.log'}\n[bench]\npath = {source.parent}\nread only = yes\n"
    )
    port = free_tcp_port()
    dest = work / f"rsync-{source.name}"
    daemon_args = ["--daemon", "--no-detach", "--address=127.0.0.1", f"--port={port}"]
    daemon = subprocess.Popen([rsync, *daemon_args, "--config", str(config)])
    try:
        wait_for_port(port, 10)
        started = time.perf_counter()
        subprocess.run(
            [rsync, "-a", f"rsync://127.0.0.1:{port}/bench/{source.name}", str(dest)],
            check=True,
            timeout=CHILD_TIMEOUT,
        )
        seconds = time.perf_counter() - started
        verify_copy(source, dest, "rsync")
    except (OSError, subprocess.SubprocessError) as exc:
        return Reference(None, f"rsync failed: {exc}")
    finally:
        daemon.terminate()
        daemon.wait()
        shutil.rmtree(dest, ignore_errors=True)
    size = sum(p.stat().st_size for p in [source, *source.rglob("*")] if p.is_file())
    return Reference(size / seconds / MB, f"rsync (daemon, loopback) {seconds:.2f} s")


def syncthing_note() -> str:
    installed = shutil.which("syncthing") is not None
    return "installed but not driven by this bench" if installed else "not installed"


# -- the two scenarios ---------------------------------------------------------------------


def ratio(value: float, reference: float | None) -> str:
    return "" if not reference else f"{value / reference:.2f}x"


def base_datagram_rows(size: int, run: FetchRun, raw: Reference) -> list[Row]:
    """Issue 13's goals against the raw engine, both at 1,350-byte datagrams."""
    gib = size / GiB
    mib = size // MiB
    rows = [
        Row(
            f"fetch {mib} MiB, 1,350-byte datagrams (MB/s, CLI wall)",
            f"{run.mb_per_s:.1f}",
            raw.note if raw.mb_per_s is None else f"{raw.note}, the same: {raw.mb_per_s:.1f}",
            ratio(run.mb_per_s, raw.mb_per_s),
            ">= 0.9x raw engine",
            None if raw.mb_per_s is None else run.mb_per_s >= 0.9 * raw.mb_per_s,
        )
    ]
    for side, cpu in (
        ("sending", run.sender_cpu / gib),
        ("receiving", (run.receiver_cpu + run.cli_cpu) / gib),
    ):
        engine = raw.sender_cpu_s_per_gib if side == "sending" else raw.receiver_cpu_s_per_gib
        rows.append(
            Row(
                f"  {side} side CPU, 1,350-byte datagrams (s/GiB)",
                f"{cpu:.2f}",
                "no figure" if engine is None else f"raw engine {side[:-3]}er {engine:.2f}",
                ratio(cpu, engine),
                "<= 1.15x raw engine",
                None if engine is None else cpu <= 1.15 * engine,
            )
        )
    return rows


def big_file_rows(
    size: int, run: FetchRun, raw: Reference, torrent: TorrentRun, rsync: Reference
) -> list[Row]:
    gib = size / GiB
    mib = size // MiB
    receiver = (run.receiver_cpu + run.cli_cpu) / gib
    rsync_now = "" if rsync.mb_per_s is None else f"; rsync here {rsync.mb_per_s:.0f}"
    return [
        Row(
            f"fetch {mib} MiB single file (MB/s, CLI wall)",
            f"{run.mb_per_s:.1f}",
            raw.note if raw.mb_per_s is None else f"{raw.note}: {raw.mb_per_s:.1f}",
            ratio(run.mb_per_s, raw.mb_per_s),
            "context: both link-sized",
            None,
        ),
        Row(
            f"fetch {mib} MiB single file (MB/s, CLI wall)",
            f"{run.mb_per_s:.1f}",
            f"libtorrent 2 processes: {torrent.mb_per_s:.1f}",
            ratio(run.mb_per_s, torrent.mb_per_s),
            ">= 1.0x libtorrent",
            run.mb_per_s >= torrent.mb_per_s,
        ),
        Row(
            "receiving side CPU (s/GiB)",
            f"{receiver:.2f} (daemon {run.receiver_cpu / gib:.2f} + CLI {run.cli_cpu / gib:.2f})",
            f"libtorrent downloader {torrent.downloader_cpu / gib:.2f}{raw.cpu('receiver')}",
            ratio(receiver, SYNCTHING_RECV_CPU_S_PER_GIB),
            f"<= {SYNCTHING_RECV_CPU_S_PER_GIB} (Syncthing's)",
            receiver <= SYNCTHING_RECV_CPU_S_PER_GIB,
        ),
        Row(
            "sending side CPU (s/GiB)",
            f"{run.sender_cpu / gib:.2f}",
            f"libtorrent seeder {torrent.seeder_cpu / gib:.2f}{raw.cpu('sender')}",
            "",
            "",
            None,
        ),
        Row(
            "context: single file (MB/s)",
            f"{run.mb_per_s:.1f}",
            f"Syncthing 1.19 {SYNCTHING_MB_S:.0f}, rsync {RSYNC_MB_S:.0f} (issue figures; "
            f"syncthing {syncthing_note()}, rsync {rsync.note}{rsync_now})",
            ratio(run.mb_per_s, SYNCTHING_MB_S) + " Syncthing",
            "",
            None,
        ),
        Row(
            f"share {mib} MiB single file (s, indexing)",
            f"{run.share_seconds:.2f}",
            "",
            "",
            "",
            None,
        ),
    ]


def small_files_rows(
    files: int, size: int, run: FetchRun, torrent: TorrentRun, raw: Reference, bare: BareWrites
) -> list[Row]:
    label = f"{files:,} files of 1-64 KiB, {size / MB:.0f} MB"
    # The engine's floor for these bytes: one bulk stream of the same size, no files, no
    # lookups. A fetch cannot beat libtorrent if the engine alone does not.
    floor = None if raw.mb_per_s is None else size / MB / raw.mb_per_s
    p2pfs_cpu = run.sender_cpu + run.receiver_cpu + run.cli_cpu
    torrent_cpu = torrent.seeder_cpu + torrent.downloader_cpu
    cores = os.cpu_count() or 1
    return [
        Row(
            f"share {label} (s, indexing)",
            f"{run.share_seconds:.2f}",
            "",
            "",
            "",
            None,
        ),
        Row(
            f"fetch {label} (s, CLI wall)",
            f"{run.fetch_seconds:.2f} (daemon {run.daemon_seconds:.2f})",
            f"libtorrent one multi-file torrent: {torrent.seconds:.2f}",
            ratio(run.fetch_seconds, torrent.seconds),
            f"<= {SMALL_FILES_GOAL_S:.1f} s and faster than libtorrent",
            run.fetch_seconds <= SMALL_FILES_GOAL_S and run.fetch_seconds < torrent.seconds,
        ),
        Row(
            "context: libtorrent made durable (s)",
            f"{run.fetch_seconds:.2f}",
            f"libtorrent, then a syncfs of its files: {torrent.seconds:.2f} + "
            f"{torrent.sync_seconds:.2f}",
            ratio(run.fetch_seconds, torrent.seconds + torrent.sync_seconds),
            "",
            None,
        ),
        Row(
            # Every daemon here shares the machine's cores: a fetch cannot take less wall
            # time than all its processes' CPU spread over every core, whatever overlaps.
            "context: CPU of all processes (core-s)",
            f"{p2pfs_cpu:.2f} (sender {run.sender_cpu:.2f}, receiver {run.receiver_cpu:.2f}, "
            f"CLI {run.cli_cpu:.2f}): >= {p2pfs_cpu / cores:.2f} s on {cores} cores",
            f"libtorrent seeder {torrent.seeder_cpu:.2f} + downloader "
            f"{torrent.downloader_cpu:.2f}: >= {torrent_cpu / cores:.2f} s",
            ratio(p2pfs_cpu, torrent_cpu),
            "",
            None,
        ),
        Row(
            # The kernel's and the disk's share, no network: a durable fetch of these files
            # cannot end before they are created, written and synced.
            "context: the same files, bare writes (s)",
            f"{run.fetch_seconds:.2f}",
            f"create, write, close each: {bare.seconds:.2f} (CPU {bare.cpu:.2f}), then a "
            f"syncfs: {bare.sync_seconds:.2f}",
            ratio(run.fetch_seconds, bare.seconds + bare.sync_seconds),
            "",
            None,
        ),
        Row(
            "context: the same bytes, one stream (s)",
            "" if floor is None else f"{floor:.2f}",
            raw.note if floor is None else f"{raw.note} ({raw.mb_per_s:.1f} MB/s)",
            "" if floor is None else ratio(run.fetch_seconds, floor),
            "",
            None,
        ),
        Row(
            "context: small files (s)",
            f"{run.fetch_seconds:.2f}",
            f"Syncthing 1.19 {SYNCTHING_SMALL_S}, rsync {RSYNC_SMALL_S} (issue figures)",
            "",
            "",
            None,
        ),
    ]


T = TypeVar("T")


def _median(runs: Iterable[T], key: Callable[[T], float]) -> T:
    """The run whose ``key`` is the median (the lower middle of an even count)."""
    ordered = sorted(runs, key=key)
    return ordered[(len(ordered) - 1) // 2]


def rounds_row(small_rounds: list[tuple[FetchRun, TorrentRun, BareWrites]]) -> Row:
    """Every round's figures, in the order they ran (the rows above are the medians)."""
    p2pfs = " / ".join(f"{p.fetch_seconds:.2f}" for p, _t, _b in small_rounds)
    torrent = " / ".join(f"{t.seconds:.2f}" for _p, t, _b in small_rounds)
    bare = " / ".join(f"{b.seconds + b.sync_seconds:.2f}" for _p, _t, b in small_rounds)
    wins = sum(p.fetch_seconds < t.seconds for p, t, _b in small_rounds)
    return Row(
        f"context: {len(small_rounds)} rounds in turn (s; medians above)",
        p2pfs,
        f"libtorrent {torrent}; bare writes and syncfs {bare}",
        f"{wins}/{len(small_rounds)} faster",
        "",
        None,
    )


def figures_of(prefix: str, run: FetchRun, torrent: TorrentRun) -> dict[str, Any]:
    figures = {f"{prefix}_p2pfs_{key}": value for key, value in asdict(run).items()}
    figures.update({f"{prefix}_libtorrent_{key}": v for key, v in asdict(torrent).items()})
    figures[f"{prefix}_p2pfs_mb_per_s"] = run.mb_per_s
    figures[f"{prefix}_libtorrent_mb_per_s"] = torrent.mb_per_s
    return figures


def run_benchmark(
    work: Path,
    size: int,
    files: int,
    only: str | None = None,
    profile: Path | None = None,
    rounds: int = 1,
) -> tuple[list[Row], dict[str, Any]]:
    """Both cases, or ``only`` one ("big": the 1 GiB file and its references; "small": the
    small files beside libtorrent). ``profile``: the daemons run under cProfile into it.
    ``rounds`` > 1: the small files fetched that many times, p2pfs, libtorrent and the
    bare writes in turn each round, and each figure the median of its rounds."""
    rows: list[Row] = []
    figures: dict[str, Any] = {}
    big = work / "big.bin"
    small = work / "small"
    if only != "small":
        write_pseudo_random(big, size, b"p2pfs bench fetch big file")
        file_digests(big)  # page-cached
    if only != "big":
        small_bytes = make_small_tree(small, files, 100, seed=3)
        file_digests(small)  # a first read of the small tree too
    with daemon_pair(work, profile) as (sharer, getter):
        if only != "small":
            big_run = p2pfs_fetch(sharer, getter, big, work / "fetched-big.bin")
            (work / "fetched-big.bin").unlink()
        small_rounds: list[tuple[FetchRun, TorrentRun, BareWrites]] = []
        if only != "big" and rounds > 1:
            # In turn, so that the machine's state (this VM hands out memory pages the host
            # took back, slowly, at times: Small files in SPEC) falls on each alike.
            for number in range(rounds):
                small_rounds.append(
                    (
                        p2pfs_fetch(sharer, getter, small, work / f"fetched-small-{number}"),
                        libtorrent_fetch(small, work, f"-{number}"),
                        bare_writes_reference(small, work / f"bare-writes-{number}"),
                    )
                )
        elif only != "big":
            # Kept until the end: removing 10,000 files just before libtorrent's run made
            # its creates slow (ext4 without a journal skips inodes freed in the last 30 s,
            # scanning past each of them on every create).
            small_run = p2pfs_fetch(sharer, getter, small, work / "fetched-small")
    if only != "small":
        with daemon_pair(work, profile, ("--no-link-datagrams",), "-base") as (sharer, getter):
            base_run = p2pfs_fetch(sharer, getter, big, work / "fetched-big.bin")
            (work / "fetched-big.bin").unlink()
        base_raw = raw_engine_reference(size // MiB, base_datagrams=True)
        big_torrent = libtorrent_fetch(big, work)
        raw = raw_engine_reference(size // MiB)
        rsync = rsync_reference(big, work)
        rows += big_file_rows(size, big_run, raw, big_torrent, rsync)
        rows += base_datagram_rows(size, base_run, base_raw)
        figures.update(figures_of("big", big_run, big_torrent))
        figures.update(
            big_bytes=size,
            raw_engine_mb_per_s=raw.mb_per_s,
            raw_engine_note=raw.note,
            raw_engine_sender_cpu_s_per_gib=raw.sender_cpu_s_per_gib,
            raw_engine_receiver_cpu_s_per_gib=raw.receiver_cpu_s_per_gib,
            base_datagrams=asdict(base_run),
            base_raw_engine_mb_per_s=base_raw.mb_per_s,
            base_raw_engine_sender_cpu_s_per_gib=base_raw.sender_cpu_s_per_gib,
            base_raw_engine_receiver_cpu_s_per_gib=base_raw.receiver_cpu_s_per_gib,
            rsync_mb_per_s=rsync.mb_per_s,
            rsync_note=rsync.note,
            syncthing=syncthing_note(),
        )
    if only != "big":
        if small_rounds:
            small_run = _median([r[0] for r in small_rounds], key=lambda r: r.fetch_seconds)
            small_torrent = _median([r[1] for r in small_rounds], key=lambda t: t.seconds)
            small_bare = _median(
                [r[2] for r in small_rounds], key=lambda b: b.seconds + b.sync_seconds
            )
        else:
            small_torrent = libtorrent_fetch(small, work)
            small_bare = bare_writes_reference(small, work / "bare-writes")
        small_raw = raw_engine_reference(max(1, round(small_bytes / MiB)))
        rows += small_files_rows(
            files, small_bytes, small_run, small_torrent, small_raw, small_bare
        )
        if small_rounds:
            rows.append(rounds_row(small_rounds))
            figures["small_rounds"] = [
                {"p2pfs": asdict(p), "libtorrent": asdict(t), "bare_writes": asdict(b)}
                for p, t, b in small_rounds
            ]
        figures.update(figures_of("small", small_run, small_torrent))
        figures.update(
            small_files=files,
            small_bytes=small_bytes,
            small_raw_engine_mb_per_s=small_raw.mb_per_s,
            small_raw_engine_note=small_raw.note,
            small_bare_writes=asdict(small_bare),
        )
    return rows, figures


# -- output and entry ----------------------------------------------------------------------


def print_table(
    rows: list[Row], caption: str, title: str = "p2pfs fetch benchmark (loopback)"
) -> None:
    table = Table(title=title, caption=caption)
    for column in ("measure", "p2pfs", "reference (same run)", "ratio", "goal", "met"):
        table.add_column(column)
    for row in rows:
        met = {True: "yes", False: "NO", None: "n/a" if row.goal else ""}[row.met]
        table.add_row(row.measure, row.p2pfs, row.reference, row.ratio, row.goal, met)
    Console(width=None if sys.stdout.isatty() else 200).print(table)


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks fetch", description=__doc__)
    parser.add_argument("--size-mib", type=int, help="single file size (1024; --quick 256)")
    parser.add_argument("--files", type=int, help="small files (10,000; --quick 2,000)")
    parser.add_argument("--quick", action="store_true", help="a smoke run with smaller data")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="small files: fetch them this many times, p2pfs, libtorrent and bare writes in "
        "turn, and print the medians and every round (default 1)",
    )
    parser.add_argument("--workdir", help="scratch directory (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--only", choices=("big", "small"), help="run one case (with its references) only"
    )
    parser.add_argument(
        "--profile", type=Path, help="run both daemons under cProfile into DIR/SIDE.prof"
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the scratch directory (daemons' logs) and say where",
    )
    parser.add_argument(
        "--fresh-fs",
        action="store_true",
        help="run on a new ext4 (no journal) loop-mounted under --workdir for this run: "
        "small files written where earlier runs removed theirs took up to 1.5x longer here "
        "(SPEC, session 30) (root; benchmarks/scratchfs.py)",
    )
    parser.add_argument("--lt-seed", nargs=2, metavar=("TORRENT", "SAVE"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--lt-get", nargs=3, metavar=("TORRENT", "SAVE", "PORT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.size_mib is None:
        args.size_mib = 256 if args.quick else 1024
    if args.files is None:
        args.files = 2_000 if args.quick else 10_000
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    if args.lt_seed:
        lt_seed_role(*args.lt_seed)
        return 0
    if args.lt_get:
        lt_get_role(args.lt_get[0], args.lt_get[1], int(args.lt_get[2]))
        return 0
    return run_on_fresh_fs_if_asked(args, run)


def run(args: argparse.Namespace) -> int:
    scratch = Path(tempfile.mkdtemp(prefix="p2pfs-bench-fetch-", dir=args.workdir))
    file_system = describe(scratch)
    load_before = load_average()
    try:
        if args.profile is not None:
            args.profile = args.profile.resolve()
            args.profile.mkdir(parents=True, exist_ok=True)
        rows, figures = run_benchmark(
            scratch, args.size_mib * MiB, args.files, args.only, args.profile, args.rounds
        )
    finally:
        if args.keep:
            print(f"scratch kept: {scratch}", file=sys.stderr)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    load_after = load_average()
    figures.update(
        load_before=load_before, load_after=load_after, cpus=os.cpu_count(), file_system=file_system
    )
    if args.json:
        print(json.dumps({"rows": [asdict(row) for row in rows], "figures": figures}))
    else:
        print_table(
            rows,
            f"files on {file_system}; "
            f"load average (1/5/15 min) {load_before} before, {load_after} after, "
            f"{os.cpu_count()} CPUs; loads per measurement in --json",
        )
    return 0 if all(row.met is not False for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
