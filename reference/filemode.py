"""Go ``os.FileMode`` bits, which ``Stat.mode`` carries, and Unix ``st_mode``.

Sending raw ``st_mode`` is the classic interop bug: ``0o040755`` has no Go
type bits, so a real daemon stores the directory as a regular file and then
rejects its children as out of order.
"""

from __future__ import annotations

import functools
import stat as _st

MODE_DIR = 0x80000000
MODE_APPEND = 0x40000000
MODE_EXCLUSIVE = 0x20000000
MODE_TEMPORARY = 0x10000000
MODE_SYMLINK = 0x08000000
MODE_DEVICE = 0x04000000
MODE_NAMED_PIPE = 0x02000000
MODE_SOCKET = 0x01000000
MODE_SETUID = 0x00800000
MODE_SETGID = 0x00400000
MODE_CHAR_DEVICE = 0x00200000
MODE_STICKY = 0x00100000
MODE_IRREGULAR = 0x00080000
MODE_TYPE = MODE_DIR | MODE_SYMLINK | MODE_NAMED_PIPE | MODE_SOCKET | MODE_DEVICE | MODE_CHAR_DEVICE | MODE_IRREGULAR
MODE_PERM = 0o777

_TYPE_TO_GO = {
    _st.S_IFREG: 0,
    _st.S_IFDIR: MODE_DIR,
    _st.S_IFLNK: MODE_SYMLINK,
    _st.S_IFIFO: MODE_NAMED_PIPE,
    _st.S_IFSOCK: MODE_SOCKET,
    _st.S_IFBLK: MODE_DEVICE,
    _st.S_IFCHR: MODE_DEVICE | MODE_CHAR_DEVICE,
}


def go_mode_from_st_mode(st_mode: int) -> int:
    """What Go's ``os.Lstat(...).Mode()`` reports for this Linux ``st_mode``."""
    mode = st_mode & 0o777
    try:
        mode |= _TYPE_TO_GO[_st.S_IFMT(st_mode)]
    except KeyError:
        mode |= MODE_IRREGULAR
    if st_mode & _st.S_ISUID:
        mode |= MODE_SETUID
    if st_mode & _st.S_ISGID:
        mode |= MODE_SETGID
    if st_mode & _st.S_ISVTX:
        mode |= MODE_STICKY
    return mode


@functools.cache  # a walk meets few distinct st_mode values (at most 2**16)
def sender_mode(st_mode: int) -> int:
    """``Stat.mode`` as fsutil's sender puts it on the wire: the socket bit is cleared."""
    return go_mode_from_st_mode(st_mode) & ~MODE_SOCKET


def st_mode_from_go_mode(mode: int) -> int:
    """Linux ``st_mode`` (type and permission bits) for a Go ``os.FileMode``."""
    if mode & MODE_DIR:
        kind = _st.S_IFDIR
    elif mode & MODE_SYMLINK:
        kind = _st.S_IFLNK
    elif mode & MODE_NAMED_PIPE:
        kind = _st.S_IFIFO
    elif mode & MODE_SOCKET:
        kind = _st.S_IFSOCK
    elif mode & MODE_DEVICE:
        kind = _st.S_IFCHR if mode & MODE_CHAR_DEVICE else _st.S_IFBLK
    else:
        kind = _st.S_IFREG
    return kind | permission_bits(mode)


def permission_bits(mode: int) -> int:
    """The ``chmod`` argument for a Go mode: permissions plus setuid, setgid, sticky."""
    bits = mode & 0o777
    if mode & MODE_SETUID:
        bits |= _st.S_ISUID
    if mode & MODE_SETGID:
        bits |= _st.S_ISGID
    if mode & MODE_STICKY:
        bits |= _st.S_ISVTX
    return bits


def is_dir(mode: int) -> bool:
    return bool(mode & MODE_DIR)


def is_symlink(mode: int) -> bool:
    return bool(mode & MODE_SYMLINK)


def is_regular(mode: int) -> bool:
    """fsutil's fileCanRequestData: only entries without any type bit carry data."""
    return mode & MODE_TYPE == 0


def is_device(mode: int) -> bool:
    return bool(mode & MODE_DEVICE)


def is_fifo(mode: int) -> bool:
    return bool(mode & MODE_NAMED_PIPE)


def dev_numbers(rdev: int) -> tuple[int, int]:
    """(major, minor) in the old Linux encoding that fsutil uses."""
    return (rdev >> 8) & 0xFFF, (rdev & 0xFF) | ((rdev >> 12) & 0xFFF00)


def rdev_from_numbers(major: int, minor: int) -> int:
    """Inverse of :func:`dev_numbers` (fsutil's mkdev)."""
    return ((major & 0xFFF) << 8) | (minor & 0xFF) | ((minor & 0xFFF00) << 12)
