"""An HTTP/1.1 server on h11: unix or tcp, one thread per connection, hijacking.

h11 does all parsing; this module only moves bytes.  A handler gets a
:class:`Request` and an :class:`Exchange` through which it answers once
(``respond``), streams a chunked body (``start_stream``/``write``/``end``), or
takes the connection over after a ``101`` (``switch_protocols``).
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import threading
from dataclasses import dataclass
from typing import Callable
from urllib.parse import parse_qs, urlsplit

import h11

log = logging.getLogger("reference.daemon.http")

READ_SIZE = 64 * 1024
# An idle keep-alive connection is closed after this long; also bounds each write.
IDLE_TIMEOUT = 300.0


class ClientGone(Exception):
    """The peer closed the connection while we were answering."""


@dataclass
class Request:
    method: str
    target: str
    path: str
    query: dict[str, list[str]]
    headers: list[tuple[str, str]]  # names lowercased, one entry per header line
    body: bytes = b""

    def header(self, name: str, default: str | None = None) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return default

    def header_values(self, name: str) -> list[str]:
        """Every line of a header, each kept whole (no comma splitting)."""
        name = name.lower()
        return [value for key, value in self.headers if key == name]

    def param(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else default

    def params(self, name: str) -> list[str]:
        return list(self.query.get(name, ()))

    def flag(self, name: str) -> bool:
        """Go's ``httputils.BoolValue``: anything but "", "0", "no", "false", "none"."""
        value = (self.param(name) or "").strip().lower()
        return value not in ("", "0", "no", "false", "none")


class Exchange:
    """The answer side of one request on one connection."""

    def __init__(self, conn: "_Connection", request: Request):
        self._conn = conn
        self.request = request
        self.started = False
        self.finished = False
        self.hijacked = False
        self._write_lock = threading.Lock()
        self._watch_stop: threading.Event | None = None
        self.client_gone = threading.Event()

    # -- whole responses ----------------------------------------------------
    def respond(self, status: int, body: bytes = b"", content_type: str | None = "application/json",
                headers: list[tuple[str, str]] = ()) -> None:
        hdrs = list(self._conn.server.default_headers) + list(headers)
        if content_type:
            hdrs.append(("Content-Type", content_type))
        hdrs.append(("Content-Length", str(len(body))))
        self._send(h11.Response(status_code=status, headers=hdrs))
        self.started = True
        if body and self.request.method != "HEAD":
            self._send(h11.Data(data=body))
        self._send(h11.EndOfMessage())
        self.finished = True

    def json(self, status: int, obj) -> None:
        self.respond(status, (json.dumps(obj) + "\n").encode())

    def error(self, status: int, message: str) -> None:
        self.json(status, {"message": message})

    # -- streamed responses -------------------------------------------------
    def start_stream(self, status: int = 200, content_type: str = "application/json",
                     headers: list[tuple[str, str]] = ()) -> None:
        """Start a chunked body; ``client_gone`` is set if the peer hangs up meanwhile."""
        hdrs = list(self._conn.server.default_headers) + list(headers) + [("Content-Type", content_type)]
        self._send(h11.Response(status_code=status, headers=hdrs))
        self.started = True
        self._watch_stop = threading.Event()
        threading.Thread(target=self._watch_peer, name="http-peer-watch", daemon=True).start()

    def write(self, data: bytes) -> None:
        if data:
            with self._write_lock:
                self._send(h11.Data(data=data))

    def end(self) -> None:
        if self._watch_stop is not None:
            self._watch_stop.set()
        with self._write_lock:
            if not self.finished:
                self.finished = True
                self._send(h11.EndOfMessage())

    def _watch_peer(self) -> None:
        """Notice a client that closes its end while we stream (it never sends more)."""
        sock = self._conn.sock
        stop = self._watch_stop
        while not stop.is_set():
            try:
                readable, _, _ = select.select([sock], [], [], 0.5)
                if not readable:
                    continue
                if sock.recv(1, socket.MSG_PEEK) == b"":
                    self.client_gone.set()
                return  # EOF, or the client sent something (a pipelined request): stop watching
            except (OSError, ValueError):
                self.client_gone.set()
                return

    # -- protocol switch ------------------------------------------------------
    def switch_protocols(self, headers: list[tuple[str, str]]) -> tuple[socket.socket, bytes]:
        """Send ``101 Switching Protocols`` and hand over the socket.

        Returns the socket and the bytes the client sent past the request
        head that h11 has already read (the peer may start its protocol
        immediately).  The HTTP connection is finished for this server.
        """
        self._send(h11.InformationalResponse(status_code=101, headers=list(headers),
                                             reason=b"Switching Protocols"))
        self.started = self.finished = self.hijacked = True
        data, _closed = self._conn.h11.trailing_data
        self._conn.sock.settimeout(None)  # the new protocol's owner decides
        return self._conn.sock, bytes(data)

    def _send(self, event) -> None:
        try:
            data = self._conn.h11.send(event)
        except h11.LocalProtocolError as exc:
            raise ClientGone(f"cannot send: {exc}") from None
        if data:
            try:
                self._conn.sock.sendall(data)
            except OSError as exc:
                self.client_gone.set()
                raise ClientGone(str(exc)) from None


