"""Members running the daemon's reconcile (sync/reconcile.py) converge, in any gossip order.

Each member is the engine's state in miniature: signed-record contents by path, the paths
held absent, the files on its disk. A pull is what ``FolderSync.reconcile`` does: rescan
(the real ``local_changes``), take the peer's differing records, plan with the real
``plan_read_write`` / ``plan_read_only``, then perform the plan the way the engine does
(content is fetched only if the peer or this member holds it; a path is placed or deleted
only if it is as last scanned; a conflict copy is linked only where nothing is; a record
waiting for a placement is stored only once it is placed). The members differ: read-write
and read-only, ignore patterns, and a file system that ignores case.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfs.ids import ContentHash
from p2pfs.sync.ignore import IgnoreRules
from p2pfs.sync.local import DiskFile, local_changes
from p2pfs.sync.reconcile import Holdings, Plan, plan_read_only, plan_read_write, takes
from p2pfs.sync.records import path_key
from p2pfs.sync.versions import FileVersion, Ordering, VersionVector

SECOND = 1_000_000_000
T0 = 1_767_225_600 * SECOND
PATHS = ["a", "A", "b.txt", ".c"]
ROOTS = [ContentHash(bytes([i]) * 32) for i in (11, 12, 13)]
DEVICES = [bytes([i]) * 32 for i in (1, 2, 3, 4)]


@dataclass
class Member:
    device: bytes
    writable: bool = True
    ignore: IgnoreRules = field(default_factory=IgnoreRules)
    case_insensitive: bool = False
    records: dict[str, FileVersion] = field(default_factory=dict)
    absent: set[str] = field(default_factory=set)
    disk: dict[str, tuple[ContentHash, int]] = field(default_factory=dict)
    """Regular files: name as stored -> (content root, mtime)."""
    unrecorded: set[str] = field(default_factory=set)
    collisions: dict[str, str] = field(default_factory=dict)

    def name_of(self, path: str) -> str | None:
        """The stored name ``path`` reaches (on a case-insensitive disk, any case)."""
        if path in self.disk:
            return path
        if self.case_insensitive:
            for name in self.disk:
                if name.casefold() == path.casefold():
                    return name
        return None

    def state_of(self, path: str) -> tuple[str, ContentHash, int] | None:
        name = self.name_of(path)
        return None if name is None else (name, *self.disk[name])

    def holdings(self) -> Holdings:
        return Holdings(
            dict(self.records),
            absent=set(self.absent),
            ignored=self.ignore,
            on_disk={name for name in self.disk if not self.ignore(name)},  # as scanned
            ignored_on_disk={name for name in self.disk if self.ignore(name)},
            case_insensitive=self.case_insensitive,
        )


@dataclass
class World:
    members: list[Member]
    clock: itertools.count[int] = field(default_factory=lambda: itertools.count(T0, SECOND))
    edits: list[FileVersion] = field(default_factory=list)
    """Every version a member's scan recorded (users' edits and deletes, never merges)."""

    def write(self, who: int, path: str, root: ContentHash | None) -> None:
        member = self.members[who]
        name = member.name_of(path) or path
        if root is None:
            member.disk.pop(name, None)
        else:
            member.disk[name] = (root, next(self.clock))

    def rescan(self, member: Member) -> None:
        found = {
            name: DiskFile(name, root, 10, False, mtime)
            for name, (root, mtime) in member.disk.items()
            if not member.ignore(name)
        }
        changes = local_changes(
            member.records, found, member.device, next(self.clock), member.ignore, member.absent
        )
        if not member.writable:
            member.unrecorded = {change.path for change in changes}
            return
        for change in changes:
            member.records[change.path] = change
            member.absent.discard(change.path)
        self.edits.extend(changes)

    def pull(self, x: Member, y: Member) -> Plan:
        """``x`` reconciles with ``y``, as FolderSync.reconcile does."""
        self.rescan(x)
        remote = sorted(
            (v for path, v in y.records.items() if x.records.get(path) != v),
            key=lambda v: path_key(v.path),
        )
        held = x.holdings()
        plan = (
            plan_read_write(held, remote)
            if x.writable
            else plan_read_only(held, remote, set(x.unrecorded))
        )
        check_plan(x, plan)
        # As the engine does: every path planned again is reported as it stands now.
        for path in [v.path for v in remote] + [path for path, _v in plan.fetch]:
            x.collisions.pop(path, None)
        perform(x, y, plan)
        return plan


def check_plan(member: Member, plan: Plan) -> None:
    touched = [path for path, _v in plan.fetch] + list(plan.delete)
    for path in touched:
        assert not member.ignore(path), f"an ignored path is touched: {path}"
        assert path not in member.unrecorded, f"an unrecorded edit is touched: {path}"
    if not member.writable:
        # A read-only member only stores records some read-write member signed.
        assert not plan.conflict_moves and not plan.conflicts
    if member.case_insensitive:
        # Files here (an absent record, ignored here, has none for a placement to land on;
        # a file not synced, ignored or unrecorded, does).
        live = {name.casefold(): name for name in member.disk}
        live.update(
            (p.casefold(), p)
            for p, v in member.records.items()
            if not v.deleted and p not in member.absent and not member.ignore(p)
        )
        placed: dict[str, str] = {}
        for path, _version in plan.fetch:
            folded = path.casefold()
            assert live.get(folded, path) == path, f"{path} lands on {live[folded]}"
            assert placed.setdefault(folded, path) == path, f"{path} and {placed[folded]}"


def perform(x: Member, y: Member, plan: Plan) -> None:
    """The engine's _apply: downloads (with conflict links), deletes, then records."""
    scanned = {name: (name, *state) for name, state in x.disk.items()}
    holders = {root for root, _mtime in (*x.disk.values(), *y.disk.values())}
    placed: set[str] = set()
    for path, version in plan.fetch:
        assert version.root is not None
        now = x.state_of(path)
        if version.root not in holders or now != scanned.get(path):
            continue  # content nobody here has, or changed since the scan: retried later
        copy = plan.conflict_moves.get(path)
        if now is not None and copy is not None:
            if x.state_of(copy) is not None:
                continue  # link_within never replaces
            x.disk[copy] = x.disk[path]
        x.disk[path] = (version.root, version.mtime_ns)
        placed.add(path)
    deleted: set[str] = set()
    for path in plan.delete:
        now = x.state_of(path)
        if now is not None and now != scanned.get(path):
            continue
        if now is not None:
            del x.disk[now[0]]
        deleted.add(path)
    for record in plan.records:
        waits = plan.waits_for.get(record.path)
        if waits is not None and waits not in placed:
            continue
        if record.path in plan.delete and record.path not in deleted:
            continue
        x.records[record.path] = record
        if record.path in plan.absent and not record.deleted:
            x.absent.add(record.path)
        else:
            x.absent.discard(record.path)
    x.collisions.update(plan.collisions)


