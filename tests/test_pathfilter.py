"""The fsutil@0834f99 walker's per-entry decision (include/exclude patterns, follow paths).

Trees are simulated in memory: a walker visits entries in byte order, parents before
children, and does not descend where ``Decision.descend`` is False. Cases marked
"observed" were run against a private dockerd/docker CLI 20.10.24 (``docker build -o
type=local`` with ``FROM scratch`` / ``COPY . /``); the expected lists are what came out.
"""

from __future__ import annotations


import pytest

from reference.pathfilter import Decision, PathFilter, dedupe_paths
from reference.patterns import PatternError, parse_dockerignore


def expand(paths):
    """{path: is_dir} for the given entries and all their parent directories."""
    tree = {}
    for entry in paths:
        is_dir = entry.endswith("/")
        entry = entry.rstrip("/")
        parts = entry.split("/")
        for i in range(1, len(parts)):
            tree["/".join(parts[:i])] = True
        tree[entry] = tree.get(entry, False) or is_dir
    return tree


def walk(tree, path_filter):
    """Entries sent, directories with a trailing '/' (the walker's view of the tree)."""
    children = {}
    for path in tree:
        children.setdefault(path.rpartition("/")[0], []).append(path)
    sent = []

    def visit(parent):
        for path in sorted(children.get(parent, []), key=lambda p: p.encode("utf-8", "surrogateescape")):
            is_dir = tree[path]
            decision = path_filter.decide(path, is_dir)
            if decision.include:
                sent.append(path + "/" if is_dir else path)
            if is_dir and decision.descend:
                visit(path)

    visit("")
    return sent


def tree_listing(tree):
    return sorted(p + "/" if d else p for p, d in tree.items())


# ---------------------------------------------------------------------------
# .dockerignore through the walker, observed against dockerd 20.10.24.

BASE = [
    "a/b/c.txt", "a/keep.txt", "a/x.md", "a/sub/keep", "b.txt", "foo/bar", "x/foo/y",
    "x/y/foo/z", "keep", "src/foo.txt", "src/lib/deep/foo.txt", "README.md", ".dockerignore",
]
A_BELOW_EXCEPT_KEEP = ["a/b/", "a/b/c.txt", "a/sub/", "a/sub/keep", "a/x.md"]
ALL_OF_A = ["a/", "a/keep.txt"] + A_BELOW_EXCEPT_KEEP

OBSERVED = [
    # (dockerignore, extra files, what is excluded) -- everything else in BASE is sent
    ("a\n!a/keep.txt\n", [], A_BELOW_EXCEPT_KEEP),
    # "**/foo/y/" does not start with "x/y/foo/" etc.: no literal prefix, so the dirs go
    ("**/foo\n!**/foo/y\n", [], ["foo/", "foo/bar", "x/foo/", "x/foo/y", "x/y/foo/", "x/y/foo/z"]),
    ("*/foo\n", [], ["x/foo/", "x/foo/y"]),
    ("foo\n", [], ["foo/", "foo/bar"]),
    ("a\n!a/*.txt\n", [], A_BELOW_EXCEPT_KEEP),
    ("a\n!*/keep.txt\n", [], ALL_OF_A),  # a wildcard exception does not save "a"
    ("/a/\nsrc/lib/\n", [], ALL_OF_A + ["src/lib/", "src/lib/deep/", "src/lib/deep/foo.txt"]),
    ("**/*.txt\n", [], ["a/b/c.txt", "a/keep.txt", "b.txt", "src/foo.txt", "src/lib/deep/foo.txt"]),
    ("*.txt\n", [], ["b.txt"]),
    ("src/**/foo.txt\n", [], ["src/foo.txt", "src/lib/deep/foo.txt"]),
    ("foo|bar\n", ["foozle", "crowbar", "baz"], ["crowbar", "foo/", "foo/bar", "foozle"]),
    ("a\r\nb.txt\r\n", [], ALL_OF_A + ["b.txt"]),
    ("# a\n #b.txt\nkeep # not a comment\n\t\n", [], []),
    (".\n", [], []),
    ("\ufeffkeep\nb.txt\n", [], ["b.txt", "keep"]),
    (".dockerignore\nkeep\n", [], [".dockerignore", "keep"]),
    ("a\n!a\na/x.md\n", [], ["a/x.md"]),
    # the exception comes first, so "a" wins for its contents -- but "a/" itself is sent
    ("!a/keep.txt\na\n", [], A_BELOW_EXCEPT_KEEP + ["a/keep.txt"]),
    # an exception for a path that does not exist still sends the (now empty) directory
    ("x\n!x/nothing\n", [], ["x/foo/", "x/foo/y", "x/y/", "x/y/foo/", "x/y/foo/z"]),
    ("  a  \n! a/keep.txt\n", [], A_BELOW_EXCEPT_KEEP),
    ("src/../a\n", [], ALL_OF_A),
    ("src\n!src/lib/**\n", ["src/lib/x.md"], ["src/foo.txt"]),
    ("src/**/\n", ["src/lib/x.md"], ["src/foo.txt", "src/lib/", "src/lib/deep/", "src/lib/deep/foo.txt", "src/lib/x.md"]),
]


