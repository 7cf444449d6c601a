"""The Stat stream of a directory, field for field as the Go docker CLI sends it.

fsutil's walk is ``filepath.Walk``: depth first, the entries of each directory
sorted byte-wise, ``lstat`` semantics (links are not followed), the root itself
never listed.  Entries are ``fsutil.types.Stat`` messages ready for the wire.
"""

from __future__ import annotations

import errno
import os
import stat as _st
from dataclasses import dataclass
from typing import Iterator, Protocol

from . import filemode
from .errors import SessionError
from .pb.fsutil_types_pb2 import Stat


class EntryFilter(Protocol):
    """Decides per entry whether it is sent and whether a directory is entered."""

    def decide(self, path: str, is_dir: bool) -> "FilterDecision": ...


@dataclass(frozen=True, slots=True)
class FilterDecision:
    include: bool
    descend: bool = True


class WalkError(SessionError):
    pass


def stat_from_lstat(
    rel_path: str,
    st: os.stat_result,
    abs_path: str,
    *,
    owner: tuple[int, int] | None = None,
    with_xattrs: bool = True,
) -> Stat:
    """The fsutil Stat for one entry (without hardlink detection)."""
    st_mode = st.st_mode
    mode = filemode.sender_mode(st_mode)
    stat = Stat(path=rel_path, mode=mode, modTime=st.st_mtime_ns)
    if owner is None:
        stat.uid, stat.gid = st.st_uid, st.st_gid
    else:
        stat.uid, stat.gid = owner
    kind = _st.S_IFMT(st_mode)
    if kind != _st.S_IFDIR:
        stat.size = st.st_size
        if kind == _st.S_IFLNK:
            stat.linkname = os.readlink(abs_path)
        elif kind in (_st.S_IFCHR, _st.S_IFBLK):
            stat.devmajor, stat.devminor = filemode.dev_numbers(st.st_rdev)
    if with_xattrs:
        for name, value in read_xattrs(abs_path).items():
            stat.xattrs[name] = value
    return stat


def read_xattrs(abs_path: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(abs_path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOENT, errno.EPERM):
            return {}
        raise
    values = {}
    for name in names:
        try:
            values[name] = os.getxattr(abs_path, name, follow_symlinks=False)
        except OSError:
            continue
    return values


def walk(
    root: str,
    *,
    entry_filter: EntryFilter | None = None,
    owner: tuple[int, int] | None = None,
    with_xattrs: bool = True,
) -> Iterator[Stat]:
    """Yield the Stats of everything below ``root`` in fsutil order.

    ``owner`` forces uid/gid (the docker CLI maps the build context to 0/0).
    With a filter, a directory that is not itself included but is entered is
    listed lazily, just before the first entry below it that is included (so
    the receiver always sees a parent before its children).
    """
    root = os.path.abspath(root)
    try:
        root_st = os.stat(root)
    except OSError as exc:
        raise WalkError(f"cannot read the directory to send: {exc.strerror}") from None
    if not _st.S_ISDIR(root_st.st_mode):
        raise WalkError("the path to send is not a directory")
    first_name_of_inode: dict[tuple[int, int], str] = {}
    pending_parents: list[Stat] = []  # entered but not yet listed directories

    def visit(abs_dir: str, rel_dir: str) -> Iterator[Stat]:
        try:
            with os.scandir(abs_dir) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            raise WalkError(f"cannot list {rel_dir or '.'!r}: {exc.strerror}") from None
        for entry in entries:
            name = entry.name
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                raise WalkError(f"file name is not valid UTF-8: {os.fsencode(name)!r}") from None
            rel = f"{rel_dir}/{name}" if rel_dir else name
            abs_path = entry.path
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # vanished while walking, as filepath.Walk tolerates
            is_dir = _st.S_ISDIR(st.st_mode)
            if entry_filter is not None:
                decision = entry_filter.decide(rel, is_dir)
                if not decision.include and not (is_dir and decision.descend):
                    continue
            else:
                decision = None
            stat = stat_from_lstat(rel, st, abs_path, owner=owner, with_xattrs=with_xattrs)
            if not is_dir and st.st_nlink > 1 and not _st.S_ISLNK(st.st_mode):
                key = (st.st_dev, st.st_ino)
                first = first_name_of_inode.get(key)
                if first is None:
                    if decision is None or decision.include:
                        first_name_of_inode[key] = rel
                else:
                    stat.linkname = first
            if decision is not None and not decision.include:
                pending_parents.append(stat)
                depth = len(pending_parents)
                yield from visit(abs_path, rel)
                if len(pending_parents) >= depth:
                    del pending_parents[depth - 1 :]
                continue
            if pending_parents:
                yield from pending_parents
                pending_parents.clear()
            yield stat
            if is_dir and (decision is None or decision.descend):
                yield from visit(abs_path, rel)

    yield from visit(root, "")


def read_chunks(abs_path: str, chunk_size: int = 32 * 1024) -> Iterator[bytes]:
    """File contents in chunks; an unreadable file yields nothing (fsutil sends
    only the end-of-file marker then, so the receiver gets an empty file)."""
    try:
        yield from open_chunks(abs_path, chunk_size)
    except OSError:
        return


def open_chunks(abs_path: str, chunk_size: int = 32 * 1024) -> Iterator[bytes]:
    """File contents in chunks; a file that cannot be opened raises OSError at once
    (a socket, which fsutil sends as an empty regular file, reads empty)."""
    st = os.lstat(abs_path)
    if not _st.S_ISREG(st.st_mode):
        if _st.S_ISSOCK(st.st_mode):
            return iter(())
        raise OSError(errno.EINVAL, "not a regular file", abs_path)
    fd = os.open(abs_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)

    def chunks() -> Iterator[bytes]:
        try:
            while True:
                chunk = os.read(fd, chunk_size)
                if not chunk:
                    return
                yield chunk
        finally:
            os.close(fd)

    return chunks()
