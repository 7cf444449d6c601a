"""Sessions: the ``/session`` hijack, the registry builds look sessions up in, health.

After the 101 the daemon is the gRPC *client* on the hijacked connection.
BuildKit 0.8 checks health every second with a 10 s timeout and drops the
session at the first failure; a build that needs a session waits at most 5 s
for it to appear.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from ..transport.base import ClientConnection
from .config import DaemonConfig
from .errors import BuildError
from .httpserver import ClientGone, Exchange, Request

log = logging.getLogger("reference.daemon.sessions")

HEADER_UUID = "X-Docker-Expose-Session-Uuid"
HEADER_NAME = "X-Docker-Expose-Session-Name"
HEADER_SHARED_KEY = "X-Docker-Expose-Session-Sharedkey"
HEADER_METHOD = "X-Docker-Expose-Session-Grpc-Method"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"


class SessionExists(Exception):
    pass


@dataclass
class Session:
    id: str
    name: str
    shared_key: str
    methods: list[str]
    conn: ClientConnection | None = None
    started_at: float = field(default_factory=time.time)
    closed: threading.Event = field(default_factory=threading.Event)
    close_reason: str = ""

    def __post_init__(self) -> None:
        self._lowered = {m.lower() for m in self.methods}

    def supports(self, method: str) -> bool:
        """Whether the client advertised ``method`` (case-insensitive, like BuildKit)."""
        return method.lower() in self._lowered

    def advertised(self, prefix: str) -> list[str]:
        """Method names (last path element, lowercased) advertised under ``prefix``."""
        prefix = prefix.lower()
        return sorted(m[len(prefix):] for m in self._lowered if m.startswith(prefix))

    def check_alive(self) -> None:
        if self.closed.is_set():
            raise BuildError(f"session {self.id} ended: {self.close_reason or 'closed'}")

    def close(self, reason: str) -> None:
        if not self.closed.is_set():
            self.close_reason = reason
            self.closed.set()


def _connect(transport: str):
    if transport == "grpcio":
        from ..transport import grpcio_pump

        return grpcio_pump.connect_grpcio
    from ..transport import h2grpc

    return h2grpc.connect_h2


class SessionManager:
    def __init__(self, config: DaemonConfig):
        self.config = config
        self._sessions: dict[str, Session | None] = {}  # None: handshake in progress
        self._cond = threading.Condition()
        self.total_started = 0

    # -- lookup ---------------------------------------------------------------
    def get(self, session_id: str, timeout: float | None = None, cancelled: threading.Event | None = None) -> Session:
        """The active session ``session_id``, waiting for it to appear (5 s by default)."""
        wait = self.config.session_wait if timeout is None else timeout
        deadline = time.monotonic() + wait
        with self._cond:
            while True:
                session = self._sessions.get(session_id)
                if session is not None and not session.closed.is_set():
                    return session
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (cancelled is not None and cancelled.is_set()):
                    raise BuildError(f"no active session for {session_id}: context deadline exceeded")
                self._cond.wait(min(remaining, 0.2))

    def active(self) -> list[Session]:
        with self._cond:
            return [s for s in self._sessions.values() if s is not None and not s.closed.is_set()]

    # -- POST /session ----------------------------------------------------------
    def handle(self, request: Request, exchange: Exchange) -> None:
        """Checks like BuildKit's Manager.HandleHTTPRequest, then serves the session
        in this (the connection's) thread until it ends."""
        session_id = request.header(HEADER_UUID, "") or ""
        with self._cond:
            if session_id in self._sessions:
                exchange.error(400, f"session {session_id} already exists")
                return
            upgrade = request.header("upgrade")
            if not upgrade:
                exchange.error(400, "no upgrade proto in request")
                return
            if upgrade != "h2c":
                exchange.error(400, f"protocol {upgrade} not supported")
                return
            if not session_id.strip():  # HANDSHAKE-7: no build could name it (dockerd accepts it)
                exchange.error(400, f"missing or empty {HEADER_UUID} header")
                return
            self._sessions[session_id] = None  # reserve the id during the handshake
        session = Session(
            session_id,
            request.header(HEADER_NAME, "") or "",
            request.header(HEADER_SHARED_KEY, "") or "",
            request.header_values(HEADER_METHOD),
        )
        try:
            sock, initial = exchange.switch_protocols([("Connection", "Upgrade"), ("Upgrade", "h2c")])
            session.conn = _connect(self.config.transport)(sock, initial)
        except (ClientGone, OSError) as exc:
            with self._cond:
                self._sessions.pop(session_id, None)
                self._cond.notify_all()
            log.info("session %s: handshake failed: %s", session_id, exc)
            return
        with self._cond:
            self._sessions[session_id] = session
            self.total_started += 1
            self._cond.notify_all()
        log.info("session %s (%s) started with %d methods", session_id, session.name, len(session.methods))
        try:
            self._monitor_health(session)
        finally:
            session.conn.close()
            with self._cond:
                if self._sessions.get(session_id) is session:
                    del self._sessions[session_id]
                self._cond.notify_all()
            log.info("session %s ended: %s", session_id, session.close_reason)

    def _monitor_health(self, session: Session) -> None:
        conn = session.conn
        interval = self.config.health_interval
        while True:
            if session.closed.wait(interval):
                return
            if conn.closed.is_set():
                session.close("connection closed")
                return
            try:
                conn.unary(HEALTH_CHECK, b"", timeout=self.config.health_timeout)
            except Exception as exc:  # any failure ends the session, like BuildKit 0.8
                session.close(f"health check failed: {exc}")
                return

    def close_all(self) -> None:
        for session in self.active():
            session.close("daemon shutting down")
