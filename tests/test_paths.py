"""Path ordering (fsutil ComparePath) and the receiver's listing validator."""

import random

import pytest

from reference.errors import ValidationError
from reference.paths import ListingValidator, check_path_syntax, compare_path, path_sort_key

# fsutil's own example (TestCopySimple): a subtree sorts before a sibling with a longer name.
FSUTIL_ORDER = ["foo", "foo2", "zzz", "zzz/aa", "zzz/bb", "zzz/bb/cc", "zzz/bb/cc/dd", "zzz.aa"]


def test_golden_order_from_fsutil():
    shuffled = FSUTIL_ORDER[:]
    random.Random(1).shuffle(shuffled)
    assert sorted(shuffled, key=path_sort_key) == FSUTIL_ORDER


@pytest.mark.parametrize(
    "a,b",
    [
        ("a/child", "a b"),  # "/" sorts below " " (0x20)
        ("a/child", "a-b"),
        ("a/child", "a.b"),
        ("a", "a/child"),
        ("a b", "a-b"),
        ("a-b", "a.b"),
        ("z", "é"),  # UTF-8 byte order
        ("é", "日本"),
        ("a/b/c", "a/b!"),
    ],
)
def test_compare_path_pairs(a, b):
    assert compare_path(a, b) == -1
    assert compare_path(b, a) == 1
    assert compare_path(a, a) == 0


def test_order_matches_utf8_bytes_with_slash_lowest():
    names = ["a", "a/b", "a.b", "a-b", "a b", "ab", "a~", "é", "e", "日", "a/é", "a/z", "A"]
    expected = sorted(names, key=lambda p: p.encode().replace(b"/", b"\x00"))
    assert sorted(names, key=path_sort_key) == expected


# Accept / reject table for path syntax (our rules are stricter than fsutil 0834f99,
# which accepts a bare "." and "..").
@pytest.mark.parametrize(
    "path,accepted",
    [
        ("a", True),
        ("a/b", True),
        ("a b/c.d", True),
        ("日本/é", True),
        ("...", True),
        ("..a", True),
        ("", False),
        (".", False),
        ("..", False),
        ("../x", False),
        ("a/../b", False),
        ("a/..", False),
        ("./a", False),
        ("a/.", False),
        ("a/", False),
        ("a//b", False),
        ("/a", False),
        ("/", False),
        ("a\0b", False),
    ],
)
def test_path_syntax_table(path, accepted):
    if accepted:
        check_path_syntax(path)
    else:
        with pytest.raises(ValidationError):
            check_path_syntax(path)


def _feed(entries):
    """entries: (path, kind[, linkname]) with kind in file/dir/symlink."""
    v = ListingValidator()
    for entry in entries:
        path, kind, *rest = entry
        v.check(path, kind == "dir", kind == "symlink", rest[0] if rest else "")


def test_validator_accepts_fsutil_order():
    _feed([("foo", "file"), ("foo2", "file"), ("zzz", "dir"), ("zzz/aa", "file"), ("zzz/bb", "dir"),
           ("zzz/bb/cc", "dir"), ("zzz/bb/cc/dd", "file"), ("zzz.aa", "file")])


@pytest.mark.parametrize(
    "entries,message",
    [
        ([("b", "file"), ("a", "file")], "out of order"),
        ([("a", "file"), ("a", "file")], "out of order"),
        ([("a/b", "file")], "out of order"),  # missing parent
        ([("a", "file"), ("a/b", "file")], "out of order"),  # child under a file
        ([("a", "symlink"), ("a/b", "file")], "out of order"),  # child under a symlink
        ([("a", "dir"), ("a.b", "file"), ("a/x", "file")], "out of order"),  # back to a closed dir
        ([("a.b", "file"), ("a", "dir")], "out of order"),  # "/"-ordering: a before a.b
        ([("a", "dir"), ("a/c", "file"), ("a/b", "file")], "out of order"),
        ([("h", "file", "x")], "unknown path"),  # hardlink to an unknown path
        ([("a", "file", "b"), ("b", "file")], "unknown path"),  # hardlink to a later path
        ([("s", "symlink", "t"), ("t", "file", "s")], "unknown path"),  # hardlink to a symlink
        ([("a", "file"), ("b", "file", "a"), ("c", "file", "b")], "unknown path"),  # link to a link
        ([("d", "dir"), ("e", "file", "d")], "unknown path"),  # link to a directory
        ([("..", "dir")], "escapes"),
        ([(".", "dir")], "unclean"),
        ([("", "file")], "empty"),
    ],
)
def test_validator_rejects(entries, message):
    with pytest.raises(ValidationError, match=message):
        _feed(entries)


def test_validator_accepts_hardlink_to_earlier_file():
    _feed([("a", "file"), ("b", "dir"), ("b/c", "file", "a")])
