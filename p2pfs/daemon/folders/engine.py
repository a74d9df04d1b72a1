"""One sync folder in the daemon: its records and index tree, local change detection, and
reconciling with a member (diff of index trees, plan, apply).

Every step that reads or changes the folder's records holds the folder's lock, so a scan
never interleaves with an apply and each reconcile plans against records that are current.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Container,
    ItemsView,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import asdict, dataclass, field

import trio

from p2pfs.content.tree import Child
from p2pfs.errors import LocalProtocolError, P2pfsError, RemoteProtocolError, StorageError
from p2pfs.ids import ContentHash, NodeId
from p2pfs.net import PeerConnection
from p2pfs.store import folderdisk, partscan
from p2pfs.store.folders import FolderRow, FolderStore
from p2pfs.store.index import IndexStore
from p2pfs.store.leftovers import LEFTOVER_KEEP, remove_stale
from p2pfs.store.partscan import PartScan
from p2pfs.store.scanner import Problem, ScanStats
from p2pfs.sync.ignore import IGNORE_FILE, IgnoreRules
from p2pfs.sync.keys import FolderKeys
from p2pfs.sync.local import DiskFile, directory_entry, iter_local_changes
from p2pfs.sync.planner import conflict_device, conflict_original
from p2pfs.sync.reconcile import Holdings, missing_content, plan_read_only, plan_read_write
from p2pfs.sync.records import (
    EMPTY_INDEX,
    IndexLeaf,
    IndexTree,
    LeafQueue,
    PackedLeaves,
    SignedRecord,
    remote_changes,
    sign_root,
)
from p2pfs.sync.recordset import KnownVersions, RecordSet
from p2pfs.sync.versions import (
    DIRECTORY_ROOT,
    FileVersion,
    short_device,
)
from p2pfs.wire.messages import FolderMember, FolderNeed

from ..allocator import release_free_memory
from ..storage import AsyncIndex, in_thread
from . import steps
from .client import FolderLink, Helper
from .need import NeedTracker, is_file
from .placing import DiskView, Placer, Planned
from .underway import PlacingChunks
from .work import FolderWork

logger = logging.getLogger(__name__)

VERIFY_THREADS = 2
VERIFY_SPLIT_MIN = 256
KEPT_TREES = 3
RECORD_BATCH = 4096
"""Local changes signed and stored per batch (a first scan records every file)."""
DIFFERING_HELD = 16384
"""Files a full scan finds differing from their records that are kept at most; beyond (a
first scan: every file), they are read again from the scan index in batches while they
are recorded (a DiskFile held per file cost ~0.3 KiB a file at once)."""
JOIN_BATCH = 4096
"""A member's differing records fetched, verified, planned and applied per batch: a join
holds one batch decoded and planned at a time (~2 KiB a record), with the next one fetched
beside it, not every record (8,192: 18 MiB more at B's peak in a 20k-file join, no faster)."""
FIRST_BATCH_SHARE = 8
"""A reconcile of several batches starts with one this many times smaller (512 of 4,096):
nothing is placed until the first batch is fetched and checked, while each later one is
fetched beside the apply of the one before. 50k join: first file placed 1.0 s after the
link instead of 3.2 s, the join 21.2 / 21.6 s instead of 22.1 / 22.7 s."""
SIGN_IN_THREAD = 64
"""Local changes signed on the event loop at most (~60 us each); more go to a thread."""
HELD_CHANGES = 16384
"""Leaf changes held for the tree's update at the end of a join or first scan (~0.2 KiB
each); beyond, the tree is built from the store's leaves then (64 bytes a record)."""
TREE_UPDATE_IN_THREAD = 256
"""Index-tree updates of more records than this run in a worker thread (a big batch, or a
first load, rebuilds the tree: ~1.7 s for 200,000 records); one edit costs ~0.3 ms."""
MEMBER_EXPIRY = 30 * 24 * 3600.0
"""A member not met for this long is forgotten (it left, or moved and will be found again)."""
MAX_MEMBERS = 256
"""Members dialled at most (the most recently met)."""
PEER_SEEN_REFRESH = 24 * 3600.0
"""Index trees kept servable after they are replaced: a peer may be mid-diff against one."""
GONE_PAGE = 512
"""Record paths checked against the scan index per read when a full scan looks for the
records whose files are gone."""
MAX_NOTED_PATHS = 1 << 20
"""Changed paths kept for the next (partial) rescan, about 100 MiB at most; beyond, a
full rescan."""


UNDELETED = "a member deleted it, but it holds files here not synced (new, or ignored here)"


def join_batch_sizes(total: int, batch: int, first: int) -> list[int]:
    """How many of ``total`` differing records each batch of a reconcile takes: at most
    ``batch``, the first at most ``first`` when there is more than one batch (the first
    file is placed sooner); one empty batch when there are none."""
    if total <= batch:
        return [total]
    head = min(first, batch)
    sizes = [head]
    left = total - head
    while left > 0:
        sizes.append(min(batch, left))
        left -= sizes[-1]
    return sizes


def _sign_all(keys: FolderKeys, versions: list[FileVersion]) -> list[SignedRecord]:
    return [SignedRecord.sign(version, keys) for version in versions]


def _scanned(stats: ScanStats) -> int:
    return stats.files_hashed + stats.files_reused + stats.files_renamed


class FolderSync:
    _root_signed: tuple[Child, bytes] | None = None
    """The last index root signed for FolderRoot, and its signature (one per change)."""
    _share_root: ContentHash | None
    _share_id: int | None
    """The root and index id of the folder's last scan (the id stays across rescans)."""

    def __init__(
        self,
        row: FolderRow,
        index: AsyncIndex,
        store: FolderStore,
        on_member: Callable[[FolderSync, PeerConnection], None],
    ) -> None:
        self.row = row
        # _real_path: the folder as the scan index names its share
        self.path, self._real_path = row.local_path, os.path.realpath(row.local_path)
        self.keys = (
            FolderKeys.from_write_seed(row.write_seed)
            if row.write_seed is not None
            else FolderKeys(row.read_key, row.write_public)
        )
        self.folder_id = self.keys.folder_id
        self.device = row.device
        """This membership's device id: a re-join (or a lost index) makes a new one, so
        files found on disk then are concurrent with the folder's records, never older."""
        self._index = index
        self._store = store
        self._on_member = on_member
        self._ignore_file = folderdisk.IgnoreFile(self.path)
        self.ignore = IgnoreRules()
        """The folder's ignore rules as of the last scan."""
        # Every record of the folder, read from its SQLite store (none held in memory).
        self.records = RecordSet(store.record_source(row.id))
        self._tree = IndexTree()
        """The index tree, updated along the changed paths (never rebuilt per change)."""
        self._retired: list[tuple[Child, Callable[[ContentHash], bytes | None]]] = []
        """The roots before the last KEPT_TREES - 1 updates, newest first, each with the
        nodes its update removed (by hash): those trees stay servable for members mid-diff."""
        self._root: Child = EMPTY_INDEX
        self._changed = trio.Event()
        self._held: _HeldChanges | None = None
        # The files' states as scanned or placed are read from the scan index when asked
        # (a state per file held here cost ~0.34 KiB a file).
        self.disk = DiskView(self._scanned)
        self._share_root, self._share_id = None, None
        self.absent: set[str] = set()
        """Live records whose content this node does not hold (stored while ignored here):
        their absence is not a delete, and they are fetched once no longer ignored."""
        self.unrecorded: set[str] = set()
        """On a read-only member: local changes that are reported, never propagated."""
        self.problems: list[str] = []
        self.peers: dict[bytes, tuple[str, int]] = {}
        self._peer_seen: dict[bytes, int] = {}
        self.case_insensitive = False
        """Names that differ only by case are one file here (probed at load)."""
        self.collisions: dict[str, str] = {}
        """Paths not placed because they collide with another on this file system."""
        # unplaced: paths whose file could not be placed (a directory in its way, a disk
        # error), path -> why; each fails alone, listed in `sync list` until placed.
        # undeleted: directories a member deleted that are not empty here (files not
        # synced yet, or ignored here), path -> why; their deletes are not recorded and
        # are tried again at each reconcile (a link retries every few seconds while the
        # roots differ), listed in `sync list` until deleted or their record changes.
        self.unplaced, self.undeleted = dict[str, str](), dict[str, str]()
        self.lock = trio.Lock()
        # _pending: on-disk paths the watcher named since the last scan (None: scan
        # everything); _sifted: the directories of those a join sifted (None: none sifted)
        self._pending: set[str] | None = set()
        self._sifted: set[str] | None = None
        # join_batch: records planned per batch; held_changes: leaf changes held for the
        # tree at most (test hooks lower them)
        self.scans, self.work, self.join_batch, self.held_changes = (
            0,
            FolderWork(),
            JOIN_BATCH,
            HELD_CHANGES,
        )
        self.dirty = True
        """The disk may have changed since the last scan. The file-system watcher sets it;
        without a watcher it stays set, and every reconcile rescans first."""
        self.watching = False
        self.last_full_scan_s: float | None = None
        """How long the last forced full rescan held the lock (sets the next one's
        interval)."""
        self.activity = "idle"
        """What the folder is doing now, for `sync list` and the API: idle, scanning or
        syncing (then ``sync_done`` of ``sync_total`` bytes are placed)."""
        self.on_event: Callable[..., object] = _no_event
        """Where what happens here is told (the daemon's event bus)."""
        # This node's need (`sync list`'s N%; members hear it in FolderRoot).
        self._need = NeedTracker()
        # The chunks of the reconcile under way, not committed yet (underway.py).
        self.placing = PlacingChunks()
        self._placer = Placer(
            self.path,
            index,
            self.disk,
            self.records,
            self.unplaced,
            self.work,
            self._placed_bytes,
            self._received_bytes,
            self.placing,
        )

    # -- state ----------------------------------------------------------------------------

    async def load(self, *, assume_case_insensitive: bool = False) -> None:
        self.case_insensitive = assume_case_insensitive or await in_thread(
            folderdisk.ignores_case, self.path
        )
        # Stored records were verified when they arrived (or signed here): a load reads
        # their counts and the tree's leaves (streamed, packed), decodes none of them.
        loaded = await self._index.run(self._store.load_records, self.row.id)
        self.records.counts = loaded.counts
        self.absent = loaded.absent
        # Members not met for MEMBER_EXPIRY are forgotten, and at most MAX_MEMBERS of the
        # most recently met are dialled: an address is kept only because a connection to it
        # authenticated, but a member that left must not be called forever.
        cutoff = time.time_ns() - int(MEMBER_EXPIRY * 1e9)
        await self._index.run(self._store.forget_peers_before, self.row.id, cutoff)
        for peer in (await self._index.run(self._store.peers, self.row.id))[:MAX_MEMBERS]:
            self.peers[peer.node_id] = (peer.host, peer.port)
            self._peer_seen[peer.node_id] = peer.seen_ns
        leaves = PackedLeaves.packed(loaded.leaves)
        del loaded
        await self._replace_tree(await trio.to_thread.run_sync(IndexTree.from_packed, leaves))

    def close(self) -> None:
        """The folder is no longer synced here: wake whoever waits for its changes."""
        changed, self._changed = self._changed, trio.Event()
        changed.set()
        self.records.close()

    async def _update_tree(self, changes: dict[bytes, ContentHash | None]) -> None:
        """Carry changed leaves into the index tree (only the nodes along their paths);
        a big batch runs in a worker thread, off the event loop."""
        if self._held is not None:
            self._held.add(changes)
            return
        if len(changes) > TREE_UPDATE_IN_THREAD:
            # On a copy: members are served from the tree as it is meanwhile.
            self._tree, delta = await trio.to_thread.run_sync(self._tree.updated, changes)
        else:
            delta = self._tree.update(changes)
        self.work.index_nodes_made += len(delta.made)
        root = self._tree.root
        if root == self._root:
            return
        self._retired = [(self._root, delta.retired.get), *self._retired[: KEPT_TREES - 2]]
        self._new_root(root)

    async def _replace_tree(self, tree: IndexTree) -> None:
        """``tree`` (built afresh from the stored records) becomes the folder's tree; the
        old one stays servable as a retired tree (nothing changes it any more)."""
        self.work.index_nodes_made += tree.node_count
        old, self._tree = self._tree, tree
        if tree.root == self._root:
            return
        self._retired = [(self._root, old.node), *self._retired[: KEPT_TREES - 2]]
        self._new_root(tree.root)

    def _new_root(self, root: Child) -> None:
        self._root = root
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    async def _commit_records(
        self, records: list[SignedRecord], absent: Collection[str] = ()
    ) -> None:
        """Store records (those at ``absent`` paths as held without content)."""
        if not records:
            return
        rows = [
            (r.version.path, r.encode(), r.version.path in absent and not r.version.deleted)
            for r in records
        ]
        replaced = await self._index.run(self._store.put_records, self.row.id, rows)
        self.work.records_stored += len(rows)
        changes: dict[bytes, ContentHash | None] = {}
        for (path, encoded, is_absent), record, (old, key, digest) in zip(
            rows, records, replaced, strict=True
        ):
            changes[key] = self.records.noted(path, old, encoded, record, digest)
            if is_absent:
                self.absent.add(path)
            else:
                self.absent.discard(path)
        await self._update_tree(changes)

    @property
    def root(self) -> Child:
        return self._root

    @property
    def writable(self) -> bool:
        return self.keys.writable

    # -- what the folder server needs (ServedFolder) --------------------------------------

    def served_node(self, node_hash: ContentHash) -> bytes | None:
        for node in (self._tree.node, *(removed for _root, removed in self._retired)):
            found = node(node_hash)
            if found is not None:
                return found
        return self.records.encoded_by_hash(node_hash)

    async def held_file_roots(self, roots: list[ContentHash]) -> set[ContentHash]:
        """Those of ``roots`` that a file of this folder has, per the scan index (the
        placed files are recorded there at once): read there, not kept in memory (a set of
        roots cost ~0.17 KiB a file)."""
        if not roots:
            return set()
        held = await self._index.run(self._store.held_roots, self._real_path, roots)
        return {ContentHash(root) for root in held}

    async def held_file_trees(
        self, roots: list[ContentHash]
    ) -> dict[ContentHash, dict[ContentHash, bytes]]:
        """The trees (node hash -> encoding) of those of ``roots`` that a file of this
        folder has (as :meth:`held_file_roots`), read in one call."""
        if not roots:
            return {}
        return await self._index.run(self._index.index.file_trees_many, roots, self._real_path)

    def current_root(self) -> tuple[ContentHash, int, trio.Event]:
        return self._root.hash, self._root.size, self._changed

    def root_signature(self, root: ContentHash, count: int) -> bytes | None:
        """The write key's signature over this index root (~15 us, once per root sent);
        None on a read-only member, which holds no key to sign with: a member joining from
        it checks each record's own signature instead."""
        if not self.writable:
            return None
        child = Child(root, count)
        if self._root_signed is None or self._root_signed[0] != child:
            self._root_signed = (child, sign_root(self.keys, child))
        return self._root_signed[1]

    def members_except(self, node_id: bytes) -> list[FolderMember]:
        return [
            FolderMember(peer, host, port)
            for peer, (host, port) in list(self.peers.items())[:64]
            if peer != node_id
        ]

    def member_connected(self, conn: PeerConnection) -> None:
        self._on_member(self, conn)

    def share_root(self) -> ContentHash | None:
        return self._share_root

    def share_id(self) -> int | None:
        return self._share_id

    async def remember_peer(self, node_id: bytes, host: str, port: int) -> None:
        """A member authenticated at ``host:port``: keep it (its last-met time refreshed at
        most daily, so a live member never expires)."""
        now = time.time_ns()
        unchanged = self.peers.get(node_id) == (host, port)
        if unchanged and now - self._peer_seen.get(node_id, 0) < PEER_SEEN_REFRESH * 1e9:
            return
        self.peers[node_id] = (host, port)
        self._peer_seen[node_id] = now
        await self._index.run(self._store.put_peer, self.row.id, node_id, host, port, now)

    # -- local changes --------------------------------------------------------------------

    def watched(self, path: str) -> bool:
        """Whether a change at ``path`` matters here: not ignored, or an ignored file the
        last scan found (one gone may unblock a placement that collided with its name)."""
        return not self.ignore(path) or path in self.disk.ignored

    def note_changes(self, paths: Iterable[str]) -> None:
        """The watcher saw these on-disk paths change: the next rescan lists only the
        directories of those that differ from their index rows (files this node placed
        itself do not; the periodic full rescan remains the safety net)."""
        self.dirty = True
        pending = self._pending
        if pending is None:
            return
        for path in paths:
            if os.path.basename(path) == IGNORE_FILE:
                self._pending = None  # new ignore rules may change any path: scan all
                return
            pending.add(path)
        if len(pending) > MAX_NOTED_PATHS:
            self._pending = None  # bounded memory: a full scan

    async def rescan(self, *, force: bool = False) -> None:
        async with self.lock:
            if force or self.dirty or not self.watching:
                with self._doing("scanning"):
                    started = trio.current_time()
                    await self._rescan_locked(full=force)
                    if force:
                        self.last_full_scan_s = trio.current_time() - started

    async def _remove_stale(self, leftovers: list[str]) -> None:
        """Temp files a full scan saw that no download took up for LEFTOVER_KEEP (their
        files changed again elsewhere meanwhile): nothing would ever remove them."""
        removed = await in_thread(remove_stale, leftovers, time.time())
        if removed:
            logger.info(
                "folder %s: removed %d temp files no download took up for %g h (first: %s)",
                self.path,
                len(removed),
                LEFTOVER_KEEP / 3600,
                min(removed),
            )

    async def _rescan_locked(self, *, full: bool = True) -> None:
        pending, self._pending = self._pending, set()
        sifted, self._sifted = self._sifted, None
        self.dirty = False  # events from here on mark the next scan
        await self._check_marker()
        noted = pending is not None and (pending or sifted is not None)
        if not full and noted and self.scans and self.watching:
            assert pending is not None
            part = await self._index.run(
                steps.scan_folder_part,
                self._index.index,
                self.path,
                self.ignore,
                pending,
                sifted or (),
            )
            if part is not None:
                await self._check_marker()
                self.work.partial_scans += 1
                self.work.files_scanned += _scanned(part.stats)
                await self._record_part(part)
                return
        self.ignore = await in_thread(self._ignore_file.load)
        # The scan tells each directory's files to `compare` in the index's thread (the
        # folder's lock keeps the records still meanwhile): no list of the folder's files
        # is held, nor a DiskFile per file that matches its record.
        compare = _FullCompare(self.records.unmatched, self.absent, DIFFERING_HELD)
        result, directories = await self._index.run(
            steps.scan_folder, self._index.index, self.path, self.ignore, compare
        )
        await self._check_marker()
        self.scans += 1
        self.work.full_scans += 1
        self.work.files_scanned += _scanned(result.stats)
        self._share_root, self._share_id = result.root, result.share_id
        self.problems = [str(problem) for problem in result.problems]
        self.disk.ignored = set(result.ignored)
        if result.leftovers:
            await self._remove_stale(result.leftovers)
        # Records are SQLite reads: the directories' and the absent ones' in a thread.
        unmatched_dirs = await in_thread(
            self.records.unmatched, [(d, DIRECTORY_ROOT, False) for d in directories]
        )
        matched_dirs = 0
        changed_dirs: dict[str, DiskFile] = {}
        for directory in directories:
            if directory in unmatched_dirs:
                changed_dirs[directory] = directory_entry(directory)
            elif directory not in self.absent:
                matched_dirs += 1
        differing: Mapping[str, DiskFile]
        if compare.overflow:
            # Too many differ to hold (a first scan: every file): read again from the
            # scan index and compared a batch at a time while they are recorded.
            differing = _StreamedChanges(
                self._index.index, result.share_id, self.records.unmatched, changed_dirs
            )
        else:
            differing = compare.differing
            differing.update(changed_dirs)
        # A live record whose path the scan did not find becomes a delete. When as many
        # live records (but those held absent, never deletes) were found as there are,
        # none did: those that matched, and those of the paths that differ (an edit). Else
        # the records' paths are checked against the scan index a page at a time, and only
        # those gone are held (a set of every path found, read whole, was ~0.6 KiB a file
        # at once: A's 261-265 MiB peak at 200k when an edit landed in a full rescan).
        absent_files, absent_dirs = await in_thread(self._live_absent)
        live = self.records.files + self.records.directories - absent_files - absent_dirs
        found = compare.matched + matched_dirs
        if not compare.overflow and found < live:
            edited = [path for path in differing if path not in self.absent]
            found += len(await in_thread(self.records.live, edited))
        present: Container[str] = _EVERYWHERE
        if found != live:
            gone = await self._index.run(self._gone_from_disk, set(directories))
            present = _AllBut(gone)
        await self._record_changes(
            self.records.versions(),
            differing,
            result.problems,
            lambda _path: True,
            whole=True,
            present=present,
            compared=compare.files + len(directories),
        )

    def _gone_from_disk(self, directories: Container[str]) -> set[str]:
        """The paths of live records that are neither a file in the scan index nor one of
        ``directories`` (in the index's thread, after a full scan): the records' paths are
        read a page at a time, and only those gone are held."""
        index, paths = self._index.index, iter(self.records)
        gone: set[str] = set()
        while page := list(itertools.islice(paths, GONE_PAGE)):
            on_disk = index.files_at(self._real_path, page)
            unfound = [path for path in page if path not in on_disk and path not in directories]
            gone.update(self.records.live(unfound))
        return gone

    def _live_absent(self) -> tuple[int, int]:
        """(files, directories) among the live records held absent (blocking reads)."""
        files = directories = 0
        for path in self.absent:
            if self.records.file_size(path) is not None:
                files += 1
            elif self.records.matches(path, DIRECTORY_ROOT, False):
                directories += 1
        return files, directories

    async def _check_marker(self) -> None:
        """Raise StorageError if the folder's marker is gone: an unmounted disk or a deleted
        folder looks like "every file deleted", never recorded. Checked before a scan and
        again after it (the folder may have gone while it ran: a scan that found the files
        gone and the marker still there must not be believed). The folder waits until its
        marker is back, then scans in full."""
        if not await in_thread(folderdisk.has_marker, self.path):
            self._pending, self._sifted = None, None
            raise StorageError(
                f"{self.path} lacks its {folderdisk.MARKER} marker (unmounted, moved or deleted?); "
                "not syncing it until it is back"
            )

    async def _record_part(self, part: PartScan) -> None:
        """A partial scan's findings: only paths in its scope are compared with records."""
        shallow, deep = set(part.shallow), tuple(f"{d}/" for d in part.deep)
        deep_paths = set(part.deep)

        def in_scope(path: str) -> bool:
            return (
                path.rpartition("/")[0] in shallow
                or path in deep_paths
                or (bool(deep) and path.startswith(deep))
            )

        found: dict[str, DiskFile] = {}
        self.disk.ignored = {p for p in self.disk.ignored if not in_scope(p)}
        self.disk.ignored.update(part.ignored)
        for path, root, size, mtime_ns, _inode, mode in part.files:
            found[path] = DiskFile(path, ContentHash(root), size, bool(mode & 0o100), mtime_ns)
        for directory in part.directories:
            # A directory the scan listed is not itself in scope (only its entries are):
            # compared with no record, it would become a new version with a fresh vector,
            # concurrent with (or older than) the folder's record of it.
            if in_scope(directory):
                found[directory] = directory_entry(directory)
        scope = self.records.in_scope(shallow, deep_paths)
        records = {p: r.version for p, r in self.records.records_at(scope).items()}
        await self._record_changes(records, found, part.problems, in_scope)

    async def _record_changes(
        self,
        records: Mapping[str, FileVersion],
        found: Mapping[str, DiskFile],
        problems: list[Problem],
        in_scope: Callable[[str], bool],
        *,
        whole: bool = False,
        present: Container[str] | None = None,
        compared: int | None = None,
    ) -> None:
        """Sign and store a new version for each path in scope whose disk state differs
        from its record (on a read-only member: list it as a local change). ``whole``:
        the scope is the folder (compared in a worker thread, most records undecoded).
        ``present``: every path the scan found, when ``found`` holds only those that may
        differ (``compared`` of them)."""
        unreadable = folderdisk.problem_paths(self.path, [p.path for p in problems])
        refused: dict[str, str] = {}
        self.work.paths_compared += (len(found) if compared is None else compared) + len(records)

        changes = iter_local_changes(
            records,
            found,
            self.device,
            time.time_ns(),
            lambda path: self.ignore(path) or unreadable(path),
            absent=self.absent,
            refused=refused,
            same=self.records.matches,
            present=present,
        )

        def take() -> list[FileVersion]:
            return list(itertools.islice(changes, RECORD_BATCH))

        if not self.writable:
            self.unrecorded = {p for p in self.unrecorded if not in_scope(p)}
        total = 0
        # In batches (a first scan records every file): compared in a worker thread when
        # the scope is the folder, signed in one when many, and stored before the next batch
        # is compared, so a first scan holds one batch of new versions, not one per file.
        # The folder's lock is held: nothing else changes the records meanwhile.
        async with self._tree_updated_at_end():
            while batch := await in_thread(take) if whole else take():
                total += len(batch)
                if not self.writable:
                    self.unrecorded.update(change.path for change in batch)
                    continue
                self.on_event(
                    "local-changes",
                    folder=self.folder_id.hex(),
                    dir=self.path,
                    paths=[change.path for change in batch[:100]],
                    changes=len(batch),
                    recorded=self.writable,
                )
                signed = (
                    _sign_all(self.keys, batch)
                    if len(batch) < SIGN_IN_THREAD
                    else await in_thread(_sign_all, self.keys, batch)
                )
                del batch
                await self._commit_records(signed)
        # One path whose change cannot be recorded fails alone; the rest are recorded.
        news = [str(p) for p in problems]
        news += [f"{path}: change not recorded: {why}" for path, why in refused.items()]
        self.problems += [p for p in news if p not in self.problems]
        if total and self.writable:
            logger.info("folder %s: %d local changes", self.path, total)

    # -- reconciling with a member --------------------------------------------------------

    async def reconcile(
        self,
        link: FolderLink,
        remote_root: Child,
        *,
        root_signed: bool = False,
        helpers: Callable[[], Sequence[Helper]] = tuple,
    ) -> None:
        """Take what ``link``'s member has that we lack, by the planner's rules.
        ``root_signed``: the member sent the write key's signature over ``remote_root``
        (checked), so the records under it are not checked one by one. ``helpers()``:
        other members at ``remote_root`` too, or placing it now, which send the chunks
        they hold beside it.

        Raises RemoteProtocolError (nothing applied) if the member sent a forged,
        malformed or backwards record.
        """
        async with self.lock:
            timer = steps.Phases()
            if self.dirty or not self.watching:
                await self._rescan_locked(full=False)
            elif not await in_thread(folderdisk.has_marker, self.path):
                raise StorageError(
                    f"{self.path} lacks its {folderdisk.MARKER} marker; not syncing it"
                )
            timer.mark("rescan")
            same_root = remote_root.hash == self._root.hash
            # A member at a root we had (it has not taken our latest change yet) holds
            # nothing we lack: each of its records is ours or one we replaced since. Its
            # diff would ask for the nodes of our own last change (a round trip on a long
            # path, the folder held meanwhile) to plan nothing.
            behind = any(remote_root == root for root, _removed in self._retired)
            if (same_root or behind) and not self.missing_content():
                return
            # Members taking the same root hear what we place as we place it; told before
            # the diff, they know of us before either asks for a chunk.
            self.placing.begin(remote_root.hash)
            try:
                await self._reconcile_locked(link, remote_root, timer, root_signed, helpers)
            finally:
                self.placing.end()

    async def _reconcile_locked(
        self,
        link: FolderLink,
        remote_root: Child,
        timer: steps.Phases,
        root_signed: bool,
        helpers: Callable[[], Sequence[Helper]],
    ) -> None:
        """The diff and the placing of a reconcile, under the folder's lock."""
        same_root = remote_root.hash == self._root.hash
        local_root = self._root
        trees = [self._tree.node, *(removed for _root, removed in self._retired)]

        def local_node(node_hash: ContentHash) -> bytes:
            for node in trees:
                found = node(node_hash)
                if found is not None:
                    return found
            raise StorageError("folder index lost one of its own nodes")

        def remote_nodes(hashes: object) -> list[bytes]:
            return trio.from_thread.run(link.nodes, list(hashes))  # type: ignore[call-overload]

        leaves = (
            LeafQueue()
            if same_root
            else await trio.to_thread.run_sync(
                remote_changes, local_root, local_node, remote_root, remote_nodes
            )
        )
        timer.mark("diff")
        with self._doing("syncing"):
            await self._take_in_batches(link, leaves, timer, vouched=root_signed, helpers=helpers)
        logger.info("folder %s: reconcile with %s: %s", self.path, link.peer_id.short(), timer)

    async def _take_in_batches(
        self,
        link: FolderLink,
        leaves: LeafQueue,
        timer: steps.Phases,
        *,
        vouched: bool,
        helpers: Callable[[], Sequence[Helper]],
    ) -> None:
        """Fetch, verify, plan and apply the member's differing records JOIN_BATCH at a
        time (a join's are every record): the decoded records and the plan of one batch are
        held at once, never the whole folder's (``leaves`` is emptied as they are taken).
        The tree takes the stored records once, at the end. A batch is verified whole
        before any of it is planned, so a forged or backwards record stops the reconcile
        with nothing of its batch applied (earlier batches, all validly signed, stay)."""
        left: dict[str, int] = {}  # planned in an earlier batch and not placed
        seen_records = seen_bytes = 0  # for the estimate of what is not planned yet
        async with self._tree_updated_at_end(), trio.open_nursery() as nursery:
            # The next batch's records are fetched and verified while this one is applied
            # (verification is ~0.13 ms a record, in threads: off the join's critical path).
            # The leaves are taken (from the end) as batches are fetched: their memory (64
            # bytes a record) goes as the join goes, and is gone when the tree is rebuilt.
            total = len(leaves)
            first = max(1, self.join_batch // FIRST_BATCH_SHARE)
            sizes = join_batch_sizes(total, self.join_batch, first)
            ahead = self._fetch_ahead(nursery, link, leaves.pop(sizes[0]), vouched)
            for number in range(len(sizes)):
                unplanned = sum(sizes[number + 1 :])
                remote = await ahead()
                if unplanned:
                    ahead = self._fetch_ahead(nursery, link, leaves.pop(sizes[number + 1]), vouched)
                timer.mark("records")
                seen_records += len(remote)
                seen_bytes += sum(r.version.size for r in remote if is_file(r.version))
                # The batch's paths' records, read in one go off the event loop.
                asked = {record.version.path for record in remote}
                known = await in_thread(self.records.records_at, asked)
                versions = KnownVersions(known, asked, self.records)
                planned = self._plan(remote, versions, await self._files_for_plan())
                del remote
                timer.mark("plan")
                fetched = {p: v.size for p, v in planned.fetch if is_file(v)}
                self._need.plan(
                    {**left, **fetched},
                    self.records,
                    unplanned=unplanned,
                    unplanned_bytes=unplanned * seen_bytes // max(seen_records, 1),
                    versions=versions,
                )
                del known, asked, versions
                self._progress_changed()
                placed: set[str] = set()
                try:
                    placed = await self._apply(link, planned, timer, helpers)
                    await self._sift_noted()
                finally:
                    # What was not placed stays needed (a failed reconcile placed nothing
                    # it stored: the next one plans it again).
                    left = {p: n for p, n in self._need.pending.items() if p not in placed}
                    # The records not planned yet stay needed too if this batch failed;
                    # otherwise the next batch plans them.
                    self._need.plan(
                        left,
                        self.records,
                        unplanned=unplanned,
                        unplanned_bytes=self._need.unplanned_bytes,
                    )
                    self._progress_changed()

    async def _sift_noted(self) -> None:
        """After a join's batch (the folder's lock held, so no scan runs), once the watcher
        has noted a batch's worth of paths: those that are files as their index rows
        record them (what the join placed and recorded) are dropped, the directories of
        the others kept for the next rescan. Else every placed path waited there (~0.14
        KiB each), and that rescan checked them all while the first edit after a join
        waited (4-5 s at 200k files)."""
        pending = self._pending
        if pending is None or len(pending) < self.join_batch or not self.scans:
            return
        self._pending = set()
        try:
            changed = await self._index.run(
                partscan.sift_changed_paths, self._index.index, self.path, pending
            )
        except BaseException:
            self._pending = None  # the taken paths are lost: the next scan is full
            raise
        logger.debug(
            "folder %s: %d noted paths sifted, directories left %s",
            self.path,
            len(pending),
            None if changed is None else len(changed),
        )
        if changed is None:
            self._pending = None  # no full scan yet: the next scan is one
        else:
            self._sifted = changed if self._sifted is None else self._sifted | changed

    def _fetch_ahead(
        self, nursery: trio.Nursery, link: FolderLink, batch: list[IndexLeaf], vouched: bool
    ) -> Callable[[], Awaitable[list[SignedRecord]]]:
        """Start fetching and verifying ``batch``'s records; returns what waits for them
        (raising what the fetch raised, only then: a bad record in the next batch never
        interrupts the batch being applied)."""
        done = trio.Event()
        result: list[list[SignedRecord] | BaseExceptionGroup[P2pfsError | OSError]] = []

        async def fetch() -> None:
            try:
                result.append(await self._fetch_records(link, batch, vouched))
            except* (P2pfsError, OSError) as group:  # raised where the batch is awaited
                result.append(group)
            done.set()

        nursery.start_soon(fetch)

        async def records() -> list[SignedRecord]:
            await done.wait()
            fetched = result.pop()
            if isinstance(fetched, BaseExceptionGroup):
                raise fetched
            return fetched

        return records

    @contextlib.asynccontextmanager
    async def _tree_updated_at_end(self) -> AsyncIterator[None]:
        """Records stored inside the block reach the index tree once, when it ends: one
        rebuild rather than one per batch, and no member diffs against a half-way tree
        (the records themselves are stored at once)."""
        if self._held is not None:  # nested: the outer block carries them
            yield
            return
        self._held = _HeldChanges(self.held_changes)
        try:
            yield
        finally:
            held, self._held = self._held, None
            with trio.CancelScope(shield=True):  # the tree must match the records
                if held.overflow:
                    # The join's (or scan's) freed blocks are scattered holes the leaves'
                    # one block cannot reuse: given back first, not kept beside it.
                    await in_thread(release_free_memory)
                    leaves = await self._index.run(self._store.tree_leaves, self.row.id)
                    tree = await trio.to_thread.run_sync(
                        IndexTree.from_packed, PackedLeaves.packed(leaves)
                    )
                    del leaves
                    await self._replace_tree(tree)
                elif held.changes:
                    await self._update_tree(held.changes)

    async def _fetch_records(
        self, link: FolderLink, leaves: list[IndexLeaf], vouched: bool
    ) -> list[SignedRecord]:
        """``vouched``: the leaves are of a tree whose root the write key signed, so each
        record is checked against its leaf's hash but not by its own signature."""
        hashes = [leaf.record_hash for leaf in leaves]
        encoded = await link.nodes(hashes)
        # Signature checks cost ~0.04-0.13 ms each here and release the GIL: they run in
        # worker threads, split so a second core takes half (10,000 records: 1.4 s -> ~0.7
        # s). Vouched records need only decoding, which holds the GIL: one thread.
        parts = VERIFY_THREADS if len(leaves) >= 2 * VERIFY_SPLIT_MIN and not vouched else 1
        bounds = [len(leaves) * i // parts for i in range(parts + 1)]
        results: list[list[SignedRecord]] = [[] for _ in range(parts)]

        async def verify(part: int) -> None:
            start, end = bounds[part], bounds[part + 1]
            results[part] = await in_thread(
                steps.verify_records, self.keys, leaves[start:end], encoded[start:end], vouched
            )

        async with trio.open_nursery() as nursery:
            for part in range(parts):
                nursery.start_soon(verify, part)
        records = [record for part in results for record in part]
        if vouched:
            self.work.records_vouched += len(records)
        else:
            self.work.records_verified += len(records)
        # The vectors this link sent before are in the store (a dict by path held ~0.16
        # KiB a record for every member that linked).
        link.sent_records = True
        backwards = await self._index.run(
            self._store.note_vectors,
            link.serial,
            [(record.version.path, record.version.version) for record in records],
        )
        if backwards is not None:
            raise RemoteProtocolError(f"version vector of {backwards!r} went backwards")
        return records

    async def link_ended(self, link: FolderLink) -> None:
        """``link`` is over: the vectors it sent are forgotten."""
        if link.sent_records:
            await self._index.run(self._store.forget_vectors, link.serial)

    async def _scanned(self, paths: Collection[str]) -> dict[str, folderdisk.DiskState]:
        """The files at ``paths`` as last scanned or placed (read from the scan index)."""
        if not paths:
            return {}
        return await self._index.run(
            folderdisk.scanned_states, self._index.index, self._real_path, paths
        )

    async def _files_for_plan(self) -> Collection[str]:
        """The paths holding a file that the planner asks about: those of records held
        absent (a file there becomes a concurrent version, never a fetch over it); on a
        file system that ignores case, all of them (no placement may land on one)."""
        if self.case_insensitive:
            return await self._index.run(
                folderdisk.scanned_paths, self._index.index, self._real_path
            )
        return (await self._scanned(list(self.absent))).keys()

    def _plan(
        self, remote: list[SignedRecord], records: KnownVersions, on_disk: Collection[str]
    ) -> Planned:
        """Plan by the folder rules (``sync/reconcile.py``) against ``records`` (ours, the
        batch's paths read ahead); sign what we newly record. ``on_disk``: the paths with a
        file the plan may ask about (:meth:`_files_for_plan`)."""
        held = Holdings(
            records,
            absent=self.absent,
            ignored=self.ignore,
            on_disk=on_disk,
            ignored_on_disk=self.disk.ignored,
            case_insensitive=self.case_insensitive,
        )
        versions = [record.version for record in remote]
        self.work.records_planned += len(versions)
        plan = (
            plan_read_write(held, versions)
            if self.writable
            else plan_read_only(held, versions, self.unrecorded)
        )
        for path, copy in plan.conflicts.items():
            logger.info("folder %s: conflict on %s; copy %s", self.path, path, copy)
        for path, holder in plan.collisions.items():
            logger.warning(
                "folder %s: %r collides with %r on this file system; not placed",
                self.path,
                path,
                holder,
            )
        # Every path planned now is reported as it stands now: a collision the user resolved
        # (the other file removed or renamed) is placed and no longer listed.
        for path in [*(version.path for version in versions), *(p for p, _v in plan.fetch)]:
            self.collisions.pop(path, None)
        self.collisions.update(plan.collisions)
        received = {record.version.path: record for record in remote}
        return Planned(
            [self._signed(version, received, records) for version in plan.records],
            list(plan.fetch),
            list(plan.delete),
            dict(plan.conflict_moves),
            dict(plan.waits_for),
            set(plan.absent),
        )

    def _signed(
        self, version: FileVersion, received: dict[str, SignedRecord], records: KnownVersions
    ) -> SignedRecord:
        """The signed record of ``version``: one a member sent or we hold, else signed now
        (only a read-write member's plan holds versions nobody signed yet)."""
        theirs = received.get(version.path)
        if theirs is not None and theirs.version == version:
            return theirs
        mine = records.record(version.path)
        if mine is not None and mine.version == version:
            return mine
        return SignedRecord.sign(version, self.keys)

    def missing_content(self) -> bool:
        """Records held without content whose path is no longer ignored here."""
        return missing_content(self.absent, self.ignore)

    # -- applying -------------------------------------------------------------------------

    async def _apply(
        self,
        link: FolderLink,
        planned: Planned,
        timer: steps.Phases,
        helpers: Callable[[], Sequence[Helper]],
    ) -> set[str]:
        """Place, delete and store what ``planned`` says; returns the paths placed."""
        moved = await self._placer.move_renamed(planned)
        pending = self._need.pending
        self._placed_bytes(
            sum(1 for path in moved if path in pending), sum(pending.get(p, 0) for p in moved)
        )
        timer.mark("moves")
        placed = await self._placer.download(link, planned, timer, helpers)
        placed.update(moved)
        ready = [
            record
            for record in planned.records
            if planned.waits_for.get(record.version.path, "") in placed
            or record.version.path not in planned.waits_for
        ]
        directories = {
            p for p in planned.delete if (r := self.records.get(p)) and r.version.is_directory
        }
        scanned = await self._scanned([p for p in planned.delete if p not in directories])
        deleted = await in_thread(
            steps.delete_paths, self.path, scanned, planned.delete, directories
        )
        deleted.update(moved.values())
        self._note_undeleted(directories, deleted)
        ready = [
            record
            for record in ready
            if record.version.path not in planned.delete or record.version.path in deleted
        ]
        for record in ready:
            self.undeleted.pop(record.version.path, None)  # deleted, or made again
        timer.mark("delete")
        await self._commit_records(ready, planned.absent)
        timer.mark("store")
        skipped = len(planned.records) - len(ready)
        if ready:
            self.on_event(
                "folder-changes",
                folder=self.folder_id.hex(),
                dir=self.path,
                member=str(link.peer_id),
                paths=[record.version.path for record in ready[:100]],
                changes=len(ready),
            )
        if planned.records:
            logger.info(
                "folder %s: applied %d records from %s (%d files placed, %d deleted, %d waiting)",
                self.path,
                len(ready),
                link.peer_id.short(),
                len(placed),
                len(deleted),
                skipped,
            )
        return placed

    def _note_undeleted(self, directories: Collection[str], deleted: Collection[str]) -> None:
        for path in directories:
            if path in deleted or path in self.undeleted:
                continue
            # Logged once: the reconcile that tries it again comes every few seconds.
            logger.info("folder %s: %s deleted by a member, not empty here: kept", self.path, path)
            self.undeleted[path] = UNDELETED

    # -- reporting ------------------------------------------------------------------------

    def conflicts(
        self, member_devices: Mapping[bytes, bytes] | None = None
    ) -> list[dict[str, str | bool | None]]:
        """Conflict copies (each with the device tag in its name, and the member that tag
        belongs to: this node (``own``), one of ``member_devices`` (node id -> device), or
        None) and name collisions."""
        tags = {
            short_device(device): str(NodeId(node))
            for node, device in (member_devices or {}).items()
        }
        own = short_device(self.device)
        found: list[dict[str, str | bool | None]] = []
        for path in sorted(self.records.conflict_copies):
            original = conflict_original(path)
            tag = conflict_device(path)
            found.append(
                {
                    "path": path,
                    "original": original,
                    "kind": "conflict copy",
                    "device": tag,
                    "member": tags.get(tag or ""),
                    "own": tag == own,
                }
            )
        for path, other in sorted(self.collisions.items()):
            found.append(
                {
                    "path": path,
                    "original": other,
                    "kind": "name collision",
                    "device": None,
                    "member": None,
                    "own": False,
                }
            )
        return found

    async def revert(self) -> tuple[list[str], list[str]]:
        """A read-only member's "Revert Local Changes": each local edit moves to
        ``.p2pfs/versions/`` (nothing is lost), and each path the folder has a file for is
        held *absent*, so the next reconcile fetches the folder's version again. Returns
        (paths put aside or gone, paths to fetch)."""
        if self.writable:
            raise LocalProtocolError(f"{self.path}: a read-write member records its changes")
        async with self.lock:
            paths = sorted(self.unrecorded)
            refetch = []
            for path in paths:
                await in_thread(folderdisk.keep_version, self.path, path, move=True)
                # Moved away: the fetch that follows must find the path as scanned, empty.
                await self._index.run(self._index.index.forget_files_at, self._real_path, [path])
                record = self.records.get(path)
                if record is None or record.version.deleted or record.version.is_directory:
                    continue  # a new local file or directory: put aside, nothing to fetch
                refetch.append(record)
            await self._commit_records(refetch, [r.version.path for r in refetch])
            self.unrecorded.difference_update(paths)
        return paths, [record.version.path for record in refetch]

    def _placed_bytes(self, files: int, size: int) -> None:
        self._need.placed_files += files
        self._need.placed_bytes += size
        self._progress_changed()

    def _received_bytes(self, size: int) -> None:
        self._need.received += size
        self._progress_changed()

    def _progress_changed(self) -> None:
        progress, self._need.changed = self._need.changed, trio.Event()
        progress.set()

    @property
    def sync_done(self) -> int:
        """Bytes of the current (or last) plan's files placed or received."""
        return self._need.done()

    @property
    def sync_total(self) -> int:
        return self._need.pending_bytes + self._need.unplanned_bytes

    def need(self) -> FolderNeed:
        """Files and bytes this node still has to fetch, of the folder as it knows it."""
        return self._need.need(self.records, self.absent, self.ignore)

    def progress(self) -> tuple[FolderNeed, trio.Event]:
        """The need now, and an event set when it next changes."""
        return self.need(), self._need.changed

    @contextlib.contextmanager
    def _doing(self, activity: str) -> Iterator[None]:
        self.activity = activity
        self.on_event("folder-state", folder=self.folder_id.hex(), dir=self.path, state=activity)
        try:
            yield
        finally:
            self.activity = "idle"
            state = "error" if self.problems else "idle"
            self.on_event("folder-state", folder=self.folder_id.hex(), dir=self.path, state=state)

    def summary(self) -> dict[str, object]:
        return {
            "folder": self.folder_id.hex(),
            "path": self.path,
            "mode": "rw" if self.writable else "ro",
            "root": self._root.hash.hex(),
            "records": self._root.size,
            "files": self.records.files,
            "directories": self.records.directories,
            "local_changes": sorted(self.unrecorded),
            "work": asdict(self.work),
            "problems": [
                *(
                    f"{path}: collides with {other} on this file system (not placed)"
                    for path, other in sorted(self.collisions.items())
                ),
                *(f"{path}: not placed: {why}" for path, why in sorted(self.unplaced.items())[:50]),
                *(
                    f"{path}: not deleted: {why}"
                    for path, why in sorted(self.undeleted.items())[:50]
                ),
                *self.problems[:50],
            ],
        }


@dataclass(slots=True)
class _HeldChanges:
    """Index-leaf changes held for the tree until a join or a first scan ends."""

    limit: int
    changes: dict[bytes, ContentHash | None] = field(default_factory=dict)
    overflow: bool = False
    """More than ``limit`` came: the tree is built from the store's leaves instead (a
    dict of every change cost ~0.2 KiB a record at once)."""

    def add(self, changes: dict[bytes, ContentHash | None]) -> None:
        if self.overflow:
            return
        self.changes.update(changes)
        if len(self.changes) > self.limit:
            self.overflow = True
            self.changes = {}


class _FullCompare:
    """Told each directory's files by a full scan (in the index's thread): keeps a
    DiskFile for each that differs from its record, and counts those that match."""

    def __init__(
        self,
        unmatched: Callable[[Iterable[tuple[str, bytes, bool]]], set[str]],
        absent: Container[str],
        limit: int,
    ) -> None:
        self.unmatched, self.absent, self.limit = unmatched, absent, limit
        self.differing: dict[str, DiskFile] = {}
        self.overflow = False
        """More than ``limit`` differ: none kept (the caller reads them again, in batches)."""
        self.files = 0
        self.matched = 0
        """Files found that match their live record (those held absent left out)."""

    def __call__(self, files: list[tuple[str, bytes, int, int, int, int]]) -> None:
        absent, differing = self.absent, self.differing
        self.files += len(files)
        # One batch of record reads per directory (RecordSet.unmatched).
        unmatched = self.unmatched((f[0], f[1], bool(f[5] & 0o100)) for f in files)
        self.matched += sum(1 for f in files if f[0] not in unmatched and f[0] not in absent)
        if self.overflow or not unmatched:
            return
        for path, root, size, mtime_ns, _inode, mode in files:
            if path in unmatched:
                differing[path] = DiskFile(
                    path, ContentHash(root), size, bool(mode & 0o100), mtime_ns
                )
        if len(differing) > self.limit:
            self.overflow = True
            differing.clear()


class _StreamedChanges(Mapping[str, DiskFile]):
    """A full scan's files that differ from their records, when too many to hold: read
    from the scan index (on a reader of its own, so a worker thread may run it) and
    compared with the records a batch at a time, as local change detection takes them;
    then the directories that differ.

    Only iterated (``items``): membership is asked by local change detection only of
    paths the scan did not find, and none of those is here but the directories."""

    def __init__(
        self,
        index: IndexStore,
        share_id: int,
        unmatched: Callable[[Iterable[tuple[str, bytes, bool]]], set[str]],
        directories: dict[str, DiskFile],
    ) -> None:
        self._index, self._share_id = index, share_id
        self._unmatched, self._directories = unmatched, directories

    def _stream(self) -> Iterator[tuple[str, DiskFile]]:
        for batch in self._index.iter_file_states(self._share_id):
            differ = self._unmatched((f[0], f[1], bool(f[5] & 0o100)) for f in batch)
            for path, root, size, mtime_ns, _inode, mode in batch:
                if path in differ:
                    executable = bool(mode & 0o100)
                    yield path, DiskFile(path, ContentHash(root), size, executable, mtime_ns)
        yield from self._directories.items()

    def items(self) -> ItemsView[str, DiskFile]:
        return _StreamedItems(self)

    def __iter__(self) -> Iterator[str]:
        return (path for path, _found in self._stream())

    def __getitem__(self, path: str) -> DiskFile:
        return self._directories[path]

    def __len__(self) -> int:
        return sum(1 for _ in self._stream())


class _StreamedItems(ItemsView[str, DiskFile]):
    _mapping: _StreamedChanges

    def __iter__(self) -> Iterator[tuple[str, DiskFile]]:
        return self._mapping._stream()


class _Everywhere:
    """Every path counts as found (a full scan found every live record's path)."""

    def __contains__(self, path: object) -> bool:
        return True


_EVERYWHERE = _Everywhere()


@dataclass(frozen=True, slots=True)
class _AllBut:
    """Every path counts as found but those ``gone`` (a full scan's live records that it
    did not find)."""

    gone: Container[str]

    def __contains__(self, path: object) -> bool:
        return path not in self.gone


def _no_event(_kind: str, **_data: object) -> None:
    """A folder outside a daemon (tests, benchmarks) tells no one."""
