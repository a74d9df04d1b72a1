"""The node home: the directory that holds one node's state (index, keys, config).

Several nodes can live on one machine by giving each its own home. The node key file is read
and written here (the edge); :class:`p2pfs.identity.Identity` is the key in memory.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import platformdirs

from p2pfs.errors import LocalProtocolError, StorageError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from p2pfs.identity import Identity

logger = logging.getLogger(__name__)

HOME_ENV = "P2PFS_HOME"
LOCK_NAME = "daemon.lock"
KEY_FILE = "node.key"
CERT_FILE = "node.crt"


class DaemonRunningError(LocalProtocolError):
    """Another daemon holds this home."""

    def __init__(self, home: Path, pid: str) -> None:
        who = f"pid {pid}" if pid else "pid unknown"
        super().__init__(
            f"a p2pfs daemon is already running for {home} ({who}); stop it with "
            "`p2pfs stop`, or give this one its own --home"
        )
        self.pid = pid


@contextlib.contextmanager
def hold_home_lock(home: Path) -> Iterator[None]:
    """One daemon per home: an exclusive lock on ``home/daemon.lock`` for the daemon's life,
    holding its pid. The kernel drops the lock when the process dies, however it dies, so a
    stale lock file never blocks a restart and a live daemon's socket is never taken over."""
    path = home / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
            raise DaemonRunningError(home, pid) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def tighten_home(home: Path) -> None:
    """The home holds private keys and folder write seeds: nobody else may read it. New
    files are private by the daemon's umask; an existing home made looser is tightened."""
    info = home.lstat()
    if info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(home, stat.S_IMODE(info.st_mode) & 0o700)


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


def load_identity(home: Path) -> Identity:
    """Load the node key from ``home`` (creating key and certificate on first use)."""
    # Imported here: every CLI command resolves its home, and the key's libraries (X.509
    # among them) were 20 of the CLI's 130 ms of start-up; only the daemon needs them.
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: PLC0415

    from p2pfs.identity import Identity  # noqa: PLC0415

    home.mkdir(parents=True, exist_ok=True)
    key_path = home / KEY_FILE
    cert_path = home / CERT_FILE
    if key_path.exists():
        key = _read_private_key(key_path)
    else:
        key = Ed25519PrivateKey.generate()
        _write_atomic(key_path, Identity.from_private_key(key).private_key_pem)
        logger.info("created node key %s", key_path)
    identity = Identity.from_private_key(key)
    if not cert_path.exists() or cert_path.read_bytes() != identity.certificate_pem:
        # The certificate is derived from the key; rewriting it heals a missing or stale file.
        _write_atomic(cert_path, identity.certificate_pem)
    return identity


def _read_private_key(path: Path) -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: PLC0415

    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("node key %s is readable by others (mode %o)", path, mode & 0o777)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise StorageError(f"node key {path} is unreadable: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise StorageError(f"node key {path} is not an Ed25519 key")
    return key


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (mode 0600) so a crash leaves either nothing or all of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
