"""The compact record set and the per-directory path index (issue 16: memory per file and
work per change): they answer exactly what the dicts and full walks they replace did."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfs.ids import ContentHash
from p2pfs.store.folders import FolderStore
from p2pfs.store.index import IndexStore
from p2pfs.sync.ignore import PARTIAL_PREFIX, STATE_DIR, IgnoreRules
from p2pfs.sync.keys import FolderKeys
from p2pfs.sync.planner import CONFLICT_MARKER
from p2pfs.sync.records import (
    IndexLeaf,
    IndexTree,
    PackedLeaves,
    SignedRecord,
    build_index,
    index_leaf,
    path_key,
    record_hash,
)
from p2pfs.sync.recordset import DirectoryIndex, KnownVersions, RecordSet
from p2pfs.sync.versions import DIRECTORY_ROOT, FileVersion, VersionVector

KEYS = FolderKeys.from_write_seed(bytes(range(32)))
DEVICES = [bytes([i]) * 32 for i in range(1, 4)]

names = st.sampled_from(["a", "b", "c.txt", f"x{CONFLICT_MARKER}20260101-000000-abc.txt"])
paths = st.lists(names, min_size=1, max_size=4).map("/".join)
directories = st.one_of(st.just(""), st.lists(names, min_size=1, max_size=3).map("/".join))


@st.composite
def versions(draw: st.DrawFn, path: str | None = None) -> FileVersion:
    kind = draw(st.sampled_from(["file", "directory", "deleted"]))
    counters = draw(st.dictionaries(st.sampled_from(DEVICES), st.integers(1, 1 << 62), min_size=1))
    vector = VersionVector.of(counters)
    by = draw(st.sampled_from(sorted(counters)))
    where = path if path is not None else draw(paths)
    mtime = draw(st.integers(-(1 << 63), (1 << 63) - 1))
    if kind == "deleted":
        return FileVersion.tombstone(where, vector, mtime, by)
    root = (
        DIRECTORY_ROOT
        if kind == "directory"
        else ContentHash(draw(st.binary(min_size=32, max_size=32)))
    )
    size = 0 if kind == "directory" else draw(st.integers(0, 1 << 40))
    executable = kind == "file" and draw(st.booleans())
    return FileVersion(where, vector, False, root, size, executable, mtime, by)


@given(versions())
def test_a_stored_record_reads_back_as_the_record(version: FileVersion) -> None:
    record = SignedRecord.sign(version, KEYS)
    encoded = record.encode()
    again = SignedRecord.decode_stored(encoded)
    assert again == record
    assert again.encode() == encoded
    assert hash(again.version) == hash(version)
    assert again == SignedRecord.decode_untrusted(encoded, KEYS)


@settings(max_examples=60)
@given(st.lists(st.tuples(paths, st.data()), max_size=25))
def test_record_set_counts_and_serves_what_a_dict_of_records_would(
    puts: list[tuple[str, st.DataObject]],
) -> None:
    held = RecordSet()
    model: dict[str, SignedRecord] = {}
    for path, data in puts:
        record = SignedRecord.sign(data.draw(versions(path)), KEYS)
        keep_decoded = data.draw(st.booleans())
        digest = held.put(path, record.encode(), record if keep_decoded else None)
        assert digest == record.hash
        model[path] = record
    assert dict(held) == model
    assert set(held) == set(model) and len(held) == len(model)
    live = [r.version for r in model.values() if not r.version.deleted]
    assert held.files == sum(1 for v in live if not v.is_directory)
    assert held.directories == sum(1 for v in live if v.is_directory)
    assert held.file_bytes == sum(v.size for v in live if not v.is_directory)
    assert held.conflict_copies == {v.path for v in live if CONFLICT_MARKER in v.path}
    for path, record in model.items():
        assert held.encoded_by_hash(record.hash) == record.encode()
        version = record.version
        root = version.root or bytes(32)
        assert held.matches(path, root, version.executable) == (not version.deleted)
        assert not held.matches(path, bytes(31) + b"\x01", version.executable)
        is_file = not version.deleted and not version.is_directory
        assert held.file_size(path) == (version.size if is_file else None)
        assert held.versions()[path] == version
    assert held.file_size("never/put") is None
    # A replaced record is no longer served by its hash.
    for path, data in puts:
        record = SignedRecord.sign(data.draw(versions(path)), KEYS)
        if record_hash(record.encode()) != model[path].hash:
            assert held.encoded_by_hash(model[path].hash) == model[path].encode()
            held.put(path, record.encode())
            assert held.encoded_by_hash(model[path].hash) is None
            model[path] = record


def in_scope_by_walk(path: str, shallow: set[str], deep: set[str]) -> bool:
    """The predicate partial scans used, over every path of the folder."""
    prefixes = tuple(f"{d}/" for d in deep)
    return (
        path.rpartition("/")[0] in shallow
        or path in deep
        or (bool(prefixes) and path.startswith(prefixes))
    )


@given(
    st.sets(paths, max_size=30),
    st.sets(directories, max_size=3),
    st.sets(directories, max_size=3),
    st.sets(paths, max_size=10),
)
def test_directory_index_finds_the_paths_a_full_walk_would(
    held: set[str], shallow: set[str], deep: set[str], dropped: set[str]
) -> None:
    index = DirectoryIndex(held)
    for path in dropped:
        index.discard(path)
    left = held - dropped
    expected = {path for path in left if in_scope_by_walk(path, shallow, deep)}
    assert index.in_scope(shallow, deep) == expected
    for path in expected:
        index.discard(path)
    assert index.in_scope(shallow, deep) == set()


def state_rule_by_parts(path: str) -> bool:
    """The always-ignored rule, checked component by component (as before the shortcut)."""
    parts = path.split("/")
    return any(p.casefold() == STATE_DIR for p in parts) or parts[-1].startswith(PARTIAL_PREFIX)


components = st.sampled_from(
    [".p2pfs", ".P2PFS", ".p2PfS", ".p2pfs-part-x", ".p2pfsignore", "x.p2pfs", "a", "ﬃ", "ǅ"]
)


@given(st.lists(st.one_of(components, st.text(min_size=1, max_size=4)), min_size=1, max_size=4))
def test_the_state_directory_shortcut_ignores_exactly_what_the_parts_rule_does(
    parts: list[str],
) -> None:
    path = "/".join(part.replace("/", "_") for part in parts)
    assert IgnoreRules()(path) == state_rule_by_parts(path)


def folder_store(directory: Path) -> tuple[IndexStore, FolderStore, int]:
    index = IndexStore(directory / "index.sqlite3")
    store = FolderStore(index)
    row = store.add_folder(
        KEYS.folder_id,
        str(directory / "folder"),
        KEYS.read_key,
        KEYS.write_public,
        KEYS.write_seed,
        bytes([7]) * 32,
        0,
    )
    return index, store, row.id


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(paths, st.data(), st.booleans()), max_size=25),
    st.sets(directories, max_size=3),
    st.sets(directories, max_size=3),
)
def test_records_in_the_folders_store_answer_what_records_in_memory_do(
    puts: list[tuple[str, st.DataObject, bool]], shallow: set[str], deep: set[str]
) -> None:
    """The daemon's RecordSet reads the folder's SQLite store (no record kept in memory):
    stored in batches (a path may come twice in one), it counts, serves by path, hash and
    directory, and loads (counts, absent paths, the index tree's leaves) as a RecordSet
    over memory does."""
    with tempfile.TemporaryDirectory() as scratch:
        index, store, folder = folder_store(Path(scratch))
        stored = RecordSet(store.record_source(folder))
        memory = RecordSet()
        absent: dict[str, bool] = {}
        batch: list[tuple[str, bytes, bool]] = []
        records: list[SignedRecord] = []
        for number, (path, data, is_absent) in enumerate(puts):
            record = SignedRecord.sign(data.draw(versions(path)), KEYS)
            memory.put(path, record.encode(), record)
            absent[path] = is_absent and not record.version.deleted  # as the engine stores
            batch.append((path, record.encode(), absent[path]))
            records.append(record)
            if number % 4 == 3 or number == len(puts) - 1:
                replaced = store.put_records(folder, batch)
                for (p, encoded, _a), r, (old, key, digest) in zip(
                    batch, records, replaced, strict=True
                ):
                    assert key == path_key(p) and digest == record_hash(encoded)
                    stored.noted(p, old, encoded, r if number % 2 else None, digest)
                batch, records = [], []
        assert dict(stored) == dict(memory) and len(stored) == len(memory)
        assert sorted(stored) == sorted(memory)
        assert stored.counts == memory.counts
        assert stored.in_scope(shallow, deep) == memory.in_scope(shallow, deep)
        asked = {path for path, _data, _absent in puts} | {"never/put"}
        assert stored.records_at(asked) == memory.records_at(asked) == dict(memory)
        found = [(p, r.version.root or bytes(32), r.version.executable) for p, r in memory.items()]
        found.append(("never/put", bytes(32), False))
        assert stored.unmatched(found) == memory.unmatched(found)
        for path, record in memory.items():
            assert stored.encoded_by_hash(record.hash) == record.encode()
            assert stored.file_size(path) == memory.file_size(path)
        # A restart: a fresh RecordSet over the same store, loaded.
        stored.close()
        loaded = store.load_records(folder)
        assert loaded.counts == memory.counts
        assert loaded.absent == {path for path, is_absent in absent.items() if is_absent}
        tree = IndexTree.from_packed(PackedLeaves.packed(loaded.leaves))
        assert tree.leaves == {path_key(p): r.hash for p, r in memory.items()}
        assert tree.root == build_index(index_leaf(r) for r in memory.values())
        index.close()


def test_records_stored_before_schema_5_get_their_hash_key_and_directory_at_load(
    tmp_path: Path,
) -> None:
    index, store, folder = folder_store(tmp_path)
    version = FileVersion(
        "docs/a.txt",
        VersionVector.empty().bump(DEVICES[0]),
        False,
        ContentHash(bytes(32)),
        5,
        False,
        0,
        DEVICES[0],
    )
    record = SignedRecord.sign(version, KEYS)
    # As an older p2pfs wrote it: no derived columns.
    index.connection.execute(
        "INSERT INTO folder_records (folder, path, record, absent) VALUES (?, ?, ?, 0)",
        (folder, "docs/a.txt", record.encode()),
    )
    records = RecordSet(store.record_source(folder))
    assert records.encoded_by_hash(record.hash) is None
    loaded = store.load_records(folder)
    assert loaded.counts.files == 1 and loaded.counts.file_bytes == 5
    assert bytes(loaded.leaves) == path_key("docs/a.txt") + record.hash
    assert records.encoded_by_hash(record.hash) == record.encode()
    assert records.in_scope({"docs"}, ()) == {"docs/a.txt"}
    records.close()
    index.close()


@given(
    st.dictionaries(st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32)),
    st.dictionaries(
        st.binary(min_size=32, max_size=32),
        st.one_of(st.none(), st.binary(min_size=32, max_size=32)),
    ),
)
def test_merged_packed_leaves_are_the_leaves_with_the_changes_applied(
    leaves: dict[bytes, bytes], changes: dict[bytes, bytes | None]
) -> None:
    packed = PackedLeaves(IndexLeaf(k, ContentHash(leaves[k])) for k in sorted(leaves))
    # Some changes land on held keys.
    changes.update({k: None for k in list(leaves)[::3]})
    expected = {**leaves}
    for key, digest in changes.items():
        if digest is None:
            expected.pop(key, None)
        else:
            expected[key] = digest
    merged = packed.merged({k: None if v is None else ContentHash(v) for k, v in changes.items()})
    assert merged.as_dict() == expected
    assert [leaf.path_key for leaf in merged] == sorted(expected)


def test_a_links_vectors_are_kept_in_the_store_and_one_going_backwards_is_refused(
    tmp_path: Path,
) -> None:
    index, store, _folder = folder_store(tmp_path)
    one = VersionVector.empty().bump(DEVICES[0])
    two = one.bump(DEVICES[0])
    other = one.bump(DEVICES[1])
    assert store.note_vectors(1, [("a", two), ("b", one)]) is None
    # Newer, equal and concurrent vectors pass; an older one is named (nothing is kept).
    assert store.note_vectors(1, [("b", other), ("a", two)]) is None
    assert store.note_vectors(1, [("c", one), ("b", one)]) == "b"
    assert store.note_vectors(1, [("c", one)]) is None
    assert store.note_vectors(2, [("a", one)]) is None  # another link's history is its own
    store.forget_vectors(1)  # the link ended
    assert store.note_vectors(1, [("a", one), ("b", one)]) is None
    store.forget_vectors(3)  # never sent anything
    index.close()


def test_a_plans_view_answers_asked_paths_from_the_read_ahead_and_others_from_the_set() -> None:
    held = RecordSet()
    records = {
        path: SignedRecord.sign(
            FileVersion(
                path,
                VersionVector.empty().bump(DEVICES[0]),
                False,
                ContentHash(bytes(32)),
                1,
                False,
                0,
                DEVICES[0],
            ),
            KEYS,
        )
        for path in ("a", "b", "c")
    }
    for path, record in records.items():
        held.put(path, record.encode(), record)
    # "a" and "new" were read ahead ("new" has no record); "b" was not asked.
    view = KnownVersions({"a": records["a"]}, {"a", "new"}, held)
    assert view["a"] == records["a"].version and view.record("a") == records["a"]
    assert "new" not in view and view.get("new") is None and view.record("new") is None
    assert view["b"] == records["b"].version and view.record("b") == records["b"]
    assert "b" in view and "zzz" not in view
    assert sorted(view) == ["a", "b", "c"] and len(view) == 3
