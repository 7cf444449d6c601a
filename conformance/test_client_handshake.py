"""Client role: the session handshake, the server role after the upgrade, method
advertisement, health, concurrency, failing calls and the /build request.

The suite plays the daemon (conformance.harness.daemon_scripts.ScriptDaemon)
and runs the client under test once per case.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time

import pytest
from grpc_health.v1 import health_pb2

from reference.pb import auth_pb2, secrets_pb2
from reference.transport.base import RpcError, StatusCode
from reference import diffcopy as dc

from .harness.daemon_scripts import (
    AUTH_CREDENTIALS, AUTH_FETCH_TOKEN, AUTH_GET_TOKEN_AUTHORITY, AUTH_VERIFY_TOKEN_AUTHORITY, DIFFCOPY, GET_SECRET,
    HEALTH, H2_PREFACE, TARSTREAM, CallOutcome, ScriptResult, finish, open_diffcopy, read_listing, recv_packet,
    run_client, send_packet, unary, vertex_error_trace,
)
from .harness.entry_points import tar_names, NoBuildRequested, build_request_rule, entry_point
from .harness.instrumented_daemon import ScenarioResult
from .harness.scenarios import fetch
from .harness.scripted_client import make_context
from .outcomes import expect, not_applicable

requirement = pytest.mark.requirement

HEALTH_REQUEST = health_pb2.HealthCheckRequest().SerializeToString()
SESSION_PATH = re.compile(r"^(/v\d+\.\d+)?/session$")


def _health(session) -> CallOutcome:
    return unary(session, HEALTH, HEALTH_REQUEST, timeout=10.0)


def _serving(outcome: CallOutcome) -> bool:
    return outcome.ok and len(outcome.messages) == 1 and \
        health_pb2.HealthCheckResponse.FromString(outcome.messages[0]).status == 1


def tar_fetch(session, dir_name: str | None = None, *, timeout: float = 30.0, metadata=()) -> CallOutcome:
    """Read a whole TarStream call (generation n-1)."""
    md = ([] if dir_name is None else [("dir-name", dir_name)]) + list(metadata)
    stream = session.conn.open_stream(TARSTREAM, md)
    stream.close_send()
    return finish(stream, CallOutcome(), timeout)


def fetch_something(session, generation: str):
    """What a daemon of the client's generation does first: pull the Dockerfile."""
    if generation == "n-1":
        return tar_fetch(session)
    return fetch(session, "dockerfile", followpaths=["Dockerfile", "Dockerfile.dockerignore", "dockerfile"])


# -- the upgrade request ---------------------------------------------------------------

@requirement("HANDSHAKE-1", "HANDSHAKE-2", "ROLE-1", "TIMEOUT-2", "METHODS-1", "METHODS-2", "HEALTH-1", "SECRETS-2",
             "BUILD-1", "BUILD-7", "BUILD-8", "GRPC-3")