def exchange(world: World, i: int, j: int) -> None:
    x, y = world.members[i], world.members[j]
    world.pull(x, y)
    world.pull(y, x)


@dataclass(frozen=True)
class Edit:
    member: int
    path: str
    root: ContentHash | None  # None: delete the file


def members_of(kinds: list[tuple[bool, bool, tuple[str, ...]]]) -> list[Member]:
    return [
        Member(
            DEVICES[i],
            writable=writable,
            case_insensitive=folds,
            ignore=IgnoreRules.parse("\n".join(f"/{p}" for p in ignored)),
        )
        for i, (writable, folds, ignored) in enumerate(kinds)
    ]


member_kinds = st.tuples(
    st.booleans(), st.booleans(), st.lists(st.sampled_from(PATHS), max_size=1).map(tuple)
)
worlds = st.lists(member_kinds, min_size=3, max_size=4).filter(
    lambda kinds: sum(writable for writable, _f, _i in kinds) >= 2
)


def history_for(count: int) -> st.SearchStrategy[list[Edit | tuple[int, int]]]:
    edits = st.builds(
        Edit,
        st.integers(0, count - 1),
        st.sampled_from(PATHS),
        st.sampled_from([*ROOTS, None]),
    )
    pulls = st.tuples(st.integers(0, count - 1), st.integers(0, count - 1))
    return st.lists(st.one_of(edits, pulls), max_size=30)


def run(world: World, history: list[Edit | tuple[int, int]]) -> None:
    for step in history:
        if isinstance(step, Edit):
            world.write(step.member, step.path, step.root)
        elif step[0] != step[1]:
            exchange(world, *step)


def settle(world: World, rounds: int = 5) -> None:
    count = len(world.members)
    for _ in range(rounds):
        for i, j in itertools.combinations(range(count), 2):
            exchange(world, i, j)


def check_converged(world: World) -> None:
    members = world.members
    held_back = {path for m in members for path in m.collisions}
    # Every member holds the same records, but for paths a case-insensitive member holds
    # back (their records wait there: never placed, reported as collisions; a file it
    # does not sync, ignored or unrecorded, may be what holds the name).
    paths = {path for m in members for path in m.records} - held_back
    for path in paths:
        assert len({repr(m.records.get(path)) for m in members}) == 1, path
    for m in members:
        for path, record in m.records.items():
            if path in m.unrecorded or m.ignore(path) or path in held_back:
                continue
            on_disk = m.state_of(path)
            if record.deleted:
                # (On a disk that ignores case, "a" may stand where "A" was deleted.)
                assert path not in m.disk, (path, m.device[0])
            else:
                # Every member holds the content of every record it holds with content.
                assert path not in m.absent
                assert on_disk is not None and on_disk[1] == record.root, (path, m.device[0])


