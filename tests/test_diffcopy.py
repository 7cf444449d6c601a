"""The sans-IO DiffCopy pair: exact trees, minimal REQs, clear protocol errors."""

from __future__ import annotations

import os
import shutil
import stat as _st

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, precondition

from conformance.trees import diff_snapshots, snapshot
from reference import diffcopy as dc
from reference.applier import TreeApplier
from reference.diffcopy import DiffCopyReceiver, DiffCopySender
from reference.errors import PeerError, ProtocolError, ValidationError
from reference.inmemory import sync_directories
from reference.pb.fsutil_types_pb2 import Packet, Stat
from reference.walker import walk

NAMES = ["a", "a.b", "a-b", "a b", "b", "é", "日本", "z~", "A"]
IS_ROOT = os.geteuid() == 0


# -- tree generation ----------------------------------------------------------

@st.composite
def trees(draw, max_entries=14):
    """A list of (path, kind, payload) in creation order; parents come first."""
    entries: list[tuple[str, str, object]] = []
    dirs = [""]
    files: list[str] = []
    taken: set[str] = set()
    for _ in range(draw(st.integers(0, max_entries))):
        parent = draw(st.sampled_from(dirs))
        name = draw(st.sampled_from(NAMES))
        path = f"{parent}/{name}" if parent else name
        if path in taken:
            continue
        taken.add(path)
        kind = draw(st.sampled_from(["file", "file", "dir", "symlink", "hardlink", "fifo", "emptyfile"]))
        if kind == "hardlink" and not files:
            kind = "file"
        if kind == "file":
            payload = draw(st.binary(max_size=70_000 if draw(st.booleans()) else 40))
            files.append(path)
        elif kind == "emptyfile":
            payload = b""
            files.append(path)
        elif kind == "dir":
            dirs.append(path)
            payload = None
        elif kind == "symlink":
            payload = draw(st.sampled_from(["a", "../x", "/etc/passwd", "日本/é", "b/../../c", "."]))
        elif kind == "hardlink":
            payload = draw(st.sampled_from(files))
        else:
            payload = None
        entries.append((path, kind, payload))
    mode = draw(st.sampled_from([0o644, 0o600, 0o755, 0o4755, 0o2700]))
    mtime = draw(st.integers(0, 2_000_000_000)) * 1_000_000_000 + draw(st.integers(0, 999_999_999))
    return entries, mode, mtime


def build(root: str, spec) -> None:
    entries, mode, mtime = spec
    os.makedirs(root, exist_ok=True)
    for path, kind, payload in entries:
        full = os.path.join(root, path)
        if kind in ("file", "emptyfile"):
            with open(full, "wb") as fh:
                fh.write(payload)
            os.chmod(full, mode)
        elif kind == "dir":
            os.mkdir(full)
        elif kind == "symlink":
            os.symlink(payload, full)
        elif kind == "hardlink":
            os.link(os.path.join(root, payload), full)
        elif kind == "fifo":
            os.mkfifo(full)
        os.utime(full, ns=(mtime, mtime), follow_symlinks=False)
    # directories last, deepest first, so children do not move their mtimes
    for path, kind, _ in reversed(entries):
        if kind == "dir":
            os.utime(os.path.join(root, path), ns=(mtime, mtime))


def assert_same_tree(src, dst):
    problems = diff_snapshots(snapshot(src), snapshot(dst))
    assert not problems, "\n".join(problems)


# -- whole-tree properties ------------------------------------------------------

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=trees())
def test_cold_sync_reproduces_tree_exactly(tmp_path_factory, spec):
    base = tmp_path_factory.mktemp("pair")
    src, dst = str(base / "src"), str(base / "dst")
    build(src, spec)
    result = sync_directories(src, dst)
    assert_same_tree(src, dst)
    expected = sorted(s.path for s in walk(src) if dc.needs_data(s))
    assert sorted(result.requested) == expected
    # nothing stray beside the destination (staging is removed)
    assert sorted(os.listdir(base)) == ["dst", "src"]
    # an unchanged re-sync requests nothing
    assert sync_directories(src, dst).requested == []
    assert_same_tree(src, dst)


def test_hardlinks_are_linked_never_requested(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "a").write_bytes(b"x" * 100)
    os.link(src / "a", src / "b")
    os.link(src / "a", src / "c")
    stats = {s.path: s for s in walk(str(src))}
    assert stats["b"].linkname == "a" and stats["b"].size == 100  # real size, as dockerd needs
    result = sync_directories(str(src), str(dst))
    assert result.requested == ["a"]
    assert os.stat(dst / "a").st_ino == os.stat(dst / "c").st_ino
    assert sync_directories(str(src), str(dst)).requested == []


