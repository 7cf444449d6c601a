"""The persistent context cache: the daemon's copies of client directories.

One entry per (shared key, dir-name, purpose) holds the tree as it was last
synced; the next session with the same shared key diffs against it, so only
changed files cross the wire (BuildKit keeps a mutable snapshot per shared key
for the same reason).  Layout under ``<root>/cache``::

    <id>/tree/       the synced tree
    <id>/meta.json   key, sizes, times (replaced atomically)
    <id>/complete    exists only while tree/ equals a full sync

An entry is leased by one build at a time, from the sync through the last
COPY that reads it (which may hardlink its files into the build's rootfs); a
concurrent build with the same key gets another entry (starting with an
empty diff base) instead of waiting or sharing, so builds never see each
other's half-synced trees.  The index is rebuilt from disk at
start-up, so the cache survives a restart.  While the daemon runs, each
entry also keeps its tree's listing in memory (see :mod:`.listing`): a sync
that changes nothing then costs no walk of the tree and no disk writes.

Nothing on disk can stop the daemon: at start-up every entry is checked
(meta.json's fields and types, the tree directory) and one that is damaged
is dropped with a log line (a partial one, left by an interrupted sync, stays a
dangling record, see ``CacheEntry.load``);
a tree that cannot be listed is emptied instead of failing every later build
with its key; deletions never recurse, whatever the depth of a tree.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, fields
from typing import Callable

from ..applier import remove_tree
from ..plain import plain
from ..session import new_id
from .atomicfile import AtomicFiles
from .listing import TreeListing

log = logging.getLogger("reference.daemon.cache")

# Paths of kept listings over all free entries (about 1 KiB of memory each); beyond
# this the least recently used entries are walked again when next used.
KEPT_LISTING_PATHS = 60_000
RECORD_TYPE = "source.local"


def new_record_id() -> str:
    """25 base-36 characters, the shape of BuildKit's record ids."""
    return new_id()


def remove_quietly(path: str) -> bool:
    """Remove a tree, logging instead of raising; True when it is gone."""
    try:
        remove_tree(path)
        return True
    except Exception as exc:  # an entry that cannot be deleted must not fail anything else
        log.warning("cannot remove %s: %s", path, exc)
        return False


@dataclass
class EntryMeta:
    id: str
    shared_key: str
    dir_name: str
    purpose: str
    created_at: float
    last_used_at: float
    usage_count: int = 0
    size: int = 0


class CacheEntry:
    def __init__(self, base: str, meta: EntryMeta, complete: bool, files: AtomicFiles):
        self.base = base
        self.files = files
        self.meta = meta
        self.complete = complete
        self.in_use = False
        # the tree's walk while it is known unchanged; None: walk it when needed
        self.listing: TreeListing | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.meta.shared_key, self.meta.dir_name, self.meta.purpose)

    @property
    def tree(self) -> str:
        return os.path.join(self.base, "tree")

    @property
    def marker(self) -> str:
        return os.path.join(self.base, "complete")

    @classmethod
    def load(cls, base: str, name: str, files: AtomicFiles) -> "CacheEntry":
        """The entry stored at ``base``; ValueError (with the reason) when it is damaged or partial."""
        try:
            with open(os.path.join(base, "meta.json"), "rb") as fh:
                data = fh.read(1 << 16)
            meta = json.loads(data)
        except (OSError, ValueError, RecursionError) as exc:
            raise ValueError(f"unreadable meta.json ({exc})") from None
        if not isinstance(meta, dict):
            raise ValueError("meta.json is not an object")
        expected = {f.name: f.type for f in fields(EntryMeta)}
        if set(meta) != set(expected):
            raise ValueError(f"meta.json has fields {sorted(meta)}")
        for key, kind in expected.items():
            value = meta[key]
            ok = (isinstance(value, str) if kind == "str" else
                  isinstance(value, (int, float)) and not isinstance(value, bool) if kind == "float" else
                  isinstance(value, int) and not isinstance(value, bool) and value >= 0)
            if not ok:
                raise ValueError(f"meta.json field {key} is {value!r}")
        if meta["id"] != name:
            raise ValueError("id does not match the directory")
        tree = os.path.join(base, "tree")
        if os.path.islink(tree) or (os.path.lexists(tree) and not os.path.isdir(tree)):
            raise ValueError("its tree is not a directory")
        complete = os.path.isfile(os.path.join(base, "complete"))
        if not os.path.isdir(tree):
            if complete:
                os.unlink(os.path.join(base, "complete"))
                complete = False
            os.makedirs(tree, mode=0o755)
        # A partial entry (a sync that never completed) stays as a dangling record: its
        # tree is only ever a diff base, walked afresh, so the next sync corrects it exactly.
        return cls(base, EntryMeta(**meta), complete, files)

    def save_meta(self, *, durable: bool = True) -> None:
        self.files.write(os.path.join(self.base, "meta.json"), json.dumps(plain(self.meta)).encode(), durable=durable)


