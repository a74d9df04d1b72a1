"""Atomic file assembly: chunks land in a temp file beside the destination, which is renamed
into place only once every chunk is verified and the data is durable.

A crash or kill at any moment leaves the destination either absent/old or complete/new,
never torn. The temp file is the record of progress: on resume its chunks are hashed again
(BLAKE3 runs at several GB/s, far faster than any network), so a half-written chunk from a
crash can never be mistaken for a good one, and no journal can disagree with the disk.

Durability is paid per batch, not per file: a batch of finished files is made durable by
``syncfs(2)`` on their file system (``fsync`` of each file where syncfs is missing), then
renamed, then the renames made durable by one more syncfs (an fsync of each directory
touched without it). ``sync()`` was used before, but it cannot report a writeback error,
so a failed write could be renamed into place as good.

Hostile neighbours: a local user who can write into the destination directory must not
redirect a write. Everything is done relative to a descriptor of the destination
directory, opened without following a final symlink and checked to stay the same
directory (one per directory for a batch's files, given ``SharedDirectories``); temp
files are created with ``O_EXCL | O_NOFOLLOW``; an existing temp file is resumed only if
it is a regular file we own with one link. While a PartialFile holds its temp file it
holds an exclusive ``flock`` on it, so a second fetch of the same content to the same
place (in this daemon or another) fails at once instead of racing it. Each PartialFile
remembers which byte ranges it verified in which temp file (by inode): a temp file
replaced behind its back, or one with a byte never verified, is never committed.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import functools
import logging
import mmap
import os
import stat
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from p2pfs.content.chunking import ChunkRef, chunk_id
from p2pfs.errors import IntegrityError, StorageError
from p2pfs.store.directories import DirectoryIdentity, SharedDirectories, open_directory

logger = logging.getLogger(__name__)

PARTIAL_PREFIX = ".p2pfs-part-"
"""Temp files start with this; scanners skip them and they are never shared."""


PARTIAL_NAME_BYTES = 100
"""Bytes of the final name kept in a temp name (so it stays under 255 bytes in UTF-8)."""


PARTIAL_ROOT_DIGITS = 24
"""Hex digits of the file's root in a temp name: what tells temp files of the same content
apart from others (a collision only costs chunks that then fail verification)."""


def partial_name(final_name: str, file_root: bytes) -> str:
    """Stable per (name, content), so a resumed fetch finds its own earlier progress."""
    kept = final_name.encode("utf-8")[:PARTIAL_NAME_BYTES].decode("utf-8", "ignore")
    return f"{PARTIAL_PREFIX}{file_root.hex()[:PARTIAL_ROOT_DIGITS]}-{kept}"


def partial_content(name: str) -> str:
    """The content part of a temp name (equal for temp files of the same file root)."""
    return name[: len(PARTIAL_PREFIX) + PARTIAL_ROOT_DIGITS]


def is_partial_name(name: str) -> bool:
    return name.startswith(PARTIAL_PREFIX)


# O_NONBLOCK: a fifo planted under a temp name must not block the open.
_OPEN_EXISTING = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_CREATE = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_DONOR = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


_HOLDERS: dict[tuple[int, int], weakref.ref[PartialFile]] = {}
"""Temp files (st_dev, st_ino) locked by a PartialFile of this process."""
_HOLDERS_LOCK = threading.Lock()


@functools.cache
def _inert() -> int:
    """A descriptor that no write, chmod, sync or lookup can use (O_PATH of a regular file):
    dup2-ed over a revoked holder's descriptors, so their numbers stay taken (never reused
    by another open) while every use of them fails."""
    return os.open(sys.executable, os.O_PATH | os.O_CLOEXEC)


class PartialFile:
    """A destination file under construction. Holds a file descriptor (and the lock on the
    temp file) only while written; the directory and temp file it first used are the only
    ones it will ever write or commit. ``directories``: the batch's shared directory
    descriptors (else it opens its own)."""

    def __init__(
        self,
        directory: str,
        final_name: str,
        file_root: bytes,
        size: int,
        *,
        directories: SharedDirectories | None = None,
    ) -> None:
        self.directory = directory
        self.final_name = final_name
        self.temp_name = partial_name(final_name, file_root)
        self.final_path = os.path.join(directory, final_name)
        self.temp_path = os.path.join(directory, self.temp_name)
        self.size = size
        self._fd = -1
        self._dir_fd = -1
        self._directories = directories
        self._dir_lent = False
        """_dir_fd is lent by ``directories`` (released, not closed, by close)."""
        self._dir_identity: DirectoryIdentity | None = None
        self._identity: tuple[int, int] | None = None
        self._generation: int | None = None
        """The inode's generation (FS_IOC_GETVERSION) where the file system has one."""
        self._generation_due = False
        """The generation is still to be read from _fd: only a temp file closed before its
        commit is ever reopened and compared, so it is read at close, not at the open."""
        self._verified: dict[int, int] = {}
        """Offset -> length of the bytes known good in the temp file named by _identity."""
        self._revoked = False
        self._unsynced = 0
        """Bytes written through the cache since the kernel was last told to write back."""
        self._finished_as: tuple[bool, int | None] | None = None
        """(executable, mtime_ns) given to write_new: the temp file was written whole and
        closed with that metadata, so its commit needs no reopen (see write_new)."""
        # A fetch verifies and writes batches in worker threads, several at once, and two
        # may hold chunks of one file: without this, both found no descriptor open, the
        # second failed on the first's lock ("another fetch is writing") and its cleanup
        # closed the descriptor the first was writing through. Reentrant: _open's failure
        # path calls close.
        self._descriptor_lock = threading.RLock()

    # -- descriptors ----------------------------------------------------------------------

    def _directory_fd(self) -> int:
        if self._dir_fd >= 0:
            return self._dir_fd
        with self._descriptor_lock:
            if self._dir_fd >= 0:
                return self._dir_fd
            if self._directories is not None:
                fd, identity = self._directories.acquire(self.directory)
            else:
                fd, identity = open_directory(self.directory)
            if self._dir_identity not in (None, identity):
                if self._directories is not None:
                    self._directories.release(self.directory)
                else:
                    os.close(fd)
                raise StorageError(
                    f"{self.directory} was replaced while {self.final_name} was written"
                )
            self._dir_identity = identity
            self._dir_lent = self._directories is not None
            self._dir_fd = fd
            return fd

    def _open(self, *, create: bool = True) -> int:
        """The temp file, locked; -1 if it does not exist and ``create`` is false."""
        fd = self._fd
        if fd >= 0:
            return fd
        with self._descriptor_lock:
            return self._open_locked(create)

    def _open_locked(self, create: bool) -> int:
        if self._fd >= 0:
            return self._fd  # another thread opened it while we waited
        dir_fd = self._directory_fd()
        try:
            fd = self._open_existing(dir_fd)
            if fd < 0:
                if not create or self._identity is not None:
                    # Ours vanished (committed or removed by another fetch): never start
                    # over silently, the chunks we verified were in that file.
                    if self._identity is not None:
                        raise StorageError(f"{self.temp_path} vanished while being fetched")
                    return -1
                fd = os.open(self.temp_name, _CREATE, 0o600, dir_fd=dir_fd)
        except OSError as exc:
            self.close()
            raise StorageError(f"cannot create {self.temp_path}: {_why(exc)}") from exc
        try:
            self._adopt(fd)
        except BaseException:
            os.close(fd)
            self.close()
            raise
        self._fd = fd
        return fd

    def _open_existing(self, dir_fd: int) -> int:
        """An existing temp file if it is one we can trust (a regular file we own, one
        link); anything else under that name is removed, unless we already wrote ours."""
        try:
            fd = os.open(self.temp_name, _OPEN_EXISTING, dir_fd=dir_fd)
        except FileNotFoundError:
            return -1
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.EACCES):
                raise
            self._remove_foreign(dir_fd, f"{exc.strerror}")
            return -1
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and st.st_nlink == 1:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
            return fd
        os.close(fd)
        self._remove_foreign(dir_fd, "not a regular file of ours with one link")
        return -1

    def _remove_foreign(self, dir_fd: int, why: str) -> None:
        if self._identity is not None:
            raise StorageError(f"{self.temp_path} was replaced while being fetched ({why})")
        logger.warning("removing %s before fetching: %s", self.temp_path, why)
        try:
            os.unlink(self.temp_name, dir_fd=dir_fd)
        except OSError as exc:
            raise StorageError(f"cannot remove foreign {self.temp_path}: {_why(exc)}") from exc

    def _adopt(self, fd: int, *, size_it: bool = True) -> None:
        """Lock the temp file and check it is the one we verified chunks in."""
        if self._revoked:
            raise StorageError(f"another fetch took over {self.temp_path}")
        st = os.fstat(fd)
        identity = (st.st_dev, st.st_ino)
        with _HOLDERS_LOCK:
            if not _try_lock(fd):
                # Held in this process: by a PartialFile of a fetch that failed without
                # closing it (the newer fetch takes over), or of one still running (it
                # fails at its next step). Another process's lock is never taken.
                holder = _HOLDERS.get(identity, lambda: None)()
                if holder is not None and holder is not self:
                    holder._revoke()
                if not _try_lock(fd):
                    raise StorageError(f"another fetch is writing {self.temp_path}")
            _HOLDERS[identity] = weakref.ref(self)
        # The inode number alone is not enough: a temp file removed and planted again
        # while ours was closed may get the same number (ext4 hands it out again at
        # once), and would have been adopted with our verified ranges (a right-sized file
        # of zeros committed). The file system's generation of the inode tells them apart.
        if self._identity is None:
            self._generation_due = True  # read at close, if it is closed before its commit
        elif identity != self._identity or _generation(fd) != self._generation:
            raise StorageError(f"{self.temp_path} was replaced while being fetched")
        self._identity = identity
        if size_it and st.st_size != self.size:
            os.ftruncate(fd, self.size)

    def _revoke(self) -> None:
        """Called under _HOLDERS_LOCK: drop our lock without freeing our descriptor numbers
        (another thread may be about to use them); every later step of ours fails."""
        self._revoked = True
        if self._fd >= 0:
            os.dup2(_inert(), self._fd)  # the locked file's last descriptor goes: lock released
        if self._dir_lent:
            # The batch's descriptor stays open for its other files (and lent to us until we
            # close): only our own uses of it end.
            self._dir_fd = _inert()
        elif self._dir_fd >= 0:
            os.dup2(_inert(), self._dir_fd)

    def close(self) -> None:
        with self._descriptor_lock, _HOLDERS_LOCK:
            holder = _HOLDERS.get(self._identity) if self._identity is not None else None
            if holder is not None and holder() is self:
                del _HOLDERS[self._identity]  # type: ignore[arg-type]
            if self._fd >= 0:
                if self._generation_due and not self._revoked:
                    self._generation = _generation(self._fd)
                self._generation_due = False
                os.close(self._fd)  # releases the flock
                self._fd = -1
            if self._dir_lent:
                assert self._directories is not None
                self._directories.release(self.directory)
                self._dir_lent = False
            elif self._dir_fd >= 0:
                os.close(self._dir_fd)
            self._dir_fd = -1

    def __del__(self) -> None:
        # A fetch that fails may drop its PartialFiles without closing them.
        if self._fd >= 0 or self._dir_fd >= 0:
            self.close()

    def __enter__(self) -> PartialFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- content --------------------------------------------------------------------------

    def verified_chunks(self, chunks: Iterable[tuple[int, ChunkRef]]) -> set[int]:
        """Offsets of the chunks already present and intact (left by an earlier attempt)."""
        fd = self._open(create=False)
        if fd < 0:
            return set()
        present = set()
        for offset, ref in chunks:
            try:
                data = os.pread(fd, ref.length, offset)
            except OSError as exc:
                raise StorageError(f"cannot read {self.temp_path}: {_why(exc)}") from exc
            if len(data) == ref.length and chunk_id(data) == ref.id:
                present.add(offset)
                self._verified[offset] = ref.length
        return present

    def write_chunk(self, offset: int, data: bytes | memoryview, expected: ChunkRef) -> None:
        """Write verified bytes only: the check happens here, at the last moment."""
        if len(data) != expected.length or chunk_id(data) != expected.id:
            raise IntegrityError(f"chunk for {self.final_path} at {offset} fails its hash")
        self.write_verified(offset, data)

    def write_verified(self, offset: int, data: bytes | memoryview) -> None:
        """For callers that verified ``data`` themselves (hashing twice is waste)."""
        if offset < 0 or offset + len(data) > self.size:
            raise StorageError(f"write past the end of {self.final_path}")
        fd = self._open()
        self._finished_as = None  # written again: its commit takes the general path
        try:
            _write_at(fd, data, offset)
        except OSError as exc:
            raise StorageError(f"cannot write {self.temp_path}: {exc.strerror}") from exc
        self._verified[offset] = max(self._verified.get(offset, 0), len(data))
        self._unsynced += len(data)
        if self._unsynced >= WRITEBACK_EVERY:
            # Threads may race on the count: it only paces an advisory call.
            self._unsynced = 0
            _start_writeback(fd)

    def writer_identity(self) -> tuple[int, int]:
        """Open (creating it if need be) and lock the temp file; its (st_dev, st_ino). A
        data-plane worker process writes verified chunks into exactly this file: it opens
        the path itself and refuses any other inode."""
        self._open()
        assert self._identity is not None
        return self._identity

    def mark_verified(self, offset: int, length: int) -> None:
        """A chunk another process (a data-plane worker) verified and wrote here."""
        if offset < 0 or offset + length > self.size:
            raise StorageError(f"chunk past the end of {self.final_path}")
        self._finished_as = None  # written again: its commit takes the general path
        self._verified[offset] = max(self._verified.get(offset, 0), length)

    @property
    def untouched(self) -> bool:
        """No temp file was opened or written by this PartialFile yet."""
        return self._identity is None and self._fd < 0 and not self._verified

    def write_new(
        self,
        parts: Sequence[tuple[int, bytes | memoryview]],
        executable: bool,
        mtime_ns: int | None = None,
    ) -> bool:
        """Write a new file whole in one step: create its temp file, write the (verified)
        ``parts`` (offset, bytes), give it its mode and mtime; it stays open (and locked)
        for its commit, which then neither reopens it nor sets anything. Returns False,
        having done nothing, where this does not apply: a temp file already under our
        name (an earlier attempt to resume, or a foreign one: the general path sorts them
        out) or one this PartialFile already opened.

        Why: a small file written chunk by chunk paid a failed open, a create, lock,
        truncate and close, then a reopen and lock for its mode, another for its rename
        (~40 system calls a file, issue 13's small-files profile); here 4 (create with its
        mode, fstat, flock, write; utime given an mtime) and the commit's lstat, rename and
        close, given the batch's ``SharedDirectories``.
        The caller closes it (commit_files does) or keeps few such files open.
        """
        if not self.untouched or self._revoked:
            return False
        total = sum(len(data) for _offset, data in parts)
        if any(offset < 0 or offset + len(data) > self.size for offset, data in parts):
            raise StorageError(f"write past the end of {self.final_path}")
        mode = 0o755 if executable else 0o644
        with self._descriptor_lock:
            dir_fd = self._directory_fd()
            try:
                # Created with its final mode (the kernel applies the umask, as the
                # general path's fchmod does): its bytes are verified before they are
                # written, so nothing private shows in it meanwhile; one call fewer a file.
                fd = os.open(self.temp_name, _CREATE, mode, dir_fd=dir_fd)
            except FileExistsError:
                return False
            except OSError as exc:
                self.close()
                raise StorageError(f"cannot create {self.temp_path}: {_why(exc)}") from exc
            try:
                self._adopt(fd, size_it=total != self.size)
            except BaseException:
                os.close(fd)
                self.close()
                raise
            self._fd = fd
            try:
                for offset, data in parts:
                    _write_at(fd, data, offset)
                    self._verified[offset] = max(self._verified.get(offset, 0), len(data))
                if mtime_ns is not None:
                    os.utime(fd, ns=(mtime_ns, mtime_ns))
            except OSError as exc:
                self.close()
                raise StorageError(f"cannot write {self.temp_path}: {_why(exc)}") from exc
            self._finished_as = (executable, mtime_ns)
        return True

    def copy_chunks(
        self, source_fd: int, source_offset: int, offset: int, refs: Sequence[ChunkRef]
    ) -> set[int]:
        """Copy a run of chunks from another file (an edited file's previous version): read
        into a buffer, each chunk verified there and only the chunks that verify written
        (one whose source bytes changed since they were indexed stays unwritten and
        unverified); returns the offsets written.

        A long run goes around the page cache: its page-aligned stretches are written with
        ``O_DIRECT`` from one reused buffer, their edges through the cache. Why: copying
        into the cache (``copy_file_range`` before) makes the kernel find a fresh page for
        every 4 KiB of the new file, which on this VM (free pages handed back to the host)
        cost 0.06-0.6 s per 256 MiB, and the commit's fsync then wrote it all out again
        (0.09-0.16 s); a direct write was 0.17-0.25 s for both, steadily.
        """
        total = sum(ref.length for ref in refs)
        if offset < 0 or offset + total > self.size:
            raise StorageError(f"copy past the end of {self.final_path}")
        fd = self._open()
        self._finished_as = None
        direct = self._direct_descriptor() if total >= DIRECT_MIN else -1
        try:
            written = _copy_verified(source_fd, source_offset, fd, direct, offset, refs)
        except OSError as exc:
            raise StorageError(f"cannot copy into {self.temp_path}: {_why(exc)}") from exc
        finally:
            if direct >= 0:
                os.close(direct)
        for position, length in written.items():
            self._verified[position] = max(self._verified.get(position, 0), length)
        return set(written)

    def take_from(self, donor_name: str, leaves: Sequence[tuple[int, ChunkRef]]) -> set[int]:
        """Copy in the chunks another temp file in this directory holds (one of the same
        content under another name: a download refused because its file changed locally,
        now wanted as the conflict copy); ``leaves`` are this file's chunks, in order from
        offset 0, which is the donor's layout too. Each chunk is verified before it is
        written, so a planted or half-written donor gives nothing wrong. A donor that gave
        every chunk is removed (unless another fetch holds it): its content lives on here.
        Returns the offsets written."""
        if not leaves or donor_name == self.temp_name or not is_partial_name(donor_name):
            return set()
        dir_fd = self._directory_fd()
        try:
            donor = os.open(donor_name, _OPEN_DONOR, dir_fd=dir_fd)
        except OSError:
            return set()
        try:
            st = os.fstat(donor)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
                return set()
            fcntl.fcntl(donor, fcntl.F_SETFL, fcntl.fcntl(donor, fcntl.F_GETFL) & ~os.O_NONBLOCK)
            written = self.copy_chunks(donor, 0, 0, [ref for _offset, ref in leaves])
            if len(written) == len(leaves) and _try_lock(donor):
                with contextlib.suppress(OSError):
                    named = os.lstat(donor_name, dir_fd=dir_fd)
                    if (named.st_dev, named.st_ino) == (st.st_dev, st.st_ino):
                        os.unlink(donor_name, dir_fd=dir_fd)
            return written
        finally:
            os.close(donor)

    def _direct_descriptor(self) -> int:
        """A second, ``O_DIRECT`` descriptor of our temp file (checked to be the inode we
        hold); -1 where the file system has no direct I/O (tmpfs) or the name moved."""
        if not _DIRECT:
            return -1
        try:
            fd = os.open(self.temp_name, _OPEN_DIRECT, dir_fd=self._directory_fd())
        except OSError:
            return -1
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != self._identity or not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return -1
        return fd

    def fully_verified(self) -> bool:
        """Every byte of the file was verified into this temp file."""
        covered = 0
        for offset in sorted(self._verified):
            if offset > covered:
                return False
            covered = max(covered, offset + self._verified[offset])
        return covered >= self.size

    # -- commit ---------------------------------------------------------------------------

    def commit(self, executable: bool, mtime_ns: int | None = None) -> None:
        """Make the data durable, then atomically replace the destination with it."""
        commit_files([Finished(self, executable, mtime_ns)])

    def _prepare(self, executable: bool, mtime_ns: int | None, fsync: bool) -> int:
        """Metadata on the temp file (and its data durable if ``fsync``); returns the file
        system's st_dev (for a syncfs). Refuses anything not verified."""
        if self._finished_as == (executable, mtime_ns) and not fsync and self._fd >= 0:
            # Written whole by write_new with this metadata, still open: nothing to set.
            if self._revoked:
                raise StorageError(f"another fetch took over {self.temp_path}")
            if not self.fully_verified():
                raise StorageError(f"{self.final_path}: not every byte was verified")
            assert self._identity is not None
            return self._identity[0]
        self._finished_as = None
        fd = self._open()  # an empty file was never written: create it now
        if self._revoked:
            raise StorageError(f"another fetch took over {self.temp_path}")
        if not self.fully_verified():
            raise StorageError(f"{self.final_path}: not every byte was verified; not committing")
        try:
            mode = 0o755 if executable else 0o644
            os.fchmod(fd, mode & ~_UMASK)
            if mtime_ns is not None:
                os.utime(fd, ns=(mtime_ns, mtime_ns))
            if fsync:
                os.fsync(fd)
        except OSError as exc:
            raise StorageError(f"cannot finish {self.temp_path}: {_why(exc)}") from exc
        return os.fstat(fd).st_dev

    def _place(self) -> None:
        """Rename our (locked, verified) temp file over the destination, within the
        directory we opened; a directory in the way is refused, not replaced. Our
        descriptor is still open where the batch kept it (no reopen): then the name is
        checked against an inode we hold, which no other file can have."""
        fd = self._open(create=False)
        dir_fd = self._dir_fd
        try:
            if self._revoked:
                raise StorageError(f"another fetch took over {self.temp_path}")
            if fd < 0:
                raise StorageError(f"{self.temp_path} is gone")
            named = os.lstat(self.temp_name, dir_fd=dir_fd)
            if (named.st_dev, named.st_ino) != self._identity:
                raise StorageError(f"{self.temp_path} was replaced while being fetched")
            # A directory in the way makes rename fail (EISDIR): no lstat of it first.
            os.rename(self.temp_name, self.final_name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            self._generation_due = False  # placed: never reopened
        except IsADirectoryError as exc:
            raise StorageError(
                f"{self.final_path} is a directory; not replacing it with a file"
            ) from exc
        except OSError as exc:
            raise StorageError(f"cannot place {self.final_path}: {_why(exc)}") from exc
        finally:
            self.close()

    def final_state(self) -> os.stat_result | None:
        """What is under the final name now, in the directory this file is placed into
        (not reached through the path again: nothing swapped in on the way is followed);
        None if nothing is. Raises StorageError when it cannot be read."""
        try:
            return os.lstat(self.final_name, dir_fd=self._directory_fd())
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read {self.final_path}: {_why(exc)}") from exc

    def discard(self) -> None:
        """Remove our temp file (only ours: never one that replaced it, nor one another
        fetch took over)."""
        try:
            if self._revoked:
                return
            dir_fd = self._directory_fd()
            named = os.lstat(self.temp_name, dir_fd=dir_fd)
            if self._identity is None or (named.st_dev, named.st_ino) == self._identity:
                os.unlink(self.temp_name, dir_fd=dir_fd)
        except (OSError, StorageError):
            pass  # nothing of ours left there
        finally:
            self.close()


@dataclass(frozen=True, slots=True)
class Finished:
    """A complete temp file and the metadata its destination gets."""

    partial: PartialFile
    executable: bool
    mtime_ns: int | None = None


FailedFile = Callable[[Finished, StorageError], None]

KEEP_OPEN = 1024
"""commit_files keeps the descriptors of a batch this big open through its commit."""


def commit_files(
    files: Sequence[Finished],
    before_replace: Callable[[Finished], bool] | None = None,
    on_error: FailedFile | None = None,
) -> list[Finished]:
    """Make every file durable, then rename each into place, then sync each directory.

    ``before_replace(item)`` runs just before each rename; False skips that file (its
    temp file is kept, verified and whole: a later attempt takes it up). Returns the files
    that were renamed into place. A file that cannot be finished raises StorageError, or,
    given ``on_error``, is reported there (its temp file removed) while the others go
    ahead: one bad path never holds back a batch.
    """
    if not files:
        return []
    ready: list[Finished] = []
    placed: list[Finished] = []

    def failed(item: Finished, exc: StorageError) -> None:
        item.partial.discard()
        if on_error is None:
            raise exc
        on_error(item, exc)

    file_systems: dict[int, int] = {}
    """st_dev -> a directory descriptor on that file system, for its syncfs."""
    try:
        use_syncfs = _SYNCFS is not None and len(files) > 1
        # A batch of up to KEEP_OPEN files keeps each descriptor open from its metadata to
        # its rename: no reopen and relock per file, and the name is checked against an
        # inode we hold (a closed one's number may be reused by a file planted there).
        keep_open = len(files) <= KEEP_OPEN
        for item in files:
            try:
                device = item.partial._prepare(item.executable, item.mtime_ns, fsync=not use_syncfs)
                if use_syncfs and device not in file_systems:
                    file_systems[device] = os.dup(item.partial._directory_fd())
            except StorageError as exc:
                failed(item, exc)
                continue
            finally:
                if not keep_open:
                    item.partial.close()  # few descriptors open, however big the batch
            ready.append(item)
        for dir_fd in file_systems.values():
            _syncfs(dir_fd)  # raises StorageError: nothing of the batch is placed
        for item in ready:
            if before_replace is not None and not before_replace(item):
                continue
            try:
                item.partial._place()
            except StorageError as exc:
                failed(item, exc)
                continue
            placed.append(item)
        if file_systems:
            # The renames made durable by one more syncfs, not by an fsync of each
            # directory: on ext4 without a journal (this machine) each directory fsync
            # flushed the device's cache (~30 ms), a syncfs the same once per batch.
            for dir_fd in file_systems.values():
                _syncfs(dir_fd)
        else:
            for directory in {os.path.dirname(item.partial.final_path) for item in placed}:
                fsync_directory(directory)
    except OSError as exc:
        raise StorageError(f"cannot finish {len(files)} files: {exc.strerror or exc}") from exc
    finally:
        for dir_fd in file_systems.values():
            os.close(dir_fd)
        for item in files:
            item.partial.close()
    return placed


_DIRECT = hasattr(os, "O_DIRECT")
_OPEN_DIRECT = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_DIRECT", 0)
DIRECT_ALIGN = 4096
"""Offsets, lengths and buffer addresses of direct writes are multiples of this (the
page size; every block device's logical block divides it)."""
DIRECT_MIN = 1 << 20
"""Runs shorter than this are written through the page cache (not worth a descriptor)."""
COPY_BLOCK = 4 << 20
"""Bytes read, verified and written per step of a copy (one buffer, reused)."""


def _copy_verified(
    source_fd: int,
    source_offset: int,
    fd: int,
    direct_fd: int,
    offset: int,
    refs: Sequence[ChunkRef],
) -> dict[int, int]:
    """Copy the chunks ``refs`` (consecutive, from ``source_offset`` in the source to
    ``offset`` here), each verified in the buffer before it is written; returns offset ->
    length of the chunks written. ``direct_fd`` (or -1): the target opened ``O_DIRECT``,
    used for whole aligned pages (the rest through ``fd``).

    Two buffers: a block is read and verified in this thread while the one before it is
    written in another (reads, BLAKE3 and writes all release the GIL)."""
    written: dict[int, int] = {}
    largest = max((ref.length for ref in refs), default=0)
    # mmap: page-aligned memory, as direct I/O needs; the data sits in it at the target's
    # offset modulo DIRECT_ALIGN so that aligned file offsets are aligned addresses.
    size = max(COPY_BLOCK, largest) + 2 * DIRECT_ALIGN
    buffers = [mmap.mmap(-1, size) for _ in range(2)]
    views = [memoryview(buffer) for buffer in buffers]
    writes: list[Future[None] | None] = [None, None]
    writer = _StretchWriter(fd, direct_fd)
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="p2pfs-copy") as executor:
            index = 0
            number = 0
            source, target = source_offset, offset
            while index < len(refs):
                block: list[ChunkRef] = []
                length = 0
                while index < len(refs) and (
                    not block or length + refs[index].length <= COPY_BLOCK
                ):
                    block.append(refs[index])
                    length += refs[index].length
                    index += 1
                side = number % 2
                number += 1
                if (earlier := writes[side]) is not None:
                    earlier.result()  # this buffer is free again (or its write failed)
                view = views[side]
                lead = target % DIRECT_ALIGN
                got = _read_into(source_fd, view[lead : lead + length], source)
                stretches = _verify_block(view, lead, got, block, target, written)
                writes[side] = executor.submit(writer.write, view, lead, stretches, target)
                source += length
                target += length
                if got < length:
                    break  # the source ended early: the rest stays to be fetched
            for pending in writes:
                if pending is not None:
                    pending.result()
    finally:
        for view in views:
            view.release()
        for buffer in buffers:
            buffer.close()
    return written


