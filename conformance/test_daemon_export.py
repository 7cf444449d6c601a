"""Daemon role in FileSend: the local export (daemon = DiffCopy sender) and the tar export.

The suite plays the client: a recording receiver takes the daemon's packets on
`FileSend/DiffCopy`, so the daemon's sender behaviour is checked packet by packet.
"""

from __future__ import annotations

import os
import tempfile
import tarfile

import pytest

from reference import filemode
from reference.client.services import (
    FILESEND_DIFFCOPY, FILESYNC_DIFFCOPY, HEALTH_CHECK, HEALTH_WATCH, tar_export_handler,
)
from reference.paths import path_sort_key

from .harness.daemon_probes import rule_for
from .harness.recording import receive_tree
from .harness.scripted_client import make_context, run_build
from .outcomes import expect
from .trees import diff_snapshots, snapshot

requirement = pytest.mark.requirement
GRPC_LIMIT = 4 * 1024 * 1024
TYPE_BITS = 0x8F280000


def needs_n_plus_1(daemon) -> None:
    if daemon.generation == "n-1":
        pytest.skip("FileSend exports are generation n and later; the target is generation n-1")


def _rich_context() -> str:
    ctx = make_context({"a.txt": "a", "dir/b.bin": os.urandom(300_000), "dir/sub/c": "c", "zzz.aa": "z",
                        "zzz/aa": "1", "zzz/bb/cc": "2", "big": os.urandom(5 * 1024 * 1024 + 7), "e": ""})
    os.symlink("../outside/target", os.path.join(ctx, "dir", "link"))
    os.symlink("/etc/passwd", os.path.join(ctx, "abs-link"))
    os.link(os.path.join(ctx, "a.txt"), os.path.join(ctx, "hard"))
    os.chmod(os.path.join(ctx, "dir/sub/c"), 0o4755)
    os.chmod(os.path.join(ctx, "zzz"), 0o1777)
    os.utime(os.path.join(ctx, "a.txt"), ns=(1, 1_234_567_890_987_654_321))
    return ctx


@pytest.fixture(scope="module")
def recorded_export(request):
    """One local export of a rich context per daemon target, recorded packet by packet."""
    cache = {}

    def get(daemon):
        if daemon.host not in cache:
            ctx = _rich_context()
            box = {}

            def record(stream):
                box["metadata"] = list(stream.metadata)
                box["result"] = receive_tree(stream, merge=True)

            dest = tempfile.mkdtemp(prefix="conf-out-")
            obs = run_build(daemon.host, ctx, handler_overrides={FILESEND_DIFFCOPY: record}, output=("local", dest),
                            query={"nocache": "1"})
            cache[daemon.host] = (ctx, obs, box.get("metadata"), box.get("result"))
        return cache[daemon.host]

    return get


def check_filesend_metadata(daemon, metadata, transcript) -> None:
    """Generation n: no metadata (FILESEND-LOCAL-1); n+1: the exporter's index, maybe a traceparent
    (FILESEND-LOCAL-5)."""
    import re

    custom = [(k, v) for k, v in metadata if k not in ("user-agent",) and not k.startswith(":")]
    if daemon.generation != "n+1":
        expect("FILESEND-LOCAL-1", not custom, "no metadata on the call", custom, transcript)
        return
    ids = [v for k, v in custom if k == "buildkit-attachable-exporter-id"]
    expect("FILESEND-LOCAL-5", ids == ["0"], "buildkit-attachable-exporter-id: 0 (the only output)", custom,
           transcript)
    parents = [v for k, v in custom if k == "traceparent"]
    expect("FILESEND-LOCAL-5", len(parents) <= 1 and all(
        re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}", p) for p in parents),
        "at most one traceparent, in the W3C form", parents, transcript)


@requirement("FILESEND-LOCAL-1", "FILESEND-LOCAL-5", "DIFFCOPY-LIST-1", "DIFFCOPY-LIST-2", "DIFFCOPY-ORDER-1",
             "DIFFCOPY-ORDER-2", "DIFFCOPY-FIN-2", "DIFFCOPY-DATA-1", "DIFFCOPY-DATA-2")
