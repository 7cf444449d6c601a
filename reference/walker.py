"""The Stat stream of a directory, field for field as the Go docker CLI sends it.

fsutil's walk is ``filepath.Walk``: depth first, the entries of each directory
sorted byte-wise, ``lstat`` semantics (links are not followed), the root itself
never listed.  Entries are ``fsutil.types.Stat`` messages ready for the wire.

A re-sync of an unchanged tree is little more than two of these walks, so the
per-entry cost matters: the walk is one loop over a stack of directory
listings (not nested generators), each directory is read through its own file
descriptor and its entries are ``lstat``-ed relative to it (a one-component
lookup for the kernel), and Stats are filled attribute by attribute (cheaper
than constructor keywords).

Names are taken as the filesystem has them: one that is not UTF-8 gives a
``NameStat`` (see ``diffcopy``), found by the encoding error of the first
field it reaches, so the UTF-8 common case pays nothing for the check.  A path
longer than PATH_MAX (a tree below a long root) is opened piece by piece.
"""

from __future__ import annotations

import errno
import os
import stat as _st
from dataclasses import dataclass
from operator import itemgetter
from typing import Iterator, Protocol

from . import filemode
from .diffcopy import NamePacket, NameStat, PreviousEntry, previous_entry
from .errors import SessionError
from .paths import PATH_MAX, path_sort_key
from .pb.fsutil_types_pb2 import Packet, Stat


class EntryFilter(Protocol):
    """Decides per entry whether it is sent and whether a directory is entered."""

    def decide(self, path: str, is_dir: bool) -> "FilterDecision": ...


@dataclass(frozen=True, slots=True)
class FilterDecision:
    include: bool
    descend: bool = True


class WalkError(SessionError):
    pass


_S_IFMT = 0o170000
_S_IFREG, _S_IFDIR, _S_IFLNK = _st.S_IFREG, _st.S_IFDIR, _st.S_IFLNK
_DEVICE_TYPES = (_st.S_IFCHR, _st.S_IFBLK)
_NO_XATTR_SUPPORT = (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOENT, errno.EPERM)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_by_name = itemgetter(0)


def stat_from_lstat(
    rel_path: str,
    st: os.stat_result,
    abs_path: str,
    *,
    owner: tuple[int, int] | None = None,
    with_xattrs: bool = True,
) -> Stat:
    """The fsutil Stat for one entry (without hardlink detection)."""
    uid, gid = (st.st_uid, st.st_gid) if owner is None else owner
    stat = Stat()
    try:
        _fill_stat(stat, rel_path, st, abs_path, uid, gid, with_xattrs)
    except UnicodeEncodeError:  # a name that is not UTF-8
        stat = NameStat()
        _fill_stat(stat, rel_path, st, abs_path, uid, gid, with_xattrs)
    return stat


def _fill_stat(stat: Stat, rel_path: str, st: os.stat_result, abs_path: str, uid: int, gid: int,
               with_xattrs: bool) -> int:
    """Set the fields of an empty Stat; returns its Go mode."""
    st_mode = st.st_mode
    kind = st_mode & _S_IFMT
    mode = filemode.sender_mode(st_mode)
    stat.path = rel_path
    stat.mode = mode
    if uid:  # proto3: zero is the unset default
        stat.uid = uid
    if gid:
        stat.gid = gid
    if kind != _S_IFDIR:  # a directory's size is not sent
        stat.size = st.st_size
        if kind == _S_IFLNK:
            stat.linkname = _readlink(abs_path)
        elif kind in _DEVICE_TYPES:
            stat.devmajor, stat.devminor = filemode.dev_numbers(st.st_rdev)
    stat.modTime = st.st_mtime_ns
    if with_xattrs:
        # one llistxattr per entry, as fsutil does; values only for the names it lists
        try:
            names = os.listxattr(abs_path, follow_symlinks=False)
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:
                _fill_xattrs_long(stat, abs_path)
                return mode
            if exc.errno not in _NO_XATTR_SUPPORT:
                raise
            names = None
        if names:
            xattrs = stat.xattrs
            for name in names:
                try:
                    xattrs[name] = os.getxattr(abs_path, name, follow_symlinks=False)
                except OSError:
                    continue
    return mode


# -- paths longer than PATH_MAX -------------------------------------------------------

