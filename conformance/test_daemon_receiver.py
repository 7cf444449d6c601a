"""Daemon role as the FileSync receiver: adversarial and exotic `context` listings.

The suite plays the client; only the main `context` transfer is scripted (the
Dockerfile is served normally). Where the result matters, the build exports
`FROM scratch` + `COPY . /` back with a local output, so the tree the daemon
wrote can be compared with what was sent.
"""

from __future__ import annotations

import os
import stat as st
import tempfile
import time

import h11
import pytest

from reference import diffcopy as dc
from reference.client.services import FILESYNC_DIFFCOPY
from reference.paths import path_sort_key
from reference.pb.fsutil_types_pb2 import Packet, Stat

from .harness.daemon_probes import (
    FIFO_MODE, MODE_CHAR_DEVICE, Entry, MODE_DEVICE, MODE_SETGID, MODE_SETUID, MODE_STICKY, FileSyncRouter, SenderLog,
    dir_entry, file_entry, interactive_sender, shell_image, start_private_reference_daemon, symlink_entry, tree_of,
)
from .harness.scripted_client import DIR_MODE, BuildObservation, make_context, run_build, scripted_sender
from .outcomes import expect

requirement = pytest.mark.requirement
MiB = 1 << 20


def needs_n_plus_1(daemon) -> None:
    if daemon.generation == "n-1":
        pytest.skip("DiffCopy listings are generation n and later; the target is generation n-1")


def run_scripted(daemon, handler, *, output: str | None = None, timeout: float = 30.0, hang_timeout: float = 10.0,
                 host: str | None = None, shared_key: str | None = None):
    ctx = make_context({})
    router = FileSyncRouter(ctx, handler)
    # with an output, no cache: COPY is keyed by content only, and a cached layer carries another build's times
    try:
        obs = run_build(host or daemon.host, ctx, handler_overrides={FILESYNC_DIFFCOPY: router},
                        output=("local", output) if output else None, timeout=timeout, hang_timeout=hang_timeout,
                        query={"nocache": "1"} if output else None, shared_key=shared_key)
    except h11.RemoteProtocolError as exc:  # the daemon went away in the middle of the /build response
        return BuildObservation(False, None, f"/build response cut off: {exc}", 0.0, [], [], [])
    scripted = [c for c in router.calls if c.scripted]
    assert scripted, f"harness: the daemon never opened the context transfer: {obs.describe()}"
    return obs


def run_packets(daemon, packets: list[Packet], *, then_wait: float = 2.0, answer_fin: bool = False):
    transcript: list[str] = []
    obs = run_scripted(daemon, scripted_sender(packets, then_wait=then_wait, answer_fin=answer_fin,
                                               transcript=transcript))
    return obs, transcript


def accepted_listing(transcript: list[str], offending_id: int | None = None) -> bool:
    """The daemon treated the listing as valid: it sent FIN, or requested the offending entry.
    (A REQ for an earlier, valid file may race ahead of the rejection.)"""
    return "< FIN" in transcript or (offending_id is not None and f"< REQ {offending_id}" in transcript)


def S(path: str, mode: int = 0o644, **kw) -> Packet:
    return dc.stat_packet(Stat(path=path, mode=mode, **kw))


D = DIR_MODE
END = dc.end_of_listing()
LINK = 0x08000000 | 0o777


# -- validation: order, paths, hardlinks ----------------------------------------------------

ORDER_CASES = {
    "unsorted": ([S("b"), S("a")], "a"),
    "duplicate": ([S("a"), S("a")], "a"),
    "missing-parent": ([S("d/x")], "d/x"),
    "child-of-file": ([S("f"), S("f/x")], "f/x"),
    "child-of-symlink": ([S("s", LINK, linkname="/"), S("s/x")], "s/x"),
    "back-to-closed-dir": ([S("d", D), S("d/x"), S("e", D), S("d/y")], "d/y"),
    "dot-sorts-before-slash": ([S("a", D), S("a.b"), S("a/c")], "a/c"),
}


