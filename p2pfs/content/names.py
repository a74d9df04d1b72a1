"""File names and relative paths as p2pfs stores and transmits them.

The normal form is Unicode NFC (what macOS, Windows and most Linux tools produce), encoded
as UTF-8. A name is one path component; a path is names joined by ``/``. On the wire and in
trees only normal-form names are accepted, so two peers can never disagree on whether two
names are the same file.
"""

from __future__ import annotations

import unicodedata

from p2pfs.errors import InvalidNameError

MAX_NAME_BYTES = 255
"""The common file-system limit on one component (ext4, APFS, NTFS in UTF-16 units aside)."""
MAX_PATH_DEPTH = 256


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid normal-form component, else raise InvalidNameError."""
    if not name:
        raise InvalidNameError("empty name")
    if name in (".", ".."):
        raise InvalidNameError(f"reserved name {name!r}")
    if "/" in name or "\x00" in name or "\\" in name:
        raise InvalidNameError(f"name contains a separator or NUL: {name!r}")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates: the bytes on disk were not UTF-8
        raise InvalidNameError(f"name is not valid UTF-8: {name!r}") from exc
    if len(encoded) > MAX_NAME_BYTES:
        raise InvalidNameError(f"name longer than {MAX_NAME_BYTES} bytes: {name[:40]!r}...")
    if unicodedata.normalize("NFC", name) != name:
        raise InvalidNameError(f"name is not in NFC normal form: {name!r}")
    return name


def normalize_local_name(name: str) -> str:
    """Bring a name read from the local file system into normal form, or refuse it.

    Names that are not valid UTF-8 (Python shows them with surrogate escapes) are refused
    rather than guessed at: another machine could not write the same bytes back.
    """
    return validate_name(unicodedata.normalize("NFC", name))


def validate_relative_path(path: str) -> str:
    """Check a ``/``-joined relative path: no empty, ``.`` or ``..`` parts, not absolute."""
    if path.startswith("/"):
        raise InvalidNameError(f"absolute path: {path!r}")
    parts = path.split("/")
    if len(parts) > MAX_PATH_DEPTH:
        raise InvalidNameError(f"path deeper than {MAX_PATH_DEPTH}: {path[:80]!r}")
    for part in parts:
        validate_name(part)
    return path


def name_sort_key(name: str) -> bytes:
    """Entries sort by the UTF-8 bytes of their names (the same order in every language)."""
    return name.encode("utf-8")
