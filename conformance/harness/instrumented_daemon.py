"""An instrumented, scriptable daemon: the suite plays the daemon to test a client.

It serves just enough of the Engine API for a client to run a build
(``/_ping``, ``/version``, ``/session``, ``/build``, and for generations n and
n+1 ``/grpc``, BuildKit's Control API that buildx builds through:
conformance/harness/control_api.py), records everything the client sends, and
hands each build, whichever entry point it came by, to a *scenario*: a function
that drives the client's session services (health, DiffCopy, FileSend,
secrets...) the way a test wants and decides what the build's answer says.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

import h11

from reference import metadata as md_escaping
from reference.socketdirs import socket_dir
from reference.transport.base import ClientConnection

API_VERSION = "1.41"
#: What dockerd 26.1 (generation n+1) adds to every FileSend call: the index of the exporter (one output: 0).
EXPORTER_ID_KEY = "buildkit-attachable-exporter-id"


def new_traceparent(trace_id: str | None = None) -> str:
    """A W3C trace context as BuildKit 0.13 sends it: one trace per build, a new span per call."""
    return f"00-{trace_id or secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def escaped_like_dockerd_26(pairs) -> list[tuple[str, str]]:
    """Metadata pairs as dockerd 26.1 sends them: every value of a key escaped (url.QueryEscape) as soon as
    one is non-ASCII, followed by ``<key>-encoded: 1``; all-ASCII keys unchanged. Key order is kept."""
    grouped: dict[str, list[str]] = {}
    for key, value in pairs:
        grouped.setdefault(key, []).append(value)
    return [(key, value) for key, values in md_escaping.encode(grouped).items() for value in values]


@dataclass
class SessionRecord:
    """One client session as the daemon saw it."""

    headers: list[tuple[str, str]]  # raw header lines, names lower-cased, in order
    session_id: str
    conn: ClientConnection | None = None
    opened_at: float = field(default_factory=time.monotonic)
    upgrade_response: bytes = b""
    generation: str = "n"  # the daemon generation played on this session (the client's)
    trace_id: str = field(default_factory=lambda: secrets.token_hex(16))

    def header_values(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k == name]

    @property
    def methods(self) -> list[str]:
        return self.header_values("x-docker-expose-session-grpc-method")

    def supports(self, method: str) -> bool:
        return method.lower() in {m.lower() for m in self.methods}

    def filesync_metadata(self, pairs) -> list[tuple[str, str]]:
        """The metadata of a FileSync call with these options, as the daemon of this session's generation
        sends it: dockerd 20.10 (n) raw; dockerd 26.1 (n+1) escaped per key with markers, plus traceparent."""
        if self.generation != "n+1":
            return list(pairs)
        return escaped_like_dockerd_26(pairs) + [("traceparent", new_traceparent(self.trace_id))]

    def filesend_metadata(self, exporter_id: int = 0) -> list[tuple[str, str]]:
        """The metadata of a FileSend call: none from dockerd 20.10; the exporter ID and a traceparent from
        dockerd 26.1, to every client (the client must ignore what it does not know)."""
        if self.generation != "n+1":
            return []
        return [(EXPORTER_ID_KEY, str(exporter_id)), ("traceparent", new_traceparent(self.trace_id))]


@dataclass
class BuildRecord:
    """One build. ``query`` is the ``/build`` query; for a build that came by ``/grpc`` it is the query that
    asks for the same (control_api.equivalent_query), so scenarios read one shape."""

    target: str
    query: dict[str, list[str]]
    body: bytes
    session: SessionRecord | None = None
    outcome: dict = field(default_factory=dict)
    api: str = "build"  # "build": POST /build; "grpc": BuildKit's Control API on POST /grpc
    solve: Any = None  # api grpc: the Control/Solve request (reference.pb.control_pb2.SolveRequest)
    frontend_options: dict[str, str] = field(default_factory=dict)  # api grpc: the frontend's options
    arrived: float = field(default_factory=time.monotonic)  # when the client asked (POST /build, Control/Solve)

    @property
    def session_id(self) -> str:
        return (self.query.get("session") or [""])[0]


def is_body_upload(query: dict[str, list[str]], body: bytes) -> bool:
    """A BuildKit /build (version=2) that brings its context as a tar body, not through the session
    (remote=client-session): SPEC.md's body-upload profile. A tar has "ustar" at offset 257."""
    return (query.get("version") == ["2"] and (query.get("remote") or [""])[0] != "client-session"
            and body[257:262] == b"ustar")


@dataclass
class ScenarioResult:
    image_id: str | None = "sha256:" + "0" * 64
    error: str | None = None
    trace: list[bytes] = field(default_factory=list)  # serialized StatusResponse messages to stream


