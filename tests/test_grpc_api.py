"""BuildKit's Control API and gateway on ``POST /grpc`` (reference/daemon/control.py, grpcapi.py, solvebackend.py).

Two layers. The servicers alone, over the h2 transport on a socket pair, with a scripted backend: routing of
gateway calls by ``buildkit-controlapi-buildid``, Status before its Solve, buildx's probes, Return errors,
cancellation and a lost connection. Then the reference daemon in-process, driven the way buildx 0.13 drives
dockerd (a Solve without frontend, ``LLBBridge/Ping``, ``Solve``, ``Return``, per docs/observed/buildx-0.13-and-cli-20.10-on-the-wire.md):
the route per generation, workers, exports, errors, the shared context cache, du and prune.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import threading
import time

import pytest

from conformance.trees import diff_snapshots, snapshot, write_file
from reference.client.build import Output, _client_services
from reference.client.grpcsolve import open_control
from reference.client.methods import advertised_methods
from reference.daemon import control
from reference.daemon.config import DaemonConfig
from reference.daemon.control import (BUILD_ID_METADATA, CONTROL_DISK_USAGE, CONTROL_INFO, CONTROL_LIST_WORKERS,
                                      CONTROL_PRUNE, CONTROL_SOLVE, CONTROL_STATUS, GATEWAY_PING, GATEWAY_RETURN,
                                      GATEWAY_SOLVE, ControlService, StatusBus, returned_ref_id)
from reference.daemon.service import Daemon
from reference.dockerhost import api_call
from reference.pb import control_pb2 as pb
from reference.session import SessionRequest, new_session_id, open_session, session_identity
from reference.transport.base import RpcError, StatusCode
from reference.transport.h2grpc import connect_h2, serve_h2

pytestmark = pytest.mark.timeout(60)


# -- a client that speaks like buildx ---------------------------------------------------------------------

def unary(conn, method: str, message, response_type=None, *, build_id: str | None = None, timeout: float = 20.0):
    metadata = [(BUILD_ID_METADATA, build_id)] if build_id else []
    data = conn.unary(method, message.SerializeToString(), metadata, timeout=timeout)
    return response_type.FromString(data) if response_type else data


class StatusReader:
    """Control/Status on a thread: every message, and how the call ended."""

    def __init__(self, conn, ref: str):
        self.stream = conn.open_stream(CONTROL_STATUS)
        self.stream.send(pb.StatusRequest(Ref=ref).SerializeToString())
        self.stream.close_send()
        self.messages: list[pb.StatusResponse] = []
        self.error: Exception | None = None
        self.done = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for data in self.stream:
                self.messages.append(pb.StatusResponse.FromString(data))
        except Exception as exc:
            self.error = exc
        finally:
            self.done.set()

    def vertex_names(self) -> list[str]:
        return list(dict.fromkeys(v.name for m in self.messages for v in m.vertexes))

    def vertex_errors(self) -> list[str]:
        return [v.error for m in self.messages for v in m.vertexes if v.error]


class SolveCall:
    """Control/Solve on a thread (buildx's gateway builds wait in it for their Return)."""

    def __init__(self, conn, request: pb.SolveRequest):
        self.response: pb.SolveResponse | None = None
        self.error: RpcError | None = None
        self.done = threading.Event()
        self.stream = conn.open_stream(CONTROL_SOLVE)
        self.stream.send(request.SerializeToString())
        self.stream.close_send()
        threading.Thread(target=self._wait, daemon=True).start()

    def _wait(self) -> None:
        try:
            data = self.stream.recv(60)
            while self.stream.recv(60) is not None:
                pass
            self.response = pb.SolveResponse.FromString(data)
        except RpcError as exc:
            self.error = exc
        finally:
            self.done.set()

    def result(self, timeout: float = 30.0) -> pb.SolveResponse:
        assert self.done.wait(timeout), "Solve did not answer"
        if self.error is not None:
            raise self.error
        return self.response


def gateway_build(conn, ref: str, session: str, exporter: pb.Exporter | None, options: dict[str, str],
                  *, internal: bool = False) -> tuple[SolveCall, StatusReader]:
    """One build as buildx makes it: Status, a Solve without frontend, then LLBBridge Ping, Solve, Return."""
    status = StatusReader(conn, ref)
    exporters = [exporter] if exporter is not None else []
    request = pb.SolveRequest(Ref=ref, Session=session, Cache=pb.CacheOptions(), Internal=internal,
                              Exporters=exporters)
    if exporter is not None:
        request.ExporterDeprecated = exporter.Type
        request.ExporterAttrsDeprecated.update(exporter.Attrs)
    solve = SolveCall(conn, request)
    pong = unary(conn, GATEWAY_PING, pb.PingRequest(), pb.PongResponse, build_id=ref)
    assert {"return", "proto.refarray"} <= {cap.ID for cap in pong.FrontendAPICaps if cap.Enabled}
    if internal:
        unary(conn, GATEWAY_RETURN, pb.ReturnRequest(result=pb.Result(ref=pb.Ref())), build_id=ref)
        return solve, status
    try:
        answer = unary(conn, GATEWAY_SOLVE, pb.FrontendSolveRequest(
            Frontend="dockerfile.v0", FrontendOpt=options, allowResultReturn=True, allowResultArrayRef=True),
            pb.FrontendSolveResponse, build_id=ref, timeout=30)
    except RpcError as exc:  # buildx returns the frontend's error
        unary(conn, GATEWAY_RETURN, pb.ReturnRequest(error=pb.RpcStatus(code=int(exc.code), message=exc.details)),
              build_id=ref)
        return solve, status
    unary(conn, GATEWAY_RETURN, pb.ReturnRequest(result=answer.result), build_id=ref)
    return solve, status


# -- the servicers with a scripted backend ------------------------------------------------------------

class ScriptedBackend:
    """Records what the servicer asks; ``hold`` makes the frontend wait until the build is cancelled."""

    exporter_types = ("moby", "local", "tar")

    def __init__(self):
        self.frontends: list[dict] = []
        self.exports: list[tuple[str, object]] = []
        self.finished: dict[str, str | None] = {}
        self.hold = False
        self.finished_event = threading.Event()

    def workers(self):
        return [pb.WorkerRecord(ID="scripted", platforms=[pb.Platform(Architecture="amd64", OS="linux")])]

    def buildkit_version(self):
        return None

    def frontend(self, job, frontend, options):
        job.status.publish(pb.StatusResponse(vertexes=[pb.Vertex(digest="sha256:f", name="frontend")]))
        self.frontends.append(dict(options))
        if self.hold:
            while not job.cancelled.wait(0.05):
                pass
            raise RpcError(StatusCode.CANCELLED, "context canceled")
        return {"filename": options.get("filename")}

    def evaluate(self, job, result):
        result["evaluated"] = True

    def export(self, job, result):
        self.exports.append((job.ref, result))
        return {"exported-by": job.exporters[0].type} if job.exporters else {}

    def finish(self, job, error):
        self.finished[job.ref] = error
        self.finished_event.set()

    def disk_usage(self, filters):
        return []

    def prune(self, request):
        return []


@contextlib.contextmanager
def served(service: ControlService):
    """The servicers on one end of a socket pair, a gRPC client on the other (as grpcapi.py serves them)."""
    server_sock, client_sock = socket.socketpair()
    gone = threading.Event()
    server = serve_h2(server_sock, service.handlers(gone))
    threading.Thread(target=lambda: (server.wait(), gone.set()), daemon=True).start()
    client = connect_h2(client_sock)
    try:
        yield client, client_sock
    finally:
        client.close()
        server.close()
        server_sock.close()
        client_sock.close()


@pytest.fixture
def scripted():
    backend = ScriptedBackend()
    service = ControlService(backend, status_job_wait=2.0, gateway_job_wait=0.3)
    with served(service) as (client, client_sock):
        yield backend, service, client, client_sock


def test_status_that_comes_before_its_solve_sees_everything_and_ends_ok(scripted):
    backend, _, client, _ = scripted
    status = StatusReader(client, "ref-early")
    time.sleep(0.3)  # the Status call is waiting for a Solve that does not exist yet
    response = SolveCall(client, pb.SolveRequest(Ref="ref-early", Frontend="dockerfile.v0",
                                                 FrontendAttrs={"filename": "Dockerfile"},
                                                 ExporterDeprecated="local")).result()
    assert dict(response.ExporterResponse) == {"exported-by": "local"}
    assert status.done.wait(5) and status.error is None
    assert status.vertex_names() == ["frontend"]
    assert backend.finished == {"ref-early": None}


def test_gateway_calls_find_their_build_by_build_id(scripted):
    backend, _, client, _ = scripted
    solve, status = gateway_build(client, "ref-gw", "sess", pb.Exporter(Type="tar"), {"filename": "Other"})
    assert dict(solve.result().ExporterResponse) == {"exported-by": "tar"}
    assert backend.frontends == [{"filename": "Other"}]
    [(ref, result)] = backend.exports
    assert ref == "ref-gw" and result == {"filename": "Other"}  # the result the client returned, by its id
    assert status.done.wait(5) and status.error is None


def test_a_probe_returns_an_empty_result_and_exports_none(scripted):
    backend, _, client, _ = scripted
    solve, status = gateway_build(client, "ref-probe", "probe-session", None, {}, internal=True)
    assert dict(solve.result().ExporterResponse) == {}
    assert backend.frontends == [] and backend.exports == [("ref-probe", None)]
    assert status.done.wait(5) and status.messages == []


def test_an_error_the_client_returns_fails_the_solve(scripted):
    backend, _, client, _ = scripted
    solve = SolveCall(client, pb.SolveRequest(Ref="ref-err", ExporterDeprecated="moby"))
    status = StatusReader(client, "ref-err")
    unary(client, GATEWAY_RETURN, pb.ReturnRequest(error=pb.RpcStatus(code=2, message="frontend said no")),
          build_id="ref-err")
    with pytest.raises(RpcError) as failed:
        solve.result()
    assert failed.value.code == StatusCode.UNKNOWN and failed.value.details == "frontend said no"
    assert status.done.wait(5) and status.error is None  # Status ends OK on a failed build too
    assert backend.finished == {"ref-err": "frontend said no"}


def test_gateway_calls_without_or_with_an_unknown_build_id_are_refused(scripted):
    _, _, client, _ = scripted
    with pytest.raises(RpcError) as no_id:
        unary(client, GATEWAY_PING, pb.PingRequest())
    assert no_id.value.code == StatusCode.UNKNOWN and "no buildid" in no_id.value.details
    with pytest.raises(RpcError) as unknown:
        unary(client, GATEWAY_PING, pb.PingRequest(), build_id="nobody")
    assert unknown.value.code == StatusCode.NOT_FOUND and "no such job nobody" in unknown.value.details


def test_a_cancelled_solve_cancels_its_build(scripted):
    backend, service, client, _ = scripted
    backend.hold = True
    solve = SolveCall(client, pb.SolveRequest(Ref="ref-cancel", Frontend="dockerfile.v0", ExporterDeprecated="local"))
    deadline = time.monotonic() + 5
    while not backend.frontends and time.monotonic() < deadline:
        time.sleep(0.02)
    solve.stream.cancel()  # buildx on Ctrl-C
    assert backend.finished_event.wait(5), "the build was not cancelled"
    assert backend.finished["ref-cancel"]
    assert service.jobs.active() == []


def test_a_lost_connection_cancels_a_build_waiting_for_its_return(scripted):
    backend, service, client, client_sock = scripted
    SolveCall(client, pb.SolveRequest(Ref="ref-lost", ExporterDeprecated="local"))
    _wait_active(service, "ref-lost")
    client_sock.shutdown(socket.SHUT_RDWR)  # the client died
    assert backend.finished_event.wait(5), "the build outlived its connection"
    assert backend.finished["ref-lost"]
    assert service.jobs.active() == []


def test_concurrent_gateway_builds_on_one_connection_keep_their_results(scripted):
    backend, _, client, _ = scripted
    solves = {ref: SolveCall(client, pb.SolveRequest(Ref=ref, ExporterDeprecated="local")) for ref in ("one", "two")}
    results = {}
    for ref in solves:
        answer = unary(client, GATEWAY_SOLVE, pb.FrontendSolveRequest(
            Frontend="dockerfile.v0", FrontendOpt={"filename": ref}, allowResultReturn=True),
            pb.FrontendSolveResponse, build_id=ref)
        results[ref] = answer.result
    for ref in reversed(list(solves)):
        unary(client, GATEWAY_RETURN, pb.ReturnRequest(result=results[ref]), build_id=ref)
    for ref, solve in solves.items():
        solve.result()
    assert sorted((ref, result["filename"]) for ref, result in backend.exports) == [("one", "one"), ("two", "two")]


def test_gateway_evaluate_and_the_deprecated_result_shape(scripted):
    backend, _, client, _ = scripted
    solve = SolveCall(client, pb.SolveRequest(Ref="ref-old", ExporterDeprecated="local"))
    answer = unary(client, GATEWAY_SOLVE, pb.FrontendSolveRequest(Frontend="dockerfile.v0", Evaluate=True),
                   pb.FrontendSolveResponse, build_id="ref-old")
    assert answer.ref and not answer.HasField("result")  # a client without allowResultReturn gets the bare id
    unary(client, GATEWAY_RETURN, pb.ReturnRequest(result=pb.Result(refDeprecated=answer.ref)), build_id="ref-old")
    solve.result()
    assert backend.exports[0][1] == {"filename": None, "evaluated": True}


def test_methods_this_daemon_does_not_serve_are_unimplemented(scripted):
    _, _, client, _ = scripted
    for method in ("/moby.buildkit.v1.Control/Session", "/moby.buildkit.v1.frontend.LLBBridge/ReadFile",
                   "/opentelemetry.proto.collector.trace.v1.TraceService/Export", CONTROL_INFO):
        with pytest.raises(RpcError) as refused:
            client.unary(method, b"", timeout=5)
        assert refused.value.code == StatusCode.UNIMPLEMENTED, method
    with pytest.raises(RpcError) as info:
        client.unary(CONTROL_INFO, b"", timeout=5)
    assert info.value.details == "unknown method Info for service moby.buildkit.v1.Control"  # dockerd 20.10's


@pytest.mark.parametrize("request_fields, code, text", [
    ({"Exporters": [pb.Exporter(Type="oci")]}, StatusCode.UNKNOWN, "exporter 'oci' could not be found"),
    ({"Exporters": [pb.Exporter(Type="local"), pb.Exporter(Type="tar")]}, StatusCode.UNIMPLEMENTED,
     "one exporter per build"),
    ({"Frontend": "gateway.v0"}, StatusCode.UNKNOWN, "invalid frontend: gateway.v0"),
    ({"Definition": pb.Definition(**{"def": [b"\x00"]})}, StatusCode.UNIMPLEMENTED, "does not solve LLB"),
    ({"Frontend": "dockerfile.v0", "FrontendAttrs": {"requestid": "frontend.outline"}}, StatusCode.UNIMPLEMENTED,
     "unsupported request frontend.outline"),
])
def test_solves_this_daemon_cannot_run_are_refused_cleanly(scripted, request_fields, code, text):
    _, _, client, _ = scripted
    with pytest.raises(RpcError) as refused:
        SolveCall(client, pb.SolveRequest(Ref=new_session_id(), **request_fields)).result()
    assert refused.value.code == code and text in refused.value.details


def test_exporters_come_from_field_13_else_the_deprecated_field():
    both = pb.SolveRequest(ExporterDeprecated="local", Exporters=[pb.Exporter(Type="moby", Attrs={"name": "a"})])
    assert control.exporters_of(both) == [control.ExporterSpec("moby", {"name": "a"})]
    old = pb.SolveRequest(ExporterDeprecated="moby", ExporterAttrsDeprecated={"name": "b"})
    assert control.exporters_of(old) == [control.ExporterSpec("moby", {"name": "b"})]
    assert control.exporters_of(pb.SolveRequest()) == []


def _wait_active(service, ref: str) -> None:
    deadline = time.monotonic() + 5
    while ref not in [job.ref for job in service.jobs.active()]:
        assert time.monotonic() < deadline, f"{ref} never became active"
        time.sleep(0.02)


def test_a_second_solve_with_an_active_ref_is_refused(scripted):
    _, service, client, _ = scripted
    first = SolveCall(client, pb.SolveRequest(Ref="twice", ExporterDeprecated="local"))
    _wait_active(service, "twice")
    with pytest.raises(RpcError) as refused:
        SolveCall(client, pb.SolveRequest(Ref="twice")).result()
    assert refused.value.code == StatusCode.ALREADY_EXISTS
    unary(client, GATEWAY_RETURN, pb.ReturnRequest(result=pb.Result()), build_id="twice")
    first.result()


@pytest.mark.parametrize("result, expected", [
    (pb.Result(), ""),
    (pb.Result(ref=pb.Ref()), ""),
    (pb.Result(ref=pb.Ref(id="a")), "a"),
    (pb.Result(refDeprecated="b"), "b"),
    (pb.Result(refs=pb.RefMap(refs={"linux/amd64": pb.Ref(id="c")})), "c"),
    (pb.Result(refsDeprecated=pb.RefMapDeprecated(refs={"linux/amd64": "d"})), "d"),
])
def test_the_returned_reference(result, expected):
    assert returned_ref_id(result) == expected


def test_a_result_for_several_platforms_is_refused():
    two = pb.Result(refs=pb.RefMap(refs={"linux/amd64": pb.Ref(id="a"), "linux/arm64": pb.Ref(id="b")}))
    with pytest.raises(RpcError) as refused:
        returned_ref_id(two)
    assert refused.value.code == StatusCode.UNIMPLEMENTED and "one platform" in refused.value.details


def test_progress_is_bounded_and_counter_updates_go_first(monkeypatch):
    monkeypatch.setattr(control, "STATUS_KEPT", 5)
    monkeypatch.setattr(control, "STATUS_KEPT_HARD", 8)
    bus = StatusBus()
    counter = pb.StatusResponse(statuses=[pb.VertexStatus(ID="transferring context:", current=1)])
    vertex = pb.StatusResponse(vertexes=[pb.Vertex(digest="sha256:v", name="v")])
    for _ in range(5):
        bus.publish(counter)
    bus.publish(counter)  # past the first bound: a byte count is dropped ...
    for _ in range(4):
        bus.publish(vertex)  # ... a vertex is kept up to the second
    bus.close()
    kept = [m for batch in bus.follow(lambda: False) for m in batch]
    assert len(kept) == 8 and bus.dropped == 2
    assert kept[-3:] == [vertex.SerializeToString()] * 3


# -- the reference daemon -----------------------------------------------------------------------------------

@contextlib.contextmanager
def reference_daemon(generation: str, root: str | None = None, **config):
    directory = tempfile.mkdtemp(prefix="rgrpc-", dir="/tmp")  # a unix socket path must be short
    root = root or os.path.join(directory, "root")
    daemon = Daemon(DaemonConfig(root=root, generation=generation, **config), f"unix://{directory}/d.sock")
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.close()
        shutil.rmtree(directory, ignore_errors=True)


def host_of(daemon) -> str:
    return daemon.server.bound_address


@pytest.fixture(scope="module")
def daemon_n1():
    with reference_daemon("n+1", health_first=30.0) as daemon:
        yield daemon


def stats(daemon) -> dict:
    return json.loads(api_call("GET", "/_reference/stats", host=host_of(daemon))[1])


@contextlib.contextmanager
def session(host: str, context: str, *, local_export: str | None = None, dockerfile: str = "Dockerfile"):
    """A build session served by the reference client's services (buildx's 12 methods, less SSH)."""
    methods = advertised_methods(("diffcopy", "tarstream"), exporting=local_export is not None, secrets=True,
                                 auth=True, token_authority=True)
    request = SessionRequest(new_session_id(), *session_identity(context, "n+1"), methods)
    sock, leftover = open_session(request, host)
    outputs = [Output("local", local_export)] if local_export else []
    services = _client_services(context, os.path.join(context, dockerfile), False, ("diffcopy", "tarstream"),
                                None, True, True, outputs)
    server = serve_h2(sock, services.handlers(), leftover)
    try:
        yield request.session_id, services
    finally:
        server.close()
        sock.close()


def _context(tmp_path, dockerfile: str = "FROM scratch\nCOPY . /\n") -> str:
    root = str(tmp_path / "ctx")
    write_file(root, "Dockerfile", dockerfile.encode())
    write_file(root, "a.txt", b"alpha\n")
    write_file(root, "sub/b.bin", bytes(range(256)))
    write_file(root, "日本/é.txt", "unicode\n".encode())
    os.symlink("a.txt", os.path.join(root, "link"))
    return root


@contextlib.contextmanager
def control_connection(daemon):
    conn, sock = open_control(host_of(daemon))
    try:
        yield conn
    finally:
        conn.close()
        sock.close()


def test_the_route_exists_per_generation_and_refuses_a_request_without_upgrade():
    for generation, status in (("n-1", 404), ("n", 500), ("n+1", 500)):  # dockerd's /grpc: 500, not 400
        with reference_daemon(generation) as daemon:
            resp, body = api_call("POST", "/grpc", host=host_of(daemon))
            assert resp.status == status, generation
            assert json.loads(body)["message"] == ("page not found" if status == 404 else
                                                   "no upgrade proto in request")
            if status == 500:
                resp, body = api_call("POST", "/grpc", host=host_of(daemon),
                                      headers=[("Connection", "Upgrade"), ("Upgrade", "websocket")])
                assert resp.status == 500 and json.loads(body)["message"] == "protocol websocket not supported"


def test_the_upgrade_answers_exactly_as_dockerd_and_survives_an_early_close(daemon_n1):
    path = host_of(daemon_n1)[len("unix://"):]
    for _ in range(3):  # buildx opens /grpc connections it closes right after the 101
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(path)
            sock.sendall(b"POST /grpc HTTP/1.1\r\nHost: \r\nUser-Agent: Go-http-client/1.1\r\nContent-Length: 0\r\n"
                         b"Connection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
            head = b""
            while b"\r\n\r\n" not in head or len(head.partition(b"\r\n\r\n")[2]) < 9:
                head += sock.recv(4096)
    answer, _, after = head.partition(b"\r\n\r\n")
    # exactly dockerd's two headers, then the server's SETTINGS at once (before the client's preface arrived)
    assert answer == b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c"
    assert after[3:4] == b"\x04", "no SETTINGS frame right after the 101"
    with control_connection(daemon_n1) as conn:  # still serving
        assert unary(conn, CONTROL_LIST_WORKERS, pb.ListWorkersRequest(), pb.ListWorkersResponse).record


def test_workers_and_info_per_generation(tmp_path):
    with reference_daemon("n") as daemon, control_connection(daemon) as conn:
        [worker] = unary(conn, CONTROL_LIST_WORKERS, pb.ListWorkersRequest(), pb.ListWorkersResponse).record
        assert worker.ID == "moby" and not worker.HasField("BuildkitVersion")  # dockerd 20.10's
        assert worker.platforms[0].OS == "linux" and not worker.Labels  # no snapshotter: moby, local, tar only
        with pytest.raises(RpcError) as info:
            unary(conn, CONTROL_INFO, pb.InfoRequest())
        assert info.value.code == StatusCode.UNIMPLEMENTED
    root = str(tmp_path / "root")
    ids = []
    for _ in range(2):  # the worker's id is the root's, as dockerd 26.1 keeps it
        with reference_daemon("n+1", root=root) as daemon, control_connection(daemon) as conn:
            [worker] = unary(conn, CONTROL_LIST_WORKERS, pb.ListWorkersRequest(), pb.ListWorkersResponse).record
            version = unary(conn, CONTROL_INFO, pb.InfoRequest(), pb.InfoResponse).buildkitVersion
            assert worker.BuildkitVersion == version and version.version.startswith("v0.13")
            ids.append(worker.ID)
    assert ids[0] == ids[1] and len(ids[0]) == 36 and ids[0] != "moby"


def _names(status: StatusReader) -> list[str]:
    return status.vertex_names()


def test_a_buildx_shaped_build_exports_the_context_locally(daemon_n1, tmp_path):
    context = _context(tmp_path)
    dest = str(tmp_path / "out")
    host = host_of(daemon_n1)
    with control_connection(daemon_n1) as conn:
        # buildx's two probes, each with a Health-only session that may connect after the probe ended
        for _ in range(2):
            solve, status = gateway_build(conn, new_session_id(), new_session_id(), None, {}, internal=True)
            assert dict(solve.result().ExporterResponse) == {}
        with session(host, context, local_export=dest) as (session_id, _):
            ref = new_session_id()
            solve, status = gateway_build(conn, ref, session_id, pb.Exporter(Type="local"),
                                          {"filename": "Dockerfile", "image-resolve-mode": "local"})
            assert dict(solve.result().ExporterResponse) == {}
        assert status.done.wait(5) and status.error is None  # before the connection closes
    assert _names(status) == ["[internal] load build definition from Dockerfile", "[internal] load .dockerignore",
                              "[internal] load build context", "[1/1] COPY . /", "exporting to client directory"]
    differences = diff_snapshots(snapshot(context, owner=(0, 0), with_mtime_of_dirs=False),
                                 snapshot(dest, with_mtime_of_dirs=False))
    assert not differences, differences
    [record] = [b for b in stats(daemon_n1)["builds"] if b["build_id"] == ref]
    assert record["entry"] == "/grpc" and record["session_id"] == session_id and not record["error"]
    assert record["export"]["type"] == "local"


@pytest.mark.parametrize("generation, keys", [
    ("n", {"containerimage.digest"}),
    ("n+1", {"containerimage.config.digest", "containerimage.digest", "image.name"}),
])
def test_an_image_export_lands_in_the_image_store(generation, keys, tmp_path):
    context = _context(tmp_path)
    with reference_daemon(generation) as daemon, control_connection(daemon) as conn:
        host = host_of(daemon)
        with session(host, context, ) as (session_id, _):
            solve, status = gateway_build(conn, new_session_id(), session_id,
                                          pb.Exporter(Type="moby", Attrs={"name": "app:1,example.com/app:2"}),
                                          {"filename": "Dockerfile", "label:team": "conformance"})
            exported = dict(solve.result().ExporterResponse)
        assert set(exported) == keys
        image_id = exported["containerimage.digest"]
        if "image.name" in keys:
            assert exported["image.name"] == "docker.io/library/app:1,example.com/app:2"
            assert exported["containerimage.config.digest"] == image_id
        images = json.loads(api_call("GET", "/images/json", host=host)[1])
        [image] = [i for i in images if i["Id"] == image_id]
        assert sorted(image["RepoTags"]) == ["app:1", "example.com/app:2"]
        inspect = json.loads(api_call("GET", "/images/app:1/json", host=host)[1])
        assert inspect["Config"]["Labels"] == {"team": "conformance"}
        assert "exporting to image" in _names(status)


def test_a_failed_build_fails_the_solve_with_the_frontends_message(daemon_n1, tmp_path):
    context = _context(tmp_path, "FROM scratch\nCOPY missing /\n")
    with control_connection(daemon_n1) as conn, \
            session(host_of(daemon_n1), context, ) as (session_id, _):
        solve, status = gateway_build(conn, new_session_id(), session_id, pb.Exporter(Type="moby"),
                                      {"filename": "Dockerfile"})
        with pytest.raises(RpcError) as failed:
            solve.result()
        # read to its end before the connection closes (which would cut the Status call)
        assert status.done.wait(5) and status.error is None
    assert failed.value.code == StatusCode.UNKNOWN and '"/missing" not found' in failed.value.details
    assert any('"/missing" not found' in error for error in status.vertex_errors())


def test_a_build_naming_the_frontend_options_in_control_solve(daemon_n1, tmp_path):
    context = _context(tmp_path, "FROM scratch AS first\nARG WHERE=/default\nCOPY a.txt $WHERE/\n"
                                 "FROM scratch AS last\nCOPY sub /sub/\n")
    dest = str(tmp_path / "out")
    with control_connection(daemon_n1) as conn, \
            session(host_of(daemon_n1), context, local_export=dest) as (session_id, _):
        SolveCall(conn, pb.SolveRequest(
            Ref=new_session_id(), Session=session_id, Frontend="dockerfile.v0", ExporterDeprecated="local",
            FrontendAttrs={"filename": "Dockerfile", "build-arg:WHERE": "/chosen", "target": "first"})).result()
    assert sorted(os.listdir(dest)) == ["chosen"]


def _main_context_requests(record: dict) -> list[list[str]]:
    return [s["requested"] for s in record["streams"]
            if s.get("dir_name") == "context" and ["followpaths", ".dockerignore"] not in s["metadata"]]


def test_both_entry_points_share_the_context_cache_and_an_unchanged_rebuild_requests_nothing(tmp_path):
    from reference.client import build

    context = _context(tmp_path)
    with reference_daemon("n+1") as daemon:
        host = host_of(daemon)
        first = build(context, host=host, api="build", timeout=30)
        second = build(context, host=host, api="grpc", timeout=30)
        third = build(context, host=host, timeout=30)  # n+1's default: /grpc
        assert (first.api, second.api, third.api) == ("build", "grpc", "grpc")
        records = {r["session_id"]: r for r in stats(daemon)["builds"]}
        assert records[first.session_id]["entry"] == "/build" and records[second.session_id]["entry"] == "/grpc"
        [cold] = _main_context_requests(records[first.session_id])
        assert sorted(cold) == ["Dockerfile", "a.txt", "sub/b.bin", "日本/é.txt"]
        assert _main_context_requests(records[second.session_id]) == [[]]
        assert _main_context_requests(records[third.session_id]) == [[]]


def test_disk_usage_and_prune_are_the_context_cache_of_both_entry_points(tmp_path):
    from reference.client import build

    context = _context(tmp_path)
    with reference_daemon("n+1") as daemon:
        host = host_of(daemon)
        build(context, host=host, api="build", timeout=30)
        build(context, host=host, api="grpc", timeout=30)
        with control_connection(daemon) as conn:
            usage = unary(conn, CONTROL_DISK_USAGE, pb.DiskUsageRequest(filter=[""]), pb.DiskUsageResponse).record
            df = json.loads(api_call("GET", "/system/df", host=host)[1])["BuildCache"]
            assert sorted(r.ID for r in usage) == sorted(r["ID"] for r in df) and usage
            assert {r.RecordType for r in usage} == {"source.local"}
            assert {r.Description for r in usage} == {"local source for context", "local source for dockerfile"}
            dockerfile_ids = sorted(r.ID for r in usage if r.Description.endswith("dockerfile"))
            only = unary(conn, CONTROL_DISK_USAGE, pb.DiskUsageRequest(filter=["description~=dockerfile"]),
                         pb.DiskUsageResponse).record
            assert sorted(r.ID for r in only) == dockerfile_ids
            with pytest.raises(RpcError) as bad:
                unary(conn, CONTROL_DISK_USAGE, pb.DiskUsageRequest(filter=["parent==x"]))
            assert bad.value.code == StatusCode.INVALID_ARGUMENT
            # buildx prune -f: no --all, yet every unused local source goes, as BuildKit prunes them
            stream = conn.open_stream(CONTROL_PRUNE)
            stream.send(pb.PruneRequest(filter=[""]).SerializeToString())
            stream.close_send()
            pruned = [pb.UsageRecord.FromString(data) for data in stream]
            assert sorted(r.ID for r in pruned) == sorted(r.ID for r in usage)
            left = unary(conn, CONTROL_DISK_USAGE, pb.DiskUsageRequest(filter=[""]), pb.DiskUsageResponse).record
            assert list(left) == []
        assert json.loads(api_call("GET", "/system/df", host=host)[1])["BuildCache"] == []


def test_a_client_that_dies_mid_transfer_cancels_its_build(tmp_path):
    """The session's context transfer never answers; the /grpc connection then goes: the build ends at once
    with "context canceled", the daemon keeps no solve and serves the next build."""
    from reference.client import build

    context = _context(tmp_path)
    with reference_daemon("n+1", health_first=30.0) as daemon:
        host = host_of(daemon)
        methods = advertised_methods(("diffcopy",), exporting=False, secrets=False, auth=False, token_authority=False)
        request = SessionRequest(new_session_id(), "stuck", "stuck:0", methods)
        sock, leftover = open_session(request, host)
        transfer_started = threading.Event()

        def stuck_transfer(stream):
            transfer_started.set()
            while stream.recv() is not None:  # answers nothing, until cancelled
                pass

        server = serve_h2(sock, {m: stuck_transfer for m in methods}, leftover)
        conn, grpc_sock = open_control(host)
        try:
            ref = new_session_id()
            SolveCall(conn, pb.SolveRequest(Ref=ref, Session=request.session_id, Frontend="dockerfile.v0",
                                            ExporterDeprecated="moby"))
            assert transfer_started.wait(10)
            grpc_sock.shutdown(socket.SHUT_RDWR)
            deadline = time.monotonic() + 10
            record = None
            while time.monotonic() < deadline and record is None:
                record = next((b for b in stats(daemon)["builds"] if b["build_id"] == ref), None)
                time.sleep(0.05)
            assert record is not None, "the build outlived its client"
            assert record["error"] == "context canceled" or "canceled" in record["error"]
            assert stats(daemon)["grpc"]["solves_active"] == 0
        finally:
            conn.close()
            grpc_sock.close()
            server.close()
            sock.close()
        assert build(context, host=host, timeout=30).api == "grpc"


def test_the_grpcio_transport_serves_the_control_api_too(tmp_path):
    from reference.client import Output, build

    context = _context(tmp_path)
    dest = str(tmp_path / "out")
    with reference_daemon("n", transport="grpcio") as daemon:
        result = build(context, host=host_of(daemon), generation="n", api="grpc", transport="grpcio",
                       outputs=[Output("local", dest)], timeout=30)
    assert result.api == "grpc"
    assert not diff_snapshots(snapshot(context, owner=(0, 0), with_mtime_of_dirs=False),
                              snapshot(dest, with_mtime_of_dirs=False))
