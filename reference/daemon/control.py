"""BuildKit's Control API and gateway (LLBBridge), as dockerd 20.10 and 26.1 serve them on ``POST /grpc``.

Transport-neutral: :meth:`ControlService.handlers` maps method paths to handlers of
:class:`~reference.transport.base.RpcStream` (reference/daemon/grpcapi.py serves them over h2 or grpcio).
What a build does is a :class:`SolveBackend`'s: the reference daemon's runs its builder
(reference/daemon/solvebackend.py); an instrumented daemon can bring its own and script every call.

How buildx 0.13's docker driver builds (measured against both daemons, docs/observed/buildx-0.13-and-cli-20.10-on-the-wire.md):

* ``Control/Solve`` names no frontend and no definition: the build is the gateway's. The client calls
  ``LLBBridge/Ping``, ``LLBBridge/Solve{Frontend: dockerfile.v0}`` and ``LLBBridge/Return``, each tagged with
  the Solve's Ref as ``buildkit-controlapi-buildid``; the Solve waits for that Return, then exports.
* Each build starts with two ``Internal`` probe solves whose Return is empty; their sessions (Health only) may
  connect after the probe ended, so nothing here waits for a session that no build step needs.
* ``Control/Status`` may arrive before its Solve (it waits for it, as BuildKit's job lookup does, 6 s) and
  ends with OK when the build ends, failed or not.
* A client that names ``Frontend: dockerfile.v0`` in ``Control/Solve`` gets the whole build in that call
  (buildctl's way; the reference client's ``--api grpc``).

A cancelled Solve call, or a /grpc connection that goes away, cancels its build.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

from google.protobuf.message import DecodeError, Message

from ..pb import control_pb2 as pb
from ..transport.base import Handler, RpcError, RpcStream, StatusCode
from .cache import new_record_id

log = logging.getLogger("reference.daemon.control")

CONTROL = "/moby.buildkit.v1.Control/"
CONTROL_SOLVE = CONTROL + "Solve"
CONTROL_STATUS = CONTROL + "Status"
CONTROL_LIST_WORKERS = CONTROL + "ListWorkers"
CONTROL_INFO = CONTROL + "Info"
CONTROL_DISK_USAGE = CONTROL + "DiskUsage"
CONTROL_PRUNE = CONTROL + "Prune"
# Declared by BuildKit's Control service, not served here (UNIMPLEMENTED).
CONTROL_UNSERVED = ("Session", "ListenBuildHistory", "UpdateBuildHistory")

GATEWAY = "/moby.buildkit.v1.frontend.LLBBridge/"
GATEWAY_PING = GATEWAY + "Ping"
GATEWAY_SOLVE = GATEWAY + "Solve"
GATEWAY_RETURN = GATEWAY + "Return"
GATEWAY_UNSERVED = ("ResolveImageConfig", "ResolveSourceMeta", "ReadFile", "ReadDir", "StatFile", "Evaluate",
                    "Inputs", "NewContainer", "ReleaseContainer", "ExecProcess", "Warn")

# The metadata that ties a gateway call to its Control/Solve.
BUILD_ID_METADATA = "buildkit-controlapi-buildid"
DOCKERFILE_FRONTEND = "dockerfile.v0"

# How long a Status call waits for its Solve to appear, and a gateway call for its build (BuildKit: 6 s, 3 s).
STATUS_JOB_WAIT = 6.0
GATEWAY_JOB_WAIT = 3.0
# A finished build's progress stays this long (and at most this many builds) for a Status call that comes late.
FINISHED_KEPT_SECONDS = 60.0
FINISHED_KEPT = 64
# Progress messages kept per build: past the first bound byte-count updates are dropped, past the second all.
STATUS_KEPT = 20_000
STATUS_KEPT_HARD = 40_000
# How often a waiting call looks whether its build or its connection is gone.
POLL = 0.2

# The gateway capabilities this daemon has: a client needs `return` (or it ends builds the pre-0.4 way),
# `proto.refarray` for today's result shape; `returnmap` and Evaluate are served for one platform.
FRONTEND_CAPS = ("solve.base", "return", "returnmap", "proto.refarray", "gateway.solve.evaluate")


@dataclass(frozen=True)
class ExporterSpec:
    """One exporter of a Solve: ``moby`` (the daemon's image store), ``local`` or ``tar`` (to the client)."""

    type: str
    attrs: dict[str, str] = field(default_factory=dict)


class StatusBus:
    """The progress of one build: serialized ``StatusResponse`` messages, kept (bounded) so that a Status call
    that comes late still sees every vertex, handed to every follower until the build ends."""

    def __init__(self) -> None:
        self._messages: list[bytes] = []
        self._cond = threading.Condition()
        self.closed = False
        self.dropped = 0

    def publish(self, response: pb.StatusResponse) -> None:
        # serialized now: the progress code keeps updating the objects it sent
        data = response.SerializeToString()
        with self._cond:
            kept = len(self._messages)
            if kept >= STATUS_KEPT_HARD or (kept >= STATUS_KEPT and _is_counter_update(response)):
                self.dropped += 1
                return
            self._messages.append(data)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def follow(self, gone: Callable[[], bool]) -> Iterable[list[bytes]]:
        """Batches of messages from the first one, until the build ends or ``gone()`` says the caller left."""
        sent = 0
        while True:
            with self._cond:
                while sent == len(self._messages) and not self.closed:
                    self._cond.wait(POLL)
                    if gone():
                        return
                batch = self._messages[sent:]
                sent = len(self._messages)
                closed = self.closed
            if batch:
                yield batch
            if closed and sent == len(self._messages):
                return


def _is_counter_update(response: pb.StatusResponse) -> bool:
    return (not response.vertexes and not response.logs
            and all(not status.HasField("completed") for status in response.statuses))


@dataclass
class SolveJob:
    """One Control/Solve, from its request to its answer; the gateway calls that name its Ref find it here."""

    ref: str
    request: pb.SolveRequest
    exporters: list[ExporterSpec]
    status: StatusBus = field(default_factory=StatusBus)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # the gateway's results, by the ids handed to the client
    results: dict[str, Any] = field(default_factory=dict)
    returned: threading.Event = field(default_factory=threading.Event)
    return_request: pb.ReturnRequest | None = None
    backend_state: Any = None  # whatever the backend keeps for the build
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def session_id(self) -> str:
        return self.request.Session


class SolveBackend(Protocol):
    """What builds. Errors are :class:`RpcError`\\ s (their details are what the client shows)."""

    exporter_types: tuple[str, ...]

    def workers(self) -> list[pb.WorkerRecord]: ...

    def buildkit_version(self) -> pb.BuildkitVersion | None:
        """For Control/Info; None: Info is unimplemented (dockerd 20.10)."""

    def frontend(self, job: SolveJob, frontend: str, options: dict[str, str]) -> Any:
        """Run ``frontend`` (dockerfile.v0) with its options for ``job``; returns the result to keep."""

    def evaluate(self, job: SolveJob, result: Any) -> None:
        """Solve ``result`` now (a gateway Solve with Evaluate)."""

    def export(self, job: SolveJob, result: Any | None) -> dict[str, str]:
        """Solve the returned result (None: an empty one) and run the job's exporters; the ExporterResponse."""

    def finish(self, job: SolveJob, error: str | None) -> None:
        """The job ended (``error`` None: it succeeded): release what it holds."""

    def disk_usage(self, filters: list[str]) -> list[pb.UsageRecord]: ...

    def prune(self, request: pb.PruneRequest) -> list[pb.UsageRecord]: ...


class _Jobs:
    """Active jobs by Ref, and recently finished ones (for late Status calls)."""

    def __init__(self) -> None:
        self._active: dict[str, SolveJob] = {}
        self._finished: collections.OrderedDict[str, tuple[SolveJob, float]] = collections.OrderedDict()
        self._cond = threading.Condition()
        self.total = 0

    def add(self, job: SolveJob) -> None:
        with self._cond:
            if job.ref in self._active:
                raise RpcError(StatusCode.ALREADY_EXISTS, f"job ID {job.ref} exists")
            self._active[job.ref] = job
            self._finished.pop(job.ref, None)
            self.total += 1
            self._cond.notify_all()

    def finish(self, job: SolveJob) -> None:
        with self._cond:
            if self._active.get(job.ref) is job:
                del self._active[job.ref]
            self._finished[job.ref] = (job, time.monotonic())
            while len(self._finished) > FINISHED_KEPT:
                self._finished.popitem(last=False)

    def wait_for(self, ref: str, timeout: float, *, finished_too: bool,
                 gone: Callable[[], bool] = lambda: False) -> SolveJob | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                job = self._active.get(ref)
                if job is not None:
                    return job
                if finished_too:
                    kept = self._finished.get(ref)
                    if kept is not None and time.monotonic() - kept[1] < FINISHED_KEPT_SECONDS:
                        return kept[0]
                remaining = deadline - time.monotonic()
                if remaining <= 0 or gone():
                    return None
                self._cond.wait(min(remaining, POLL))

    def active(self) -> list[SolveJob]:
        with self._cond:
            return list(self._active.values())


def call_gone(stream: RpcStream, connection_gone: threading.Event | None) -> bool:
    """Whether the client cancelled this (already read) call or its connection went away. A transport that
    cannot tell a cancellation after the half-close (grpcio) still tells a lost connection."""
    if connection_gone is not None and connection_gone.is_set():
        return True
    try:
        stream.recv(0)
    except RpcError:
        return True
    except TimeoutError:
        return False
    return False


class _CallWatch:
    """Sets ``event`` once the client cancels ``stream`` or its connection goes (a thread polling both)."""

    def __init__(self, stream: RpcStream, connection_gone: threading.Event | None, event: threading.Event):
        self._stream, self._gone, self._event = stream, connection_gone, event
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="control-call-watch", daemon=True)

    def _watch(self) -> None:
        while not self._done.wait(POLL):
            if self._event.is_set():
                return
            if call_gone(self._stream, self._gone):
                self._event.set()
                return

    def __enter__(self) -> "_CallWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._done.set()


