"""Client role, FileSync: the client as the sender of the context.

The scenario pulls directories from the client the way a daemon does and
checks every packet: the listing's encoding (modes, times, sizes, links,
devices, xattrs, owners), requests at any time, invalid requests, ERR from
the receiver, the metadata filters, and TarStream for generation n-1.
Expected results are written out by hand per case.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import socket
import stat as st
import tarfile

import pytest

from reference import diffcopy as dc
from reference import filemode as fm
from reference.metadata import needs_encoding, query_escape
from reference.paths import path_sort_key
from reference.pb import filesync_pb2
from reference.transport.base import RpcError, StatusCode

from .harness.daemon_scripts import (
    TARSTREAM, CallOutcome, finish, open_diffcopy, read_listing, recv_packet, run_client, send_packet, strict_transfer,
)
from .harness.instrumented_daemon import ScenarioResult
from .harness.scripted_client import make_context
from .catalogue import not_applicable_reason
from .outcomes import declared_profiles, expect, not_applicable, redeclare_profiles

requirement = pytest.mark.requirement

D = fm.MODE_DIR


def _n_plus_1(client):
    if client.generation == "n-1":
        pytest.skip("DiffCopy is generation n and later; this client is generation n-1")


def _n(client):
    if client.generation != "n-1":
        pytest.skip("TarStream is served by generation n-1 clients only (dockerd 20.10 never calls it)")


def _try(fn, *args) -> bool:
    try:
        fn(*args)
        return True
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES, errno.EINVAL):
            return False
        raise


# -- the listing ---------------------------------------------------------------------------

MTIME_NS = 1_600_000_000_123_456_789
OLD_MTIME_NS = -315_619_200_000_000_000 + 987_654_321  # 1960, with a fraction
DEV_MAJOR, DEV_MINOR = 259, 300  # needs both halves of the old Linux encoding


def _stat_context():
    ctx = make_context({"f.txt": "hello", "empty": "", "exec.sh": "#!/bin/sh\n", "setuid": "s", "old.txt": "o",
                        "h1": "linked", "sub/file": "x" * 70_000, "x.txt": "xattr"})
    j = lambda p: os.path.join(ctx, p)  # noqa: E731
    os.chmod(j("exec.sh"), 0o755)
    os.chmod(j("setuid"), 0o4755)
    for name, mode in (("setgid", 0o2775), ("sticky", 0o1777), ("private", 0o700)):
        os.mkdir(j(name))
        os.chmod(j(name), mode)
    os.utime(j("f.txt"), ns=(MTIME_NS, MTIME_NS))
    old_ok = True
    try:
        os.utime(j("old.txt"), ns=(OLD_MTIME_NS, OLD_MTIME_NS))
    except OSError:
        old_ok = False
    os.link(j("h1"), j("h2"))
    os.link(j("h1"), j("sub/h3"))
    os.symlink("/etc/passwd", j("abs-link"))
    os.symlink("../x/../y", j("rel-link"))
    os.symlink("nothing-here", j("dangling"))
    os.mkfifo(j("pipe"))
    dev_ok = _try(os.mknod, j("chardev"), 0o600 | st.S_IFCHR, os.makedev(DEV_MAJOR, DEV_MINOR))
    blk_ok = _try(os.mknod, j("blockdev"), 0o640 | st.S_IFBLK, os.makedev(7, 1))
    xattr_ok = _try(os.setxattr, j("x.txt"), "user.conformance", b"\x00\xffbinary value")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(j("sock"))  # stays on disk after close
    listener.close()
    return ctx, {"dev": dev_ok, "blk": blk_ok, "xattr": xattr_ok, "old": old_ok}


@requirement("STAT-MODE-1", "STAT-MODE-2", "STAT-TIME-1", "STAT-SIZE-1", "STAT-LINK-1", "STAT-LINK-2", "STAT-DEV-1",
             "STAT-XATTR-1", "STAT-OWNER-1", "STAT-OWNER-2", "DIFFCOPY-LIST-1", "DIFFCOPY-LIST-2",
             "DIFFCOPY-PACKET-1", "DIFFCOPY-PACKET-2", "DIFFCOPY-ORDER-1", "DIFFCOPY-REQ-1", "DIFFCOPY-DATA-1",
             "DIFFCOPY-DATA-2", "DIFFCOPY-FIN-2", "VALIDATE-2", "HARDLINK-2")
def test_listing_encodes_every_entry_type_like_go(client):
    _n_plus_1(client)
    ctx, can = _stat_context()
    os.chown(os.path.join(ctx, "Dockerfile"), 1234, 5678)
    seen = {}

    def scenario(build):
        s = build.session
        regular = lambda stat: fm.is_regular(stat.mode) and not stat.linkname and stat.path != "sock"  # noqa: E731
        seen["context"] = strict_transfer(open_diffcopy(s, "context"), request=regular)
        seen["dockerfile"] = strict_transfer(open_diffcopy(s, "dockerfile", followpaths=["Dockerfile"]))
        seen["no-h1"] = strict_transfer(open_diffcopy(s, "context", exclude_patterns=["h1"]),
                                        request=lambda stat: False)
        return ScenarioResult()

    daemon, run = run_client(client, ctx, scenario)
    t = seen["context"]
    tr = t.transcript
    expect("DIFFCOPY-LIST-2", t.listing.ended and not t.listing.early, "STATs then one end-of-listing packet",
           t.listing.early, tr)
    expect("DIFFCOPY-FIN-2", t.ok, "REQs answered, FIN answered by one FIN, then the call ends OK",
           t.violations or t.end.describe(), tr)
    by = t.by_path
    expected_paths = set()
    for dirpath, dirnames, filenames in os.walk(ctx):
        for name in dirnames + filenames:
            expected_paths.add(os.path.relpath(os.path.join(dirpath, name), ctx))
    expect("DIFFCOPY-LIST-1", set(by) == expected_paths and len(by) == len(t.paths),
           "one STAT per entry, none for the root", sorted(set(by) ^ expected_paths), tr)
    expect("DIFFCOPY-ORDER-1", t.paths == sorted(t.paths, key=path_sort_key), "fsutil path order", t.paths, tr)
    bad_paths = [p for p in t.paths if not p or p.startswith("/") or "\x00" in p or
                 any(c in ("", ".", "..") for c in p.split("/"))]
    expect("VALIDATE-2", not bad_paths, "canonical relative paths", bad_paths, tr)
    modes = {
        "f.txt": 0o644, "exec.sh": 0o755, "setuid": fm.MODE_SETUID | 0o755, "setgid": D | fm.MODE_SETGID | 0o775,
        "sticky": D | fm.MODE_STICKY | 0o777, "private": D | 0o700, "sub": D | 0o755,
        "abs-link": fm.MODE_SYMLINK | 0o777, "pipe": fm.MODE_NAMED_PIPE | 0o644,
    }
    if can["dev"]:
        modes["chardev"] = fm.MODE_DEVICE | fm.MODE_CHAR_DEVICE | 0o600
    if can["blk"]:
        modes["blockdev"] = fm.MODE_DEVICE | 0o640
    wrong = {p: (f"{by[p].mode:#x}" if p in by else None, f"{m:#x}") for p, m in modes.items()
             if p not in by or by[p].mode != m}
    expect("STAT-MODE-1", not wrong, "Go os.FileMode values", wrong, tr)
    sock = by.get("sock")
    expect("STAT-MODE-1", sock is not None and not sock.mode & fm.MODE_TYPE and not sock.mode & 0o177000,
           "a socket without any type bit (ModeSocket cleared)", sock and f"{sock.mode:#x}", tr)
    unix_bits = [p for p, s in by.items() if s.mode & 0o177000]
    expect("STAT-MODE-2", not unix_bits, "no st_mode type or special bits", unix_bits, tr)
    expect("STAT-TIME-1", by["f.txt"].modTime == MTIME_NS, "modTime in nanoseconds", by["f.txt"].modTime)
    if can["old"]:
        expect("STAT-TIME-1", by["old.txt"].modTime == OLD_MTIME_NS, "negative nanoseconds before 1970",
               by["old.txt"].modTime)
    sizes = {"f.txt": 5, "empty": 0, "sub/file": 70_000, "abs-link": len("/etc/passwd"),
             "rel-link": len("../x/../y"), "h1": 6, "h2": 6, "sub/h3": 6, "sub": 0, "setgid": 0, "pipe": 0}
    wrong = {p: (by[p].size, n) for p, n in sizes.items() if by[p].size != n}
    expect("STAT-SIZE-1", not wrong, "lstat sizes (hardlinks too), 0 for directories", wrong, tr)
    links = {"abs-link": "/etc/passwd", "rel-link": "../x/../y", "dangling": "nothing-here"}
    wrong = {p: by[p].linkname for p, target in links.items() if by[p].linkname != target}
    expect("STAT-LINK-1", not wrong, "raw readlink targets", wrong, tr)
    hard = (by["h1"].linkname, by["h2"].linkname, by["sub/h3"].linkname, by["f.txt"].linkname)
    expect("STAT-LINK-2", hard == ("", "h1", "h1", ""), "first name empty, later names link to it", hard, tr)
    if can["dev"]:
        dev = (by["chardev"].devmajor, by["chardev"].devminor)
        rdev = os.makedev(DEV_MAJOR, DEV_MINOR)
        old_form = ((rdev >> 8) & 0xFFF, (rdev & 0xFF) | ((rdev >> 12) & 0xFFF00))
        expect("STAT-DEV-1", dev == old_form, "old Linux device encoding", dev, tr)
    nondev = {p: (s.devmajor, s.devminor) for p, s in by.items()
              if p not in ("chardev", "blockdev") and (s.devmajor or s.devminor)}
    expect("STAT-DEV-1", not nondev, "0/0 for every non-device", nondev, tr)
    if can["xattr"]:
        expect("STAT-XATTR-1", dict(by["x.txt"].xattrs).get("user.conformance") == b"\x00\xffbinary value",
               "user.conformance sent as raw bytes", dict(by["x.txt"].xattrs), tr)
    owners = {(s.uid, s.gid) for s in by.values()}
    expect("STAT-OWNER-2", owners == {(0, 0)}, "0/0 for every context entry", owners, tr)
    df = seen["dockerfile"].by_path.get("Dockerfile")
    if df is not None and (df.uid, df.gid) == (0, 0):
        # BuildKit's own client maps every directory it serves to 0/0 (bk client/solve.go, prepareSyncedFiles),
        # which the rule permits: no transfer of this client shows real owners
        not_applicable("STAT-OWNER-1", "the client maps the owners of the dockerfile directory to 0/0 as well")
    else:
        expect("STAT-OWNER-1", df is not None and (df.uid, df.gid) == (1234, 5678),
               "the real owner outside the context mapping (dir-name=dockerfile)", df, seen["dockerfile"].transcript)
    # contents: every requested file arrived intact, so the IDs were counted like ours
    wrong = []
    for path, data in t.contents.items():
        if os.path.isfile(os.path.join(ctx, path)):
            with open(os.path.join(ctx, path), "rb") as fh:
                if fh.read() != data:
                    wrong.append(path)
    expect("DIFFCOPY-REQ-1", not wrong and t.contents, "the data of each REQ is the file at that position", wrong, tr)
    expect("DIFFCOPY-DATA-1", not t.violations, "DATA chunks then one empty DATA per REQ", t.violations, tr)
    expect("DIFFCOPY-DATA-2", max(t.data_sizes) <= 4 << 20, "messages within 4 MiB", max(t.data_sizes))
    raw_ok = all(p.startswith(("STAT", "DATA", "FIN", "REQ", "call", "still")) for p in
                 (line[2:] for line in tr if line.startswith("> ")))
    expect("DIFFCOPY-PACKET-2", raw_ok, "only known packet types", tr[-5:], tr)
    nh = seen["no-h1"].by_path
    chain = (nh.get("h2") and nh["h2"].linkname, nh.get("sub/h3") and nh["sub/h3"].linkname)
    expect("HARDLINK-2", "h1" not in nh and chain == ("", "h2"),
           "with h1 filtered out, h2 is the first name and sub/h3 links to it", chain, seen["no-h1"].transcript)
    expect("DIFFCOPY-PACKET-1", run.returncode == 0, "the build succeeds", run.output)


@requirement("DIFFCOPY-REQ-3", "DIFFCOPY-DATA-1")
def test_requests_before_the_end_of_the_listing(client):
    _n_plus_1(client)
    files = {f"d{i // 100:02d}/f{i:04d}": f"content {i}\n" * (1 + i % 7) for i in range(800)}
    ctx = make_context(files)
    seen = {}

    def scenario(build):
        stream = open_diffcopy(build.session, "context")
        tr: list[str] = []
        requested = {}

        def on_stat(index, stat):
            if fm.is_regular(stat.mode) and not stat.linkname:
                requested[index] = stat.path
                stream.send(dc.req_packet(index).SerializeToString())
                if len(requested) % 50 == 1:
                    stream.flush()

        listing = read_listing(stream, tr, 20, on_stat=on_stat)
        stream.flush()
        data = {i: b"" for i in requested}
        done = set()
        early = [p for p in listing.early if p.type == dc.PACKET_DATA]
        for p in early:
            if p.data:
                data[p.ID] += p.data
            else:
                done.add(p.ID)
        while len(done) < len(requested):
            raw = stream.recv(timeout=20)
            if raw is None:
                break
            p = dc.decode_packet(raw)
            if p.type != dc.PACKET_DATA:
                tr.append("> " + dc.describe(p))
                break
            if p.data:
                data[p.ID] += p.data
            else:
                done.add(p.ID)
        send_packet(stream, dc.fin_packet(), tr)
        end = finish(stream, CallOutcome(transcript=tr), 10, packets=True)
        seen.update(listing=listing, requested=requested, data=data, done=done, end=end, tr=tr)
        return ScenarioResult()

    daemon, run = run_client(client, ctx, scenario)
    requested, data = seen["requested"], seen["data"]
    wrong = [requested[i] for i in requested
             if i in data and data[i] != (files.get(requested[i]) or "").encode() and requested[i] != "Dockerfile"]
    expect("DIFFCOPY-REQ-3", seen["listing"].ended and len(seen["done"]) == len(requested) and not wrong,
           "every file requested during the listing arrives", f"{len(seen['done'])}/{len(requested)}, wrong={wrong[:5]}",
           seen["tr"][-20:])
    expect("DIFFCOPY-DATA-1", seen["end"].ok and seen["end"].messages, "FIN answered, call ends OK",
           seen["end"].describe(), seen["end"].transcript[-10:])


@requirement("DIFFCOPY-REQ-3", "DIFFCOPY-ERR-2", "ERROR-1")
def test_invalid_requests_and_receiver_errors_fail_the_transfer(client):
    _n_plus_1(client)
    ctx = make_context({"a.txt": "a", "dir/b.txt": "b"})
    seen = {}

    def one(session, action):
        stream = open_diffcopy(session, "context")
        tr: list[str] = []
        listing = read_listing(stream, tr, 10)
        ids = {s.path: i for i, s in enumerate(listing.stats)}
        if action == "duplicate":
            send_packet(stream, dc.req_packet(ids["a.txt"]), tr)
            send_packet(stream, dc.req_packet(ids["a.txt"]), tr)
        elif action == "unknown":
            send_packet(stream, dc.req_packet(len(listing.stats) + 50), tr)
        elif action == "directory":
            send_packet(stream, dc.req_packet(ids["dir"]), tr)
        elif action == "err":
            send_packet(stream, dc.err_packet("conformance receiver gave up (code 4410)"), tr)
        return finish(stream, CallOutcome(transcript=tr), 10.0, packets=True)

    def scenario(build):
        for action in ("duplicate", "unknown", "directory", "err"):
            seen[action] = one(build.session, action)
        seen["after"] = strict_transfer(open_diffcopy(build.session, "context"))
        return ScenarioResult()

    daemon, run = run_client(client, ctx, scenario)
    for action in ("duplicate", "unknown", "directory"):
        o = seen[action]
        expect("DIFFCOPY-REQ-3", o.code not in (None, StatusCode.OK), f"a {action} REQ fails the transfer",
               o.describe(), o.transcript)
    o = seen["err"]
    expect("DIFFCOPY-ERR-2", o.code not in (None, StatusCode.OK), "ERR from the receiver ends the call with an error",
           o.describe(), o.transcript)
    expect("DIFFCOPY-ERR-2", "4410" in o.details, "the status message carries the ERR text", o.details, o.transcript)
    expect("ERROR-1", seen["after"].ok, "later transfers on the session still work",
           seen["after"].violations or seen["after"].end.describe(), seen["after"].transcript)


@requirement("DIFFCOPY-DATA-5")
def test_file_that_cannot_be_read(client):
    _n_plus_1(client)
    ctx = make_context({"a.txt": "a", "gone.txt": "this file disappears after the listing"})
    seen = {}

    def vanish(listing):
        os.unlink(os.path.join(ctx, "gone.txt"))

    def scenario(build):
        seen["t"] = strict_transfer(open_diffcopy(build.session, "context"), before_reqs=vanish)
        return ScenarioResult()

    daemon, run = run_client(client, ctx, scenario)
    t = seen["t"]
    failed = t.end.code not in (None, StatusCode.OK) or any("ERR" in line for line in t.transcript)
    expect("DIFFCOPY-DATA-5", failed, "ERR (or an error status) instead of an empty file",
           f"contents {t.contents.get('gone.txt')!r}; {t.end.describe()}", t.transcript)


# -- metadata -----------------------------------------------------------------------------------

def _meta_context():
    ctx = make_context({"a.txt": "a", "b.log": "b", "keep.log": "k", "docs/readme.md": "r", "docs/keep/x.md": "x",
                        "docs/other/y.md": "y", "src/main.c": "m", "src/lib/util.c": "u", "src/lib/util.h": "h",
                        "sub/file.txt": "f", "日本/é.txt": "unicode"})
    outside = os.path.join(os.path.dirname(ctx), f"conf-outside-{os.path.basename(ctx)}.txt")
    with open(outside, "w") as fh:
        fh.write("SECRET OUTSIDE THE CONTEXT")
    os.symlink("sub", os.path.join(ctx, "link-to-sub"))
    os.symlink("../" + os.path.basename(outside), os.path.join(ctx, "out"))
    os.symlink(outside, os.path.join(ctx, "abs-out"))
    return ctx


META_CASES = {
    # name: (metadata options, expected paths)
    "include": ({"include_patterns": ["src/lib/*.c", "a.txt", "docs/keep"]},
                {"a.txt", "docs", "docs/keep", "docs/keep/x.md", "src", "src/lib", "src/lib/util.c"}),
    "exclude": ({"exclude_patterns": ["*.log", "!keep.log", "docs", "!docs/keep/x.md", "src/**/*.h", "日本"]},
                {"Dockerfile", "a.txt", "keep.log", "docs", "docs/keep", "docs/keep/x.md", "src", "src/main.c",
                 "src/lib", "src/lib/util.c", "sub", "sub/file.txt", "link-to-sub", "out", "abs-out"}),
    "followpaths": ({"followpaths": ["link-to-sub/file.txt", "Docker*", "nope/none.txt", "out", "abs-out"]},
                    {"Dockerfile", "link-to-sub", "sub", "sub/file.txt", "out", "abs-out"}),
    "non-ascii": ({"followpaths": ["日本/é.txt"]}, {"日本", "日本/é.txt"}),
}


@requirement("META-3", "META-4", "META-5", "META-7", "META-DECODE-1", "DIFFCOPY-ORDER-2", "SAFETY-5")
def test_metadata_filters(client):
    """The filters as the daemon of the client's generation sends them: raw UTF-8 from a generation n daemon,
    escaped with markers from a generation n+1 one (the non-ASCII cases then check the decoding)."""
    _n_plus_1(client)
    ctx = _meta_context()
    seen = {}

    def scenario(build):
        for name, (options, _) in META_CASES.items():  # non-ASCII last: a refusal must not hide the others
            seen[name] = strict_transfer(open_diffcopy(build.session, "context", **options))
        return ScenarioResult()

    daemon, run = run_client(client, ctx, scenario)
    rules = {"include": "META-3", "exclude": "META-4", "followpaths": "META-5", "non-ascii": "META-7"}
    for name, (options, expected) in META_CASES.items():
        t = seen[name]
        got = set(t.paths)
        values = [v for key in options.values() for v in key]
        rule = "META-DECODE-1" if client.generation == "n+1" and needs_encoding(values) else rules[name]
        expect(rule, t.ok and got == expected, f"exactly {sorted(expected)}",
               f"missing {sorted(expected - got)}, extra {sorted(got - expected)}; {t.violations or t.end.describe()}",
               t.transcript)
        expect("DIFFCOPY-ORDER-2", all(os.path.dirname(p) in ("",) or os.path.dirname(p) in
                                       t.paths[:t.paths.index(p)] for p in t.paths),
               "every parent directory before its entries", t.paths, t.transcript)
    for name in ("followpaths", "exclude"):
        t = seen[name]
        for link in ("out", "abs-out"):
            s = t.by_path.get(link)
            expect("SAFETY-5", s is not None and fm.is_symlink(s.mode), f"{link} sent as a symlink", s, t.transcript)
        leaked = [p for p, data in t.contents.items() if b"SECRET OUTSIDE" in data]
        expect("SAFETY-5", not leaked, "no content from outside the directory", leaked, t.transcript)


@requirement("META-8", "DIFFCOPY-ERR-1")
def test_unparsable_pattern_fails_the_transfer(client):
    _n_plus_1(client)
    ctx = make_context({"a.txt": "a", "b/c.txt": "c"})
    seen = {}

    def scenario(build):
        stream = open_diffcopy(build.session, "context", exclude_patterns=["a.txt", "[z-a"])
        o = CallOutcome()
        try:
            while (p := recv_packet(stream, 10.0, o.transcript)) is not None:
                o.messages.append(p.SerializeToString())
                if p.type == dc.PACKET_ERR:
                    # A receiver abandons the call on ERR: half-close and expect the error status.
                    o.transcript.append("< close send")
                    stream.close_send()
                    break
        except Exception:
            pass
        seen["t"] = finish(stream, o, 10.0, packets=True) if o.code is None else o
        return ScenarioResult()

    daemon, run = run_client(client, ctx, scenario)
    o = seen["t"]
    listed = [line for line in o.transcript if line.startswith("> STAT '")]
    expect("META-8", o.code not in (None, StatusCode.OK), "the call fails with an error status", o.describe(),
           o.transcript)
    expect("META-8", not any("a.txt" in line for line in listed) and not
           any("end of listing" in line for line in o.transcript), "no unfiltered tree", listed, o.transcript)
    expect("DIFFCOPY-ERR-1", any(line.startswith("> ERR") for line in o.transcript),
           "an ERR packet with the reason before the error status", o.transcript[-3:], o.transcript)


# -- metadata escaping (generation n+1 daemons; generation n clients meet them in real skew) -------------

ESCAPING_FILES = {"a.txt": "a", "keep.log": "k", "drop.log": "d", "日本/keep.txt": "k", "日本/x.txt": "x",
                  "ünï.txt": "u", "a b.txt": "space", "a+b.txt": "plus", "100%.txt": "percent",
                  "100%25.txt": "literal escape", "sub/c.txt": "c"}


def _escaped(values: list[str]) -> list[str]:
    return [query_escape(v) for v in values]


ESCAPING_CASES = {
    # name: (metadata exactly as sent, expected paths, decoded?)
    # dockerd 26.1's escaping of a .dockerignore with non-ASCII lines, plus a malformed escape (BuildKit: "")
    "marked-excludes": (
        [("dir-name", "context")]
        + [("exclude-patterns", v) for v in _escaped(["*.log", "!keep.log", "日本/*", "!日本/keep.txt", "a b.txt"])]
        + [("exclude-patterns", "%zz"), ("exclude-patterns-encoded", "1")],
        {"Dockerfile", "a.txt", "keep.log", "日本", "日本/keep.txt", "ünï.txt", "a+b.txt", "100%.txt", "100%25.txt",
         "sub", "sub/c.txt"}, True),
    # non-ASCII COPY sources: '+' is a space, %25 is '%'; the literal names exist too, to catch a client that
    # takes the values as sent
    "marked-followpaths": (
        [("dir-name", "context")] + [("followpaths", v) for v in _escaped(["ünï.txt", "a b.txt", "100%.txt"])]
        + [("followpaths-encoded", "true")],
        {"ünï.txt", "a b.txt", "100%.txt"}, True),
    # every key is decoded when marked, dir-name included
    "marked-dir-name": (
        [("dir-name", "conte%78t"), ("dir-name-encoded", "T"), ("followpaths", "a.txt")], {"a.txt"}, True),
    # no marker: values are taken as sent, '%' and '+' included
    "unmarked": (
        [("dir-name", "context"), ("followpaths", "a+b.txt"), ("followpaths", "100%25.txt")],
        {"a+b.txt", "100%25.txt"}, False),
    # a marker that is not a Go true, and a marker of another key, decode nothing
    "false-or-foreign-marker": (
        [("dir-name", "context"), ("followpaths", "a+b.txt"), ("followpaths", "100%25.txt"),
         ("followpaths-encoded", "no"), ("exclude-patterns", "a%2Bb.txt"), ("include-patterns-encoded", "1")],
        {"a+b.txt", "100%25.txt"}, False),
}

_escaping_runs: dict = {}


def escaping_run(client) -> dict:
    """One client run with every ESCAPING_CASES transfer, shared by the two tests below (per client)."""
    if client.spec in _escaping_runs:
        redeclare_profiles(_escaping_runs[client.spec]["profiles"])
        return _escaping_runs[client.spec]
    ctx = make_context(ESCAPING_FILES)
    seen = {}

    def scenario(build):
        for name, (metadata, _, _) in ESCAPING_CASES.items():
            seen[name] = strict_transfer(open_diffcopy(build.session, None, raw_metadata=metadata))
        return ScenarioResult()

    try:
        daemon, run = run_client(client, ctx, scenario)
    finally:
        shutil.rmtree(ctx, ignore_errors=True)
    seen["run"] = run
    seen["profiles"] = declared_profiles()
    _escaping_runs[client.spec] = seen
    return seen


def _check_escaping(client, decoded: bool) -> None:
    _n_plus_1(client)
    seen = escaping_run(client)
    for name, (metadata, expected, marked) in ESCAPING_CASES.items():
        if marked != decoded:
            continue
        t = seen[name]
        got = set(t.paths)
        sent = ", ".join(f"{k}: {v}" for k, v in metadata)
        expect("META-DECODE-1", t.ok and got == expected, f"{name} ({sent}): exactly {sorted(expected)}",
               f"missing {sorted(expected - got)}, extra {sorted(got - expected)}; {t.violations or t.end.describe()}",
               t.transcript)
    expect("META-DECODE-1", seen["run"].returncode == 0, "the build succeeds", seen["run"].output[-2000:])


@requirement("META-DECODE-1")
def test_marked_metadata_is_decoded(client):
    """Values of a key whose `<key>-encoded` marker is a Go true are unescaped (QueryUnescape)."""
    _check_escaping(client, decoded=True)


@requirement("META-DECODE-1")
def test_unmarked_metadata_is_taken_as_sent(client):
    """Without a true marker for its own key, a value is used as sent, even with '%' or '+'."""
    _check_escaping(client, decoded=False)


@requirement("NEGOTIATE-3")
def test_forced_stream_protocol_refuses_the_other(client):
    if reason := not_applicable_reason("NEGOTIATE-3", client.generation):
        pytest.skip(f"not applicable: {reason}")
    other, method = ("diffcopy", TARSTREAM) if client.generation == "n-1" else ("tarstream", dc_method())
    seen = {}

    def scenario(build):
        md = [] if client.generation == "n-1" else [("dir-name", "context")]
        stream = build.session.conn.open_stream(method, md)
        if method == TARSTREAM:
            stream.close_send()
        o = CallOutcome()
        try:  # the first message (or the end of the call) decides
            first = stream.recv(timeout=5.0)
            if first is None:
                o.code = StatusCode.OK
            else:
                o.messages.append(first)
                stream.cancel()
        except RpcError as exc:
            o.code, o.details = exc.code, exc.details
        except TimeoutError:
            stream.cancel()
        seen["o"] = o
        return ScenarioResult()

    daemon, run = run_client(client, make_context({"a.txt": "a"}), scenario, env={"BUILD_STREAM_PROTOCOL": other})
    o = seen["o"]
    expect("NEGOTIATE-3", o.code not in (None, StatusCode.OK) and not o.messages,
           f"with BUILD_STREAM_PROTOCOL={other}, {method} fails before sending anything", o.describe())


def dc_method() -> str:
    return "/moby.filesync.v1.FileSync/DiffCopy"


# -- generation n-1: TarStream and the client's own .dockerignore -----------------------------------

DOCKERIGNORE = ("\ufeffbom.txt\n"
                "# comment line\n"
                "  *.log  \n"
                "\n"
                "!keep.log\n"
                "/secret\n"
                "docs/./tmp/../drafts\n"
                "#not-a-comment-only-if-first\n")  # a comment: the file of that name stays
TAR_FILES = {"bom.txt": "excluded only if the BOM is dropped", "a.txt": "a", "b.log": "b", "keep.log": "k", "secret/key": "s", "docs/drafts/d.md": "d",
             "docs/final.md": "f", "#not-a-comment-only-if-first": "h"}
TAR_EXPECTED = {"Dockerfile", ".dockerignore", "a.txt", "keep.log", "docs", "docs/final.md",
                "#not-a-comment-only-if-first"}


def _tar_members(outcome: CallOutcome) -> tuple[dict[str, tarfile.TarInfo], dict[str, bytes], str | None]:
    raw = b"".join(filesync_pb2.BytesMessage.FromString(m).data for m in outcome.messages)
    members, contents = {}, {}
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
            for info in tar:
                members[info.name.rstrip("/")] = info
                if info.isreg():
                    contents[info.name] = tar.extractfile(info).read()
    except tarfile.TarError as exc:
        return members, contents, f"{type(exc).__name__}: {exc}"
    return members, contents, None


@requirement("TARSTREAM-1", "TARSTREAM-2", "DOCKERIGNORE-3", "DOCKERIGNORE-4")
def test_tarstream_sends_the_filtered_directory(client):
    _n(client)
    ctx = make_context({**TAR_FILES, ".dockerignore": DOCKERIGNORE.encode("utf-8")})
    seen = {}

    def scenario(build):
        stream = build.session.conn.open_stream(TARSTREAM, [])
        stream.close_send()
        seen["o"] = finish(stream, CallOutcome(), 20.0)
        return ScenarioResult()

    daemon, run = run_client(client, ctx, scenario)
    o = seen["o"]
    expect("TARSTREAM-1", o.ok and o.messages, "BytesMessages, then status OK", o.describe())
    first = filesync_pb2.BytesMessage.FromString(o.messages[0]).data if o.messages else b""
    expect("TARSTREAM-1", first[:2] != b"\x1f\x8b", "an uncompressed archive", first[:8])
    members, contents, error = _tar_members(o)
    expect("TARSTREAM-1", error is None, "a well-formed tar", error)
    names = set(members)
    bad = [n for n in names if n.startswith("/") or ".." in n.split("/")]
    expect("TARSTREAM-2", not bad, "relative member names", bad)
    expect("DOCKERIGNORE-4", names == TAR_EXPECTED, f"exactly {sorted(TAR_EXPECTED)} after .dockerignore",
           f"missing {sorted(TAR_EXPECTED - names)}, extra {sorted(names - TAR_EXPECTED)}")
    expect("DOCKERIGNORE-3", "#not-a-comment-only-if-first" in names and "bom.txt" not in names
           and "keep.log" in names and "secret" not in names and "docs/drafts" not in names,
           "comments, BOM, trimming, ! and a leading / handled", sorted(names))
    expect("TARSTREAM-2", contents.get("a.txt") == b"a", "file contents", contents.get("a.txt"))


@requirement("META-6")
def test_own_excludes_win_unless_overridden(client):
    if client.generation != "n-1":
        pytest.skip("only a generation n-1 client keeps exclude patterns of its own (the docker CLI 20.10 has none)")
    ctx = make_context({"a.txt": "a", "b.log": "b", "c.md": "c", ".dockerignore": "*.log\n"})
    seen = {}

    def scenario(build):
        for name, md in (("plain", [("exclude-patterns", "*.md")]),
                         ("override", [("exclude-patterns", "*.md"), ("override-excludes", "true")])):
            stream = build.session.conn.open_stream(TARSTREAM, md)
            stream.close_send()
            seen[name] = finish(stream, CallOutcome(), 20.0)
        return ScenarioResult()

    daemon, run = run_client(client, ctx, scenario)
    plain = set(_tar_members(seen["plain"])[0])
    override = set(_tar_members(seen["override"])[0])
    expect("META-6", "b.log" not in plain and "c.md" in plain, "the client's own patterns (*.log) apply",
           sorted(plain))
    expect("META-6", "b.log" in override and "c.md" not in override,
           "with override-excludes=true the daemon's patterns (*.md) apply", sorted(override))
