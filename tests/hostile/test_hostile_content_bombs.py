"""Tree bombs (issue 12, item 3): a few nodes whose children repeat must be refused
(RemoteProtocolError, the peer's fault) before the walk allocates what they expand to.

Bounds checked: the peak RSS of this process grows by at most 64 MiB while each bomb is
refused; an honest tree of the same kind still walks.
"""

from __future__ import annotations

import os
import resource

import blake3
import msgpack
import pytest
import trio

from p2pfs.content.chunking import DEFAULT_CHUNKER, ChunkRef, chunk_id
from p2pfs.content.folder import (
    DIR_TREE,
    FILE_TREE,
    DirEntry,
    EntryKind,
    default_manifest,
    file_tree,
    share_bound,
)
from p2pfs.content.tree import Child, build_tree, iter_leaves
from p2pfs.daemon.treewalk import TreeJob, walk_trees
from p2pfs.errors import RemoteProtocolError
from p2pfs.ids import ContentHash
from p2pfs.sync.records import (
    EMPTY_INDEX,
    INDEX_TREE,
    MAX_FOLDER_RECORDS,
    IndexLeaf,
    build_index,
    remote_changes,
)

RSS_GROWTH_LIMIT = 64 << 20


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _node(schema_context: str, height: int, items: list[object]) -> tuple[ContentHash, bytes]:
    encoded = msgpack.packb([height, items], use_bin_type=True)
    return ContentHash(blake3.blake3(encoded, derive_key_context=schema_context).digest()), encoded


def _repeat_tower(context: str, leaf_items: list[object], leaf_size: int, levels: int):
    """A leaf node, then ``levels`` branch nodes each naming the one below 64 times."""
    nodes: dict[ContentHash, bytes] = {}
    node_hash, encoded = _node(context, 1, leaf_items)
    nodes[node_hash] = encoded
    size = leaf_size
    for height in range(2, levels + 2):
        node_hash, encoded = _node(context, height, [[node_hash, size]] * 64)
        nodes[node_hash] = encoded
        size *= 64
    return Child(node_hash, size), nodes


def _walk(jobs: list[TreeJob], nodes: dict[ContentHash, bytes]) -> None:
    async def fetch(hashes: list[ContentHash]) -> list[bytes]:
        return [nodes[h] for h in hashes]

    trio.run(walk_trees, jobs, fetch)


def test_file_tree_bomb_of_four_nodes_is_refused_early() -> None:
    one = b"x"
    ref = [1, chunk_id(one)]
    root, nodes = _repeat_tower(FILE_TREE.context, [ref] * 64, 64, 3)  # 64^4 = 16.7 M leaves
    assert len(nodes) == 4 and root.size == 64**4
    # With the chunker's minimum (16 KiB): at most ceil(S / 16 KiB) + 1 = 1,025 leaves.
    before = _peak_rss()
    schema = file_tree(DEFAULT_CHUNKER)
    with pytest.raises(RemoteProtocolError, match="leaves"):
        _walk([TreeJob(schema, root)], nodes)
    with pytest.raises(RemoteProtocolError, match="leaves"):
        list(iter_leaves(schema, root, nodes.__getitem__))
    assert _peak_rss() - before <= RSS_GROWTH_LIMIT
    # FILE_TREE alone knows only the smallest minimum a manifest may name (64 bytes): the
    # bomb is still refused, after at most S / 64 + 1 = 262,145 queued subtrees.
    with pytest.raises(RemoteProtocolError, match="leaves"):
        _walk([TreeJob(FILE_TREE, root)], nodes)


def test_honest_file_trees_still_walk_repeated_chunks_included() -> None:
    # A file of identical chunks repeats nodes legitimately: within its size bound.
    chunk = bytes(DEFAULT_CHUNKER.min_size)
    refs = [ChunkRef(chunk_id(chunk), len(chunk))] * 5000
    root, nodes = build_tree(FILE_TREE, refs)
    job = TreeJob(file_tree(DEFAULT_CHUNKER), root)
    _walk([job], nodes)
    assert len(job.leaves) == 5000


