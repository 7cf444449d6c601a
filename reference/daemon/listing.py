"""A synced tree's listing, kept in memory between builds.

A context cache entry changes only while a sync applies changes to it, so
the walk taken once after a sync stays true until the next sync changes
something.  Keeping it saves a walk of the whole tree per build: it is the
next sync's diff base, gives the entry's size, and answers what a COPY reads
(its cache key, and which paths are hardlinks of each other).
"""

from __future__ import annotations

import hashlib
import threading

from .. import diffcopy, filemode
from ..pb.fsutil_types_pb2 import Stat
from ..walker import walk


class TreeListing:
    """The fsutil Stats of a tree in walk order (no xattrs: neither the diff
    nor a layer uses them)."""

    def __init__(self, stats: list[Stat]):
        self.stats = stats
        self._lock = threading.Lock()
        self._positions: dict[str, int] | None = None
        self._digests: dict[str, bytes] = {}
        self._multi_named: frozenset[str] | None = None
        self._diff_base: list | None = None

    @classmethod
    def of(cls, root: str) -> "TreeListing":
        return cls(list(walk(root, with_xattrs=False)))

    def diff_base(self) -> list:
        """The listing as a receiver's diff base, converted once per listing."""
        with self._lock:
            if self._diff_base is None:
                self._diff_base = [diffcopy.previous_entry(stat) for stat in self.stats]
            return self._diff_base

    def size(self) -> int:
        """Bytes of everything but directories, as lstat reports them."""
        return sum(stat.size for stat in self.stats if not filemode.is_dir(stat.mode))

    def _position(self, rel: str) -> int | None:
        with self._lock:
            if self._positions is None:
                self._positions = {stat.path: i for i, stat in enumerate(self.stats)}
            return self._positions.get(rel)

    def entry(self, rel: str) -> Stat | None:
        position = self._position(rel)
        return None if position is None else self.stats[position]

    def _below(self, rel: str) -> list[Stat]:
        """The entries strictly below directory ``rel`` ("" is the root)."""
        if not rel:
            return self.stats
        start = self._position(rel)
        if start is None:
            return []
        # walk order is depth first: a directory's descendants follow it contiguously
        prefix = rel + "/"
        end = start + 1
        stats = self.stats
        while end < len(stats) and stats[end].path.startswith(prefix):
            end += 1
        return stats[start + 1 : end]

    def digest_below(self, rel: str) -> bytes:
        """sha256 over every field of the entries below ``rel`` that a COPY of it writes."""
        with self._lock:
            cached = self._digests.get(rel)
        if cached is not None:
            return cached
        digest = hashlib.sha256()
        for stat in self._below(rel):
            data = stat.SerializeToString(deterministic=True)
            digest.update(len(data).to_bytes(4, "big"))
            digest.update(data)
        value = digest.digest()
        with self._lock:
            self._digests[rel] = value
        return value

    def multi_named(self) -> frozenset[str]:
        """Paths whose inode has another name in the tree (the walk marks every
        name after the first with ``linkname``; the first is a link target)."""
        with self._lock:
            if self._multi_named is None:
                names: set[str] = set()
                for stat in self.stats:
                    if stat.linkname and not filemode.is_symlink(stat.mode) and not filemode.is_dir(stat.mode):
                        names.add(stat.path)
                        names.add(stat.linkname)
                self._multi_named = frozenset(names)
            return self._multi_named
