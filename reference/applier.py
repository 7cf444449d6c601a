"""Applies the receiver's actions to a directory, safely.

Every operation goes through directory file descriptors opened with
``O_NOFOLLOW`` from the root down, so nothing the tree contains (a symlink to
``/etc``, say) can redirect a write outside the root.  New file contents are
written to a staging directory beside the root and renamed into place only
when complete: a sync that stops half way leaves each file either old or new,
never truncated, and :meth:`TreeApplier.finish` is the only way to say the tree
is complete.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat as _st
import uuid
from typing import Iterable, Mapping

from . import filemode
from .diffcopy import DeleteEntry, FileData, FileDone, ListingDone, PutEntry, ReceiverAction
from .errors import SessionError
from .paths import ReceiveLimits, shorten_path
from .pb.fsutil_types_pb2 import Stat


class ApplyError(SessionError):
    pass


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_removals = itertools.count()
# Directory fds an applier keeps open, and how many levels above a directory it keeps
# when it opens one from the root (more would be forgotten again before their use).
_MAX_DIR_FDS = 256
_KEEP_NEAR = 32


def remove_tree(path: str, *, dir_fd: int | None = None) -> None:
    """Remove ``path`` and everything below it, whatever its depth.

    No recursion and never more than two directories open: the entries of
    each subdirectory are renamed up into ``path`` (one rename each, within
    the tree) and the emptied subdirectory removed, until ``path`` holds no
    directory.  Symlinks are removed, never followed.  A missing ``path`` is
    not an error; anything else that fails raises OSError.
    """
    try:
        st = os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not _st.S_ISDIR(st.st_mode):
        os.unlink(path, dir_fd=dir_fd)
        return
    top = _open_writable_dir(path, dir_fd)
    prefix = f".rm{os.getpid()}-{next(_removals)}-"
    moved = itertools.count()
    try:
        while True:
            with os.scandir(top) as it:
                entries = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in it]
            subdirs = []
            for name, is_dir in entries:
                if is_dir:
                    subdirs.append(name)
                else:
                    try:
                        os.unlink(name, dir_fd=top)
                    except FileNotFoundError:
                        pass
            if not subdirs:
                break
            for name in subdirs:
                child = _open_writable_dir(name, top)
                try:
                    with os.scandir(child) as it:
                        names = [entry.name for entry in it]
                    for inner in names:
                        while True:
                            target = f"{prefix}{next(moved)}"
                            try:
                                os.rename(inner, target, src_dir_fd=child, dst_dir_fd=top)
                                break
                            except FileNotFoundError:
                                break
                            except OSError as exc:  # the name is taken: take another
                                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR,
                                                     errno.ENOTDIR):
                                    raise
                finally:
                    os.close(child)
                os.rmdir(name, dir_fd=top)
    finally:
        os.close(top)
    os.rmdir(path, dir_fd=dir_fd)


def disk_limits(root: str, limits: ReceiveLimits, min_free_disk: int) -> ReceiveLimits:
    """``limits`` with ``max_transfer_bytes`` at most the free space of ``root``'s disk less
    ``min_free_disk``: a transfer that cannot fit fails at its first STAT too many, not at ENOSPC."""
    try:
        fs = os.statvfs(root)
    except OSError:
        return limits
    budget = max(0, fs.f_bavail * fs.f_frsize - min_free_disk)
    if limits.max_transfer_bytes is not None:
        budget = min(budget, limits.max_transfer_bytes)
    return ReceiveLimits(limits.max_path_length, limits.max_depth, limits.max_entries, budget)


def _open_writable_dir(path: str, dir_fd: int | None) -> int:
    """A directory's fd, made writable and searchable first if it was not (a received
    mode such as 0o500 would stop its removal)."""
    fd = os.open(path, _DIR_FLAGS, dir_fd=dir_fd)
    st = os.fstat(fd)
    if st.st_mode & 0o700 != 0o700 and os.geteuid() != 0:
        try:
            os.fchmod(fd, _st.S_IMODE(st.st_mode) | 0o700)
        except OSError:
            pass
    return fd


class TreeApplier:
    """Writes a received tree under ``root``.

    ``chown``: ``True`` applies uid/gid (and fails if not permitted), ``None``
    applies them where permitted, ``False`` never.  ``staging`` is a directory
    on the same filesystem for files in transit (default: a hidden sibling of
    ``root``).
    """

    def __init__(self, root: str, *, chown: bool | None = None, staging: str | None = None, xattrs: bool = True):
        self.root = os.path.abspath(root)
        os.makedirs(self.root, exist_ok=True)
        self._root_fd = os.open(self.root, _DIR_FLAGS)
        self._chown = chown
        self._xattrs = xattrs
        parent, name = os.path.split(self.root)
        self._staging_path = staging or os.path.join(parent, f".{name}.incoming-{uuid.uuid4().hex[:12]}")
        self._staging_fd: int | None = None
        # names in staging: unique to this applier (a caller may share the staging
        # directory), then a counter instead of a random draw per file
        self._tmp_prefix = uuid.uuid4().hex[:16] + "-"
        self._tmp_count = 0
        self._dir_fds: dict[str, int] = {}
        # requested files: id -> [fd or None, tmp name, path, stat]; the staging file is
        # opened at the first DATA, so a listing of many files holds few descriptors
        self._open_files: dict[int, list] = {}
        self._pending_paths: set[str] = set()
        self._waiting_links: dict[str, list[tuple[str, Stat]]] = {}  # target -> [(link path, stat)]
        self._dir_metadata: list[tuple[str, Stat]] = []
        self._touched_dirs: set[str] = set()  # directories whose entries we changed
        self.files_written = 0
        self.bytes_written = 0
        self._closed = False

    # -- public -------------------------------------------------------------
    def apply(self, action: ReceiverAction) -> None:
        if isinstance(action, FileData):
            self._write(action.file_id, action.chunk)
        elif isinstance(action, PutEntry):
            self._put(action)
        elif isinstance(action, FileDone):
            self._complete(action.file_id)
        elif isinstance(action, DeleteEntry):
            self._remove(action.path)
        elif isinstance(action, ListingDone):
            pass
        else:
            raise ApplyError(f"not an action for the applier: {action!r}")

    def apply_all(self, actions: Iterable[ReceiverAction]) -> None:
        for action in actions:
            self.apply(action)

    def finish(self, directories: Mapping[str, Stat] = {}) -> None:
        """Set directory metadata (children changed their mtimes) and close.

        ``directories`` (the receiver's incoming directory Stats) lets us put
        back the mtime of an unchanged directory whose entries we replaced.
        """
        if self._open_files:
            raise ApplyError(f"{len(self._open_files)} files still incomplete")
        self._check_no_waiting_links()
        scheduled = {path for path, _ in self._dir_metadata}
        for path in self._touched_dirs - scheduled:
            stat = directories.get(path)
            if stat is not None:
                self._dir_metadata.append((path, stat))
        self._dir_metadata.sort(key=lambda item: item[0].count("/"))
        for path, stat in reversed(self._dir_metadata):
            parent_fd, name = self._parent(path)
            self._set_metadata(parent_fd, name, stat, is_dir=True)
        self._dir_metadata.clear()
        self.close()

    def _check_no_waiting_links(self) -> None:
        if self._waiting_links:
            missing = ", ".join(sorted(self._waiting_links))
            raise ApplyError(f"hardlinks to files that never arrived: {missing}")

    def abort(self) -> None:
        """Drop files in transit; what was complete stays, the rest stays old."""
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for fd, *_ in self._open_files.values():
            if fd is not None:
                os.close(fd)
        self._open_files.clear()
        self._pending_paths.clear()
        for fd in self._dir_fds.values():
            os.close(fd)
        self._dir_fds.clear()
        if self._staging_fd is not None:
            os.close(self._staging_fd)
            self._staging_fd = None
            try:
                remove_tree(self._staging_path)
            except OSError:
                pass
        os.close(self._root_fd)

    def __enter__(self) -> "TreeApplier":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.abort()

    # -- directories --------------------------------------------------------
    def _dir(self, path: str) -> int:
        """fd of directory ``path`` (relative; "" is the root), never via a symlink.

        Opened one component at a time from the nearest directory already open
        (a loop, not recursion: a tree may be thousands of levels deep)."""
        if path == "":
            return self._root_fd
        fds = self._dir_fds
        fd = fds.get(path)
        if fd is not None:
            return fd
        # the nearest open ancestor, then down from it
        base, base_fd = path, None
        while base_fd is None:
            slash = base.rfind("/")
            if slash < 0:
                base, base_fd = "", self._root_fd
            else:
                base = base[:slash]
                base_fd = fds.get(base)
        if len(fds) > _MAX_DIR_FDS:
            self._forget_dirs("")
            if base:  # its fd was just closed: start again from the root
                base, base_fd = "", self._root_fd
        fd, kept = base_fd, True
        current = base
        names = (path[len(base) + 1:] if base else path).split("/")
        last = len(names) - 1
        for index, name in enumerate(names):
            current = f"{current}/{name}" if current else name
            try:
                next_fd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if not kept:
                    os.close(fd)
                raise ApplyError(f"parent directory {shorten_path(current)!r} is missing or not a directory "
                                 f"({exc.strerror})") from None
            if not kept:
                os.close(fd)  # an intermediate directory beyond the cache's bound
            fd = next_fd
            # keep the levels nearest the target (the next entries are most likely below it)
            kept = index == last or (index >= last - _KEEP_NEAR and len(fds) < _MAX_DIR_FDS)
            if kept:
                fds[current] = fd
        return fd

    def _forget_dirs(self, prefix: str) -> None:
        """Close cached fds of ``prefix`` and everything below it ("" = all)."""
        below = prefix + "/"
        for path in [p for p in self._dir_fds if not prefix or p == prefix or p.startswith(below)]:
            os.close(self._dir_fds.pop(path))

    def _parent(self, path: str) -> tuple[int, str]:
        slash = path.rfind("/")
        if slash < 0:
            return self._root_fd, path
        return self._dir(path[:slash]), path[slash + 1 :]

    def _touch_parent(self, path: str) -> None:
        slash = path.rfind("/")
        if slash > 0:
            self._touched_dirs.add(path[:slash])

    def _staging(self) -> int:
        if self._staging_fd is None:
            os.makedirs(self._staging_path, mode=0o700, exist_ok=True)
            self._staging_fd = os.open(self._staging_path, _DIR_FLAGS)
        return self._staging_fd

    # -- entries ------------------------------------------------------------
    def _existing(self, parent_fd: int, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def _remove(self, path: str) -> None:
        parent_fd, name = self._parent(path)
        st = self._existing(parent_fd, name)
        if st is None:
            return
        if _st.S_ISDIR(st.st_mode):
            self._forget_dirs(path)
            self._dir_metadata = [(p, s) for p, s in self._dir_metadata if p != path and not p.startswith(path + "/")]
            remove_tree(name, dir_fd=parent_fd)
        else:
            os.unlink(name, dir_fd=parent_fd)
        self._touch_parent(path)

    def _put(self, action: PutEntry) -> None:
        path, stat = action.path, action.stat
        mode = stat.mode
        parent_fd, name = self._parent(path)
        if filemode.is_dir(mode):
            st = self._existing(parent_fd, name)
            if st is None or not _st.S_ISDIR(st.st_mode):
                if st is not None:
                    os.unlink(name, dir_fd=parent_fd)
                os.mkdir(name, 0o700, dir_fd=parent_fd)
                self._touch_parent(path)
            self._dir_metadata.append((path, stat))
            return
        if action.file_id is not None:
            self._open_files[action.file_id] = [None, self._tmp_name(), path, stat]
            self._pending_paths.add(path)
            return
        tmp = self._tmp_name()
        staging = self._staging()
        if filemode.is_symlink(mode):
            os.symlink(stat.linkname, tmp, dir_fd=staging)
        elif stat.linkname:  # hardlink: never requested, linked to its first name
            if self._link_waits_for(stat.linkname):
                self._waiting_links.setdefault(stat.linkname, []).append((path, stat))
                return
            self._link(path, stat)
            return
        elif filemode.is_fifo(mode) or filemode.is_device(mode):
            rdev = filemode.rdev_from_numbers(stat.devmajor, stat.devminor) if filemode.is_device(mode) else 0
            try:
                os.mknod(tmp, filemode.st_mode_from_go_mode(mode) & ~0o7000 | 0o600, rdev, dir_fd=staging)
            except PermissionError:
                raise ApplyError(f"not permitted to create device {path!r}") from None
        else:  # a regular file nobody asked data for cannot happen; sockets arrive as regular files
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=staging))
        self._set_metadata(staging, tmp, stat, is_dir=False)
        self._move_into_place(tmp, parent_fd, name, path)

    def _link_waits_for(self, target: str) -> bool:
        return target in self._pending_paths

    def _staging_file(self, entry: list) -> int:
        if entry[0] is None:
            entry[0] = os.open(entry[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                               dir_fd=self._staging())
        return entry[0]

    def _link(self, path: str, stat: Stat) -> None:
        target_parent, target_name = self._parent(stat.linkname)
        tmp = self._tmp_name()
        try:
            os.link(target_name, tmp, src_dir_fd=target_parent, dst_dir_fd=self._staging(), follow_symlinks=False)
        except FileNotFoundError:
            raise ApplyError(f"hardlink {path!r} to missing file {stat.linkname!r}") from None
        parent_fd, name = self._parent(path)
        self._move_into_place(tmp, parent_fd, name, path)

    def _write(self, file_id: int, chunk: bytes) -> None:
        fd = self._staging_file(self._open_files[file_id])
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view) :]
        self.bytes_written += len(chunk)

    def _complete(self, file_id: int) -> None:
        entry = self._open_files.pop(file_id)
        fd = self._staging_file(entry)
        _, tmp, path, stat = entry
        self._pending_paths.discard(path)
        try:
            self._set_metadata_fd(fd, stat)
        finally:
            os.close(fd)
        staging = self._staging()
        os.utime(tmp, ns=(stat.modTime, stat.modTime), dir_fd=staging, follow_symlinks=False)
        parent_fd, name = self._parent(path)
        self._move_into_place(tmp, parent_fd, name, path)
        self.files_written += 1
        for link_path, link_stat in self._waiting_links.pop(path, ()):
            self._link(link_path, link_stat)

    def _move_into_place(self, tmp: str, parent_fd: int, name: str, path: str) -> None:
        st = self._existing(parent_fd, name)
        if st is not None and _st.S_ISDIR(st.st_mode):
            self._remove(path)
        os.rename(tmp, name, src_dir_fd=self._staging(), dst_dir_fd=parent_fd)
        self._touch_parent(path)

    def _tmp_name(self) -> str:
        self._tmp_count += 1
        return f"{self._tmp_prefix}{self._tmp_count}"

    # -- metadata -------------------------------------------------------------
    def _owner_ok(self, exc: OSError) -> None:
        if self._chown is True or exc.errno not in (errno.EPERM, errno.EINVAL):
            raise exc

    def _set_metadata_fd(self, fd: int, stat: Stat) -> None:
        if self._chown is not False:
            try:
                os.fchown(fd, stat.uid, stat.gid)
            except OSError as exc:
                self._owner_ok(exc)
        os.fchmod(fd, filemode.permission_bits(stat.mode))
        if self._xattrs:
            for key, value in stat.xattrs.items():
                try:
                    os.setxattr(fd, key, value)
                except OSError:
                    pass  # like fsutil: xattrs are best effort

    def _set_metadata(self, parent_fd: int, name: str, stat: Stat, *, is_dir: bool) -> None:
        symlink = filemode.is_symlink(stat.mode)
        if self._chown is not False:
            try:
                os.chown(name, stat.uid, stat.gid, dir_fd=parent_fd, follow_symlinks=False)
            except OSError as exc:
                self._owner_ok(exc)
        if not symlink:  # Linux has no lchmod; a symlink's own mode is fixed
            os.chmod(name, filemode.permission_bits(stat.mode), dir_fd=parent_fd)
            if self._xattrs and stat.xattrs:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_DIRECTORY if is_dir else 0), dir_fd=parent_fd)
                try:
                    for key, value in stat.xattrs.items():
                        try:
                            os.setxattr(fd, key, value)
                        except OSError:
                            pass
                finally:
                    os.close(fd)
        os.utime(name, ns=(stat.modTime, stat.modTime), dir_fd=parent_fd, follow_symlinks=False)
