"""Daemon role, property-based: generated contexts survive a FileSync + local export round trip.

Each example is a context with nested and empty directories, unicode names,
symlinks, hardlinks and a `.dockerignore` with `!` re-includes. It is built
(`FROM scratch`, `COPY . /`, `-o type=local`) by the scripted client; the
exported tree must equal what the client sent (the context filtered by the
patterns the daemon asked for, owners mapped to the exporting user), and a
second build of the unchanged context with the same shared key must make the
daemon request nothing.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reference import filemode
from reference.client.services import FILESEND_DIFFCOPY, FILESYNC_DIFFCOPY, local_export_handler
from reference.pb.fsutil_types_pb2 import Packet, Stat
from reference.session import new_session_id

from .harness.daemon_probes import FileSyncRouter, rule_for
from .harness.scripted_client import make_context, run_build
from .outcomes import expect
from .plugin import _DEVIATIONS_KEY
from .trees import Entry, diff_snapshots, snapshot

requirement = pytest.mark.requirement

NAMES = ["a", "b.log", "keep.log", "é", "日本", "x y", ".hidden", "zz", "z.z", "d1", "d2"]
PATTERNS = ["*.log", "!keep.log", "d1", "!d1/keep*", "**/z*", "!**/zz", "x y", "d2/*", "!d2/a", ".hidden",
            "*/é", "日本"]


def _ascii(pattern: str) -> bool:
    return pattern.isascii()


@st.composite
def contexts(draw, ascii_patterns: bool = False):
    """(files: {path: bytes}, empty_dirs, symlinks {path: target}, hardlinks {path: existing file}, ignore lines)."""
    dirs = draw(st.lists(st.sampled_from(["d1", "d2", "d1/sub", "日本", "d2/é"]), unique=True, max_size=4))
    parents = [""] + dirs
    files = {}
    for _ in range(draw(st.integers(1, 8))):
        parent = draw(st.sampled_from(parents))
        name = draw(st.sampled_from(NAMES + ["keep.txt", "zz"]))
        path = f"{parent}/{name}" if parent else name
        if any(path == d or d.startswith(path + "/") for d in dirs) or path in ("Dockerfile",):
            continue
        files[path] = draw(st.binary(max_size=64))
    empty_dirs = [d for d in dirs if not any(p.startswith(d + "/") for p in files)]
    taken = set(files) | set(dirs)
    symlinks = {}
    for name in draw(st.lists(st.sampled_from(["ln", "d1/ln", "dangling", "abs"]), unique=True, max_size=3)):
        parent = os.path.dirname(name)
        if name in taken or (parent and parent not in dirs):
            continue
        symlinks[name] = {"ln": "a", "d1/ln": "../b.log", "dangling": "nowhere/at/all", "abs": "/etc/hostname"}[name]
        taken.add(name)
    hardlinks = {}
    regular = sorted(files)
    if regular:
        for name in draw(st.lists(st.sampled_from(["h1", "d1/h2", "zz.h"]), unique=True, max_size=2)):
            parent = os.path.dirname(name)
            if name in taken or (parent and parent not in dirs):
                continue
            hardlinks[name] = draw(st.sampled_from(regular))
            taken.add(name)
    patterns = [p for p in PATTERNS if _ascii(p)] if ascii_patterns else PATTERNS
    ignore = draw(st.lists(st.sampled_from(patterns), unique=True, max_size=5))
    return files, empty_dirs, symlinks, hardlinks, ignore


def materialise(spec) -> str:
    files, empty_dirs, symlinks, hardlinks, ignore = spec
    ctx = make_context({**files, ".dockerignore": "".join(line + "\n" for line in ignore)})
    for d in empty_dirs:
        os.makedirs(os.path.join(ctx, d), exist_ok=True)
    for path, target in symlinks.items():
        os.symlink(target, os.path.join(ctx, path))
    for path, target in hardlinks.items():
        os.link(os.path.join(ctx, target), os.path.join(ctx, path))
    return ctx


class _RecordingStream:
    """Passes a FileSend stream through to the normal export receiver, keeping the daemon's STATs."""

    def __init__(self, stream, stats: dict):
        self._stream, self._stats = stream, stats
        self.method, self.metadata = stream.method, stream.metadata

    def recv(self, timeout=None):
        raw = self._stream.recv(timeout)
        if raw:
            packet = Packet.FromString(raw)
            if packet.type == Packet.PACKET_STAT and packet.HasField("stat"):
                self._stats[packet.stat.path] = Stat.FromString(packet.stat.SerializeToString())
        return raw

    def __getattr__(self, name):
        return getattr(self._stream, name)


