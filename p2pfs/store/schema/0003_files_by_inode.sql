-- A file renamed or moved keeps its inode, size and mtime: a scan finds its content here
-- instead of reading it again.
CREATE INDEX files_by_inode ON files (inode);