def test_session_request_and_server_role(client):
    seen = {}

    def scenario(build):
        session = build.session
        seen["health"] = _health(session)
        seen["fetch"] = fetch_something(session, client.generation)
        # Every advertised method must be served (not UNIMPLEMENTED).
        probes = {}
        for method in session.methods:
            key = method.lower()
            if key == HEALTH.lower():
                continue
            if key == "/grpc.health.v1.health/watch":
                stream = session.conn.open_stream(method)
                stream.send(HEALTH_REQUEST)
                stream.close_send()
                outcome = CallOutcome()
                try:
                    outcome.messages.append(stream.recv(timeout=5.0))
                    stream.cancel()
                except (RpcError, TimeoutError) as exc:
                    outcome.code = getattr(exc, "code", None)
                probes[method] = outcome
            elif key == DIFFCOPY.lower():
                probes[method] = CallOutcome(code=StatusCode.OK) if not seen["fetch"].__dict__.get("error") \
                    else CallOutcome(code=StatusCode.UNKNOWN, details=str(seen["fetch"].error))
            elif key == TARSTREAM.lower():
                probes[method] = tar_fetch(session, None if client.generation == "n-1" else "context")
            elif key == AUTH_CREDENTIALS.lower():
                probes[method] = unary(session, method, auth_pb2.CredentialsRequest(Host="conformance.invalid")
                                       .SerializeToString())
            elif key == AUTH_GET_TOKEN_AUTHORITY.lower():
                probes[method] = unary(session, method, auth_pb2.GetTokenAuthorityRequest(
                    Host="conformance.invalid", Salt=os.urandom(32)).SerializeToString())
            elif key == AUTH_VERIFY_TOKEN_AUTHORITY.lower():
                probes[method] = unary(session, method, auth_pb2.VerifyTokenAuthorityRequest(
                    Host="conformance.invalid", Salt=os.urandom(32), Payload=os.urandom(32)).SerializeToString())
            elif key == AUTH_FETCH_TOKEN.lower():
                probes[method] = unary(session, method, auth_pb2.FetchTokenRequest(
                    ClientID="buildkit-client", Host="127.0.0.1:9", Realm="http://127.0.0.1:9/token",
                    Service="conformance").SerializeToString(), timeout=20.0)
            elif key == GET_SECRET.lower():  # advertised without --secret (buildx always does)
                probes[method] = unary(session, method, secrets_pb2.GetSecretRequest(
                    ID="conformance-unregistered").SerializeToString())
            else:
                probes[method] = unary(session, method, b"", timeout=5.0)
        seen["probes"] = probes
        return ScenarioResult()

    ctx = make_context({"a.txt": "a"})
    daemon, run = run_client(client, ctx, scenario)
    build_rule = build_request_rule(client, daemon)
    expect(build_rule, len(daemon.builds) == 1, "one build (POST /build, or a Control/Solve that runs the "
           "Dockerfile frontend)", daemon.requests, [run.output])
    build = daemon.builds[0]
    session_posts = [(m, t) for m, t in daemon.requests if t.split("?")[0].endswith("/session")]
    # buildx opens a session for each of its capability probes too: every one must be such a request
    expect("HANDSHAKE-1", session_posts and all(m == "POST" and SESSION_PATH.match(t.split("?")[0])
                                                for m, t in session_posts),
           "POST to /session or /v<api>/session", daemon.requests)
    session_param = build.session_id
    arrived, headers = next(((at, h) for at, h in daemon.session_requests
                             if dict(h).get("x-docker-expose-session-uuid") == session_param),
                            daemon.session_requests[0])
    values = {}
    for k, v in headers:
        values.setdefault(k, []).append(v)
    connection_tokens = {t.strip().lower() for v in values.get("connection", []) for t in v.split(",")}
    expect("HANDSHAKE-1", "upgrade" in connection_tokens and values.get("upgrade") == ["h2c"],
           "Connection: Upgrade and Upgrade: h2c", headers)
    expect("HANDSHAKE-1", values.get("content-length", ["0"]) == ["0"] and "transfer-encoding" not in values,
           "no request body", headers)
    uuids = values.get("x-docker-expose-session-uuid", [])
    expect("HANDSHAKE-2", len(uuids) == 1 and uuids[0] and uuids[0] == session_param,
           f"exactly one non-empty Uuid header, equal to the build's session ({build.api})", (uuids, session_param))
    expect("TIMEOUT-2", build.session is not None and arrived - build.arrived <= 5.0,
           "the session is upgraded within 5 s of the build request", arrived - build.arrived, [run.output])
    first = daemon.first_bytes(session_param)
    expect("ROLE-1", not first.startswith(H2_PREFACE[:4]) and len(first) >= 9 and first[3] == 0x4,
           "the client speaks first as an HTTP/2 server: a SETTINGS frame, no client preface", first)
    methods = values.get("x-docker-expose-session-grpc-method", [])
    bad = [m for m in methods if not re.fullmatch(r"/[A-Za-z0-9_.]+/[A-Za-z0-9_]+", m)]
    expect("METHODS-1", methods and not bad, "one full /package.Service/Method per header line", methods)
    lower = {m.lower() for m in methods}
    expect("METHODS-2", HEALTH.lower() in lower, "Health/Check advertised", methods)
    needed = TARSTREAM if client.generation == "n-1" else DIFFCOPY
    expect("METHODS-2", needed.lower() in lower, f"{needed} advertised by a generation {client.generation} client",
           methods)
    expect("HEALTH-1", _serving(seen["health"]), "Health/Check answers SERVING", seen["health"].describe())
    unimplemented = {m: o.describe() for m, o in seen["probes"].items() if o.code == StatusCode.UNIMPLEMENTED}
    expect("METHODS-2", not unimplemented, "no advertised method answers UNIMPLEMENTED", unimplemented,
           [f"{m}: {o.describe()}" for m, o in seen["probes"].items()])
    secret = next((o for m, o in seen["probes"].items() if m.lower() == GET_SECRET.lower()), None)
    if secret is not None:
        expect("SECRETS-2", secret.code == StatusCode.NOT_FOUND,
               "Secrets advertised without --secret: NOT_FOUND for an ID the client does not have",
               secret.describe())
    expect(build_rule, run.returncode == 0, "the build succeeds", run.output)


