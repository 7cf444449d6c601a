"""Daemon role: BuildKit's control API on ``POST /grpc``, the way into dockerd that buildx builds through.

The suite plays a buildx-like client: the upgrade, then ``Control/Status`` and ``Control/Solve`` naming the
Dockerfile frontend (buildctl's way, which dockerd 20.10 and 26.1 both build), with a live session serving the
context. A daemon without the route (404) does not offer the control API: UNSUPPORTED.
"""

from __future__ import annotations

import threading

import pytest

from reference.client.grpcsolve import LIST_WORKERS, SOLVE, STATUS, solve_request
from reference.pb import control_pb2 as pb
from reference.session import new_session_id
from reference.transport.base import RpcError, connect_h2

from .harness.daemon_probes import LiveSession, raw_request
from .harness.scripted_client import make_context
from .outcomes import expect, unsupported

requirement = pytest.mark.requirement

UPGRADE = [("Connection", "Upgrade"), ("Upgrade", "h2c"), ("Content-Length", "0")]
# Status may come first: the daemon waits a few seconds for the Solve it names (BuildKit: 6 s)
STATUS_LEAD = 0.5
BUILD_BOUND = 120.0


def _needs_control_api(daemon) -> None:
    if daemon.generation == "n-1":
        pytest.skip("the control API is generation n and later; the target is generation n-1")
    probe, _ = raw_request(daemon.host, "/grpc", [("Content-Length", "0")], read_after=0.3)
    if probe.status == 404:
        unsupported("the daemon has no POST /grpc (BuildKit's control API)")


def _control(daemon):
    response, sock = raw_request(daemon.host, "/grpc", UPGRADE, read_after=0.0, keep_open=True)
    if response.status != 101:
        sock.close()
        raise AssertionError(f"POST /grpc with Upgrade: h2c answered {response.status_line!r}")
    return connect_h2(sock, response.rest), sock


@requirement("GRPC-1")
def test_the_grpc_upgrade_and_its_refusals(daemon):
    _needs_control_api(daemon)
    bare, _ = raw_request(daemon.host, "/grpc", [("Content-Length", "0")], read_after=0.5)
    expect("GRPC-1", bare.status >= 400 and "no upgrade proto" in bare.body_text(),
           "an error status with `no upgrade proto in request` without Upgrade (dockerd: 500)", (bare.status_line, bare.body_text()[:200]))
    other, _ = raw_request(daemon.host, "/grpc", [("Connection", "Upgrade"), ("Upgrade", "websocket"),
                                                  ("Content-Length", "0")], read_after=0.5)
    expect("GRPC-1", other.status >= 400 and "not supported" in other.body_text(),
           "an error status with `protocol websocket not supported` for another protocol", (other.status_line, other.body_text()[:200]))
    response, sock = raw_request(daemon.host, "/grpc", UPGRADE, read_after=0.0, keep_open=True)
    try:
        connection = {t.strip().lower() for v in response.header("Connection") for t in v.split(",")}
        expect("GRPC-1", response.status == 101 and connection == {"upgrade"} and response.header("Upgrade") == ["h2c"],
               "101 with Connection: Upgrade and Upgrade: h2c", response.head)
        conn = connect_h2(sock, response.rest)
        try:
            answer = pb.ListWorkersResponse.FromString(
                conn.unary(LIST_WORKERS, pb.ListWorkersRequest().SerializeToString(), timeout=30))
        except RpcError as exc:
            answer = exc
        finally:
            conn.close()
        expect("GRPC-1", isinstance(answer, pb.ListWorkersResponse) and len(answer.record) >= 1,
               "the Control service served as HTTP/2 server: ListWorkers lists a worker", answer)
    finally:
        sock.close()


class _StatusReader:
    """One Control/Status call, read on a thread: every message, then how the call ended."""

    def __init__(self, conn, ref: str):
        self.stream = conn.open_stream(STATUS)
        self.stream.send(pb.StatusRequest(Ref=ref).SerializeToString())
        self.stream.close_send()
        self.messages: list[pb.StatusResponse] = []
        self.ended: str | None = None  # "OK" or the error
        self.done = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            while (data := self.stream.recv(BUILD_BOUND)) is not None:
                self.messages.append(pb.StatusResponse.FromString(data))
            self.ended = "OK"
        except (RpcError, TimeoutError) as exc:
            self.ended = f"{type(exc).__name__}: {exc}"
        finally:
            self.done.set()

    def vertex_names(self) -> list[str]:
        return [v.name for m in self.messages for v in m.vertexes]


def _solve_with_status_first(daemon, dockerfile: str):
    """(the Solve's answer or its RpcError, the Status reader) of one build whose Status call came first."""
    import time

    ctx = make_context({"a.txt": "a"}, dockerfile=dockerfile)
    with LiveSession(daemon.host, ctx) as live:
        conn, sock = _control(daemon)
        try:
            ref = new_session_id()
            status = _StatusReader(conn, ref)
            time.sleep(STATUS_LEAD)
            request = solve_request(ref, live.session_id, dockerfile_name="Dockerfile", output_type=None, tags=[],
                                    build_args=None, labels=None, target=None, no_cache=True, pull=False,
                                    network=None)
            try:
                answer = pb.SolveResponse.FromString(conn.unary(SOLVE, request.SerializeToString(),
                                                                timeout=BUILD_BOUND))
            except RpcError as exc:
                answer = exc
            status.done.wait(10.0)
            return answer, status
        finally:
            conn.close()
            sock.close()


@requirement("GRPC-2")
def test_status_that_comes_first_follows_the_build_and_ends_ok(daemon):
    _needs_control_api(daemon)
    answer, status = _solve_with_status_first(daemon, "FROM scratch\nCOPY a.txt /\n")
    expect("GRPC-2", isinstance(answer, pb.SolveResponse), "Control/Solve answers the build", answer)
    expect("GRPC-2", status.ended == "OK", "Control/Status ends with OK when the build ends",
           status.ended or "still open 10 s after the Solve answered")
    expect("GRPC-2", any("COPY" in name for name in status.vertex_names()),
           "the build's vertices streamed on the Status that came before its Solve", status.vertex_names())


@requirement("GRPC-2")
def test_status_of_a_failed_build_ends_ok_too(daemon):
    _needs_control_api(daemon)
    answer, status = _solve_with_status_first(daemon, "FROM scratch\nCOPY not-in-the-context.txt /\n")
    expect("GRPC-2", isinstance(answer, RpcError), "Control/Solve fails", answer)
    expect("GRPC-2", status.ended == "OK", "Control/Status ends with OK when the failed build ends",
           status.ended or "still open 10 s after the Solve failed")
    errors = [v.error for m in status.messages for v in m.vertexes if v.error]
    expect("GRPC-2", errors, "the failed vertex's error streamed on Status", status.vertex_names())