Scenario = Callable[[BuildRecord], ScenarioResult]


class InstrumentedDaemon:
    """``with InstrumentedDaemon(scenario) as d: client.run(ctx, d.host)``"""

    def __init__(self, scenario: Scenario | None = None, *, transport: str = "h2", session_wait: float = 5.0,
                 generation: str = "n"):
        self.scenario = scenario or (lambda build: ScenarioResult())
        self.transport = transport
        # the daemon generation to play (the client's): n+1 sends metadata the way dockerd 26.1 does
        self.generation = generation
        self.session_wait = session_wait
        self.dir = socket_dir("conf-fd-")
        self.socket_path = os.path.join(self.dir, "d.sock")
        self.host = f"unix://{self.socket_path}"
        self.sessions: dict[str, SessionRecord] = {}
        self.builds: list[BuildRecord] = []
        self.requests: list[tuple[str, str]] = []  # (method, target)
        self.request_log: list[tuple[str, str, str]] = []  # (method, path, User-Agent): who the client is
        self.errors: list[str] = []
        self._cond = threading.Condition()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._closing = False
        # POST /grpc: generations n and n+1, as dockerd 20.10 and 26.1 (the 2017 design had no Control API)
        self.control_api = None
        if generation != "n-1":
            from .control_api import ControlApiEndpoint

            self.control_api = ControlApiEndpoint(self)

    # -- lifecycle ----------------------------------------------------------------
    def __enter__(self) -> "InstrumentedDaemon":
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.socket_path)
        self._listener.listen(16)
        t = threading.Thread(target=self._accept_loop, name="instrumented-daemon", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._closing = True
        if self._listener is not None:
            try:
                self._listener.close()
            except OSError:
                pass
        if self.control_api is not None:
            self.control_api.close()
        for record in list(self.sessions.values()):
            if record.conn is not None:
                record.conn.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def wait_for_session(self, session_id: str, timeout: float) -> SessionRecord | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while session_id not in self.sessions or self.sessions[session_id].conn is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return self.sessions[session_id]

    # -- HTTP ---------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closing:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve_connection, args=(sock,), daemon=True)
            t.start()

    def _serve_connection(self, sock: socket.socket) -> None:
        conn = h11.Connection(h11.SERVER)
        hijacked = False
        try:
            while True:
                request, body = self._read_request(sock, conn)
                if request is None:
                    return
                target = request.target.decode("latin-1")
                method = request.method.decode()
                self.requests.append((method, target))
                path = urlsplit(target).path
                parts = path.split("/")
                if len(parts) > 2 and parts[1].startswith("v") and parts[1][1:2].isdigit():
                    path = "/" + "/".join(parts[2:])
                headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in request.headers]
                self.request_log.append((method, urlsplit(target).path, dict(headers).get("user-agent", "")))
                if path == "/session" and method == "POST":
                    hijacked = self._session(sock, conn, headers)
                    return
                if path == "/grpc" and method == "POST" and self.control_api is not None:
                    hijacked = self.control_api.serve(
                        sock, headers, bytes(conn.trailing_data[0]),
                        lambda status, payload: self._respond(sock, conn, status, payload))
                    if hijacked:
                        return
                elif path == "/build" and method == "POST":
                    self._build(sock, conn, target, body)
                elif path == "/_ping":
                    self._respond(sock, conn, 200, b"OK" if method == "GET" else b"", "text/plain",
                                  [("API-Version", API_VERSION), ("Builder-Version", "2"), ("Docker-Experimental", "true"),
                                   ("OSType", "linux")])
                elif path == "/version":
                    self._respond(sock, conn, 200, json.dumps({
                        "Version": "0.0.0-conformance", "ApiVersion": API_VERSION, "MinAPIVersion": "1.12",
                        "Os": "linux", "Arch": "amd64", "Components": [{"Name": "conformance-harness", "Version": "0"}],
                    }).encode())
                else:
                    self._respond(sock, conn, 404, b'{"message":"page not found"}')
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (OSError, h11.ProtocolError) as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            if not hijacked:
                sock.close()

    def _read_request(self, sock, conn):
        request = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = sock.recv(65536)
                conn.receive_data(data)
                if not data and request is None:
                    return None, b""
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return request, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                return None, b""

    def _respond(self, sock, conn, status: int, body: bytes, content_type: str = "application/json",
                 extra: list[tuple[str, str]] = ()) -> None:
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body))), *extra]
        sock.sendall(conn.send(h11.Response(status_code=status, headers=headers)))
        if body:
            sock.sendall(conn.send(h11.Data(data=body)))
        sock.sendall(conn.send(h11.EndOfMessage()))

    # -- session ----------------------------------------------------------------------------
    def _session(self, sock, conn, headers) -> bool:
        """Answer /session; True when the connection was upgraded (the session owns it now)."""
        values = dict(headers)
        session_id = values.get("x-docker-expose-session-uuid", "")
        upgrade = values.get("upgrade", "")
        if not upgrade:
            self._respond(sock, conn, 400, b'{"message":"no upgrade proto in request"}')
            return False
        if upgrade != "h2c":
            self._respond(sock, conn, 400, json.dumps({"message": f"protocol {upgrade} not supported"}).encode())
            return False
        if session_id in self.sessions:
            self._respond(sock, conn, 400, json.dumps({"message": f"session {session_id} already exists"}).encode())
            return False
        record = SessionRecord(headers, session_id, generation=self.generation)
        with self._cond:
            self.sessions[session_id] = record
        head = self._upgrade_head()
        record.upgrade_response = head
        leftover = bytes(conn.trailing_data[0])
        sock = self._send_upgrade(sock, head, session_id, leftover)
        if self.transport == "grpcio":
            from reference.transport.grpcio_pump import connect_grpcio as connect
        else:
            from reference.transport.h2grpc import connect_h2 as connect
        record.conn = connect(sock, leftover)
        with self._cond:
            self._cond.notify_all()
        return True

    # hooks for scripted variants of the handshake
    def _upgrade_head(self) -> bytes:
        return b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"

    def _send_upgrade(self, sock, head: bytes, session_id: str, leftover: bytes):
        """Write the 101 head; returns the socket the session's HTTP/2 runs on."""
        sock.sendall(head)
        return sock

    # -- build ------------------------------------------------------------------------------
    def _build(self, sock, conn, target: str, body: bytes) -> None:
        query = parse_qs(urlsplit(target).query, keep_blank_values=True)
        build = BuildRecord(target, query, body)
        if is_body_upload(query, body):
            build.api = "body"
            from ..outcomes import BODY_UPLOAD, declare_profile

            declare_profile(BODY_UPLOAD, f"POST {target} with a {len(body)}-byte tar body")
        result = self.run_scenario(build, build.session_id)
        lines = [json.dumps({"id": "moby.buildkit.trace", "aux": base64.b64encode(t).decode()}) for t in result.trace]
        hang = self._keeps_response_open(result)
        if not hang:  # a hung response never gets its final line
            if result.error:
                lines.append(json.dumps({"errorDetail": {"message": result.error}, "error": result.error}))
            elif result.image_id:
                lines.append(json.dumps({"id": "moby.image.id", "aux": {"ID": result.image_id}}))
        payload = ("\r\n".join(lines) + "\r\n").encode()
        sock.sendall(conn.send(h11.Response(status_code=200, headers=[("Content-Type", "application/json"),
                                                                       ("Transfer-Encoding", "chunked")])))
        sock.sendall(conn.send(h11.Data(data=payload)))
        if hang:
            self._hold_response_open()
            raise OSError("hung build response ended")
        sock.sendall(conn.send(h11.EndOfMessage()))

    def run_scenario(self, build: BuildRecord, session_id: str) -> ScenarioResult:
        """Record ``build``, wait for the session it names, run the scenario; the outcome is recorded too."""
        self.builds.append(build)
        build.session = self.wait_for_session(session_id, self.session_wait) if session_id else None
        if session_id and build.session is None:
            result = ScenarioResult(image_id=None, error=f"no active session for {session_id}: context deadline exceeded")
        else:
            try:
                result = self.scenario(build)
            except Exception as exc:  # a scenario bug is reported to the test through the record
                self.errors.append(f"scenario raised {type(exc).__name__}: {exc}")
                result = ScenarioResult(image_id=None, error=f"harness error: {exc}")
            if build.session is not None:
                # dockerd never answers before the client's session server runs (it needs the
                # session for the Dockerfile). Answering a scenario that made no call sooner makes
                # the docker CLI 20.10 hang: Session.Close() then finds no connection to close.
                build.session.conn.wait_peer_ready(self.session_wait)
        build.outcome = {"image_id": result.image_id, "error": result.error}
        return result

    # hooks for scripted variants of the build's answer, on either entry point
    def refused_solve(self, request) -> str | None:
        """An error to answer a Control/Solve with at once (None: build it)."""
        return None

    def keeps_build_open(self, result: ScenarioResult) -> bool:
        return self._keeps_response_open(result)

    def hold_build_open(self) -> None:
        self._hold_response_open()

    def _keeps_response_open(self, result: ScenarioResult) -> bool:
        return False

    def _hold_response_open(self) -> None:
        """Keep a response open after the trace (until the daemon closes)."""
