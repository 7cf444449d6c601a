"""Client role: handshake, method advertisement, health and the context transfer.

The suite plays the daemon (an instrumented one) and runs the client under test.
"""

from __future__ import annotations

import os

import pytest

from reference import filemode
from reference.paths import path_sort_key

from .harness.entry_points import build_request_rule, require_build, tar_names
from .harness.instrumented_daemon import InstrumentedDaemon
from .harness.scenarios import DockerdLikeFetch
from .harness.scripted_client import make_context
from .outcomes import expect

requirement = pytest.mark.requirement


def _run(client, context, scenario, **kw):
    with InstrumentedDaemon(scenario, generation=client.generation) as daemon:
        run = client.run(context, daemon.host, **kw)
    require_build(daemon, run, client)
    return daemon, run


def _n_plus_1(client):
    if client.generation == "n-1":
        pytest.skip("DiffCopy is generation n and later; this client is generation n-1")


@requirement("HANDSHAKE-1", "HANDSHAKE-2", "METHODS-1", "METHODS-2", "HEALTH-1", "BUILD-1", "BUILD-8", "GRPC-3")
def test_handshake_headers_and_health(client):
    _n_plus_1(client)
    scenario = DockerdLikeFetch()
    daemon, run = _run(client, make_context({"a.txt": "a"}), scenario)
    rule = build_request_rule(client, daemon)
    expect(rule, len(daemon.builds) == 1, "one build", [t for _, t in daemon.requests], [run.output])
    build = daemon.builds[0]
    session = build.session
    expect("HANDSHAKE-2", session is not None, f"a session named by the build ({build.api})", build.query)
    if build.api == "build":
        expect("BUILD-1", build.query.get("remote") == ["client-session"] and build.query.get("version") == ["2"],
               "version=2&remote=client-session", build.query)
    if build.api == "body":
        dockerfile = (build.query.get("dockerfile") or ["Dockerfile"])[0]
        expect("BUILD-8", dockerfile in tar_names(build.body),
               f"the context as a tar whose Dockerfile is at {dockerfile!r}", tar_names(build.body)[:20])
    uuids = session.header_values("x-docker-expose-session-uuid")
    expect("HANDSHAKE-2", uuids == [build.session_id], "one Uuid header equal to the build's session", uuids)
    methods = session.methods
    expect("METHODS-1", all("," not in m and m.startswith("/") for m in methods) and methods,
           "one method per header line, each /package.Service/Method", methods)
    # a client without Health: HEALTH-1 is the cause (the daemon drops its session), its advertisement follows
    expect("HEALTH-1", scenario.health_status == 1, "Health/Check answers SERVING (1)",
           scenario.health_error or scenario.health_status)
    expect("METHODS-2", any(m.lower() == "/grpc.health.v1.health/check" for m in methods),
           "Health/Check advertised", methods)
    expect(rule, run.returncode == 0, "the build succeeds", run.output)


@requirement("DIFFCOPY-ORDER-1", "DIFFCOPY-LIST-2", "STAT-MODE-1", "STAT-MODE-2", "STAT-OWNER-2",
             "DIFFCOPY-REQ-1", "DIFFCOPY-DATA-1", "DIFFCOPY-FIN-2", "STAT-LINK-1", "STAT-LINK-2", "STAT-SIZE-1")
def test_context_listing_is_ordered_and_encoded_like_go(client):
    _n_plus_1(client)
    files = {"a/x": "1", "a.b": "2", "a-b": "3", "a b": "4", "a/child": "5", "zzz/bb/cc/dd": "6", "zzz.aa": "7",
             "日本/é": "unicode"}
    ctx = make_context(files)
    os.symlink("../outside", os.path.join(ctx, "link"))
    os.link(os.path.join(ctx, "a.b"), os.path.join(ctx, "hard"))
    os.chmod(os.path.join(ctx, "a-b"), 0o4755)
    scenario = DockerdLikeFetch()
    daemon, run = _run(client, ctx, scenario)
    result = scenario.results.get("context")
    assert result is not None, f"the daemon never fetched the context: {run.output}"
    transcript = result.transcript
    paths = [s.path for s in result.stats]
    expect("DIFFCOPY-ORDER-1", paths == sorted(paths, key=path_sort_key) and len(set(paths)) == len(paths),
           "STATs in fsutil order, no duplicates", paths, transcript)
    expect("DIFFCOPY-LIST-2", result.saw_end_of_listing and result.end_marker_bytes == b"",
           "an end-of-listing packet that is an empty message", result.end_marker_bytes, transcript)
    by_path = {s.path: s for s in result.stats}
    for d in ("a", "zzz", "zzz/bb", "日本"):
        expect("STAT-MODE-1", d in by_path and by_path[d].mode & filemode.MODE_DIR, f"{d} sent with ModeDir",
               by_path.get(d), transcript)
    bad = [f"{s.path}:{s.mode:#o}" for s in result.stats if s.mode & 0o177000 and not s.mode & 0xFFF00000]
    expect("STAT-MODE-2", not bad, "no Unix st_mode bits", bad, transcript)
    expect("STAT-MODE-1", by_path["a-b"].mode == filemode.MODE_SETUID | 0o755, "setuid as Go ModeSetuid",
           f"{by_path['a-b'].mode:#x}", transcript)
    expect("STAT-LINK-1", by_path["link"].linkname == "../outside" and by_path["link"].mode & filemode.MODE_SYMLINK,
           "symlink with raw readlink target", by_path["link"], transcript)
    expect("STAT-LINK-2", by_path["hard"].linkname == "a.b" and by_path["a.b"].linkname == "",
           "second name of the inode links to the first", (by_path["a.b"].linkname, by_path["hard"].linkname))
    expect("STAT-SIZE-1", by_path["hard"].size == 1, "real lstat size for a hardlink", by_path["hard"].size)
    owners = {(s.uid, s.gid) for s in result.stats}
    expect("STAT-OWNER-2", owners == {(0, 0)}, "uid/gid 0/0 for the context", owners)
    # every regular file arrived intact, hardlinks not requested
    for rel, data in files.items():
        with open(os.path.join(result.dest, rel), "rb") as fh:
            expect("DIFFCOPY-DATA-1", fh.read() == data.encode(), f"contents of {rel}", "different", transcript)
    expect("DIFFCOPY-REQ-1", "hard" not in result.requested, "hardlinks never requested", result.requested)
    expect("DIFFCOPY-FIN-2", result.fin_reply, "FIN in reply to our FIN", result.status, transcript)
