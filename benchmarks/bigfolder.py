"""Big folders (issue 16): ``python -m benchmarks bigfolder``.

For each N (10k, 20k, 50k; 200k with ``--big``) a tree of N small files (100 B-2 KiB, fixed
seed) over ~500 directories (25 top directories of 20 each) is written, two real daemons
start on loopback, A makes it a sync folder and B joins. Measured:

- A's first scan: from ``sync DIR`` until A lists N files;
- initial sync: from B's join until B's index root equals A's;
- one edit: A overwrites one file (a new random size and content); seconds until B's copy
  is byte-identical (polled every 2 ms). Edits are 1 s apart after both roots agree, so
  each measures one change on a settled pair; p50 and max over ``--edits`` edits;
- peak RSS of each daemon (``VmHWM``), and memory per file beyond a fixed base: the peak of
  a daemon pair syncing a 100-file folder, measured first in the same run; beside it each
  daemon's resident set sampled every 0.1 s, its highest per phase (A's first scan, the
  join, the edits), so a peak is tied to what the daemon was doing;
- after the daemons stop, an unchanged-folder rescan (the blocking part of a daemon's full
  rescan: ``steps.scan_folder`` on A's own index) beside a bare ``os.scandir`` + ``stat``
  walk of the same tree, both best of 3 with a warm cache.

``--rescan-only`` skips the daemons: each tree is written, scanned once into a fresh index
(2 s after the last write, so no file is racily clean), then only the unchanged rescan and
the bare walk are timed (best of 3), with ``--profile DIR`` profiling one more rescan into
``rescan-N.prof``.

``--rescan-interval S`` gives A a full rescan every S seconds, fixed (by default a daemon
rescans at least 60 s apart, further while the watcher works and a rescan is slow: at most 1%
of the time): with more ``--edits``, edits meet A's full rescans in every run, not by chance.

``--profile DIR`` runs the daemons under cProfile (``--profile-to``) and leaves the profiles
there: ``a-N.prof`` and ``b-N.prof``, with the daemons' logs (``a-N.log``, ``b-N.log``: each
reconcile's phases); ``--logs DIR`` keeps only the logs, the daemons unprofiled.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.fetch import process_tree_cpu
from benchmarks.filesystem import describe
from benchmarks.index import Row
from benchmarks.machinecpu import MachineShare, MachineTicks
from benchmarks.scratchfs import FRESH_FS_BYTES, ScratchFsError, fresh_ext4
from benchmarks.sync import print_table
from benchmarks.sync_common import load_average
from p2pfs.store.index import IndexStore
from tests.support.daemons import DaemonProcess

KiB = 1 << 10
MiB = 1 << 20
SEED = 16
TOP_DIRS = 25
SUB_DIRS = 20
"""25 x 20 = 500 directories (plus the 25 above them)."""
MIN_SIZE, MAX_SIZE = 100, 2 * KiB
POLL_S = 0.002
TIMEOUT_S = 1800.0
BASE_FILES = 100
EDIT_PAUSE_S = 1.0
SAMPLE_S = 0.1

GOAL_EDIT_50K = 0.2
GOAL_EDIT_200K = 0.3
GOAL_RSS_200K = 150 * MiB
GOAL_PER_FILE = 0.5 * KiB
GOAL_INITIAL_50K = 20.0
GOAL_RESCAN_RATIO = 0.5


def directory_of(number: int) -> str:
    return f"t{number % TOP_DIRS:02d}/s{(number // TOP_DIRS) % SUB_DIRS:02d}"


def make_tree(top: Path, files: int, seed: int = SEED) -> list[str]:
    """Write ``files`` files of MIN_SIZE..MAX_SIZE pseudo-random bytes; returns their paths.

    One ``randbytes`` per file and plain ``os.open``/``os.write``: 50k files in a few seconds.
    """
    rng = random.Random(seed)
    paths = []
    made: set[str] = set()
    for number in range(files):
        directory = directory_of(number)
        if directory not in made:
            (top / directory).mkdir(parents=True, exist_ok=True)
            made.add(directory)
        rel = f"{directory}/f{number:06d}.txt"
        write_file(top / rel, rng.randbytes(rng.randint(MIN_SIZE, MAX_SIZE)))
        paths.append(rel)
    os.sync()  # written back before anything is timed (see benchmarks.fetch.make_small_tree)
    return paths


def write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def bare_walk(top: str) -> int:
    """What any scanner must do at least: list every directory and stat every entry."""
    count = 0
    stack = [top]
    while stack:
        with os.scandir(stack.pop()) as listing:
            for entry in listing:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                else:
                    entry.stat(follow_symlinks=False)
                    count += 1
    return count


def best_of(runs: int, action: Any) -> float:
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - started)
    return best


def peak_rss(pid: int) -> int:
    """Bytes: the process's high-water resident set (VmHWM)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * KiB
    raise RuntimeError(f"no VmHWM for pid {pid}")


