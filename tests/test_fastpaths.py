"""The fast paths of the in-memory pair agree with the plain definitions.

The walker fills Stats from stat results listed relative to directory
descriptors, can build them inside their STAT packets, and lists the
receiver's tree as compact diff-base tuples; the receiver compares tuples and
validates most paths with a cheap check.  Each is checked here against a
straightforward statement of what it must produce.
"""

from __future__ import annotations

import os
import socket
import stat as _st

import pytest

from reference import diffcopy as dc
from reference import filemode
from reference.errors import ValidationError
from reference.pathfilter import PathFilter
from reference.paths import ListingValidator, path_sort_key
from reference.pb.fsutil_types_pb2 import Packet, Stat
from reference.walker import list_diff_base, walk

MTIME = 1_650_000_000_123_456_789


def _xattrs_supported(path: str) -> bool:
    try:
        os.setxattr(path, "user.probe", b"1")
        os.removexattr(path, "user.probe")
        return True
    except OSError:
        return False


@pytest.fixture
def tree(tmp_path):
    """Every kind of entry the walker meets, with fixed mtimes."""
    root = tmp_path / "tree"
    root.mkdir()
    (root / "d").mkdir()
    (root / "d" / "e").mkdir()
    (root / "a.b").write_bytes(b"dot")
    (root / "a-b").write_bytes(b"dash")
    (root / "d" / "f").write_bytes(b"x" * 100)
    (root / "d" / "e" / "g").write_bytes(b"")
    os.chmod(root / "d" / "f", 0o4755)
    os.chmod(root / "d" / "e", 0o2750)
    os.link(root / "d" / "f", root / "d" / "hard")  # a later name of d/f
    os.link(root / "d" / "f", root / "z-hard")
    os.symlink("../a.b", root / "d" / "link")
    os.mkfifo(root / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock"))
    sock.close()
    (root / "日本").write_text("utf-8 name")
    if _xattrs_supported(str(root / "a.b")):
        os.setxattr(root / "a.b", "user.one", b"1")
        os.setxattr(root / "d", "user.dir", b"")
    try:
        os.mknod(root / "dev", 0o600 | _st.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pass
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), ns=(MTIME, MTIME), follow_symlinks=False)
    return str(root)


def expected_stats(root: str, *, owner=None, with_xattrs=True) -> list[Stat]:
    """What fsutil's walk sends, stated plainly: lstat every path, fsutil order."""
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            paths.append(os.path.relpath(os.path.join(dirpath, name), root))
    paths.sort(key=path_sort_key)
    first_name: dict[tuple[int, int], str] = {}
    out = []
    for rel in paths:
        full = os.path.join(root, rel)
        st = os.lstat(full)
        stat = Stat(path=rel, mode=filemode.go_mode_from_st_mode(st.st_mode) & ~filemode.MODE_SOCKET,
                    modTime=st.st_mtime_ns)
        stat.uid, stat.gid = owner if owner is not None else (st.st_uid, st.st_gid)
        if not _st.S_ISDIR(st.st_mode):
            stat.size = st.st_size
        if _st.S_ISLNK(st.st_mode):
            stat.linkname = os.readlink(full)
        if _st.S_ISCHR(st.st_mode) or _st.S_ISBLK(st.st_mode):
            stat.devmajor, stat.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        if with_xattrs:
            for name in os.listxattr(full, follow_symlinks=False):
                stat.xattrs[name] = os.getxattr(full, name, follow_symlinks=False)
        if st.st_nlink > 1 and not _st.S_ISDIR(st.st_mode) and not _st.S_ISLNK(st.st_mode):
            first = first_name.setdefault((st.st_dev, st.st_ino), rel)
            if first != rel:
                stat.linkname = first
        out.append(stat)
    return out


def wire(messages) -> list[bytes]:
    return [m.SerializeToString(deterministic=True) for m in messages]


@pytest.mark.parametrize("owner", [None, (0, 0), (1000, 1001)])
@pytest.mark.parametrize("with_xattrs", [True, False])
def test_walk_is_field_for_field_the_plain_lstat_walk(tree, owner, with_xattrs):
    expected = expected_stats(tree, owner=owner, with_xattrs=with_xattrs)
    assert [s.path for s in expected][:4] == ["a-b", "a.b", "d", "d/e"]
    assert wire(walk(tree, owner=owner, with_xattrs=with_xattrs)) == wire(expected)


def test_walk_as_packets_carries_the_same_stats_with_their_path_and_mode(tree):
    expected = expected_stats(tree)
    listed = list(walk(tree, as_packets=True))
    assert all(type(packet) is Packet and packet.type == Packet.PACKET_STAT for packet, _, _ in listed)
    assert wire(packet.stat for packet, _, _ in listed) == wire(expected)
    assert [(path, mode) for _, path, mode in listed] == [(s.path, s.mode) for s in expected]


@pytest.mark.parametrize("include,exclude", [
    (None, ["d"]),
    (["d/e/g"], None),  # d and d/e are listed lazily, before d/e/g
    (None, ["d", "!d/e/g"]),
    (["d/*"], ["d/f"]),
])
def test_filtered_walk_as_packets_matches_the_stat_walk(tree, include, exclude):
    stats = list(walk(tree, entry_filter=PathFilter(include, exclude)))
    listed = list(walk(tree, entry_filter=PathFilter(include, exclude), as_packets=True))
    assert wire(packet.stat for packet, _, _ in listed) == wire(stats)
    assert [path for _, path, _ in listed] == [s.path for s in stats]