def _dir_bomb(fanout: int, depth: int) -> tuple[Child, dict[ContentHash, bytes]]:
    """``depth`` directory nodes, each with ``fanout`` subdirectories all naming the next."""
    nodes: dict[ContentHash, bytes] = {}
    below: Child | None = None
    for _level in range(depth):
        entries = []
        for i in range(fanout):
            name = f"d{i:03d}"
            if below is None:
                entries.append(DirEntry(name, EntryKind.FILE, 0, 0, chunk_id(b"")))
            else:
                entries.append(DirEntry(name, EntryKind.DIRECTORY, 0, below.size, below.hash))
        below, built = build_tree(DIR_TREE, entries)
        nodes.update(built)
    assert below is not None
    return below, nodes


def test_directory_bomb_is_held_to_the_manifests_counts() -> None:
    """The reported bomb: 4 directory nodes that expand to 8,420 directories."""
    top, nodes = _dir_bomb(20, 4)
    manifest = default_manifest("share", top, file_count=20, directory_count=20, single_file=False)
    bound = share_bound(manifest)
    made = 0
    level = [TreeJob(DIR_TREE, manifest.tree, bound=bound)]
    with pytest.raises(RemoteProtocolError, match="leaves"):
        while level:  # the fetcher's level-by-level walk, one shared bound
            _walk(level, nodes)
            next_level = []
            for job in level:
                for _offset, entry in job.leaves:
                    if entry.kind is EntryKind.DIRECTORY:
                        made += 1
                        next_level.append(TreeJob(DIR_TREE, entry.root, bound=bound))
            level = next_level
    assert made <= manifest.directory_count


def test_a_directory_node_twice_in_one_tree_is_refused() -> None:
    entries = [[f"n{i:02d}", int(EntryKind.FILE), 0, 1, bytes(chunk_id(b"a"))] for i in range(4)]
    leaf_hash, leaf = _node(DIR_TREE.context, 1, entries)
    root_hash, root = _node(DIR_TREE.context, 2, [[leaf_hash, 4], [leaf_hash, 4]])
    nodes = {leaf_hash: leaf, root_hash: root}
    with pytest.raises(RemoteProtocolError):
        _walk([TreeJob(DIR_TREE, Child(root_hash, 8))], nodes)


def _index_bomb() -> tuple[Child, dict[ContentHash, bytes]]:
    keys = sorted(os.urandom(32) for _ in range(64))
    items = [[key, bytes(32)] for key in keys]
    return _repeat_tower(INDEX_TREE.context, items, 64, 3)


def test_folder_index_bomb_is_refused_in_both_walks() -> None:
    root, nodes = _index_bomb()
    assert len(nodes) == 4 and root.size == 64**4 and root.size > MAX_FOLDER_RECORDS // 64

    def remote(hashes: object) -> list[bytes]:
        return [nodes[h] for h in hashes]  # type: ignore[attr-defined]

    before = _peak_rss()
    with pytest.raises(RemoteProtocolError):
        remote_changes(EMPTY_INDEX, lambda h: b"", root, remote)
    own_nodes: dict[ContentHash, bytes] = {}
    own_root = build_index(
        [IndexLeaf(os.urandom(32), ContentHash(bytes(32))) for _ in range(300)],
        lambda h, e, _n: own_nodes.__setitem__(h, e),
    )
    with pytest.raises(RemoteProtocolError):
        remote_changes(own_root, own_nodes.__getitem__, root, remote)
    # Claiming more records than any folder may hold is refused before any request.
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        remote_changes(own_root, own_nodes.__getitem__, Child(root.hash, 64**5), remote)
    assert _peak_rss() - before <= RSS_GROWTH_LIMIT
    # Honest: a remote index of the same size class as ours diffs fine.
    theirs: dict[ContentHash, bytes] = dict(own_nodes)
    their_root = build_index(
        [IndexLeaf(os.urandom(32), ContentHash(bytes(32))) for _ in range(500)],
        lambda h, e, _n: theirs.__setitem__(h, e),
    )
    found = remote_changes(
        own_root, own_nodes.__getitem__, their_root, lambda hs: [theirs[h] for h in hs]
    )
    assert len(found) == 500