Handler = Callable[[Request, Exchange], None]


class _Connection:
    def __init__(self, server: "HttpServer", sock: socket.socket):
        self.server = server
        self.sock = sock
        # bounds every read and write: a peer that stops reading cannot hold a thread forever
        sock.settimeout(IDLE_TIMEOUT)
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=256 * 1024)

    def _next_event(self):
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.h11.receive_data(self.sock.recv(READ_SIZE))

    def run(self) -> None:
        try:
            while True:
                if not self._serve_one():
                    return
        except (OSError, ClientGone, socket.timeout):
            pass
        except h11.RemoteProtocolError as exc:
            self._bad_request(str(exc))
        finally:
            if not getattr(self, "_hijacked", False):
                try:
                    self.sock.close()
                except OSError:
                    pass

    def _serve_one(self) -> bool:
        event = self._next_event()
        if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return False
        if not isinstance(event, h11.Request):
            return False
        request = self._read_request(event)
        if request is None:
            return False
        exchange = Exchange(self, request)
        try:
            self.server.handler(request, exchange)
        except ClientGone:
            return False
        except Exception:
            log.exception("handler failed for %s %s", request.method, request.target)
            if not exchange.started:
                exchange.error(500, "internal error")
            else:
                return False
        if exchange.hijacked:
            self._hijacked = True
            return False
        if not exchange.finished:
            exchange.end()
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
            return True
        return False

    def _read_request(self, event: h11.Request) -> Request | None:
        chunks: list[bytes] = []
        size = 0
        limit = self.server.max_body
        while True:
            item = self._next_event()
            if isinstance(item, h11.Data):
                size += len(item.data)
                if size > limit:
                    Exchange(self, _placeholder(event)).error(413, "request body too large")
                    return None
                chunks.append(bytes(item.data))
            elif isinstance(item, h11.EndOfMessage):
                break
            else:  # ConnectionClosed mid-body
                return None
        target = event.target.decode("latin-1")
        split = urlsplit(target)
        headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in event.headers]
        return Request(event.method.decode("ascii"), target, split.path,
                       parse_qs(split.query, keep_blank_values=True), headers, b"".join(chunks))

    def _bad_request(self, message: str) -> None:
        try:
            if self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                Exchange(self, _placeholder(None)).error(400, message)
        except Exception:
            pass


def _placeholder(event) -> Request:
    method = event.method.decode("ascii") if event is not None else "GET"
    return Request(method, "", "", {}, [])


class HttpServer:
    """Listens on ``unix:///path`` or ``tcp://host:port`` and serves each connection in a thread."""

    def __init__(self, address: str, handler: Handler, *, default_headers: list[tuple[str, str]] = (),
                 max_body: int = 16 << 20):
        self.address = address
        self.handler = handler
        self.default_headers = list(default_headers)
        self.max_body = max_body
        self._listener = self._listen(address)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _listen(address: str) -> socket.socket:
        url = urlsplit(address)
        if url.scheme == "unix":
            path = url.path
            if os.path.exists(path):
                try:
                    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    probe.connect(path)
                    probe.close()
                    raise OSError(f"{path} is in use by another server")
                except ConnectionRefusedError:
                    os.unlink(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(path)
            os.chmod(path, 0o660)
        elif url.scheme == "tcp":
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((url.hostname or "127.0.0.1", url.port or 2375))
        else:
            raise ValueError(f"unsupported listen address {address!r}: use unix:///PATH or tcp://HOST:PORT")
        sock.listen(128)
        return sock

    @property
    def bound_address(self) -> str:
        name = self._listener.getsockname()
        if isinstance(name, tuple):
            return f"tcp://{name[0]}:{name[1]}"
        return f"unix://{name}"

    def serve_forever(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                raise
            if sock.family == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=_Connection(self, sock).run, name="http-conn", daemon=True).start()

    @property
    def serving(self) -> bool:
        """Whether the accept thread of start() still runs."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "HttpServer":
        self._thread = threading.Thread(target=self.serve_forever, name="http-accept", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stopping.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        url = urlsplit(self.address)
        if url.scheme == "unix":
            try:
                os.unlink(url.path)
            except OSError:
                pass
