"""Projects a big folder's memory and per-change cost to 1M and 10M files (issue 16).

Two kinds of input:
- measured by ``python -m benchmarks bigfolder`` (two daemons on loopback; the run named in
  README.md): each size's peak RSS of the receiving member (B) and one edit's p50;
- measured here, on the structures a folder keeps per file and the per-change steps whose
  cost depends on the folder at all:
  - the memory a folder holds per file once loaded (``RecordSet`` of signed records, the
    index tree's packed leaves; the scanned files' states are read from the scan index
    since session 21), by tracemalloc, so the steady state is known apart from the
    transient peaks;
  - the index tree's update along one changed path (``IndexTree.update``, O(height));
  - finding a partial scan's scope (the records of the changed directory, through the
    folder store's index by directory: O(paths in the directory)), at a fixed 100 files
    per directory.

Memory is projected linearly (least squares over the bench sizes: base + per-file slope),
next to the steady state measured here. The per-change cost is the bench's p50 at its
smallest size minus the two terms there (the fixed part: watcher debounce, transfer,
commit, B's apply), plus the two terms at N. Run:
``.venv/bin/python simulations/bigfolder/model.py 50000:130:0.089 200000:141:0.091``
(files:B's peak RSS MiB:edit p50 s).
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import blake3

from p2pfs.ids import ContentHash
from p2pfs.store.folders import FolderStore
from p2pfs.store.index import IndexStore
from p2pfs.sync.keys import FolderKeys
from p2pfs.sync.records import IndexLeaf, IndexTree, PackedLeaves, SignedRecord, path_key
from p2pfs.sync.recordset import RecordSet
from p2pfs.sync.versions import FileVersion, VersionVector

MiB = 1 << 20
KiB = 1 << 10
TARGETS = [10_000, 50_000, 200_000, 1_000_000, 10_000_000]
PER_DIRECTORY = 100
"""Files per directory for the scope term (the bench's 500 directories grow with N)."""


def path_of(number: int) -> str:
    directory = number // PER_DIRECTORY
    return f"t{directory % 25:02d}/s{directory // 25:05d}/f{number:07d}.txt"


def steady_parts_per_file(files: int = 20_000) -> dict[str, float]:
    """What a loaded folder keeps per file, structure by structure (bytes, tracemalloc):
    its records, index tree, and what each linked member's link keeps (the vectors it sent,
    by path)."""
    keys = FolderKeys.from_write_seed(bytes(range(32)))
    device = bytes([7]) * 32
    vector = VersionVector.empty().bump(device)
    encoded = []
    for number in range(files):
        root = ContentHash(blake3.blake3(b"%d" % number).digest())
        version = FileVersion(path_of(number), vector, False, root, 1000, False, 1 << 60, device)
        encoded.append((version.path, SignedRecord.sign(version, keys).encode()))
    parts: dict[str, float] = {}
    kept: list[object] = []

    def measure(name: str, build: Callable[[], object]) -> None:
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        kept.append(build())
        parts[name] = (tracemalloc.get_traced_memory()[0] - before) / files
        tracemalloc.stop()

    # The records go to a folder's SQLite store (not measured: it is the database); the
    # folder keeps their counts and a reader, and the index tree of their leaves, read in
    # key order and packed (its leaf nodes encoded from them when a member asks).
    scratch = tempfile.TemporaryDirectory()
    index = IndexStore(Path(scratch.name) / "index.sqlite3")
    store = FolderStore(index)
    folder = store.add_folder(
        keys.folder_id, "/folder", keys.read_key, keys.write_public, keys.write_seed, device, 0
    ).id
    for start in range(0, files, 4096):
        store.put_records(folder, [(p, blob, False) for p, blob in encoded[start : start + 4096]])
    # A load: the counts and the tree's packed leaves, read in one pass. The leaves are
    # counted under the tree (they are its level 0), the rest under the records.
    loaded = store.load_records(folder)

    def load_records() -> RecordSet:
        records = RecordSet(store.record_source(folder))
        records.counts = store.load_records(folder).counts
        return records

    measure("records (RecordSet over the folder's SQLite store: counts, a reader)", load_records)

    def load_tree() -> object:
        return IndexTree.from_packed(PackedLeaves.packed(bytearray(loaded.leaves)))

    measure("index tree (packed leaves, levels, encodings above the leaves)", load_tree)

    # The scanned files' states (337 B a file as an IndexedPaths of DiskState, session
    # 20) and the content roots a folder serves are read from the scan index (SQLite) when
    # asked, not kept.
    # A link's vectors seen are kept in a temporary table of the index connection (its
    # pages in SQLite's cache or a temporary file), not in a dict by path (~0.16 KiB a
    # record per linked member, with its own path strings).
    index.close()
    scratch.cleanup()
    return parts


def tree_update_seconds(files: int, rounds: int = 200) -> float:
    keys = [path_key(path_of(i)) for i in range(files)]
    tree = IndexTree(IndexLeaf(k, ContentHash(blake3.blake3(k).digest())) for k in keys)
    started = time.perf_counter()
    for number in range(rounds):
        key = keys[(number * 7919) % files]
        tree.update({key: ContentHash(blake3.blake3(b"%d" % number).digest())})
    return (time.perf_counter() - started) / rounds


def scope_seconds(files: int, rounds: int = 200) -> float:
    """One watcher event's scope: the records of one directory, found through the folder
    store's index by directory (``SqliteRecords.in_directories``, as the daemon reads it)."""
    with (
        tempfile.TemporaryDirectory() as scratch,
        IndexStore(Path(scratch) / "index.sqlite3") as index,
    ):
        store = FolderStore(index)
        folder = store.add_folder(bytes(32), "/folder", b"k", b"p", None, bytes(32), 0).id
        for start in range(0, files, 8192):
            # Placeholder records: a scope reads paths only, never a record's content.
            rows = [(path_of(i), b"r%d" % i, False) for i in range(start, min(start + 8192, files))]
            store.put_records(folder, rows)
        source = store.record_source(folder)
        directories = sorted(
            {path_of(i).rpartition("/")[0] for i in range(0, files, PER_DIRECTORY)}
        )
        started = time.perf_counter()
        for number in range(rounds):
            source.in_directories({directories[(number * 31) % len(directories)]}, ())
        elapsed = (time.perf_counter() - started) / rounds
        source.close()
    return elapsed


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares line y = a + b x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )
    return my - b * mx, b


