"""The reference daemon's generations n and n+1 (dockerd 20.10 and 26.1) where they differ: the profile
table, the health ticker, session waits, metadata on the wire, non-incremental Dockerfile transfers,
error texts and the API version. Timers are shortened; the profile's own values are checked as a table."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
import time

import pytest

from reference.daemon.builder import CallMetadata, _every_file_changed
from reference.daemon.config import PROFILES, DaemonConfig
from reference.daemon.errors import BuildError
from reference.daemon.filesync import SyncRequest
from reference.daemon.sessions import Session, SessionManager
from reference.transport.base import RpcError, StatusCode

TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-01$")


@pytest.fixture(autouse=True)
def _temporary_files_in_tmp_path(tmp_path, monkeypatch):
    """The harness's contexts (make_context) and daemon roots go below tmp_path, not into /tmp."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


# -- the profile table -----------------------------------------------------------------------


def test_profiles_are_the_measured_daemons():
    n, n1 = PROFILES["n"], PROFILES["n+1"]
    # dockerd 20.10.24: checks every 1 s (10 s deadline), an unknown session fails after 5 s, 4 MiB messages
    assert (n.health_first, n.health_interval, n.health_timeout, n.health_timeout_factor) == (1.0, 1.0, 10.0, 0.0)
    assert (n.session_wait, n.session_group_wait, n.max_message_size, n.api_version) == (5.0, 0.0, 4 << 20, "1.41")
    assert n.frontend_error_prefix == "failed to solve with frontend dockerfile.v0: "
    assert not (n.encode_metadata or n.exporter_id or n.traceparent) and n.incremental_dockerfile
    # dockerd 26.1.5: first check at 5 s, every 5 s, deadline max(30 s, 1.5 x previous), 5 + 5 s, 16 MiB
    assert (n1.health_first, n1.health_interval, n1.health_timeout, n1.health_timeout_factor) == (5.0, 5.0, 30.0, 1.5)
    assert (n1.session_wait, n1.session_group_wait, n1.max_message_size, n1.api_version) == (5.0, 5.0, 16 << 20, "1.45")
    assert n1.frontend_error_prefix == ""
    assert n1.encode_metadata and n1.exporter_id and n1.traceparent and not n1.incremental_dockerfile
    assert n.probe_ignored_dockerignore and not n1.probe_ignored_dockerignore
    assert "only one connection allowed" in n.redial_error and "only one connection allowed" in n1.redial_error
    assert PROFILES["n-1"].protocols == ("tarstream",) and n.protocols == n1.protocols == ("diffcopy",)


def test_config_takes_the_profile_unless_a_timer_is_given(tmp_path):
    config = DaemonConfig(str(tmp_path), generation="n+1")
    assert config.timers() == {"health_first": 5.0, "health_interval": 5.0, "health_timeout": 30.0,
                               "session_wait": 5.0, "session_group_wait": 5.0}
    assert config.max_message_size == 16 << 20 and config.api_version == "1.45"
    fast = DaemonConfig(str(tmp_path), generation="n+1", health_interval=0.5, session_group_wait=0.0,
                        max_message_size=1 << 20)
    # the first tick of a ticker is one period in, unless it is set on its own
    assert (fast.health_first, fast.health_interval, fast.session_group_wait) == (0.5, 0.5, 0.0)
    assert fast.max_message_size == 1 << 20
    assert DaemonConfig(str(tmp_path), generation="n", health_first=3.0).timers()["health_first"] == 3.0
    assert DaemonConfig(str(tmp_path), generation="n").max_message_size == 4 << 20
    with pytest.raises(ValueError):
        DaemonConfig(str(tmp_path), generation="n", health_interval=0)
    with pytest.raises(ValueError):
        DaemonConfig(str(tmp_path), generation="n+2")


def test_cli_options_override_each_timer(tmp_path):
    import reference.daemon.__main__ as cli

    seen = {}

    class Stop(Exception):
        pass

    def fake_daemon(config, host):
        seen["config"] = config
        raise Stop

    original = cli.Daemon
    cli.Daemon = fake_daemon
    try:
        with pytest.raises(Stop):
            cli.main(["--host", "unix:///nowhere", "--root", str(tmp_path), "--generation", "n+1",
                      "--health-first", "0.7", "--health-interval", "2", "--health-timeout", "3",
                      "--session-wait", "1", "--session-group-wait", "0.5", "--max-message-size", "1000"])
    finally:
        cli.Daemon = original
    assert seen["config"].timers() == {"health_first": 0.7, "health_interval": 2.0, "health_timeout": 3.0,
                                       "session_wait": 1.0, "session_group_wait": 0.5}
    assert seen["config"].max_message_size == 1000


