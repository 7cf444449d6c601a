"""``POST /grpc`` of the instrumented daemon: BuildKit's Control API, so that a client that builds the way buildx
does (the default ``docker build`` since Docker 23) is graded by the same scenarios as one that uses ``/build``.

The Control and gateway (LLBBridge) calls are the reference daemon's :class:`reference.daemon.control.ControlService`;
what a build does is the test's scenario, through :class:`ScenarioBackend`. The frontend's solve (buildx's
``LLBBridge/Solve{dockerfile.v0}``, or a ``Control/Solve`` that names the frontend) is where the scenario runs: it
gets a :class:`BuildRecord` whose ``query`` carries the same options a ``/build`` request would (``session``,
``dockerfile``, ``outputs``, ``t``, ``buildargs``, ``labels``, ``target``), so a scenario needs no second version.
A scenario's error fails that solve, as a failing Dockerfile frontend does on dockerd; its image ID is the image
exporter's answer. The solves buildx makes only to learn the daemon's capabilities (``Internal``, no frontend, an
empty result) run no scenario and are kept apart in :attr:`ControlApiRecord.probes`.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from reference.daemon.control import CONTROL_SOLVE, CONTROL_STATUS, ControlService, SolveJob
from reference.pb import control_pb2 as pb
from reference.transport.base import RpcError, StatusCode

if TYPE_CHECKING:
    from .instrumented_daemon import BuildRecord, InstrumentedDaemon

#: What dockerd 26.1's BuildKit reports for itself; dockerd 20.10 has no Control/Info.
BUILDKIT_VERSION_N1 = pb.BuildkitVersion(package="github.com/moby/buildkit", version="v0.13.2+conformance",
                                         revision="conformance")


@dataclass
class GrpcConnectionRecord:
    """One ``POST /grpc`` as the daemon saw it."""

    headers: list[tuple[str, str]]
    upgrade_response: bytes = b""
    calls: list[str] = field(default_factory=list)  # method paths, in the order they began
    call_metadata: list[tuple[str, list[tuple[str, str]]]] = field(default_factory=list)  # (path, metadata)


@dataclass
class ControlApiRecord:
    """Everything the client did on BuildKit's Control API."""

    connections: list[GrpcConnectionRecord] = field(default_factory=list)
    solves: list[pb.SolveRequest] = field(default_factory=list)  # every Control/Solve, probes included
    probes: list[pb.SolveRequest] = field(default_factory=list)  # Solves that ran no frontend (buildx's probes)
    solve_errors: dict[str, str] = field(default_factory=dict)  # Ref -> the error a Solve ended with
    solve_arrivals: list[tuple[float, pb.SolveRequest]] = field(default_factory=list)  # (monotonic time, request)
    status_refs: list[str] = field(default_factory=list)  # the Ref of every Control/Status call


def _option_json(options: dict[str, str], prefix: str) -> list[str]:
    values = {key[len(prefix):]: value for key, value in options.items() if key.startswith(prefix)}
    return [json.dumps(values)] if values else []


def equivalent_query(request: pb.SolveRequest, options: dict[str, str]) -> dict[str, list[str]]:
    """The ``/build`` query that asks for what this Solve and its frontend options ask for."""
    exporters = ([{"Type": e.Type, "Attrs": dict(e.Attrs)} for e in request.Exporters] if request.Exporters
                 else [{"Type": request.ExporterDeprecated, "Attrs": dict(request.ExporterAttrsDeprecated)}]
                 if request.ExporterDeprecated else [])
    client_outputs = [e for e in exporters if e["Type"] not in ("moby", "image")]
    tags = [tag for e in exporters if e["Type"] in ("moby", "image")
            for tag in e["Attrs"].get("name", "").split(",") if tag]
    query: dict[str, list[str]] = {"session": [request.Session]}
    if options.get("filename"):
        query["dockerfile"] = [options["filename"]]
    if options.get("target"):
        query["target"] = [options["target"]]
    if client_outputs:
        query["outputs"] = [json.dumps(client_outputs)]
    if tags:
        query["t"] = tags
    query["buildargs"] = _option_json(options, "build-arg:")
    query["labels"] = _option_json(options, "label:")
    if "no-cache" in options:
        query["nocache"] = ["1"]
    return {key: value for key, value in query.items() if value}