def resident(pid: int) -> int:
    """Bytes: the process's resident set now (VmRSS); 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * KiB
    except OSError:
        pass
    return 0


class RssSampler:
    """Each daemon's resident set every SAMPLE_S in a thread: the highest per phase (the
    harness names the phase as it goes), and when A's highest was seen."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.phase = "start"
        self.peaks: dict[str, dict[str, int]] = {side: {} for side in pids}
        self.a_peak_at = (0, "", 0.0)
        self._started = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            phase = self.phase
            for side, pid in self.pids.items():
                rss = resident(pid)
                peaks = self.peaks[side]
                peaks[phase] = max(peaks.get(phase, 0), rss)
                if side == "a" and rss > self.a_peak_at[0]:
                    self.a_peak_at = (rss, phase, time.perf_counter() - self._started)

    def shown(self, side: str) -> str:
        return " / ".join(f"{phase} {mib(rss)}" for phase, rss in self.peaks[side].items())


def folder_of(daemon: DaemonProcess, path: Path) -> dict[str, Any]:
    for folder in daemon.call("sync_list")["folders"]:
        if os.path.realpath(folder["path"]) == os.path.realpath(path):
            found: dict[str, Any] = folder
            return found
    raise RuntimeError(f"{path} is not a sync folder of {daemon.home}")


def wait_until(what: str, check: Any, pause: float = 0.05) -> float:
    started = time.perf_counter()
    while not check():
        if time.perf_counter() - started > TIMEOUT_S:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(pause)  # a harness waiting on two processes
    return time.perf_counter() - started


@dataclass(frozen=True, slots=True)
class SizeRun:
    files: int
    write_seconds: float
    first_scan_seconds: float
    initial_sync_seconds: float
    edits: list[float]
    rss_a: int
    rss_b: int
    sampled_a: str
    sampled_b: str
    a_peak_phase: str
    rescan_seconds: float
    walk_seconds: float
    join_cpu_a: float
    """CPU seconds each daemon spent while B joined (the initial sync)."""
    join_cpu_b: float
    join_machine: str
    """The machine's idle and stolen shares over the join (steal: time the hypervisor took,
    where it reports it; this VM's busy minutes showed none, only slower work)."""

    @property
    def edit_p50(self) -> float:
        return statistics.median(self.edits)


class Pair:
    def __init__(
        self,
        work: Path,
        profile: Path | None,
        label: str,
        rescan_interval: float | None = None,
        logs: Path | None = None,
    ) -> None:
        def extra(side: str) -> tuple[str, ...]:
            found: tuple[str, ...] = ("--no-lan",)
            if side == "a" and rescan_interval is not None:
                found += ("--rescan-interval", str(rescan_interval))
            if profile is None:
                return found
            return (*found, "--profile-to", str(profile / f"{side}-{label}.prof"))

        self.label = label
        self.logs = profile if logs is None else logs
        self.a = DaemonProcess(work / "home-a", extra_args=extra("a"))
        self.b = DaemonProcess(work / "home-b", extra_args=extra("b"))
        self.join_cpu = (0.0, 0.0)
        self.join_machine = MachineShare(0.0, 0.0)

    def __enter__(self) -> Pair:
        self.a.start()
        self.b.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        for daemon in (self.b, self.a):
            daemon.stop()
        if self.logs is not None:  # the logs hold each reconcile's phases
            for side, daemon in (("a", self.a), ("b", self.b)):
                shutil.copy(daemon.log_path, self.logs / f"{side}-{self.label}.log")

    def same_root(self, a_dir: Path, b_dir: Path) -> bool:
        return bool(folder_of(self.a, a_dir)["root"] == folder_of(self.b, b_dir)["root"])

    def share_and_join(
        self, a_dir: Path, b_dir: Path, files: int, sampler: RssSampler
    ) -> tuple[float, float]:
        started = time.perf_counter()
        sampler.phase = "scan"
        rw = self.a.call("sync", {"path": str(a_dir)})["rw"]
        wait_until("A's first scan", lambda: folder_of(self.a, a_dir)["files"] >= files)
        first_scan = time.perf_counter() - started
        started = time.perf_counter()
        sampler.phase = "join"
        cpu_before = process_tree_cpu(self.a.pid), process_tree_cpu(self.b.pid)
        machine_before = MachineTicks.now()
        self.b.call("sync", {"path": str(b_dir), "ticket": rw})
        wait_until(
            "B's initial sync",
            lambda: folder_of(self.b, b_dir)["files"] >= files and self.same_root(a_dir, b_dir),
        )
        joined = time.perf_counter() - started
        self.join_machine = MachineShare.between(machine_before, MachineTicks.now())
        self.join_cpu = (
            process_tree_cpu(self.a.pid) - cpu_before[0],
            process_tree_cpu(self.b.pid) - cpu_before[1],
        )
        return first_scan, joined