# -- health ticker -------------------------------------------------------------------------------


class FakeConnection:
    """A session connection whose Health/Check is scripted: ``behaviour(n)`` (n from 1) returns how long
    the check takes, or raises."""

    def __init__(self, behaviour):
        self.behaviour = behaviour
        self.closed = threading.Event()
        self.checks: list[tuple[float, float]] = []  # (start, deadline)

    def unary(self, method, request, metadata=(), timeout=None):
        assert method == "/grpc.health.v1.Health/Check"
        self.checks.append((time.monotonic(), timeout))
        delay = self.behaviour(len(self.checks))
        time.sleep(delay)
        return b""

    def close(self):
        self.closed.set()


def _monitor(generation, behaviour, **timers):
    config = DaemonConfig(tempfile.mkdtemp(prefix="gen-"), generation=generation, **timers)
    manager = SessionManager(config)
    session = Session("s", "n", "k", [])
    session.conn = FakeConnection(behaviour)
    started = time.monotonic()
    thread = threading.Thread(target=manager._monitor_health, args=(session,), daemon=True)
    thread.start()
    return manager, session, started, thread


def test_health_checks_follow_the_ticker_grid():
    manager, session, started, thread = _monitor("n+1", lambda n: 0.0, health_first=0.3, health_interval=0.25)
    time.sleep(1.15)
    session.close("test over")
    thread.join(2)
    times = [round(t - started, 2) for t, _ in session.conn.checks]
    assert len(times) >= 3 and abs(times[0] - 0.3) < 0.12, times
    # on the grid (0.3, 0.55, 0.8, 1.05): no drift from the checks' own duration
    assert all(abs(t - (0.3 + 0.25 * i)) < 0.12 for i, t in enumerate(times)), times
    assert not thread.is_alive()


def test_a_tick_during_a_long_check_fires_right_after_it_and_the_rest_are_dropped():
    # the second check takes over two periods: one tick waits in the ticker, the next one is on the grid again
    manager, session, started, thread = _monitor("n", lambda n: 0.9 if n == 2 else 0.0,
                                                 health_first=0.4, health_interval=0.4)
    time.sleep(2.2)
    session.close("test over")
    thread.join(2)
    times = [round(t - started, 2) for t, _ in session.conn.checks]
    # ticks at 0.4, 0.8 (takes until 1.7: 1.2 and 1.6 pass, one is kept), then 1.7 at once, then 2.0 on the grid
    assert abs(times[0] - 0.4) < 0.12 and abs(times[1] - 0.8) < 0.12, times
    assert abs(times[2] - 1.7) < 0.12, times
    assert abs(times[3] - 2.0) < 0.12, times


@pytest.mark.parametrize("generation, second_deadline", [("n", 0.2), ("n+1", 0.45)])
def test_deadline_grows_with_the_previous_check_in_n_plus_1(generation, second_deadline):
    manager, session, started, thread = _monitor(generation, lambda n: 0.3 if n == 1 else 0.0,
                                                 health_first=0.05, health_interval=0.1, health_timeout=0.2)
    time.sleep(0.7)
    session.close("test over")
    thread.join(2)
    deadlines = [round(d, 2) for _, d in session.conn.checks]
    assert deadlines[0] == 0.2 and second_deadline <= deadlines[1] < second_deadline + 0.1, deadlines


@pytest.mark.parametrize("generation", ["n", "n+1"])
def test_the_first_failed_check_ends_the_session(generation):
    def fail(n):
        raise RpcError(StatusCode.UNIMPLEMENTED, "no health")

    manager, session, started, thread = _monitor(generation, fail, health_first=0.1, health_interval=0.1)
    thread.join(2)
    assert session.closed.is_set() and "health check failed" in session.close_reason
    assert len(session.conn.checks) == 1
    assert 0.08 < session.conn.checks[0][0] - started < 0.3


@pytest.mark.parametrize("generation", ["n", "n+1"])
def test_a_closed_connection_ends_the_session_at_the_next_tick_and_builds_fail_at_once_meanwhile(generation):
    config = DaemonConfig(tempfile.mkdtemp(prefix="gen-"), generation=generation, health_interval=0.4)
    manager = SessionManager(config)
    session = Session("sid", "n", "k", [])
    session.conn = FakeConnection(lambda n: 0.0)
    manager._sessions["sid"] = session
    thread = threading.Thread(target=manager._monitor_health, args=(session,), daemon=True)
    started = time.monotonic()
    thread.start()
    session.conn.close()
    begun = time.monotonic()
    with pytest.raises(BuildError) as info:
        manager.get("sid")
    assert time.monotonic() - begun < 0.1
    assert str(info.value) == config.profile.redial_error
    thread.join(2)
    assert session.closed.is_set() and session.close_reason == "connection closed"
    assert 0.35 < time.monotonic() - started < 0.8
    assert not session.conn.checks


