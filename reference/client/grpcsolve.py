"""A build through BuildKit's Control API on ``POST /grpc`` (``--api grpc``), the way into dockerd that buildx uses.

The client dials ``POST /grpc`` with ``Upgrade: h2c`` and is the HTTP/2 *client* there (it sends the preface),
asks ``Control/ListWorkers``, then streams ``Control/Status{Ref}`` while ``Control/Solve`` runs. Unlike buildx,
which names no frontend and drives the Dockerfile frontend through the gateway (LLBBridge), the Solve names
``Frontend: dockerfile.v0`` itself (buildctl's way); dockerd 20.10 and 26.1 both build that (measured,
docs/observed/buildx-0.13-and-cli-20.10-on-the-wire.md section 8). The session is the same ``POST /session`` as for ``/build``. The exporter
goes in both fields buildx fills: ``ExporterDeprecated`` (3, all dockerd 20.10 reads) and ``Exporters`` (13).
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from ..dockerhost import EngineError, HttpConnection, connect, error_message
from ..errors import SessionError
from ..pb import control_pb2 as pb
from ..transport.base import ClientConnection, RpcError

CONTROL = "/moby.buildkit.v1.Control/"
LIST_WORKERS = CONTROL + "ListWorkers"
STATUS = CONTROL + "Status"
SOLVE = CONTROL + "Solve"
DOCKERFILE_FRONTEND = "dockerfile.v0"
IMAGE_EXPORTER = "moby"  # the daemon's image store; attribute "name": comma-separated tags
# After the Solve answered, the Status stream gets this long to deliver its last messages (dockerd 20.10
# ends it right after the answer, 26.1 right before) ...
STATUS_DRAIN = 5.0
# ... or, after a failed Solve, until it has been quiet this long: the Status of a Solve that was refused
# before it built anything may never end.
STATUS_QUIET = 0.5
POLL = 0.5


class ControlError(SessionError):
    """The daemon's Control API refused or failed a call."""


def _connector(transport: str):
    if transport == "grpcio":
        from ..transport import grpcio_pump

        return grpcio_pump.connect_grpcio
    from ..transport import h2grpc

    return h2grpc.connect_h2


def open_control(host: str | None, transport: str = "h2") -> tuple[ClientConnection, object]:
    """``POST /grpc`` upgraded to h2c; the gRPC connection and its socket. EngineError when refused (404: the
    daemon has no Control API)."""
    sock = connect(host, timeout=30.0)
    try:
        http = HttpConnection(sock)
        resp = http.request("POST", "/grpc", [("Connection", "Upgrade"), ("Upgrade", "h2c")])
        if resp.status != 101:
            raise EngineError(resp.status, error_message(http.read_body()))
        leftover = http.switched_protocol_bytes()
        sock.settimeout(None)
        return _connector(transport)(sock, leftover), sock
    except BaseException:
        sock.close()
        raise


def solve_request(ref: str, session_id: str, *, dockerfile_name: str, output_type: str | None, tags: list[str],
                  build_args: dict[str, str] | None, labels: dict[str, str] | None, target: str | None,
                  no_cache: bool, pull: bool, network: str | None) -> pb.SolveRequest:
    """The Solve of one Dockerfile build, with buildx's frontend attributes."""
    attrs = {"filename": dockerfile_name, "image-resolve-mode": "pull" if pull else "local"}
    if target:
        attrs["target"] = target
    for key, value in (build_args or {}).items():
        attrs[f"build-arg:{key}"] = value
    for key, value in (labels or {}).items():
        attrs[f"label:{key}"] = value
    if no_cache:
        attrs["no-cache"] = ""
    if network:
        attrs["force-network-mode"] = network
    exporter = output_type or IMAGE_EXPORTER
    exporter_attrs = {"name": ",".join(tags)} if exporter == IMAGE_EXPORTER and tags else {}
    return pb.SolveRequest(Ref=ref, Session=session_id, Frontend=DOCKERFILE_FRONTEND, FrontendAttrs=attrs,
                           ExporterDeprecated=exporter, ExporterAttrsDeprecated=exporter_attrs,
                           Cache=pb.CacheOptions(), Exporters=[pb.Exporter(Type=exporter, Attrs=exporter_attrs)])


