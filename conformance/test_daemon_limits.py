"""Daemon role under extreme input: message sizes, listings it cannot store, names that are not UTF-8.

The suite plays the client; only the main ``context`` transfer is scripted. After every refused
transfer the same shared key builds again honestly, exported with a local output, and the tree
that comes back must be the client's exactly (LIMIT-RECOVER-1).
"""

from __future__ import annotations

import os
import tempfile
import time

import pytest

from reference import diffcopy as dc
from reference.applier import remove_tree
from reference.client.services import FILESYNC_DIFFCOPY
from reference.pb.fsutil_types_pb2 import Stat
from reference.transport.base import RpcError

from .harness.daemon_probes import Entry, FileSyncRouter, SenderLog, file_entry, interactive_sender
from .harness.scripted_client import DIR_MODE, make_context, run_build
from .outcomes import expect
from .trees import diff_snapshots, snapshot

requirement = pytest.mark.requirement
MiB = 1 << 20
LINK = dc.filemode.MODE_SYMLINK | 0o777


def needs_diffcopy(daemon) -> None:
    if daemon.generation == "n-1":
        pytest.skip("DiffCopy listings are generation n and later; the target is generation n-1")


def _streaming_sender(packets, transcript: list[str]):
    """Streams ``packets()`` (a generator: some listings are too large to hold) until the daemon ends the call."""

    def handler(stream):
        sent = 0
        try:
            for packet in packets():
                stream.send(packet.SerializeToString())
                sent += 1
            stream.flush()
            transcript.append(f"> {sent} packets, the whole listing")
            while (raw := stream.recv(30)) is not None:
                packet = dc.decode_packet(raw)
                transcript.append("< " + dc.describe(packet))
                if packet.type == dc.PACKET_ERR:  # as fsutil's sender: the receiver's error ends the call
                    return
            transcript.append("< end of stream")
        except (RpcError, TimeoutError) as exc:
            transcript.append(f"> {sent} packets sent, then: {exc}")

    return handler


def _honest_build_is_exact(daemon, key: str, transcript: list[str]) -> tuple[bool, str]:
    ctx = make_context({"a.txt": "alpha\n", "sub/b.bin": os.urandom(70_000), "sub/c": "c\n"})
    out = tempfile.mkdtemp(prefix="conf-out-")
    try:
        obs = run_build(daemon.host, ctx, output=("local", out), shared_key=key, query={"nocache": "1"}, timeout=120)
        if not obs.ok:
            return False, f"the honest build failed: {obs.error}"
        me = (os.getuid(), os.getgid())
        problems = diff_snapshots(snapshot(ctx, owner=me, with_mtime_of_dirs=False),
                                  snapshot(out, with_mtime_of_dirs=False))
        return not problems, "; ".join(problems[:5]) or "exact"
    finally:
        remove_tree(ctx)
        remove_tree(out)


def _scripted(daemon, handler, key: str):
    ctx = make_context({})
    started = time.monotonic()
    try:
        obs = run_build(daemon.host, ctx, handler_overrides={FILESYNC_DIFFCOPY: FileSyncRouter(ctx, handler)},
                        shared_key=key, timeout=300, hang_timeout=30)
    finally:
        remove_tree(ctx)
    return obs, time.monotonic() - started


# -- message size -------------------------------------------------------------------------------

@requirement("LIMIT-MESSAGE-1", "LIMIT-RECOVER-1", "SAFETY-4")
def test_a_data_message_over_the_receive_limit_fails_only_that_build(daemon):
    needs_diffcopy(daemon)
    key = "limits-" + os.urandom(6).hex()
    transcript: list[str] = []
    size = 64 * MiB  # over grpc-go's default (dockerd 20.10) and BuildKit 0.13's 16 MiB (dockerd 26.1)

    def handler(stream):
        try:
            stream.send(dc.stat_packet(Stat(path="big", mode=0o644, size=size, modTime=1)).SerializeToString())
            stream.send(dc.end_of_listing().SerializeToString())
            stream.flush()
            raw = stream.recv(30)
            transcript.append("< " + dc.describe(dc.decode_packet(raw)))
            stream.send(dc.data_packet(0, b"\0" * size).SerializeToString())  # the whole file in one message
            stream.flush()
            transcript.append(f"> DATA 0 of {size} bytes in one message")
            while (raw := stream.recv(30)) is not None:
                transcript.append("< " + dc.describe(dc.decode_packet(raw)))
        except (RpcError, TimeoutError) as exc:
            transcript.append(f"> the call ended: {exc}")

    obs, seconds = _scripted(daemon, handler, key)
    expect("LIMIT-MESSAGE-1", not obs.ok and seconds < 60,
           "the build fails promptly (the message is refused, not stored)", f"{obs.describe()} after {seconds:.1f} s",
           transcript)
    expect("LIMIT-MESSAGE-1", "larger than max" in (obs.error or "") or "ResourceExhausted" in (obs.error or ""),
           "the error says the message was larger than the receive limit", obs.error, transcript)
    exact, how = _honest_build_is_exact(daemon, key, transcript)
    expect("SAFETY-4", not how.startswith("the honest build failed: session"), "the daemon still serves builds",
           how, transcript)
    expect("LIMIT-RECOVER-1", exact, "the next build with the same shared key receives exactly the client's tree",
           how, transcript)