def _verify_block(
    view: memoryview,
    lead: int,
    got: int,
    block: list[ChunkRef],
    target: int,
    written: dict[int, int],
) -> list[tuple[int, int]]:
    """The stretches (block-relative start, end) of consecutive chunks that hash right, each
    chunk of them entered in ``written`` (target offset -> length); a chunk that fails (or
    lies past ``got``, where the source ended) ends a stretch and is left to be fetched."""
    stretches: list[tuple[int, int]] = []
    stretch_start = position = 0
    for ref in block:
        end = position + ref.length
        if end <= got and chunk_id(view[lead + position : lead + end]) == ref.id:
            written[target + position] = ref.length
        else:
            if position > stretch_start:
                stretches.append((stretch_start, position))
            stretch_start = end
        position = end
    if position > stretch_start:
        stretches.append((stretch_start, position))
    return stretches


class _StretchWriter:
    """Writes verified stretches of a copy buffer to the target (in the copy's writer
    thread, one stretch at a time)."""

    def __init__(self, fd: int, direct_fd: int) -> None:
        self.fd = fd
        self.direct_fd = direct_fd
        """-1 once the file system refused a direct write (the rest through the cache)."""

    def write(
        self, view: memoryview, lead: int, stretches: list[tuple[int, int]], target: int
    ) -> None:
        for start, end in stretches:
            self.direct_fd = _write_stretch(self.fd, self.direct_fd, view, lead, start, end, target)


