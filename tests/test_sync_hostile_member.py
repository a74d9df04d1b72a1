"""A member that holds the folder key but sends forged, malformed or backwards index updates.

The daemon under test is real (its own process); the hostile member is this test process
running the real endpoint, share service and folder server over a real UDP socket, with a
folder whose index tree it builds by hand. The member proves membership honestly (it holds
the read-write ticket), so only the record checks stand between it and the daemon's disk.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import pytest
import trio

from p2pfs.content.chunking import Chunker
from p2pfs.content.folder import FILE_TREE
from p2pfs.content.tree import Child, build_tree
from p2pfs.daemon import service as service_module
from p2pfs.daemon.folders.client import FolderLink
from p2pfs.daemon.folders.engine import FIRST_BATCH_SHARE, join_batch_sizes
from p2pfs.daemon.folders.server import FolderServer
from p2pfs.daemon.folders.underway import PlacingChunks
from p2pfs.daemon.service import ShareService
from p2pfs.daemon.storage import AsyncIndex
from p2pfs.daemon.streams import TransferCounters
from p2pfs.identity import Identity
from p2pfs.ids import ContentHash
from p2pfs.net import PeerConnection, open_endpoint
from p2pfs.store.assemble import PartialFile, is_partial_name
from p2pfs.store.index import ChunkLocation, IndexStore
from p2pfs.store.scanner import scan_share
from p2pfs.sync.keys import FolderKeys
from p2pfs.sync.records import (
    SIGNATURE_DOMAIN,
    IndexLeaf,
    SignedRecord,
    build_index,
    path_key,
    record_hash,
    sign_root,
)
from p2pfs.sync.versions import FileVersion, VersionVector
from p2pfs.wire.messages import FolderMember, FolderNeed
from p2pfs.wire.ticket import parse_ticket_untrusted
from tests.e2e_helpers import wait_until
from tests.support.daemons import DaemonProcess
from tests.support.hooked_daemon import PROGRAM as HOOKED_DAEMON
from tests.support.hooked_daemon import SMALL_JOIN_BATCH

pytestmark = pytest.mark.timeout(120)

DEVICE = bytes([0x42]) * 32


@dataclass
class HostileFolder:
    """Serves whatever index tree the test gives it (a ServedFolder)."""

    keys: FolderKeys
    device: bytes = DEVICE
    nodes: dict[ContentHash, bytes] = field(default_factory=dict)
    root: Child = field(default_factory=lambda: Child(ContentHash(bytes(32)), 0))
    changed: trio.Event = field(default_factory=trio.Event)
    file_nodes: dict[ContentHash, bytes] = field(default_factory=dict)
    """File-tree nodes of the content it serves (``content``)."""
    content: ContentHash | None = None
    """The share root of a directory scanned into its index: chunks are read there."""
    placing: PlacingChunks = field(default_factory=PlacingChunks)
    """What it tells watchers it is placing (nothing, unless a test says otherwise)."""
    root_signing: Callable[[FolderKeys, Child], bytes | None] = lambda _keys, _root: None
    """What it sends as its root's signature: none by default (its records are then
    checked one by one), the write key's (:func:`sign_root`, as a read-write member
    does), or anything else."""

    def serve(self, blobs: list[tuple[str, bytes]]) -> None:
        """Publish a tree whose leaves are ``(path, encoded record)`` as given (unchecked)."""
        nodes: dict[ContentHash, bytes] = {}
        leaves = []
        for path, blob in blobs:
            digest = record_hash(blob)
            nodes[digest] = blob
            leaves.append(IndexLeaf(path_key(path), digest))
        self.root = build_index(leaves, lambda h, e, _n: nodes.__setitem__(h, e))
        self.nodes = nodes
        changed, self.changed = self.changed, trio.Event()
        changed.set()

    def served_node(self, node_hash: ContentHash) -> bytes | None:
        return self.nodes.get(node_hash) or self.file_nodes.get(node_hash)

    async def held_file_trees(
        self, roots: list[ContentHash]
    ) -> dict[ContentHash, dict[ContentHash, bytes]]:
        return {}

    def current_root(self) -> tuple[ContentHash, int, trio.Event]:
        return self.root.hash, self.root.size, self.changed

    def root_signature(self, root: ContentHash, count: int) -> bytes | None:
        return self.root_signing(self.keys, Child(root, count))

    def progress(self) -> tuple[FolderNeed, trio.Event]:
        return FolderNeed(0, 0, 0, 0), trio.Event()

    def members_except(self, node_id: bytes) -> list[FolderMember]:
        return []

    def member_connected(self, conn: PeerConnection) -> None:
        pass

    def share_root(self) -> ContentHash | None:
        return self.content

    def share_id(self) -> int | None:
        return None  # its chunks are located by its share root


def _text_of(number: int) -> bytes:
    return (f"{number:04d} " * (25 + number % 40)).encode()


def served_files(
    content: Path, count: int, keys: FolderKeys, data_of: Callable[[int], bytes] = _text_of
) -> tuple[list[tuple[str, bytes]], dict[ContentHash, bytes]]:
    """``count`` files (small text unless ``data_of(number)`` says otherwise) written into
    ``content`` (made here) for a hostile member to serve: their signed records ``(path,
    blob)`` and their file-tree nodes by hash."""
    content.mkdir()
    chunker = Chunker()
    blobs: list[tuple[str, bytes]] = []
    file_nodes: dict[ContentHash, bytes] = {}
    for number in range(count):
        path = f"f{number:04d}.bin"
        data = data_of(number)
        (content / path).write_bytes(data)
        root, nodes = build_tree(FILE_TREE, chunker.chunk_refs(data))
        file_nodes.update(nodes)
        vector = VersionVector.of({DEVICE: 1})
        version = FileVersion(path, vector, False, root.hash, root.size, False, 1, DEVICE)
        blobs.append((path, signed(version, keys)))
    return blobs, file_nodes


def tombstone(path: str, counter: int) -> FileVersion:
    return FileVersion.tombstone(path, VersionVector.of({DEVICE: counter}), 1, DEVICE)


def signed(version: FileVersion, keys: FolderKeys) -> bytes:
    return SignedRecord.sign(version, keys).encode()


def raw_record(fields: list[object], keys: FolderKeys) -> bytes:
    """A record with arbitrary FileVersion fields, validly signed (as a member can)."""
    encoded_version = msgpack.packb(fields, use_bin_type=True)
    signature = keys.sign(SIGNATURE_DOMAIN + keys.folder_id + encoded_version)
    return msgpack.packb([encoded_version, signature], use_bin_type=True)


def fields(path: str) -> list[object]:
    return [path, [[DEVICE, 1]], False, bytes(32), 5, False, 1, DEVICE]


def run_hostile_member(
    home: Path,
    ticket: str,
    script: Callable[[HostileFolder], None],
    *,
    backwards: bool,
    content: Path | None = None,
) -> bool:
    """Join the daemon's folder as a member serving ``script``'s tree (and the files of
    ``content``: scanned into its index, their chunks served); True if the daemon dropped
    the connection within the time limit."""
    parsed = parse_ticket_untrusted(ticket)
    keys = FolderKeys.from_write_seed(bytes(parsed.root))
    assert parsed.node_id is not None
    address = parsed.addresses[0]
    folder = HostileFolder(keys)
    script(folder)

    async def main() -> bool:
        identity = Identity.generate()
        with IndexStore(home / "hostile.sqlite3") as store:
            if content is not None:
                folder.content = scan_share(content, store).root
            index = AsyncIndex(store)
            server = FolderServer(
                index, lambda fid: folder if fid == keys.folder_id else None, identity.node_id.raw
            )
            service = ShareService(index, TransferCounters(), folders=server)
            async with open_endpoint(identity, "127.0.0.1", 0) as endpoint:
                conn = await endpoint.connect((address.host, address.port), parsed.node_id)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(service.handle_connection, conn)
                    link = FolderLink(conn, keys, TransferCounters(), identity.node_id.raw)
                    await link.join()
                    if backwards:
                        # The daemon takes the newer tombstone first: its index holds keep.txt
                        # (the member fixture's one file) and then gone.txt too.
                        await _records_reach(link, 2)
                        folder.serve([("gone.txt", signed(tombstone("gone.txt", 1), keys))])
                    with trio.move_on_after(30) as timeout:
                        await conn.wait_closed()
                    nursery.cancel_scope.cancel()
                return not timeout.cancelled_caught

    return trio.run(main)


async def _records_reach(link: FolderLink, count: int) -> None:
    """Return once the daemon's index (watched through ``link``) holds ``count`` records. The
    watch ends here, before the daemon has reason to drop us."""
    reached = trio.Event()

    def on_root(_root: ContentHash, records: int, _need: FolderNeed | None, _sig: bool) -> None:
        if records >= count:
            reached.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(link.watch, on_root)
        with trio.fail_after(30):
            await reached.wait()
        nursery.cancel_scope.cancel()


@pytest.fixture
def member(tmp_path: Path) -> Iterator[tuple[DaemonProcess, Path, str]]:
    daemon = DaemonProcess(tmp_path / "a", extra_args=("--no-lan",)).start()
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "keep.txt").write_text("precious\n")
    ticket = daemon.cli_json("sync", str(folder))["rw"]
    try:
        yield daemon, folder, ticket
    finally:
        daemon.stop()


def listing(root: Path) -> dict[str, bytes]:
    """The user's files: the daemon's state and its temp files left out, and so is a file
    that vanishes under the walk (a temp file renamed into place: ``wait_until`` looks
    again)."""
    found = {}
    for path in root.rglob("*"):
        if ".p2pfs" in path.relative_to(root).parts or path.name.startswith(".p2pfs-"):
            continue
        try:
            if path.is_file():
                found[str(path.relative_to(root))] = path.read_bytes()
        except FileNotFoundError:
            continue
    return found


FOREIGN = FolderKeys.from_write_seed(bytes(range(32)))


FORGED_OR_MALFORMED: list[tuple[str, Callable[[FolderKeys], list[tuple[str, bytes]]]]] = [
    (
        "signature does not verify",
        lambda keys: [("keep.txt", signed(tombstone("keep.txt", 9), FOREIGN))],
    ),
    ("reserved name '..'", lambda keys: [("../evil", raw_record(fields("../evil"), keys))]),
    ("absolute path", lambda keys: [("/etc/x", raw_record(fields("/etc/x"), keys))]),
    ("separator or NUL", lambda keys: [("a\0b", raw_record(fields("a\0b"), keys))]),
    ("bad signature length", lambda keys: [("keep.txt", b"\x92\xc4\x01x\xc4\x01y")]),
    (
        "is misplaced",
        lambda keys: [("other.txt", signed(tombstone("keep.txt", 9), keys))],
    ),
]


@pytest.mark.parametrize(
    ("reason", "records", "root_signed"),
    [
        pytest.param(reason, records, root_signed, id=f"{reason}-{kind}")
        for reason, records in FORGED_OR_MALFORMED
        for root_signed, kind in ((False, "records-signed"), (True, "root-signed"))
        # Under a signed root a record's own signature is not checked again (the write
        # key stands behind the tree), so a foreign one passes there by design.
        if not (root_signed and reason == "signature does not verify")
    ],
)
def test_forged_or_malformed_update_drops_the_member(
    member: tuple[DaemonProcess, Path, str],
    tmp_path: Path,
    reason: str,
    records: Callable[[FolderKeys], list[tuple[str, bytes]]],
    root_signed: bool,
) -> None:
    """Each check drops the member, under an unsigned root and (every check but the
    record's own signature) under a signed one (a read-write member's)."""
    daemon, folder, ticket = member
    before = listing(folder)
    keys = FolderKeys.from_write_seed(bytes(parse_ticket_untrusted(ticket).root))

    def script(hostile: HostileFolder) -> None:
        if root_signed:
            hostile.root_signing = sign_root
        hostile.serve(records(keys))

    dropped = run_hostile_member(tmp_path, ticket, script, backwards=False)
    assert dropped, f"the daemon kept a member whose record has: {reason}"
    assert listing(folder) == before
    assert not (tmp_path / "evil").exists()
    log = daemon.log_path.read_text()
    drops = [line for line in log.splitlines() if "dropping member" in line]
    assert len(drops) == 1 and reason in drops[0], daemon.log_tail()
    assert "Traceback" not in log, daemon.log_tail()
    assert daemon.call("id")  # still serving


@pytest.mark.parametrize(
    "signing",
    [
        pytest.param(lambda _keys, _root: bytes(64), id="zeros"),
        pytest.param(lambda _keys, root: sign_root(FOREIGN, root), id="foreign-key"),
        pytest.param(
            lambda keys, root: sign_root(keys, Child(root.hash, root.size + 1)), id="other-count"
        ),
        pytest.param(
            lambda keys, root: keys.sign(SIGNATURE_DOMAIN + keys.folder_id + bytes(root.hash)),
            id="record-domain",
        ),
    ],
)
def test_index_root_signature_that_does_not_verify_drops_the_member(
    member: tuple[DaemonProcess, Path, str],
    tmp_path: Path,
    signing: Callable[[FolderKeys, Child], bytes],
) -> None:
    """A root signature is checked before anything under that root is fetched: a bad one
    (zeros, another folder's key, another record count, a record-domain signature over the
    same hash) drops the member, even with records that are each validly signed."""
    daemon, folder, ticket = member
    before = listing(folder)
    keys = FolderKeys.from_write_seed(bytes(parse_ticket_untrusted(ticket).root))

    def script(hostile: HostileFolder) -> None:
        hostile.root_signing = signing
        hostile.serve([("keep.txt", signed(tombstone("keep.txt", 9), keys))])

    assert run_hostile_member(tmp_path, ticket, script, backwards=False)
    assert listing(folder) == before
    drops = [line for line in daemon.log_path.read_text().splitlines() if "dropping member" in line]
    assert len(drops) == 1 and "index root signature does not verify" in drops[0]
    assert "Traceback" not in daemon.log_path.read_text(), daemon.log_tail()


def test_vector_going_backwards_drops_the_member(
    member: tuple[DaemonProcess, Path, str], tmp_path: Path
) -> None:
    daemon, folder, ticket = member
    keys = FolderKeys.from_write_seed(bytes(parse_ticket_untrusted(ticket).root))
    before = listing(folder)

    def newer_first(hostile: HostileFolder) -> None:
        hostile.serve([("gone.txt", signed(tombstone("gone.txt", 2), keys))])

    assert run_hostile_member(tmp_path, ticket, newer_first, backwards=True)
    assert listing(folder) == before
    wait_until(lambda: "went backwards" in daemon.log_path.read_text(), timeout=10)
    assert "Traceback" not in daemon.log_path.read_text(), daemon.log_tail()


def test_forged_record_in_a_later_join_batch_keeps_the_batches_before(tmp_path: Path) -> None:
    """A join in batches that overlap (the next planned and started while one commits): a
    forged record in the last batch stops the join with the batches before it placed and
    stored whole, and nothing of its own batch placed."""
    daemon = DaemonProcess(
        tmp_path / "a", extra_args=("--no-lan", "--small-join-batches"), program=HOOKED_DAEMON
    ).start()
    try:
        folder = tmp_path / "folder"
        folder.mkdir()
        (folder / "keep.txt").write_text("precious\n")
        ticket = daemon.cli_json("sync", str(folder))["rw"]
        keys = FolderKeys.from_write_seed(bytes(parse_ticket_untrusted(ticket).root))
        content = tmp_path / "content"
        blobs, file_nodes = served_files(content, 3 * SMALL_JOIN_BATCH - 10, keys)
        # Batches are taken from the end of the member's leaves (path-key order): the
        # forged record, first in that order, is in the last batch.
        first = min(path_key(path) for path, _blob in blobs)
        forged = next(name for n in range(10_000) if path_key(name := f"forged{n}.txt") < first)
        blobs.append((forged, signed(tombstone(forged, 1), FOREIGN)))
        ordered = sorted(blobs, key=lambda item: path_key(item[0]), reverse=True)
        sizes = join_batch_sizes(
            len(blobs), SMALL_JOIN_BATCH, SMALL_JOIN_BATCH // FIRST_BATCH_SHARE
        )
        assert len(sizes) == 4 and sizes[0] < SMALL_JOIN_BATCH  # a short first batch too
        earlier = {path for path, _blob in ordered[: sum(sizes[:-1])]}
        assert forged not in earlier

        def serve(hostile: HostileFolder) -> None:
            hostile.file_nodes = file_nodes
            hostile.serve(blobs)

        assert run_hostile_member(tmp_path, ticket, serve, backwards=False, content=content)
        placed = listing(folder)
        assert set(placed) == {"keep.txt", *earlier}
        for path in earlier:
            assert placed[path] == (content / path).read_bytes()
        log = daemon.log_path.read_text()
        assert "signature does not verify" in log, daemon.log_tail()
        assert "Traceback" not in log, daemon.log_tail()
        # The records stored are those of the files placed: the earlier batches' only.
        (listed,) = daemon.call("sync_list")["folders"]
        assert listed["files"] == 1 + len(earlier), listed
    finally:
        daemon.stop()


def test_member_sending_a_chunk_that_fails_its_hash_is_dropped(
    member: tuple[DaemonProcess, Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A member whose records and trees are honest but one chunk's bytes are not: that file
    is never written (nor any file of the batch it came in), the member is dropped with the
    reason, the daemon goes on, and the files of other batches that were placed are exact."""
    daemon, folder, ticket = member
    keys = FolderKeys.from_write_seed(bytes(parse_ticket_untrusted(ticket).root))
    content = tmp_path / "content"
    blobs, file_nodes = served_files(content, 300, keys)
    bad_path = "f0123.bin"
    bad_chunk = Chunker().chunk_refs((content / bad_path).read_bytes())[0].id
    honest_reads = service_module._read_group

    def lying_reads(wanted: list[tuple[ContentHash, list[ChunkLocation]]]) -> list[bytes | None]:
        found = honest_reads(wanted)
        return [
            bytes([data[0] ^ 0xFF]) + data[1:] if data is not None and cid == bad_chunk else data
            for (cid, _locations), data in zip(wanted, found, strict=True)
        ]

    monkeypatch.setattr(service_module, "_read_group", lying_reads)

    def serve(hostile: HostileFolder) -> None:
        hostile.file_nodes = file_nodes
        hostile.serve(blobs)

    assert run_hostile_member(tmp_path, ticket, serve, backwards=False, content=content)
    # Temp files of the failed batch may stay (a later reconcile resumes them); no file.
    placed = {p: d for p, d in listing(folder).items() if not is_partial_name(Path(p).name)}
    assert bad_path not in placed
    assert placed.pop("keep.txt") == b"precious\n"
    for path, data in placed.items():
        assert data == (content / path).read_bytes(), path
    log = daemon.log_path.read_text()
    drops = [line for line in log.splitlines() if "dropping member" in line]
    assert len(drops) == 1 and "fails its hash" in drops[0], daemon.log_tail()
    assert "Traceback" not in log, daemon.log_tail()
    assert daemon.call("id")  # still serving