@requirement("HANDSHAKE-2")
def test_session_ids_are_fresh(client, tmp_path):
    ctx = make_context({"a.txt": "a"})
    env = {"DOCKER_CONFIG": str(tmp_path / "config")}
    ids = []
    for _ in range(2):
        daemon, run = run_client(client, ctx, lambda build: ScenarioResult(), env=env)
        expect("HANDSHAKE-2", run.returncode == 0 and daemon.session_requests, "a build with a session", run.output)
        ids.append(dict(daemon.session_requests[0][1]).get("x-docker-expose-session-uuid", ""))
    expect("HANDSHAKE-2", len(set(ids)) == 2 and all(ids), "a different session ID on every run", ids)


@requirement("HANDSHAKE-3")
def test_shared_key_follows_the_context_directory(client, tmp_path, monkeypatch):
    """``build .`` in one directory twice, then in another, then in a third one with the same base name as
    the first (``one/app``, ``two/app``): the key must follow the directory."""
    contexts = [tmp_path / "one" / "app", tmp_path / "other", tmp_path / "two" / "app"]
    for ctx in contexts:
        ctx.mkdir(parents=True)
        (ctx / "Dockerfile").write_text("FROM scratch\nCOPY . /\n")
        (ctx / f"{ctx.parent.name}.txt").write_text("x")
    env = {"DOCKER_CONFIG": str(tmp_path / "config")}  # the node ID lives there
    seen = []
    for ctx in (contexts[0], contexts[0], contexts[1], contexts[2]):
        monkeypatch.chdir(ctx)
        daemon, run = run_client(client, ".", lambda build: ScenarioResult(), env=env)
        expect("HANDSHAKE-3", run.returncode == 0 and daemon.session_requests, "a build with a session", run.output)
        seen.append(dict(daemon.session_requests[0][1]))
    keys = [h.get("x-docker-expose-session-sharedkey", "") for h in seen]
    names = [h.get("x-docker-expose-session-name") for h in seen]
    expect("HANDSHAKE-3", all(names) and all(keys), "Name and SharedKey headers sent", seen)
    expect("HANDSHAKE-3", keys[0] == keys[1] and keys[0] != keys[2],
           "the same shared key for the same directory, another for another directory (context argument '.')",
           keys)
    expect("HANDSHAKE-3", keys[0] != keys[3],
           "another shared key for another directory with the same base name (one/app, two/app)", keys)


@requirement("HANDSHAKE-9")
def test_refused_upgrade_is_reported(client):
    message = "conformance refuses this session (code 7731)"
    body = json.dumps({"message": message}).encode()
    ctx = make_context({"a.txt": "a"})
    daemon, run = run_client(client, ctx, lambda build: ScenarioResult(), expect_build=False,
                             daemon_kw={"refuse": (400, body), "session_wait": 1.0}, timeout=60)
    if not daemon.session_requests:
        raise NoBuildRequested(f"harness precondition: the client never asked for a session; exit status "
                               f"{run.returncode}; last output:\n{run.output[-1500:]}")
    sent = b"".join(daemon.after_refusal)
    expect("HANDSHAKE-9", H2_PREFACE[:4] not in sent and b"\x00\x00" not in sent[:3],
           "no HTTP/2 on a connection that was not upgraded", sent[:64])
    expect("HANDSHAKE-9", run.returncode != 0, "the build fails", f"exit {run.returncode}", [run.output])
    expect("HANDSHAKE-9", "7731" in run.output, f"the daemon's message ({message!r}) is reported",
           run.output[-2000:])
    expect("HANDSHAKE-9", "400" in run.output or "Bad Request" in run.output,
           "the HTTP status (400) is reported", run.output[-2000:])


