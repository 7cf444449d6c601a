"""Client role, FileSend: the client receives exports (``-o type=local`` / ``type=tar``).

For a local export the scenario plays BuildKit 0.8's exporter: it opens
FileSend/DiffCopy without metadata (with dockerd 26.1's exporter ID and
traceparent for a generation n+1 client), acts as the fsutil sender,
interleaves DATA of several files and cancels the call after the FIN exchange.  Hostile
listings check the client's receiver rules (validation, safety); a tar export
checks that bytes are written unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import stat as st
import time

import pytest

from reference import diffcopy as dc
from reference import filemode as fm
from reference.paths import path_sort_key
from reference.pb import filesync_pb2
from reference.pb.fsutil_types_pb2 import Stat
from reference.transport.base import RpcError, StatusCode

from .harness.daemon_scripts import (
    FILESEND, CallOutcome, finish, open_diffcopy, recv_packet, run_client, send_packet, strict_transfer,
)
from .harness.instrumented_daemon import EXPORTER_ID_KEY, ScenarioResult, new_traceparent
from .harness.scripted_client import make_context
from .outcomes import declared_profiles, expect, redeclare_profiles

requirement = pytest.mark.requirement

D = fm.MODE_DIR
T0 = 1_650_000_000_000_000_000


def _n_plus_1(client):
    if client.generation == "n-1":
        pytest.skip("FileSend exports are generation n and later; this client is generation n-1")


def _can_mknod(tmp) -> bool:
    try:
        os.mknod(os.path.join(tmp, "probe-dev"), 0o600 | st.S_IFCHR, os.makedev(1, 3))
        os.unlink(os.path.join(tmp, "probe-dev"))
        return True
    except OSError:
        return False


def _export_tree(with_device: bool) -> tuple[list[Stat], dict[str, bytes]]:
    big = bytes(range(256)) * 6000  # 1.5 MB, sent in chunks of several sizes
    files = {"out/a.txt": b"alpha\n", "out/big.bin": big, "out/empty": b"", "out/exec": b"#!/bin/sh\n",
             "top.txt": b"new top\n"}
    stats = [
        Stat(path="out", mode=D | 0o755, uid=1234, gid=5678, modTime=T0),
        Stat(path="out/a.txt", mode=0o640, size=6, uid=1234, gid=5678, modTime=T0 + 111),
        Stat(path="out/big.bin", mode=0o644, size=len(big), uid=1234, gid=5678, modTime=T0 + 222),
        Stat(path="out/empty", mode=0o600, size=0, uid=1234, gid=5678, modTime=T0 + 333),
        Stat(path="out/exec", mode=0o755, size=10, uid=1234, gid=5678, modTime=T0 + 444),
        Stat(path="out/hard", mode=0o640, size=6, uid=1234, gid=5678, modTime=T0 + 111, linkname="out/a.txt"),
        Stat(path="out/link", mode=fm.MODE_SYMLINK | 0o777, size=15, uid=1234, gid=5678, modTime=T0 + 555,
             linkname="../not/resolved"),
        Stat(path="out/pipe", mode=fm.MODE_NAMED_PIPE | 0o600, uid=1234, gid=5678, modTime=T0 + 666),
        Stat(path="out/setgid-dir", mode=D | fm.MODE_SETGID | 0o775, uid=1234, gid=5678, modTime=T0),
        Stat(path="top.txt", mode=0o644, size=8, uid=1234, gid=5678, modTime=T0 + 777),
    ]
    if with_device:
        stats.append(Stat(path="out/zdev", mode=fm.MODE_DEVICE | fm.MODE_CHAR_DEVICE | 0o600, uid=1234, gid=5678,
                          modTime=T0 + 888, devmajor=1, devminor=3))
    stats.sort(key=lambda s: path_sort_key(s.path))
    return stats, files


class ExportRecord:
    def __init__(self):
        self.reqs: list[int] = []
        self.fins = 0
        self.violations: list[str] = []
        self.transcript: list[str] = []
        self.end: CallOutcome | None = None


def send_export(session, stats: list[Stat], files: dict[str, bytes], *, cancel_after_fin: bool = True,
                metadata=None) -> ExportRecord:
    """BuildKit 0.8's local exporter: list, serve REQs with interleaved DATA, FIN, cancel. The call carries
    ``metadata``, by default what the daemon of the session's generation sends."""
    rec = ExportRecord()
    tr = rec.transcript
    stream = session.conn.open_stream(FILESEND, session.filesend_metadata() if metadata is None else metadata)
    for s in stats:
        tr.append("< " + dc.describe(dc.stat_packet(s)))
        stream.send(dc.stat_packet(s).SerializeToString())
    send_packet(stream, dc.end_of_listing(), tr)
    wanted = {i for i, s in enumerate(stats) if fm.is_regular(s.mode) and not s.linkname}
    deadline = time.monotonic() + 15
    try:
        while set(rec.reqs) < wanted and time.monotonic() < deadline:
            p = recv_packet(stream, deadline - time.monotonic(), tr)
            if p is None:
                rec.violations.append("the call ended before every file was requested")
                break
            if p.type == dc.PACKET_REQ:
                rec.reqs.append(p.ID)
            else:
                rec.violations.append(f"{dc.describe(p)} before all REQs")
                if p.type == dc.PACKET_FIN:
                    rec.fins += 1
        # Interleave DATA of every requested file with chunks of different sizes, EOFs in reverse order.
        queues = {i: [] for i in rec.reqs if i in wanted}
        sizes = [1 << 20, 7, 32 << 10, 100_000]
        for n, i in enumerate(queues):
            data = files[stats[i].path]
            pos, k = 0, n
            while pos < len(data):
                size = sizes[k % len(sizes)]
                queues[i].append(data[pos:pos + size])
                pos += size
                k += 1
        while any(queues.values()):
            for i in list(queues):
                if queues[i]:
                    stream.send(dc.data_packet(i, queues[i].pop(0)).SerializeToString())
        for i in sorted(queues, reverse=True):
            stream.send(dc.data_packet(i, b"").SerializeToString())
        tr.append(f"< DATA for {sorted(queues)} interleaved, EOFs in reverse order")
        stream.flush()
        while True:
            p = recv_packet(stream, 15, tr)
            if p is None:
                rec.violations.append("the call ended without the client's FIN")
                break
            if p.type == dc.PACKET_FIN:
                rec.fins += 1
                break
            if p.type == dc.PACKET_REQ:
                rec.reqs.append(p.ID)
            else:
                rec.violations.append(f"unexpected {dc.describe(p)}")
        if rec.fins:
            send_packet(stream, dc.fin_packet(), tr)
            if cancel_after_fin:
                time.sleep(0.05)
                tr.append("< cancel (RST_STREAM), as BuildKit 0.8 does")
                stream.cancel()
                rec.end = CallOutcome(code=StatusCode.CANCELLED)
            else:
                stream.close_send()
                rec.end = finish(stream, CallOutcome(transcript=tr), 10, packets=True)
    except (RpcError, TimeoutError) as exc:
        rec.violations.append(f"{type(exc).__name__}: {exc}")
        tr.append(f"> {exc}")
    return rec