def test_rename_and_dir_file_switch(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_text("1")
    (src / "x").write_text("2")
    sync_directories(str(src), str(dst))
    shutil.rmtree(src / "d")
    (src / "d").write_text("now a file")
    os.unlink(src / "x")
    (src / "x").mkdir()
    (src / "x" / "y").write_text("3")
    result = sync_directories(str(src), str(dst))
    assert sorted(result.requested) == ["d", "x/y"]
    assert_same_tree(str(src), str(dst))


# -- stateful: random mutations, re-sync after each -----------------------------

class MutatingTree(RuleBasedStateMachine):
    """Mutates a source tree; after every step a sync must reproduce it and
    request exactly the new or changed regular files."""

    @initialize()
    def setup(self):
        import tempfile

        self.base = tempfile.mkdtemp(prefix="dcsm-")
        self.src = os.path.join(self.base, "src")
        self.dst = os.path.join(self.base, "dst")
        os.mkdir(self.src)
        self.clock = 1_600_000_000 * 10**9
        self.changed: set[str] = set()
        sync_directories(self.src, self.dst)

    def teardown(self):
        shutil.rmtree(getattr(self, "base", "/nonexistent"), ignore_errors=True)

    def _tick(self, path):
        self.clock += 1_000_003
        os.utime(path, ns=(self.clock, self.clock), follow_symlinks=False)

    def _all(self, kind=None):
        out = []
        for dirpath, dirnames, filenames in os.walk(self.src):
            for n in dirnames + filenames:
                p = os.path.join(dirpath, n)
                rel = os.path.relpath(p, self.src)
                st_ = os.lstat(p)
                k = "dir" if _st.S_ISDIR(st_.st_mode) else "link" if _st.S_ISLNK(st_.st_mode) else \
                    "file" if _st.S_ISREG(st_.st_mode) else "other"
                if kind is None or k == kind:
                    out.append(rel)
        return sorted(out)

    def _dirs(self):
        return [""] + self._all("dir")

    @rule(data=st.data(), name=st.sampled_from(NAMES), content=st.binary(max_size=3000))
    def add_file(self, data, name, content):
        parent = data.draw(st.sampled_from(self._dirs()))
        p = os.path.join(self.src, parent, name)
        if os.path.lexists(p):
            return
        with open(p, "wb") as fh:
            fh.write(content)
        self._tick(p)

    @rule(data=st.data(), name=st.sampled_from(NAMES))
    def add_dir(self, data, name):
        parent = data.draw(st.sampled_from(self._dirs()))
        p = os.path.join(self.src, parent, name)
        if not os.path.lexists(p):
            os.mkdir(p)
            self._tick(p)

    @rule(data=st.data(), name=st.sampled_from(NAMES), link_to=st.sampled_from(["a", "/abs", "../up", "b/c"]))
    def add_symlink(self, data, name, link_to):
        parent = data.draw(st.sampled_from(self._dirs()))
        p = os.path.join(self.src, parent, name)
        if not os.path.lexists(p):
            os.symlink(link_to, p)
            self._tick(p)

    @precondition(lambda self: self._all("file"))
    @rule(data=st.data(), same_size=st.booleans())
    def edit_file(self, data, same_size):
        rel = data.draw(st.sampled_from(self._all("file")))
        p = os.path.join(self.src, rel)
        size = os.path.getsize(p)
        with open(p, "wb") as fh:
            fh.write(b"E" * (size if same_size else size + 7))
        self._tick(p)

    @precondition(lambda self: self._all("file"))
    @rule(data=st.data())
    def touch(self, data):
        self._tick(os.path.join(self.src, data.draw(st.sampled_from(self._all("file")))))

    @precondition(lambda self: self._all())
    @rule(data=st.data(), mode=st.sampled_from([0o600, 0o755, 0o700, 0o4755]))
    def chmod(self, data, mode):
        rel = data.draw(st.sampled_from([p for p in self._all() if not os.path.islink(os.path.join(self.src, p))] or [""]))
        if rel:
            os.chmod(os.path.join(self.src, rel), mode | (0o700 if os.path.isdir(os.path.join(self.src, rel)) else 0))

    @precondition(lambda self: self._all())
    @rule(data=st.data())
    def delete(self, data):
        p = os.path.join(self.src, data.draw(st.sampled_from(self._all())))
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            os.unlink(p)

    @precondition(lambda self: self._all())
    @rule(data=st.data(), name=st.sampled_from(NAMES))
    def rename(self, data, name):
        rel = data.draw(st.sampled_from(self._all()))
        parent = data.draw(st.sampled_from(self._dirs()))
        dst = os.path.join(self.src, parent, name)
        src = os.path.join(self.src, rel)
        if os.path.lexists(dst) or (dst + "/").startswith(src + "/"):
            return
        os.rename(src, dst)

    @precondition(lambda self: self._all("file") or self._all("dir"))
    @rule(data=st.data())
    def switch_kind(self, data):
        rel = data.draw(st.sampled_from(self._all("file") + self._all("dir")))
        p = os.path.join(self.src, rel)
        if os.path.isdir(p):
            shutil.rmtree(p)
            with open(p, "wb") as fh:
                fh.write(b"was a dir")
        else:
            os.unlink(p)
            os.mkdir(p)
            with open(os.path.join(p, "child"), "wb") as fh:
                fh.write(b"c")
        self._tick(p)

    @precondition(lambda self: self._all("file"))
    @rule(data=st.data(), name=st.sampled_from(NAMES))
    def hardlink(self, data, name):
        target = os.path.join(self.src, data.draw(st.sampled_from(self._all("file"))))
        p = os.path.join(self.src, data.draw(st.sampled_from(self._dirs())), name)
        if not os.path.lexists(p):
            os.link(target, p)

    @invariant()
    def synced_exactly(self):
        if not hasattr(self, "src"):
            return
        before = {s.path: s for s in walk(self.dst)}
        after = {s.path: s for s in walk(self.src)}
        expected = sorted(
            p for p, s in after.items()
            if dc.needs_data(s) and (p not in before or not dc.same_file(before[p], s))
        )
        result = sync_directories(self.src, self.dst)
        assert sorted(result.requested) == expected
        assert_same_tree(self.src, self.dst)
        assert sorted(os.listdir(self.base)) == ["dst", "src"]


TestMutatingTree = MutatingTree.TestCase
TestMutatingTree.settings = settings(max_examples=25, stateful_step_count=12, deadline=None)


# -- malformed streams into the receiver ------------------------------------------

def _stat(path, mode=0o644, size=0, linkname="", mtime=0):
    return Stat(path=path, mode=mode, size=size, linkname=linkname, modTime=mtime)


DIR = 0x80000000 | 0o755


def _run_receiver(packets, previous=()):
    r = DiffCopyReceiver(previous)
    out = []
    for p in packets:
        out.extend(r.receive(Packet.FromString(p.SerializeToString())))
    return r, out


@pytest.mark.parametrize(
    "packets,error,match",
    [
        ([dc.stat_packet(_stat("b")), dc.stat_packet(_stat("a"))], ValidationError, "out of order"),
        ([dc.stat_packet(_stat("..", DIR))], ValidationError, "escapes"),
        ([dc.stat_packet(_stat(".", DIR))], ValidationError, "unclean"),
        ([dc.stat_packet(_stat("/etc"))], ValidationError, "absolute"),
        ([dc.stat_packet(_stat("a\0b"))], ValidationError, "NUL"),
        ([Packet(type=dc.PACKET_STAT, stat=Stat())], ValidationError, "empty path"),
        ([dc.stat_packet(_stat("a")), dc.end_of_listing(), dc.stat_packet(_stat("b"))], ProtocolError, "after the end"),
        ([dc.stat_packet(_stat("a", size=1)), dc.data_packet(7, b"x")], ProtocolError, "not requested"),
        ([dc.stat_packet(_stat("d", DIR)), dc.data_packet(0, b"x")], ProtocolError, "not requested"),
        ([dc.stat_packet(_stat("a")), dc.fin_packet()], ProtocolError, "FIN from the sender before"),
        ([dc.err_packet("boom")], PeerError, "error from sender: boom"),
        ([Packet(type=dc.PACKET_REQ, ID=0)], ProtocolError, "unexpected packet"),
        ([dc.stat_packet(_stat("h", linkname="nope"))], ValidationError, "unknown path"),
        ([dc.stat_packet(_stat("d", 0o40755))], ValidationError, "Unix st_mode"),  # raw st_mode of a directory
        ([dc.stat_packet(_stat("x", 0x80000000 | 0x08000000 | 0o755))], ValidationError, "more than one"),
    ],
)
def test_malformed_streams_fail_clearly(packets, error, match):
    with pytest.raises(error, match=match):
        _run_receiver(packets)


def test_malformed_stream_leaves_previous_tree_intact(tmp_path):
    good = tmp_path / "good"
    (good / "d").mkdir(parents=True)
    (good / "d" / "f").write_text("keep me")
    dst = tmp_path / "dst"
    sync_directories(str(good), str(dst))
    before = snapshot(str(dst))
    outside = sorted(os.listdir(tmp_path))
    receiver = DiffCopyReceiver(walk(str(dst)))
    applier = TreeApplier(str(dst))
    bad = [dc.stat_packet(_stat("d", DIR)), dc.stat_packet(_stat("d/f", size=3, mtime=5)),
           dc.data_packet(1, b"new"), dc.stat_packet(_stat("..", DIR))]
    with pytest.raises(ValidationError):
        for p in bad:
            for action in receiver.receive(p):
                if not isinstance(action, dc.SendPacket):
                    applier.apply(action)
    applier.abort()
    assert snapshot(str(dst)) == before  # half-written d/f never replaced the old one
    assert sorted(os.listdir(tmp_path)) == outside


def test_applier_never_writes_through_a_symlink(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    dst = tmp_path / "dst"
    dst.mkdir()
    os.symlink(str(outside), dst / "s")
    applier = TreeApplier(str(dst))
    from reference.applier import ApplyError

    with pytest.raises(ApplyError):
        applier.apply(dc.PutEntry("s/x", _stat("s/x", size=0), dc.Change.ADD, None))
    applier.abort()
    assert os.listdir(outside) == []


# -- sender state machine -----------------------------------------------------------

def _listed_sender():
    s = DiffCopySender()
    s.stat(_stat("d", DIR))
    s.stat(_stat("d/f", size=1))
    s.stat(_stat("l", 0x08000000 | 0o777, linkname="x"))
    s.end_listing()
    return s


@pytest.mark.parametrize(
    "req_ids,match",
    [
        ([1, 1], "duplicate REQ"),
        ([9], "has not been listed"),
        ([0], "not a regular file"),
        ([2], "not a regular file"),
    ],
)
def test_sender_rejects_bad_requests(req_ids, match):
    s = _listed_sender()
    with pytest.raises(ProtocolError, match=match):
        for i in req_ids:
            s.receive(dc.req_packet(i))


def test_sender_flow_and_ids_count_every_entry():
    s = _listed_sender()
    event = s.receive(dc.req_packet(1))
    assert event == dc.FileRequested(1, "d/f")
    assert s.data(1, b"x").data == b"x"
    with pytest.raises(ProtocolError):
        s.data(1, b"")  # an empty DATA mid-file would end it
    eof = s.end_file(1)
    assert eof.ID == 1 and eof.data == b""
    assert s.receive(dc.fin_packet()) == dc.FinReceived(())
    assert s.fin().type == dc.PACKET_FIN


def test_sender_reports_fin_too_early():
    s = _listed_sender()
    s.receive(dc.req_packet(1))
    assert s.receive(dc.fin_packet()).unfinished == (1,)


def test_end_of_listing_is_an_empty_message():
    assert dc.end_of_listing().SerializeToString() == b""
    assert not Packet.FromString(b"").HasField("stat")


def test_interleaved_data_for_several_files(tmp_path):
    dst = tmp_path / "dst"
    r = DiffCopyReceiver(merge=True)
    applier = TreeApplier(str(dst))
    packets = [dc.stat_packet(_stat("a", size=4, mtime=10)), dc.stat_packet(_stat("b", size=4, mtime=10)),
               dc.end_of_listing(), dc.data_packet(0, b"aa"), dc.data_packet(1, b"bb"), dc.data_packet(0, b"AA"),
               dc.data_packet(1, b"BB"), dc.data_packet(1, b""), dc.data_packet(0, b"")]
    sent = []
    for p in packets:
        for action in r.receive(p):
            if isinstance(action, dc.SendPacket):
                sent.append(dc.describe(action.packet))
            else:
                applier.apply(action)
    applier.finish()
    assert sent == ["REQ 0", "REQ 1", "FIN"]
    assert (dst / "a").read_bytes() == b"aaAA" and (dst / "b").read_bytes() == b"bbBB"
    assert r.receive(dc.fin_packet()) == [dc.TransferComplete()]


def test_export_merge_keeps_existing_files(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "new").write_text("n")
    (dst / "old").write_text("o")
    result = sync_directories(str(src), str(dst), merge=True)
    assert result.requested == ["new"]
    assert sorted(os.listdir(dst)) == ["new", "old"]