def read_request(stream: RpcStream, message_type: type[Message]) -> Message:
    """The one request message of a unary (or server-streaming) call."""
    data = stream.recv(60.0)
    if data is None:
        raise RpcError(StatusCode.INTERNAL, "the call ended without a request message")
    try:
        return message_type.FromString(data)
    except DecodeError as exc:
        raise RpcError(StatusCode.INTERNAL, f"grpc: error unmarshalling request: {exc}") from None


def exporters_of(request: pb.SolveRequest) -> list[ExporterSpec]:
    """The Solve's exporters: field 13, or else the deprecated single exporter (all dockerd 20.10 reads)."""
    if request.Exporters:
        return [ExporterSpec(e.Type, dict(e.Attrs)) for e in request.Exporters]
    if request.ExporterDeprecated:
        return [ExporterSpec(request.ExporterDeprecated, dict(request.ExporterAttrsDeprecated))]
    return []


def returned_ref_id(result: pb.Result) -> str:
    """The id of the one reference a Return names ("" for an empty result, as buildx's probes send)."""
    kind = result.WhichOneof("result")
    if kind == "ref":
        return result.ref.id
    if kind == "refDeprecated":
        return result.refDeprecated
    if kind in ("refs", "refsDeprecated"):
        refs = result.refs.refs if kind == "refs" else result.refsDeprecated.refs
        ids = [ref.id if kind == "refs" else ref for ref in refs.values()]
        if len(ids) > 1:
            raise RpcError(StatusCode.UNIMPLEMENTED,
                           f"this daemon builds for one platform; the result has {len(ids)} ({', '.join(sorted(refs))})")
        return ids[0] if ids else ""
    return ""