def open_long(path: str, flags: int, mode: int = 0o777) -> int:
    """``os.open`` for an absolute path of any length: pieces shorter than PATH_MAX,
    each opened relative to the one before (the kernel refuses longer paths)."""
    data = os.fsencode(path)
    fd: int | None = None
    try:
        while True:
            if len(data) < PATH_MAX:
                return os.open(data, flags, mode, dir_fd=fd)
            cut = data.rfind(b"/", 0, PATH_MAX - 1)
            if cut <= 0:
                raise OSError(errno.ENAMETOOLONG, "a path component is longer than PATH_MAX", path)
            parent = os.open(data[:cut], _DIR_FLAGS, dir_fd=fd)
            if fd is not None:
                os.close(fd)
            fd, data = parent, data[cut + 1:]
    finally:
        if fd is not None:
            os.close(fd)


def _in_parent(abs_path: str, call):
    """``call(path)`` for a long ``abs_path``, through ``/proc/self/fd`` of its parent."""
    parent, _, name = abs_path.rpartition("/")
    fd = open_long(parent, _DIR_FLAGS)
    try:
        return call(f"/proc/self/fd/{fd}/{name}")
    finally:
        os.close(fd)


def _readlink(abs_path: str) -> str:
    try:
        return os.readlink(abs_path)
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:
            raise
    return _in_parent(abs_path, os.readlink)


