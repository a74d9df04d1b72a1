from __future__ import annotations

import copy
import random
from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfs.content.chunking import Chunker
from p2pfs.content.diff import ChangeKind, DiffStats, diff_folders, diff_trees
from p2pfs.content.folder import FILE_TREE
from p2pfs.content.tree import build_tree
from p2pfs.errors import IntegrityError
from p2pfs.ids import ContentHash
from tests.helpers_content import build_folder, random_bytes, random_chunk_refs


def remote_of(nodes: dict[ContentHash, bytes]):  # type: ignore[no-untyped-def]
    def fetch(hashes: Sequence[ContentHash]) -> list[bytes]:
        return [nodes[h] for h in hashes]

    return fetch


def tree_height(root_hash: ContentHash, nodes: dict[ContentHash, bytes]) -> int:
    return FILE_TREE.decode_untrusted(nodes[root_hash]).height


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32), count=st.integers(0, 3000), edits=st.integers(0, 6))
def test_leaf_diff_is_the_exact_multiset_difference(seed: int, count: int, edits: int) -> None:
    rng = random.Random(seed)
    local = random_chunk_refs(seed, count)
    remote = list(local)
    fresh = iter(random_chunk_refs(seed + 1, edits * 2))
    for _ in range(edits):
        action = rng.choice(["insert", "delete", "replace", "duplicate"])
        position = rng.randint(0, len(remote))
        if action == "insert" or not remote:
            remote.insert(position, next(fresh))
        elif action == "delete":
            del remote[min(position, len(remote) - 1)]
        elif action == "replace":
            remote[min(position, len(remote) - 1)] = next(fresh)
        else:
            remote.insert(position, rng.choice(remote))
    local_root, local_nodes = build_tree(FILE_TREE, local)
    remote_root, remote_nodes = build_tree(FILE_TREE, remote)
    diff = diff_trees(
        FILE_TREE, local_root, local_nodes.__getitem__, remote_root, remote_of(remote_nodes)
    )
    assert Counter(leaf for _, leaf in diff.remote_only) == Counter(remote) - Counter(local)
    assert Counter(leaf for _, leaf in diff.local_only) == Counter(local) - Counter(remote)
    offsets = {}
    position = 0
    for leaf in remote:
        offsets.setdefault(leaf, set()).add(position)
        position += leaf.length
    for offset, leaf in diff.remote_only:
        assert offset in offsets[leaf]


@pytest.mark.parametrize("edits", [1, 4, 16])
def test_descent_touches_o_changes_times_depth_nodes(edits: int) -> None:
    leaves = random_chunk_refs(21, 50_000)
    local_root, local_nodes = build_tree(FILE_TREE, leaves)
    rng = random.Random(edits)
    remote = list(leaves)
    for new in random_chunk_refs(99, edits):
        remote.insert(rng.randint(0, len(remote)), new)
    remote_root, remote_nodes = build_tree(FILE_TREE, remote)
    stats = DiffStats()
    diff_trees(
        FILE_TREE, local_root, local_nodes.__getitem__, remote_root, remote_of(remote_nodes), stats
    )
    depth = tree_height(remote_root.hash, remote_nodes)
    total = len(remote_nodes)
    # An insertion reshapes its path and, rarely, a neighbour per level.
    assert stats.remote_nodes <= 2 * edits * depth + 2
    assert stats.remote_batches <= depth
    assert stats.remote_nodes < total / 10


def test_diff_of_an_insertion_in_a_file_is_one_small_range() -> None:
    data = random_bytes(31, 16 << 20)
    middle = len(data) // 2
    edited = data[:middle] + b"x" * 100 + data[middle:]
    chunker = Chunker()
    tree = {"big.bin": data, "other": b"same"}
    local_nodes: dict[ContentHash, bytes] = {}
    remote_nodes: dict[ContentHash, bytes] = {}
    local_root = build_folder(tree, local_nodes, chunker)
    remote_root = build_folder({**tree, "big.bin": edited}, remote_nodes, chunker)
    changes = diff_folders(
        local_root, local_nodes.__getitem__, remote_root, remote_of(remote_nodes)
    )
    assert [(c.path, c.kind) for c in changes] == [("big.bin", ChangeKind.MODIFIED)]
    (change,) = changes
    changed_bytes = sum(r.end - r.start for r in change.ranges)
    assert 0 < changed_bytes <= 2 * chunker.params.max_size
    edited_chunks = {}
    offset = 0
    for ref in chunker.chunk_refs(edited):
        edited_chunks[offset] = ref
        offset += ref.length
    for chunk_range in change.ranges:
        offset = chunk_range.start
        for chunk in chunk_range.chunks:
            assert edited_chunks[offset] == chunk
            offset += chunk.length
        assert offset == chunk_range.end


