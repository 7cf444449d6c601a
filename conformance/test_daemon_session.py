"""Daemon role: the handshake, method matching, health checks, session lifetime and the /build API.

The suite plays the client (raw HTTP on the Engine socket, or the scripted client).
"""

from __future__ import annotations

import base64
import threading
import time

import pytest

from reference.client import BuildError, post_build
from reference.client.services import (
    FILESYNC_DIFFCOPY, FILESYNC_TARSTREAM, HEALTH_CHECK, HEALTH_WATCH,
)
from reference.pb.control_pb2 import StatusResponse
from reference.session import new_session_id
from reference.transport.base import RpcError, StatusCode

from .harness.daemon_probes import (
    FileSyncRouter, LiveSession, build_query, dechunk, raw_build, raw_request, rule_for, session_headers,
)
from .harness.scripted_client import make_context, run_build
from .catalogue import not_applicable_reason
from .outcomes import expect

requirement = pytest.mark.requirement

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
BASIC_METHODS = [HEALTH_CHECK, FILESYNC_DIFFCOPY]


def needs_buildkit_build(daemon) -> None:
    if daemon.generation == "n-1":
        pytest.skip("this case runs a BuildKit-style build (generation n and later); the target is generation n-1")


def _json_message(resp) -> str:
    import json

    text = dechunk(resp.rest).decode("utf-8", "replace")
    try:
        return json.loads(text).get("message", "")
    except ValueError:
        return "<not JSON: " + text[:200] + ">"


# -- handshake ------------------------------------------------------------------------------

@requirement("HANDSHAKE-4", "ROLE-2")
def test_upgrade_answers_101_then_sends_http2_client_preface(daemon):
    resp, _ = raw_request(daemon.host, "/session", session_headers(new_session_id(), BASIC_METHODS),
                          read_after=1.0, enough=lambda rest: len(rest) >= len(H2_PREFACE) + 9)
    transcript = [resp.head.decode("latin-1"), f"then {len(resp.rest)} bytes: {resp.rest[:40]!r}"]
    expect("HANDSHAKE-4", resp.status == 101, "HTTP/1.1 101", resp.status_line, transcript)
    expect("HANDSHAKE-4", [v.lower() for v in resp.header("Connection")] == ["upgrade"]
           and resp.header("Upgrade") == ["h2c"], "Connection: Upgrade and Upgrade: h2c",
           (resp.header("Connection"), resp.header("Upgrade")), transcript)
    expect("ROLE-2", resp.rest.startswith(H2_PREFACE), "the HTTP/2 client preface right after the 101",
           resp.rest[:40], transcript)
    # the preface is followed by a SETTINGS frame (type 4) from the HTTP/2 client
    frame = resp.rest[len(H2_PREFACE):len(H2_PREFACE) + 9]
    expect("ROLE-2", len(frame) == 9 and frame[3] == 4, "a SETTINGS frame after the preface", frame, transcript)


@requirement("HANDSHAKE-6")
@pytest.mark.parametrize("upgrade, wanted", [(None, "upgrade"), ("", "upgrade"), ("H2C", "not supported"),
                                             ("websocket", "not supported")],
                         ids=["missing", "empty", "upper-case", "websocket"])
def test_bad_upgrade_header_is_refused_with_400_json(daemon, upgrade, wanted):
    resp, _ = raw_request(daemon.host, "/session", session_headers(new_session_id(), BASIC_METHODS, upgrade=upgrade),
                          read_after=0.5)
    transcript = [resp.head.decode("latin-1"), resp.body_text()[:300]]
    expect("HANDSHAKE-6", resp.status == 400, "HTTP 400 without switching protocols", resp.status_line, transcript)
    message = _json_message(resp)
    expect("HANDSHAKE-6", wanted in message.lower(), f"a JSON message saying {wanted!r}", message, transcript)


@requirement("HANDSHAKE-6", "HANDSHAKE-10")
def test_duplicate_session_id_is_refused_and_live_session_survives(daemon):
    needs_buildkit_build(daemon)
    ctx = make_context({"a.txt": "a"})
    with LiveSession(daemon.host, ctx) as live:
        resp, _ = raw_request(daemon.host, "/session", session_headers(live.session_id, BASIC_METHODS),
                              read_after=0.5)
        transcript = [resp.head.decode("latin-1"), resp.body_text()[:300]]
        expect("HANDSHAKE-6", resp.status == 400, "HTTP 400 for an ID that is live", resp.status_line, transcript)
        message = _json_message(resp)
        expect("HANDSHAKE-6", "already exists" in message, "a JSON message saying the session already exists",
               message, transcript)
        build = raw_build(daemon.host, build_query(live.session_id), timeout=30)
        expect("HANDSHAKE-10", build.ended and not build.errors()
               and any(m.get("id") == "moby.image.id" for m in build.messages),
               "the original session still serves a build", build.errors() or build.messages[-3:], transcript)