def _fill_xattrs_long(stat, abs_path: str) -> None:
    def fill(path: str) -> None:
        try:
            names = os.listxattr(path, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in _NO_XATTR_SUPPORT:
                raise
            return
        for name in names:
            try:
                stat.xattrs[name] = os.getxattr(path, name, follow_symlinks=False)
            except OSError:
                continue

    _in_parent(abs_path, fill)


def _checked_root(root: str) -> str:
    root = os.path.abspath(root)
    try:
        root_st = os.stat(root)
    except OSError as exc:
        raise WalkError(f"cannot read the directory to send: {exc.strerror}") from None
    if not _st.S_ISDIR(root_st.st_mode):
        raise WalkError("the path to send is not a directory")
    return root


def _listing(abs_dir: str, rel_dir: str) -> list[tuple[str, os.stat_result]]:
    """``(name, lstat)`` of a directory's entries in byte-wise name order.

    Every entry is stat-ed now, relative to the directory's descriptor (closed
    before this returns); one that vanished in between is left out, as
    filepath.Walk tolerates.  (str order is UTF-8 byte order, except for the escaped
    bytes of a name that is not UTF-8: such a directory is sorted by bytes.)
    """
    try:
        try:
            fd = os.open(abs_dir, _DIR_FLAGS)
        except OSError as exc:
            if exc.errno != errno.ENAMETOOLONG:
                raise
            fd = open_long(abs_dir, _DIR_FLAGS)
    except OSError as exc:
        raise WalkError(f"cannot list {rel_dir or '.'!r}: {exc.strerror}") from None
    try:
        try:
            with os.scandir(fd) as it:  # (scandir reads a duplicate; entries stat relative to fd)
                dir_entries = list(it)
        except OSError as exc:
            raise WalkError(f"cannot list {rel_dir or '.'!r}: {exc.strerror}") from None
        entries = []
        append = entries.append
        for entry in dir_entries:
            try:
                append((entry.name, entry.stat(follow_symlinks=False)))
            except FileNotFoundError:
                continue
    finally:
        os.close(fd)
    entries.sort(key=_by_name)
    names = "".join(map(_by_name, entries))
    if not names.isascii():
        try:
            names.encode("utf-8")
        except UnicodeEncodeError:  # escaped bytes sort by code point unlike the bytes they stand for
            entries.sort(key=_name_bytes)
    return entries


def _name_bytes(entry: tuple) -> bytes:
    return entry[0].encode("utf-8", "surrogateescape")


def _dir_prefix(abs_dir: str) -> str:
    return abs_dir if abs_dir.endswith("/") else abs_dir + "/"


def walk(
    root: str,
    *,
    entry_filter: EntryFilter | None = None,
    owner: tuple[int, int] | None = None,
    with_xattrs: bool = True,
    as_packets: bool = False,
) -> Iterator[Stat] | Iterator[tuple[Packet, str, int]]:
    """Yield the Stats of everything below ``root`` in fsutil order.

    ``owner`` forces uid/gid (the docker CLI maps the build context to 0/0).
    With a filter, a directory that is not itself included but is entered is
    listed lazily, just before the first entry below it that is included (so
    the receiver always sees a parent before its children).

    ``as_packets`` yields ``(packet, path, mode)`` instead: the Stat built
    inside its STAT Packet, with the path and Go mode it holds, which is what
    ``DiffCopySender.listed`` takes (no copy of the Stat, no reading it back).
    """
    root = _checked_root(root)
    fill_stat = _fill_stat
    first_name_of_inode: dict[tuple[int, int], str] = {}
    pending_parents: list = []  # entered but not yet listed directories
    # one frame per directory being listed: (iterator over its entries, its absolute
    # path + "/", its relative path + "/", depth of its own pending_parents slot
    # (0: the directory was listed already))
    frames: list[tuple] = [(iter(_listing(root, "")), _dir_prefix(root), "", 0)]
    while frames:
        entries, abs_prefix, prefix, own_depth = frames[-1]
        for name, st in entries:
            rel = prefix + name
            kind = st.st_mode & _S_IFMT
            is_dir = kind == _S_IFDIR
            if entry_filter is not None:
                decision = entry_filter.decide(rel, is_dir)
                include = decision.include
                if not include and not (is_dir and decision.descend):
                    continue
                descend = is_dir and decision.descend
            else:
                include = True
                descend = is_dir
            abs_path = abs_prefix + name
            if as_packets:
                packet = Packet()
                stat = packet.stat
            else:
                stat = Stat()
            uid, gid = (st.st_uid, st.st_gid) if owner is None else owner
            first = None
            if st.st_nlink > 1 and not is_dir and kind != _S_IFLNK:
                key = (st.st_dev, st.st_ino)
                first = first_name_of_inode.get(key)
                if first is None and include:
                    first_name_of_inode[key] = rel
            try:
                mode = fill_stat(stat, rel, st, abs_path, uid, gid, with_xattrs)
                if first is not None:
                    stat.linkname = first
            except UnicodeEncodeError:  # a name that is not UTF-8
                stat = NameStat()
                mode = fill_stat(stat, rel, st, abs_path, uid, gid, with_xattrs)
                if first is not None:
                    stat.linkname = first
                if as_packets:
                    packet = NamePacket(stat)
            item = (packet, rel, mode) if as_packets else stat
            if not include:  # a directory entered only for what lies below it
                pending_parents.append(item)
                pending_depth = len(pending_parents)
            else:
                if pending_parents:
                    yield from pending_parents
                    pending_parents.clear()
                yield item
                pending_depth = 0
            if descend:
                frames.append((iter(_listing(abs_path, rel)), abs_path + "/", rel + "/", pending_depth))
                break
        else:
            frames.pop()
            if own_depth and len(pending_parents) >= own_depth:
                del pending_parents[own_depth - 1 :]


def list_diff_base(root: str) -> list[PreviousEntry]:
    """The receiver's current tree, taken whole now, as diff-base entries.

    The same walk as :func:`walk` without xattrs (the diff ignores them), into
    the tuples the receiver compares (``diffcopy.previous_entry``) instead of
    Stat messages.
    """
    root = _checked_root(root)
    first_name_of_inode: dict[tuple[int, int], str] = {}
    sender_mode = filemode.sender_mode
    base: list[PreviousEntry] = []
    append = base.append
    frames: list[tuple] = [(iter(_listing(root, "")), _dir_prefix(root), "")]
    while frames:
        entries, abs_prefix, prefix = frames[-1]
        for name, st in entries:
            rel = prefix + name
            st_mode = st.st_mode
            kind = st_mode & _S_IFMT
            # the tuple layout is diffcopy.previous_entry's
            if kind == _S_IFREG:
                linkname = ""
                if st.st_nlink > 1:
                    linkname = first_name_of_inode.setdefault((st.st_dev, st.st_ino), rel)
                    if linkname == rel:
                        linkname = ""
                append((rel.replace("/", "\0") if rel.isascii() else path_sort_key(rel),
                        (rel, sender_mode(st_mode), st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, 0, 0,
                         linkname)))
            elif kind == _S_IFDIR:
                append((rel.replace("/", "\0") if rel.isascii() else path_sort_key(rel),
                        (rel, sender_mode(st_mode), st.st_uid, st.st_gid, 0, st.st_mtime_ns, 0, 0, "")))
                abs_path = abs_prefix + name
                frames.append((iter(_listing(abs_path, rel)), abs_path + "/", rel + "/"))
                break
            else:
                stat = stat_from_lstat(rel, st, abs_prefix + name, with_xattrs=False)
                if st.st_nlink > 1 and kind != _S_IFLNK:
                    first = first_name_of_inode.setdefault((st.st_dev, st.st_ino), rel)
                    if first != rel:
                        stat.linkname = first
                append(previous_entry(stat))
        else:
            frames.pop()
    return base


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
    try:
        st = os.lstat(abs_path)
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:
            raise
        st = _in_parent(abs_path, os.lstat)
    if not _st.S_ISREG(st.st_mode):  # (never opened: a device may act on open)
        if _st.S_ISSOCK(st.st_mode):
            return iter(())
        raise OSError(errno.EINVAL, "not a regular file", abs_path)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(abs_path, flags)
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:
            raise
        fd = open_long(abs_path, flags)

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
