"""The legacy ``TarStream`` file sync (generation "n-1", moby 17.07) as sans-IO pieces.

The sender streams an uncompressed tar of the tree (excludes already applied
by the walk) in 32 KiB ``BytesMessage`` payloads and ends the call; the
receiver parses tar blocks as they arrive and turns them into the same
actions the DiffCopy receiver produces, so one applier writes both.
"""

from __future__ import annotations

import tarfile
from typing import Callable, Iterable, Iterator

from . import filemode
from .diffcopy import Change, FileData, FileDone, ListingDone, PutEntry, new_stat
from .errors import ProtocolError
from .paths import DEFAULT_LIMITS, LimitExceeded, ReceiveLimits, check_path_syntax, path_bytes
from .pb.fsutil_types_pb2 import Stat

BLOCK = 512
MESSAGE_SIZE = 32 * 1024
#: Largest pax or GNU long-name member kept in memory (Go's archive/tar: 1 MiB).
MAX_SPECIAL_MEMBER = 1 << 20


# -- sender -----------------------------------------------------------------

def _tarinfo(stat: Stat) -> tarfile.TarInfo:
    mode = stat.mode
    info = tarfile.TarInfo(stat.path + ("/" if filemode.is_dir(mode) else ""))
    info.mode = filemode.permission_bits(mode)
    info.uid, info.gid = stat.uid, stat.gid
    info.mtime = stat.modTime // 1_000_000_000
    if filemode.is_dir(mode):
        info.type = tarfile.DIRTYPE
    elif filemode.is_symlink(mode):
        info.type, info.linkname = tarfile.SYMTYPE, stat.linkname
    elif stat.linkname:
        info.type, info.linkname = tarfile.LNKTYPE, stat.linkname
    elif filemode.is_fifo(mode):
        info.type = tarfile.FIFOTYPE
    elif filemode.is_device(mode):
        info.type = tarfile.CHRTYPE if mode & filemode.MODE_CHAR_DEVICE else tarfile.BLKTYPE
        info.devmajor, info.devminor = stat.devmajor, stat.devminor
    else:
        info.type, info.size = tarfile.REGTYPE, stat.size
    return info


def tar_messages(stats: Iterable[Stat], read_file: Callable[[str], Iterable[bytes]]) -> Iterator[bytes]:
    """Payloads of the BytesMessages that carry the tar, each at most 32 KiB.

    A file that shrank while being read is padded with zeros and one that grew
    is cut, so the archive always matches its headers.
    """
    buf = bytearray()
    for stat in stats:
        info = _tarinfo(stat)
        buf += info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        if info.type == tarfile.REGTYPE:
            left = info.size
            for chunk in read_file(stat.path):
                chunk = chunk[:left]
                left -= len(chunk)
                buf += chunk
                while len(buf) >= MESSAGE_SIZE:
                    yield bytes(buf[:MESSAGE_SIZE])
                    del buf[:MESSAGE_SIZE]
                if not left:
                    break
            buf += b"\0" * left
            buf += b"\0" * (-info.size % BLOCK)
        while len(buf) >= MESSAGE_SIZE:
            yield bytes(buf[:MESSAGE_SIZE])
            del buf[:MESSAGE_SIZE]
    buf += b"\0" * (2 * BLOCK)
    while buf:
        yield bytes(buf[:MESSAGE_SIZE])
        del buf[:MESSAGE_SIZE]


# -- receiver ---------------------------------------------------------------

_TYPE_MODE = {
    tarfile.DIRTYPE: filemode.MODE_DIR,
    tarfile.SYMTYPE: filemode.MODE_SYMLINK,
    tarfile.FIFOTYPE: filemode.MODE_NAMED_PIPE,
    tarfile.CHRTYPE: filemode.MODE_DEVICE | filemode.MODE_CHAR_DEVICE,
    tarfile.BLKTYPE: filemode.MODE_DEVICE,
}


