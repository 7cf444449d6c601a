"""Client role: the build through BuildKit's control API on ``POST /grpc`` (buildx's way, the reference client n+1).

The instrumented daemon serves ``/grpc`` with the reference daemon's Control service and runs the case's scenario
where a real daemon runs the Dockerfile frontend (conformance/harness/control_api.py). A client that asks for its
builds with ``POST /build`` does not offer this entry point: these cases are UNSUPPORTED for it.
"""

from __future__ import annotations

import time

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from reference.daemon.control import BUILD_ID_METADATA, GATEWAY
from reference.pb.control_pb2 import StatusResponse, Vertex

from .harness.daemon_scripts import run_client, vertex_error_trace
from .harness.entry_points import entry_point
from .harness.instrumented_daemon import ScenarioResult
from .harness.scenarios import DockerdLikeFetch
from .harness.scripted_client import make_context
from .outcomes import expect, unsupported

requirement = pytest.mark.requirement

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# how long a client may take to close its session after its build failed
SESSION_CLOSE_BOUND = 10.0


def _grpc_build(client, scenario, **kw):
    if client.generation == "n-1":
        pytest.skip("the control API is generation n and later; this client is generation n-1")
    daemon, run = run_client(client, make_context({"a.txt": "a"}), scenario, **kw)
    if entry_point(daemon) != "grpc":
        unsupported("the client asks for its builds with POST /build, not through BuildKit's control API")
    return daemon, run


@requirement("GRPC-1", "GRPC-3")
def test_the_control_api_upgrade_and_a_solve_that_names_the_session(client):
    scenario = DockerdLikeFetch()
    daemon, run = _grpc_build(client, scenario)
    record = daemon.control_api.record
    served = [c for c in record.connections if c.calls]
    expect("GRPC-1", served, "a POST /grpc connection on which the client made calls",
           [c.headers for c in record.connections], [run.output[-2000:]])
    for connection in record.connections:
        values: dict[str, list[str]] = {}
        for k, v in connection.headers:
            values.setdefault(k, []).append(v)
        tokens = {t.strip().lower() for v in values.get("connection", []) for t in v.split(",")}
        expect("GRPC-1", "upgrade" in tokens and values.get("upgrade") == ["h2c"],
               "Connection: Upgrade and Upgrade: h2c", connection.headers)
        expect("GRPC-1", values.get("content-length", ["0"]) == ["0"] and "transfer-encoding" not in values,
               "no request body", connection.headers)
    [build] = daemon.builds
    session_ids = set(daemon.sessions)
    expect("GRPC-3", build.solve.Session and build.solve.Session in session_ids and build.session is not None,
           "Control/Solve's Session is the ID of a session the client opened", (build.solve.Session, sorted(session_ids)))
    refs = [solve.Ref for solve in record.solves]
    expect("GRPC-3", all(refs) and len(set(refs)) == len(refs), "every Solve has a Ref of its own", refs)
    expect("GRPC-3", build.frontend_options.get("filename", "Dockerfile") == "Dockerfile",
           "the Dockerfile's base name in the frontend option filename", build.frontend_options)
    expect("GRPC-3", all(r.error is None for r in scenario.results.values()) and "context" in scenario.results,
           "the session serves dockerfile and context", {k: r.error for k, r in scenario.results.items()})
    untagged = [f"{path} ({dict(metadata).get(BUILD_ID_METADATA)!r})" for path, metadata in _gateway_calls(daemon)
                if dict(metadata).get(BUILD_ID_METADATA) not in refs]
    expect("GRPC-3", not untagged, f"every gateway call tagged {BUILD_ID_METADATA}: <a Solve's Ref>", untagged)
    expect("GRPC-3", run.returncode == 0, "the build succeeds", run.output[-2000:])


def _gateway_calls(daemon):
    return [(path, metadata) for connection in daemon.control_api.record.connections
            for path, metadata in connection.call_metadata if path.startswith(GATEWAY)]


@requirement("GRPC-4")
def test_a_failed_solve_is_reported_and_ends_the_session(client):
    text = "conformance frontend failed (code 6113)"
    daemon, run = _grpc_build(client, lambda build: ScenarioResult(image_id=None, error=text))
    expect("GRPC-4", run.returncode not in (0, -9), "a non-zero exit", f"exit {run.returncode}", [run.output[-2000:]])
    expect("GRPC-4", "6113" in run.output, "the Solve's error message is shown", run.output[-2000:])
    [build] = daemon.builds
    # run_client returns once the client exited; its session connection must be gone by then, or soon after
    deadline = time.monotonic() + SESSION_CLOSE_BOUND
    while not build.session.conn.closed.is_set() and time.monotonic() < deadline:
        time.sleep(0.1)
    expect("GRPC-4", build.session.conn.closed.is_set(), "the build's session connection closed",
           f"still open {SESSION_CLOSE_BOUND:.0f} s after the client exited")


def _vertex_trace(name: str) -> bytes:
    """A vertex that ran and completed, as a daemon reports a step."""
    now = Timestamp()
    now.GetCurrentTime()
    vertex = Vertex(digest="sha256:" + "d" * 64, name=name, started=now, completed=now)
    return StatusResponse(vertexes=[vertex]).SerializeToString()


@requirement("GRPC-5")
def test_the_client_follows_the_status_of_its_solve(client):
    step, failed = "[conformance 1/2] step 7104", "conformance vertex error 7105"
    trace = [_vertex_trace(step), vertex_error_trace(failed, name="[conformance 2/2] step")]
    daemon, run = _grpc_build(client, lambda build: ScenarioResult(trace=trace))
    record = daemon.control_api.record
    [build] = daemon.builds
    status_calls = [c for c in record.connections if any(p.endswith(".Control/Status") for p in c.calls)]
    expect("GRPC-5", status_calls, "a Control/Status call", [c.calls for c in record.connections])
    expect("GRPC-5", build.solve.Ref in record.status_refs, "Control/Status for the build's Ref",
           (build.solve.Ref, record.status_refs))
    expect("GRPC-5", "7104" in run.output and "7105" in run.output, "both vertices and the error shown",
           run.output[-2000:])