def _read_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``offset``; returns the bytes read (fewer only at end of file)."""
    done = 0
    while done < len(view):
        count = os.preadv(fd, [view[done:]], offset + done)
        if not count:
            break
        done += count
    return done


def _write_stretch(
    fd: int, direct_fd: int, view: memoryview, lead: int, start: int, end: int, target: int
) -> int:
    """Write buffer bytes ``[lead + start, lead + end)`` to ``target + start``: whole
    aligned pages through ``direct_fd``, the partial pages at either edge through ``fd``.
    Returns ``direct_fd``, or -1 once the file system refused a direct write (the rest
    then goes through the cache)."""
    low, high = lead + start, lead + end  # buffer positions; file offset = target - lead + p
    first = -(-low // DIRECT_ALIGN) * DIRECT_ALIGN
    last = high // DIRECT_ALIGN * DIRECT_ALIGN
    if direct_fd >= 0 and last > first:
        try:
            _write_at(direct_fd, view[first:last], target - lead + first)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            direct_fd = -1  # no direct I/O here after all: through the cache
            first = last = low
        else:
            if first > low:
                _write_at(fd, view[low:first], target - lead + low)
            if high > last:
                _write_at(fd, view[last:high], target - lead + last)
            return direct_fd
    _write_at(fd, view[low:high], target - lead + low)
    return direct_fd


_FS_IOC_GETVERSION = 0x80087601  # _IOR('v', 1, long) on Linux


def _generation(fd: int) -> int | None:
    """The inode's generation number (ext4, btrfs, xfs...); None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        answer = fcntl.ioctl(fd, _FS_IOC_GETVERSION, bytes(8))
    except OSError:
        return None
    return int.from_bytes(answer[:8], sys.byteorder)


