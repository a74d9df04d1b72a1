"""The node home: the directory that holds one node's state (index, keys, config).

Several nodes can live on one machine by giving each its own home.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import platformdirs

from p2pfs.errors import StorageError

HOME_ENV = "P2PFS_HOME"


def resolve_home(
    explicit: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Path:
    """``--home`` if given, else ``$P2PFS_HOME``, else the platform's user data dir.

    The directory is created (mode 0700: it will hold private keys) if missing.
    """
    env = os.environ if environ is None else environ
    if explicit is not None:
        home = Path(explicit)
    elif env.get(HOME_ENV):
        home = Path(env[HOME_ENV])
    else:
        home = Path(platformdirs.user_data_dir("p2pfs"))
    home = home.expanduser().absolute()
    try:
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create node home {home}: {exc.strerror or exc}") from exc
    if not home.is_dir():
        raise StorageError(f"node home {home} is not a directory")
    return home