def _outputs(build) -> list:
    try:
        return json.loads((build.query.get("outputs") or ["null"])[0])
    except ValueError:
        return ["unparsable"]


@requirement("FILESEND-1", "FILESEND-LOCAL-1", "FILESEND-LOCAL-2", "FILESEND-LOCAL-3", "METHODS-2",
             "DIFFCOPY-REQ-1", "DIFFCOPY-REQ-2", "DIFFCOPY-DATA-3", "DIFFCOPY-DATA-4", "DIFFCOPY-FIN-1",
             "STAT-MODE-3", "STAT-TIME-2", "STAT-DEV-1", "INCREMENTAL-5", "INCREMENTAL-6", "DIFFCOPY-LIST-2",
             "DIFFCOPY-PACKET-1", "DIFFCOPY-PACKET-2")
def test_local_export_is_received_in_merge_mode(client, tmp_path):
    _n_plus_1(client)
    dest = tmp_path / "dest"
    (dest / "out").mkdir(parents=True)
    (dest / "keep.me").write_text("kept")
    (dest / "out" / "old.txt").write_text("kept too")
    (dest / "top.txt").write_text("old top, replaced")
    with_device = _can_mknod(str(tmp_path))
    stats, files = _export_tree(with_device)
    seen = {}

    def scenario(build):
        seen["record"] = send_export(build.session, stats, files)
        return ScenarioResult()

    daemon, run = run_client(client, make_context({"a": "a"}), scenario,
                             extra_args=["-o", f"type=local,dest={dest}"])
    build = daemon.builds[0]
    outputs = _outputs(build)
    expect("FILESEND-1", isinstance(outputs, list) and len(outputs) == 1 and outputs[0].get("Type") == "local"
           and "dest" not in (outputs[0].get("Attrs") or {}), '[{"Type": "local", "Attrs": {...}}] without dest',
           build.query.get("outputs"))
    expect("METHODS-2", build.session.supports(FILESEND), "FileSend/DiffCopy advertised", build.session.methods)
    rec: ExportRecord = seen["record"]
    tr = rec.transcript
    regular = {i for i, s in enumerate(stats) if fm.is_regular(s.mode) and not s.linkname}
    expect("DIFFCOPY-REQ-2", sorted(rec.reqs) == sorted(regular) and len(rec.reqs) == len(set(rec.reqs)),
           f"one REQ for each regular file {sorted(regular)} (merge mode), none for links or directories",
           rec.reqs, tr)
    expect("DIFFCOPY-FIN-1", rec.fins == 1 and not rec.violations, "exactly one FIN after every end of file",
           rec.violations, tr)
    expect("FILESEND-LOCAL-3", run.returncode == 0, "FIN exchanged then cancelled counts as success",
           f"exit {run.returncode}", [run.output[-2000:]])
    j = lambda p: os.path.join(dest, p)  # noqa: E731
    # contents (concatenation of interleaved chunks)
    for path, data in files.items():
        got = open(j(path), "rb").read() if os.path.isfile(j(path)) else None
        expect("DIFFCOPY-DATA-4", got == data, f"{path}: the concatenated DATA ({len(data)} bytes)",
               None if got is None else f"{len(got)} bytes", tr)
    # merge mode keeps what was there
    expect("INCREMENTAL-6", open(j("keep.me")).read() == "kept" and open(j("out/old.txt")).read() == "kept too",
           "existing entries stay in merge mode", sorted(os.listdir(dest)))
    # types, permissions, special bits, owners, times
    by = {s.path: s for s in stats}
    problems = []
    for path, s in by.items():
        try:
            lst = os.lstat(j(path))
        except FileNotFoundError:
            problems.append(f"{path}: missing")
            continue
        want_type = (st.S_IFDIR if fm.is_dir(s.mode) else st.S_IFLNK if fm.is_symlink(s.mode)
                     else st.S_IFIFO if fm.is_fifo(s.mode) else st.S_IFCHR if fm.is_device(s.mode) else st.S_IFREG)
        if st.S_IFMT(lst.st_mode) != want_type:
            problems.append(f"{path}: type {st.S_IFMT(lst.st_mode):o} != {want_type:o}")
        if not fm.is_symlink(s.mode):
            want_perm = fm.st_mode_from_go_mode(s.mode) & 0o7777
            if st.S_IMODE(lst.st_mode) != want_perm:
                problems.append(f"{path}: mode {st.S_IMODE(lst.st_mode):o} != {want_perm:o}")
        if not fm.is_dir(s.mode) and lst.st_mtime_ns != s.modTime:
            problems.append(f"{path}: mtime {lst.st_mtime_ns} != {s.modTime}")
        if (lst.st_uid, lst.st_gid) != (os.getuid(), os.getgid()):
            problems.append(f"{path}: owner {lst.st_uid}:{lst.st_gid}")
    mode_problems = [p for p in problems if "type" in p or "mode" in p or "missing" in p]
    expect("STAT-MODE-3", not mode_problems, "each entry created as its type with its permission bits",
           mode_problems, tr)
    expect("STAT-TIME-2", not [p for p in problems if "mtime" in p], "modTime on every non-directory",
           [p for p in problems if "mtime" in p])
    expect("FILESEND-LOCAL-2", not [p for p in problems if "owner" in p],
           f"entries owned by the client's own uid/gid {os.getuid()}:{os.getgid()}, not 1234:5678",
           [p for p in problems if "owner" in p])
    link = os.readlink(j("out/link")) if os.path.islink(j("out/link")) else None
    expect("STAT-MODE-3", link == "../not/resolved", "the symlink target exactly as sent", link)
    same_inode = os.path.exists(j("out/hard")) and os.lstat(j("out/hard")).st_ino == os.lstat(j("out/a.txt")).st_ino
    expect("STAT-MODE-3", same_inode, "out/hard is a hard link to out/a.txt", "different inodes or missing")
    if with_device:
        rdev = os.lstat(j("out/zdev")).st_rdev if os.path.exists(j("out/zdev")) else None
        expect("STAT-DEV-1", rdev is not None and (os.major(rdev), os.minor(rdev)) == (1, 3),
               "character device 1:3", rdev)
    stray = sorted(set(os.listdir(dest)) | {f"out/{n}" for n in os.listdir(j("out"))})
    allowed = {"keep.me", "top.txt", "out", "out/old.txt"} | {p for p in by if p.startswith("out/")}
    expect("INCREMENTAL-5", set(stray) <= allowed, "no temporary or stray entries", sorted(set(stray) - allowed))


