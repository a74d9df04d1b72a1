"""The compact record set and the per-directory path index (issue 16: memory per file and
work per change): they answer exactly what the dicts and full walks they replace did."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfs.ids import ContentHash
from p2pfs.sync.ignore import PARTIAL_PREFIX, STATE_DIR, IgnoreRules
from p2pfs.sync.keys import FolderKeys
from p2pfs.sync.planner import CONFLICT_MARKER
from p2pfs.sync.records import SignedRecord, record_hash
from p2pfs.sync.recordset import DirectoryIndex, IndexedPaths, RecordSet
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
    states: IndexedPaths[int] = IndexedPaths({path: 1 for path in held})
    for path in dropped:
        index.discard(path)
        states.pop(path, None)
    left = held - dropped
    expected = {path for path in left if in_scope_by_walk(path, shallow, deep)}
    assert index.in_scope(shallow, deep) == expected
    assert states.index.in_scope(shallow, deep) == expected
    for path in expected:
        del states[path]
    assert set(states) == left - expected
    assert states.index.in_scope(shallow, deep) == set()


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
