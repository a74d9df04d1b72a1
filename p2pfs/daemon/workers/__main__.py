"""``python -m p2pfs.daemon.workers``: a data-plane worker process (see process.py)."""

from p2pfs.daemon.workers.process import main

raise SystemExit(main())