@pytest.fixture
def honest_and_victim(tmp_path: Path) -> Iterator[tuple[DaemonProcess, DaemonProcess]]:
    """An honest member (its upload held to 2 MB/s) and the daemon that will join."""
    honest = DaemonProcess(
        tmp_path / "m", extra_args=("--no-lan", "--max-upload-rate", "2000000")
    ).start()
    victim = DaemonProcess(tmp_path / "v", extra_args=("--no-lan",)).start()
    try:
        yield honest, victim
    finally:
        victim.stop()
        honest.stop()


def claim_placing(hostile: HostileFolder, content: Path) -> None:
    """Tell watchers that ``hostile`` places its current root and holds every chunk of
    ``content`` (its chunks are read from its index, as any member's), and move its own
    root to another one (an empty index)."""
    every_chunk = [
        ref.id
        for path in sorted(content.iterdir())
        for ref in Chunker().chunk_refs(path.read_bytes())
    ]
    anywhere = PartialFile(str(content), "x", bytes(32), 0)
    hostile.placing.begin(hostile.root.hash)
    hostile.placing.add((chunk_id, anywhere, 0) for chunk_id in every_chunk)
    hostile.serve([])


@pytest.mark.parametrize("placer", [False, True], ids=["at-the-root", "placing-the-root"])
def test_a_helper_sending_a_chunk_that_fails_its_hash_is_dropped_and_the_member_serves_it(
    honest_and_victim: tuple[DaemonProcess, DaemonProcess],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    placer: bool,
) -> None:
    """The victim joins through an honest member while a hostile member helps with the
    chunks and corrupts every one it sends: it is dropped with the reason, nothing it sent
    is written, the honest member serves its batches, and the files are exact. The hostile
    member is at the same root, or (``placer``) at another root and claims to be placing
    the victim's, holding every chunk of it (FolderPlacing)."""
    honest, victim = honest_and_victim
    honest_dir, victim_dir = tmp_path / "m-folder", tmp_path / "v-folder"
    honest_dir.mkdir()
    ticket = honest.cli_json("sync", str(honest_dir))["rw"]
    keys = FolderKeys.from_write_seed(bytes(parse_ticket_untrusted(ticket).root))
    content = tmp_path / "content"
    blobs, file_nodes = served_files(content, 16, keys, lambda _number: os.urandom(1 << 20))
    lying = [False]
    honest_reads = service_module._read_group

    def reads(wanted: list[tuple[ContentHash, list[ChunkLocation]]]) -> list[bytes | None]:
        found = honest_reads(wanted)
        if not lying[0]:
            return found
        return [bytes([data[0] ^ 0xFF]) + data[1:] if data else data for data in found]

    monkeypatch.setattr(service_module, "_read_group", reads)
    hostile = HostileFolder(keys, file_nodes=file_nodes)
    hostile.serve(blobs)

    async def main() -> bool:
        identity = Identity.generate()
        with IndexStore(tmp_path / "hostile.sqlite3") as store:
            hostile.content = scan_share(content, store).root
            index = AsyncIndex(store)
            server = FolderServer(
                index, lambda fid: hostile if fid == keys.folder_id else None,
                identity.node_id.raw,
            )  # fmt: skip
            service = ShareService(index, TransferCounters(), folders=server)
            async with (
                open_endpoint(identity, "127.0.0.1", 0) as endpoint,
                trio.open_nursery() as nursery,
            ):

                async def member_of(daemon: DaemonProcess) -> PeerConnection:
                    host, port = daemon.address().rsplit(":", 1)
                    conn = await endpoint.connect((host, int(port)), None)
                    nursery.start_soon(service.handle_connection, conn)
                    link = FolderLink(conn, keys, TransferCounters(), identity.node_id.raw)
                    await link.join()
                    return conn

                # The honest member takes the folder from us while we are honest.
                to_honest = await member_of(honest)
                await trio.to_thread.run_sync(
                    lambda: wait_until(lambda: listing(honest_dir) == listing(content))
                )
                lying[0] = True
                if placer:
                    claim_placing(hostile, content)
                await trio.to_thread.run_sync(victim.cli_json, "sync", str(victim_dir), ticket)
                to_victim = await member_of(victim)
                with trio.move_on_after(30) as timeout:
                    await to_victim.wait_closed()
                to_honest.close_nowait(0, "done")
                nursery.cancel_scope.cancel()
            return not timeout.cancelled_caught

    assert trio.run(main)
    wait_until(lambda: listing(victim_dir) == listing(content), timeout=60)
    log = victim.log_path.read_text()
    drops = [line for line in log.splitlines() if "dropping member" in line]
    assert len(drops) == 1 and "fails its hash" in drops[0], victim.log_tail()
    assert "Traceback" not in log, victim.log_tail()
    # Dropping the helper left the link to the honest member alone (it ended that link
    # too, and the join began again once the member had linked back, seconds later).
    assert f"link with {honest.node_id()[:12]} ended" not in log, victim.log_tail()
    assert victim.call("id")
