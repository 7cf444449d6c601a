"""Path ordering and the receiver's listing validator.

fsutil compares paths byte-wise with one twist: ``/`` sorts below every other
byte, so a directory's subtree comes straight after it and before siblings
such as ``a.b`` or ``a-b`` (``ComparePath`` in fsutil's validator).  Python
compares ``str`` by code point, which for valid UTF-8 is the same as byte
order, so replacing ``/`` with NUL gives the same order (NUL is rejected in
paths anyway).

Names are bytes to the Go peers.  Here they are ``str`` with the bytes that
are not UTF-8 escaped as lone surrogates (``os.fsdecode``), and those sort
by code point differently from their bytes; so a non-ASCII name's key is its
bytes read as Latin-1, whose code points are the bytes themselves.

The receiver's limits live here too: every one of them is checked on the
STAT, before anything of the entry is written.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ValidationError

#: Linux PATH_MAX counts the terminating NUL.
PATH_MAX = 4096


def byte_order_name(name: str) -> str:
    """``name`` as a str whose code point order is the byte order of its bytes."""
    if name.isascii():
        return name
    return name.encode("utf-8", "surrogateescape").decode("latin-1")


def path_sort_key(path: str) -> str:
    """Key under which sorting gives fsutil's walk order (byte order, ``/`` lowest)."""
    if not path.isascii():
        path = path.encode("utf-8", "surrogateescape").decode("latin-1")
    return path.replace("/", "\0")


def path_bytes(path: str) -> int:
    """Length of the path in bytes, as the peer and the kernel count it."""
    return len(path) if path.isascii() else len(path.encode("utf-8", "surrogateescape"))


@dataclass(frozen=True, slots=True)
class ReceiveLimits:
    """What one received listing may hold; exceeding any fails the transfer at that STAT.

    The defaults are what a dockerd on Linux can take at all: a path that fits
    PATH_MAX, so no deeper than a PATH_MAX path of one-byte names.  dockerd has
    no limit on entries or bytes (it runs until memory or disk is gone); ours
    bound the receiver's memory and the disk.  ``max_transfer_bytes`` counts the
    declared sizes of the requested files and the DATA that arrives (None: no
    limit; the daemon passes its free disk space).
    """

    max_path_length: int = PATH_MAX - 1
    max_depth: int = PATH_MAX // 2
    max_entries: int = 1_000_000
    max_transfer_bytes: int | None = None


DEFAULT_LIMITS = ReceiveLimits()


class LimitExceeded(ValidationError):
    """A listing or transfer goes beyond one of the receiver's :class:`ReceiveLimits`."""

    def __init__(self, limit: str, value: int, maximum: int, path: str, what: str):
        self.limit, self.value, self.maximum, self.path = limit, value, maximum, path
        super().__init__(f"{what}: {shorten_path(path)!r} is over the receiver's limit "
                         f"{limit}={maximum} ({value})")


def shorten_path(path: str, keep: int = 60) -> str:
    """A path fit for an error message: its ends, and how long it was."""
    if len(path) <= 2 * keep + 20:
        return path
    return f"{path[:keep]}...[{path_bytes(path)} bytes]...{path[-keep:]}"


def compare_path(a: str, b: str) -> int:
    """-1, 0 or 1, like fsutil's ComparePath."""
    ka, kb = path_sort_key(a), path_sort_key(b)
    return (ka > kb) - (ka < kb)


def check_path_syntax(path: str) -> None:
    """Reject every path that is not a clean, relative, slash-separated path.

    Stricter than fsutil 0834f99, which lets a bare ``.`` or ``..`` through and
    thereby lets a client rewrite the snapshot root or its parent.
    """
    if path == "":
        raise ValidationError("empty path")
    if "\0" in path:
        raise ValidationError(f"NUL byte in path {path!r}")
    if path.startswith("/"):
        raise ValidationError(f"absolute path {path!r}")
    parts = path.split("/")
    if ".." in parts:
        raise ValidationError(f"path escapes the root: {path!r}")
    if "" in parts or "." in parts:
        raise ValidationError(f"unclean path {path!r}")


_NOT_NAMES = frozenset(("", ".", ".."))


def parent_of(path: str) -> str:
    """Parent directory of a clean relative path; ``""`` for top-level entries."""
    slash = path.rfind("/")
    return "" if slash < 0 else path[:slash]


class ListingValidator:
    """Checks an incoming STAT stream entry by entry, as fsutil's receiver does.

    One rule covers ordering, duplicates, missing parents and children under
    a non-directory: the parent of every entry must be the most recently
    opened directory that is still open, and its name must sort strictly after
    the previous sibling's.  Hardlinks must name an earlier entry that is a
    regular file (or other non-directory, non-symlink) and not itself a link.
    """

    def __init__(self, limits: ReceiveLimits = DEFAULT_LIMITS) -> None:
        # stack of [directory path + "/", sort key of the last child seen]; "" is the root
        self._open_dirs: list[list[str]] = [["", ""]]
        self._link_targets: set[str] = set()
        self._previous = ""
        self._max_depth = limits.max_depth
        self._max_path = limits.max_path_length
        # a path of at most this many characters cannot be longer in bytes (4 per character at most)
        self._short_path = limits.max_path_length // 4

    def check(self, path: str, is_dir: bool, is_symlink: bool, linkname: str) -> None:
        # The full syntax check runs only when the cheap one fails: a path whose
        # parent is the open directory (validated before) and whose last
        # component is a proper name is clean.  Errors keep the syntax reason.
        slash = path.rfind("/")
        base = path[slash + 1 :]  # the whole path when there is no slash
        if (len(base) < 3 and base in _NOT_NAMES) or "\0" in base:
            check_path_syntax(path)  # raises
        prefix = path[: slash + 1]  # the parent directory with its slash; "" for the root
        stack = self._open_dirs
        top = stack[-1]
        if top[0] != prefix:  # leaving directories (or out of order, or absolute)
            while len(stack) > 1 and stack[-1][0] != prefix:
                if prefix.startswith(stack[-1][0]):
                    break
                stack.pop()
            top = stack[-1]
            if top[0] != prefix:
                check_path_syntax(path)  # an unclean parent is reported as such
                raise ValidationError(f"changes out of order: {path!r} after {self._previous!r}")
        key = base if base.isascii() else byte_order_name(base)
        if top[1] >= key:  # ("" for a directory without children yet sorts before any name)
            raise ValidationError(f"changes out of order: {path!r} after {self._previous!r}")
        if len(stack) > self._max_depth:
            raise LimitExceeded("max_depth", len(stack), self._max_depth, path, "directory tree too deep")
        if len(path) > self._short_path and path_bytes(path) > self._max_path:
            raise LimitExceeded("max_path_length", path_bytes(path), self._max_path, path, "path too long")
        top[1] = key
        self._previous = path
        if is_dir:
            stack.append([path + "/", ""])
        elif not is_symlink:
            if linkname:
                if linkname not in self._link_targets:
                    raise ValidationError(f"invalid hardlink {path!r} to unknown path {linkname!r}")
            else:
                self._link_targets.add(path)