def test_pending_parents_come_right_before_the_first_included_entry(tree):
    paths = [s.path for s in walk(tree, entry_filter=PathFilter(["d/e/g"], None))]
    assert paths == ["d", "d/e", "d/e/g"]


def test_diff_base_is_the_previous_entry_of_every_stat(tree):
    assert list_diff_base(tree) == [dc.previous_entry(s) for s in expected_stats(tree, with_xattrs=False)]


def test_previous_entry_ignores_a_directory_size_and_the_xattrs():
    plain = dc.previous_entry(Stat(path="d", mode=filemode.MODE_DIR | 0o755, modTime=5))
    assert dc.previous_entry(Stat(path="d", mode=filemode.MODE_DIR | 0o755, modTime=5, size=4096)) == plain
    assert dc.previous_entry(Stat(path="f", mode=0o644, size=3, xattrs={"user.a": b"1"})) == \
        dc.previous_entry(Stat(path="f", mode=0o644, size=3))


def _actions(previous, incoming: list[Stat]) -> list:
    receiver = dc.DiffCopyReceiver(previous)
    out = []
    for stat in incoming + [None]:
        packet = Packet() if stat is None else dc.stat_packet(stat)
        for action in receiver.receive(Packet.FromString(packet.SerializeToString())):
            name = type(action).__name__
            out.append((name, getattr(action, "path", None), getattr(getattr(action, "change", None), "value", None)))
    return out


def test_receiver_diffs_the_same_against_stats_or_tuples(tree):
    old = expected_stats(tree, with_xattrs=False)
    new = {}
    for stat in old:
        new[stat.path] = fresh = Stat()
        fresh.CopyFrom(stat)
    new["d"].modTime += 1  # a directory whose mtime moved
    new["d/e/g"].size += 1  # a file that changed
    del new["fifo"]  # one gone
    new["e"] = Stat(path="e", mode=0o600, size=1)  # one added
    incoming = sorted(new.values(), key=lambda s: path_sort_key(s.path))
    by_stats = _actions(old, incoming)
    assert by_stats == _actions([dc.previous_entry(s) for s in old], incoming)
    assert [a for a in by_stats if a[0] != "SendPacket"] == [
        ("PutEntry", "d", "modify"), ("PutEntry", "d/e/g", "modify"), ("PutEntry", "e", "add"),
        ("DeleteEntry", "fifo", None), ("ListingDone", None, None)]
    assert _actions(old, old) == [("ListingDone", None, None), ("SendPacket", None, None)]  # nothing to do, FIN


def test_sender_listed_matches_stat():
    by_stat, by_listed = dc.DiffCopySender(), dc.DiffCopySender()
    entries = [Stat(path="d", mode=filemode.MODE_DIR | 0o755), Stat(path="d/f", mode=0o644, size=1),
               Stat(path="d/l", mode=filemode.MODE_SYMLINK | 0o777, linkname="f")]
    for stat in entries:
        packet = Packet()
        packet.stat.CopyFrom(stat)
        assert by_listed.listed(packet, stat.path, stat.mode) is packet
        assert by_stat.stat(stat).SerializeToString() == packet.SerializeToString()
    for sender in (by_stat, by_listed):
        assert sender.receive(dc.req_packet(1)) == dc.FileRequested(1, "d/f")
        with pytest.raises(dc.ProtocolError, match="not a regular file"):
            sender.receive(dc.req_packet(2))


# The validator skips the full syntax check when the parent is the open
# directory and the last component is a name; every other path must still be
# rejected for its syntax, not reported as out of order.
@pytest.mark.parametrize("path,message", [
    ("d//x", "unclean"),
    ("d/./x", "unclean"),
    ("d/.", "unclean"),
    ("d/", "unclean"),
    ("d/..", "escapes"),
    ("d/../x", "escapes"),
    ("/d/x", "absolute"),
    ("/x", "absolute"),
    ("d/x\0", "NUL"),
    ("x\0", "NUL"),
    ("e/x", "out of order"),
])
def test_validator_names_the_syntax_error_on_the_fast_path(path, message):
    validator = ListingValidator()
    validator.check("d", True, False, "")
    with pytest.raises(ValidationError, match=message):
        validator.check(path, False, False, "")


def test_a_name_that_is_not_utf8_is_listed_alike_by_both_walks(tmp_path):
    """Names are bytes, as the Go peers treat them (tests/test_names_bytes.py): the sender's walk and the
    receiver's listing see the same non-UTF-8 name."""
    from reference.walker import list_diff_base, walk

    (tmp_path / "ok").mkdir()
    open(os.path.join(os.fsencode(tmp_path / "ok"), b"bad\xff"), "w").close()
    name = os.fsdecode(b"ok/bad\xff")  # the surrogateescape form every layer passes on unchanged
    assert name in [stat.path for stat in walk(str(tmp_path))]
    assert name in [entry[1][0] for entry in list_diff_base(str(tmp_path))]