@pytest.mark.parametrize("generation, wait", [("n", 0.3), ("n+1", 0.6)])
def test_an_unknown_session_waits_the_generations_time(generation, wait):
    config = DaemonConfig(tempfile.mkdtemp(prefix="gen-"), generation=generation, session_wait=0.3,
                          session_group_wait=None if generation == "n" else 0.3)
    manager = SessionManager(config)
    started = time.monotonic()
    with pytest.raises(BuildError, match="no active session for nobody: context deadline exceeded"):
        manager.get("nobody")
    assert wait - 0.02 < time.monotonic() - started < wait + 0.25


def test_a_late_session_is_used_during_the_second_wait():
    config = DaemonConfig(tempfile.mkdtemp(prefix="gen-"), generation="n+1", session_wait=0.2, session_group_wait=0.4)
    manager = SessionManager(config)
    late = Session("late", "n", "k", [])
    late.conn = FakeConnection(lambda n: 0.0)

    def register():
        with manager._cond:
            manager._sessions["late"] = late
            manager._cond.notify_all()

    threading.Timer(0.35, register).start()
    assert manager.get("late") is late


# -- metadata on the calls ----------------------------------------------------------------------------


def test_n_plus_1_metadata_is_encoded_per_key_and_traced():
    calls = CallMetadata(PROFILES["n+1"])
    request = SyncRequest("context", followpaths=["a b"], exclude_patterns=["日本/*", "x y", "c+d"])
    first = calls.filesync(request)
    assert [(k, v) for k, v in first if k != "traceparent"] == [
        ("dir-name", "context"),
        ("exclude-patterns", "%E6%97%A5%E6%9C%AC%2F%2A"), ("exclude-patterns", "x+y"), ("exclude-patterns", "c%2Bd"),
        ("exclude-patterns-encoded", "1"),
        ("followpaths", "a b"),  # all ASCII: raw, no marker
    ]
    second = calls.filesync(SyncRequest("dockerfile", followpaths=["Dockerfile"]))
    send = calls.filesend(0)
    assert send[0] == ("buildkit-attachable-exporter-id", "0")
    parents = [dict(md)["traceparent"] for md in (first, second, send)]
    matches = [TRACEPARENT.match(p) for p in parents]
    assert all(matches)
    assert len({m.group(1) for m in matches}) == 1  # one trace per build
    assert len({m.group(2) for m in matches}) == 3  # a new span per call
    assert CallMetadata(PROFILES["n+1"]).trace_id != calls.trace_id


def test_n_metadata_is_raw_and_untraced():
    calls = CallMetadata(PROFILES["n"])
    request = SyncRequest("context", exclude_patterns=["日本/*", "x y"])
    assert calls.filesync(request) == request.metadata()
    assert calls.filesend(0) == []


def test_every_file_changed_keeps_directories_and_poisons_the_rest():
    from reference import diffcopy as dc
    from reference.pb.fsutil_types_pb2 import Stat

    base = [dc.previous_entry(Stat(path="d", mode=0x80000000 | 0o755, modTime=1)),
            dc.previous_entry(Stat(path="d/f", mode=0o644, size=3, modTime=2)),
            dc.previous_entry(Stat(path="l", mode=0x08000000 | 0o777, size=1, modTime=3, linkname="f"))]
    poisoned = _every_file_changed(base)
    assert poisoned[0] == base[0]
    assert [fields[4] for _, fields in poisoned[1:]] == [-1, -1]
    assert [key for key, _ in poisoned] == [key for key, _ in base]


# -- a daemon in this process, over a unix socket -----------------------------------------------


@pytest.fixture(params=["n", "n+1"])
def gen_daemon(request):
    from reference.daemon.service import Daemon

    directory = tempfile.mkdtemp(prefix="gen-", dir="/tmp")
    config = DaemonConfig(os.path.join(directory, "root"), generation=request.param, health_interval=0.5)
    d = Daemon(config, "unix://" + os.path.join(directory, "d.sock")).start()
    d.host = "unix://" + os.path.join(directory, "d.sock")
    yield d
    d.close()
    shutil.rmtree(directory, ignore_errors=True)


