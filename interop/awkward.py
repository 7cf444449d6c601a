"""The awkward build context of the skew matrix, and which of its names a correct build exports.

One context for every client x daemon cell: byte-order siblings around '/', unicode names (NFC and NFD
spellings of one word side by side, CJK, a 4-byte character), hardlinks (a group of three, and a pair whose
first name the .dockerignore excludes), symlinks (relative, to a directory, dangling, absolute, absolute and
dangling, a chain, a unicode target), modes (setuid, setgid, sticky, executable, private, read-only, none) and
odd directory modes (0700, 0555 with contents, 1777, 2775, 0711), a foreign owner, an empty file, empty
directories, and a .dockerignore with `!` exceptions, root anchoring, an excluded directory with an exception
inside, `**` and a non-ASCII line. Every entry gets one fixed mtime, so a difference in exported times is the
peers' doing.

The expectation is our own table (EXCLUDED), written from the .dockerignore rules of the docker docs, not
computed by any matcher under test.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

CONTEXT_MTIME_NS = 1_600_000_000_123_456_789  # 2020-09-13, with a sub-microsecond part
DOCKERFILE = b"FROM scratch\nCOPY . /\n"
DOCKERIGNORE = (
    "# exceptions, anchoring at the root, an excluded directory with an exception inside, ** and non-ASCII\n"
    "*.log\n"
    "!keep.log\n"
    "hard/*.log\n"
    "build\n"
    "!build/keep.txt\n"
    "**/*.tmp\n"
    "日本/skip*\n"
).encode()
NON_ASCII_PATTERN = "日本/skip*"

FILE, DIR, SYMLINK, HARDLINK = "file", "dir", "symlink", "hardlink"
NFC_CAFE = "caf\u00e9"
NFD_CAFE = "cafe\u0301"

# (path, what, mode, payload): a file's bytes, a symlink's target, a hardlink's first name; directories None.
# Listed parents first; modes are applied after everything is written (0555 and 0000 included).
ENTRIES: tuple[tuple[str, str, int, object], ...] = (
    ("Dockerfile", FILE, 0o644, DOCKERFILE),
    (".dockerignore", FILE, 0o644, DOCKERIGNORE),
    # siblings whose order hinges on '/' (0x2f) against ' ' '-' '.' '0' and case
    ("A", FILE, 0o644, b"upper case sorts before lower case\n"),
    ("a", DIR, 0o755, None),
    ("a/b", FILE, 0o644, b"a/b\n"),
    ("a/b.c", FILE, 0o644, b"a/b.c\n"),
    ("a b", FILE, 0o644, b"a space\n"),
    ("a-b", FILE, 0o644, b"a-b\n"),
    ("a.b", FILE, 0o644, b"a.b\n"),
    ("a0", FILE, 0o644, b"a0\n"),
    ("a\u00e9", FILE, 0o644, b"a and e acute\n"),
    # unicode: one word in two normal forms (distinct bytes), CJK, a 4-byte character
    ("unicode", DIR, 0o755, None),
    (f"unicode/{NFC_CAFE}", FILE, 0o644, b"NFC\n"),
    (f"unicode/{NFD_CAFE}", FILE, 0o644, b"NFD\n"),
    ("unicode/日本語.txt", FILE, 0o644, "日本語\n".encode()),
    ("unicode/\U0001F433 whale", FILE, 0o644, b"four bytes in UTF-8\n"),
    # symlinks, never followed
    ("links", DIR, 0o755, None),
    ("links/relative", SYMLINK, 0, "../a.b"),
    ("links/to-dir", SYMLINK, 0, "../a"),
    ("links/dangling", SYMLINK, 0, "missing/nowhere"),
    ("links/absolute", SYMLINK, 0, "/etc/passwd"),
    ("links/absolute-dangling", SYMLINK, 0, "/nonexistent/target"),
    ("links/chain", SYMLINK, 0, "relative"),
    ("links/unicode", SYMLINK, 0, "../unicode/日本語.txt"),
    # hardlinks: three names of one inode; a pair whose first name (in walk order) is excluded
    ("hard", DIR, 0o755, None),
    ("hard/first", FILE, 0o640, b"one inode, three names\n"),
    ("hard/second", HARDLINK, 0, "hard/first"),
    ("hard/sub", DIR, 0o755, None),
    ("hard/sub/third", HARDLINK, 0, "hard/first"),
    ("hard/excluded.log", FILE, 0o644, b"linked; this name is excluded, hard/kept is not\n"),
    ("hard/kept", HARDLINK, 0, "hard/excluded.log"),
    # modes
    ("modes", DIR, 0o755, None),
    ("modes/setuid", FILE, 0o4755, b"#!/bin/sh\n"),
    ("modes/setgid", FILE, 0o2755, b"#!/bin/sh\n"),
    ("modes/sticky", FILE, 0o1644, b"sticky file\n"),
    ("modes/executable", FILE, 0o755, b"#!/bin/sh\necho hi\n"),
    ("modes/private", FILE, 0o600, b"private\n"),
    ("modes/read-only", FILE, 0o444, b"read only\n"),
    ("modes/no-permissions", FILE, 0o000, b"no permission bits\n"),
    ("modes/dir-0700", DIR, 0o700, None),
    ("modes/dir-0700/inside", FILE, 0o644, b"in 0700\n"),
    ("modes/dir-0555", DIR, 0o555, None),
    ("modes/dir-0555/inside", FILE, 0o644, b"in a read-only directory\n"),
    ("modes/dir-1777", DIR, 0o1777, None),
    ("modes/dir-2775", DIR, 0o2775, None),
    ("modes/dir-2775/inside", FILE, 0o664, b"in a setgid directory\n"),
    ("modes/dir-0711", DIR, 0o711, None),
    ("owned", FILE, 0o644, b"uid 1234, gid 5678 on the client\n"),
    ("empty-file", FILE, 0o644, b""),
    ("empty-dir", DIR, 0o755, None),
    ("deep", DIR, 0o755, None),
    ("deep/er", DIR, 0o755, None),
    ("deep/er/empty", DIR, 0o755, None),
    # what the .dockerignore is about
    ("keep.log", FILE, 0o644, b"re-included by !keep.log\n"),
    ("drop.log", FILE, 0o644, b"excluded by *.log\n"),
    ("logs", DIR, 0o755, None),
    ("logs/nested.log", FILE, 0o644, b"kept: *.log is anchored at the root\n"),
    ("build", DIR, 0o755, None),
    ("build/out.o", FILE, 0o644, b"excluded with build\n"),
    ("build/keep.txt", FILE, 0o644, b"re-included by !build/keep.txt\n"),
    ("x.tmp", FILE, 0o644, b"excluded by **/*.tmp\n"),
    ("sub", DIR, 0o755, None),
    ("sub/y.tmp", FILE, 0o644, b"excluded by **/*.tmp\n"),
    ("sub/z.txt", FILE, 0o644, b"kept\n"),
    ("日本", DIR, 0o755, None),
    ("日本/skip-me.txt", FILE, 0o644, "excluded by 日本/skip*\n".encode()),
    ("日本/keep.txt", FILE, 0o644, b"kept\n"),
)
OWNED = ("owned", 1234, 5678)

# What a build that honours the .dockerignore leaves out (our reading of the docker docs' rules).
EXCLUDED = frozenset({"drop.log", "hard/excluded.log", "build/out.o", "x.tmp", "sub/y.tmp", "日本/skip-me.txt"})


@dataclass(frozen=True)
class Expectation:
    all_names: frozenset[bytes]  # every entry of the context
    exported_names: frozenset[bytes]  # what `COPY . /` of a correct build exports

    @property
    def excluded_names(self) -> frozenset[bytes]:
        return self.all_names - self.exported_names


def expectation() -> Expectation:
    names = frozenset(path.encode() for path, *_ in ENTRIES)
    return Expectation(names, names - {path.encode() for path in EXCLUDED})


def write(root: str) -> Expectation:
    """Write the context into root (created; must be empty or absent)."""
    os.makedirs(root, exist_ok=True)
    if os.listdir(root):
        raise ValueError(f"{root} is not empty")
    for path, what, _, payload in ENTRIES:
        full = os.path.join(root, path)
        if what == DIR:
            os.mkdir(full, 0o755)
        elif what == FILE:
            with open(full, "wb") as fh:
                fh.write(payload)
        elif what == SYMLINK:
            os.symlink(payload, full)
        elif what == HARDLINK:
            os.link(os.path.join(root, payload), full)
    if os.geteuid() == 0:  # a foreign owner needs root; the comparison takes the owner from the context
        os.chown(os.path.join(root, OWNED[0]), OWNED[1], OWNED[2])
    # Deepest first: modes (a 0555 directory was written into before), then times (writing a child changes
    # its directory's mtime; chmod does not).
    for path, what, mode, _ in sorted(ENTRIES, key=lambda e: -e[0].count("/")):
        full = os.path.join(root, path)
        if what in (FILE, DIR):
            os.chmod(full, mode)
    for path, _, _, _ in sorted(ENTRIES, key=lambda e: -e[0].count("/")):
        os.utime(os.path.join(root, path), ns=(CONTEXT_MTIME_NS, CONTEXT_MTIME_NS), follow_symlinks=False)
    os.utime(root, ns=(CONTEXT_MTIME_NS, CONTEXT_MTIME_NS))
    return expectation()
