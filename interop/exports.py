"""Exported trees as bytes, compared exactly: names, types, modes, owners, sizes, contents, link targets,
hardlink grouping and (optionally) times.

Independent of the reference implementation on purpose (no reference.walker): this judges exports that the
reference client and daemon took part in.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, replace

KINDS = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFIFO: "fifo",
         stat.S_IFCHR: "char-device", stat.S_IFBLK: "block-device", stat.S_IFSOCK: "socket"}


@dataclass(frozen=True)
class Node:
    kind: str
    mode: int  # permission and set-id/sticky bits (st_mode & 0o7777)
    uid: int
    gid: int
    size: int  # 0 for directories (their st_size is the file system's business)
    mtime_ns: int
    digest: str = ""  # sha256 of a regular file's contents
    target: bytes = b""  # a symlink's target, raw
    links: tuple[bytes, ...] = ()  # a regular file's names in the tree sharing its inode (itself included), if several


Tree = dict[bytes, Node]


def show(name: bytes) -> str:
    """A name for messages: UTF-8 where it is, escapes where it is not."""
    return repr(name.decode("utf-8", "backslashreplace"))


def snapshot(root: str | bytes) -> Tree:
    """Every entry below root (not root itself), keyed by its relative path as bytes ('/'-separated)."""
    base = os.fsencode(root)
    tree: Tree = {}
    inodes: dict[tuple[int, int], list[bytes]] = {}

    def visit(directory: bytes, prefix: bytes) -> None:
        with os.scandir(directory) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                name = prefix + entry.name
                st = entry.stat(follow_symlinks=False)
                kind = KINDS.get(stat.S_IFMT(st.st_mode), "other")
                digest, target = "", b""
                if kind == "file":
                    with open(entry.path, "rb") as fh:
                        digest = hashlib.file_digest(fh, "sha256").hexdigest()
                    if st.st_nlink > 1:
                        inodes.setdefault((st.st_dev, st.st_ino), []).append(name)
                elif kind == "symlink":
                    target = os.readlink(entry.path)
                tree[name] = Node(kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                                  0 if kind == "dir" else st.st_size, st.st_mtime_ns, digest, target)
                if kind == "dir":
                    visit(entry.path, name + b"/")

    visit(base, b"")
    for names in inodes.values():
        if len(names) > 1:
            group = tuple(sorted(names))
            for name in names:
                tree[name] = replace(tree[name], links=group)
    return tree


def without_times(tree: Tree, *, kinds: tuple[str, ...] = ("dir",)) -> Tree:
    """The tree with the mtimes of entries of these kinds set to 0 (not compared)."""
    return {name: replace(node, mtime_ns=0) if node.kind in kinds else node for name, node in tree.items()}


def differences(expected: Tree, actual: Tree, limit: int = 40) -> list[str]:
    """Human-readable differences, at most `limit` (and a count of the rest); empty when equal."""
    lines = [f"missing: {show(n)}" for n in sorted(expected.keys() - actual.keys())]
    lines += [f"extra: {show(n)}" for n in sorted(actual.keys() - expected.keys())]
    for name in sorted(expected.keys() & actual.keys()):
        e, a = expected[name], actual[name]
        if e != a:
            fields = [f for f in Node.__dataclass_fields__ if getattr(e, f) != getattr(a, f)]
            lines.append(f"differs: {show(name)}: " + ", ".join(f"{f} {_field(f, getattr(e, f))} != "
                                                                f"{_field(f, getattr(a, f))}" for f in fields))
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
    return lines


def _field(name: str, value) -> str:
    if name == "mode":
        return oct(value)
    if name == "links":
        return "[" + ", ".join(show(n) for n in value) + "]"
    if name == "target":
        return show(value)
    return repr(value)