@requirement("VALIDATE-ORDER-1", "VALIDATE-1", "ERROR-2")
@pytest.mark.parametrize("case", list(ORDER_CASES))
def test_listing_out_of_order_is_rejected(daemon, case):
    needs_n_plus_1(daemon)
    stats, offending = ORDER_CASES[case]
    started = time.monotonic()
    obs, transcript = run_packets(daemon, stats + [END])
    expect("VALIDATE-ORDER-1", not obs.ok and not accepted_listing(transcript, len(stats) - 1),
           "the listing is rejected (no REQ, no FIN) and the build fails", obs.describe(), transcript)
    expect("VALIDATE-1", offending in (obs.error or ""), f"the error names the offending path {offending!r}",
           obs.error, transcript)
    expect("VALIDATE-ORDER-1", time.monotonic() - started < 5.0, "rejected at once, not after a timeout",
           f"{time.monotonic() - started:.1f} s", transcript)


PATH_CASES = {
    "VALIDATE-PATH-1": ["", "./a", "a/", "a//b", "a/./b", "a/../b"],
    "VALIDATE-PATH-2": ["/x", "../x", "../../etc/x"],
    "VALIDATE-PATH-4": ["a\x00b"],
}


@requirement("VALIDATE-PATH-1", "VALIDATE-PATH-2", "VALIDATE-PATH-4", "VALIDATE-1")
@pytest.mark.parametrize("req_id, path", [(r, p) for r, ps in PATH_CASES.items() for p in ps],
                         ids=[f"{r}-{p!r}" for r, ps in PATH_CASES.items() for p in ps])
def test_bad_path_is_rejected(daemon, req_id, path):
    needs_n_plus_1(daemon)
    obs, transcript = run_packets(daemon, [S(path, 0o644, size=0), END])
    expect(req_id, not obs.ok and not accepted_listing(transcript, 0),
           f"a STAT with path {path!r} is rejected (no REQ, no FIN) and fails the build", obs.describe(), transcript)
    shown = path.replace("\x00", "")
    if shown and req_id != "VALIDATE-PATH-4":
        expect("VALIDATE-1", shown in (obs.error or "") or path in (obs.error or ""),
               "the error names the offending path", obs.error, transcript)


HARDLINK_CASES = {
    "unknown-target": [S("h", linkname="nowhere")],
    "later-target": [S("a", linkname="b"), S("b")],
    "through-symlink": [S("d", D), S("d/x"), S("s", LINK, linkname="d"), S("t", linkname="s/x")],
    "to-directory": [S("d", D), S("h", linkname="d")],
    "to-symlink": [S("l", LINK, linkname="x"), S("m", linkname="l")],
    "to-hardlink-entry": [S("a"), S("b", linkname="a"), S("c", linkname="b")],
    "absolute-target": [S("h", linkname="/etc/hostname")],
}


@requirement("HARDLINK-1", "VALIDATE-1")
@pytest.mark.parametrize("case", list(HARDLINK_CASES))
def test_bad_hardlink_target_is_rejected(daemon, case):
    needs_n_plus_1(daemon)
    obs, transcript = run_packets(daemon, HARDLINK_CASES[case] + [END])
    expect("HARDLINK-1", not obs.ok and not accepted_listing(transcript),
           "the listing is rejected (no REQ, no FIN) and the build fails", obs.describe(), transcript)


@requirement("DIFFCOPY-LIST-2")
def test_present_but_empty_stat_is_not_the_end_of_listing(daemon):
    needs_n_plus_1(daemon)
    empty = Packet(type=dc.PACKET_STAT)
    empty.stat.SetInParent()
    obs, transcript = run_packets(daemon, [S("a"), empty])
    expect("DIFFCOPY-LIST-2", not obs.ok and not accepted_listing(transcript), "a present-but-empty stat is an entry with path \"\" and fails",
           obs.describe(), transcript)