def test_local_export_is_a_well_formed_diffcopy(daemon, recorded_export):
    needs_n_plus_1(daemon)
    rule = rule_for(daemon, "filesend-local")
    ctx, obs, metadata, result = recorded_export(daemon)
    expect(rule, obs.ok and result is not None, "the build and its export succeed", obs.describe())
    transcript = result.transcript
    expect(rule, result.error is None and result.status and result.status.startswith("complete"),
           "a complete DiffCopy exchange", (result.error, result.status), transcript)
    paths = [s.path for s in result.stats]
    expect("DIFFCOPY-LIST-1", "" not in paths and "." not in paths and len(paths) == len(set(paths)),
           "one STAT per entry, none for the root", paths, transcript)
    expect("DIFFCOPY-ORDER-1", paths == sorted(paths, key=path_sort_key), "STATs in path order", paths, transcript)
    seen_dirs = {""}
    missing_parent = []
    for s in result.stats:
        parent = os.path.dirname(s.path)
        if parent not in seen_dirs:
            missing_parent.append(s.path)
        if filemode.is_dir(s.mode):
            seen_dirs.add(s.path)
    expect("DIFFCOPY-ORDER-2", not missing_parent, "every ancestor sent before its entries", missing_parent,
           transcript)
    expect("DIFFCOPY-LIST-2", result.saw_end_of_listing and result.end_marker_bytes == b"",
           "an end-of-listing packet without stat", result.end_marker_bytes, transcript)
    expect("DIFFCOPY-DATA-2", max(result.data_packet_sizes or [0]) <= GRPC_LIMIT - 64,
           "every DATA packet fits a 4 MiB gRPC message", max(result.data_packet_sizes or [0]))
    expect("DIFFCOPY-FIN-2", result.fin_reply, "the daemon answers our FIN with FIN", result.status, transcript)
    diff = diff_snapshots(
        snapshot(ctx, owner=(os.getuid(), os.getgid()), with_mtime_of_dirs=False, with_xattrs=False),
        snapshot(result.dest, owner=(os.getuid(), os.getgid()), with_mtime_of_dirs=False, with_xattrs=False))
    expect("DIFFCOPY-DATA-1", not diff, "the exported tree equals the context (owner mapped)", diff, transcript)
    check_filesend_metadata(daemon, metadata, transcript)


@requirement("STAT-MODE-1", "STAT-MODE-2", "STAT-TIME-1", "STAT-SIZE-1", "STAT-LINK-1", "STAT-LINK-2",
             "STAT-OWNER-1", "STAT-DEV-1")
def test_local_export_stats_are_encoded_like_go(daemon, recorded_export):
    needs_n_plus_1(daemon)
    ctx, obs, _, result = recorded_export(daemon)
    assert result is not None and result.stats, f"harness: no export recorded: {obs.describe()}"
    by_path = {s.path: s for s in result.stats}
    transcript = result.transcript
    unix_bits = [f"{s.path}:{s.mode:#x}" for s in result.stats if s.mode & 0o7777000 and not s.mode & 0xFFF00000]
    expect("STAT-MODE-2", not unix_bits, "no Unix st_mode type or special bits", unix_bits, transcript)
    wrong = []
    for s in result.stats:
        lst = os.lstat(os.path.join(ctx, s.path))
        if s.mode != filemode.sender_mode(lst.st_mode):
            wrong.append(f"{s.path}: {s.mode:#x} != {filemode.sender_mode(lst.st_mode):#x}")
    expect("STAT-MODE-1", not wrong, "Go FileMode of each entry", wrong, transcript)
    expect("STAT-TIME-1", by_path["a.txt"].modTime == os.lstat(os.path.join(ctx, "a.txt")).st_mtime_ns,
           "modTime in nanoseconds", by_path["a.txt"].modTime, transcript)
    sizes = [f"{s.path}: {s.size}" for s in result.stats
             if not filemode.is_dir(s.mode) and s.size != os.lstat(os.path.join(ctx, s.path)).st_size]
    sizes += [f"{s.path}: dir size {s.size}" for s in result.stats if filemode.is_dir(s.mode) and s.size]
    expect("STAT-SIZE-1", not sizes, "lstat sizes (hardlinks included), 0 for directories", sizes, transcript)
    expect("STAT-LINK-1", by_path["dir/link"].linkname == "../outside/target"
           and by_path["abs-link"].linkname == "/etc/passwd", "raw symlink targets",
           (by_path["dir/link"].linkname, by_path["abs-link"].linkname), transcript)
    first, second = sorted(["a.txt", "hard"], key=path_sort_key)
    expect("STAT-LINK-2", by_path[first].linkname == "" and by_path[second].linkname == first,
           f"{second} links to {first}", (by_path[first].linkname, by_path[second].linkname), transcript)
    expect("STAT-OWNER-1", {(s.uid, s.gid) for s in result.stats} == {(0, 0)},
           "the image's owners (root, from the context's 0/0)", {(s.uid, s.gid) for s in result.stats})
    expect("STAT-DEV-1", all(s.devmajor == 0 and s.devminor == 0 for s in result.stats),
           "0/0 device numbers for non-devices", [(s.path, s.devmajor, s.devminor) for s in result.stats
                                                   if s.devmajor or s.devminor])