HOSTILE = [
    # (name, rule, listing as (path, mode, linkname), extra action)
    ("dotdot-prefix", "VALIDATE-PATH-2", [("../escaped.txt", 0o644, "")], None),
    ("absolute", "VALIDATE-PATH-2", [("/abs-escaped.txt", 0o644, "")], None),
    ("unclean", "VALIDATE-PATH-1", [("a", D | 0o755, ""), ("a//b", 0o644, "")], None),
    ("nul", "VALIDATE-PATH-4", [("nul\x00byte", 0o644, "")], None),
    ("unsorted", "VALIDATE-ORDER-1", [("b", 0o644, ""), ("a", 0o644, "")], None),
    ("missing-parent", "VALIDATE-ORDER-1", [("nodir/x", 0o644, "")], None),
    ("hardlink-unknown", "HARDLINK-1", [("h", 0o644, "nothere")], None),
    ("through-symlink", "SAFETY-2", [("s", fm.MODE_SYMLINK | 0o777, ".."), ("s/x-through-link", 0o644, "")], None),
    ("data-for-directory", "DIFFCOPY-DATA-3", [("d", D | 0o755, ""), ("f", 0o644, "")], "data-dir"),
    ("sender-err", "DIFFCOPY-ERR-2", [("f", 0o644, "")], "err"),
    ("no-fin", "FILESEND-LOCAL-3", [("f", 0o644, "")], "no-fin"),
    ("unix-mode", "STAT-MODE-4", [("looks-like-a-dir", 0o40755, "")], None),
    ("early-fin", "DIFFCOPY-FIN-3", [("f", 0o644, "")], "early-fin"),
]
DESTRUCTIVE_HOSTILE = [
    ("dot", "SAFETY-3", [(".", D | 0o777, "")], None),
    ("bare-dotdot", "VALIDATE-PATH-3", [("..", D | 0o777, "")], None),
]