# -- IDs, requests and data -----------------------------------------------------------------

def _listing_with_all_types():
    return [
        dir_entry("d"),
        file_entry("d/f", b"in d\n"),
        symlink_entry("d/l", "f"),
        file_entry("d/z", b"zzz" * 1000),
        file_entry("empty", b""),
        file_entry("g", b"g content"),
        file_entry("hard", b"g content", linkname="g"),
        symlink_entry("up", "../outside"),
    ]


@requirement("DIFFCOPY-REQ-1", "DIFFCOPY-REQ-2", "DIFFCOPY-FIN-1", "DIFFCOPY-PACKET-1", "DIFFCOPY-PACKET-2")
def test_requests_only_regular_files_by_listing_position(daemon):
    needs_n_plus_1(daemon)
    entries = _listing_with_all_types()
    log = SenderLog()
    dest = tempfile.mkdtemp(prefix="conf-out-")
    obs = run_scripted(daemon, interactive_sender(entries, log=log), output=dest)
    expect("DIFFCOPY-FIN-1", obs.ok, "the build succeeds", obs.describe(), log.transcript)
    regular = {i for i, e in enumerate(entries) if not e.stat.mode & 0x8F280000 and not e.stat.linkname}
    requested = log.requested
    expect("DIFFCOPY-REQ-2", len(requested) == len(set(requested)), "no ID requested twice", requested,
           log.transcript)
    expect("DIFFCOPY-REQ-2", set(requested) <= regular, f"only regular, non-hardlink IDs {sorted(regular)}",
           requested, log.transcript)
    expect("DIFFCOPY-REQ-1", set(requested) == regular, "every new regular file requested by its position",
           requested, log.transcript)
    fins = [line for line in log.transcript if line == "< FIN"]
    expect("DIFFCOPY-FIN-1", len(fins) == 1, "exactly one FIN", len(fins), log.transcript)
    last_eof = max(i for i, line in enumerate(log.transcript) if line.endswith("<eof>"))
    first_fin = log.transcript.index("< FIN")
    expect("DIFFCOPY-FIN-1", first_fin > last_eof, "FIN only after every requested file ended", log.transcript)
    tree = tree_of(dest)
    expect("DIFFCOPY-PACKET-1", tree.get("d/z", (None,))[-1] == b"zzz" * 1000 and tree.get("empty", ())[-1:] == (b"",),
           "file contents arrive as sent", {k: v for k, v in tree.items() if k in ("d/z", "empty")}, log.transcript)


@requirement("DIFFCOPY-DATA-3", "DIFFCOPY-DATA-4")
def test_large_chunks_interleaved_with_eofs_in_any_order(daemon):
    needs_n_plus_1(daemon)
    blobs = {name: os.urandom(2 * MiB + 12345) for name in ("a", "b", "c")}
    entries = [file_entry(name, data) for name, data in blobs.items()]
    log = SenderLog()
    dest = tempfile.mkdtemp(prefix="conf-out-")
    obs = run_scripted(daemon, interactive_sender(entries, log=log, chunk_size=MiB, interleave=True,
                                                  eof_order_reversed=True), output=dest)
    expect("DIFFCOPY-DATA-3", obs.ok, "1 MiB chunks, interleaved, ends of file in reverse order are accepted",
           obs.describe(), log.transcript)
    tree = tree_of(dest)
    for name, data in blobs.items():
        got = tree.get(name, ("missing",))[-1]
        expect("DIFFCOPY-DATA-4", got == data, f"{name} is the concatenation of its chunks",
               f"{len(got) if isinstance(got, bytes) else got} bytes", log.transcript)