class TarReceiver:
    """Parses a tar stream incrementally into applier actions.

    Every member name must be a clean relative path; parents the archive
    leaves out are created as 0755 directories.  No diff base: the legacy
    protocol always transfers the whole tree.  ``limits`` apply as in the
    DiffCopy receiver (path length, depth, entries, bytes).
    """

    def __init__(self, limits: ReceiveLimits = DEFAULT_LIMITS) -> None:
        self._limits = limits
        self._bytes = 0  # member data so far, against max_transfer_bytes
        self._buf = bytearray()
        self._file: tuple[int, str] | None = None  # (id, path) of the member being read
        self._left = 0  # data bytes left in the current member
        self._pad = 0
        self._special: tuple[bytes, int] | None = None  # pax or GNU long-name member being read
        self._pax: dict[str, str] = {}
        self._longname: str | None = None
        self._longlink: str | None = None
        self._next_id = 0
        self._dirs: set[str] = set()
        self._zero_blocks = 0
        self.done = False
        self.requested: list[str] = []
        self._head = bytearray()  # the first bytes, until the compression is known
        self._decompressor = None

    def feed(self, data: bytes) -> list:
        """Actions for the next bytes of the stream (plain, gzip, bzip2 or xz, detected
        from the first bytes, as moby's DecompressStream does)."""
        if self._decompressor is None:
            self._head += data
            if len(self._head) < 6 and not self.done:
                return []
            self._decompressor = _decompressor_for(bytes(self._head))
            data, self._head = bytes(self._head), bytearray()
        if self._decompressor is not _PLAIN:
            try:
                data = self._decompressor.decompress(data)
            except Exception as exc:  # zlib.error, OSError (bz2), lzma.LZMAError, EOFError
                raise ProtocolError(f"bad compressed tar stream: {exc}") from None
        return self._feed_plain(data)

    def _feed_plain(self, data: bytes) -> list:
        if self.done:
            if data.strip(b"\0"):
                raise ProtocolError("data after the end of the tar archive")
            return []
        self._buf += data
        actions: list = []
        while True:
            if self._left:
                n = min(self._left, len(self._buf))
                if not n:
                    break
                chunk = bytes(self._buf[:n])
                del self._buf[:n]
                self._left -= n
                if self._special is not None:
                    self._special_data += chunk
                elif self._file is not None:
                    actions.append(FileData(self._file[0], self._file[1], chunk))
                if self._left:
                    break
                self._end_member(actions)
                continue
            if self._pad:
                n = min(self._pad, len(self._buf))
                del self._buf[:n]
                self._pad -= n
                if self._pad:
                    break
                continue
            if len(self._buf) < BLOCK:
                break
            header = bytes(self._buf[:BLOCK])
            del self._buf[:BLOCK]
            if header == b"\0" * BLOCK:
                self._zero_blocks += 1
                if self._zero_blocks == 2:
                    self.done = True
                    actions.append(ListingDone())
                    break
                continue
            self._zero_blocks = 0
            self._header(header, actions)
        return actions

    def end(self) -> list:
        """The stream ended; a tar cut short is an error."""
        actions = []
        if self._decompressor is None and self._head:  # a stream shorter than the sniffing window
            self._decompressor = _decompressor_for(bytes(self._head))
            head, self._head = bytes(self._head), bytearray()
            actions = self.feed(head)
        if not self.done:
            raise ProtocolError("the tar stream ended before the end-of-archive marker")
        return actions

    def _header(self, header: bytes, actions: list) -> None:
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            raise ProtocolError(f"bad tar header: {exc}") from None
        if info.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
            if info.size > MAX_SPECIAL_MEMBER:
                raise ProtocolError(f"tar header extension of {info.size} bytes, more than {MAX_SPECIAL_MEMBER}")
            self._special = (info.type, info.size)
            self._special_data = bytearray()
            self._left = info.size
            self._pad = -info.size % BLOCK
            if not self._left:
                self._end_member(actions)
            return
        name = self._pax.pop("path", None) or self._longname or info.name
        linkname = self._pax.pop("linkpath", None) or self._longlink or info.linkname
        mtime_ns = int(float(self._pax.pop("mtime", info.mtime)) * 1_000_000_000)
        size = int(self._pax.pop("size", info.size))
        self._pax.clear()
        self._longname = self._longlink = None
        path = name.rstrip("/") if name not in ("/", "") else name
        while path.startswith("./"):
            path = path[2:]
        check_path_syntax(path)
        self._check_limits(path, size if info.type in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE) else 0)
        mode = filemode.permission_bits(0) | (info.mode & 0o777)
        if info.mode & 0o4000:
            mode |= filemode.MODE_SETUID
        if info.mode & 0o2000:
            mode |= filemode.MODE_SETGID
        if info.mode & 0o1000:
            mode |= filemode.MODE_STICKY
        mode |= _TYPE_MODE.get(info.type, 0)
        stat = new_stat(path=path, mode=mode, uid=info.uid, gid=info.gid, modTime=mtime_ns)
        if info.type in (tarfile.SYMTYPE, tarfile.LNKTYPE):
            try:
                stat.linkname = linkname
            except UnicodeEncodeError:  # a target that is not UTF-8
                stat = new_stat(path=path, mode=mode, uid=info.uid, gid=info.gid, modTime=mtime_ns,
                                linkname=linkname)
            if info.type == tarfile.LNKTYPE:
                check_path_syntax(linkname)
        if info.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            stat.devmajor, stat.devminor = info.devmajor, info.devminor
        self._ensure_parents(path, actions)
        file_id = self._next_id
        self._next_id += 1
        is_data = info.type in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
        if is_data:
            stat.size = size
            self.requested.append(path)
        if filemode.is_dir(mode):
            self._dirs.add(path)
        actions.append(PutEntry(path, stat, Change.ADD, file_id if is_data else None))
        if is_data:
            self._file = (file_id, path)
            self._left = size
            self._pad = -size % BLOCK
            if not size:
                self._end_member(actions)

    def _check_limits(self, path: str, size: int) -> None:
        limits = self._limits
        depth = path.count("/") + 1
        if depth > limits.max_depth:
            raise LimitExceeded("max_depth", depth, limits.max_depth, path, "directory tree too deep")
        if path_bytes(path) > limits.max_path_length:
            raise LimitExceeded("max_path_length", path_bytes(path), limits.max_path_length, path, "path too long")
        if self._next_id + 1 > limits.max_entries:
            raise LimitExceeded("max_entries", self._next_id + 1, limits.max_entries, path, "too many entries")
        if limits.max_transfer_bytes is not None:
            self._bytes += max(size, 0)
            if self._bytes > limits.max_transfer_bytes:
                raise LimitExceeded("max_transfer_bytes", self._bytes, limits.max_transfer_bytes, path,
                                    "transfer too large")

    def _ensure_parents(self, path: str, actions: list) -> None:
        start = 0
        while True:  # each missing parent, outermost first
            slash = path.find("/", start)
            if slash < 0:
                return
            parent, start = path[:slash], slash + 1
            if parent not in self._dirs:
                self._dirs.add(parent)
                actions.append(PutEntry(parent, new_stat(path=parent, mode=filemode.MODE_DIR | 0o755),
                                        Change.ADD, None))

    def _end_member(self, actions: list) -> None:
        if self._special is not None:
            kind, _ = self._special
            data = self._special_data
            self._special = None
            if kind == tarfile.XHDTYPE:
                self._pax.update(_parse_pax(data))
            elif kind == tarfile.GNUTYPE_LONGNAME:
                self._longname = bytes(data).rstrip(b"\0").decode("utf-8", "surrogateescape")
            elif kind == tarfile.GNUTYPE_LONGLINK:
                self._longlink = bytes(data).rstrip(b"\0").decode("utf-8", "surrogateescape")
            return
        if self._file is not None:
            file_id, path = self._file
            self._file = None
            actions.append(FileDone(file_id, path))


_PLAIN = object()


def _decompressor_for(head: bytes):
    """An incremental decompressor for the stream's magic bytes, or _PLAIN."""
    import bz2
    import lzma
    import zlib

    if head.startswith(b"\x1f\x8b"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if head.startswith(b"BZh"):
        return bz2.BZ2Decompressor()
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMADecompressor()
    return _PLAIN


def _parse_pax(data: bytes) -> dict[str, str]:
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            raise ProtocolError("bad pax record") from None
        if length <= 0:
            raise ProtocolError("bad pax record")
        record = data[space + 1 : pos + length - 1]
        key, _, value = record.partition(b"=")
        records[bytes(key).decode("utf-8", "surrogateescape")] = bytes(value).decode("utf-8", "surrogateescape")
        pos += length
    return records
