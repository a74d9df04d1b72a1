"""Folder sync in the daemon: folders, their members, and applying what members changed."""