@pytest.mark.parametrize("dockerignore,extra,excluded", OBSERVED, ids=[c[0] for c in OBSERVED])
def test_observed_dockerignore(dockerignore, extra, excluded):
    tree = expand(BASE + extra)
    path_filter = PathFilter(None, parse_dockerignore(dockerignore.encode()), None)
    expected = sorted(set(tree_listing(tree)) - set(excluded))
    assert sorted(walk(tree, path_filter)) == expected


@pytest.mark.parametrize(
    "dockerignore,files,sent",
    [
        ("*\n!a/keep.txt\n", BASE, ["a/", "a/keep.txt"]),  # observed
        ("**\n!keep\n", BASE, ["keep"]),  # observed
        ("a*\\\n", ["a$", "ab$", "ab", "b$", ".dockerignore"], [".dockerignore", "ab", "b$"]),  # observed
        ("a{2}\n", ["aa", "a{2}", "a", ".dockerignore"], [".dockerignore", "a", "a{2}"]),  # observed
        ("a?\n", ["ab", "abc", "a/b", ".dockerignore"], [".dockerignore", "a/", "a/b", "abc"]),  # observed
        ("a[0-2]\n", ["a1", "a2", "a9", "ax", ".dockerignore"], [".dockerignore", "a9", "ax"]),  # observed
        ("a[!b]\n", ["a!", "ab", ".dockerignore"], [".dockerignore"]),  # observed
        ("a\\*\n", ["a*", "ab", ".dockerignore"], [".dockerignore", "ab"]),  # observed
    ],
)
def test_observed_small_trees(dockerignore, files, sent):
    path_filter = PathFilter(None, parse_dockerignore(dockerignore.encode()), None)
    assert sorted(walk(expand(files), path_filter)) == sent


@pytest.mark.parametrize("dockerignore", ["c++\n", "\\path\\to\n"])
def test_observed_regexp_errors_fail_on_first_entry(dockerignore):
    # observed: "error from sender: failed to match excludepatterns: ..."
    path_filter = PathFilter(None, parse_dockerignore(dockerignore.encode()), None)
    with pytest.raises(PatternError):
        path_filter.decide("anything", False)


@pytest.mark.parametrize("dockerignore", ["[\n", "foo\\\n", "!\n"])
def test_observed_syntax_errors_fail_before_walking(dockerignore):
    # observed: "error from sender: invalid excludepatterns: ..."
    with pytest.raises(PatternError):
        PathFilter(None, parse_dockerignore(dockerignore.encode()), None)


def test_regexp_error_not_reached_when_includes_drop_everything():
    path_filter = PathFilter(["wanted"], ["c++"], None)
    assert path_filter.decide("other", False) == Decision(False, False)
    with pytest.raises(PatternError):
        path_filter.decide("wanted", False)


# ---------------------------------------------------------------------------
# Exclusions and the directory-skip rule


def test_excluded_directory_without_exceptions_is_skipped():
    path_filter = PathFilter(None, ["build"], None)
    assert path_filter.decide("build", True) == Decision(False, False)
    assert path_filter.decide("build.txt", False) == Decision(True, False)
    assert path_filter.decide("src", True) == Decision(True, True)