class ScenarioBackend:
    """A :class:`reference.daemon.control.SolveBackend` whose builds are the instrumented daemon's scenario."""

    exporter_types = ("moby", "image", "local", "tar")

    def __init__(self, daemon: "InstrumentedDaemon", record: ControlApiRecord):
        self.daemon = daemon
        self.record = record
        # dockerd 20.10 names its worker "moby"; 26.1 gives it an ID of its own
        worker_id = "moby" if daemon.generation != "n+1" else uuid.uuid4().hex[:25]
        self._worker = pb.WorkerRecord(ID=worker_id, platforms=[pb.Platform(Architecture="amd64", OS="linux")])
        self._lock = threading.Lock()

    def workers(self) -> list[pb.WorkerRecord]:
        return [self._worker]

    def buildkit_version(self) -> pb.BuildkitVersion | None:
        return BUILDKIT_VERSION_N1 if self.daemon.generation == "n+1" else None

    def frontend(self, job: SolveJob, frontend: str, options: dict[str, str]) -> "BuildRecord":
        from .instrumented_daemon import BuildRecord

        build = BuildRecord(f"/grpc {frontend}", equivalent_query(job.request, options), b"", api="grpc",
                            solve=job.request, frontend_options=dict(options))
        job.backend_state = build
        build.arrived = next((at for at, request in reversed(self.record.solve_arrivals) if request is job.request),
                             build.arrived)
        result = self.daemon.run_scenario(build, job.session_id)
        for trace in result.trace:
            job.status.publish(pb.StatusResponse.FromString(trace))
        if self.daemon.keeps_build_open(result):  # the Solve hangs, as a hung /build response does
            self.daemon.hold_build_open()
            raise RpcError(StatusCode.UNAVAILABLE, "the instrumented daemon closes")
        if result.error:
            raise RpcError(StatusCode.UNKNOWN, result.error)
        return build

    def evaluate(self, job: SolveJob, result) -> None:
        """The scenario already ran whole at the frontend's solve."""

    def export(self, job: SolveJob, result) -> dict[str, str]:
        if result is None:  # an empty result: buildx's capability probes
            with self._lock:
                self.record.probes.append(job.request)
            return {}
        image_id = result.outcome.get("image_id")
        if any(e.type in ("moby", "image") for e in job.exporters) and image_id:
            return {"containerimage.digest": image_id}
        return {}

    def finish(self, job: SolveJob, error: str | None) -> None:
        with self._lock:
            self.record.solves.append(job.request)
            if error:
                self.record.solve_errors[job.ref] = error

    def disk_usage(self, filters: list[str]) -> list[pb.UsageRecord]:
        return []

    def prune(self, request: pb.PruneRequest) -> list[pb.UsageRecord]:
        return []


class ControlApiEndpoint:
    """The instrumented daemon's ``/grpc`` route: the upgrade as dockerd answers it, then the Control API."""

    def __init__(self, daemon: "InstrumentedDaemon"):
        self.daemon = daemon
        self.record = ControlApiRecord()
        self.service = ControlService(ScenarioBackend(daemon, self.record))
        self._connections: list = []
        self._lock = threading.Lock()

    def serve(self, sock, headers: list[tuple[str, str]], leftover: bytes, respond) -> bool:
        """Answer one ``POST /grpc``; True when the connection was upgraded (served here until it ends)."""
        upgrade = dict(headers).get("upgrade", "")
        if not upgrade:
            respond(500, b'{"message":"no upgrade proto in request"}')  # as dockerd answers on /grpc
            return False
        if upgrade != "h2c":
            respond(500, json.dumps({"message": f"protocol {upgrade} not supported"}).encode())
            return False
        connection = GrpcConnectionRecord(headers)
        head = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
        connection.upgrade_response = head
        with self._lock:
            self.record.connections.append(connection)
        sock.sendall(head)
        gone = threading.Event()
        handlers = {path: _recorded(connection, path, handler)
                    for path, handler in self.service.handlers(gone).items()}
        handlers[CONTROL_SOLVE] = self._admitting(handlers[CONTROL_SOLVE])
        handlers[CONTROL_STATUS] = self._noting_ref(handlers[CONTROL_STATUS])
        if self.daemon.transport == "grpcio":
            from reference.transport.base import serve_grpcio as serve
        else:
            from reference.transport.base import serve_h2 as serve
        try:
            conn = serve(sock, handlers, leftover)
        except OSError:
            return True
        with self._lock:
            self._connections.append(conn)
        try:
            conn.wait()
        finally:
            gone.set()  # the client went away: its builds are cancelled, as on dockerd
            conn.close()
        return True

    def _admitting(self, solve):
        """Control/Solve, first offered to the daemon's ``refused_solve``: a refusal answers at once, before the
        build looks for its session (as dockerd refuses options it rejects)."""
        def call(stream):
            data = stream.recv(60.0)
            request = pb.SolveRequest.FromString(data) if data is not None else pb.SolveRequest()
            with self._lock:
                self.record.solve_arrivals.append((time.monotonic(), request))
            refusal = self.daemon.refused_solve(request)
            if refusal is not None:
                with self._lock:
                    self.record.solves.append(request)
                    self.record.solve_errors[request.Ref] = refusal
                raise RpcError(StatusCode.INVALID_ARGUMENT, refusal)
            return solve(_Replayed(stream, data))
        return call

    def _noting_ref(self, status):
        def call(stream):
            data = stream.recv(60.0)
            if data is not None:
                with self._lock:
                    self.record.status_refs.append(pb.StatusRequest.FromString(data).Ref)
            return status(_Replayed(stream, data))
        return call

    def close(self) -> None:
        self.service.cancel_all("the instrumented daemon closes")
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            conn.close()


class _Replayed:
    """A call whose first message was already read: ``recv`` hands it out once more, the rest is the call's."""

    def __init__(self, stream, first: bytes | None):
        self._stream = stream
        self._first = [first]

    def recv(self, timeout: float | None = None) -> bytes | None:
        if self._first:
            return self._first.pop()
        return self._stream.recv(timeout)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _recorded(connection: GrpcConnectionRecord, path: str, handler):
    def call(stream):
        connection.calls.append(path)
        connection.call_metadata.append((path, list(stream.metadata)))
        return handler(stream)
    return call
