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
import queue
import shutil
import stat as _st
import tarfile
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

from ..applier import remove_tree
from ..patterns import go_filepath_match
from ..paths import path_sort_key

if TYPE_CHECKING:
    from .listing import TreeListing

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


@dataclass
class SourceLinks:
    """Lets a COPY hardlink regular files from the synced context instead of copying them.

    Safe because nothing writes into those inodes while the build holds the
    context's lease: a sync replaces files by rename (never in place), and the
    rootfs is only ever changed by unlinking and recreating an entry.  A file
    is linked only when the copy would carry the same owner, mode and mtime
    anyway (the copy's metadata must never be applied to the shared inode),
    and each source inode at most once per rootfs, so names in the rootfs share
    an inode exactly where a copy would have made them share one.
    """

    # context paths whose inode has another name in the context (from the listing; the
    # st_nlink of a source no longer says so once some rootfs links to it)
    multi_named: frozenset[str]
    used: set[tuple[int, int]] = field(default_factory=set)  # source inodes linked into this rootfs


class Copier:
    """One COPY: entries land below ``rootfs``; ``changed`` lists what it wrote."""

    def __init__(self, context: str, rootfs: str, chown: tuple[int, int] | None,
                 links: SourceLinks | None = None):
        self.context = context
        self.rootfs = rootfs
        self.chown = chown
        self.links = links
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
                target_rel = relative(self.rootfs, target)
                self.changed.append(target_rel)
                self._copy_tree(host_source, source_rel, st, target, target_rel)
            else:
                existing = resolve_in_root(self.rootfs, dest)
                if dest_is_dir or os.path.isdir(existing):
                    parent = self.mkdir_all(dest, owner=self.chown)
                    target = os.path.join(parent, os.path.basename(source_rel))
                else:
                    parent = self.mkdir_all(posixpath.dirname(dest))
                    target = os.path.join(parent, posixpath.basename(dest))
                self._copy_entry(host_source, source_rel, st, target, relative(self.rootfs, target))

    def _copy_tree(self, source_dir: str, source_rel: str, st: os.stat_result, target_dir: str,
                   target_rel: str) -> None:
        """Copy the entries below ``source_dir`` into the existing ``target_dir``, then give
        it ``st``'s metadata.  A loop over a stack of directories, not recursion: a synced
        context may be thousands of levels deep."""
        # each frame: (entries left, source dir, its rel, target dir, its rel, its stat)
        stack = [(iter(self._entries(source_dir)), source_dir, source_rel, target_dir, target_rel, st)]
        while stack:
            entries, src_dir, src_rel, dst_dir, dst_rel, dir_st = stack[-1]
            for name, entry_st in entries:
                source = os.path.join(src_dir, name)
                entry_rel = f"{src_rel}/{name}" if src_rel else name
                target = os.path.join(dst_dir, name)
                target_entry_rel = f"{dst_rel}/{name}" if dst_rel else name
                if _st.S_ISDIR(entry_st.st_mode):
                    self._make_dir(target, target_entry_rel)
                    stack.append((iter(self._entries(source)), source, entry_rel, target, target_entry_rel,
                                  entry_st))
                    break
                self._copy_entry(source, entry_rel, entry_st, target, target_entry_rel)
            else:
                stack.pop()
                # after the children, which move the directory's mtime
                self._apply_metadata(dst_dir, dir_st, created=True)

    @staticmethod
    def _entries(source_dir: str) -> list[tuple[str, os.stat_result]]:
        with os.scandir(source_dir) as it:
            entries = [(e.name, e.stat(follow_symlinks=False)) for e in it]
        entries.sort(key=lambda item: item[0])
        return entries

    def _make_dir(self, target: str, target_rel: str) -> None:
        try:
            existing = os.lstat(target)
        except FileNotFoundError:
            existing = None
        if existing is not None and not _st.S_ISDIR(existing.st_mode):
            os.unlink(target)
            existing = None
        if existing is None:
            os.mkdir(target, 0o700)
        self.changed.append(target_rel)

    def _copy_entry(self, source: str, source_rel: str, st: os.stat_result, target: str, target_rel: str) -> None:
        mode = st.st_mode
        if _st.S_ISDIR(mode):
            self._make_dir(target, target_rel)
            self._copy_tree(source, source_rel, st, target, target_rel)
            return
        try:
            existing = os.lstat(target)
        except FileNotFoundError:
            existing = None
        if existing is not None:
            if _st.S_ISDIR(existing.st_mode):
                remove_tree(target)
            else:
                os.unlink(target)
        self.changed.append(target_rel)
        key = (st.st_dev, st.st_ino)
        links = self.links
        multi_named = source_rel in links.multi_named if links is not None else st.st_nlink > 1
        if multi_named and not _st.S_ISLNK(mode):
            first = self._links.get(key)
            if first is not None:
                os.link(first, target, follow_symlinks=False)
                return
            self._links[key] = target
        if _st.S_ISREG(mode) and links is not None and self._link_source(source, st, target, links):
            return
        if _st.S_ISLNK(mode):
            os.symlink(os.readlink(source), target)
        elif _st.S_ISREG(mode):
            _copy_file(source, target)
        elif _st.S_ISFIFO(mode) or _st.S_ISCHR(mode) or _st.S_ISBLK(mode):
            os.mknod(target, mode, st.st_rdev)
        else:  # sockets: an empty regular file, as fsutil sends them
            open(target, "wb").close()
        self._apply_metadata(target, st, created=True)

    def _link_source(self, source: str, st: os.stat_result, target: str, links: SourceLinks) -> bool:
        """Hardlink ``target`` to the source file when that is what a copy would produce."""
        key = (st.st_dev, st.st_ino)
        if key in links.used or (self.chown is not None and self.chown != (st.st_uid, st.st_gid)):
            return False
        try:
            os.link(source, target, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EACCES, errno.ENOTSUP):
                return False  # another filesystem, or not allowed: copy
            raise
        links.used.add(key)
        return True

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


