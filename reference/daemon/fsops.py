"""File operations confined to a root directory: resolve, copy, mkdir, layer tars.

Paths from a Dockerfile (``COPY x /../../etc``) or from the synced context
(a symlink ``link -> /``) must never lead outside the root they belong to.
:func:`resolve_in_root` resolves symlinks the way BuildKit's ``fs.RootPath``
does: absolute targets are taken relative to the root and ``..`` stops at the
root, so the result is always a real path below it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import posixpath
import shutil
import stat as _st
import tarfile
from typing import Iterable

from ..patterns import go_filepath_match
from ..paths import path_sort_key

MAX_SYMLINKS = 255


class FsError(Exception):
    """A COPY or WORKDIR that cannot be done; the text has no host paths."""


def clean(path: str) -> str:
    """``path`` as a clean absolute path inside a root (``..`` clamps at ``/``)."""
    return posixpath.normpath("/" + path).replace("//", "/") if path else "/"


def resolve_in_root(root: str, path: str, *, follow_last: bool = True) -> str:
    """The real host path for ``path`` inside ``root``; missing tails are kept.

    Every existing component that is a symlink is replaced by its target,
    read relative to ``root``.
    """
    parts = [p for p in clean(path).split("/") if p]
    resolved: list[str] = []
    hops = 0
    while parts:
        name = parts.pop(0)
        if name == "..":
            if resolved:
                resolved.pop()
            continue
        if name == ".":
            continue
        candidate = os.path.join(root, *resolved, name)
        is_last = not parts
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            resolved.append(name)
            resolved.extend(p for p in parts)
            break
        except NotADirectoryError:
            raise FsError(f"not a directory: {clean('/'.join(resolved))}") from None
        if _st.S_ISLNK(st.st_mode) and (follow_last or not is_last):
            hops += 1
            if hops > MAX_SYMLINKS:
                raise FsError(f"too many levels of symbolic links: {clean(path)}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p] + parts
            continue
        resolved.append(name)
    return os.path.join(root, *resolved) if resolved else root


def relative(root: str, host_path: str) -> str:
    rel = os.path.relpath(host_path, root)
    return "" if rel == "." else rel


def has_wildcard(path: str) -> bool:
    return any(c in path for c in "*?[")


def expand_source(context: str, source: str) -> list[str]:
    """Context-relative paths a COPY source names (wildcards matched per component)."""
    cleaned = clean(source)
    if not has_wildcard(cleaned):
        host = resolve_in_root(context, cleaned)
        if not os.path.lexists(host):
            raise FsError(f'"{cleaned}" not found: not found')
        return [relative(context, host)]
    matches = [""]
    for component in [p for p in cleaned.split("/") if p]:
        next_matches = []
        for base in matches:
            host_dir = resolve_in_root(context, base)
            if not has_wildcard(component):
                if os.path.lexists(os.path.join(host_dir, component)):
                    next_matches.append(posixpath.join(base, component))
                continue
            try:
                names = sorted(os.listdir(host_dir))
            except (NotADirectoryError, FileNotFoundError):
                continue
            next_matches += [posixpath.join(base, n) for n in names if go_filepath_match(component, n)]
        matches = next_matches
    if not matches:
        raise FsError(f'"{cleaned}" not found: no source files were specified')
    return [relative(context, resolve_in_root(context, m)) for m in matches]


class Copier:
    """One COPY: entries land below ``rootfs``; ``changed`` lists what it wrote."""

    def __init__(self, context: str, rootfs: str, chown: tuple[int, int] | None):
        self.context = context
        self.rootfs = rootfs
        self.chown = chown
        self.changed: list[str] = []  # rootfs-relative
        self._links: dict[tuple[int, int], str] = {}  # source inode -> first destination

    def mkdir_all(self, path: str, *, owner: tuple[int, int] | None = None) -> str:
        """Create ``path`` (inside rootfs) and its missing parents; returns the host path."""
        host = resolve_in_root(self.rootfs, path)
        rel = relative(self.rootfs, host)
        current = self.rootfs
        for part in [p for p in rel.split("/") if p]:
            current = os.path.join(current, part)
            try:
                st = os.lstat(current)
            except FileNotFoundError:
                os.mkdir(current, 0o755)
                os.chmod(current, 0o755)
                if owner is not None:
                    os.lchown(current, *owner)
                self.changed.append(relative(self.rootfs, current))
                continue
            if not _st.S_ISDIR(st.st_mode):
                raise FsError(f"cannot create directory {clean(relative(self.rootfs, current))}: not a directory")
        return host

    def copy(self, sources: list[str], dest: str, workdir: str) -> None:
        dest_is_dir = dest.endswith("/") or dest.endswith("/.") or dest in (".", "")
        if not dest.startswith("/"):
            dest = posixpath.join(workdir, dest)
        expanded: list[str] = []
        for source in sources:
            expanded += expand_source(self.context, source)
        if (len(expanded) > 1 or len(sources) > 1) and not dest_is_dir:
            raise FsError("When using COPY with more than one source file, "
                          "the destination must be a directory and end with a /")
        dest = clean(dest)
        for source_rel in expanded:
            host_source = os.path.join(self.context, source_rel) if source_rel else self.context
            st = os.lstat(host_source)
            if _st.S_ISDIR(st.st_mode):
                target = self.mkdir_all(dest, owner=self.chown)
                self.changed.append(relative(self.rootfs, target))
                self._apply_metadata(target, st, created=True)
                self._copy_tree(host_source, target)
            else:
                existing = resolve_in_root(self.rootfs, dest)
                if dest_is_dir or os.path.isdir(existing):
                    parent = self.mkdir_all(dest, owner=self.chown)
                    target = os.path.join(parent, os.path.basename(source_rel))
                else:
                    parent = self.mkdir_all(posixpath.dirname(dest))
                    target = os.path.join(parent, posixpath.basename(dest))
                self._copy_entry(host_source, st, target)

    def _copy_tree(self, source_dir: str, target_dir: str) -> None:
        with os.scandir(source_dir) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            st = entry.stat(follow_symlinks=False)
            target = os.path.join(target_dir, entry.name)
            self._copy_entry(entry.path, st, target)

    def _copy_entry(self, source: str, st: os.stat_result, target: str) -> None:
        mode = st.st_mode
        try:
            existing = os.lstat(target)
        except FileNotFoundError:
            existing = None
        if _st.S_ISDIR(mode):
            if existing is not None and not _st.S_ISDIR(existing.st_mode):
                os.unlink(target)
                existing = None
            if existing is None:
                os.mkdir(target, 0o700)
            self.changed.append(relative(self.rootfs, target))
            self._copy_tree(source, target)
            self._apply_metadata(target, st, created=True)
            return
        if existing is not None:
            if _st.S_ISDIR(existing.st_mode):
                shutil.rmtree(target)
            else:
                os.unlink(target)
        self.changed.append(relative(self.rootfs, target))
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and not _st.S_ISLNK(mode):
            first = self._links.get(key)
            if first is not None:
                os.link(first, target, follow_symlinks=False)
                return
            self._links[key] = target
        if _st.S_ISLNK(mode):
            os.symlink(os.readlink(source), target)
        elif _st.S_ISREG(mode):
            _copy_file(source, target)
        elif _st.S_ISFIFO(mode) or _st.S_ISCHR(mode) or _st.S_ISBLK(mode):
            os.mknod(target, mode, st.st_rdev)
        else:  # sockets: an empty regular file, as fsutil sends them
            open(target, "wb").close()
        self._apply_metadata(target, st, created=True)

    def _apply_metadata(self, target: str, st: os.stat_result, *, created: bool) -> None:
        uid, gid = self.chown if self.chown is not None else (st.st_uid, st.st_gid)
        try:
            os.lchown(target, uid, gid)
        except PermissionError:
            pass
        if not _st.S_ISLNK(st.st_mode):
            os.chmod(target, _st.S_IMODE(st.st_mode))
        os.utime(target, ns=(st.st_mtime_ns, st.st_mtime_ns), follow_symlinks=False)


def _copy_file(source: str, target: str) -> None:
    src = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            while True:
                try:
                    copied = os.copy_file_range(src, dst, 1 << 30)
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                        raise
                    while chunk := os.read(src, 1 << 20):
                        os.write(dst, chunk)
                    return
                if not copied:
                    return
        finally:
            os.close(dst)
    finally:
        os.close(src)


class _HashingFile:
    """A write-only file that digests what passes through (no second read of the layer)."""

    def __init__(self, fh):
        self._fh = fh
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self._fh.write(data)

    def tell(self) -> int:
        return self.size


def write_layer(rootfs: str, changed: Iterable[str], out_path: str) -> tuple[str, int]:
    """A deterministic tar of the changed entries and their parent directories.

    Returns ("sha256:<hex>", size) of the tar.
    """
    paths: set[str] = set()
    for rel in changed:
        if not rel:
            continue
        paths.add(rel)
        parent = posixpath.dirname(rel)
        while parent:
            paths.add(parent)
            parent = posixpath.dirname(parent)
    ordered = sorted((p for p in paths if os.path.lexists(os.path.join(rootfs, p))), key=path_sort_key)
    seen_inodes: dict[tuple[int, int], str] = {}
    with open(out_path, "wb") as raw, tarfile.open(fileobj=(out := _HashingFile(raw)), mode="w",
                                                     format=tarfile.PAX_FORMAT) as tar:
        for rel in ordered:
            host = os.path.join(rootfs, rel)
            st = os.lstat(host)
            info = tarfile.TarInfo(rel + ("/" if _st.S_ISDIR(st.st_mode) else ""))
            info.mode = _st.S_IMODE(st.st_mode)
            info.uid, info.gid = st.st_uid, st.st_gid
            info.uname = info.gname = ""
            info.mtime = st.st_mtime_ns // 1_000_000_000
            kind = _st.S_IFMT(st.st_mode)
            key = (st.st_dev, st.st_ino)
            if kind == _st.S_IFDIR:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif kind == _st.S_IFLNK:
                info.type, info.linkname = tarfile.SYMTYPE, os.readlink(host)
                tar.addfile(info)
            elif st.st_nlink > 1 and key in seen_inodes:
                info.type, info.linkname = tarfile.LNKTYPE, seen_inodes[key]
                tar.addfile(info)
            elif kind == _st.S_IFREG:
                seen_inodes.setdefault(key, rel)
                info.size = st.st_size
                with open(host, "rb") as fh:
                    tar.addfile(info, fh)
            elif kind in (_st.S_IFCHR, _st.S_IFBLK, _st.S_IFIFO):
                info.type = {_st.S_IFCHR: tarfile.CHRTYPE, _st.S_IFBLK: tarfile.BLKTYPE}.get(kind, tarfile.FIFOTYPE)
                info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
                tar.addfile(info)
    return "sha256:" + out.digest.hexdigest(), out.size


def extract_layer(tar_path: str, rootfs: str) -> None:
    """Apply one of our layer tars to ``rootfs`` (to rebuild the state after cached steps).

    Written for our own layers, yet still careful: a member whose parent is
    not a real directory inside rootfs is refused, and an existing entry of
    another kind is replaced rather than written through.
    """
    directories: list[tuple[str, int]] = []
    with tarfile.open(tar_path) as tar:
        for member in tar:
            rel = clean(member.name).lstrip("/")
            if not rel:
                continue
            parent = os.path.join(rootfs, posixpath.dirname(rel)) if "/" in rel else rootfs
            if resolve_in_root(rootfs, posixpath.dirname(rel)) != parent.rstrip("/") or not os.path.isdir(parent):
                raise FsError(f"layer entry {rel!r} is not under a directory")
            target = os.path.join(rootfs, rel)
            try:
                existing = os.lstat(target)
            except FileNotFoundError:
                existing = None
            if existing is not None and not (member.isdir() and _st.S_ISDIR(existing.st_mode)):
                shutil.rmtree(target) if _st.S_ISDIR(existing.st_mode) else os.unlink(target)
            if member.isdir():
                if existing is None or not _st.S_ISDIR(existing.st_mode):
                    os.mkdir(target, 0o700)
                directories.append((target, member))
                continue
            if member.issym():
                os.symlink(member.linkname, target)
            elif member.islnk():
                os.link(os.path.join(rootfs, clean(member.linkname).lstrip("/")), target, follow_symlinks=False)
                continue
            elif member.isreg():
                src = tar.extractfile(member)
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                with os.fdopen(fd, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            elif member.ischr() or member.isblk() or member.isfifo():
                kind = _st.S_IFCHR if member.ischr() else _st.S_IFBLK if member.isblk() else _st.S_IFIFO
                os.mknod(target, kind | 0o600, os.makedev(member.devmajor, member.devminor))
            _set_member_metadata(target, member)
    for target, member in reversed(directories):  # after their children were written
        _set_member_metadata(target, member)


def _set_member_metadata(target: str, member: tarfile.TarInfo) -> None:
    try:
        os.lchown(target, member.uid, member.gid)
    except PermissionError:
        pass
    if not member.issym():
        os.chmod(target, member.mode & 0o7777)
    mtime_ns = int(member.mtime) * 1_000_000_000
    os.utime(target, ns=(mtime_ns, mtime_ns), follow_symlinks=False)


def source_digest(context: str, sources: list[str]) -> str:
    """What a COPY reads, by the fields fsutil's diff compares (not contents).

    The context tree only changes through a sync, and a sync rewrites any
    entry whose size, mtime, mode, owner or link target moved, so equal
    digests mean the COPY would write the same thing.
    """
    from ..walker import walk

    digest = hashlib.sha256()
    for source in sources:
        for rel in expand_source(context, source):
            host = os.path.join(context, rel) if rel else context
            top = os.lstat(host)
            digest.update(f"source {rel!r} {top.st_mode:o} {top.st_uid} {top.st_gid} {top.st_size} "
                          f"{top.st_mtime_ns}\n".encode())
            if _st.S_ISDIR(top.st_mode):
                for stat in walk(host):
                    digest.update(stat.SerializeToString(deterministic=True))
            elif _st.S_ISLNK(top.st_mode):
                digest.update(os.readlink(host).encode("utf-8", "surrogateescape"))
    return digest.hexdigest()