class Lease:
    """Exclusive use of one entry by one build."""

    def __init__(self, cache: "ContextCache", entry: CacheEntry):
        self._cache = cache
        self.entry = entry
        self.released = False

    @property
    def tree(self) -> str:
        return self.entry.tree

    @property
    def id(self) -> str:
        return self.entry.meta.id

    @property
    def complete(self) -> bool:
        return self.entry.complete

    def listing(self) -> TreeListing:
        """The tree's listing: the one kept since it last changed, or a fresh walk.

        A tree that cannot be walked (damaged on disk) is emptied, with a log
        line: the next sync then starts from nothing and is exact."""
        entry = self.entry
        if entry.listing is None:
            try:
                entry.listing = TreeListing.of(entry.tree)
            except Exception as exc:
                log.warning("cache entry %s cannot be listed, emptying it: %s", entry.meta.id, exc)
                self.begin_sync()
                if os.path.lexists(entry.tree) and not remove_quietly(entry.tree):
                    raise
                os.makedirs(entry.tree, mode=0o755)
                entry.listing = TreeListing([])
        return entry.listing

    def begin_sync(self) -> None:
        """The tree is about to change: from here until :meth:`sync_complete`
        it is not a full copy, and its kept listing is stale."""
        self.entry.listing = None
        if self.entry.complete:
            os.unlink(self.entry.marker)
            self.entry.files.sync_directory(self.entry.base)
            self.entry.complete = False

    def sync_complete(self) -> None:
        """The tree equals a full sync again (walked once more for its size and listing)."""
        entry = self.entry
        entry.listing = TreeListing.of(entry.tree)
        # the next sync's diff base, converted now: on this build's time, not the next (unchanged) one's
        entry.listing.diff_base()
        entry.meta.size = entry.listing.size()
        entry.save_meta()
        entry.files.write(entry.marker, b"complete\n")
        entry.complete = True

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._cache._release(self.entry)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class ContextCache:
    def __init__(self, directory: str, *, max_size: int, max_age: float, durable: bool = True):
        self.directory = directory
        self.files = AtomicFiles(durable=durable)
        self.max_size = max_size
        self.max_age = max_age
        self._lock = threading.Lock()
        self._entries: dict[str, CacheEntry] = {}
        # entries whose usage (times, count) changed since their meta.json was written
        self._unsaved_usage: dict[str, CacheEntry] = {}
        self._usage_writer: threading.Thread | None = None
        self._usage_write_lock = threading.Lock()  # one batch of usage writes at a time
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self._load()

    def _load(self) -> None:
        for name in sorted(os.listdir(self.directory)):
            base = os.path.join(self.directory, name)
            if name.startswith(".deleting-") or name.endswith(".tmp"):
                log.info("removing %s, left by an interrupted deletion", name)
                remove_quietly(base)
                continue
            try:
                if os.path.islink(base) or not os.path.isdir(base):
                    raise ValueError("not a directory")
                entry = CacheEntry.load(base, name, self.files)
            except ValueError as exc:
                log.warning("dropping cache entry %s: %s", name, exc)
                remove_quietly(base)
                continue
            # staging left by an interrupted sync
            for leftover in os.listdir(base):
                if leftover.startswith(".tree.incoming-") or leftover.endswith(".tmp"):
                    remove_quietly(os.path.join(base, leftover))
            self._entries[name] = entry

    # -- leases -------------------------------------------------------------
    def acquire(self, shared_key: str, dir_name: str, purpose: str) -> Lease:
        """The most recently used free entry for the key, or a new empty one."""
        key = (shared_key, dir_name, purpose)
        with self._lock:
            candidates = [e for e in self._entries.values() if e.key == key and not e.in_use]
            if candidates:
                entry = max(candidates, key=lambda e: (e.complete, e.meta.last_used_at))
            else:
                now = time.time()
                record_id = new_record_id()
                base = os.path.join(self.directory, record_id)
                os.makedirs(os.path.join(base, "tree"), mode=0o755)
                entry = CacheEntry(base, EntryMeta(record_id, shared_key, dir_name, purpose, now, now), False,
                                   self.files)
                entry.save_meta()
                self._entries[record_id] = entry
            entry.in_use = True
            entry.meta.last_used_at = time.time()
            entry.meta.usage_count += 1
        return Lease(self, entry)

    def _release(self, entry: CacheEntry) -> None:
        writer = None
        with self._lock:
            entry.in_use = False
            entry.meta.last_used_at = time.time()
            if entry.meta.id in self._entries:
                # Only times and counts changed: written by a writer thread, because replacing
                # meta.json costs about a millisecond (ext4 flushes a file renamed over another)
                # and a build releases its leases on the way to answering the client.
                self._unsaved_usage[entry.meta.id] = entry
                if self._usage_writer is None:
                    writer = self._usage_writer = threading.Thread(target=self._write_usage_until_saved,
                                                                   name="cache-usage", daemon=True)
            self._bound_kept_listings()
        if writer is not None:
            writer.start()

    def _write_usage_until_saved(self) -> None:
        while True:
            self.save_usage()
            with self._lock:
                if not self._unsaved_usage:
                    self._usage_writer = None
                    return

    def save_usage(self) -> int:
        """Write the usage of released entries not yet on disk, once any write under way has
        ended (so that everything is written when it returns); returns how many were written."""
        with self._usage_write_lock:
            with self._lock:
                entries = [e for e in self._unsaved_usage.values() if e.meta.id in self._entries]
                self._unsaved_usage.clear()
            for entry in entries:
                try:
                    entry.save_meta(durable=False)
                except OSError:
                    pass  # deleted meanwhile, or the disk is full: only times and counts are lost
        return len(entries)

    def _bound_kept_listings(self) -> None:
        kept = sorted((e for e in self._entries.values() if e.listing is not None and not e.in_use),
                      key=lambda e: e.meta.last_used_at, reverse=True)
        total = 0
        for entry in kept:
            total += len(entry.listing.stats)
            if total > KEPT_LISTING_PATHS:
                entry.listing = None

    # -- usage, prune, gc -------------------------------------------------------
    def records(self) -> list[dict]:
        """BuildCache records for ``/system/df``."""
        with self._lock:
            entries = list(self._entries.values())
        return [
            {
                "ID": e.meta.id,
                "Parent": "",
                "Type": RECORD_TYPE,
                "Description": f"local source for {e.meta.dir_name or 'context'}",
                "InUse": e.in_use,
                "Shared": False,
                "Size": e.meta.size,
                "CreatedAt": _rfc3339(e.meta.created_at),
                "LastUsedAt": _rfc3339(e.meta.last_used_at),
                "UsageCount": e.meta.usage_count,
            }
            for e in sorted(entries, key=lambda e: e.meta.created_at)
        ]

    def total_size(self) -> int:
        with self._lock:
            return sum(e.meta.size for e in self._entries.values())

    def usage(self) -> list[dict]:
        """Every entry as BuildKit's disk usage describes a record (times as Unix seconds), oldest first."""
        with self._lock:
            entries = sorted(self._entries.values(), key=lambda e: e.meta.created_at)
            return [_usage(e) for e in entries]

    def prune(self, *, all: bool = True, older_than: float | None = None, keep_storage: int = 0,
              selected: Callable[[dict], bool] = lambda usage: True) -> tuple[list[str], int]:
        """Delete unused entries; returns (ids, bytes reclaimed).

        Without ``all`` only dangling entries (never completed) go.
        ``older_than`` (seconds) keeps entries used more recently than that;
        ``keep_storage`` stops once the total is at most that many bytes;
        ``selected`` (given :meth:`usage`'s description of an entry) narrows the candidates.
        """
        return self._delete(self._choose_for_prune(all, older_than, keep_storage, selected))

    def prune_usage(self, *, older_than: float | None = None, keep_storage: int = 0,
                    selected: Callable[[dict], bool] = lambda usage: True) -> list[dict]:
        """Delete unused entries as BuildKit's Prune does (every unused local source, with or without
        --all); returns the deleted entries as :meth:`usage` describes them."""
        chosen = self._choose_for_prune(True, older_than, keep_storage, selected)
        usages = [_usage(e) for e in chosen]
        self._delete(chosen)
        return usages

    def _choose_for_prune(self, all: bool, older_than: float | None, keep_storage: int,
                          selected: Callable[[dict], bool] = lambda usage: True) -> list[CacheEntry]:
        now = time.time()
        with self._lock:
            victims = [e for e in self._entries.values() if not e.in_use and selected(_usage(e))]
            if not all:
                victims = [e for e in victims if not e.complete]
            if older_than is not None:
                victims = [e for e in victims if now - e.meta.last_used_at >= older_than]
            victims.sort(key=lambda e: e.meta.last_used_at)
            total = sum(e.meta.size for e in self._entries.values())
            chosen = []
            for entry in victims:
                if keep_storage and total <= keep_storage:
                    break
                chosen.append(entry)
                total -= entry.meta.size
                del self._entries[entry.meta.id]
        return chosen

    def gc(self) -> tuple[list[str], int]:
        """Drop unused entries older than ``max_age``, then the least recently
        used until the total is at most ``max_size``."""
        now = time.time()
        with self._lock:
            free = sorted((e for e in self._entries.values() if not e.in_use), key=lambda e: e.meta.last_used_at)
            chosen = [e for e in free if now - e.meta.last_used_at > self.max_age]
            total = sum(e.meta.size for e in self._entries.values()) - sum(e.meta.size for e in chosen)
            for entry in free:
                if total <= self.max_size:
                    break
                if entry not in chosen:
                    chosen.append(entry)
                    total -= entry.meta.size
            for entry in chosen:
                del self._entries[entry.meta.id]
        return self._delete(chosen)

    def _delete(self, entries: list[CacheEntry]) -> tuple[list[str], int]:
        ids, reclaimed, trashes = [], 0, []
        # (entries are out of _entries already, so no later usage write picks them; the lock
        # waits for one under way, which must not land in a directory being removed)
        with self._usage_write_lock:
            for entry in entries:
                # rename first, so a crash never leaves a half-deleted entry that looks valid
                trash = os.path.join(self.directory, f".deleting-{entry.meta.id}")
                try:
                    os.rename(entry.base, trash)
                except OSError:
                    trash = entry.base
                trashes.append(trash)
                ids.append(entry.meta.id)
                reclaimed += entry.meta.size
        for trash in trashes:
            remove_quietly(trash)  # (what is left is removed at the next start)
        return ids, reclaimed


def _usage(entry: CacheEntry) -> dict:
    meta = entry.meta
    return {"id": meta.id, "dir_name": meta.dir_name, "purpose": meta.purpose, "size": meta.size,
            "created_at": meta.created_at, "last_used_at": meta.last_used_at, "usage_count": meta.usage_count,
            "in_use": entry.in_use, "complete": entry.complete, "record_type": RECORD_TYPE,
            "description": f"local source for {meta.dir_name or 'context'}"}


def _rfc3339(ts: float) -> str:
    seconds = int(ts)
    nanos = int((ts - seconds) * 1e9)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{nanos:09d}Z"