_TAR_BLOCK = tarfile.BLOCKSIZE
_TAR_RECORD = tarfile.RECORDSIZE
_LAYER_CHUNK = 1 << 20  # bytes handed to the digest thread at a time
_LAYER_BUFFERS = 4  # chunks in flight: bounds the writer's memory to a few MiB
# The blank fields of a plain ustar header (uname, gname, empty device numbers, prefix).
_USTAR_BLANK_TAIL = b"\0" * (32 + 32 + 8 + 8 + 155)
_USTAR_TYPES = {tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE}


def tar_header(info: tarfile.TarInfo) -> bytes:
    """``info.tobuf(PAX_FORMAT, "utf-8", "surrogateescape")``, byte for byte, but about
    ten times faster for the common entry: an ASCII name and link target of at
    most 100 bytes, empty uname/gname, numbers that fit ustar's octal fields and
    no device numbers (which is exactly when tarfile writes no pax record).
    Anything else goes to tarfile."""
    name = info.name
    if info.type == tarfile.DIRTYPE and not name.endswith("/"):
        name += "/"
    linkname = info.linkname
    mtime = info.mtime
    if (info.type not in _USTAR_TYPES or info.uname or info.gname or type(mtime) is not int
            or not (name.isascii() and linkname.isascii() and len(name) <= 100 and len(linkname) <= 100)
            or not (0 <= info.uid < 0o10000000 and 0 <= info.gid < 0o10000000
                    and 0 <= info.size < 0o100000000000 and 0 <= mtime < 0o100000000000)):
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    head = b"%s%07o\0%07o\0%07o\0%011o\0%011o\0" % (
        name.encode("ascii").ljust(100, b"\0"), info.mode & 0o7777, info.uid, info.gid, info.size, mtime)
    tail = b"%s%sustar\x0000%s" % (info.type, linkname.encode("ascii").ljust(100, b"\0"), _USTAR_BLANK_TAIL)
    # the checksum counts its own field as eight spaces; tarfile keeps the eighth
    checksum = sum(head) + sum(tail) + 8 * 0x20
    return head + b"%06o\0 " % checksum + tail + b"\0" * 12


class _DigestingSink:
    """Writes a stream to ``fd`` in large chunks while a helper thread digests them.

    sha256 is the slowest part of a layer and releases the GIL, so it runs
    beside the reads, headers and writes instead of after each of them.  The
    chunks are reused once both the write and the digest are done with them.
    """

    def __init__(self, fd: int):
        self._fd = fd
        self.size = 0
        self._digest = hashlib.sha256()
        # chunks and the helper thread come when needed: most layers of a build fit in one chunk, which
        # finish() digests in place, without a thread (starting one, and zeroing 4 MiB, dominated small layers)
        self._free: "queue.SimpleQueue[bytearray]" = queue.SimpleQueue()
        self._allocated = 0
        self._todo: "queue.SimpleQueue[tuple[bytearray, int] | None]" = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._chunk = self._next_chunk()
        self._view = memoryview(self._chunk)
        self._used = 0

    def _next_chunk(self) -> bytearray:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        if self._allocated < _LAYER_BUFFERS:
            self._allocated += 1
            return bytearray(_LAYER_CHUNK)
        return self._free.get()  # all in flight: wait for the digest to hand one back

    def _digest_loop(self) -> None:
        while True:
            item = self._todo.get()
            if item is None:
                return
            chunk, length = item
            try:
                if self._error is None:
                    self._digest.update(memoryview(chunk)[:length])
            except BaseException as exc:  # reported by finish()
                self._error = exc
            self._free.put(chunk)

    def _ship(self, *, last: bool = False) -> None:
        """Write the current chunk out, hand it to the digest, take a free one (none after the last)."""
        view = self._view[: self._used]
        while view:
            view = view[os.write(self._fd, view):]
        self.size += self._used
        if last and self._thread is None:  # the whole layer was one chunk
            self._digest.update(self._view[: self._used])
            self._used = 0
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._digest_loop, name="layer-digest", daemon=True)
            self._thread.start()
        self._todo.put((self._chunk, self._used))
        self._used = 0
        if not last:
            self._chunk = self._next_chunk()
            self._view = memoryview(self._chunk)

    def write(self, data: bytes) -> None:
        data = memoryview(data)
        while data:
            room = _LAYER_CHUNK - self._used
            take = min(room, len(data))
            self._view[self._used : self._used + take] = data[:take]
            self._used += take
            data = data[take:]
            if self._used == _LAYER_CHUNK:
                self._ship()

    def zeros(self, count: int) -> None:
        self.write(bytes(count))

    def copy_from(self, fd: int, count: int, what: str) -> None:
        """Exactly ``count`` bytes of ``fd``, read straight into the chunks."""
        while count:
            room = _LAYER_CHUNK - self._used
            want = min(room, count)
            got = os.readv(fd, [self._view[self._used : self._used + want]])
            if got == 0:
                raise FsError(f"{what} shrank while its layer was written")
            self._used += got
            count -= got
            if self._used == _LAYER_CHUNK:
                self._ship()

    def finish(self) -> str:
        self._ship(last=True)
        self._stop_thread()
        if self._error is not None:
            raise self._error
        return "sha256:" + self._digest.hexdigest()

    def abort(self) -> None:
        self._stop_thread()

    def _stop_thread(self) -> None:
        if self._thread is not None:
            self._todo.put(None)
            self._thread.join()
            self._thread = None

    def tell(self) -> int:
        return self.size + self._used


