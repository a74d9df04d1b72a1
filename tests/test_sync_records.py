"""Folder keys, membership proofs, signed records and the folder index tree."""

from __future__ import annotations

import random
from dataclasses import replace

import blake3
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfs.content.tree import Child, build_tree, iter_leaves
from p2pfs.errors import LocalProtocolError, RemoteProtocolError
from p2pfs.ids import ContentHash
from p2pfs.sync import records
from p2pfs.sync.keys import WRITE_KEY_CONTEXT, FolderKeys
from p2pfs.sync.local import DiskFile, case_collisions, local_changes
from p2pfs.sync.records import (
    EMPTY_INDEX,
    INDEX_TREE,
    IndexLeaf,
    IndexTree,
    LeafQueue,
    PackedLeaves,
    SignedRecord,
    build_index,
    index_leaf,
    path_key,
    remote_changes,
    root_signature_valid,
    root_statement,
    sign_root,
)
from p2pfs.sync.versions import FileVersion, Ordering, VersionVector

DEVICE = bytes([7]) * 32
KEYS = FolderKeys.from_write_seed(bytes(range(32)))
OTHER = FolderKeys.from_write_seed(bytes(range(1, 33)))


def version(path: str, counter: int = 1, root: bytes = bytes(32)) -> FileVersion:
    vector = VersionVector.of({DEVICE: counter})
    return FileVersion(path, vector, False, ContentHash(root), 10, False, 5, DEVICE)


def test_read_only_keys_verify_but_cannot_sign() -> None:
    record = SignedRecord.sign(version("a.txt"), KEYS)
    read_only = KEYS.read_only()
    assert read_only.folder_id == KEYS.folder_id
    assert SignedRecord.decode_untrusted(record.encode(), read_only) == record
    with pytest.raises(LocalProtocolError):
        SignedRecord.sign(version("a.txt"), read_only)


def test_signatures_are_deterministic() -> None:
    assert SignedRecord.sign(version("x"), KEYS) == SignedRecord.sign(version("x"), KEYS)


@given(message=st.binary(max_size=300), seed=st.binary(min_size=32, max_size=32))
@settings(max_examples=50)
def test_folder_signatures_are_openssls_bytes_both_ways(message: bytes, seed: bytes) -> None:
    # Records are signed and checked with libsodium; members that signed with OpenSSL
    # (cryptography) before must still be checked, and check ours.
    keys = FolderKeys.from_write_seed(seed)
    derived = blake3.blake3(seed, derive_key_context=WRITE_KEY_CONTEXT).digest()
    openssl = Ed25519PrivateKey.from_private_bytes(derived)
    assert keys.write_public == openssl.public_key().public_bytes_raw()
    assert keys.sign(message) == openssl.sign(message)
    assert keys.verify(openssl.sign(message), message)
    openssl.public_key().verify(keys.sign(message), message)  # raises if not


def test_a_signature_of_the_wrong_length_or_altered_is_refused() -> None:
    signature = KEYS.sign(b"record")
    assert KEYS.verify(signature, b"record")
    assert not KEYS.verify(signature[:-1], b"record")
    assert not KEYS.verify(signature + b"\0", b"record")
    assert not KEYS.verify(signature, b"recorD")
    for position in (0, 31, 32, 63):  # R and S, each end
        altered = bytearray(signature)
        altered[position] ^= 0x01
        assert not KEYS.verify(bytes(altered), b"record")


def test_record_of_another_folder_is_refused() -> None:
    foreign = SignedRecord.sign(version("a.txt"), OTHER)
    with pytest.raises(RemoteProtocolError, match="signature"):
        SignedRecord.decode_untrusted(foreign.encode(), KEYS)


@settings(max_examples=300)
@given(st.data())
def test_every_byte_change_of_a_record_is_refused(data: st.DataObject) -> None:
    encoded = bytearray(SignedRecord.sign(version("dir/a.txt", 3), KEYS).encode())
    position = data.draw(st.integers(0, len(encoded) - 1))
    encoded[position] ^= data.draw(st.integers(1, 255))
    with pytest.raises(RemoteProtocolError):
        SignedRecord.decode_untrusted(bytes(encoded), KEYS)