def check_nothing_lost(world: World) -> None:
    """Every edit's content survives (at its path or as a conflict copy) unless a later
    edit saw it: a delete never removes a concurrent edit, a conflict keeps both sides."""
    survivors = {v.root for m in world.members for v in m.records.values() if not v.deleted} | {
        root for m in world.members for root, _mtime in m.disk.values()
    }
    for edit in world.edits:
        if edit.deleted or edit.root in survivors:
            continue
        seen_by = [
            later
            for later in world.edits
            if later.path == edit.path and later.version.compare(edit.version) is Ordering.AFTER
        ]
        assert seen_by, f"{edit.path} {edit.root!r} lost"


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_members_of_every_kind_gossiping_in_any_order_converge(data: st.DataObject) -> None:
    kinds = data.draw(worlds)
    world = World(members_of(kinds))
    run(world, data.draw(history_for(len(kinds))))
    settle(world)
    check_converged(world)
    check_nothing_lost(world)


@settings(max_examples=150, deadline=None)
@given(history_for(3))
def test_three_read_write_members_converge_to_identical_indexes(
    history: list[Edit | tuple[int, int]],
) -> None:
    world = World(members_of([(True, False, ())] * 3))
    run(world, history)
    settle(world, rounds=4)
    assert world.members[0].records == world.members[1].records == world.members[2].records
    check_converged(world)
    check_nothing_lost(world)


@settings(max_examples=100, deadline=None)
@given(history_for(3))
def test_a_settled_folder_plans_nothing(history: list[Edit | tuple[int, int]]) -> None:
    world = World(members_of([(True, False, ()), (False, False, ()), (True, False, ())]))
    run(world, history)
    settle(world)
    for x, y in itertools.permutations(world.members, 2):
        plan = world.pull(x, y)
        assert plan == Plan(), plan


@given(history_for(3))
def test_plans_do_not_depend_on_record_order(history: list[Edit | tuple[int, int]]) -> None:
    world = World(members_of([(True, False, ()), (True, True, ("b.txt",)), (False, False, ())]))
    run(world, history)
    for x, y in itertools.permutations(world.members, 2):
        remote = [v for path, v in y.records.items() if x.records.get(path) != v]
        planner = plan_read_write if x.writable else plan_read_only
        forward = planner(x.holdings(), sorted(remote, key=lambda v: path_key(v.path)))
        backward = planner(x.holdings(), sorted(remote, key=lambda v: path_key(v.path))[::-1])
        assert set(forward.records) == set(backward.records)
        assert set(forward.fetch) == set(backward.fetch)
        assert set(forward.delete) == set(backward.delete)


# --- examples ---------------------------------------------------------------------------


def version(
    path: str, vector: dict[bytes, int], root: ContentHash | None, mtime: int
) -> FileVersion:
    device = max(vector)
    if root is None:
        return FileVersion.tombstone(path, VersionVector.of(vector), mtime, device)
    return FileVersion(path, VersionVector.of(vector), False, root, 10, False, mtime, device)


def test_a_member_that_does_not_merge_takes_the_same_winner_as_resolve() -> None:
    a, b = DEVICES[0], DEVICES[1]
    edit = version("f", {a: 2}, ROOTS[0], T0)
    gone = version("f", {a: 1, b: 1}, None, T0 + SECOND)  # later, but never saw the edit
    assert takes(gone, edit) and not takes(edit, gone)  # a delete never beats an edit
    newer = version("f", {b: 2}, ROOTS[1], T0 + SECOND)
    assert takes(edit, newer) and not takes(newer, edit)
    assert takes(None, gone) and not takes(edit, edit)


def test_a_read_only_member_leaves_its_own_edit_and_takes_the_record() -> None:
    a = DEVICES[0]
    mine = version("f", {a: 1}, ROOTS[0], T0)
    theirs = version("f", {a: 2}, ROOTS[1], T0 + SECOND)
    held = Holdings({"f": mine}, on_disk={"f"})
    plan = plan_read_only(held, [theirs], unrecorded={"f"})
    assert plan == Plan(records=(theirs,))
    plan = plan_read_only(held, [theirs])
    assert plan.fetch == (("f", theirs),) and plan.waits_for == {"f": "f"}


def test_an_ignored_path_takes_the_record_as_absent_and_unignoring_fetches_it() -> None:
    a, b = DEVICES[0], DEVICES[1]
    theirs = version("log", {b: 1}, ROOTS[0], T0)
    plan = plan_read_write(Holdings({}, ignored=IgnoreRules.parse("log")), [theirs])
    assert plan == Plan(records=(theirs,), absent=frozenset({"log"}))
    later = Holdings({"log": theirs}, absent={"log"})
    plan = plan_read_write(later, [])
    assert plan.fetch == (("log", theirs),) and plan.records == (theirs,)
    # A file found there meanwhile is the scan's business (a concurrent version), not ours.
    assert plan_read_write(Holdings({"log": theirs}, absent={"log"}, on_disk={"log"}), []) == Plan()
    del a