@requirement("DIFFCOPY-DATA-4", "STAT-TIME-2")
def test_content_ignores_size_field_and_mtime_is_applied(daemon):
    needs_n_plus_1(daemon)
    mtime = 1_234_567_890_123_456_789
    entries = [Entry_(file_entry("liar", b"0123456789", mtime_ns=mtime), size=3),
               symlink_entry("link", "plain", mtime_ns=mtime + 2000),
               file_entry("plain", b"x", mtime_ns=mtime + 1000)]
    log = SenderLog()
    dest = tempfile.mkdtemp(prefix="conf-out-")
    obs = run_scripted(daemon, interactive_sender(entries, log=log), output=dest)
    expect("DIFFCOPY-DATA-4", obs.ok, "the build succeeds", obs.describe(), log.transcript)
    tree = tree_of(dest)
    expect("DIFFCOPY-DATA-4", tree.get("liar", (None,))[-1] == b"0123456789",
           "the file holds every byte sent, whatever `size` said", tree.get("liar"), log.transcript)
    times = {name: os.lstat(os.path.join(dest, name)).st_mtime_ns for name in ("liar", "plain", "link")}
    wanted = {"liar": mtime, "plain": mtime + 1000, "link": mtime + 2000}
    expect("DIFFCOPY-DATA-4", times["liar"] == wanted["liar"] and times["plain"] == wanted["plain"],
           "regular files carry the STAT's modTime (after the data)", times, log.transcript)
    expect("STAT-TIME-2", times["link"] == wanted["link"], "a symlink carries its own modTime", times,
           log.transcript)


def Entry_(entry, *, size: int):
    entry.stat.size = size
    return entry


@requirement("DIFFCOPY-DATA-3", "ERROR-2")
@pytest.mark.parametrize("case", ["unrequested-id", "directory-id", "after-eof"])
def test_bad_data_packets_fail_the_transfer(daemon, case):
    needs_n_plus_1(daemon)
    if case == "unrequested-id":
        obs, transcript = run_packets(daemon, [S("a", size=1), END, dc.data_packet(7, b"x")])
    elif case == "directory-id":
        obs, transcript = run_packets(daemon, [S("d", D), END, dc.data_packet(0, b"x")])
    else:
        entries = [file_entry("a", b"a" * 10), file_entry("b", b"b" * 10)]
        log = SenderLog()
        obs = run_scripted(daemon, interactive_sender(entries, log=log, interleave=True,
                                                      after_first_eof=lambda ended: [dc.data_packet(ended, b"late")]))
        transcript = log.transcript
    expect("DIFFCOPY-DATA-3", not obs.ok, f"DATA for {case} fails the transfer", obs.describe(), transcript)


@requirement("DIFFCOPY-FIN-1")
def test_call_ending_without_sender_fin_fails(daemon):
    needs_n_plus_1(daemon)
    log = SenderLog()
    obs = run_scripted(daemon, interactive_sender([file_entry("a", b"a")], log=log, answer_fin=False))
    expect("DIFFCOPY-FIN-1", not obs.ok, "a call that ends before the sender's FIN is a failed transfer",
           obs.describe(), log.transcript)


@requirement("DIFFCOPY-FIN-1")
def test_call_ending_before_end_of_listing_fails(daemon):
    needs_n_plus_1(daemon)
    obs, transcript = run_packets(daemon, [S("a")], then_wait=0.0)
    expect("DIFFCOPY-FIN-1", not obs.ok, "a call that ends in the middle of the listing fails the build",
           obs.describe(), transcript)


@requirement("DIFFCOPY-FIN-3")
@pytest.mark.slow
def test_early_fin_fails_at_once(daemon):
    needs_n_plus_1(daemon)
    log = SenderLog()
    started = time.monotonic()
    obs = run_scripted(daemon, interactive_sender([file_entry("a", b"a")], log=log, fin_early=True,
                                                  hold_open_after_fin=5.0))
    took = time.monotonic() - started
    expect("DIFFCOPY-FIN-3", not obs.ok and took < 4.0, "a FIN before the receiver's fails the transfer at once",
           f"{obs.describe()} after {took:.1f} s", log.transcript)