def _write_at(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    position = offset
    while view:
        written = os.pwrite(fd, view, position)
        view = view[written:]
        position += written


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _load_syncfs() -> Callable[[int], int] | None:
    """libc's syncfs(2) where it exists (Linux): one call makes a whole batch durable and,
    unlike sync(), reports a writeback error on that file system."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        function = ctypes.CDLL(name, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int]
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return,unused-ignore]


_SYNCFS = _load_syncfs()

WRITEBACK_EVERY = 8 << 20
"""A big file's writeback is started after every this many bytes written."""
_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        function = ctypes.CDLL(name, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return,unused-ignore]


_SYNC_FILE_RANGE = _load_sync_file_range()


def _start_writeback(fd: int) -> None:
    """Start writing the file's dirty pages to the disk now (``sync_file_range(2)``,
    ``SYNC_FILE_RANGE_WRITE``: no wait, nothing made durable). Why: a big file's commit
    otherwise fsyncs all of it at once (0.13-0.14 s for 256 MiB here, after the last chunk
    came); started while chunks still arrive, little is left for that fsync, which still
    runs (crash safety is unchanged). Advisory: a refusal (a file system without it) is
    ignored, and a write error shows at the commit's fsync as before."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def _syncfs(fd: int) -> None:
    assert _SYNCFS is not None
    if _SYNCFS(fd) != 0:
        code = ctypes.get_errno()
        raise StorageError(f"cannot make written files durable: {os.strerror(code)}")


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


def fsync_directory(path: str) -> None:
    """A rename is durable only once its directory is synced."""
    fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_umask() -> int:
    # os.umask can only be read by setting it: do it once, at import, before threads start.
    current = os.umask(0o022)
    os.umask(current)
    return current


_UMASK = _read_umask()


def umask() -> int:
    """The process umask, read once at import."""
    return _UMASK