def test_a_case_insensitive_member_holds_a_colliding_path_back() -> None:
    a, b = DEVICES[0], DEVICES[1]
    mine = version("Read.me", {a: 1}, ROOTS[0], T0)
    theirs = version("read.me", {b: 1}, ROOTS[1], T0)
    plan = plan_read_write(Holdings({"Read.me": mine}, case_insensitive=True), [theirs])
    assert plan.collisions == {"read.me": "Read.me"}
    assert plan.fetch == () and plan.waits_for == {"read.me": "read.me"}
    assert plan_read_write(Holdings({"Read.me": mine}), [theirs]).fetch == (("read.me", theirs),)


def test_a_conflict_won_here_is_stored_only_once_the_losers_copy_is_placed() -> None:
    a, b = DEVICES[0], DEVICES[1]
    mine = version("f", {a: 1}, ROOTS[0], T0 + SECOND)
    theirs = version("f", {b: 1}, ROOTS[1], T0)
    plan = plan_read_write(Holdings({"f": mine}, on_disk={"f"}), [theirs])
    (copy_path, copy), *_rest = plan.fetch
    assert copy.root == theirs.root and plan.conflicts == {"f": copy_path}
    # The merged record (AFTER theirs: the conflict is never planned again once it is
    # stored) waits for the loser's content to be placed as the copy.
    assert plan.waits_for == {copy_path: copy_path, "f": copy_path}


@pytest.mark.parametrize("case_insensitive", [True, False])
def test_a_concurrent_edit_survives_when_its_content_cannot_be_fetched_yet(
    case_insensitive: bool,
) -> None:
    # Found by the property above (seed 6), first next to a case collision ('a' written on
    # a disk that ignores case lands on 'A': it only made member 0's edit the newer one).
    # Member 0 wins a conflict on A while the loser's content is nowhere it can fetch it
    # (member 2, read-only, changed its copy since). The merged record used to be stored
    # at once, so nobody planned the conflict again and member 1's edit vanished.
    world = World(members_of([(True, case_insensitive, ()), (True, False, ()), (False, False, ())]))
    run(
        world,
        [
            Edit(0, "A", ROOTS[0]),
            Edit(1, "A", ROOTS[1]),
            Edit(0, "a" if case_insensitive else "A", ROOTS[0]),
            (1, 2),
            Edit(2, "A", ROOTS[0]),
            (0, 2),
        ],
    )
    settle(world)
    check_converged(world)
    check_nothing_lost(world)
    copies = [p for p, v in world.members[1].records.items() if p != "A" and not v.deleted]
    assert [world.members[1].records[p].root for p in copies] == [ROOTS[1]]


def test_a_file_not_synced_here_holds_a_colliding_path_back_until_it_is_gone() -> None:
    b = DEVICES[1]
    theirs = version("read.me", {b: 1}, ROOTS[1], T0)
    for held in (
        Holdings({}, ignored_on_disk={"Read.me"}, case_insensitive=True),  # ignored here
        Holdings({}, on_disk={"Read.me"}, case_insensitive=True),  # found, not recorded
    ):
        plan = plan_read_only(held, [theirs], unrecorded={"Read.me"})
        assert plan.collisions == {"read.me": "Read.me"} and plan.fetch == ()
        assert plan.records == (theirs,) and plan.waits_for == {"read.me": "read.me"}
        assert plan_read_write(held, [theirs]).collisions == {"read.me": "Read.me"}
    # The user removed (or renamed) it: the next plan places the path.
    plan = plan_read_write(Holdings({}, case_insensitive=True), [theirs])
    assert plan.collisions == {} and plan.fetch == (("read.me", theirs),)


@pytest.mark.parametrize("writable", [True, False])
def test_a_collision_with_a_file_not_synced_is_reported_and_converges_once_resolved(
    writable: bool,
) -> None:
    # Member 0 (case-insensitive) ignores 'A' and holds such a file; the others sync 'a'.
    world = World(members_of([(writable, True, ("A",)), (True, False, ()), (True, False, ())]))
    run(world, [Edit(0, "A", ROOTS[0]), Edit(1, "a", ROOTS[1])])
    settle(world)
    check_converged(world)
    first = world.members[0]
    assert first.collisions == {"a": "A"} and "a" not in first.records
    world.write(0, "A", None)  # the user moves the ignored file away
    settle(world)
    check_converged(world)
    check_nothing_lost(world)
    assert first.collisions == {} and first.disk["a"][0] == ROOTS[1]
    assert first.records["a"] == world.members[1].records["a"]
