"""followpaths resolution (fsutil@0834f99 FollowLinks) and what it makes the CLI send.

Cases marked "observed" were run against a private dockerd/docker CLI 20.10.24: the
Dockerfile ``COPY <followpaths> /out/`` makes the daemon send them as ``followpaths``,
and the set of transferred entries was read back from the daemon's local-source
snapshot.
"""

from __future__ import annotations

import os
import stat

import pytest

from reference.followlinks import resolve_follow_paths
from reference.pathfilter import PathFilter
from reference.patterns import parse_dockerignore


def make_tree(root, dirs=(), files=(), links=None):
    for d in dirs:
        os.makedirs(os.path.join(root, d), exist_ok=True)
    for f in files:
        path = os.path.join(root, f)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            fh.write(f)
    for link, target in (links or {}).items():
        path = os.path.join(root, link)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.symlink(target, path)
    return str(root)


def walk_disk(root, path_filter):
    sent = []

    def visit(rel):
        directory = os.path.join(root, rel) if rel else root
        for name in sorted(os.listdir(directory), key=lambda n: n.encode("utf-8", "surrogateescape")):
            path = f"{rel}/{name}" if rel else name
            is_dir = stat.S_ISDIR(os.lstat(os.path.join(root, path)).st_mode)
            decision = path_filter.decide(path, is_dir)
            if decision.include:
                sent.append(path + "/" if is_dir else path)
            if is_dir and decision.descend:
                visit(path)

    visit("")
    return sent


# ---------------------------------------------------------------------------
# FollowLinks itself


def test_symlink_chain_records_links_and_target(tmp_path):
    root = make_tree(tmp_path, files=["dir/foo", "bar", "baz"], links={"dir/l1": "foo", "l2": "dir/l1"})
    assert resolve_follow_paths(root, ["l2", "bar"]) == ["bar", "dir/foo", "dir/l1", "l2"]


def test_symlink_loops_terminate(tmp_path):
    root = make_tree(tmp_path, links={"l1": "l1", "l3": "l2", "l2": "l3"})
    assert resolve_follow_paths(root, ["l1", "l3"]) == ["l1", "l2", "l3"]


def test_absolute_targets_are_rooted_in_the_context(tmp_path):
    root = make_tree(tmp_path, dirs=["dir", "foo"], files=["baz"], links={"dir/l1": "/foo/bar/baz", "foo/bar": "../"})
    assert resolve_follow_paths(root, ["dir/l1"]) == ["baz", "dir/l1", "foo/bar"]


def test_targets_cannot_escape_the_root(tmp_path):
    root = make_tree(
        tmp_path / "ctx", dirs=["dir", "foo"], files=["baz"], links={"dir/l1": "/foo/bar/baz", "foo/bar": "../../../"}
    )
    assert resolve_follow_paths(root, ["dir/l1"]) == ["baz", "dir/l1", "foo/bar"]


def test_missing_paths_are_kept_as_given(tmp_path):
    root = make_tree(tmp_path)
    assert resolve_follow_paths(root, ["foo/bar/baz", "bar/baz"]) == ["bar/baz", "foo/bar/baz"]
    assert resolve_follow_paths(root, ["f*/foo/t*"]) == ["f*/foo/t*"]


@pytest.mark.parametrize("paths", [["."], [""], ["./"], ["a", "."], ["/"]])
def test_root_means_no_filter(tmp_path, paths):
    assert resolve_follow_paths(make_tree(tmp_path), paths) is None


def test_results_are_normalised_and_deduplicated(tmp_path):
    root = make_tree(tmp_path)
    assert resolve_follow_paths(root, ["foo/bar/baz", "foo/bar"]) == ["foo/bar"]
    assert resolve_follow_paths(root, ["./x//y/", "/x/y"]) == ["x/y"]
    root = make_tree(tmp_path / "t", dirs=["dir", "foo"], files=["foo/bar"], links={"dir/l1": "/foo", "dir/l2": "/"})
    assert resolve_follow_paths(root, ["dir/l1", "foo/bar"]) == ["dir/l1", "foo"]
    assert resolve_follow_paths(root, ["dir/l2", "foo", "foo/bar"]) is None  # a link to "/"
    root = make_tree(tmp_path / "u", links={"foo": "."})
    assert resolve_follow_paths(root, ["foo"]) is None  # a link to "."


def test_wildcard_in_last_element(tmp_path):
    root = make_tree(
        tmp_path,
        dirs=["dir", "foo"],
        files=["foo/bar1", "foo/bar3", "baz"],
        links={"dir/l1": "/foo/bar1", "dir/l2": "/foo/bar2", "dir/anotherlink": "/foo/bar3", "foo/bar2": "../baz"},
    )
    assert resolve_follow_paths(root, ["dir/l*"]) == ["baz", "dir/l*", "foo/bar1", "foo/bar2"]
    assert resolve_follow_paths(root, ["dir"]) == ["dir"]
    assert resolve_follow_paths(root, ["dir", "dir/*link"]) == ["dir", "foo/bar3"]
    assert resolve_follow_paths(root, ["dir/?1"]) == ["dir/?1", "foo/bar1"]
    # an escaped wildcard is a literal name
    assert resolve_follow_paths(root, ["dir/l\\*"]) == ["dir/l\\*"]