@requirement("DIFFCOPY-ERR-2", "ERROR-2")
def test_sender_err_fails_the_build_with_its_text(daemon):
    needs_n_plus_1(daemon)
    text = "disk on fire 7f3a"
    obs, transcript = run_packets(daemon, [S("a", size=1), dc.err_packet(text)])
    expect("DIFFCOPY-ERR-2", not obs.ok, "the build fails", obs.describe(), transcript)
    expect("ERROR-2", text in (obs.error or ""), "the build error carries the ERR text", obs.error, transcript)


@requirement("DIFFCOPY-PACKET-2")
def test_unknown_fields_are_skipped(daemon):
    needs_n_plus_1(daemon)
    unknown = b"\xa0\x01\x05"  # field 20, varint 5

    def encode(stat: Stat) -> bytes:
        inner = stat.SerializeToString() + unknown
        return b"\x12" + _varint(len(inner)) + inner + b"\x78\x01"  # + unknown Packet field 15

    log = SenderLog()
    dest = tempfile.mkdtemp(prefix="conf-out-")
    obs = run_scripted(daemon, interactive_sender([file_entry("a", b"hello")], log=log, encode_stat=encode),
                       output=dest)
    expect("DIFFCOPY-PACKET-2", obs.ok and tree_of(dest).get("a", (None,))[-1] == b"hello",
           "unknown fields in Packet and Stat are skipped", obs.describe(), log.transcript)


def _varint(n: int) -> bytes:
    out = b""
    while True:
        byte = n & 0x7F
        n >>= 7
        out += bytes([byte | (0x80 if n else 0)])
        if not n:
            return out


# -- modes and types -------------------------------------------------------------------------

@requirement("STAT-MODE-3", "STAT-TIME-2", "DIFFCOPY-REQ-2")
def test_entries_are_created_as_their_mode_says(daemon):
    needs_n_plus_1(daemon)
    t = 1_500_000_000_000_000_000
    entries = [
        dir_entry("d", mode=DIR_MODE | MODE_SETGID | 0o775),
        file_entry("d/suid", b"#!", mode=MODE_SETUID | 0o755, mtime_ns=t),
        symlink_entry("rel", "../../x/./y", mtime_ns=t),
        symlink_entry("abs", "/etc/passwd", mtime_ns=t),
        dir_entry("sticky", mode=DIR_MODE | MODE_STICKY | 0o777),
        file_entry("x", b"x", mode=0o600),
        file_entry("y", b"x", mode=0o600, linkname="x"),
    ]
    entries.sort(key=lambda e: path_sort_key(e.stat.path))
    log = SenderLog()
    dest = tempfile.mkdtemp(prefix="conf-out-")
    obs = run_scripted(daemon, interactive_sender(entries, log=log), output=dest)
    expect("STAT-MODE-3", obs.ok, "the build succeeds", obs.describe(), log.transcript)
    tree = tree_of(dest)
    info = {name: os.lstat(os.path.join(dest, name)) for name in tree}
    checks = {
        "d": lambda i: st.S_ISDIR(i.st_mode) and i.st_mode & 0o7777 == 0o2775,
        "d/suid": lambda i: st.S_ISREG(i.st_mode) and i.st_mode & 0o7777 == 0o4755,
        "rel": lambda i: tree["rel"] == ("symlink", "../../x/./y"),
        "abs": lambda i: tree["abs"] == ("symlink", "/etc/passwd"),
        "sticky": lambda i: st.S_ISDIR(i.st_mode) and i.st_mode & 0o7777 == 0o1777,
        "y": lambda i: i.st_ino == info["x"].st_ino,
    }
    bad = {name: (oct(info[name].st_mode) if name in info else "missing") for name, ok in checks.items()
           if name not in info or not ok(info[name])}
    expect("STAT-MODE-3", not bad, "every entry has its type, permissions and special bits", bad, log.transcript)
    expect("DIFFCOPY-REQ-2", sorted(log.requested) == sorted(i for i, e in enumerate(entries)
                                                             if e.stat.path in ("d/suid", "x")),
           "only the two regular files requested (not the hardlink)", log.requested, log.transcript)
    expect("STAT-TIME-2", info["abs"].st_mtime_ns == t and info["d/suid"].st_mtime_ns == t,
           "symlinks and files carry modTime", (info["abs"].st_mtime_ns, info["d/suid"].st_mtime_ns),
           log.transcript)


