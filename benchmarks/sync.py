"""Folder sync benchmark (issue 6): ``python -m benchmarks sync``.

Two real daemons in two processes, each with its own home in a temp dir, on loopback (or,
with ``--netns`` as root, in two network namespaces joined by a veth pair). A synced file of
``--size-mib`` random bytes is changed on A: (a) 1 MiB overwritten in the middle, (b) 100
bytes inserted in the middle, (c) renamed. For each, the bytes B received (its daemon's
``bytes_received`` counter: every QUIC stream payload, sync included) and the time until
B's copy is byte-identical (B's file polled every 5 ms; BLAKE3 checked). Then (d) the
latency of small writes (A writes a new small file, B's copy polled every 5 ms) and (e) the
initial sync of ``--files`` files of 1-64 KiB to B joining a new folder. The initial sync
of the big file stands beside ``p2pfs fetch`` of a file of the same size (other bytes)
between the same daemons in the same run (issue 13's goal: at most 1.2x). ``--profile DIR``
runs both daemons under cProfile and keeps their logs (per-phase timings) there.

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
import shutil
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks.filesystem import describe
from benchmarks.index import Row
from benchmarks.scratchfs import run_on_fresh_fs_if_asked
from benchmarks.sync_common import (
    GOAL_INITIAL_VS_FETCH,
    GOAL_INSERT_BYTES,
    GOAL_INSERT_S,
    GOAL_LATENCY_P50_S,
    GOAL_OVERWRITE_BYTES,
    GOAL_OVERWRITE_S,
    GOAL_RENAME_BYTES,
    GOAL_SMALL_FILES_S,
    INSERT_BYTES,
    LATENCY_ROUNDS,
    MB,
    BigFileRuns,
    ChangeRun,
    Namespaces,
    Pair,
    SmallFilesRun,
    big_file_runs,
    fetch_run,
    latency_runs,
    load_average,
    percentile,
    small_files_run,
)
from benchmarks.sync_references import (
    RsyncRun,
    RsyncRuns,
    SyncthingRuns,
    rsync_reference,
    syncthing_reference,
)

KiB = 1 << 10
MiB = 1 << 20


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


def initial_row(size: int, big: BigFileRuns, fetch_seconds: float, references: References) -> Row:
    syncthing = references.syncthing_runs
    parts: list[Part] = [("p2pfs fetch", fetch_seconds, f"{fetch_seconds:.2f}")]
    if syncthing is not None:
        seconds = syncthing.big.initial_seconds
        text = f"{seconds:.2f} (after A's scan, {syncthing.scan_seconds:.2f})"
        parts.append(("Syncthing", seconds, text))
    return Row(
        f"initial sync of a {size // MiB} MiB file (s)",
        f"{big.initial_seconds:.2f}",
        *cells(big.initial_seconds, parts, ""),
        f"<= {GOAL_INITIAL_VS_FETCH:g}x p2pfs fetch",
        big.initial_seconds <= GOAL_INITIAL_VS_FETCH * fetch_seconds,
    )


def big_file_rows(
    size: int, big: BigFileRuns, fetch_seconds: float, references: References
) -> list[Row]:
    rsync, syncthing = references.rsync_runs, references.syncthing_runs
    theirs = None if syncthing is None else syncthing.big
    mib, note = size // MiB, references.note
    rows = [initial_row(size, big, fetch_seconds, references)]
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
    big: BigFileRuns | None,
    fetch_seconds: float,
    latencies: list[float],
    small: SmallFilesRun | None,
    references: References,
) -> list[Row]:
    rows = [] if big is None else big_file_rows(size, big, fetch_seconds, references)
    if latencies:
        rows += latency_rows(latencies, references)
    if small is not None:
        rows += small_files_rows(small, references)
    return rows + context_rows(references)


def print_table(rows: list[Row], caption: str, title: str) -> None:
    table = Table(title=title, caption=caption)
    for column in ("measure", "p2pfs", "reference (same run)", "ratio", "goal", "met"):
        table.add_column(column)
    for row in rows:
        met = {True: "yes", False: "NO", None: "n/a" if row.goal else ""}[row.met]
        table.add_row(row.measure, row.p2pfs, row.reference, row.ratio, row.goal, met)
    Console(width=None if sys.stdout.isatty() else 200).print(table)


# -- entry ---------------------------------------------------------------------------------


def sync_empty_folders(pair: Pair, work: Path) -> None:
    """The synced folders a/ and b/ without the big file (for (d) run alone)."""
    (work / "a").mkdir()
    tickets = pair.a.cli_json("sync", str(work / "a"))
    pair.b.cli_json("sync", str(work / "b"), tickets["rw"])


CASES = ("big", "latency", "small")
"""What ``--only`` picks: the big file (its initial sync beside ``p2pfs fetch``, then
(a)-(c)), the small-write latency (d), the small files' initial sync (e)."""


