"""Sessions: the ``/session`` hijack, the registry builds look sessions up in, health.

After the 101 the daemon is the gRPC *client* on the hijacked connection.
It checks health on a ticker (BuildKit 0.8: every second with a 10 s
deadline; BuildKit 0.13: every 5 s, deadline max(30 s, 1.5 x the previous
check)) and drops the session at the first failure, in both (a shadowed
context defeats 0.13's intended tolerance of one failure). A closed
connection is noticed at the next tick only: until then the session stays
registered, and a build naming it fails at once as BuildKit's redial does.
A build that needs a session waits for it to appear (0.8: 5 s; 0.13: 5 s,
then 5 s more in the session group).
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
        """The active session ``session_id``, waiting for it to appear (the generation's wait by default)."""
        wait = self.config.session_wait + self.config.session_group_wait if timeout is None else timeout
        deadline = time.monotonic() + wait
        with self._cond:
            while True:
                session = self._sessions.get(session_id)
                if session is not None and not session.closed.is_set():
                    if session.conn is not None and session.conn.closed.is_set():
                        # gone, but not yet noticed by a health check: the first call redials and fails
                        raise BuildError(self.config.profile.redial_error)
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
            session.conn = _connect(self.config.transport)(sock, initial,
                                                           max_receive_message=self.config.max_message_size)
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
        """Health/Check on the ticks of a Go ticker (the first ``health_first`` after the upgrade, then every
        ``health_interval``), one check at a time: of the ticks that pass during a check the first fires right
        after it and the others are dropped. The first failure, or a closed connection, ends the session."""
        conn = session.conn
        config = self.config
        first_tick = time.monotonic() + config.health_first
        tick, next_check = 0, first_tick  # the index of the tick being waited for or consumed
        previous_duration = 0.0
        while True:
            if session.closed.wait(max(0.0, next_check - time.monotonic())):
                return
            if conn.closed.is_set():
                session.close("connection closed")
                return
            timeout = max(config.health_timeout, config.profile.health_timeout_factor * previous_duration)
            started = time.monotonic()
            try:
                conn.unary(HEALTH_CHECK, b"", timeout=timeout)
            except Exception as exc:  # any failure ends the session, in BuildKit 0.8 and (as measured) 0.13
                session.close(f"health check failed: {exc}")
                return
            now = time.monotonic()
            previous_duration = now - started
            if first_tick + (tick + 1) * config.health_interval > now:
                tick += 1
                next_check = first_tick + tick * config.health_interval
            else:  # a tick came during the check: the ticker kept it
                tick = int((now - first_tick) // config.health_interval)
                next_check = now

    def close_all(self) -> None:
        for session in self.active():
            session.close("daemon shutting down")