@requirement("STAT-MODE-3", "STAT-DEV-1", "DIFFCOPY-REQ-2")
def test_devices_and_fifos(daemon):
    """What the daemon's receiver made of a FIFO, a block and a character device, seen by a RUN step
    with the context bind-mounted: COPY and the export are not the receiver (dockerd 26.1's COPY turns a
    block device into a character device, 20.10's into an empty file)."""
    needs_n_plus_1(daemon)
    shell = shell_image(daemon)  # UNSUPPORTED for a daemon that runs no RUN steps (the reference daemon)
    entries = [Entry(Stat(path="fifo", mode=FIFO_MODE, modTime=5)),
               Entry(Stat(path="loop", mode=MODE_DEVICE | 0o660, devmajor=7, devminor=300, modTime=5)),
               Entry(Stat(path="null", mode=MODE_DEVICE | MODE_CHAR_DEVICE | 0o666, devmajor=1, devminor=3,
                          modTime=5))]
    dockerfile = (f"FROM {shell} AS probe\n"
                  "RUN --mount=type=bind,target=/c stat -c '%n|%F|%t|%T|%a' /c/fifo /c/loop /c/null > /seen.txt "
                  "2>&1; true\n"
                  "FROM scratch\nCOPY --from=probe /seen.txt /\n")
    ctx = make_context({}, dockerfile=dockerfile)
    log = SenderLog()
    router = FileSyncRouter(ctx, interactive_sender(entries, log=log))
    dest = tempfile.mkdtemp(prefix="conf-out-")
    obs = run_build(daemon.host, ctx, handler_overrides={FILESYNC_DIFFCOPY: router}, output=("local", dest),
                    query={"nocache": "1", "networkmode": "none"}, timeout=60, hang_timeout=10)
    expect("STAT-MODE-3", obs.ok, "the build succeeds", obs.describe(), log.transcript)
    expect("DIFFCOPY-REQ-2", not log.requested, "devices and FIFOs are never requested", log.requested,
           log.transcript)
    with open(os.path.join(dest, "seen.txt")) as fh:
        lines = fh.read().splitlines()
    seen = {}
    for line in lines:
        parts = line.split("|")
        if len(parts) == 5:
            seen[parts[0].rsplit("/", 1)[-1]] = (parts[1], int(parts[2], 16), int(parts[3], 16), int(parts[4], 8))
    transcript = log.transcript + [f"stat in the RUN step: {line}" for line in lines]
    expect("STAT-MODE-3", seen.get("fifo", ("",))[0] == "fifo" and seen["fifo"][3] == 0o644, "a FIFO, mode 644",
           seen.get("fifo"), transcript)
    expect("STAT-MODE-3", seen.get("null", ("",))[0] == "character special file" and seen["null"][3] == 0o666,
           "a character device, mode 666", seen.get("null"), transcript)
    expect("STAT-MODE-3", seen.get("loop", ("",))[0] == "block special file" and seen["loop"][3] == 0o660,
           "a block device, mode 660", seen.get("loop"), transcript)
    expect("STAT-DEV-1", seen["null"][1:3] == (1, 3), "character device 1,3", seen["null"], transcript)
    expect("STAT-DEV-1", seen["loop"][1:3] == (7, 300), "block device 7,300", seen["loop"], transcript)