def _mutate(tree: dict[str, object], rng: random.Random, counter: list[int]) -> None:
    """One random edit somewhere in a nested-dict folder."""
    directory = tree
    while True:
        subdirs = [v for v in directory.values() if isinstance(v, dict)]
        if not subdirs or rng.random() < 0.4:
            break
        directory = rng.choice(subdirs)
    counter[0] += 1
    action = rng.choice(["add_file", "add_dir", "remove", "modify", "chmod", "replace"])
    names = sorted(directory)
    if action == "add_file" or not names:
        directory[f"f{counter[0]}"] = random_bytes(counter[0], rng.randint(0, 5000))
    elif action == "add_dir":
        directory[f"d{counter[0]}"] = {"inner": b"x"}
    else:
        name = rng.choice(names)
        value = directory[name]
        if action == "remove":
            del directory[name]
        elif action == "replace":
            directory[name] = {} if not isinstance(value, dict) else b"now a file"
        elif isinstance(value, bytes):
            directory[name] = (value, True) if action == "chmod" else value + b"!"
        elif isinstance(value, tuple):
            directory[name] = value[0]


def _flatten(tree: dict[str, object], prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for name, value in tree.items():
        path = f"{prefix}{name}"
        flat[path] = "dir" if isinstance(value, dict) else value
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{path}/"))
    return flat


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32), edits=st.integers(0, 5))
def test_folder_diff_reports_exactly_the_changed_paths(seed: int, edits: int) -> None:
    rng = random.Random(seed)
    local: dict[str, object] = {
        f"dir{i}": {f"file{j}": random_bytes(i * 100 + j, 200) for j in range(rng.randint(0, 4))}
        for i in range(rng.randint(1, 5))
    }
    local["top"] = b"top"
    remote = copy.deepcopy(local)
    counter = [0]
    for _ in range(edits):
        _mutate(remote, rng, counter)
    chunker = Chunker()
    local_nodes: dict[ContentHash, bytes] = {}
    remote_nodes: dict[ContentHash, bytes] = {}
    local_root = build_folder(local, local_nodes, chunker)
    remote_root = build_folder(remote, remote_nodes, chunker)
    changes = diff_folders(
        local_root, local_nodes.__getitem__, remote_root, remote_of(remote_nodes)
    )
    flat_local, flat_remote = _flatten(local), _flatten(remote)
    reported = {change.path: change.kind for change in changes}
    whole = {p for p, k in reported.items() if k is not ChangeKind.MODIFIED}
    for path in flat_local.keys() | flat_remote.keys():
        if any(path.startswith(f"{ancestor}/") for ancestor in whole):
            continue  # inside an added, removed or replaced directory
        before, after = flat_local.get(path), flat_remote.get(path)
        if before == after:  # equal files, or a directory (its changes are listed inside)
            assert path not in reported
        elif before is None:
            assert reported[path] is ChangeKind.ADDED
        elif after is None:
            assert reported[path] is ChangeKind.REMOVED
        elif (before == "dir") != (after == "dir"):
            assert reported[path] is ChangeKind.REPLACED
        else:
            assert reported[path] is ChangeKind.MODIFIED


def test_forged_remote_node_is_rejected() -> None:
    local_root, local_nodes = build_tree(FILE_TREE, random_chunk_refs(1, 500))
    remote_root, remote_nodes = build_tree(FILE_TREE, random_chunk_refs(2, 500))
    forged = {h: local_nodes[local_root.hash] for h in remote_nodes}
    with pytest.raises(IntegrityError):
        diff_trees(FILE_TREE, local_root, local_nodes.__getitem__, remote_root, remote_of(forged))