@requirement("TIMEOUT-6")
def test_client_exits_when_its_build_is_refused_before_the_upgrade(client):
    """dockerd refuses some build options at once (HTTP 400), while the client's upgrade may
    still be in flight. Here the 101 waits up to 0.5 s for that answer; once the answer has gone
    out it never comes, so the client must give up its session on its own. (A client that
    upgrades before it sends /build gets its 101 after 0.5 s, then the refusal.)"""
    message = 'Unsupported isolation: "conformance-7732"'
    body = json.dumps({"message": message}).encode()
    daemon, run = run_client(client, make_context({"a.txt": "a"}),
                             daemon_kw={"refuse_build": (400, body), "hold_upgrade": 0.5}, timeout=15)
    if not daemon.build_arrivals:
        raise NoBuildRequested(f"harness precondition: the client asked for no build; exit status {run.returncode}; "
                               f"last output:\n{run.output[-1500:]}")
    order = [what for _, what in sorted(daemon.timeline)]
    expect("TIMEOUT-6", run.returncode not in (0, -9), "the client exits, with an error",
           f"exit {run.returncode}; daemon saw: {order}", [run.output[-2000:]])
    expect("TIMEOUT-6", "conformance-7732" in run.output, f"the daemon's message ({message!r}) is reported",
           run.output[-2000:])


@requirement("HANDSHAKE-5")
def test_101_is_parsed_generically(client):
    """The 101 and the daemon's HTTP/2 preface arrive in one write, and the head
    carries another reason phrase and extra headers such as Content-Length: 0."""
    kw = {"coalesce": True, "reason": "UPGRADED",
          "extra_headers": [("Content-Type", "application/vnd.docker.raw-stream"), ("Content-Length", "0"),
                            ("Api-Version", "1.41")]}
    seen = {}

    def scenario(build):
        seen["health"] = _health(build.session)
        seen["fetch"] = fetch_something(build.session, client.generation)
        return ScenarioResult()

    daemon, run = run_client(client, make_context({"a.txt": "a"}), scenario, daemon_kw=kw)
    # any gRPC status proves the HTTP/2 after the 101 works: a client without Health (UNIMPLEMENTED) fails
    # HEALTH-1 for that, not this rule
    expect("HANDSHAKE-5", "health" in seen and seen["health"].code is not None,
           "a gRPC answer on the session after the 101", seen.get("health") and seen["health"].describe(),
           [run.output])
    expect("HANDSHAKE-5", run.returncode == 0, "the build succeeds", run.output)


# -- calls that fail, unknown methods -----------------------------------------------------

@requirement("ROLE-3", "ROLE-4", "ERROR-1", "META-2")
def test_unknown_methods_and_failing_calls_leave_the_session_usable(client):
    seen = {}

    def scenario(build):
        session = build.session
        seen["unknown"] = unary(session, "/moby.conformance.v1.Nothing/Here", b"\x0a\x01x")
        seen["unknown-health"] = unary(session, "/grpc.health.v1.Health/Nope", HEALTH_REQUEST)
        seen["health-1"] = _health(session)
        if client.generation != "n-1":
            stream = open_diffcopy(session, "no-such-dir-conformance")
            seen["bad-dir"] = finish(stream, CallOutcome(), 10.0, packets=True)
            stream = open_diffcopy(session, None)
            seen["no-dir"] = finish(stream, CallOutcome(), 10.0, packets=True)
        else:
            seen["bad-dir"] = tar_fetch(session, "no-such-dir-conformance", timeout=10.0)
        seen["health-2"] = _health(session)
        seen["fetch"] = fetch_something(session, client.generation)
        return ScenarioResult()

    daemon, run = run_client(client, make_context({"a.txt": "a"}), scenario)
    for key in ("unknown", "unknown-health"):
        o = seen[key]
        expect("ROLE-4", o.code == StatusCode.UNIMPLEMENTED, "UNIMPLEMENTED (12)", o.describe())
        expect("ROLE-3", "no grpc-status" not in o.details, "the call ends with grpc-status", o.details)
    bad = seen["bad-dir"]
    expect("ERROR-1", bad.code not in (None, StatusCode.OK) and bad.details,
           "a failing handler ends its call with a non-OK status and a message", bad.describe(), bad.transcript)
    expect("ROLE-3", "no grpc-status" not in bad.details, "the failed call carries grpc-status", bad.details)
    if client.generation != "n-1":
        expect("META-2", bad.code == StatusCode.NOT_FOUND and not bad.messages,
               "NOT_FOUND before any packet for an unknown dir-name", bad.describe(), bad.transcript)
        nodir = seen["no-dir"]
        expect("META-2", nodir.code == StatusCode.NOT_FOUND and not nodir.messages,
               "NOT_FOUND without dir-name (the client serves no unnamed directory)", nodir.describe(),
               nodir.transcript)
    for key in ("health-1", "health-2"):
        expect("ROLE-4", _serving(seen[key]), "the session still answers Health/Check", seen[key].describe())
    fetched = seen["fetch"]
    ok = fetched.ok if isinstance(fetched, CallOutcome) else (fetched.error is None)
    expect("ERROR-1", ok, "the session still serves file sync after failed calls",
           fetched.describe() if isinstance(fetched, CallOutcome) else fetched.error)
    expect("ERROR-1", run.returncode == 0, "the build succeeds", run.output)