def test_api_version_and_reported_timers(gen_daemon):
    from reference.dockerhost import api_call

    resp, _ = api_call("GET", "/_ping", host=gen_daemon.host)
    wanted = "1.45" if gen_daemon.config.generation == "n+1" else "1.41"
    assert resp.header("Api-Version") == wanted
    resp, body = api_call("GET", "/version", host=gen_daemon.host)
    info = json.loads(body)
    assert info["ApiVersion"] == wanted
    component = next(c for c in info["Components"] if c["Name"] == "reference-daemon")
    assert component["Details"]["Timers"] == gen_daemon.config.timers()
    resp, body = api_call("GET", "/v1.45/_ping", host=gen_daemon.host)
    assert resp.status == (200 if wanted == "1.45" else 400)


def test_what_the_wire_shows_per_generation(gen_daemon, tmp_path):
    from conformance.harness.daemon_probes import FileSyncRouter
    from conformance.harness.scripted_client import make_context, run_build
    from reference.client.services import FILESEND_DIFFCOPY, FILESYNC_DIFFCOPY, local_export_handler

    n_plus_1 = gen_daemon.config.generation == "n+1"
    ctx = make_context({".dockerignore": "日本/*\n", "a": "a", "日本/x": "x"})
    key = "gen-" + os.urandom(4).hex()
    router = FileSyncRouter(ctx)
    seen = {}
    dest = str(tmp_path / "out")
    export = local_export_handler(dest, lambda record: None)

    def recording(stream):
        seen["filesend"] = list(stream.metadata)
        export(stream)

    first = run_build(gen_daemon.host, ctx, shared_key=key, output=("local", dest),
                      handler_overrides={FILESYNC_DIFFCOPY: router, FILESEND_DIFFCOPY: recording})
    assert first.ok, first.describe()
    main = next(c for c in router.calls if c.main_context)
    raw = [v for k, v in main.metadata if k == "exclude-patterns"]
    assert raw == (["%E6%97%A5%E6%9C%AC%2F%2A"] if n_plus_1 else ["日本/*"])
    assert main.values("exclude-patterns") == ["日本/*"]
    # the suite's client decodes: 日本/* leaves the directory, without its file
    assert os.path.exists(os.path.join(dest, "a")) and not os.path.exists(os.path.join(dest, "日本", "x"))
    exporter = [v for k, v in seen["filesend"] if k == "buildkit-attachable-exporter-id"]
    assert exporter == (["0"] if n_plus_1 else [])
    traced = [any(k == "traceparent" for k, _ in c.metadata) for c in router.calls]
    assert traced == [n_plus_1] * 3
    again = FileSyncRouter(ctx)
    second = run_build(gen_daemon.host, ctx, shared_key=key, handler_overrides={FILESYNC_DIFFCOPY: again})
    assert second.ok, second.describe()
    requested = {("main" if c.main_context else c.dir_name): sorted(c.requested) for c in again.calls}
    if n_plus_1:  # local.differ none for the Dockerfile and the .dockerignore probe
        assert requested == {"dockerfile": ["Dockerfile"], "context": [".dockerignore"], "main": []}
    else:
        assert requested == {"dockerfile": [], "context": [], "main": []}


def test_the_dockerfiles_own_ignore_file_spares_the_probe_in_n_plus_1(gen_daemon):
    from conformance.harness.daemon_probes import FileSyncRouter
    from conformance.harness.scripted_client import make_context, run_build
    from reference.client.services import FILESYNC_DIFFCOPY

    ctx = make_context({"a": "a", "x": "x", ".dockerignore": "a\n", "Dockerfile.dockerignore": "x\n"})
    router = FileSyncRouter(ctx)
    obs = run_build(gen_daemon.host, ctx, handler_overrides={FILESYNC_DIFFCOPY: router})
    assert obs.ok, obs.describe()
    calls = [(c.dir_name, c.values("followpaths"), c.values("exclude-patterns")) for c in router.calls]
    probe = [("context", [".dockerignore"], [])] if gen_daemon.config.generation == "n" else []
    assert calls == [("dockerfile", ["Dockerfile", "Dockerfile.dockerignore", "dockerfile"], []), *probe,
                     ("context", [], ["x"])]


def test_error_texts_per_generation(gen_daemon):
    from conformance.harness.scripted_client import make_context, run_build

    obs = run_build(gen_daemon.host, make_context({}, dockerfile="FROM scratch\nCOPY nope /\n"))
    assert not obs.ok
    prefixed = "failed to solve with frontend dockerfile.v0: failed to build:" in obs.error
    assert prefixed == (gen_daemon.config.generation == "n"), obs.error
    assert "failed to build:" in obs.error