@requirement("FILESEND-LOCAL-4")
def test_local_export_half_closes_after_fin(daemon, recorded_export):
    needs_n_plus_1(daemon)
    _, obs, _, result = recorded_export(daemon)
    assert result is not None, f"harness: no export recorded: {obs.describe()}"
    expect("FILESEND-LOCAL-4", result.status == "complete", "the call ends with OK after the FIN exchange",
           result.status, result.transcript)


@requirement("FILESEND-TAR-1", "FILESEND-LOCAL-5")
def test_tar_export_is_raw_bytes_then_half_close(daemon):
    needs_n_plus_1(daemon)
    ctx = make_context({"a.txt": "a", "d/b": os.urandom(100_000)})
    os.symlink("a.txt", os.path.join(ctx, "l"))
    out = os.path.join(tempfile.mkdtemp(prefix="conf-out-"), "out.tar")
    seen: dict = {}
    tar_streams: list = []
    export = tar_export_handler(out, tar_streams.append)

    def recording_export(stream):
        seen["metadata"] = list(stream.metadata)
        export(stream)

    obs = run_build(daemon.host, ctx, output=("tar", out), handler_overrides={FILESEND_DIFFCOPY: recording_export})
    expect("FILESEND-TAR-1", obs.ok and tar_streams and not tar_streams[0].error,
           "the export ends after the daemon half-closes", (obs.describe(), tar_streams))
    with tarfile.open(out) as tar:
        members = {m.name.rstrip("/"): m for m in tar.getmembers()}
        content = tar.extractfile(members["d/b"]).read() if "d/b" in members else None
    expect("FILESEND-TAR-1", {"a.txt", "d", "d/b", "l", "Dockerfile"} <= set(members), "the context's entries",
           sorted(members))
    with open(os.path.join(ctx, "d/b"), "rb") as fh:
        expect("FILESEND-TAR-1", content == fh.read(), "file contents intact", "different")
    expect("FILESEND-TAR-1", members["l"].issym() and members["l"].linkname == "a.txt", "the symlink", members["l"])
    if daemon.generation == "n+1":  # FILESEND-LOCAL-5 names the tar export's call too
        check_filesend_metadata(daemon, seen.get("metadata", []), [obs.describe()])


@requirement("FILESEND-2")
@pytest.mark.slow
def test_output_without_filesend_fails_and_ends(daemon):
    needs_n_plus_1(daemon)
    ctx = make_context({"a.txt": "a"})
    methods = [HEALTH_CHECK, HEALTH_WATCH, FILESYNC_DIFFCOPY]
    obs = run_build(daemon.host, ctx, output=("local", tempfile.mkdtemp(prefix="conf-out-")), methods=methods,
                    hang_timeout=4.0, timeout=30)
    text = (obs.error or "") + " ".join(obs.vertex_errors)
    expect("FILESEND-2", not obs.ok and "filesend" in text.lower(), "the build fails naming FileSend",
           obs.describe())
    expect("FILESEND-2", not (obs.error or "").startswith("the daemon reported an error but did not end"),
           "the /build response ends", obs.error)