@given(
    digest=st.binary(min_size=32, max_size=32),
    count=st.integers(0, 1 << 40),
    other_digest=st.binary(min_size=32, max_size=32),
    other_count=st.integers(0, 1 << 40),
)
def test_a_signed_index_root_verifies_only_for_its_folder_hash_and_count(
    digest: bytes, count: int, other_digest: bytes, other_count: int
) -> None:
    root = Child(ContentHash(digest), count)
    signature = sign_root(KEYS, root)
    assert root_signature_valid(KEYS, root, signature)
    assert root_signature_valid(KEYS.read_only(), root, signature)  # any member checks it
    assert not root_signature_valid(OTHER, root, signature)
    assert not root_signature_valid(KEYS, root, sign_root(OTHER, root))
    other = Child(ContentHash(other_digest), other_count)
    if other != root:
        assert not root_signature_valid(KEYS, other, signature)
    with pytest.raises(LocalProtocolError):
        sign_root(KEYS.read_only(), root)  # only the write key signs


def test_root_and_record_signatures_cannot_stand_for_each_other() -> None:
    """Distinct domains: no record's signed message is a root statement, nor the reverse."""
    record = SignedRecord.sign(version("a.txt"), KEYS)
    statement = root_statement(KEYS.folder_id, Child(record.hash, 1))
    assert not statement.startswith(records.SIGNATURE_DOMAIN)
    assert not (records.SIGNATURE_DOMAIN + KEYS.folder_id).startswith(records.ROOT_SIGNATURE_DOMAIN)
    assert not root_signature_valid(KEYS, Child(record.hash, 1), record.signature)
    forged = records.msgpack.packb(
        [record.version.encode(), sign_root(KEYS, Child(record.hash, 1))], use_bin_type=True
    )
    with pytest.raises(RemoteProtocolError, match="signature does not verify"):
        SignedRecord.decode_untrusted(forged, KEYS)


def test_a_vouched_record_is_parsed_without_its_own_signature_but_every_other_check() -> None:
    """Under a signed root (the caller matched the record to its leaf) the record's own
    signature is not checked; its form still is."""
    foreign = SignedRecord.sign(version("a.txt"), OTHER).encode()
    assert SignedRecord.decode_untrusted(foreign, KEYS, vouched=True).version == version("a.txt")
    with pytest.raises(RemoteProtocolError, match="signature does not verify"):
        SignedRecord.decode_untrusted(foreign, KEYS)
    encoded_version, signature = records.msgpack.unpackb(foreign, raw=False)
    not_canonical = records.msgpack.packb([encoded_version, signature], use_bin_type=False)
    with pytest.raises(RemoteProtocolError):
        SignedRecord.decode_untrusted(not_canonical, KEYS, vouched=True)
    with pytest.raises(RemoteProtocolError, match="signature length"):
        SignedRecord.decode_untrusted(
            records.msgpack.packb([encoded_version, signature[:-1]], use_bin_type=True),
            KEYS,
            vouched=True,
        )


