"""Path ordering and the receiver's listing validator.

fsutil compares paths byte-wise with one twist: ``/`` sorts below every other
byte, so a directory's subtree comes straight after it and before siblings
such as ``a.b`` or ``a-b`` (``ComparePath`` in fsutil's validator).  Python
compares ``str`` by code point, which for valid UTF-8 is the same as byte
order, so replacing ``/`` with NUL gives the same order (NUL is rejected in
paths anyway).
"""

from __future__ import annotations

from .errors import ValidationError


def path_sort_key(path: str) -> str:
    """Key under which sorting gives fsutil's walk order."""
    return path.replace("/", "\0")


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

    def __init__(self) -> None:
        # stack of [directory path + "/", last child name seen]; "" is the root
        self._open_dirs: list[list[str]] = [["", ""]]
        self._link_targets: set[str] = set()
        self._previous = ""

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
        if top[1] >= base:  # ("" for a directory without children yet sorts before any name)
            raise ValidationError(f"changes out of order: {path!r} after {self._previous!r}")
        top[1] = base
        self._previous = path
        if is_dir:
            stack.append([path + "/", ""])
        elif not is_symlink:
            if linkname:
                if linkname not in self._link_targets:
                    raise ValidationError(f"invalid hardlink {path!r} to unknown path {linkname!r}")
            else:
                self._link_targets.add(path)
