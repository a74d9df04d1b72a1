"""Folder sync as a sans-I/O core: version vectors and the per-path sync planner.

Nothing here touches the network, the disk or the clock: the daemon feeds in the versions
it holds and receives, and applies the actions the planner returns.
"""
