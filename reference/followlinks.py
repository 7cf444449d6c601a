"""Resolve ``followpaths`` into include patterns, as fsutil@0834f99 ``FollowLinks`` does.

Each follow path is walked component by component from the root. When a component is
a symlink, the link itself is recorded and its target -- always re-rooted at the
synced directory, so ``..`` and absolute targets cannot leave it -- is followed with
the rest of the path. A component containing ``* ? [`` is matched against the
directory's entries (``filepath.Match``); if some matches are symlinks, the wildcard
path is recorded and each link target is followed; otherwise the component is kept
literally. The recorded paths are sorted (byte order) and deduplicated; a result
containing "." means the whole root is wanted.

The only deliberate difference from upstream: a follow path starting with ``..`` is
not looked up outside the root (upstream would lstat there); it is kept as a literal
pattern, which can never match a walked entry anyway.
"""

from __future__ import annotations

import os
import stat

from .pathfilter import dedupe_paths
from .patterns import PatternError, go_clean, go_dir, go_filepath_match, go_join

__all__ = ["resolve_follow_paths"]


def _go_sort_key(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape")  # Go sorts strings bytewise


def _contains_wildcards(name: str) -> bool:
    escaped = False
    for ch in name:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch in "*?[":
            return True
    return False


def _base(path: str) -> str:
    return path[path.rfind("/") + 1 :] or "."


class _SymlinkResolver:
    def __init__(self, root: str):
        self.root = root
        self.resolved: set[str] = set()

    def add(self, path: str) -> None:
        # Depth first like fsutil's recursion, with an explicit stack: a chain of
        # symlinks in the tree must not exhaust Python's recursion limit.
        todo = [path]
        while todo:
            remaining = go_join(".", todo.pop())
            current = "."
            while True:
                head, _, remaining = remaining.partition("/")
                current = go_join(current, head)
                targets = self._read_symlink(current, allow_wildcard=True)
                if (remaining == "" or targets is not None) and current in self.resolved:
                    break  # already done (this also stops symlink loops)
                if targets is not None:
                    self.resolved.add(current)
                    todo.extend(go_join(target, remaining) for target in reversed(targets))
                    break
                if remaining == "":
                    self.resolved.add(current)
                    break

    def _read_symlink(self, path: str, allow_wildcard: bool) -> list[str] | None:
        """Link targets (as rooted paths) for path, or None if it is not a symlink."""
        if path == ".." or path.startswith("../"):
            return None
        real = go_join(self.root, path)
        base = _base(path)
        if allow_wildcard and _contains_wildcards(base):
            try:
                names = os.listdir(go_dir(real))
            except FileNotFoundError:
                return None
            found: list[str] = []
            for name in sorted(names, key=_go_sort_key):
                try:
                    hit = go_filepath_match(base, name)
                except PatternError:
                    hit = False
                if hit:
                    found += self._read_symlink(go_join(go_dir(path), name), False) or []
            return found or None
        try:
            info = os.lstat(real)
        except FileNotFoundError:
            return None
        if not stat.S_ISLNK(info.st_mode):
            return None
        link = go_clean(os.readlink(real))
        if link.startswith("/"):
            return [link]
        return [go_join("/", go_join(go_dir(path), link))]


def resolve_follow_paths(root: str, paths: list[str]) -> list[str] | None:
    """Include patterns for ``paths`` under ``root``; None means "the whole root".

    Raises OSError for errors other than a missing path (e.g. a path component that is
    a regular file gives NotADirectoryError), which upstream turns into a failed
    transfer.
    """
    resolver = _SymlinkResolver(root)
    for path in paths:
        resolver.add(path)
    return dedupe_paths(sorted(resolver.resolved, key=_go_sort_key))