class ControlService:
    """The Control and LLBBridge servicers over one :class:`SolveBackend`."""

    def __init__(self, backend: SolveBackend, *, status_job_wait: float = STATUS_JOB_WAIT,
                 gateway_job_wait: float = GATEWAY_JOB_WAIT):
        self.backend = backend
        self.jobs = _Jobs()
        self.status_job_wait = status_job_wait
        self.gateway_job_wait = gateway_job_wait

    def handlers(self, connection_gone: threading.Event | None = None) -> dict[str, Handler]:
        """Every method of the two services, for one connection (``connection_gone``: set when it ends)."""
        served: dict[str, Callable[[RpcStream, threading.Event | None], None]] = {
            CONTROL_SOLVE: self.solve, CONTROL_STATUS: self.status, CONTROL_LIST_WORKERS: self.list_workers,
            CONTROL_INFO: self.info, CONTROL_DISK_USAGE: self.disk_usage, CONTROL_PRUNE: self.prune,
            GATEWAY_PING: self.gateway_ping, GATEWAY_SOLVE: self.gateway_solve, GATEWAY_RETURN: self.gateway_return,
        }
        handlers: dict[str, Handler] = {path: _bind(method, connection_gone) for path, method in served.items()}
        for prefix, names in ((CONTROL, CONTROL_UNSERVED), (GATEWAY, GATEWAY_UNSERVED)):
            for name in names:
                handlers[prefix + name] = _unimplemented(f"method {name} not implemented")
        return handlers

    def cancel_all(self, reason: str = "daemon shutting down") -> None:
        for job in self.jobs.active():
            log.info("cancelling build %s: %s", job.ref, reason)
            job.cancelled.set()

    def stats(self) -> dict:
        return {"solves_started": self.jobs.total, "solves_active": len(self.jobs.active())}

    # -- Control ------------------------------------------------------------------------------
    def list_workers(self, stream: RpcStream, connection_gone=None) -> None:
        read_request(stream, pb.ListWorkersRequest)
        stream.send(pb.ListWorkersResponse(record=self.backend.workers()).SerializeToString())

    def info(self, stream: RpcStream, connection_gone=None) -> None:
        read_request(stream, pb.InfoRequest)
        version = self.backend.buildkit_version()
        if version is None:  # grpc-go's wording for a method its service does not have (dockerd 20.10)
            raise RpcError(StatusCode.UNIMPLEMENTED, "unknown method Info for service moby.buildkit.v1.Control")
        stream.send(pb.InfoResponse(buildkitVersion=version).SerializeToString())

    def disk_usage(self, stream: RpcStream, connection_gone=None) -> None:
        request = read_request(stream, pb.DiskUsageRequest)
        records = self.backend.disk_usage([f for f in request.filter if f])
        stream.send(pb.DiskUsageResponse(record=records).SerializeToString())

    def prune(self, stream: RpcStream, connection_gone=None) -> None:
        request = read_request(stream, pb.PruneRequest)
        stream.send_many(record.SerializeToString() for record in self.backend.prune(request))

    def status(self, stream: RpcStream, connection_gone=None) -> None:
        request = read_request(stream, pb.StatusRequest)
        gone = lambda: call_gone(stream, connection_gone)  # noqa: E731
        job = self.jobs.wait_for(request.Ref, self.status_job_wait, finished_too=True, gone=gone)
        if job is None:
            raise RpcError(StatusCode.NOT_FOUND, f"no such job {request.Ref}")
        for batch in job.status.follow(gone):
            stream.send_many(batch)

    def solve(self, stream: RpcStream, connection_gone=None) -> None:
        request = read_request(stream, pb.SolveRequest)
        exporters = exporters_of(request)
        self._check_exporters(exporters)
        job = SolveJob(request.Ref or new_record_id(), request, exporters)
        self.jobs.add(job)
        error: str | None = "internal error"
        response = None
        try:
            with _CallWatch(stream, connection_gone, job.cancelled):
                if request.HasField("Definition") and getattr(request.Definition, "def"):
                    raise RpcError(StatusCode.UNIMPLEMENTED, "this daemon does not solve LLB definitions: name the "
                                                             f"{DOCKERFILE_FRONTEND} frontend or use the gateway")
                if request.Frontend:
                    result = self._run_frontend(job, request.Frontend, dict(request.FrontendAttrs))
                else:  # the gateway's build: the client solves through LLBBridge and returns the result
                    result = self._await_return(job)
                response = pb.SolveResponse(ExporterResponse=self.backend.export(job, result))
                error = None
        except RpcError as exc:
            error = exc.details or exc.code.name
            if job.cancelled.is_set() and exc.code == StatusCode.UNKNOWN:
                raise RpcError(StatusCode.CANCELLED, "context canceled") from None
            raise
        except Exception as exc:  # a bug: the build still ends with a message
            log.exception("solve %s failed", job.ref)
            raise RpcError(StatusCode.UNKNOWN, f"internal error: {exc}") from None
        finally:
            try:
                self.backend.finish(job, error)
            finally:
                job.status.close()  # the Status stream ends first, as on dockerd 26.1
                self.jobs.finish(job)
        stream.send(response.SerializeToString())

    def _check_exporters(self, exporters: list[ExporterSpec]) -> None:
        if len(exporters) > 1:
            raise RpcError(StatusCode.UNIMPLEMENTED, "this daemon runs one exporter per build, "
                                                     f"not {len(exporters)}")
        for exporter in exporters:
            if exporter.type not in self.backend.exporter_types:
                raise RpcError(StatusCode.UNKNOWN, f"exporter {exporter.type!r} could not be found")

    def _run_frontend(self, job: SolveJob, frontend: str, options: dict[str, str]) -> Any:
        if frontend != DOCKERFILE_FRONTEND:
            raise RpcError(StatusCode.UNKNOWN, f"invalid frontend: {frontend}")
        request_id = options.get("requestid", "")
        if request_id:  # buildx --print/--call subrequests (frontend.outline, frontend.targets, ...)
            raise RpcError(StatusCode.UNIMPLEMENTED, f"unsupported request {request_id}")
        return self.backend.frontend(job, frontend, options)

    def _await_return(self, job: SolveJob) -> Any:
        while not job.returned.wait(POLL):
            if job.cancelled.is_set():
                raise RpcError(StatusCode.CANCELLED, "context canceled")
        returned = job.return_request
        if returned.HasField("error") and returned.error.code != StatusCode.OK:
            code = StatusCode.from_wire(returned.error.code)
            raise RpcError(code, returned.error.message)
        ref_id = returned_ref_id(returned.result)
        if not ref_id:
            return None
        with job.lock:
            result = job.results.get(ref_id)
        if result is None:
            raise RpcError(StatusCode.NOT_FOUND, f"no result {ref_id} in build {job.ref}")
        return result

    # -- LLBBridge ------------------------------------------------------------------------------
    def _job_of_call(self, stream: RpcStream, what: str, connection_gone) -> SolveJob:
        build_id = next((value for key, value in stream.metadata if key.lower() == BUILD_ID_METADATA), "")
        if not build_id:
            raise RpcError(StatusCode.UNKNOWN, f"forwarding {what}: no buildid found in context")
        job = self.jobs.wait_for(build_id, self.gateway_job_wait, finished_too=False,
                                 gone=lambda: call_gone(stream, connection_gone))
        if job is None:
            raise RpcError(StatusCode.NOT_FOUND, f"forwarding {what}: no such job {build_id}")
        return job

    def gateway_ping(self, stream: RpcStream, connection_gone=None) -> None:
        read_request(stream, pb.PingRequest)
        self._job_of_call(stream, "Ping", connection_gone)
        caps = [pb.APICap(ID=cap, Enabled=True) for cap in FRONTEND_CAPS]
        stream.send(pb.PongResponse(FrontendAPICaps=caps, Workers=self.backend.workers()).SerializeToString())

    def gateway_solve(self, stream: RpcStream, connection_gone=None) -> None:
        request = read_request(stream, pb.FrontendSolveRequest)
        job = self._job_of_call(stream, "Solve", connection_gone)
        if not request.Frontend:
            raise RpcError(StatusCode.UNIMPLEMENTED, "this daemon does not solve LLB definitions: "
                                                     f"name the {DOCKERFILE_FRONTEND} frontend")
        with _CallWatch(stream, connection_gone, job.cancelled):
            result = self._run_frontend(job, request.Frontend, dict(request.FrontendOpt))
            if request.Evaluate:
                self.backend.evaluate(job, result)
        result_id = new_record_id()
        with job.lock:
            job.results[result_id] = result
        if request.allowResultReturn:
            answer = pb.FrontendSolveResponse(result=pb.Result(ref=pb.Ref(id=result_id)))
        else:
            answer = pb.FrontendSolveResponse(ref=result_id)
        stream.send(answer.SerializeToString())

    def gateway_return(self, stream: RpcStream, connection_gone=None) -> None:
        request = read_request(stream, pb.ReturnRequest)
        job = self._job_of_call(stream, "Return", connection_gone)
        with job.lock:
            if job.return_request is not None:
                raise RpcError(StatusCode.FAILED_PRECONDITION, f"build {job.ref} has already returned")
            job.return_request = request
        job.returned.set()
        stream.send(pb.ReturnResponse().SerializeToString())


def _bind(method, connection_gone: threading.Event | None) -> Handler:
    return lambda stream: method(stream, connection_gone)


def _unimplemented(message: str) -> Handler:
    def handler(stream: RpcStream) -> None:
        raise RpcError(StatusCode.UNIMPLEMENTED, message)
    return handler
