"""Which paths of a sync folder are never synced (sans-I/O).

These are protocol semantics, not a local preference: the patterns live in the folder's own
``.p2pfsignore`` (which is synced like any file), so every member applies the same rules,
and a record for a path some member ignores is stored there without its content
(``absent``). The store reads the file (``store/folderdisk.py``); this module only matches.

Always ignored, whatever the patterns say: any path component that is the state directory
``.p2pfs`` but for case (on a file system that ignores case ``.P2PFS/`` lands in ours; a
nested sync folder's is its own), and temp files of atomic assembly (``.p2pfs-part-*``),
which are never content.
"""

from __future__ import annotations

from dataclasses import dataclass

import pathspec

STATE_DIR = ".p2pfs"
IGNORE_FILE = ".p2pfsignore"
PARTIAL_PREFIX = ".p2pfs-part-"
"""The prefix ``store/assemble.py`` gives temp files (a test keeps the two equal)."""


@dataclass(frozen=True, slots=True, eq=False)
class IgnoreRules:
    """``.p2pfsignore`` (gitignore semantics, pathspec's GitIgnoreSpec) plus the state that
    is never synced. Call it with a folder-relative ``/``-joined path."""

    spec: pathspec.GitIgnoreSpec | None = None

    @classmethod
    def parse(cls, text: str) -> IgnoreRules:
        """Rules from the text of a ``.p2pfsignore`` (pathspec raises ValueError on a
        pattern it cannot compile)."""
        return cls(pathspec.GitIgnoreSpec.from_lines(text.splitlines()))

    def __call__(self, path: str, is_directory: bool = False) -> bool:
        # A scan asks this of every file: the component checks run only where the state
        # directory's name could occur at all (casefold works per character, so a part
        # that folds to it leaves it in the folded path).
        if STATE_DIR in path.casefold():
            parts = path.split("/")
            if any(part.casefold() == STATE_DIR for part in parts) or parts[-1].startswith(
                PARTIAL_PREFIX
            ):
                return True
        if path == IGNORE_FILE or self.spec is None:
            return False
        return self.spec.match_file(path + "/" if is_directory else path) or any(
            self.spec.match_file(parent + "/") for parent in parents(path)
        )


def parents(path: str) -> list[str]:
    """``a/b/c`` -> ``["a", "a/b"]``: the directories a path lies under."""
    parts = path.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]