# -- concurrency and health under load --------------------------------------------------------

BIG_SIZE = 64 << 20


@pytest.fixture(scope="module")
def big_context():
    ctx = make_context({"small/a.txt": "a", "small/b.txt": "b" * 100})
    with open(os.path.join(ctx, "big.bin"), "wb") as fh:
        block = os.urandom(1 << 20)
        for _ in range(BIG_SIZE >> 20):
            fh.write(block)
    return ctx


@requirement("ROLE-5", "HEALTH-1", "HEALTH-2", "DIFFCOPY-DATA-1", "DIFFCOPY-DATA-2")
def test_health_and_parallel_transfers_while_a_large_transfer_is_blocked(client, big_context):
    seen = {"health": [], "parallel": {}}

    def timed_health(session, label):
        started = time.monotonic()
        o = _health(session)
        seen["health"].append((label, time.monotonic() - started, o))

    def scenario_n_plus_1(build):
        session = build.session
        transcript: list[str] = []
        stream = open_diffcopy(session, "context")
        listing = read_listing(stream, transcript)
        ids = {s.path: i for i, s in enumerate(listing.stats)}
        seen["listing"] = listing
        if "big.bin" not in ids or not listing.ended:
            seen["error"] = "no usable listing"
            return ScenarioResult(image_id=None, error="no listing")
        send_packet(stream, dc.req_packet(ids["big.bin"]), transcript)
        first = recv_packet(stream, 20, transcript)
        seen["first"] = first
        # Stop reading: the client's sender now blocks on flow control.
        time.sleep(0.25)
        timed_health(session, "while blocked")
        threads = []
        for name, kw in (("dockerfile", {"followpaths": ["Dockerfile"]}),
                         ("context", {"followpaths": ["small/a.txt"]}),
                         ("context", {"excludes": ["big.bin"]})):
            def run_fetch(name=name, kw=kw, key=len(threads)):
                seen["parallel"][key] = fetch(session, name, timeout=20, **kw)
            threads.append(threading.Thread(target=run_fetch))
        checker = threading.Thread(target=timed_health, args=(session, "during parallel fetches"))
        for t in threads + [checker]:
            t.start()
        for t in threads + [checker]:
            t.join(40)
        # Resume the big transfer and stream it all while checking health.
        sizes = [len(first.data)] if first is not None and first.type == dc.PACKET_DATA else []
        total = sum(sizes)
        end_seen = False
        checker = threading.Thread(target=timed_health, args=(session, "while streaming"))
        checker.start()
        while not end_seen:
            raw = stream.recv(timeout=30)
            if raw is None:
                break
            p = dc.decode_packet(raw)
            if p.type != dc.PACKET_DATA:
                transcript.append("> " + dc.describe(p))
                break
            if p.data:
                sizes.append(len(raw))
                total += len(p.data)
            else:
                end_seen = True
        checker.join(20)
        seen["sizes"], seen["total"], seen["eof"] = sizes, total, end_seen
        send_packet(stream, dc.fin_packet(), transcript)
        seen["after"] = finish(stream, CallOutcome(), 10, packets=True)
        seen["transcript"] = transcript
        return ScenarioResult()

    def scenario_n(build):
        session = build.session
        stream = session.conn.open_stream(TARSTREAM, [])
        stream.close_send()
        stream.recv(timeout=20)
        time.sleep(0.25)
        timed_health(session, "while blocked")
        checker = threading.Thread(target=timed_health, args=(session, "while streaming"))
        checker.start()
        outcome = finish(stream, CallOutcome(), 60)
        checker.join(20)
        seen["tar"] = outcome
        return ScenarioResult()

    scenario = scenario_n if client.generation == "n-1" else scenario_n_plus_1
    daemon, run = run_client(client, big_context, scenario, timeout=120)
    for label, seconds, o in seen["health"]:
        expect("HEALTH-1", _serving(o), f"SERVING {label}", o.describe(), [run.output])
        expect("HEALTH-2", seconds < 10.0, f"Health/Check answered within 10 s {label}", f"{seconds:.2f} s")
    expect("HEALTH-2", len(seen["health"]) == (2 if client.generation == "n-1" else 3), "every health check ran",
           [h[0] for h in seen["health"]], [f"exit {run.returncode}", run.output[-3000:], *daemon.errors])
    if client.generation == "n-1":
        expect("ROLE-5", seen["tar"].ok, "the blocked TarStream completes once read again", seen["tar"].describe())
        return  # concurrent DiffCopy streams are generation n and later; health under a blocked TarStream was checked
    transcript = seen.get("transcript", [])
    for key, result in sorted(seen["parallel"].items()):
        expect("ROLE-5", result.error is None and result.status == "complete",
               "each concurrent DiffCopy completes while another stream is blocked",
               f"stream {key}: {result.error or result.status}", result.transcript)
    expect("ROLE-5", len(seen["parallel"]) == 3, "three concurrent transfers ran", seen["parallel"].keys())
    expect("DIFFCOPY-DATA-1", seen["eof"] and seen["total"] == BIG_SIZE,
           f"{BIG_SIZE} bytes of DATA then an empty DATA", (seen["total"], seen["eof"]), transcript)
    expect("DIFFCOPY-DATA-2", max(seen["sizes"]) <= 4 * 1024 * 1024, "every message fits in 4 MiB",
           max(seen["sizes"]))
    expect("DIFFCOPY-DATA-1", seen["after"].messages and dc.decode_packet(seen["after"].messages[0]).type ==
           dc.PACKET_FIN and seen["after"].ok, "FIN in reply, then the call ends OK", seen["after"].describe(),
           seen["after"].transcript)