@requirement("HANDSHAKE-7")
@pytest.mark.parametrize("uuid", [None, ""], ids=["missing", "empty"])
def test_missing_or_empty_session_id_is_refused(daemon, uuid):
    headers = [(k, v) for k, v in session_headers("x", BASIC_METHODS) if k != "X-Docker-Expose-Session-Uuid"]
    if uuid is not None:
        headers.append(("X-Docker-Expose-Session-Uuid", uuid))
    # an ID-less session of an earlier case may still be registered until the daemon's next health check
    deadline = time.monotonic() + daemon.timing.health_interval + 2.0
    while True:
        resp, _ = raw_request(daemon.host, "/session", headers, read_after=0.3)
        if not (resp.status == 400 and "already exists" in _json_message(resp)) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    expect("HANDSHAKE-7", resp.status == 400, "HTTP 400 for a session without an ID", resp.status_line,
           [resp.head.decode("latin-1")])


@requirement("HANDSHAKE-8")
@pytest.mark.parametrize("path", ["/session", "/v1.39/session", "/v1.40/session", "/v1.41/session"])
def test_session_route_without_experimental_and_with_version_prefix(daemon, path):
    needs_buildkit_build(daemon)
    # only the status line counts here: stop reading once the head is in
    resp, _ = raw_request(daemon.host, path, session_headers(new_session_id(), BASIC_METHODS), read_after=0.3,
                          enough=lambda rest: True)
    expect("HANDSHAKE-8", resp.status == 101, f"101 at {path}", resp.status_line, [resp.head.decode("latin-1")])


@requirement("HANDSHAKE-10", "TIMEOUT-1", "TIMEOUT-7")
@pytest.mark.slow
def test_closed_session_is_removed(daemon):
    needs_buildkit_build(daemon)
    timing = daemon.timing
    unknown_rule = rule_for(daemon, "unknown-session")
    ctx = make_context({"a.txt": "a"})
    live = LiveSession(daemon.host, ctx)
    time.sleep(0.3)
    live.close()
    soon = raw_build(daemon.host, build_query(live.session_id), timeout=30)
    # until its next health check the daemon keeps the closed session registered: such a build fails at once
    # (dockerd: "only one connection allowed", its one-shot dialer refusing the redial)
    expect("HANDSHAKE-10", bool(soon.errors()), "a build naming a session that just closed fails",
           f"{soon.seconds:.2f} s: {soon.errors()[:1] or soon.messages[-3:]}")
    # the session is removed at the first health tick after the close (every 1 s on dockerd 20.10, 5 s on 26.1)
    removed_by = (timing.tick_after(live.opened_at, live.closed_at) + min(0.5, 0.5 * timing.health_interval)
                  + 0.1 * timing.health_interval)
    time.sleep(max(0.0, removed_by - time.monotonic()))
    later = raw_build(daemon.host, build_query(live.session_id), timeout=30)
    errors = later.errors()
    low, high = timing.unknown_session_window
    expect("HANDSHAKE-10", bool(errors) and live.session_id in errors[0],
           "after the daemon's next health tick the session is gone: a build fails naming it",
           f"{later.seconds:.1f} s after {removed_by - live.closed_at:.1f} s: {errors[:1]}")
    expect(unknown_rule, low <= later.seconds <= high,
           f"it fails as for an unknown session, after {low:g}-{high:g} s ({timing.describe()})",
           f"{later.seconds:.1f} s: {errors[:1]}")