@requirement("LIMIT-MESSAGE-1")
def test_a_data_message_of_4_mib_is_accepted(daemon):
    needs_diffcopy(daemon)
    data = os.urandom(4 * MiB - 64)  # the whole message (prefix and Packet fields) stays within 4 MiB
    log = SenderLog()
    dest = tempfile.mkdtemp(prefix="conf-out-")
    ctx = make_context({})
    router = FileSyncRouter(ctx, interactive_sender([file_entry("f", data)], log=log, chunk_size=len(data)))
    obs = run_build(daemon.host, ctx, handler_overrides={FILESYNC_DIFFCOPY: router}, output=("local", dest),
                    query={"nocache": "1"}, timeout=120)
    got = open(os.path.join(dest, "f"), "rb").read() if os.path.isfile(os.path.join(dest, "f")) else None
    expect("LIMIT-MESSAGE-1", obs.ok and got == data, "a 4 MiB message is received whole",
           f"{obs.describe()}, {None if got is None else len(got)} bytes back", log.transcript)


# -- listings the daemon cannot store ------------------------------------------------------------

def _deep_listing():
    path = ""
    for _ in range(10_000):
        path = f"{path}/a" if path else "a"
        yield dc.stat_packet(Stat(path=path, mode=DIR_MODE, modTime=1))
    yield dc.end_of_listing()


def _long_path_listing():
    parts = ["x" * 254 + str(i % 10) for i in range(32)]  # 8 KB when whole
    for depth in range(1, 33):
        yield dc.stat_packet(Stat(path="/".join(parts[:depth]), mode=DIR_MODE, modTime=1))
    yield dc.end_of_listing()


EXTREME = {"depth-10000": _deep_listing, "path-8k": _long_path_listing}


@requirement("LIMIT-HOSTILE-1", "LIMIT-RECOVER-1", "SAFETY-4")
@pytest.mark.parametrize("case", list(EXTREME))
def test_a_listing_beyond_what_the_daemon_can_store_fails_promptly_and_is_corrected(daemon, case):
    needs_diffcopy(daemon)
    key = "limits-" + os.urandom(6).hex()
    transcript: list[str] = []
    exact, how = _honest_build_is_exact(daemon, key, transcript)  # the key's entry holds an honest tree first
    assert exact, f"harness: the first honest build is not exact: {how}"
    obs, seconds = _scripted(daemon, _streaming_sender(EXTREME[case], transcript), key)
    expect("SAFETY-4", not obs.ok, "the build fails", obs.describe(), transcript)
    exact, how = _honest_build_is_exact(daemon, key, transcript)
    expect("SAFETY-4", not how.startswith("the honest build failed: session"), "the daemon still serves builds",
           how, transcript)
    expect("LIMIT-RECOVER-1", exact, "the next build with the same shared key receives exactly the client's tree",
           how, transcript)
    error = obs.error or ""
    expect("LIMIT-HOSTILE-1", seconds < 20, "the transfer fails at the entry, not when the client gives up",
           f"{seconds:.1f} s: {error[-300:]}", transcript)
    expect("LIMIT-HOSTILE-1", ("a/a/a" in error or "xxxx" in error) and ("limit" in error or "too long" in error
                                                                          or "too deep" in error),
           "the error names the path and what it exceeds", error[-300:], transcript)


# -- names -------------------------------------------------------------------------------------------

@requirement("NAMES-BYTES-1")
def test_names_that_are_not_utf8_are_written_byte_for_byte(daemon):
    needs_diffcopy(daemon)
    entries = [
        Entry(dc.NameStat(path="caf\udce9.txt", mode=0o644, size=6, modTime=1_600_000_000_000_000_000), b"latin\n"),
        Entry(dc.NameStat(path="d\udcff", mode=DIR_MODE, modTime=1_600_000_000_000_000_000)),
        Entry(dc.NameStat(path="d\udcff/\udc80", mode=0o644, size=2, modTime=1_600_000_000_000_000_000), b"x\n"),
        Entry(dc.NameStat(path="link", mode=LINK, size=4, linkname="to-\udcfe", modTime=1_600_000_000_000_000_000)),
    ]
    log = SenderLog()
    dest = tempfile.mkdtemp(prefix="conf-out-")
    ctx = make_context({})
    router = FileSyncRouter(ctx, interactive_sender(entries, log=log))
    obs = run_build(daemon.host, ctx, handler_overrides={FILESYNC_DIFFCOPY: router}, output=("local", dest),
                    query={"nocache": "1"}, timeout=120)
    expect("NAMES-BYTES-1", obs.ok, "a listing with names that are not UTF-8 is accepted", obs.describe(),
           log.transcript)
    root = os.fsencode(dest)
    found = sorted(os.listdir(root)) + sorted(b"d\xff/" + n for n in os.listdir(os.path.join(root, b"d\xff"))
                                              if os.path.isdir(os.path.join(root, b"d\xff")))
    expect("NAMES-BYTES-1", {b"caf\xe9.txt", b"d\xff", b"d\xff/\x80", b"link"} <= set(found),
           "every name exported byte for byte", found, log.transcript)
    target = os.readlink(os.path.join(root, b"link")) if os.path.islink(os.path.join(root, b"link")) else None
    expect("NAMES-BYTES-1", target == b"to-\xfe", "the link target byte for byte", target, log.transcript)
    data = open(os.path.join(root, b"caf\xe9.txt"), "rb").read() if b"caf\xe9.txt" in found else None
    expect("NAMES-BYTES-1", data == b"latin\n", "the file's contents", data, log.transcript)
