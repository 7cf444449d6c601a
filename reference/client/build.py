"""Run a BuildKit build on an Engine API daemon through a client session.

``build()`` is the one-call library API; ``python -m reference.client build``
wraps it.  The session serves the context and Dockerfile (DiffCopy or
TarStream), receives exports (FileSend), secrets and registry auth.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import secrets as _secrets
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable
from urllib.parse import urlencode

from ..dockerhost import EngineError, HttpConnection, connect, error_message
from ..errors import SessionError
from ..session import SessionRequest, new_session_id, open_session, session_identity
from .methods import advertised_methods

if TYPE_CHECKING:
    from .progress import ProgressEvent
    from .services import ClientServices, StreamStats

# Only what opening the session and sending /build needs is imported up front:
# the serving stack (h2, protobuf, file sync) loads while the daemon prepares
# the build, see build().

GENERATIONS = {
    # generation: (file sync protocols advertised, token authority, Secrets advertised without --secret).
    # n is the docker CLI 20.10, n+1 the docker CLI 26 with buildx 0.13; both advertise TarStream and refuse
    # it (conformance/SPEC.md). buildx serves Secrets on every build session (NOT_FOUND for an unknown ID),
    # and SSH too, which we do not serve and so never advertise (METHODS-2). Session name and shared key:
    # reference.session.session_identity.
    "n-1": (("tarstream",), False, False),  # and the 2017 request: Dockerfile as the /build body
    "n": (("diffcopy", "tarstream"), True, False),
    "n+1": (("diffcopy", "tarstream"), True, True),
}


# The Engine API entry point of a build: POST /build, or BuildKit's Control API on POST /grpc
# (reference/client/grpcsolve.py). By default each generation's real client's: the docker CLI 20.10 posts
# /build; `docker build` of the docker CLI 26 is buildx, which solves over /grpc.
APIS = ("build", "grpc")
DEFAULT_API = {"n-1": "build", "n": "build", "n+1": "grpc"}


class BuildError(SessionError):
    """The daemon reported the build as failed (or it hung past our timeout).

    ``message``: the daemon's error (also ``str(error)``); ``step``: the name of the step that failed, as the
    progress shows it (``[2/3] RUN false``), or None when no step reported an error; ``logs``: that step's
    last output lines (at most ``FAILED_STEP_LOG_LINES``).
    """

    def __init__(self, message: str, step: str | None = None, logs: Iterable[str] = ()):
        super().__init__(message)
        self.message = message
        self.step = step
        self.logs = list(logs)


FAILED_STEP_LOG_LINES = 10
# a step's output kept for the failure report: enough bytes for its last lines
_STEP_LOG_BYTES = 16 * 1024
# the error of a step stopped because another one failed: never the step that failed
_CANCELLED = "context canceled"


class _FailedStepTracker:
    """Watches the progress for the step that failed and its output, so a BuildError can name them."""

    def __init__(self):
        self.names: dict[str, str] = {}
        self.logs: dict[str, bytearray] = {}
        self.failed: list[str] = []  # digests of vertices that reported an error, in order

    def __call__(self, status: "StatusResponse") -> None:
        for vertex in status.vertexes:
            self.names[vertex.digest] = vertex.name
            if vertex.error and vertex.digest not in self.failed:
                self.failed.append(vertex.digest)
                if _CANCELLED not in vertex.error:
                    self.failed.insert(0, self.failed.pop())  # a real failure before any cancelled one
        for log in status.logs:
            buffer = self.logs.setdefault(log.vertex, bytearray())
            buffer += log.msg
            del buffer[:-_STEP_LOG_BYTES]

    def wrap(self, progress):
        if progress is None:
            return self
        def both(status):
            self(status)
            progress(status)
        return both

    def annotate(self, error: BuildError) -> BuildError:
        if error.step is not None or not self.failed:
            return error
        digest = self.failed[0]
        lines = bytes(self.logs.get(digest, b"")).decode("utf-8", "replace").splitlines()
        annotated = BuildError(error.message, self.names.get(digest) or None, lines[-FAILED_STEP_LOG_LINES:])
        annotated.__cause__ = error.__cause__
        return annotated


@dataclass
class Output:
    type: str  # local | tar
    dest: str

    @classmethod
    def parse(cls, text: str) -> "Output":
        fields = dict(part.split("=", 1) for part in text.split(",") if "=" in part)
        if "type" not in fields and "dest" not in fields:
            fields = {"type": "local", "dest": text}
        kind = fields.get("type", "local")
        if kind not in ("local", "tar"):
            raise ValueError(f"unsupported output type {kind!r} (local or tar)")
        if "dest" not in fields:
            raise ValueError("an output needs dest=")
        return cls(kind, fields["dest"])


@dataclass
class BuildResult:
    image_id: str | None
    streams: list[StreamStats]
    calls: list[str]
    session_id: str
    methods: list[str]
    vertex_errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    api: str = "build"  # the entry point used: build (POST /build) or grpc (Control/Solve on POST /grpc)

    def stats_json(self) -> dict:
        from .services import stats_as_dicts

        return {"image_id": self.image_id, "session_id": self.session_id, "seconds": self.seconds, "api": self.api,
                "methods": self.methods, "calls": self.calls, "streams": stats_as_dicts(self.streams)}


def _serve(transport: str):
    if transport == "h2":
        from ..transport import h2grpc

        return h2grpc.serve_h2
    if transport == "grpcio":
        from ..transport import grpcio_pump

        return grpcio_pump.serve_grpcio
    raise ValueError(f"unknown transport {transport!r} (h2 or grpcio)")


def build(
    context: str,
    *,
    tags: str | Iterable[str] = (),
    dockerfile: str | None = None,
    outputs: str | Output | Iterable[str | Output] = (),
    secrets: dict[str, str] | None = None,
    ssh: "Iterable[str] | dict | None" = None,
    build_args: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
    target: str | None = None,
    network: str | None = None,
    no_cache: bool = False,
    pull: bool = False,
    generation: str = "n+1",
    filesync: tuple[str, ...] | None = None,
    auth: str | None = None,
    transport: str = "h2",
    host: str | None = None,
    progress: Callable[[ProgressEvent], None] | None = None,
    timeout: float | None = None,
    hang_timeout: float = 20.0,
    extra_query: dict[str, str] | None = None,
    api: str | None = None,
) -> BuildResult:
    """Build ``context`` on the daemon at ``host`` (default ``DOCKER_HOST``).

    ``api``: ``build`` (POST /build) or ``grpc`` (Control/Solve on POST /grpc); None: the generation's (n+1:
    grpc, where the daemon has the Control API; a daemon that answers /grpc with 404 gets /build), or ``build``
    when ``extra_query`` (more /build parameters) is given.

    ``tags``: one tag or several; ``outputs``: ``Output`` objects or ``-o`` strings (``type=local,dest=DIR``,
    ``type=tar,dest=FILE``, or a bare directory), one or a list. ``ssh``: ``--ssh`` values (``default``,
    ``ID=SOCKET`` or ``ID=KEY[,KEY...]``) or {ID: ``sshforward.AgentSource``}: the agents the build's
    ``RUN --mount=type=ssh`` may use, only their listed keys, never key management.

    ``progress``: called with each ``reference.client.progress`` event (a step started, cached, done or
    failed; a status row; a log line) as the daemon reports it.
    """
    from .progress import status_callback

    on_status = status_callback(progress)
    started = time.monotonic()
    tags = [tags] if isinstance(tags, str) else list(tags)
    if isinstance(outputs, (str, Output)):
        outputs = [outputs]
    outputs = [out if isinstance(out, Output) else Output.parse(out) for out in outputs]
    default_sync, default_authority, always_secrets = GENERATIONS[generation]
    filesync = tuple(filesync) if filesync else default_sync
    token_authority = default_authority if auth is None else auth == "v2"
    if len(outputs) > 1:
        raise ValueError("at most one output is supported")
    context_dir = os.path.abspath(context)
    if not os.path.isdir(context_dir):
        raise SessionError(f"context {context!r} is not a directory")
    dockerfile_path = os.path.abspath(dockerfile) if dockerfile else os.path.join(context_dir, "Dockerfile")
    # Generation n-1 is the 2017 request: the Dockerfile travels as the /build body.
    legacy_request = generation == "n-1"
    entry = api or ("build" if extra_query else DEFAULT_API[generation])
    if entry not in APIS:
        raise ValueError(f"unknown api {entry!r} (build or grpc)")
    if entry == "grpc" and (legacy_request or extra_query):
        raise ValueError("--api grpc needs generation n or n+1 and no extra /build parameters")
    advertise_secrets = always_secrets or bool(secrets)
    ssh_sources = _ssh_sources(ssh)  # errors (no agent, a bad key) before anything is sent
    advertise_ssh = always_secrets or bool(ssh_sources)  # buildx advertises SSH on every session, as Secrets
    methods = advertised_methods(filesync, exporting=bool(outputs), secrets=advertise_secrets, auth=True,
                                 token_authority=token_authority, ssh=advertise_ssh)
    request = SessionRequest(new_session_id(), *session_identity(context_dir, generation), methods)
    query = {
        "version": "2",
        "session": request.session_id,
        "remote": "client-session",
        "dockerfile": os.path.basename(dockerfile_path),
        "buildid": _secrets.token_hex(16),
        "rm": "1",
    }
    body = None
    if legacy_request:
        del query["version"], query["buildid"]
        with open(dockerfile_path, "rb") as fh:
            body = fh.read()
    if tags:
        query["t"] = list(tags)
    if outputs:
        query["outputs"] = json.dumps([{"Type": out.type, "Attrs": {}} for out in outputs])
    if build_args:
        query["buildargs"] = json.dumps(build_args)
    if labels:
        query["labels"] = json.dumps(labels)
    if target:
        query["target"] = target
    if network:
        query["networkmode"] = network
    if no_cache:
        query["nocache"] = "1"
    if pull:
        query["pull"] = "1"
    query.update(extra_query or {})

    ssh_provider = None
    if advertise_ssh:  # its private agents (key files) start, or fail, before anything reaches the daemon
        from .sshforward import SSHForwardProvider

        ssh_provider = SSHForwardProvider(ssh_sources)
    control = None  # the /grpc connection and its socket
    if entry == "grpc":
        from . import grpcsolve

        try:
            control = grpcsolve.open_control(host, transport)
        except EngineError as exc:
            if api is not None or exc.status != 404:
                if ssh_provider is not None:
                    ssh_provider.close()
                raise
            entry = "build"  # no Control API (the 2017 design; a suite's instrumented daemon)
    try:
        if control is not None:
            if not grpcsolve.list_workers(control[0]):  # buildx asks first, too
                raise BuildError("the daemon has no BuildKit worker (Control/ListWorkers is empty)")
        sock, leftover = open_session(request, host)
    except BaseException:
        _close_control(control)
        if ssh_provider is not None:
            ssh_provider.close()
        raise
    server = response = None
    try:
        # The daemon looks up the session, parses the request and starts solving
        # while we import and start the serving side; it waits for the session's
        # HTTP/2 handshake before its first call, and polls health only after 1 s.
        if control is None:
            response = _BuildResponse(query, host, body)
        services = _client_services(context_dir, dockerfile_path, legacy_request, filesync, secrets,
                                    advertise_secrets, token_authority, outputs,
                                    stream_protocol_env=generation != "n+1", ssh=ssh_provider)
        handlers = services.handlers()
        if sorted(handlers) != methods:
            raise AssertionError(f"served methods {sorted(handlers)} differ from the advertised {methods}")
        server = _serve(transport)(sock, handlers, leftover)
        failed_step = _FailedStepTracker()
        on_status = failed_step.wrap(on_status)  # raw StatusResponse messages: the events are made from them
        try:
            image_id, vertex_errors = _follow(response, control, request.session_id, dockerfile_path, outputs,
                                              tags, build_args, labels, target, no_cache, pull, network,
                                              on_status, timeout, hang_timeout)
        except BuildError as exc:
            raise failed_step.annotate(exc) from exc.__cause__
    finally:
        if ssh_provider is not None:
            ssh_provider.close()
        if response is not None:
            response.close()
        if server is not None:
            server.close()
        sock.close()
        _close_control(control)
    return BuildResult(image_id, services.streams, services.calls, request.session_id, request.methods,
                       vertex_errors, time.monotonic() - started, entry)


def _follow(response, control, session_id, dockerfile_path, outputs, tags, build_args, labels, target, no_cache,
            pull, network, progress, timeout, hang_timeout) -> tuple[str | None, list[str]]:
    """Follow the build to its end on /build (``response``) or /grpc (``control``): (image id, vertex errors)."""
    if control is None:
        return response.follow(progress, timeout, hang_timeout)
    from . import grpcsolve

    solve = grpcsolve.solve_request(
        new_session_id(), session_id, dockerfile_name=os.path.basename(dockerfile_path),
        output_type=outputs[0].type if outputs else None, tags=list(tags), build_args=build_args,
        labels=labels, target=target, no_cache=no_cache, pull=pull, network=network)
    answer, vertex_errors = grpcsolve.run_solve(control[0], solve, progress=progress, timeout=timeout,
                                                hang_timeout=hang_timeout, error_type=BuildError)
    return (None if outputs else grpcsolve.image_id_of(answer)), vertex_errors


def _close_control(control) -> None:
    if control is not None:
        conn, sock = control
        conn.close()
        sock.close()


def _client_services(context_dir: str, dockerfile_path: str, legacy_request: bool, filesync, secrets,
                     advertise_secrets: bool, token_authority: bool, outputs, *,
                     stream_protocol_env: bool = True, ssh=None) -> "ClientServices":
    from .auth import AuthProvider
    from .services import ClientServices, SyncedDir, local_export_handler, tar_export_handler

    if legacy_request:
        # The 2017 request: the context is one unnamed directory and the client applies .dockerignore.
        dirs = {"": SyncedDir(context_dir, owner=(0, 0), excludes=_read_dockerignore(context_dir, dockerfile_path))}
    else:
        dirs = {
            "context": SyncedDir(context_dir, owner=(0, 0)),
            "dockerfile": SyncedDir(os.path.dirname(dockerfile_path)),
        }
    # BuildKit 0.10 dropped BUILD_STREAM_PROTOCOL (bk commit 35fcb28a0): the n+1 client ignores it (NEGOTIATE-3)
    services = ClientServices(dirs, filesync=filesync, secrets=secrets, advertise_secrets=advertise_secrets,
                              auth=AuthProvider(token_authority=token_authority),
                              stream_protocol_env=stream_protocol_env, ssh=ssh)
    for out in outputs:
        make = local_export_handler if out.type == "local" else tar_export_handler
        services.export = make(out.dest, services.record)
    return services


def _ssh_sources(ssh) -> dict:
    if not ssh:
        return {}
    if isinstance(ssh, dict):
        return dict(ssh)
    from .sshforward import parse_ssh_specs

    return parse_ssh_specs([ssh] if isinstance(ssh, str) else list(ssh))


def _read_dockerignore(context_dir: str, dockerfile_path: str) -> list[str]:
    """Patterns of ``<Dockerfile>.dockerignore`` (preferred) or ``.dockerignore``."""
    from ..patterns import parse_dockerignore

    for candidate in (dockerfile_path + ".dockerignore", os.path.join(context_dir, ".dockerignore")):
        try:
            with open(candidate, "rb") as fh:
                return parse_dockerignore(fh.read())
        except FileNotFoundError:
            continue
    return []


def post_build(query: dict, host: str, progress: Callable[["StatusResponse"], None] | None, timeout: float | None,
               hang_timeout: float, body: bytes | None = None) -> tuple[str | None, list[str]]:
    """POST /build with exactly ``query`` (and ``body``, a tar context, if given) and follow it to the end:
    (image id, vertex errors). ``progress`` gets BuildKit's raw ``StatusResponse`` messages. For callers that
    run the session themselves (the conformance suite's scripted clients); ``build()`` does everything."""
    response = _BuildResponse(query, host, body)
    try:
        return response.follow(progress, timeout, hang_timeout)
    finally:
        response.close()


class _BuildResponse:
    """A POST /build in flight, its JSON stream read on a thread.

    The thread lets ``follow`` cut off a daemon that reports a vertex error and
    then never ends the response (a known dockerd 20.10 hang) after
    ``hang_timeout``, and lets the request go out before the session is served.
    """

    def __init__(self, query, host, body: bytes | None = None):
        self.sock = connect(host, timeout=None)
        self.events: queue.Queue = queue.Queue()
        path = "/build?" + urlencode(query, doseq=True)
        headers = [("Content-Type", "application/x-tar")] if body is not None else []
        threading.Thread(target=self._read, args=(path, headers, body), name="build-response", daemon=True).start()

    def _read(self, path: str, headers, body: bytes | None) -> None:
        events = self.events
        try:
            http = HttpConnection(self.sock)
            resp = http.request("POST", path, headers, body)
            if resp.status != 200:
                events.put(EngineError(resp.status, error_message(http.read_body())))
                return
            for obj in http.json_stream():
                events.put(obj)
            events.put(None)
        except BaseException as exc:  # delivered to the caller
            events.put(exc)

    def follow(self, progress, timeout, hang_timeout) -> tuple[str | None, list[str]]:
        from ..pb.control_pb2 import StatusResponse

        deadline = time.monotonic() + timeout if timeout else None
        image_id = None
        vertex_errors: list[str] = []
        error_seen_at: float | None = None
        while True:
            wait = 1.0
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    raise BuildError(f"the build did not finish within {timeout:.0f} s")
            if error_seen_at is not None:
                grace_left = error_seen_at + hang_timeout - time.monotonic()
                if grace_left <= 0:
                    raise BuildError("the daemon reported an error but did not end the build: "
                                     + "; ".join(vertex_errors))
                wait = min(wait, grace_left)  # the grace ends on time, not at the next second
            try:
                item = self.events.get(timeout=max(wait, 0.01))
            except queue.Empty:
                continue
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            if "errorDetail" in item or "error" in item:
                detail = item.get("errorDetail", {}).get("message") or item.get("error")
                raise BuildError(detail)
            aux_id = item.get("id")
            aux = item.get("aux")
            if aux_id == "moby.buildkit.trace" and aux is not None:
                status = StatusResponse.FromString(base64.b64decode(aux))
                for vertex in status.vertexes:
                    if vertex.error and vertex.error not in vertex_errors:
                        vertex_errors.append(vertex.error)
                        error_seen_at = error_seen_at or time.monotonic()
                if progress is not None:
                    progress(status)
            elif aux_id == "moby.image.id" and aux is not None:
                image_id = aux.get("ID")
            elif aux_id is None and isinstance(aux, dict) and aux.get("ID"):
                image_id = aux["ID"]  # the legacy builder's shape (2017 request)
        return image_id, vertex_errors

    def close(self) -> None:
        try:
            self.sock.shutdown(2)
        except OSError:
            pass
        self.sock.close()