@requirement("HANDSHAKE-10")
def test_transfer_on_a_session_that_closes_is_cancelled_within_1s(daemon):
    needs_buildkit_build(daemon)
    ctx = make_context({"a.txt": "a"})
    got_req = threading.Event()

    def stalled_sender(stream):
        from .harness.daemon_probes import file_entry
        from reference import diffcopy as dc

        stream.send_many([dc.stat_packet(file_entry("a.txt", b"a").stat).SerializeToString(),
                          dc.end_of_listing().SerializeToString()])
        try:
            stream.recv(timeout=10)  # the REQ
            got_req.set()
            stream.recv(timeout=15)
        except (TimeoutError, RpcError):
            pass

    router = FileSyncRouter(ctx, stalled_sender)
    outcome: dict = {}
    with LiveSession(daemon.host, ctx, handler_overrides={FILESYNC_DIFFCOPY: router}) as live:
        def build():
            try:
                post_build(build_query(live.session_id), daemon.host, None, 30, 15)
                outcome["error"] = None
            except (BuildError, OSError) as exc:
                outcome["error"] = str(exc)
            outcome["at"] = time.monotonic()

        thread = threading.Thread(target=build, daemon=True)
        thread.start()
        if not got_req.wait(10):
            pytest.fail("harness: the daemon never requested the scripted file")
        live.close()
        thread.join(20)
    delay = outcome.get("at", float("inf")) - live.closed_at
    expect("HANDSHAKE-10", outcome.get("error") is not None and delay <= 1.0,
           "the build fails within 1 s of the session closing",
           f"error={outcome.get('error')!r} after {delay:.2f} s")


# -- methods --------------------------------------------------------------------------------

@requirement("METHODS-3")
def test_lower_case_method_names_enable_the_same_services(daemon):
    needs_buildkit_build(daemon)
    ctx = make_context({"a.txt": "a"})
    methods = [m.lower() for m in (HEALTH_CHECK, HEALTH_WATCH, FILESYNC_DIFFCOPY)]
    obs = run_build(daemon.host, ctx, methods=methods)
    expect("METHODS-3", obs.ok and FILESYNC_DIFFCOPY in obs.calls, "the build succeeds through DiffCopy",
           obs.describe())


@requirement("METHODS-4")
def test_unknown_advertised_methods_are_ignored(daemon):
    needs_buildkit_build(daemon)
    ctx = make_context({"a.txt": "a"})
    obs = run_build(daemon.host, ctx, extra_methods=["/moby.future.v9.Teleport/Beam", "/x.Y/Z"])
    expect("METHODS-4", obs.ok, "the build succeeds", obs.describe())


@requirement("METHODS-4")
def test_comma_joined_method_header_is_one_unknown_method(daemon):
    needs_buildkit_build(daemon)
    ctx = make_context({"a.txt": "a"})
    joined = ",".join([HEALTH_CHECK, HEALTH_WATCH, FILESYNC_DIFFCOPY])
    obs = run_build(daemon.host, ctx, methods=[joined])
    expect("METHODS-4", not obs.ok and FILESYNC_DIFFCOPY not in obs.calls,
           "no FileSync is enabled, so the build fails without calling DiffCopy", obs.describe())


# -- health ---------------------------------------------------------------------------------

@requirement("HEALTH-3", "HEALTH-5")
@pytest.mark.slow
def test_health_check_schedule(daemon):
    """One session, recorded for its first three checks: when the first comes and the gaps after it
    (dockerd 20.10: at 1 s, then every 1 s; dockerd 26.1: at 5 s, then every 5 s)."""
    needs_buildkit_build(daemon)
    rule = rule_for(daemon, "health-schedule")
    timing = daemon.timing
    ctx = make_context({"a.txt": "a"})
    times: list[float] = []
    third = threading.Event()

    def health(stream):
        times.append(time.monotonic())
        from reference.client.services import ClientServices

        ClientServices({}).health_check(stream)
        if len(times) >= 3:
            third.set()

    wait = timing.health_first + 2 * timing.health_interval + max(2.0, timing.health_interval)
    with LiveSession(daemon.host, ctx, handler_overrides={HEALTH_CHECK: health}) as live:
        third.wait(wait)
        opened = live.opened_at
    rel = [round(t - opened, 2) for t in times]
    gaps = [round(b - a, 2) for a, b in zip(times, times[1:])]
    low, high = timing.first_check_window
    expect(rule, bool(times) and low <= times[0] - opened <= high,
           f"the first check {low:g}-{high:g} s after the upgrade ({timing.describe()})", f"checks at {rel}")
    low, high = timing.check_gap_window
    expect(rule, len(gaps) >= 2 and all(low <= g <= high for g in gaps),
           f"then a check every {low:g}-{high:g} s", f"checks at {rel}, gaps {gaps}")


@requirement("HEALTH-4")
@pytest.mark.parametrize("code", [StatusCode.UNIMPLEMENTED,
                                  pytest.param(StatusCode.NOT_FOUND, marks=pytest.mark.slow)],
                         ids=["UNIMPLEMENTED", "NOT_FOUND"])
