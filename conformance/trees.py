"""Build, describe and compare directory trees for tests and property checks."""

from __future__ import annotations

import hashlib
import os
import stat as _st
from dataclasses import dataclass

from reference import filemode
from reference.pathfilter import PathFilter
from reference.walker import walk


@dataclass(frozen=True)
class Entry:
    """One entry as the protocol sees it, plus a digest of regular-file contents."""

    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    linkname: str
    devmajor: int
    devminor: int
    xattrs: tuple[tuple[str, bytes], ...]
    digest: str


def snapshot(root: str, *, owner: tuple[int, int] | None = None, with_mtime_of_dirs: bool = True,
             with_xattrs: bool = True, excludes: list[str] | None = None) -> dict[str, Entry]:
    """Everything below ``root`` keyed by relative path, through our walker; with
    ``excludes`` (.dockerignore lines), what a client sends of it."""
    result: dict[str, Entry] = {}
    entry_filter = PathFilter([], excludes, []) if excludes else None
    for stat in walk(root, entry_filter=entry_filter, owner=owner, with_xattrs=with_xattrs):
        digest = ""
        if filemode.is_regular(stat.mode):
            with open(os.path.join(root, stat.path), "rb") as fh:
                digest = hashlib.sha256(fh.read()).hexdigest()
        mtime = stat.modTime
        if filemode.is_dir(stat.mode) and not with_mtime_of_dirs:
            mtime = 0
        result[stat.path] = Entry(
            stat.mode, stat.uid, stat.gid, stat.size, mtime, stat.linkname,
            stat.devmajor, stat.devminor, tuple(sorted(stat.xattrs.items())), digest,
        )
    return result


def diff_snapshots(expected: dict[str, Entry], actual: dict[str, Entry]) -> list[str]:
    """Human-readable differences; empty when the trees are equal."""
    lines = []
    for path in sorted(expected.keys() - actual.keys()):
        lines.append(f"missing: {path}")
    for path in sorted(actual.keys() - expected.keys()):
        lines.append(f"stray: {path}")
    for path in sorted(expected.keys() & actual.keys()):
        if expected[path] != actual[path]:
            e, a = expected[path], actual[path]
            fields = [f for f in Entry.__dataclass_fields__ if getattr(e, f) != getattr(a, f)]
            lines.append(f"differs: {path}: " + ", ".join(f"{f} {getattr(e, f)!r} != {getattr(a, f)!r}" for f in fields))
    return lines


def write_file(root: str, rel: str, data: bytes, *, mtime_ns: int | None = None, mode: int = 0o644) -> None:
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.lexists(path) and not os.path.isdir(path) or os.path.islink(path):
        os.unlink(path)
    with open(path, "wb") as fh:
        fh.write(data)
    os.chmod(path, mode)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


def is_fifo(path: str) -> bool:
    return _st.S_ISFIFO(os.lstat(path).st_mode)