ODD_MODES = {
    "unix-dir-bits": 0o40755,
    "unix-file-bits": 0o100644,
    "setuid-unix-bit": 0o4755,
    "mode-append": 0x40000000 | 0o644,
    "mode-socket": 0x01000000 | 0o644,
    "chardev-without-device": MODE_CHAR_DEVICE | 0o644,
    "dir-and-symlink": DIR_MODE | 0x08000000,
}


@requirement("STAT-MODE-4")
@pytest.mark.slow
def test_modes_no_go_sender_produces_are_rejected(daemon):
    needs_n_plus_1(daemon)
    accepted, transcript = [], []
    for case, mode in ODD_MODES.items():
        log = SenderLog()
        obs = run_scripted(daemon, interactive_sender([file_entry("odd", b"", mode=mode)], log=log))
        transcript.append(f"{case} ({mode:#o}): {'accepted' if obs.ok else obs.error}")
        if obs.ok:
            accepted.append(case)
    expect("STAT-MODE-4", not accepted, "every mode no Linux Go sender produces is rejected",
           f"accepted: {accepted}", transcript)


# -- safety ------------------------------------------------------------------------------------

@pytest.fixture
def host_probe():
    """A directory on the daemon's host that hostile listings aim at (both targets run locally)."""
    root = tempfile.mkdtemp(prefix="conf-victim-", dir="/tmp")
    victim = os.path.join(root, "victim")
    with open(victim, "wb") as fh:
        fh.write(b"original")
    os.chmod(victim, 0o640)
    os.utime(victim, ns=(1_000_000_000, 1_000_000_000))
    yield root
    import shutil

    shutil.rmtree(root, ignore_errors=True)


def _host_state(root: str) -> dict:
    victim = os.lstat(os.path.join(root, "victim"))
    return {"entries": sorted(os.listdir(root)), "victim": (victim.st_mode, victim.st_uid, victim.st_nlink,
                                                           victim.st_mtime_ns, open(os.path.join(root, "victim"), "rb").read())}


@requirement("SAFETY-1", "SAFETY-2")
@pytest.mark.parametrize("case", ["write-through-symlink", "hardlink-to-host-file", "absolute-file",
                                  "metadata-through-symlink"])
def test_hostile_listing_touches_nothing_outside(daemon, host_probe, case):
    needs_n_plus_1(daemon)
    before = _host_state(host_probe)
    victim = os.path.join(host_probe, "victim")
    if case == "write-through-symlink":
        packets = [S("s", LINK, linkname=host_probe), S("s/new", size=1), END]
    elif case == "hardlink-to-host-file":
        packets = [S("h", 0o777, linkname=victim), S("i", 0o777, linkname="../" * 30 + victim.lstrip("/")), END]
    elif case == "absolute-file":
        packets = [S(os.path.join(host_probe, "new"), size=1), END]
    else:
        # the link itself gets owner, mode and time: the target must keep its own
        packets = [S("l", LINK | 0o777, linkname=victim, uid=4321, gid=4321, modTime=5), END]
    # FIN is answered: a daemon that accepts the listing completes the transfer and applies all of it
    obs, transcript = run_packets(daemon, packets, then_wait=1.5, answer_fin=True)
    after = _host_state(host_probe)
    req = "SAFETY-2" if case == "metadata-through-symlink" else "SAFETY-1"
    expect(req, after == before, "nothing outside the destination changed", {"before": before, "after": after},
           transcript + [obs.describe()])


DESTRUCTIVE_CASES = {
    "dotdot-dir": ("VALIDATE-PATH-3", [S("..", DIR_MODE | 0o700, modTime=1)]),
    "dot-dir": ("SAFETY-3", [S(".", DIR_MODE | 0o700, modTime=1)]),
    "dot-symlink": ("SAFETY-3", [S(".", LINK, linkname="/nonexistent-conf-target")]),
    "dotdot-file": ("VALIDATE-PATH-3", [S("..", 0o644, size=0)]),
}


