-- The ctime a file had when its bytes were read and gave the row's chunks, recorded only
-- when that ctime was settled (older than the read by more than a timestamp tick): while a
-- file's size, mtime, inode and ctime still match, no write has touched it since, and
-- serving its chunks need not hash them again. NULL: unknown (rows from before this
-- migration, files taken from a rename or placed by a fetch): they are hashed when served.
ALTER TABLE files ADD COLUMN settled_ctime_ns INTEGER;