def write_layer(rootfs: str, changed: Iterable[str], out_path: str) -> tuple[str, int]:
    """A deterministic tar of the changed entries and their parent directories.

    Byte for byte what ``tarfile`` writes in PAX format (see
    :func:`tar_header`), without its per-member overhead and small copy
    buffers.  Returns ("sha256:<hex>", size) of the tar.
    """
    paths: set[str] = set()
    for rel in changed:
        if not rel:
            continue
        paths.add(rel)
        parent = posixpath.dirname(rel)
        while parent and parent not in paths:
            paths.add(parent)
            parent = posixpath.dirname(parent)
    ordered = sorted((p for p in paths if os.path.lexists(os.path.join(rootfs, p))), key=path_sort_key)
    seen_inodes: dict[tuple[int, int], str] = {}
    with open(out_path, "wb", buffering=0) as raw:
        out = _DigestingSink(raw.fileno())
        try:
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
                content = False
                if kind == _st.S_IFDIR:
                    info.type = tarfile.DIRTYPE
                elif kind == _st.S_IFLNK:
                    info.type, info.linkname = tarfile.SYMTYPE, os.readlink(host)
                elif st.st_nlink > 1 and key in seen_inodes:
                    info.type, info.linkname = tarfile.LNKTYPE, seen_inodes[key]
                elif kind == _st.S_IFREG:
                    seen_inodes.setdefault(key, rel)
                    info.size = st.st_size
                    content = True
                elif kind in (_st.S_IFCHR, _st.S_IFBLK, _st.S_IFIFO):
                    info.type = {_st.S_IFCHR: tarfile.CHRTYPE, _st.S_IFBLK: tarfile.BLKTYPE}.get(kind, tarfile.FIFOTYPE)
                    info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
                else:
                    continue  # sockets have no tar form
                out.write(tar_header(info))
                if content and info.size:
                    fd = os.open(host, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                    try:
                        out.copy_from(fd, info.size, rel)
                    finally:
                        os.close(fd)
                    remainder = info.size % _TAR_BLOCK
                    if remainder:
                        out.zeros(_TAR_BLOCK - remainder)
            end = out.tell() + 2 * _TAR_BLOCK
            out.zeros(2 * _TAR_BLOCK + (-end) % _TAR_RECORD)
            digest = out.finish()
        except BaseException:
            out.abort()
            raise
    return digest, out.size


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
                remove_tree(target) if _st.S_ISDIR(existing.st_mode) else os.unlink(target)
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


def source_digest(context: str, sources: list[str], listing: "TreeListing | None" = None) -> str:
    """What a COPY reads, by the fields fsutil's diff compares (not contents).

    The context tree only changes through a sync, and a sync rewrites any
    entry whose size, mtime, mode, owner or link target moved, so equal
    digests mean the COPY would write the same thing.  ``listing`` is the
    context's walk when the caller already has it (a cache entry keeps one).
    """
    from .listing import TreeListing

    if listing is None:
        listing = TreeListing.of(context)
    digest = hashlib.sha256()
    for source in sources:
        for rel in expand_source(context, source):
            host = os.path.join(context, rel) if rel else context
            top = os.lstat(host)
            digest.update(f"source {rel!r} {top.st_mode:o} {top.st_uid} {top.st_gid} {top.st_size} "
                          f"{top.st_mtime_ns}\n".encode())
            if _st.S_ISDIR(top.st_mode):
                digest.update(listing.digest_below(rel))
            else:
                if _st.S_ISLNK(top.st_mode):
                    digest.update(os.readlink(host).encode("utf-8", "surrogateescape"))
                entry = listing.entry(rel)  # a hardlink's first name is only known here
                if entry is not None:
                    digest.update(entry.SerializeToString(deterministic=True))
    return digest.hexdigest()
