"""How far apart a folder's full rescans are: bounded by their cost while the watcher works,
fixed without one or when set by hand."""

from __future__ import annotations

from pathlib import Path

import trio
from hypothesis import given
from hypothesis import strategies as st

from p2pfs.daemon.folders.manager import (
    RESCAN_INTERVAL,
    RESCAN_INTERVAL_WATCHED_MAX,
    RESCAN_SHARE,
    full_rescan_delay,
)
from p2pfs.store.index import IndexStore
from tests.test_sync_local_scan import loaded_folder, write_old_tree

seconds = st.floats(min_value=0.0, max_value=1e5, allow_nan=False, allow_infinity=False)


@given(base=seconds, last=st.none() | seconds, fixed=st.booleans())
def test_without_a_watcher_or_set_by_hand_the_interval_is_the_base(
    base: float, last: float | None, fixed: bool
) -> None:
    assert full_rescan_delay(base, last, watching=False, fixed=fixed) == base
    assert full_rescan_delay(base, last, watching=True, fixed=True) == base


@given(base=seconds, last=seconds)
def test_with_a_watcher_full_rescans_take_a_bounded_share_of_the_time(
    base: float, last: float
) -> None:
    delay = full_rescan_delay(base, last, watching=True)
    assert delay >= base
    assert delay <= max(base, RESCAN_INTERVAL_WATCHED_MAX)
    if delay < RESCAN_INTERVAL_WATCHED_MAX:
        assert last <= RESCAN_SHARE * delay * (1 + 1e-9)  # the share holds below the cap


def test_the_default_stretches_only_for_folders_whose_rescan_is_slow() -> None:
    assert full_rescan_delay(RESCAN_INTERVAL, 0.05, watching=True) == RESCAN_INTERVAL
    assert full_rescan_delay(RESCAN_INTERVAL, 3.0, watching=True) == 300.0
    assert full_rescan_delay(RESCAN_INTERVAL, 60.0, watching=True) == RESCAN_INTERVAL_WATCHED_MAX
    assert full_rescan_delay(RESCAN_INTERVAL, None, watching=True) == RESCAN_INTERVAL


def test_a_forced_rescan_records_how_long_it_held_the_folder(tmp_path: Path) -> None:
    top = tmp_path / "folder"
    write_old_tree(top, [f"d{n % 5}/f{n}.txt" for n in range(40)])

    async def main() -> None:
        with IndexStore(tmp_path / "index.sqlite3") as index:
            folder = await loaded_folder(index, top)
            assert folder.last_full_scan_s is None
            before = trio.current_time()
            await folder.rescan(force=True)
            took = trio.current_time() - before
            first = folder.last_full_scan_s
            assert first is not None
            assert 0 < first <= took
            folder.dirty = True
            await folder.rescan()  # a watcher's rescan is not the safety net's
            assert folder.last_full_scan_s == first

    trio.run(main)