def test_failed_health_check_ends_the_session_and_its_build(daemon, code):
    needs_buildkit_build(daemon)
    ctx = make_context({"a.txt": "a"})
    checks: list[float] = []

    def failing_health(stream):
        checks.append(time.monotonic())
        stream.recv()
        raise RpcError(code, "no health here")

    def late_context(stream):
        # the first check comes (and fails) meanwhile
        time.sleep(daemon.timing.health_first + min(1.5, 1.5 * daemon.timing.health_interval))
        normal(stream)

    normal = FileSyncRouter(ctx)
    router = FileSyncRouter(ctx, late_context)
    obs = run_build(daemon.host, ctx, handler_overrides={HEALTH_CHECK: failing_health, FILESYNC_DIFFCOPY: router},
                    timeout=30, hang_timeout=10)
    expect("HEALTH-4", not obs.ok, f"the build fails once Health/Check answered {code.name}", obs.describe())
    expect("HEALTH-4", len(checks) == 1, "no second health check after the first failure",
           f"{len(checks)} checks")


@requirement("HEALTH-4", "TIMEOUT-1", "TIMEOUT-7")
@pytest.mark.slow
def test_session_without_health_service_is_gone_for_a_later_build(daemon):
    needs_buildkit_build(daemon)
    timing = daemon.timing
    unknown_rule = rule_for(daemon, "unknown-session")
    ctx = make_context({"a.txt": "a"})

    def unimplemented(stream):
        stream.recv()
        raise RpcError(StatusCode.UNIMPLEMENTED, "unknown service grpc.health.v1.Health")

    methods = [FILESYNC_DIFFCOPY]
    with LiveSession(daemon.host, ctx, handler_overrides={HEALTH_CHECK: unimplemented}, methods=methods) as live:
        # the first check (and the end of the session) comes at health_first
        settle = min(1.0, timing.health_interval)
        time.sleep(max(0.0, live.opened_at + timing.health_first + settle - time.monotonic()))
        build = raw_build(daemon.host, build_query(live.session_id), timeout=30)
    errors = build.errors()
    expect("HEALTH-4", bool(errors), f"a build {timing.health_first + settle:g} s after the session opened fails "
           "(the session is gone)", build.messages[-3:])
    low, high = timing.unknown_session_window
    expect(unknown_rule, low <= build.seconds <= high and live.session_id in errors[0],
           f"it fails after {low:g}-{high:g} s naming the session ({timing.describe()})",
           f"{build.seconds:.1f} s: {errors[0]}")


# -- timeouts -------------------------------------------------------------------------------

@requirement("TIMEOUT-1", "TIMEOUT-7", "BUILD-5")
def test_unknown_session_fails_after_the_generations_wait(daemon):
    needs_buildkit_build(daemon)
    rule = rule_for(daemon, "unknown-session")
    timing = daemon.timing
    session_id = new_session_id()
    build = raw_build(daemon.host, build_query(session_id), timeout=30)
    errors = build.errors()
    expect("BUILD-5", build.status == 200 and bool(errors) and build.ended,
           "HTTP 200, then errorDetail, then the end", (build.status, build.messages[-2:], build.ended))
    low, high = timing.unknown_session_window
    expect(rule, low <= build.seconds <= high, f"the failure after {low:g}-{high:g} s ({timing.describe()})",
           f"{build.seconds:.1f} s")
    expect(rule, session_id in errors[0], "the error names the session ID", errors[0])


# -- /build API -----------------------------------------------------------------------------

@requirement("BUILD-3", "BUILD-4")
def test_build_reports_trace_and_image_id(daemon):
    needs_buildkit_build(daemon)
    ctx = make_context({"a.txt": "a"})
    with LiveSession(daemon.host, ctx) as live:
        build = raw_build(daemon.host, build_query(live.session_id), timeout=30)
    assert build.status == 200, f"harness: /build answered {build.status}: {build.error_body}"
    traces = [m for m in build.messages if m.get("id") == "moby.buildkit.trace"]
    decoded = 0
    for m in traces:
        try:
            StatusResponse.FromString(base64.b64decode(m["aux"], validate=True))
            decoded += isinstance(m["aux"], str)
        except Exception:
            pass
    expect("BUILD-3", traces and decoded == len(traces),
           "moby.buildkit.trace messages whose aux is base64 of a StatusResponse",
           f"{len(traces)} trace messages, {decoded} decodable")
    vertexes = set()
    for m in traces:
        vertexes.update(v.name for v in StatusResponse.FromString(base64.b64decode(m["aux"])).vertexes)
    expect("BUILD-3", bool(vertexes), "the trace names the build's vertexes", vertexes)
    ids = [m for m in build.messages if m.get("id") == "moby.image.id"]
    expect("BUILD-4", len(ids) == 1 and str(ids[0].get("aux", {}).get("ID", "")).startswith("sha256:"),
           "one moby.image.id message with aux.ID", ids)
    expect("BUILD-4", build.ended and not build.errors(), "the response then ends without error",
           build.messages[-2:])


