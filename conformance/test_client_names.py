"""Client role, names that are not UTF-8: sent and received byte for byte (NAMES-BYTES-1).

Go's fsutil keeps names as bytes, so the docker CLI sends a file named ``caf\\xe9.txt`` (Latin-1) as
those bytes, in byte order, and writes an export's names as they come. The scenario decodes with
``reference.diffcopy.decode_packet`` (a proto3 ``string`` parser refuses such names).
"""

from __future__ import annotations

import os
import time

import pytest

from reference import diffcopy as dc
from reference import filemode as fm
from reference.applier import remove_tree
from reference.transport.base import RpcError

from .harness.daemon_scripts import FILESEND, open_diffcopy, run_client
from .harness.instrumented_daemon import ScenarioResult
from .harness.scripted_client import make_context
from .outcomes import expect

requirement = pytest.mark.requirement
T0 = 1_650_000_000_000_000_000


def _needs_diffcopy(client):
    if client.generation == "n-1":
        pytest.skip("DiffCopy is generation n and later; this client is generation n-1")


def _latin1_context() -> str:
    ctx = os.fsencode(make_context({"plain.txt": "p\n"}))
    os.mkdir(os.path.join(ctx, b"d\xff"))
    for rel, data in ((b"caf\xe9.txt", b"latin\n"), (b"d\xff/\x80", b"x\n"), ("ア".encode(), b"a\n")):
        with open(os.path.join(ctx, rel), "wb") as fh:
            fh.write(data)
    os.symlink(b"to-\xfe", os.path.join(ctx, b"link"))
    return os.fsdecode(ctx)


def _pull_listing(stream, transcript: list[str], timeout: float = 20.0) -> list:
    """STATs until the end of the listing; then FIN, as a receiver that wants nothing."""
    stats = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        raw = stream.recv(timeout=max(0.1, deadline - time.monotonic()))
        if raw is None:
            transcript.append("> call ended")
            return stats
        packet = dc.decode_packet(raw)
        transcript.append("> " + dc.describe(packet))
        if packet.type != dc.PACKET_STAT or not packet.HasField("stat"):
            break
        stats.append(packet.stat)
    stream.send(dc.fin_packet().SerializeToString())
    stream.flush()
    try:
        while stream.recv(timeout=10) is not None:
            pass
    except (RpcError, TimeoutError):
        pass
    return stats


@requirement("NAMES-BYTES-1")
def test_the_client_sends_names_byte_for_byte_in_byte_order(client):
    _needs_diffcopy(client)
    ctx = _latin1_context()
    seen: dict = {"transcript": []}

    def scenario(build):
        seen["stats"] = _pull_listing(open_diffcopy(build.session, "context"), seen["transcript"])
        return ScenarioResult()

    try:
        daemon, run = run_client(client, ctx, scenario)
    finally:
        remove_tree(ctx)
    stats, tr = seen.get("stats", []), seen["transcript"]
    paths = [os.fsencode(s.path) for s in stats]
    expect("NAMES-BYTES-1", {b"caf\xe9.txt", b"d\xff", b"d\xff/\x80", b"link"} <= set(paths),
           "every name listed as the bytes the filesystem holds", paths, tr + [run.output[-1500:]])
    expect("NAMES-BYTES-1", paths == sorted(paths, key=lambda p: p.replace(b"/", b"\0")),
           "in byte order (fsutil's ComparePath on bytes)", paths, tr)
    link = next((s for s in stats if os.fsencode(s.path) == b"link"), None)
    expect("NAMES-BYTES-1", link is not None and os.fsencode(link.linkname) == b"to-\xfe",
           "the link target byte for byte", link and os.fsencode(link.linkname), tr)


@requirement("NAMES-BYTES-1")
def test_the_client_writes_an_exports_names_byte_for_byte(client, tmp_path):
    _needs_diffcopy(client)
    dest = tmp_path / "dest"
    stats = sorted([
        dc.NameStat(path="caf\udce9.txt", mode=0o644, size=6, modTime=T0),
        dc.NameStat(path="d\udcff", mode=fm.MODE_DIR | 0o755, modTime=T0),
        dc.NameStat(path="d\udcff/\udc80", mode=0o644, size=2, modTime=T0),
        dc.NameStat(path="link", mode=fm.MODE_SYMLINK | 0o777, size=4, linkname="to-\udcfe", modTime=T0),
    ], key=lambda s: dc.path_sort_key(s.path))
    contents = {"caf\udce9.txt": b"latin\n", "d\udcff/\udc80": b"x\n"}
    transcript: list[str] = []

    def scenario(build):
        stream = build.session.conn.open_stream(FILESEND, [])
        stream.send_many([dc.stat_packet(s).SerializeToString() for s in stats]
                         + [dc.end_of_listing().SerializeToString()])
        try:
            while True:
                raw = stream.recv(timeout=15)
                if raw is None:
                    break
                packet = dc.decode_packet(raw)
                transcript.append("< " + dc.describe(packet))
                if packet.type == dc.PACKET_REQ:
                    path = stats[packet.ID].path
                    stream.send(dc.data_packet(packet.ID, contents[path]).SerializeToString())
                    stream.send(dc.data_packet(packet.ID, b"").SerializeToString())
                    stream.flush()
                elif packet.type == dc.PACKET_FIN:
                    stream.send(dc.fin_packet().SerializeToString())
                    stream.close_send()
                    while stream.recv(timeout=10) is not None:
                        pass
                    break
                else:
                    break
        except (RpcError, TimeoutError) as exc:
            transcript.append(f"> {exc}")
        return ScenarioResult()

    daemon, run = run_client(client, make_context({"a": "a"}), scenario,
                             extra_args=["-o", f"type=local,dest={dest}"])
    root = os.fsencode(dest)
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        found |= {n if rel == b"." else rel + b"/" + n for n in dirnames + filenames}
    expect("NAMES-BYTES-1", found == {b"caf\xe9.txt", b"d\xff", b"d\xff/\x80", b"link"},
           "every exported name written byte for byte", sorted(found), transcript + [run.output[-1500:]])
    target = os.readlink(os.path.join(root, b"link")) if os.path.islink(os.path.join(root, b"link")) else None
    expect("NAMES-BYTES-1", target == b"to-\xfe", "the link target byte for byte", target, transcript)