def test_wildcard_without_symlink_matches_is_kept_literally(tmp_path):
    root = make_tree(tmp_path, files=["sfile", "sub/x"])
    assert resolve_follow_paths(root, ["s*/x"]) == ["s*/x"]


def test_wildcard_with_a_symlink_match_records_the_wildcard_prefix(tmp_path):
    root = make_tree(tmp_path, files=["dreal/f", "real/f"], links={"dlink": "real"})
    # the rest of the path ("/f") is only followed through the link
    assert resolve_follow_paths(root, ["d*/f"]) == ["d*", "real/f"]


def test_link_in_the_middle_of_a_path(tmp_path):
    root = make_tree(tmp_path, files=["real/sub/x"], links={"alias": "real"})
    assert resolve_follow_paths(root, ["alias/sub/x"]) == ["alias", "real/sub/x"]


def test_order_of_follow_paths_matters(tmp_path):
    # A link already recorded stops later paths through it (upstream's loop guard).
    root = make_tree(tmp_path, files=["d/sub/x", "d/other"], links={"l": "d"})
    assert resolve_follow_paths(root, ["l", "l/sub"]) == ["d", "l"]
    assert resolve_follow_paths(root, ["l/sub", "l"]) == ["d/sub", "l"]


def test_regular_file_used_as_directory_is_an_error(tmp_path):
    # observed: "error from sender: lstat <ctx>/a/b: not a directory"
    root = make_tree(tmp_path, files=["a", "b.txt"])
    with pytest.raises(NotADirectoryError):
        resolve_follow_paths(root, ["a/b"])
    with pytest.raises(NotADirectoryError):
        resolve_follow_paths(root, ["a/b*"])  # reading "a" as a directory fails too


def test_dotdot_is_not_looked_up_outside_the_root(tmp_path):
    # Deliberate difference: upstream would lstat <root>/../outside-link and also add
    # "inside". A "../" pattern can never match a walked entry, so we skip the lookup.
    os.symlink("inside", tmp_path / "outside-link")
    root = make_tree(tmp_path / "ctx", files=["inside"])
    assert resolve_follow_paths(root, ["../outside-link"]) == ["../outside-link"]


def test_results_sort_bytewise(tmp_path):
    high = os.fsdecode(b"\xff")
    root = make_tree(tmp_path)
    assert resolve_follow_paths(root, [high, "\U0001f600", "\u00e9"]) == ["\u00e9", "\U0001f600", high]


# ---------------------------------------------------------------------------
# What the CLI sends with follow paths (observed against dockerd 20.10.24)

OBSERVED_TRANSFERS = [
    # (dirs, files, links, followpaths, dockerignore, sent)
    ([], ["dir/foo", "bar", "baz"], {"dir/l1": "foo", "l2": "dir/l1"}, ["l2"], None,
     ["dir/", "dir/foo", "dir/l1", "l2"]),
    (["dir"], ["foo/bar1", "foo/bar3", "baz", "other"],
     {"dir/l1": "/foo/bar1", "dir/l2": "/foo/bar2", "foo/bar2": "../baz"}, ["dir/l*"], None,
     ["baz", "dir/", "dir/l1", "dir/l2", "foo/", "foo/bar1", "foo/bar2"]),
    (["dir", "foo"], ["baz", "other"], {"dir/l1": "/foo/bar/baz", "foo/bar": "../../../"}, ["dir/l1"], None,
     ["baz", "dir/", "dir/l1", "foo/", "foo/bar"]),
    # "sfile" is sent: it matches the first component of the pattern "s*/x"
    ([], ["sfile", "sub/x", "sub/y", "other"], {}, ["s*/x"], None, ["sfile", "sub/", "sub/x"]),
    # "dreal" matches the recorded "d*" as a whole, so all of it is sent
    ([], ["dreal/f", "dreal/g", "real/f", "real/h", "other"], {"dlink": "real"}, ["d*/f"], None,
     ["dlink", "dreal/", "dreal/f", "dreal/g", "real/", "real/f"]),
    ([], ["dir/a", "dir/sub/b", "other"], {}, ["dir"], None, ["dir/", "dir/a", "dir/sub/", "dir/sub/b"]),
    ([], ["dir/a", "dir/sub/b", "dir/sub/c", "other"], {}, ["dir"], "dir/sub/b\n",
     ["dir/", "dir/a", "dir/sub/", "dir/sub/c"]),
]


@pytest.mark.parametrize("dirs,files,links,follow,dockerignore,sent", OBSERVED_TRANSFERS)
def test_observed_transfers(tmp_path, dirs, files, links, follow, dockerignore, sent):
    root = make_tree(tmp_path, dirs=dirs, files=files, links=links)
    excludes = None
    if dockerignore is not None:
        with open(os.path.join(root, ".dockerignore"), "w") as fh:
            fh.write(dockerignore)
        excludes = parse_dockerignore(dockerignore.encode())
    path_filter = PathFilter(None, excludes, resolve_follow_paths(root, follow))
    assert walk_disk(root, path_filter) == sent