def list_workers(conn: ClientConnection, timeout: float = 30.0) -> list[pb.WorkerRecord]:
    try:
        data = conn.unary(LIST_WORKERS, pb.ListWorkersRequest().SerializeToString(), timeout=timeout)
    except RpcError as exc:
        raise ControlError(f"ListWorkers failed: {exc}") from None
    return list(pb.ListWorkersResponse.FromString(data).record)


class _StatusFollower:
    """Reads ``Control/Status`` on a thread: progress to the callback, vertex errors noted with their time."""

    def __init__(self, conn: ClientConnection, ref: str, progress: Callable[[pb.StatusResponse], None] | None):
        self.stream = conn.open_stream(STATUS)
        self.stream.send(pb.StatusRequest(Ref=ref).SerializeToString())
        self.stream.close_send()
        self.progress = progress
        self.vertex_errors: list[str] = []
        self.first_error_at: float | None = None
        self.error: Exception | None = None
        self.done = threading.Event()
        self.last_message_at = time.monotonic()
        self._lock = threading.Lock()
        threading.Thread(target=self._read, name="control-status", daemon=True).start()

    def _read(self) -> None:
        try:
            for data in self.stream:
                status = pb.StatusResponse.FromString(data)
                self.last_message_at = time.monotonic()
                with self._lock:
                    for vertex in status.vertexes:
                        if vertex.error and vertex.error not in self.vertex_errors:
                            self.vertex_errors.append(vertex.error)
                            self.first_error_at = self.first_error_at or time.monotonic()
                if self.progress is not None:
                    self.progress(status)
        except Exception as exc:  # RpcError when cancelled; a bad message
            self.error = exc
        finally:
            self.done.set()

    def settle(self, limit: float, quiet: float) -> None:
        """Wait for the end of the stream, at most ``limit`` seconds, or until no message came for ``quiet``."""
        deadline = time.monotonic() + limit
        while not self.done.is_set():
            now = time.monotonic()
            if now >= deadline or now - self.last_message_at >= quiet:
                return
            self.done.wait(min(deadline, self.last_message_at + quiet) - now)

    def cancel(self) -> None:
        if not self.done.is_set():
            self.stream.cancel()


def run_solve(conn: ClientConnection, request: pb.SolveRequest, *,
              progress: Callable[[pb.StatusResponse], None] | None, timeout: float | None,
              hang_timeout: float, error_type: type[Exception] = ControlError) -> tuple[pb.SolveResponse, list[str]]:
    """Status and Solve of one build, to the Solve's answer: (response, vertex errors). A daemon that reports
    a vertex error and then does not answer within ``hang_timeout`` is given up on, as on ``/build``."""
    deadline = time.monotonic() + timeout if timeout else None
    status = _StatusFollower(conn, request.Ref, progress)
    solve = conn.open_stream(SOLVE)
    finished = False
    try:
        solve.send(request.SerializeToString())
        solve.close_send()
        answer = None
        while True:
            if deadline is not None and time.monotonic() > deadline:
                raise error_type(f"the build did not finish within {timeout:.0f} s")
            wait = POLL
            if status.first_error_at is not None:
                grace_left = status.first_error_at + hang_timeout - time.monotonic()
                if grace_left <= 0:
                    raise error_type("the daemon reported an error but did not end the build: "
                                     + "; ".join(status.vertex_errors))
                wait = min(wait, grace_left)  # the grace ends on time, not at the next poll
            try:
                data = solve.recv(wait)
            except TimeoutError:
                continue
            except RpcError as exc:
                finished = True
                status.settle(STATUS_DRAIN, STATUS_QUIET)  # the failed step's error and output may be on their way
                raise error_type(exc.details or exc.code.name) from None
            if data is None:
                finished = True
                if answer is None:
                    raise error_type("Solve ended without an answer")
                break
            answer = pb.SolveResponse.FromString(data)
        status.done.wait(STATUS_DRAIN)
        return answer, list(status.vertex_errors)
    finally:
        if not finished:
            solve.cancel()  # Ctrl-C, a timeout: the daemon cancels the build
        status.cancel()


def image_id_of(response: pb.SolveResponse) -> str | None:
    """The image an image export made: dockerd 26.1 names its config digest, 20.10 only the image digest (the
    same value there)."""
    exported = response.ExporterResponse
    return exported.get("containerimage.config.digest") or exported.get("containerimage.digest") or None