# -- the /build request --------------------------------------------------------------------------

@requirement("BUILD-1", "BUILD-2", "BUILD-7", "BUILD-8", "GRPC-3")
def test_build_request_and_served_directories(client, tmp_path):
    ctx = make_context({"ctx-file.txt": "context"}, dockerfile="FROM scratch\n# context Dockerfile\n")
    df_dir = tmp_path / "elsewhere"
    df_dir.mkdir()
    dockerfile = df_dir / "Custom.Dockerfile"
    dockerfile.write_bytes(b"FROM scratch\nCOPY ctx-file.txt /\n# from -f\n")
    (df_dir / "unrelated.txt").write_text("x")
    seen = {}

    def scenario(build):
        session = build.session
        if client.generation == "n-1":
            seen["tar"] = tar_fetch(session)
            return ScenarioResult()
        name = (build.query.get("dockerfile") or [""])[0]
        seen["dockerfile"] = fetch(session, "dockerfile", followpaths=[name, name + ".dockerignore"])
        seen["context"] = fetch(session, "context")
        return ScenarioResult()

    daemon, run = run_client(client, ctx, scenario, extra_args=["-f", str(dockerfile)])
    rule = build_request_rule(client, daemon)
    expect(rule, daemon.builds, "a build request", daemon.requests, [run.output[-2000:]])
    build = daemon.builds[0]
    q = {k: v[0] for k, v in build.query.items()}
    if client.generation == "n-1":
        expect("BUILD-7", q.get("remote") == "client-session" and q.get("session") and q.get("version") != "2",
               "/build?remote=client-session&session=ID for the legacy builder", build.target)
        expect("BUILD-7", build.body == dockerfile.read_bytes(), "the Dockerfile as the request body",
               build.body[:200])
        expect("BUILD-7", run.returncode == 0, "the build succeeds", run.output)
        return
    if build.api == "body":  # the body-upload profile: the Dockerfile is in the body, no directory is served
        names = tar_names(build.body)
        expect("BUILD-8", q.get("dockerfile") in names, "the -f Dockerfile in the body at the path dockerfile= names",
               (q.get("dockerfile"), names[:20]))
        expect(rule, run.returncode == 0, "the build succeeds", run.output)
        return
    if build.api == "build":
        expect("BUILD-1", q.get("version") == "2" and q.get("remote") == "client-session" and
               q.get("session") == build.session.session_id and q.get("buildid"),
               "version=2, remote=client-session, session=<id>, buildid", build.target)
        expect("BUILD-1", q.get("dockerfile") == "Custom.Dockerfile", "dockerfile=<base name>", q.get("dockerfile"))
        expect("BUILD-1", build.body == b"", "an empty body", build.body[:200])
    else:
        expect("GRPC-3", build.session is not None and build.solve.Session == build.session.session_id,
               "Control/Solve's Session names the client's open session", build.solve.Session)
        expect("GRPC-3", build.frontend_options.get("filename") == "Custom.Dockerfile",
               "the frontend option filename=<base name of -f>", build.frontend_options)
    df = seen["dockerfile"]
    expect("BUILD-2", df.error is None and os.path.exists(os.path.join(df.dest, "Custom.Dockerfile")),
           "dir-name=dockerfile serves the directory of -f", df.error or sorted(s.path for s in df.stats),
           df.transcript)
    with open(os.path.join(df.dest, "Custom.Dockerfile"), "rb") as fh:
        expect("BUILD-2", fh.read() == dockerfile.read_bytes(), "the -f Dockerfile's content", "different")
    cx = seen["context"]
    paths = sorted(s.path for s in cx.stats)
    expect("BUILD-2", cx.error is None and "ctx-file.txt" in paths and "unrelated.txt" not in paths,
           "dir-name=context serves the context directory", cx.error or paths, cx.transcript)
    expect(rule, run.returncode == 0, "the build succeeds", run.output)