def run_benchmark(
    work: Path, size: int, files: int, namespaces: Namespaces | None, options: argparse.Namespace
) -> tuple[list[Row], dict[str, Any]]:
    cases = set(options.only or CASES)
    pair = Pair(work, namespaces, options.profile)
    big: BigFileRuns | None = None
    fetch_seconds = 0.0
    latencies: list[float] = []
    small: SmallFilesRun | None = None
    try:
        pair.a.start()
        pair.b.start()
        if "big" in cases:
            big = big_file_runs(pair, work, size)
            fetch_seconds = fetch_run(pair, work, size)
        if "latency" in cases:
            if big is None:  # (d) writes into the synced folder the big case makes
                sync_empty_folders(pair, work)
            latencies = latency_runs(pair, work, LATENCY_ROUNDS)
        if "small" in cases:
            small = small_files_run(pair, work, files)
    finally:
        for daemon in (pair.b, pair.a):
            daemon.stop()
        if options.logs is not None:  # the daemons' per-phase timings, without cProfile
            for side, daemon in (("a", pair.a), ("b", pair.b)):
                with contextlib.suppress(OSError):
                    shutil.copy(daemon.home / "daemon.log", options.logs / f"{side}.log")
    for name in ("a", "b", "staging", "a-small", "b-small"):
        shutil.rmtree(work / name, ignore_errors=True)
    if options.only:  # the references run every case: only beside a whole run
        rsync: RsyncRuns | str = "skipped (--only)"
        syncthing: SyncthingRuns | str = "skipped (--only)"
    else:
        rsync = "skipped (--no-rsync)" if options.no_rsync else rsync_reference(work, size, files)
        syncthing = syncthing_reference(work, size, files, not options.no_syncthing)
    references = References(rsync, syncthing)
    figures: dict[str, Any] = {"size_bytes": size, "cases": sorted(cases)}
    if big is not None:
        figures.update(
            initial_seconds=big.initial_seconds,
            fetch_seconds=fetch_seconds,
            overwrite=asdict(big.overwrite),
            insert=asdict(big.insert),
            rename=asdict(big.rename),
        )
    if latencies:
        figures.update(
            latency_seconds=latencies,
            latency_p50=percentile(latencies, 50),
            latency_p95=percentile(latencies, 95),
            latency_mean=statistics.fmean(latencies),
        )
    if small is not None:
        figures["small_files"] = asdict(small)
    figures.update(
        rsync=asdict(ran) if (ran := references.rsync_runs) else references.rsync,
        syncthing=asdict(runs) if (runs := references.syncthing_runs) else references.syncthing,
        network="netns veth" if namespaces is not None else "loopback",
    )
    return build_rows(size, big, fetch_seconds, latencies, small, references), figures


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
    parser.add_argument("--no-rsync", action="store_true", help="skip the rsync reference")
    parser.add_argument(
        "--profile",
        type=Path,
        help="run both daemons under cProfile (main thread) into DIR/a.prof and DIR/b.prof",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=CASES,
        help="run only this case (repeatable): big (initial sync, fetch, (a)-(c)), "
        "latency (d), small (e); no rsync or Syncthing reference then",
    )
    parser.add_argument(
        "--logs",
        type=Path,
        help="keep both daemons' logs (their per-phase timings) in DIR/a.log and DIR/b.log",
    )
    parser.add_argument("--workdir", help="scratch directory (default: a temp dir)")
    parser.add_argument(
        "--fresh-fs",
        action="store_true",
        help="run on a new ext4 (no journal) loop-mounted under --workdir for this run, so "
        "earlier runs' removals do not slow its creates (root; benchmarks/scratchfs.py)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    return run_on_fresh_fs_if_asked(args, run)


def run(args: argparse.Namespace) -> int:
    if args.netns and (os.geteuid() != 0 or shutil.which("ip") is None):
        print("--netns needs root and the ip command (iproute2)", file=sys.stderr)
        return 2
    if args.profile is not None:
        args.profile = args.profile.resolve()
        args.profile.mkdir(parents=True, exist_ok=True)
        args.logs = args.logs or args.profile
    if args.logs is not None:
        args.logs = args.logs.resolve()
        args.logs.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="p2pfs-bench-sync-", dir=args.workdir))
    file_system = describe(scratch)
    load_before = load_average()
    try:
        with contextlib.ExitStack() as stack:
            namespaces = stack.enter_context(Namespaces()) if args.netns else None
            size = args.size_mib * MiB
            rows, figures = run_benchmark(scratch, size, args.files, namespaces, args)
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
            f"trees on {file_system}; "
            f"load average (1/5/15 min) {load_before} before, {load_after} after, "
            f"{os.cpu_count()} CPUs",
            "p2pfs folder sync benchmark",
        )
    return 0 if all(row.met is not False for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