def main(sizes: list[int], rss_b: list[float], edit_p50: list[float]) -> None:
    base, per_file = fit([float(n) for n in sizes], rss_b)
    parts = steady_parts_per_file()
    steady = sum(parts.values())
    print(f"peak memory: {base:.0f} MiB + {per_file * MiB / KiB:.2f} KiB per file (B, fit)")
    print("kept per file, by structure (tracemalloc):")
    for name, size in sorted(parts.items(), key=lambda item: -item[1]):
        print(f"  {size:6.0f} B  {name}")
    print(f"  {steady:6.0f} B  in all (one linked member)")
    measure_at = [10_000, 50_000, 200_000]
    tree = {n: tree_update_seconds(n) for n in measure_at}
    scope = {n: scope_seconds(n) for n in measure_at}
    # Flat by construction (one directory's paths, whatever N): its mean, not a fit of noise.
    scope_a, scope_b = sum(scope.values()) / len(scope), 0.0
    # O(height): fitted against log N (a line in N over three noisy points can go negative).
    tree_a, tree_b = fit([math.log(n) for n in measure_at], [tree[n] for n in measure_at])
    small = sizes[0]
    fixed = edit_p50[0] - (scope_a + scope_b * small) - (tree_a + tree_b * math.log(small))
    print(f"fixed per-change cost (debounce, transfer, commit, apply): {fixed * 1000:.0f} ms")
    print("files | peak RSS MiB | steady MiB | tree update ms | scope ms | one change s")
    rows = []
    for n in TARGETS:
        rss = base + per_file * n
        kept = steady * n / MiB
        t = max(tree_a + tree_b * math.log(n), 0.0)
        s = scope_a + scope_b * n
        rows.append((n, rss, kept, t, s, fixed + t + s))
        print(
            f"{n:>10,} | {rss:8.0f} | {kept:8.0f} | {t * 1000:8.3f} | {s * 1000:8.3f} | "
            f"{fixed + t + s:6.3f}"
        )
    plot(rows, sizes, rss_b, edit_p50)


def plot(
    rows: list[tuple[int, float, float, float, float, float]],
    sizes: list[int],
    rss: list[float],
    edit: list[float],
) -> None:
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print("matplotlib missing (pip install -e '.[sim]'): no plot")
        return
    files = [row[0] for row in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.loglog(files, [row[1] for row in rows], "o-", label="peak, projected (B)")
    left.loglog(files, [row[2] for row in rows], ".--", label="steady state kept (measured here)")
    left.loglog(sizes, rss, "s", label="peak, measured (bench)")
    left.axhline(150, color="red", linestyle="--", label="goal 150 MiB at 200k")
    left.set_xlabel("files in the folder")
    left.set_ylabel("MiB")
    left.legend(fontsize=8)
    right.loglog(files, [row[5] for row in rows], "o-", label="one change, projected")
    right.loglog(files, [row[4] for row in rows], ".--", label="of it: partial-scan scope")
    right.loglog(files, [row[3] for row in rows], ".:", label="of it: index-tree update")
    right.loglog(sizes, edit, "s", label="measured p50 (bench)")
    right.axhline(0.3, color="red", linestyle="--", label="goal 0.3 s")
    right.set_xlabel("files in the folder")
    right.set_ylabel("seconds")
    right.legend(fontsize=8)
    figure.suptitle("p2pfs big folders: memory and per-change cost (issue 16)")
    figure.tight_layout()
    out = Path(__file__).with_name("projection.png")
    figure.savefig(out, dpi=110)
    print(f"plot: {out}")


if __name__ == "__main__":
    # files:rss_b_mib:edit_p50_s per bench size, from the bench run in README.md.
    try:
        triples = [arg.split(":") for arg in sys.argv[1:]]
        parsed = [(int(n), float(r), float(e)) for n, r, e in triples]
    except ValueError:
        parsed = []
    if len(parsed) < 2:
        name = os.path.basename(sys.argv[0])
        print(f"usage: {name} FILES:RSS_B_MIB:EDIT_P50_S ... (two sizes or more)", file=sys.stderr)
        raise SystemExit(2)
    main([p[0] for p in parsed], [p[1] for p in parsed], [p[2] for p in parsed])