def _hostile_stream(session, listing, action) -> CallOutcome:
    stream = session.conn.open_stream(FILESEND, session.filesend_metadata())
    outcome = CallOutcome()
    tr = outcome.transcript
    t0 = time.monotonic()
    try:
        for path, mode, linkname in listing:
            s = Stat(path=path, mode=mode, linkname=linkname, size=1, modTime=T0)
            send_packet(stream, dc.stat_packet(s), tr)
        send_packet(stream, dc.end_of_listing(), tr)
        if action == "data-dir":
            send_packet(stream, dc.data_packet(0, b"not a file"), tr)
        elif action in ("err", "no-fin", "early-fin"):
            p = recv_packet(stream, 10, tr)
            if action == "early-fin":
                send_packet(stream, dc.fin_packet(), tr)  # before any DATA: the client should fail at once
            elif action == "err":
                send_packet(stream, dc.err_packet("conformance sender failed (code 3390)"), tr)
            elif p is not None and p.type == dc.PACKET_REQ:
                send_packet(stream, dc.data_packet(p.ID, b"x"), tr)
                send_packet(stream, dc.data_packet(p.ID, b""), tr)
                p = recv_packet(stream, 10, tr)  # the client's FIN
            if action == "no-fin":
                tr.append("< close send (no FIN)")
                stream.close_send()
    except (RpcError, TimeoutError) as exc:
        tr.append(f"> {exc}")
    # Drain until the client ends the call (an accepted listing is completed).
    started = time.monotonic()
    wait = 3.0 if action == "early-fin" else 10.0
    try:
        while time.monotonic() - started < wait:
            p = recv_packet(stream, wait - (time.monotonic() - started), tr)
            if p is None:
                outcome.code = StatusCode.OK
                break
            if p.type == dc.PACKET_ERR:
                # The receiver rejected the transfer; a sender abandons the call then.
                outcome.details = "ERR " + p.data.decode("utf-8", "replace")
                tr.append("< close send")
                stream.close_send()
                end = finish(stream, CallOutcome(transcript=tr), 10)
                outcome.code = end.code
                if end.details:
                    outcome.details += "; status: " + end.details
                break
            if p.type == dc.PACKET_REQ and action is None:
                send_packet(stream, dc.data_packet(p.ID, b""), tr)  # an accepted listing: finish it quickly
            if p.type == dc.PACKET_FIN and action not in ("no-fin", "early-fin"):
                # a FIN means the client accepted the listing: finish the exchange to see the verdict
                send_packet(stream, dc.fin_packet(), tr)
                stream.close_send()
    except RpcError as exc:
        outcome.code, outcome.details = exc.code, exc.details
        tr.append(f"> call ended {exc.code.name}: {exc.details}")
    except TimeoutError:
        tr.append(f"> still open after {wait:.0f} s")
        stream.cancel()
    outcome.seconds = time.monotonic() - t0
    return outcome