def one_edit(a_file: Path, b_file: Path, data: bytes) -> float:
    started = time.perf_counter()
    write_file(a_file, data)
    while True:
        try:
            if b_file.read_bytes() == data:
                return time.perf_counter() - started
        except FileNotFoundError:
            pass
        if time.perf_counter() - started > TIMEOUT_S:
            raise RuntimeError(f"{b_file} did not reach the edited content")
        time.sleep(POLL_S)


def run_size(
    work: Path,
    files: int,
    edits: int,
    profile: Path | None,
    rescan_interval: float | None = None,
    logs: Path | None = None,
) -> SizeRun:
    a_dir, b_dir = work / "a", work / "b"
    a_dir.mkdir(parents=True)
    started = time.perf_counter()
    paths = make_tree(a_dir, files)
    write_seconds = time.perf_counter() - started
    rng = random.Random(SEED + files)
    latencies = []
    with (
        Pair(work, profile, str(files), rescan_interval, logs) as pair,
        RssSampler({"a": pair.a.pid, "b": pair.b.pid}) as sampler,
    ):
        first_scan, initial = pair.share_and_join(a_dir, b_dir, files, sampler)
        sampler.phase = "edits"
        for _ in range(edits):
            time.sleep(EDIT_PAUSE_S)
            rel = rng.choice(paths)
            data = rng.randbytes(rng.randint(MIN_SIZE, MAX_SIZE))
            clock = time.strftime("%H:%M:%S")
            latencies.append(one_edit(a_dir / rel, b_dir / rel, data))
            # Beside the daemons' logs (--logs): which side an edit waited on.
            print(f"edit of {rel} at {clock}: {latencies[-1]:.3f} s", file=sys.stderr)
            wait_until("A and B to agree", lambda: pair.same_root(a_dir, b_dir), pause=0.02)
        rss_a, rss_b = peak_rss(pair.a.pid), peak_rss(pair.b.pid)
    rescan, walk = time_rescan(work / "home-a", a_dir)
    rss, phase, seconds = sampler.a_peak_at
    return SizeRun(
        files,
        write_seconds,
        first_scan,
        initial,
        latencies,
        rss_a,
        rss_b,
        sampler.shown("a"),
        sampler.shown("b"),
        f"{mib(rss)} in {phase}, {seconds:.1f} s in",
        rescan,
        walk,
        *pair.join_cpu,
        str(pair.join_machine),
    )


def time_rescan(home: Path, folder: Path) -> tuple[float, float]:
    """An unchanged-folder full rescan as a daemon runs it, and a bare walk (best of 3)."""
    # Imported here: the daemon's own step, run against the index A left behind.
    from p2pfs.daemon.folders.steps import scan_folder  # noqa: PLC0415
    from p2pfs.sync.ignore import IgnoreRules  # noqa: PLC0415

    with IndexStore(home / "index.sqlite3") as index:
        rescan = best_of(3, lambda: scan_folder(index, str(folder), IgnoreRules(), _told))
    walk = best_of(3, lambda: bare_walk(str(folder)))
    return rescan, walk


def _told(_files: object) -> None:
    """What a scan tells per directory goes, in a daemon, to the comparison with its
    records (timed apart); the rescan figure is the scan's own cost."""


