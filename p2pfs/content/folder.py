"""The two tree kinds (file = chunks, directory = entries) and the share manifest.

A share is a directory tree. Each file's content is a chunk tree whose root hash and size
its directory entry carries; each directory's content is a directory tree whose root its
parent's entry carries. The manifest binds the top directory's root to the chunker that cut
the files, and its hash is the share's root: the one value a ticket carries.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import blake3
import msgpack

from p2pfs.content.chunking import DEFAULT_CHUNKER, ChunkerParams, ChunkRef
from p2pfs.content.names import name_sort_key, validate_name
from p2pfs.content.tree import (
    MAX_SIZE,
    Child,
    TreeBuilder,
    TreeSchema,
    WalkBound,
)
from p2pfs.errors import InvalidNameError, RemoteProtocolError
from p2pfs.ids import ContentHash, content_hash_untrusted

MAX_CHUNK_LENGTH = 16 << 20
"""No chunker we accept cuts larger chunks (FastCDC's upper bound on max_size)."""
MIN_CHUNK_BOUND = 64
"""The smallest minimum chunk size a manifest may name (ChunkerParams' bound)."""


class ChunkLeafCodec:
    """Leaves of a file tree: ``[length, chunk_id]``."""

    def leaf_to_wire(self, leaf: ChunkRef) -> list[Any]:
        return [leaf.length, leaf.id]

    def leaf_from_wire_untrusted(self, value: object) -> ChunkRef:
        if not isinstance(value, list) or len(value) != 2:
            raise RemoteProtocolError("chunk leaf: expected [length, id]")
        length, raw_id = value
        if type(length) is not int or not 1 <= length <= MAX_CHUNK_LENGTH:
            raise RemoteProtocolError(f"chunk leaf: bad length {length!r}")
        return ChunkRef(content_hash_untrusted(raw_id), length)

    def leaf_key(self, leaf: ChunkRef) -> bytes:
        return leaf.id

    def leaf_size(self, leaf: ChunkRef) -> int:
        return leaf.length

    def check_leaf_order_untrusted(self, previous: ChunkRef, current: ChunkRef) -> None:
        """Chunks keep file order; any order (and repetition) is legal."""

    strict_order = False

    def __init__(self, min_chunk: int = MIN_CHUNK_BOUND) -> None:
        self.min_chunk = min_chunk

    def leaf_bound(self, size: int) -> int | None:
        # Every chunk but a file's last is at least the chunker's minimum size.
        return -(-size // self.min_chunk) + 1


class EntryKind(enum.IntEnum):
    FILE = 0
    DIRECTORY = 1


FLAG_EXECUTABLE = 0x1
"""The only mode bit that matters across machines: whether a file is executable."""
KNOWN_FLAGS = FLAG_EXECUTABLE


@dataclass(frozen=True, slots=True)
class DirEntry:
    """One name in a directory: a file (chunk-tree root) or a subdirectory (its tree root).

    ``size`` is the file's length, or the total bytes of all files below a directory.
    mtime is deliberately absent: a share's root changes iff its content changes.
    """

    name: str
    kind: EntryKind
    flags: int
    size: int
    hash: ContentHash

    @property
    def executable(self) -> bool:
        return bool(self.flags & FLAG_EXECUTABLE)

    @property
    def root(self) -> Child:
        return Child(self.hash, self.size)


class DirLeafCodec:
    """Leaves of a directory tree: ``[name, kind, flags, size, root]`` sorted by name."""

    def leaf_to_wire(self, leaf: DirEntry) -> list[Any]:
        return [leaf.name, int(leaf.kind), leaf.flags, leaf.size, leaf.hash]

    def leaf_from_wire_untrusted(self, value: object) -> DirEntry:
        if not isinstance(value, list) or len(value) != 5:
            raise RemoteProtocolError("directory entry: expected [name, kind, flags, size, root]")
        name, kind, flags, size, raw_hash = value
        if not isinstance(name, str):
            raise RemoteProtocolError("directory entry: name must be a string")
        try:
            validate_name(name)
        except InvalidNameError as exc:
            raise RemoteProtocolError(f"directory entry: {exc}") from exc
        if type(kind) is not int or kind not in (EntryKind.FILE, EntryKind.DIRECTORY):
            raise RemoteProtocolError(f"directory entry {name!r}: unknown kind {kind!r}")
        if type(flags) is not int or flags & ~KNOWN_FLAGS:
            raise RemoteProtocolError(f"directory entry {name!r}: unknown flags {flags!r}")
        if kind == EntryKind.DIRECTORY and flags:
            raise RemoteProtocolError(f"directory entry {name!r}: a directory has no flags")
        if type(size) is not int or not 0 <= size <= MAX_SIZE:
            raise RemoteProtocolError(f"directory entry {name!r}: bad size {size!r}")
        return DirEntry(name, EntryKind(kind), flags, size, content_hash_untrusted(raw_hash))

    def leaf_key(self, leaf: DirEntry) -> bytes:
        # Keyed by name only, so editing a file never moves a group boundary.
        return blake3.blake3(leaf.name.encode("utf-8")).digest()

    def leaf_size(self, leaf: DirEntry) -> int:
        return leaf.size

    strict_order = True

    def leaf_bound(self, size: int) -> int | None:
        return None  # sizes are bytes below; a directory's entries are bounded by counts

    def check_leaf_order_untrusted(self, previous: DirEntry, current: DirEntry) -> None:
        if name_sort_key(previous.name) >= name_sort_key(current.name):
            raise RemoteProtocolError(
                f"directory entries out of order or repeated: {previous.name!r}, {current.name!r}"
            )


FILE_TREE: TreeSchema[ChunkRef] = TreeSchema(
    "file tree", "p2pfs 2026-11-22 file tree node v1", ChunkLeafCodec()
)
DIR_TREE: TreeSchema[DirEntry] = TreeSchema(
    "directory tree", "p2pfs 2026-11-22 directory tree node v1", DirLeafCodec()
)


def file_tree(chunker: ChunkerParams) -> TreeSchema[ChunkRef]:
    """The file tree schema whose leaf bound uses ``chunker``'s minimum chunk size (the
    nodes and hashes are FILE_TREE's; only the bound on untrusted walks is tighter)."""
    return TreeSchema(FILE_TREE.name, FILE_TREE.context, ChunkLeafCodec(chunker.min_size))


MANIFEST_CONTEXT = "p2pfs 2026-11-22 share manifest v1"
MANIFEST_VERSION = 1
MAX_MANIFEST_BYTES = 4096


def sorted_entries(entries: Iterable[DirEntry]) -> list[DirEntry]:
    """Entries in tree order; refuses two entries with the same name."""
    ordered = sorted(entries, key=lambda entry: name_sort_key(entry.name))
    for previous, current in itertools.pairwise(ordered):
        if previous.name == current.name:
            raise InvalidNameError(f"two entries named {current.name!r}")
    return ordered


def build_directory(entries: Iterable[DirEntry], builder: TreeBuilder[DirEntry]) -> Child:
    """Feed a directory's entries (any order) into ``builder`` and return the root."""
    builder.extend(sorted_entries(entries))
    return builder.finish()


@dataclass(frozen=True, slots=True)
class Manifest:
    """The head of a share. Its keyed hash is the share root that tickets carry.

    ``name`` is what the share was called where it was made (a folder's or file's base
    name); ``single_file`` says the tree holds exactly that one file at its top.
    """

    name: str
    chunker: ChunkerParams
    tree: Child
    file_count: int
    directory_count: int
    single_file: bool
    version: int = MANIFEST_VERSION

    def encode(self) -> bytes:
        return msgpack.packb(  # type: ignore[no-any-return]
            [
                self.version,
                self.name,
                self.chunker.to_wire(),
                self.tree.hash,
                self.tree.size,
                self.file_count,
                self.directory_count,
                self.single_file,
            ],
            use_bin_type=True,
        )

    def root(self) -> ContentHash:
        return manifest_root(self.encode())

    @classmethod
    def decode_untrusted(cls, data: bytes) -> Manifest:
        if len(data) > MAX_MANIFEST_BYTES:
            raise RemoteProtocolError(f"manifest of {len(data)} bytes exceeds bound")
        try:
            value = msgpack.unpackb(
                data,
                raw=False,
                max_bin_len=MAX_MANIFEST_BYTES,
                max_str_len=MAX_MANIFEST_BYTES,
                max_array_len=16,
                max_map_len=0,
                max_ext_len=0,
            )
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise RemoteProtocolError(f"manifest: malformed msgpack: {exc}") from exc
        if not isinstance(value, list) or not value:
            raise RemoteProtocolError("manifest: expected an array")
        version = value[0]
        if type(version) is not int:
            raise RemoteProtocolError("manifest: version must be an integer")
        if version != MANIFEST_VERSION:
            raise RemoteProtocolError(f"manifest: unsupported version {version}")
        if len(value) != 8:
            raise RemoteProtocolError("manifest: expected 8 fields")
        _, name, chunker, tree_hash, tree_size, files, directories, single_file = value
        if not isinstance(name, str):
            raise RemoteProtocolError("manifest: name must be a string")
        try:
            validate_name(name)
        except InvalidNameError as exc:
            raise RemoteProtocolError(f"manifest: {exc}") from exc
        for count in (tree_size, files, directories):
            if type(count) is not int or not 0 <= count <= MAX_SIZE:
                raise RemoteProtocolError(f"manifest: bad count {count!r}")
        if type(single_file) is not bool:
            raise RemoteProtocolError("manifest: single_file must be a boolean")
        manifest = cls(
            name=name,
            chunker=ChunkerParams.from_wire_untrusted(chunker),
            tree=Child(content_hash_untrusted(tree_hash), tree_size),
            file_count=files,
            directory_count=directories,
            single_file=single_file,
        )
        if manifest.encode() != data:
            raise RemoteProtocolError("manifest: encoding is not canonical")
        return manifest


def share_bound(manifest: Manifest) -> WalkBound:
    """One bound for every directory tree of a share: its entries are at most the files
    and directories the manifest counts (the top directory is not an entry)."""
    return WalkBound(manifest.file_count + manifest.directory_count)


def manifest_root(encoded: bytes) -> ContentHash:
    return ContentHash(blake3.blake3(encoded, derive_key_context=MANIFEST_CONTEXT).digest())


def default_manifest(
    name: str, tree: Child, file_count: int, directory_count: int, single_file: bool
) -> Manifest:
    return Manifest(name, DEFAULT_CHUNKER, tree, file_count, directory_count, single_file)
