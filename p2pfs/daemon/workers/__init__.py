"""Data-plane workers (issue 13, first cut): a fetch's bulk transfers from a peer run in a
worker process that owns its own QUIC connection to that peer, while the daemon keeps
control (picker, manifests, index, progress, commits, serving). See SPEC.md "Data plane
workers".

- ``channel.py``: the messages over the pipe between the daemon and a worker;
- ``process.py``: the worker process (``python -m p2pfs.daemon.workers``);
- ``pool.py``: the daemon's side: warm processes, one session per peer.
"""

from .pool import FileInfo, WorkerEndedError, WorkerLink, WorkerPool

__all__ = ["FileInfo", "WorkerEndedError", "WorkerLink", "WorkerPool"]