@requirement("BUILD-5", "ERROR-2")
def test_failed_build_reports_error_detail_with_status_200(daemon):
    needs_buildkit_build(daemon)
    ctx = make_context({"a.txt": "a"}, dockerfile="FROM scratch\nCOPY no-such-file /\n")
    with LiveSession(daemon.host, ctx) as live:
        build = raw_build(daemon.host, build_query(live.session_id), timeout=30)
    errors = build.errors()
    expect("BUILD-5", build.status == 200 and build.ended and bool(errors),
           "HTTP 200, a message with errorDetail, and the end of the response",
           (build.status, build.ended, build.messages[-2:]))
    detail = [m["errorDetail"].get("message", "") for m in build.messages if "errorDetail" in m]
    expect("BUILD-5", bool(detail) and all(detail), "errorDetail carries a message", build.messages[-2:])
    expect("ERROR-2", "no-such-file" in errors[0], "the error names the missing source", errors[0])


# -- negotiation ------------------------------------------------------------------------------

@requirement("NEGOTIATE-1")
def test_daemon_picks_its_preferred_protocol(daemon):
    ctx = make_context({"a.txt": "a"})
    needs_buildkit_build(daemon)
    obs = run_build(daemon.host, ctx, filesync=("diffcopy", "tarstream"))
    expect("NEGOTIATE-1", obs.ok and FILESYNC_DIFFCOPY in obs.calls and FILESYNC_TARSTREAM not in obs.calls,
           "with both advertised a daemon of generation n or later uses DiffCopy only", obs.describe())


@requirement("NEGOTIATE-2")
def test_no_common_protocol_fails_naming_both_sides(daemon):
    needs_buildkit_build(daemon)
    ctx = make_context({"a.txt": "a"})
    # the client serves no file sync protocol the daemon knows, only a future one
    future = "/moby.filesync.v1.FileSync/FutureCopy"
    obs = run_build(daemon.host, ctx, filesync=(), extra_methods=[future])
    text = (obs.error or "").lower()
    expect("NEGOTIATE-2", not obs.ok and not any("FileSync" in c for c in obs.calls),
           "the build fails without any FileSync call", obs.describe())
    expect("NEGOTIATE-2", "diffcopy" in text and "futurecopy" in text,
           "the error names the daemon's protocols and the client's FileSync methods", obs.error)


@requirement("NEGOTIATE-3")
def test_build_stream_protocol_env_restricts_the_daemon(daemon):
    if reason := not_applicable_reason("NEGOTIATE-3", daemon.generation):
        pytest.skip(f"not applicable: {reason}")
    if daemon.process is None:
        pytest.skip("BUILD_STREAM_PROTOCOL is an environment variable of the daemon process: only an embedded "
                    "reference daemon can be started with it")
    needs_buildkit_build(daemon)
    from .harness.daemon_probes import start_private_reference_daemon

    private = start_private_reference_daemon(daemon.generation, daemon.spec.transport,
                                             extra_args=daemon.spec.daemon_args,  # the target's short timers
                                             env={"BUILD_STREAM_PROTOCOL": "TarStream"})
    try:
        ctx = make_context({"a.txt": "a"})
        both = run_build(private.host, ctx, filesync=("diffcopy", "tarstream"))
        only_diffcopy = run_build(private.host, ctx, filesync=("diffcopy",))
    finally:
        private.stop()
    # dockerd 20.10 and 26.1 know diffcopy alone: with TarStream forced they have no protocol left.
    expect("NEGOTIATE-3", FILESYNC_DIFFCOPY not in both.calls and both.ok == (FILESYNC_TARSTREAM in both.calls),
           "with BUILD_STREAM_PROTOCOL=TarStream the daemon uses TarStream although DiffCopy is offered, or, "
           "knowing no TarStream, fails without calling DiffCopy", both.describe())
    expect("NEGOTIATE-3", not only_diffcopy.ok and not any("FileSync" in c for c in only_diffcopy.calls),
           "and does not fall back to DiffCopy", only_diffcopy.describe())
