"""Connections to an Engine API endpoint (``DOCKER_HOST``) and HTTP/1.1 over them, via h11."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from typing import Iterator
from urllib.parse import urlencode, urlsplit

import h11

from .errors import SessionError

DEFAULT_HOST = "unix:///var/run/docker.sock"
USER_AGENT = "docker-session-reference/0.1"


class EngineError(SessionError):
    """The daemon answered with an error status."""

    def __init__(self, status: int, message: str):
        super().__init__(f"daemon answered {status}: {message}")
        self.status = status
        self.message = message


def docker_host() -> str:
    return os.environ.get("DOCKER_HOST") or DEFAULT_HOST


def connect(host: str | None = None, timeout: float | None = 30.0) -> socket.socket:
    """A connected socket to ``unix:///path`` or ``tcp://host:port``."""
    host = host or docker_host()
    url = urlsplit(host)
    if url.scheme == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(url.path)
    elif url.scheme in ("tcp", "http"):
        sock = socket.create_connection((url.hostname or "127.0.0.1", url.port or 2375), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    else:
        raise SessionError(f"unsupported DOCKER_HOST {host!r}: use unix:// or tcp://")
    return sock


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    reason: str = ""

    def header(self, name: str, default: str | None = None) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return default


class HttpConnection:
    """One HTTP/1.1 exchange at a time on one socket (h11 does the parsing)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.h11 = h11.Connection(h11.CLIENT)

    def _send(self, event) -> None:
        data = self.h11.send(event)
        if data:
            self.sock.sendall(data)

    def _next_event(self):
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                data = self.sock.recv(65536)
                self.h11.receive_data(data)
                continue
            return event

    def request(self, method: str, target: str, headers: list[tuple[str, str]] = (), body: bytes | None = None) -> Response:
        hdrs = [("Host", "docker"), ("User-Agent", USER_AGENT), *headers]
        if body is not None or method in ("POST", "PUT"):
            hdrs.append(("Content-Length", str(len(body or b""))))
        self._send(h11.Request(method=method, target=target, headers=hdrs))
        if body:
            self._send(h11.Data(data=body))
        self._send(h11.EndOfMessage())
        event = self._next_event()
        while isinstance(event, h11.InformationalResponse) and event.status_code != 101:
            event = self._next_event()
        return Response(
            event.status_code,
            [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in event.headers],
            event.reason.decode("latin-1"),
        )

    def body_chunks(self) -> Iterator[bytes]:
        while True:
            event = self._next_event()
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                return

    def read_body(self) -> bytes:
        return b"".join(self.body_chunks())

    def json_stream(self) -> Iterator[dict]:
        """Objects of a streamed JSON response (the daemon writes one per line)."""
        decoder = json.JSONDecoder()
        buf = ""
        for chunk in self.body_chunks():
            buf += chunk.decode("utf-8")
            while True:
                buf = buf.lstrip()
                if not buf:
                    break
                try:
                    obj, end = decoder.raw_decode(buf)
                except json.JSONDecodeError:
                    break
                yield obj
                buf = buf[end:]

    def switched_protocol_bytes(self) -> bytes:
        """Bytes the daemon sent right behind the 101 head (its HTTP/2 preface may be there)."""
        data, _closed = self.h11.trailing_data
        return bytes(data)


def api_call(method: str, path: str, *, host: str | None = None, query: dict | None = None,
             body: bytes | None = None, headers: list[tuple[str, str]] = ()) -> tuple[Response, bytes]:
    sock = connect(host)
    try:
        conn = HttpConnection(sock)
        target = path + ("?" + urlencode(query, doseq=True) if query else "")
        resp = conn.request(method, target, list(headers), body)
        return resp, conn.read_body()
    finally:
        sock.close()


def error_message(body: bytes) -> str:
    try:
        return json.loads(body).get("message", body.decode("utf-8", "replace"))
    except (ValueError, AttributeError):
        return body.decode("utf-8", "replace")