def test_exception_below_directory_keeps_walking_it():
    path_filter = PathFilter(None, ["foo*", "!foo/bar2"], None)
    tree = expand(["bar", "foo/bar2", "foo/other", "foo2"])
    assert walk(tree, path_filter) == ["bar", "foo/", "foo/bar2"]


def test_exception_prefix_must_be_literal_and_slash_bounded():
    # "!ab/x/" does not start with "a/": the directory "a" is skipped entirely
    path_filter = PathFilter(None, ["a*", "!ab/x"], None)
    assert path_filter.decide("a", True) == Decision(False, False)
    assert path_filter.decide("ab", True) == Decision(True, True)


@pytest.mark.parametrize(
    "path,is_dir,expected",
    [
        ("node_modules", True, Decision(False, False)),
        ("web/node_modules", True, Decision(False, False)),
        ("debug.log", False, Decision(False, False)),
        ("important.log", False, Decision(True, False)),
        ("web", True, Decision(True, True)),
        ("web/app.js", False, Decision(True, False)),
    ],
)
def test_decisions(path, is_dir, expected):
    path_filter = PathFilter(None, ["**/node_modules", "*.log", "!important.log"], None)
    assert path_filter.decide(path, is_dir) == expected


# ---------------------------------------------------------------------------
# Include patterns (fsutil matchPrefix + lastIncludedDir)

INCLUDE_TREE = ["bar/", "bar/foo", "foo2"]
INCLUDE_FACTS = [
    (["bar"], ["bar/", "bar/foo"]),
    (["bar/foo"], ["bar/", "bar/foo"]),
    (["b*"], ["bar/", "bar/foo"]),
    (["bar/f*"], ["bar/", "bar/foo"]),
    (["bar/g*"], ["bar/"]),  # the directory on the way is sent even if nothing below matches
    (["f*"], ["foo2"]),
    (["b*/f*"], ["bar/", "bar/foo"]),
    (["b*/foo"], ["bar/", "bar/foo"]),
    (["b*/"], ["bar/", "bar/foo"]),  # cleaned to "b*"
    (["nothing"], []),
    (["."], []),  # "." never matches an entry name
    (["foo2", "bar"], ["bar/", "bar/foo", "foo2"]),
]


@pytest.mark.parametrize("includes,sent", INCLUDE_FACTS)
def test_include_patterns(includes, sent):
    assert walk(expand(INCLUDE_TREE), PathFilter(includes, None, None)) == sent


@pytest.mark.parametrize(
    "pattern,path,is_dir,expected",
    [
        ("foo", "foo", True, Decision(True, True)),
        ("foo/bar/baz", "foo", True, Decision(True, True)),  # partial
        ("foo/bar/baz", "foo/bar", True, Decision(True, True)),
        ("foo/bar/baz", "foo/bax", True, Decision(False, False)),
        ("foo/bar/baz", "foo/bar/baz", False, Decision(True, False)),
        ("f*", "foo", True, Decision(True, True)),
        ("foo/bar/*", "foo", True, Decision(True, True)),
        ("foo/*/baz", "foo", True, Decision(True, True)),
        ("*/*/baz", "foo", True, Decision(True, True)),
        ("*/bar/baz", "foo/bar", True, Decision(True, True)),
        ("*/bar/baz", "foo/bax", True, Decision(False, False)),
        ("*/*/baz", "foo/bar/baz", False, Decision(True, False)),
        # a *file* named like a partial prefix is sent as well
        ("foo/bar/baz", "foo", False, Decision(True, False)),
        ("s*/x", "sfile", False, Decision(True, False)),  # observed (see test_followlinks)
        # invalid include patterns never match (fsutil ignores Match errors)
        ("[", "[", False, Decision(False, False)),
    ],
)
def test_include_prefix_matching(pattern, path, is_dir, expected):
    path_filter = PathFilter([pattern], None, None)
    parent = path.rpartition("/")[0]
    if parent:
        # the walker has visited the parents first
        for depth in range(1, parent.count("/") + 2):
            path_filter.decide("/".join(path.split("/")[:depth]), True)
    assert path_filter.decide(path, is_dir) == expected