@requirement("VALIDATE-PATH-3", "SAFETY-3", "SAFETY-4")
@pytest.mark.destructive
@pytest.mark.parametrize("case", list(DESTRUCTIVE_CASES))
def test_bare_dot_and_dotdot_are_rejected_and_daemon_survives(daemon, case):
    needs_n_plus_1(daemon)
    req_id, stats = DESTRUCTIVE_CASES[case]
    # a sender that completes the exchange (answers REQ and FIN), so an accepting daemon goes on to use the copy
    log = SenderLog()
    obs = run_scripted(daemon, interactive_sender([Entry(p.stat) for p in stats], log=log, timeout=8.0))
    transcript = log.transcript
    # dockerd 20.10.24 dies 2.5-3.4 s after such a listing: give it time to show (DaemonTiming.survival_window)
    deadline = time.monotonic() + daemon.timing.survival_window
    alive = True
    while time.monotonic() < deadline:
        alive = daemon.alive()
        if not alive:
            break
        time.sleep(0.25)
    transcript = transcript + [obs.describe()]
    expect("SAFETY-4", alive, "the daemon keeps running after a hostile listing",
           "the daemon DIED after the listing:\n" + daemon.logs()[-1500:], transcript)
    expect(req_id, not obs.ok and not accepted_listing(transcript),
           f"a bare {stats[0].stat.path!r} entry is rejected (no REQ, no FIN)", obs.describe(), transcript)
    # the daemon still serves an ordinary build
    ok = run_build(daemon.host, make_context({"a": "a"}))
    expect("SAFETY-4", ok.ok, "the daemon still serves other builds", ok.describe(), transcript)


# -- stalls ------------------------------------------------------------------------------------

@requirement("TIMEOUT-3")
@pytest.mark.slow
def test_unanswered_request_fails_after_a_stall(daemon):
    needs_n_plus_1(daemon)
    private = None
    stall_for = 12.0
    host = daemon.host
    if daemon.process is not None:  # embedded reference daemon: an extra one with a short stall period
        private = start_private_reference_daemon(daemon.generation, daemon.spec.transport,
                                                 extra_args=[*daemon.spec.daemon_args, "--stall-timeout", "0.5"])
        host, stall_for = private.host, 3.0
    try:
        log = SenderLog()
        started = time.monotonic()
        obs = run_scripted(daemon, interactive_sender([file_entry("a", b"a")], log=log,
                                                      stall_after_listing=stall_for), host=host)
        took = time.monotonic() - started
    finally:
        if private is not None:
            private.stop()
    expect("TIMEOUT-3", not obs.ok and took < stall_for - 0.5,
           f"the transfer fails on its own before the client gives up ({stall_for:.0f} s)",
           f"{obs.describe()} after {took:.1f} s", log.transcript)


@requirement("INCREMENTAL-5")
def test_no_temporary_entry_left_after_relinking(daemon):
    needs_n_plus_1(daemon)
    from reference.session import new_session_id

    key = "conf-relink-" + new_session_id()
    # a sender that puts 0 in `size` of the second name makes a 20.10 daemon re-link it on every sync
    entries = lambda: [file_entry("a", b"abc"), Entry_(file_entry("h", b"abc", linkname="a"), size=0)]
    first = run_scripted(daemon, interactive_sender(entries(), log=SenderLog()), shared_key=key)
    assert first.ok, f"harness: the first build should succeed: {first.describe()}"
    log = SenderLog()
    dest = tempfile.mkdtemp(prefix="conf-out-")
    second = run_scripted(daemon, interactive_sender(entries(), log=log), output=dest, shared_key=key)
    names = sorted(tree_of(dest))
    expect("INCREMENTAL-5", second.ok and names == ["a", "h"], "exactly the listed entries, no temporary file",
           (second.describe(), names), log.transcript)