def rescan_only(work: Path, files: int, profile: Path | None) -> tuple[float, float]:
    """The unchanged-rescan figures alone: tree written, indexed once, then timed."""
    from p2pfs.daemon.folders.steps import scan_folder  # noqa: PLC0415
    from p2pfs.sync.ignore import IgnoreRules  # noqa: PLC0415

    folder = work / "a"
    folder.mkdir(parents=True)
    make_tree(folder, files)
    # The first scan must start 2 s after the last write (scanner.RACY_WINDOW_NS), else
    # the rescan reads the youngest files again.
    time.sleep(2.1)  # waiting out the scanner's racy window
    (work / "home-a").mkdir()
    with IndexStore(work / "home-a" / "index.sqlite3") as index:
        scan_folder(index, str(folder), IgnoreRules(), _told)
        if profile is not None:
            import cProfile  # noqa: PLC0415

            cProfile.runctx(
                "scan_folder(index, str(folder), IgnoreRules(), _told)",
                globals(),
                {
                    "scan_folder": scan_folder,
                    "index": index,
                    "folder": folder,
                    "IgnoreRules": IgnoreRules,
                    "_told": _told,
                },
                str(profile / f"rescan-{files}.prof"),
            )
    return time_rescan(work / "home-a", folder)


def base_rss(work: Path) -> int:
    """The peak RSS of a daemon syncing a tiny folder: the fixed cost per-file memory is
    measured beyond (the larger of A and B)."""
    run = run_size(work, BASE_FILES, 1, None)
    return max(run.rss_a, run.rss_b)


def mib(value: int) -> str:
    return f"{value / MiB:.0f} MiB"


def rows_for(runs: list[SizeRun], base: int) -> list[Row]:
    rows: list[Row] = []
    for run in runs:
        n = f"{run.files // 1000}k"
        goal_edit = {50_000: GOAL_EDIT_50K, 200_000: GOAL_EDIT_200K}.get(run.files)
        rows.append(
            Row(
                f"one edit reaches B, p50 (max), {n}",
                f"{run.edit_p50:.3f} s ({max(run.edits):.3f} s)",
                "",
                "",
                f"<= {goal_edit} s" if goal_edit else "",
                run.edit_p50 <= goal_edit if goal_edit else None,
            )
        )
        goal_initial = run.files == 50_000
        rows.append(
            Row(
                f"initial sync, {n} (A's first scan)",
                f"{run.initial_sync_seconds:.1f} s ({run.first_scan_seconds:.1f} s)",
                "",
                "",
                f"<= {GOAL_INITIAL_50K:.0f} s" if goal_initial else "",
                run.initial_sync_seconds <= GOAL_INITIAL_50K if goal_initial else None,
            )
        )
        rows.append(
            Row(
                f"initial sync CPU A / B, {n}",
                f"{run.join_cpu_a:.1f} s / {run.join_cpu_b:.1f} s; "
                f"B {run.join_cpu_b / run.files * 1e3:.2f} ms a file",
                run.join_machine,
                "",
                "",
                None,
            )
        )
        peak = max(run.rss_a, run.rss_b)
        per_file = (peak - base) / run.files
        big = run.files == 200_000
        rows.append(
            Row(
                f"peak RSS A / B, {n}; per file beyond {mib(base)}",
                f"{mib(run.rss_a)} / {mib(run.rss_b)}; {per_file / KiB:.2f} KiB",
                "",
                "",
                "<= 150 MiB; <= 0.5 KiB" if big else "<= 0.5 KiB",
                (peak <= GOAL_RSS_200K if big else True) and per_file <= GOAL_PER_FILE,
            )
        )
        for side, sampled in (("A", run.sampled_a), ("B", run.sampled_b)):
            rows.append(Row(f"{side} sampled per phase, {n}", sampled, "", "", "", None))
        rows.append(Row(f"A's sampled peak, {n}", run.a_peak_phase, "", "", "", None))
        ratio = run.walk_seconds / run.rescan_seconds
        rows.append(
            Row(
                f"unchanged rescan, {n}",
                f"{run.rescan_seconds:.2f} s",
                f"scandir+stat {run.walk_seconds:.2f} s",
                f"{ratio:.2f}x",
                ">= 0.5x" if big else "",
                ratio >= GOAL_RESCAN_RATIO if big else None,
            )
        )
    return rows


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks bigfolder")
    parser.add_argument(
        "--sizes",
        default="10000,20000,50000",
        help="comma-separated file counts (default 10000,20000,50000)",
    )
    parser.add_argument("--big", action="store_true", help="add 200,000 files (slow)")
    parser.add_argument("--edits", type=int, default=9, help="edits per size (default 9)")
    parser.add_argument("--profile", type=Path, help="run the daemons under cProfile into DIR")
    parser.add_argument("--logs", type=Path, help="keep the daemons' logs in DIR")
    parser.add_argument(
        "--rescan-interval",
        type=float,
        metavar="S",
        help="A's full rescans every S seconds, fixed (default: the daemon's own interval)",
    )
    parser.add_argument(
        "--rescan-only",
        action="store_true",
        help="no daemons: time only the unchanged rescan beside the bare walk",
    )
    parser.add_argument("--workdir", help="where the trees are written (default: $TMPDIR)")
    parser.add_argument(
        "--fresh-fs",
        action="store_true",
        help="each size on a new ext4 (no journal) loop-mounted under the scratch directory, "
        "so earlier runs' removals do not slow its creates (root; benchmarks/scratchfs.py)",
    )
    parser.add_argument("--json", action="store_true", help="figures as one JSON line")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    try:
        return run(args)
    except ScratchFsError as exc:
        print(f"--fresh-fs: {exc}", file=sys.stderr)
        return 2