@given(st.binary(max_size=400))
def test_junk_is_refused_with_one_error_type(junk: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        SignedRecord.decode_untrusted(junk, KEYS)


def test_membership_proof_binds_role_nonces_and_nodes() -> None:
    a, b, n1, n2 = (bytes([i]) * 32 for i in range(4))
    proof = KEYS.membership_proof("server", n1, n2, a, b)
    assert KEYS.check_proof(proof, "server", n1, n2, a, b)
    assert not KEYS.check_proof(proof, "client", n1, n2, a, b)
    assert not KEYS.check_proof(proof, "server", n2, n1, a, b)
    assert not KEYS.check_proof(proof, "server", n1, n2, b, a)
    assert not OTHER.check_proof(proof, "server", n1, n2, a, b)
    assert KEYS.read_only().check_proof(proof, "server", n1, n2, a, b)


def test_ids_and_discovery_key_differ_from_secrets() -> None:
    values = {KEYS.folder_id, KEYS.discovery_key, KEYS.read_key, KEYS.write_public}
    assert len(values) == 4
    assert KEYS.write_seed not in values


paths = st.lists(
    st.text(alphabet="abcdefgh/", min_size=1, max_size=12).filter(
        lambda p: all(part for part in p.split("/"))
    ),
    unique=True,
    max_size=300,
)


def leaves_of(names: list[str], counter: int = 1) -> dict[str, IndexLeaf]:
    return {name: index_leaf(SignedRecord.sign(version(name, counter), KEYS)) for name in names}


@settings(max_examples=30, deadline=None)
@given(paths, st.randoms(use_true_random=False))
def test_index_root_is_independent_of_insertion_order(names: list[str], rng: random.Random) -> None:
    leaves = list(leaves_of(names).values())
    shuffled = leaves[:]
    rng.shuffle(shuffled)
    root = build_index(leaves)
    assert root == build_index(shuffled)
    assert root.size == len(leaves)
    if not leaves:
        assert root == EMPTY_INDEX


@settings(max_examples=20, deadline=None)
@given(paths, st.data())
def test_diff_names_exactly_the_changed_records(names: list[str], data: st.DataObject) -> None:
    local = leaves_of(names)
    changed = data.draw(st.lists(st.sampled_from(names), unique=True) if names else st.just([]))
    remote = dict(local)
    remote.update(leaves_of(changed, counter=2))
    remote.update(leaves_of(["new-file"]) if "new-file" not in remote else {})
    local_nodes: dict[ContentHash, bytes] = {}
    remote_nodes: dict[ContentHash, bytes] = {}
    local_root = build_index(local.values(), lambda h, e, _n: local_nodes.__setitem__(h, e))
    remote_root = build_index(remote.values(), lambda h, e, _n: remote_nodes.__setitem__(h, e))

    def fetch(hashes: list[ContentHash]) -> list[bytes]:
        return [remote_nodes[h] for h in hashes]

    changes = remote_changes(local_root, local_nodes.__getitem__, remote_root, fetch)
    expected = {leaf for name, leaf in remote.items() if local.get(name) != leaf}
    assert set(changes) == expected
    assert set(remote_changes(EMPTY_INDEX, {}.__getitem__, remote_root, fetch)) == set(
        remote.values()
    )
    assert not remote_changes(remote_root, remote_nodes.__getitem__, EMPTY_INDEX, fetch)
    walked = [leaf for _o, leaf in iter_leaves(INDEX_TREE, remote_root, remote_nodes.__getitem__)]
    assert walked == sorted(remote.values())
    assert all(leaf.path_key == path_key(name) for name, leaf in remote.items())


def disk_file(path: str, root: bytes, executable: bool = False) -> DiskFile:
    return DiskFile(path, ContentHash(root), 4, executable, 99)


def test_a_whole_remote_index_is_walked_a_few_nodes_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A join's walk asks for at most NODES_PER_ASK nodes at once and packs the leaves
    in key order, the same as the tree's own leaves."""
    monkeypatch.setattr(records, "NODES_PER_ASK", 5)
    rng = random.Random(3)
    leaves = [IndexLeaf(rng.randbytes(32), ContentHash(rng.randbytes(32))) for _ in range(3000)]
    nodes: dict[ContentHash, bytes] = {}
    root = build_index(leaves, lambda h, e, _n: nodes.__setitem__(h, e))
    asks: list[int] = []

    def fetch(hashes: list[ContentHash]) -> list[bytes]:
        asks.append(len(hashes))
        return [nodes[h] for h in hashes]

    walked = remote_changes(EMPTY_INDEX, {}.__getitem__, root, fetch)
    assert list(walked) == sorted(leaves)
    assert max(asks) == 5 and sum(asks) == len(nodes)


def test_queued_leaves_are_taken_from_the_end(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(records, "QUEUE_CHUNK", 128)
    leaves = sorted(IndexLeaf(path_key(f"f{i}"), _leaf_hash(b"%d" % i)) for i in range(1000))
    queue = LeafQueue()
    for leaf in leaves:
        queue.append(leaf)
    assert len(queue) == 1000 and list(queue) == leaves
    taken = [queue.pop(300) for _ in range(4)]
    assert taken[0] == leaves[700:] and taken[3] == leaves[:100]
    assert [leaf for batch in reversed(taken) for leaf in batch] == leaves
    assert len(queue) == 0 and queue.pop(5) == []


def test_local_changes_cover_new_edited_chmod_deleted_and_untouched() -> None:
    me = bytes([9]) * 32
    records = {
        "same": version("same", root=bytes([1]) * 32),
        "edited": version("edited", root=bytes([1]) * 32),
        "chmod": version("chmod", root=bytes([1]) * 32),
        "gone": version("gone", root=bytes([1]) * 32),
        "ignored": version("ignored", root=bytes([1]) * 32),
        "dead": FileVersion.tombstone("dead", VersionVector.of({DEVICE: 2}), 1, DEVICE),
    }
    disk = {
        "same": disk_file("same", bytes([1]) * 32),
        "edited": disk_file("edited", bytes([2]) * 32),
        "chmod": disk_file("chmod", bytes([1]) * 32, executable=True),
        "new": disk_file("new", bytes([3]) * 32),
    }
    changes = {
        change.path: change
        for change in local_changes(records, disk, me, 1234, lambda path: path == "ignored")
    }
    assert set(changes) == {"edited", "chmod", "gone", "new"}
    assert changes["gone"].deleted and changes["gone"].mtime_ns == 1234
    for path in ("edited", "chmod", "gone"):
        assert changes[path].version.compare(records[path].version) is Ordering.AFTER
        assert changes[path].modified_by == me
    assert changes["new"].version == VersionVector.of({me: 1})
    assert changes["edited"].root == bytes([2]) * 32
    # A full scan passes only the files that may differ, and every path it found apart
    # (``present``): the same changes, "same" no longer needing a DiskFile.
    differing = {path: found for path, found in disk.items() if path != "same"}
    lean = local_changes(
        records, differing, me, 1234, lambda path: path == "ignored", present=set(disk)
    )
    assert {change.path: change for change in lean} == changes


@given(st.lists(st.text(alphabet="aAbB/", min_size=1, max_size=6), max_size=12), st.data())
def test_case_collisions_leave_one_path_per_folded_name(
    incoming: list[str], data: st.DataObject
) -> None:
    drawn = data.draw(st.lists(st.text(alphabet="aAbB/", min_size=1, max_size=6), max_size=6))
    existing: list[str] = []  # a real disk: no two names (of files or directories) fold alike
    for path in drawn:
        if one_name_per_folded_name([*existing, path]):
            existing.append(path)
    collisions = case_collisions(existing, incoming)
    placed = [path for path in incoming if path not in collisions]
    assert one_name_per_folded_name([*existing, *placed])
    for path, holder in collisions.items():
        # The holder is the path or one of its directories, but for case.
        parts = path.split("/")
        ours = {"/".join(parts[:end]) for end in range(1, len(parts) + 1)}
        assert holder not in ours
        assert holder.casefold() in {prefix.casefold() for prefix in ours}


def one_name_per_folded_name(paths: list[str]) -> bool:
    """Whether every path and directory above it differs from any other but for case."""
    names: dict[str, str] = {}
    for path in paths:
        parts = path.split("/")
        for end in range(1, len(parts) + 1):
            prefix = "/".join(parts[:end])
            if names.setdefault(prefix.casefold(), prefix) != prefix:
                return False
    return True


def test_case_collision_example() -> None:
    assert case_collisions(["Docs/Read.me"], ["docs/read.me", "Docs/Read.me", "x"]) == {
        "docs/read.me": "Docs/Read.me"
    }
    # A directory differing only by case is one directory there: the file would land in it.
    assert case_collisions(["Docs/a"], ["docs/b", "Docs/c", "docsx/d"]) == {"docs/b": "Docs"}
    assert case_collisions([], ["Src/x", "src/y", "src"]) == {"src": "Src", "src/y": "Src"}


def test_a_file_found_where_content_was_never_held_is_concurrent_not_newer() -> None:
    me, other = bytes([9]) * 32, bytes([8]) * 32
    remote = FileVersion(
        "x.bak",
        VersionVector.of({other: 4, me: 1}),
        False,
        ContentHash(bytes(32)),
        4,
        False,
        1,
        other,
    )
    records = {"x.bak": remote, "gone.bak": replace(remote, path="gone.bak")}
    disk = {"x.bak": disk_file("x.bak", bytes([5]) * 32)}
    changes = local_changes(records, disk, me, 7, lambda _p: False, absent={"x.bak", "gone.bak"})
    assert [change.path for change in changes] == ["x.bak"]  # and no tombstone for gone.bak
    assert changes[0].version.compare(remote.version) is Ordering.CONCURRENT


def _leaf_hash(label: bytes) -> ContentHash:
    return ContentHash(blake3.blake3(label).digest())


_EDITS = st.lists(
    st.lists(
        st.tuples(st.integers(0, 400), st.one_of(st.none(), st.binary(min_size=1, max_size=4))),
        min_size=1,
        max_size=12,
    ),
    max_size=25,
)


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 600), _EDITS, st.booleans())
def test_index_tree_updated_in_place_equals_a_fresh_build(
    start: int, batches: list[list[tuple[int, bytes | None]]], on_copies: bool
) -> None:
    """After any sequence of edits, inserts and removals, the tree updated along the changed
    keys has the root and the nodes a fresh build has (each served by ``node``), and each
    update retires exactly the nodes that left, with their encodings. Updated on copies,
    the tree before stays as it was."""
    leaves = {path_key(f"f{i}"): _leaf_hash(b"v0 %d" % i) for i in range(start)}
    tree = IndexTree(IndexLeaf(k, v) for k, v in leaves.items())
    nodes = tree.nodes()
    for batch in batches:
        changes: dict[bytes, ContentHash | None] = {
            path_key(f"f{number}"): None if value is None else _leaf_hash(value)
            for number, value in batch
        }
        before = tree
        if on_copies:
            tree, delta = tree.updated(changes)
        else:
            delta = tree.update(changes)
        for key, digest in changes.items():
            if digest is None:
                leaves.pop(key, None)
            else:
                leaves[key] = digest
        ordered = sorted(IndexLeaf(k, v) for k, v in leaves.items())
        fresh = build_tree(INDEX_TREE, ordered)[1] if ordered else {}
        assert tree.root == build_index(ordered)
        assert tree.nodes() == fresh and tree.node_count == len(fresh)
        assert all(tree.node(h) == encoded for h, encoded in fresh.items())
        assert delta.retired == {h: e for h, e in nodes.items() if h not in fresh}
        assert set(fresh) - set(nodes) <= delta.made <= set(fresh)
        if on_copies:
            assert all(before.node(h) == encoded for h, encoded in nodes.items())
        nodes = fresh


def test_a_tree_built_from_packed_leaves_serves_every_node_of_a_fresh_build() -> None:
    leaves = sorted(IndexLeaf(path_key(f"f{i}"), _leaf_hash(b"%d" % i)) for i in range(5000))
    tree = IndexTree.from_packed(PackedLeaves(leaves))
    root, expected = build_tree(INDEX_TREE, leaves)
    assert tree.root == root == build_index(leaves)
    assert tree.nodes() == expected
    assert all(tree.node(h) == encoded for h, encoded in expected.items())
    assert tree.node(ContentHash(bytes(32))) is None


def test_one_edit_of_a_big_index_touches_only_its_path() -> None:
    """The work of one change is the nodes along its path, not the records: one edit among
    20,000 makes one node per level (about 4) and drops as many."""
    keys = [path_key(f"d/f{i}") for i in range(20_000)]
    tree = IndexTree(IndexLeaf(k, _leaf_hash(k)) for k in keys)
    height = len(tree._levels)
    delta = tree.update({keys[1234]: _leaf_hash(b"edited")})
    assert 1 <= len(delta.made) <= 2 * height
    assert len(delta.retired) == len(delta.made)
    assert tree.root == build_index(IndexLeaf(k, v) for k, v in tree.leaves.items())