def _tree_state(root: str) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames + ["."]:
            p = os.path.join(dirpath, name)
            try:
                s = os.lstat(p)
            except FileNotFoundError:
                continue
            out[os.path.relpath(p, root)] = (s.st_mode, s.st_uid, s.st_gid, s.st_mtime_ns if name != "." else 0)
    return out


_hostile_runs: dict = {}


def _meta(path) -> tuple | None:
    try:
        s = os.lstat(path)
    except FileNotFoundError:
        return None
    return oct(s.st_mode), s.st_uid, s.st_gid, s.st_mtime_ns


def hostile_run(client, tmp_path_factory):
    """One client run with every hostile export stream, shared by the tests below (per client)."""
    key = client.spec
    if key in _hostile_runs:
        redeclare_profiles(_hostile_runs[key]["profiles"])
        return _hostile_runs[key]
    tmp_path = tmp_path_factory.mktemp("hostile")
    jail = tmp_path / "jail"
    dest = jail / "parents" / "dest"  # missing parents: the client creates them
    jail.mkdir()
    (jail / "sentinel.txt").write_text("must stay")
    seen = {"dest": dest, "tmp": tmp_path}
    good_stats = [Stat(path="good.txt", mode=0o644, size=4, modTime=T0)]

    def scenario(build):
        for name, rule, listing, action in HOSTILE:
            seen[name] = _hostile_stream(build.session, listing, action)
        seen["good"] = send_export(build.session, good_stats, {"good.txt": b"good"})
        for name, rule, listing, action in DESTRUCTIVE_HOSTILE:
            seen[f"before-{name}"] = _meta(dest), _meta(dest.parent)
            seen[name] = _hostile_stream(build.session, listing, action)
            seen[f"after-{name}"] = _meta(dest), _meta(dest.parent)
        return ScenarioResult()

    before = _tree_state(str(tmp_path))
    daemon, run = run_client(client, make_context({"a": "a"}), scenario, extra_args=["-o", f"type=local,dest={dest}"])
    seen["run"] = run
    seen["profiles"] = declared_profiles()
    after = _tree_state(str(tmp_path))
    seen["outside"] = {p: (before.get(p), after.get(p)) for p in set(before) | set(after)
                       if not p.startswith("jail/parents") and p not in (".", "jail") and before.get(p) != after.get(p)}
    _hostile_runs[key] = seen
    return seen