@requirement("BUILD-6", "GRPC-4")
def test_error_detail_fails_the_build(client):
    if client.generation == "n-1":
        pytest.skip("BUILD-6 is a rule of generation n and later; this client is generation n-1")
    text = "conformance step failed (code 5521)"
    result = ScenarioResult(image_id=None, error=text, trace=[vertex_error_trace(text)])
    daemon, run = run_client(client, make_context({"a": "a"}), lambda build: result)
    # the same failure reaches a /grpc client as the error of its frontend's solve
    rule = "BUILD-6" if entry_point(daemon) == "build" else "GRPC-4"
    not_applicable({"BUILD-6": "GRPC-4", "GRPC-4": "BUILD-6"}[rule],
                   f"the client asked for its build through POST /{entry_point(daemon)}")
    expect(rule, run.returncode != 0, "a non-zero exit for a failed build (errorDetail, or a failed Solve)",
           f"exit {run.returncode}", [run.output])
    expect(rule, "5521" in run.output, "the error message is shown", run.output[-2000:])


@requirement("TIMEOUT-5")
def test_vertex_error_without_end_of_response(client, request):
    """dockerd 20.10 can report a failed step and never end /build (FILESEND-2)."""
    if client.generation == "n-1":
        pytest.skip("TIMEOUT-5 is a rule of generation n and later; this client is generation n-1")
    text = "method /moby.filesync.v1.FileSend/diffcopy not supported by the client"
    result = ScriptResult(image_id=None, trace=[vertex_error_trace(text)], hang=True)
    bound = 45.0
    daemon, run = run_client(client, make_context({"a": "a"}), lambda build: result, timeout=bound)
    expect("TIMEOUT-5", run.returncode not in (0, -9), f"the client ends the build with an error within {bound:.0f} s",
           f"exit {run.returncode} after {run.seconds:.1f} s", [run.output[-1500:]])