def test_fully_matched_directory_includes_its_subtree():
    tree = expand(["lib/a/b/c", "lib/x", "lib2/y", "other"])
    assert walk(tree, PathFilter(["lib"], None, None)) == ["lib/", "lib/a/", "lib/a/b/", "lib/a/b/c", "lib/x"]
    # a deeper pattern does not: only the matching branch is walked
    assert walk(tree, PathFilter(["lib/a/b"], None, None)) == ["lib/", "lib/a/", "lib/a/b/", "lib/a/b/c"]


def test_decide_does_not_depend_on_call_order():
    path_filter = PathFilter(["lib/a"], None, None)
    # ask about a deep entry before its parents have been seen
    assert path_filter.decide("lib/a/b/c", False) == Decision(True, False)
    assert path_filter.decide("lib/z/c", False) == Decision(False, False)


def test_includes_then_excludes():
    tree = expand(["dir/a", "dir/sub/b", "dir/sub/c", "other"])
    path_filter = PathFilter(["dir"], ["dir/sub/b"], None)
    assert walk(tree, path_filter) == ["dir/", "dir/a", "dir/sub/", "dir/sub/c"]  # observed


# ---------------------------------------------------------------------------
# Follow paths joined to include patterns


def test_follow_paths_add_to_include_patterns():
    path_filter = PathFilter(["a"], None, ["b", "c/d"])
    assert path_filter.include_patterns == ("a", "b", "c/d")


def test_follow_paths_alone_become_include_patterns():
    tree = expand(["dir/foo", "dir/l1", "l2", "bar", "baz"])
    path_filter = PathFilter(None, None, ["dir/foo", "dir/l1", "l2"])
    assert walk(tree, path_filter) == ["dir/", "dir/foo", "dir/l1", "l2"]  # observed


def test_follow_path_root_disables_include_filter():
    # "." in the combined list means "everything", even though include patterns were given
    assert PathFilter(["a"], None, ["."]).include_patterns is None
    assert PathFilter(["a"], None, None).include_patterns == ("a",)


def test_empty_lists_mean_no_filter():
    path_filter = PathFilter([], [], [])
    assert path_filter.include_patterns is None
    assert path_filter.decide("x", True) == Decision(True, True)


def test_include_patterns_are_cleaned_but_not_deduplicated_without_follow_paths():
    assert PathFilter(["./a/", "a/b", "a"], None, None).include_patterns == ("a", "a/b", "a")
    # with follow paths the combined (unsorted) list goes through dedupe_paths, which
    # only drops entries below the previously kept one
    assert PathFilter(["./a/", "a/b", "a"], None, ["z"]).include_patterns == ("a", "a", "z")


@pytest.mark.parametrize(
    "paths,expected",
    [
        (["a", "a/b", "b"], ["a", "b"]),
        (["a", "a-b", "a/c"], ["a", "a-b", "a/c"]),  # only compares with the last kept entry
        (["b", "a", "a/x"], ["b", "a"]),
        (["x", ".", "y"], None),
        (["/abs", "x"], ["x"]),  # starts from "" so a leading absolute path is dropped
        ([], []),
    ],
)
def test_dedupe_paths(paths, expected):
    assert dedupe_paths(paths) == expected


# ---------------------------------------------------------------------------


def build_large_tree():
    entries = []
    for i in range(50):
        entries.append((f"d{i}", True))
        for j in range(10):
            entries.append((f"d{i}/s{j}", True))
            entries.extend((f"d{i}/s{j}/file{k}.txt", False) for k in range(9))
    return entries


@pytest.mark.parametrize(
    "includes,excludes",
    [
        (None, None),
        (None, ["node_modules", "**/*.log", "*.tmp", "!important.log", "build", "**/cache/**", "d1*/s2"]),
        (["d1*", "d2/s*"], ["**/cache", "!d1/cache/keep"]),
    ],
)
def test_decide_over_5000_entries(includes, excludes):
    # (its speed is measured by the benchmarks, not asserted here)
    entries = build_large_tree()
    assert len(entries) == 5050
    path_filter = PathFilter(includes, excludes, None)
    decisions = [path_filter.decide(path, is_dir) for path, is_dir in entries]
    included = sum(1 for d in decisions if d.include)
    if includes is None and excludes is None:
        assert included == len(entries)
    else:
        assert 0 < included < len(entries)
