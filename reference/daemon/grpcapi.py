"""``POST /grpc``: the upgrade to h2c on which the daemon serves BuildKit's Control API and gateway.

As dockerd does (moby's api/server/router/grpc): a request without ``Upgrade`` or with another protocol than
``h2c`` is refused with 500 (measured on dockerd 20.10 and 26.1, whose ``/session`` answers 400) before anything
switches; otherwise ``101`` with exactly ``Connection: Upgrade`` and ``Upgrade: h2c``, and the daemon is the
HTTP/2 *server* on the connection (the client sends the preface, here buildx or the reference client with
``--api grpc``). The calls are reference/daemon/control.py's, served by the
daemon's transport (h2 by default, grpcio behind a byte pump). Connections that close right after the 101
(buildx opens some) just end.
"""

from __future__ import annotations

import logging
import threading

from .config import DaemonConfig
from .control import ControlService
from .httpserver import ClientGone, Exchange, Request

log = logging.getLogger("reference.daemon.grpc")


def _serve(transport: str):
    if transport == "grpcio":
        from ..transport import grpcio_pump

        return grpcio_pump.serve_grpcio
    from ..transport import h2grpc

    return h2grpc.serve_h2


class GrpcEndpoint:
    def __init__(self, config: DaemonConfig, control: ControlService):
        self.config = config
        self.control = control
        self._connections: set = set()
        self._lock = threading.Lock()
        self._closing = False
        self.total_connections = 0

    def handle(self, request: Request, exchange: Exchange) -> None:
        """Serve one upgraded connection in this (the HTTP connection's) thread until it ends."""
        upgrade = request.header("upgrade")
        if not upgrade:
            exchange.error(500, "no upgrade proto in request")  # dockerd: 500 here, 400 on /session
            return
        if upgrade != "h2c":
            exchange.error(500, f"protocol {upgrade} not supported")
            return
        gone = threading.Event()
        try:
            sock, initial = exchange.switch_protocols([("Connection", "Upgrade"), ("Upgrade", "h2c")])
            conn = _serve(self.config.transport)(sock, self.control.handlers(gone), initial,
                                                 max_receive_message=self.config.max_message_size)
        except (ClientGone, OSError) as exc:
            log.info("/grpc: upgrade failed: %s", exc)
            return
        with self._lock:
            if self._closing:
                conn.close()
                return
            self._connections.add(conn)
            self.total_connections += 1
        try:
            conn.wait()
        finally:
            gone.set()  # every build of this connection is cancelled (a client that dies: Ctrl-C in buildx)
            with self._lock:
                self._connections.discard(conn)
            conn.close()
            try:
                sock.close()
            except OSError:
                pass

    def close(self) -> None:
        with self._lock:
            self._closing = True
            connections = list(self._connections)
        self.control.cancel_all()
        for conn in connections:
            conn.close()

    def stats(self) -> dict:
        with self._lock:
            active = len(self._connections)
        return {"connections_started": self.total_connections, "connections_active": active,
                **self.control.stats()}