def _check_hostile_case(client, tmp_path_factory, case) -> None:
    _n_plus_1(client)
    seen = hostile_run(client, tmp_path_factory)
    name, rule, listing, action = next(c for c in HOSTILE + DESTRUCTIVE_HOSTILE if c[0] == case)
    o = seen.get(name)
    assert o is not None, "harness: the stream did not run"
    rejected = o.code not in (None, StatusCode.OK) or o.details.startswith("ERR ")
    expect(rule, rejected, f"{name}: the transfer fails (ERR or an error status)", o.describe(), o.transcript)
    if action == "err":
        expect("DIFFCOPY-ERR-2", "3390" in o.details, "the error carries the sender's ERR text", o.details,
               o.transcript)
    if rule.startswith("VALIDATE") or rule == "HARDLINK-1":
        shown = listing[-1][0].replace("\x00", "")
        expect("VALIDATE-1", (shown and shown in o.details) or "\x00" in listing[-1][0],
               f"the error names the offending path {listing[-1][0]!r}", o.details, o.transcript)


def _define_hostile_tests() -> None:
    """One test per hostile stream, each marked with its own rule (the run is shared)."""
    for name, rule, listing, action in HOSTILE + DESTRUCTIVE_HOSTILE:
        rules = [rule] + (["VALIDATE-1"] if rule.startswith("VALIDATE") or rule == "HARDLINK-1" else [])

        def test(client, tmp_path_factory, _case=name):
            _check_hostile_case(client, tmp_path_factory, _case)

        test_name = "test_hostile_export_" + name.replace("-", "_")
        test.__name__ = test.__qualname__ = test_name
        test.__doc__ = f"A local export whose listing is hostile ({name}) fails; rule {rule}."
        globals()[test_name] = requirement(*rules)(test)


_define_hostile_tests()


@requirement("SAFETY-1", "SAFETY-2", "SAFETY-3", "FILESEND-LOCAL-2")
def test_hostile_exports_stay_inside_the_destination(client, tmp_path_factory):
    _n_plus_1(client)
    seen = hostile_run(client, tmp_path_factory)
    tmp_path, dest = seen["tmp"], seen["dest"]
    jail = tmp_path / "jail"
    expect("SAFETY-1", not seen["outside"], "nothing outside the destination created or changed", seen["outside"])
    for p in ("jail/escaped.txt", "jail/parents/escaped.txt", "abs-escaped.txt"):
        expect("SAFETY-1", not (tmp_path / p).exists(), f"{p} not created", "created")
    expect("SAFETY-1", not os.path.exists("/abs-escaped.txt"), "/abs-escaped.txt not created", "created")
    expect("SAFETY-2", not (jail / "parents" / "x-through-link").exists(), "nothing written through a symlink",
           "parents/x-through-link exists")
    good = seen["good"]
    expect("FILESEND-LOCAL-2", good.fins == 1 and (dest / "good.txt").exists()
           and (dest / "good.txt").read_bytes() == b"good",
           "after hostile streams a good export still lands in the destination the client created",
           good.violations, good.transcript)
    before, after = seen["before-bare-dotdot"][1], seen["after-bare-dotdot"][1]
    expect("SAFETY-1", before == after, "an entry '..' leaves the destination's parent alone (mode, owner, mtime)",
           (before, after))
    before, after = seen["before-dot"][0], seen["after-dot"][0]
    expect("SAFETY-3", before == after and before is not None,
           "an entry '.' does not change the destination itself (mode, owner, mtime)", (before, after))


