-- The node's index: shares, the local files they are made of, where each chunk can be read,
-- and the directory-tree nodes peers may ask for. File-tree nodes are not stored: they are
-- rebuilt from a file's packed chunk list, which keeps the index under 1 MiB per GiB.

CREATE TABLE shares (
    id INTEGER PRIMARY KEY,
    local_path TEXT NOT NULL UNIQUE,
    root BLOB,                       -- manifest root; NULL until the first scan completes
    manifest BLOB,
    created_ns INTEGER NOT NULL,
    scan_started_ns INTEGER,         -- start of the last completed scan (racy-clean check)
    scan_generation INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX shares_by_root ON shares (root);

-- One row per directory of a share as it sits on disk; a single-file share has one row for
-- the file's parent.
CREATE TABLE dirs (
    id INTEGER PRIMARY KEY,
    share_id INTEGER NOT NULL REFERENCES shares (id),
    path TEXT NOT NULL,              -- absolute on-disk path
    rel TEXT NOT NULL,               -- normalised path inside the share, '' for the top
    generation INTEGER NOT NULL,     -- last scan that visited it; older rows are stale
    -- The directory's tree as last built, valid while its file rows are untouched and its
    -- subdirectories hash to the same subdirs_digest; NULLed by any change to its rows.
    tree_hash BLOB,
    subdirs_digest BLOB,
    UNIQUE (share_id, path)
);

CREATE TABLE files (
    id INTEGER PRIMARY KEY,
    dir_id INTEGER NOT NULL REFERENCES dirs (id),
    name TEXT NOT NULL,              -- on-disk name (may differ from the NFC tree name)
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    inode INTEGER NOT NULL,
    mode INTEGER NOT NULL,
    root BLOB NOT NULL,              -- file-tree root hash
    chunks BLOB NOT NULL,            -- per chunk: 32-byte id + 4-byte little-endian length
    UNIQUE (dir_id, name)
);
-- 8 bytes of the root suffice to find candidates; the full root is compared on lookup.
CREATE INDEX files_by_root ON files (substr(root, 1, 8));

-- First 8 bytes of a chunk id (signed little-endian) -> where in a file it sits. Prefix
-- collisions are legal: a reader hashes what it reads before using it.
CREATE TABLE chunk_locations (
    prefix INTEGER NOT NULL,
    file_id INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    length INTEGER NOT NULL,
    PRIMARY KEY (prefix, file_id, offset)
) WITHOUT ROWID;

CREATE TABLE dir_nodes (
    hash BLOB PRIMARY KEY,
    node BLOB NOT NULL
) WITHOUT ROWID;
