-- A paused folder stays paused across restarts (`p2pfs sync pause DIR`, `sync resume`).
ALTER TABLE folders ADD COLUMN paused INTEGER NOT NULL DEFAULT 0;
