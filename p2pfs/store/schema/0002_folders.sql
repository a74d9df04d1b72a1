-- Sync folders: their key material, the signed record of every path, and the members seen.

CREATE TABLE folders (
    id INTEGER PRIMARY KEY,
    folder_id BLOB NOT NULL UNIQUE,
    local_path TEXT NOT NULL UNIQUE,
    read_key BLOB NOT NULL,
    write_public BLOB NOT NULL,
    write_seed BLOB,                 -- NULL on a read-only member
    device BLOB NOT NULL,            -- this membership's device id in version vectors
    created_ns INTEGER NOT NULL
);

-- The folder's index: one signed record (msgpack [FileVersion, signature]) per path,
-- tombstones included. Written in the same transaction as the change it records.
CREATE TABLE folder_records (
    folder INTEGER NOT NULL REFERENCES folders (id) ON DELETE CASCADE,
    path TEXT NOT NULL,
    record BLOB NOT NULL,
    absent INTEGER NOT NULL DEFAULT 0,  -- 1: a live record whose content this node lacks
    PRIMARY KEY (folder, path)
) WITHOUT ROWID;

-- Members this node has proven a connection with, so it can call them again after a restart.
CREATE TABLE folder_peers (
    folder INTEGER NOT NULL REFERENCES folders (id) ON DELETE CASCADE,
    node_id BLOB NOT NULL,
    host TEXT NOT NULL,
    port INTEGER NOT NULL,
    seen_ns INTEGER NOT NULL,
    PRIMARY KEY (folder, node_id)
) WITHOUT ROWID;