def exported_snapshot(dest: str, sent: dict, owner: tuple[int, int]) -> dict[str, Entry]:
    """The daemon's export as it described it (its STATs, owner mapped) with the contents that arrived."""
    out = {}
    for path, stat in sent.items():
        digest = ""
        if filemode.is_regular(stat.mode) and not stat.linkname:
            with open(os.path.join(dest, path), "rb") as fh:
                digest = hashlib.sha256(fh.read()).hexdigest()
        elif filemode.is_regular(stat.mode):
            with open(os.path.join(dest, stat.linkname), "rb") as fh:
                digest = hashlib.sha256(fh.read()).hexdigest()
        mtime = 0 if filemode.is_dir(stat.mode) else stat.modTime
        out[path] = Entry(stat.mode, owner[0], owner[1], stat.size, mtime, stat.linkname, stat.devmajor,
                          stat.devminor, (), digest)
    return out


def _main_excludes(router: FileSyncRouter) -> list[str]:
    """The patterns of the main context transfer, as the daemon meant them (encoding undone)."""
    for call in router.calls:
        if call.main_context:
            return call.values("exclude-patterns")
    return []


@requirement("INCREMENTAL-2", "INCREMENTAL-7", "FILESEND-LOCAL-1", "FILESEND-LOCAL-5", "DOCKERIGNORE-1",
             "DOCKERIGNORE-3", "META-1", "META-ENCODE-1")
def test_generated_contexts_round_trip(daemon, request):
    if daemon.generation == "n-1":
        pytest.skip("local export and DiffCopy are generation n and later; the target is generation n-1")
    profile = settings.get_profile("conformance-" + request.config.getoption("conformance_profile"))
    owner = (os.getuid(), os.getgid())
    filesend_rule = rule_for(daemon, "filesend-local")
    # A daemon known not to send non-ASCII metadata (META-1, a known deviation checked on its own by
    # test_non_ascii_patterns_are_sent_unchanged) gets ASCII patterns here, so this test judges the rest.
    known = request.node.stash.get(_DEVIATIONS_KEY, {})

    @settings(profile, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
              database=None)
    @given(contexts(ascii_patterns=rule_for(daemon, "filesync-metadata") in known))
    def check(spec):
        ctx = materialise(spec)
        key = "conf-prop-" + new_session_id()
        dest = tempfile.mkdtemp(prefix="conf-out-")
        router = FileSyncRouter(ctx)
        sent: dict = {}
        export = local_export_handler(dest, lambda record: None)
        first = run_build(daemon.host, ctx, shared_key=key, output=("local", dest), query={"nocache": "1"},
                          handler_overrides={FILESYNC_DIFFCOPY: router,
                                             FILESEND_DIFFCOPY: lambda stream: export(_RecordingStream(stream, sent))})
        example = f"context spec {spec!r}"
        expect(filesend_rule, first.ok, "the build and export succeed", first.describe(), [example])
        excludes = _main_excludes(router)
        ignore_lines = spec[4]
        expect("DOCKERIGNORE-3", excludes == ignore_lines, "the .dockerignore lines as exclude-patterns",
               excludes, [example])
        # compared with what the daemon sent (not with what our receiver made of it), so only the daemon is judged
        diff = diff_snapshots(snapshot(ctx, excludes=excludes, owner=owner, with_mtime_of_dirs=False, with_xattrs=False), exported_snapshot(dest, sent, owner))
        expect("INCREMENTAL-7", not diff, "the exported tree equals the filtered context", diff, [example])
        again = FileSyncRouter(ctx)
        second = run_build(daemon.host, ctx, handler_overrides={FILESYNC_DIFFCOPY: again}, shared_key=key)
        # the main context transfer only: dockerd 26.1 sends the Dockerfile and .dockerignore again (INCREMENTAL-8)
        requested = sorted(p for c in again.calls if c.main_context for p in c.requested or [])
        expect("INCREMENTAL-2", second.ok and not requested,
               "an unchanged second build requests nothing on the context transfer",
               (second.describe(), requested), [example])

    check()