def size_place(args: argparse.Namespace, scratch: Path) -> contextlib.AbstractContextManager[Path]:
    """Where one size's trees go: a fresh file system of its own with ``--fresh-fs`` (the
    sizes before it removed theirs at the end: on the same file system its creates would
    pay for them), else the scratch directory."""
    if args.fresh_fs:
        return fresh_ext4(FRESH_FS_BYTES, scratch)
    return contextlib.nullcontext(scratch)


def run(args: argparse.Namespace) -> int:
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.big:
        sizes.append(200_000)
    for kept in (args.profile, args.logs):
        if kept is not None:
            kept.mkdir(parents=True, exist_ok=True)
    load_before = load_average()
    runs: list[SizeRun] = []
    scratch = Path(tempfile.mkdtemp(prefix="p2pfs-bench-bigfolder-", dir=args.workdir))
    file_system = describe(scratch)
    if args.rescan_only:
        return rescan_only_main(args, sizes, scratch)
    try:
        base = base_rss(scratch / "base")
        for files in sizes:
            with size_place(args, scratch) as place:
                work = place / str(files)
                work.mkdir()
                if args.fresh_fs:
                    file_system = f"a fresh {describe(work)} per size"
                try:
                    runs.append(
                        run_size(
                            work, files, args.edits, args.profile, args.rescan_interval, args.logs
                        )
                    )
                finally:
                    shutil.rmtree(work, ignore_errors=True)
            print(json.dumps(asdict(runs[-1])), file=sys.stderr)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rows = rows_for(runs, base)
    load_after = load_average()
    if args.json:
        figures = {"base_rss": base, "runs": [asdict(run) for run in runs]}
        print(json.dumps({"rows": [asdict(row) for row in rows], "figures": figures}))
    else:
        print_table(
            rows,
            f"loopback; files {MIN_SIZE} B-{MAX_SIZE // KiB} KiB over "
            f"{TOP_DIRS * SUB_DIRS} directories, seed {SEED}; {args.edits} edits per size, "
            f"{EDIT_PAUSE_S:.0f} s apart; A's full rescans "
            + (
                f"every {args.rescan_interval:g} s"
                if args.rescan_interval
                else "at least 60 s apart and at most 1% of the time"
            )
            + f"; trees on {file_system}; "
            f"load average {load_before} before, "
            f"{load_after} after, {os.cpu_count()} CPUs",
            "p2pfs big-folder benchmark",
        )
    return 0 if all(row.met is not False for row in rows) else 1


def rescan_only_main(args: argparse.Namespace, sizes: list[int], scratch: Path) -> int:
    rows: list[Row] = []
    load_before = load_average()
    try:
        for files in sizes:
            work = scratch / str(files)
            try:
                rescan, walk = rescan_only(work, files, args.profile)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            ratio = walk / rescan
            print(json.dumps({"files": files, "rescan": rescan, "walk": walk}), file=sys.stderr)
            big = files == 200_000
            rows.append(
                Row(
                    f"unchanged rescan, {files // 1000}k",
                    f"{rescan:.3f} s",
                    f"scandir+stat {walk:.3f} s",
                    f"{ratio:.2f}x",
                    ">= 0.5x" if big else "",
                    ratio >= GOAL_RESCAN_RATIO if big else None,
                )
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print_table(
        rows,
        f"files {MIN_SIZE} B-{MAX_SIZE // KiB} KiB over {TOP_DIRS * SUB_DIRS} directories, "
        f"seed {SEED}; best of 3, warm cache; load average {load_before} before, "
        f"{load_average()} after, {os.cpu_count()} CPUs",
        "p2pfs unchanged rescan",
    )
    return 0 if all(row.met is not False for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