@pytest.mark.parametrize("where", ["file", "stdout"])
@requirement("FILESEND-1", "FILESEND-TAR-2", "METHODS-2")
def test_tar_export_is_written_unchanged(client, tmp_path, where):
    _n_plus_1(client)
    # Starts like a Packet (0x12 ...): the client must go by the output type, not sniff the bytes.
    looks_like_packet = dc.stat_packet(Stat(path="x", mode=0o644)).SerializeToString()
    if where == "stdout":
        pieces = [b"\x12conformance-tar-bytes ", b"A" * 70_000, b" middle ", b"B" * 5, b" end\n"]
    else:
        pieces = [looks_like_packet, os.urandom(100_000), b"", os.urandom(4096), bytes(range(256)) * 300]
    payload = b"".join(pieces)
    dest = tmp_path / "out.tar"
    seen = {}

    def scenario(build):
        stream = build.session.conn.open_stream(FILESEND, build.session.filesend_metadata())
        for piece in pieces:
            stream.send(filesync_pb2.BytesMessage(data=piece).SerializeToString())
        stream.close_send()
        seen["o"] = finish(stream, CallOutcome(), 15)
        return ScenarioResult()

    target = "-" if where == "stdout" else str(dest)
    daemon, run = run_client(client, make_context({"a": "a"}), scenario, extra_args=["-o", f"type=tar,dest={target}"])
    o = seen["o"]
    expect("FILESEND-TAR-2", o.ok, "the call ends OK after our half-close", o.describe())
    if where == "stdout":
        got = run.stdout.encode("utf-8", "surrogateescape")
        expect("FILESEND-TAR-2", got.startswith(payload), "the bytes on standard output, unchanged",
               f"{len(got)} bytes: {got[:60]!r}")
    else:
        got = dest.read_bytes() if dest.exists() else None
        expect("FILESEND-TAR-2", got == payload, f"{len(payload)} bytes written unchanged",
               None if got is None else f"{len(got)} bytes, first {got[:16]!r}")
    expect("FILESEND-TAR-2", run.returncode == 0, "the build succeeds", run.output[-2000:])
    build = daemon.builds[0]
    outputs = _outputs(build)
    expect("FILESEND-1", isinstance(outputs, list) and len(outputs) == 1 and outputs[0].get("Type") == "tar"
           and "dest" not in (outputs[0].get("Attrs") or {}), '[{"Type": "tar", "Attrs": {...}}] without dest',
           build.query.get("outputs"))
    expect("METHODS-2", build.session.supports(FILESEND), "FileSend/DiffCopy advertised", build.session.methods)


@pytest.mark.parametrize("output", ["local", "tar"])
@requirement("META-UNKNOWN-1")
def test_unknown_metadata_is_ignored(client, tmp_path, output):
    """dockerd 26.1 adds the exporter ID and a traceparent to every FileSend call and a traceparent to every
    FileSync call, whatever the client's generation; a later daemon may add other keys."""
    _n_plus_1(client)
    extra = [("traceparent", new_traceparent()), ("x-conformance-future-key", "7712")]
    export_metadata = [(EXPORTER_ID_KEY, "0")] + extra
    ctx = make_context({"a.txt": "a", "sub/b.txt": "b"})
    seen = {}
    stats = [Stat(path="got.txt", mode=0o644, size=5, modTime=T0)]
    pieces = [os.urandom(5000), bytes(range(256)) * 40]

    def scenario(build):
        s = build.session
        seen["plain"] = strict_transfer(open_diffcopy(s, None, raw_metadata=[("dir-name", "context")]))
        seen["extra"] = strict_transfer(open_diffcopy(s, None, raw_metadata=[("dir-name", "context")] + extra))
        if output == "local":
            seen["export"] = send_export(s, stats, {"got.txt": b"agent"}, metadata=export_metadata)
        else:
            stream = s.conn.open_stream(FILESEND, export_metadata)
            for piece in pieces:
                stream.send(filesync_pb2.BytesMessage(data=piece).SerializeToString())
            stream.close_send()
            seen["export"] = finish(stream, CallOutcome(), 15)
        return ScenarioResult()

    dest = tmp_path / ("out" if output == "local" else "out.tar")
    try:
        daemon, run = run_client(client, ctx, scenario, extra_args=["-o", f"type={output},dest={dest}"])
    finally:
        shutil.rmtree(ctx, ignore_errors=True)
    plain, with_extra = seen["plain"], seen["extra"]
    expect("META-UNKNOWN-1", with_extra.ok and with_extra.paths == plain.paths and
           with_extra.contents == plain.contents, f"FileSync with {extra}: the same transfer as without",
           f"{with_extra.paths} vs {plain.paths}; {with_extra.violations or with_extra.end.describe()}",
           with_extra.transcript)
    export = seen["export"]
    if output == "local":
        got = (dest / "got.txt").read_bytes() if (dest / "got.txt").exists() else None
        expect("META-UNKNOWN-1", export.fins == 1 and not export.violations and got == b"agent",
               f"a local export with {export_metadata} is received", (export.violations, got), export.transcript)
    else:
        got = dest.read_bytes() if dest.exists() else None
        expect("META-UNKNOWN-1", export.ok and got == b"".join(pieces),
               f"a tar export with {export_metadata} is written", (export.describe(), got and len(got)))
    expect("META-UNKNOWN-1", run.returncode == 0, "the build succeeds", run.output[-2000:])
