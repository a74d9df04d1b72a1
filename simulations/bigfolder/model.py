"""Projects a big folder's memory and per-change cost to 1M and 10M files (issue 16).

Two kinds of input:
- measured by ``python -m benchmarks bigfolder`` (two daemons on loopback; the figures of
  the run named in README.md): peak RSS at 10k/20k/50k files, and one edit's p50;
- measured here on the sans-I/O core and the engine's in-memory steps that still walk
  every file per change: the index tree's update along one changed path
  (``IndexTree.update``), and the scope filter of a partial rescan (a predicate over every
  record path and every scanned-file path, which is O(N) in C-speed Python loops).

Memory is projected linearly (base + per-file slope from the bench). The per-change cost is
the fixed part the bench measured at 10k minus what the O(N) and O(log N) terms cost there,
plus those terms at N. Run: ``.venv/bin/python simulations/bigfolder/model.py``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import blake3

from p2pfs.ids import ContentHash
from p2pfs.sync.records import IndexLeaf, IndexTree, path_key

MiB = 1 << 20
# The sizes the bench ran at; its figures come in on the command line (see README.md).
BENCH_FILES = [10_000, 20_000, 50_000]
TARGETS = [10_000, 50_000, 200_000, 1_000_000, 10_000_000]


def tree_update_seconds(files: int, rounds: int = 200) -> float:
    keys = [path_key(f"t{i % 25:02d}/s{i % 20:02d}/f{i:07d}.txt") for i in range(files)]
    tree = IndexTree(IndexLeaf(k, ContentHash(blake3.blake3(k).digest())) for k in keys)
    started = time.perf_counter()
    for number in range(rounds):
        key = keys[(number * 7919) % files]
        tree.update({key: ContentHash(blake3.blake3(b"%d" % number).digest())})
    return (time.perf_counter() - started) / rounds


def scope_filter_seconds(files: int) -> float:
    """What _record_part spends per change on the in-memory dicts: two passes over N paths."""
    paths = [f"t{i % 25:02d}/s{i % 20:02d}/f{i:07d}.txt" for i in range(files)]
    shallow, deep = {"t03/s07"}, ("t03/s07/new/",)
    started = time.perf_counter()
    for _ in range(2):
        _ = [p for p in paths if p.rpartition("/")[0] in shallow or p.startswith(deep)]
    return time.perf_counter() - started


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares line y = a + b x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )
    return my - b * mx, b


def main(rss_b: list[float], edit_p50: list[float]) -> None:
    base, per_file = fit([float(n) for n in BENCH_FILES], rss_b)
    print(f"memory: {base:.0f} MiB + {per_file * MiB / 1024:.2f} KiB per file (B, least squares)")
    measure_at = [10_000, 50_000, 200_000]
    tree = {n: tree_update_seconds(n) for n in measure_at}
    scope = {n: scope_filter_seconds(n) for n in measure_at}
    scope_a, scope_b = fit([float(n) for n in measure_at], [scope[n] for n in measure_at])
    tree_a, tree_b = fit([float(n) for n in measure_at], [tree[n] for n in measure_at])
    fixed = edit_p50[0] - (scope_a + scope_b * 10_000) - (tree_a + tree_b * 10_000)
    print(f"fixed per-change cost (debounce, transfer, commit): {fixed * 1000:.0f} ms")
    print("files | RSS MiB | tree update ms | scope filter ms | one change s")
    rows = []
    for n in TARGETS:
        rss = base + per_file * n
        t = tree_a + tree_b * n
        s = scope_a + scope_b * n
        rows.append((n, rss, t, s, fixed + t + s))
        print(f"{n:>10,} | {rss:8.0f} | {t * 1000:8.3f} | {s * 1000:8.1f} | {fixed + t + s:6.3f}")
    plot(rows, rss_b, edit_p50)


def plot(
    rows: list[tuple[int, float, float, float, float]], rss: list[float], edit: list[float]
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
    left.loglog(files, [row[1] for row in rows], "o-", label="projected (B)")
    left.loglog(BENCH_FILES, rss, "s", label="measured (bench)")
    left.axhline(150, color="red", linestyle="--", label="goal 150 MiB at 200k")
    left.set_xlabel("files in the folder")
    left.set_ylabel("peak RSS, MiB")
    left.legend()
    right.loglog(files, [row[4] for row in rows], "o-", label="one change, projected")
    right.loglog(files, [row[3] for row in rows], ".--", label="of it: O(N) scope filter")
    right.loglog(files, [row[2] for row in rows], ".:", label="of it: index-tree update")
    right.loglog(BENCH_FILES, edit, "s", label="measured p50 (bench)")
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
    # rss_b (MiB) and edit p50 (s) at 10k, 20k, 50k: from the bench run in README.md.
    values = [float(v) for v in sys.argv[1:]] if len(sys.argv) == 7 else []
    if not values:
        print("usage: model.py RSS10k RSS20k RSS50k EDIT10k EDIT20k EDIT50k", file=sys.stderr)
        raise SystemExit(2)
    main(values[:3], values[3:])
