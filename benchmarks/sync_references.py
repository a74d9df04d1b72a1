"""The folder sync benchmark's references measured in the same run (see benchmarks/sync.py):
rsync through an ``rsync --daemon`` on loopback, and two Syncthing instances."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

from benchmarks.fetch import free_tcp_port, make_small_tree, wait_for_port
from benchmarks.sync_common import (
    INSERT_BYTES,
    SYNC_TIMEOUT,
    BigFileRuns,
    SmallFilesRun,
    digest_file,
    measure_change,
    overwrite_in_place,
    pseudo_random,
    settled,
    sizes,
    spliced_digest,
    time_small_writes,
    tree_digests,
    wait_for_file,
    wait_for_tree,
    write_pseudo_random,
    write_spliced,
)

KiB = 1 << 10
MiB = 1 << 20


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
