-- A folder's records are read from here, not held in memory (issue 16): by path (the
-- primary key), by record hash (what members ask for), by parent directory (a partial
-- scan's scope), and in path-key order (the index tree's leaves, streamed at a load).
-- hash, key and dir are derived from path and record (BLAKE3 is not SQL): rows written
-- before this migration get them when their folder is next loaded (NULL until then).
ALTER TABLE folder_records ADD COLUMN hash BLOB;  -- record_hash(record)
ALTER TABLE folder_records ADD COLUMN key BLOB;   -- path_key(path): the index tree's order
ALTER TABLE folder_records ADD COLUMN dir TEXT;   -- the parent directory ('' at the top)
CREATE INDEX folder_records_by_hash ON folder_records (hash);
CREATE INDEX folder_records_by_dir ON folder_records (folder, dir);
CREATE INDEX folder_records_by_key ON folder_records (folder, key, hash);
