"""Connections to an Engine API endpoint and HTTP/1.1 over them, via h11.

The endpoint is found as the docker CLI finds it: an explicit host, else ``DOCKER_HOST``, else the context named by
``DOCKER_CONTEXT`` or by ``currentContext`` in ``$DOCKER_CONFIG/config.json`` (its ``meta.json`` and TLS files under
``contexts/``), else ``unix:///var/run/docker.sock``.  Hosts: ``unix://PATH``, ``tcp://HOST[:PORT]`` (TLS from the
context, or from ``DOCKER_TLS_VERIFY``/``DOCKER_TLS`` and ``DOCKER_CERT_PATH``'s ca.pem, cert.pem, key.pem) and
``ssh://[USER@]HOST[:PORT][/SOCKET]`` (``ssh ... docker system dial-stdio`` on the remote host, as the docker CLI).
Every connection is a plain connected socket to its user: TLS and ssh sit behind a socketpair.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import select
import socket
import ssl
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from typing import Iterator, Mapping
from urllib.parse import urlencode, urlsplit

import h11

from .errors import SessionError
from .processes import stop_process

DEFAULT_HOST = "unix:///var/run/docker.sock"
USER_AGENT = "docker-session-reference/0.1"
# the docker CLI's defaults for tcp:// without a port
PLAIN_PORT, TLS_PORT = 2375, 2376
TLS_FILES = ("ca.pem", "cert.pem", "key.pem")
_BRIDGE_READ = 64 * 1024
# bytes a bridge holds for a side that is not reading, before it stops reading the other
_BRIDGE_BUFFER = 1024 * 1024
# how long a failed ssh gets to exit, so its exit status and stderr can be reported
_COMMAND_EXIT_WAIT = 2.0


class EngineError(SessionError):
    """The daemon answered with an error status."""

    def __init__(self, status: int, message: str):
        super().__init__(f"daemon answered {status}: {message}")
        self.status = status
        self.message = message


class DaemonConnectionError(SessionError, ConnectionError):
    """The daemon at ``host`` cannot be reached; said as the docker CLI says it.

    ``host``: the endpoint tried (``unix:///nope.sock``); ``reason``: why (the OS's, TLS's or ssh's words).
    """

    def __init__(self, host: str, reason: str, missing: bool = False):
        if missing:  # nothing listens there: the docker CLI's own sentence
            message = f"Cannot connect to the Docker daemon at {host}. Is the docker daemon running?"
        else:
            message = f"error during connect to {host}: {reason}"
        super().__init__(message)
        self.host = host
        self.reason = reason


class ContextNotFound(SessionError):
    """``DOCKER_CONTEXT`` or ``currentContext`` names a context with no ``meta.json``."""


@dataclass(frozen=True)
class TlsFiles:
    """TLS for a tcp:// endpoint: the CA to verify the daemon with (None: the system's) and a client
    certificate, each None when absent; ``verify`` False is the CLI's ``SkipTLSVerify``/no ``--tlsverify``."""

    ca: str | None
    cert: str | None
    key: str | None
    verify: bool


@dataclass(frozen=True)
class Endpoint:
    host: str
    tls: TlsFiles | None = None
    context: str = "default"


def config_dir(env: Mapping[str, str] = os.environ) -> str:
    return env.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")


def _tls_from_dir(directory: str, verify: bool) -> TlsFiles:
    ca, cert, key = (os.path.join(directory, name) for name in TLS_FILES)
    present = lambda path: path if os.path.isfile(path) else None  # noqa: E731
    cert, key = (cert, key) if present(cert) and present(key) else (None, None)
    return TlsFiles(present(ca), cert, key, verify)


def _env_tls(env: Mapping[str, str]) -> TlsFiles | None:
    """The default context's TLS: on with DOCKER_TLS_VERIFY (verifying) or DOCKER_TLS (not), as the CLI."""
    verify = bool(env.get("DOCKER_TLS_VERIFY"))
    if not (verify or env.get("DOCKER_TLS")):
        return None
    return _tls_from_dir(env.get("DOCKER_CERT_PATH") or config_dir(env), verify)


def current_context_name(env: Mapping[str, str] = os.environ) -> str:
    if env.get("DOCKER_CONTEXT"):
        return env["DOCKER_CONTEXT"]
    try:
        with open(os.path.join(config_dir(env), "config.json")) as fh:
            name = json.load(fh).get("currentContext")
    except (OSError, ValueError, AttributeError):
        return "default"
    return name or "default"


def context_endpoint(name: str, env: Mapping[str, str] = os.environ) -> Endpoint:
    """A named context's docker endpoint, read from the files ``docker context create`` writes."""
    context_id = hashlib.sha256(name.encode()).hexdigest()
    contexts = os.path.join(config_dir(env), "contexts")
    meta_path = os.path.join(contexts, "meta", context_id, "meta.json")
    try:
        with open(meta_path) as fh:
            meta = json.load(fh)
    except FileNotFoundError:
        raise ContextNotFound(f"context {name!r} not found: no {meta_path}") from None
    except (OSError, ValueError) as exc:
        raise ContextNotFound(f"context {name!r}: cannot read {meta_path}: {exc}") from None
    docker = (meta.get("Endpoints") or {}).get("docker") or {}
    host = docker.get("Host") or DEFAULT_HOST
    tls_dir = os.path.join(contexts, "tls", context_id, "docker")
    tls = _tls_from_dir(tls_dir, not docker.get("SkipTLSVerify", False)) if os.path.isdir(tls_dir) else None
    if tls is not None and tls.ca is None and tls.cert is None:
        tls = None
    if tls is None and docker.get("SkipTLSVerify") and host.startswith("tcp://"):
        tls = TlsFiles(None, None, None, False)  # TLS that trusts anything, as the CLI for such a context
    return Endpoint(host, tls, name)


def resolve_endpoint(host: str | None = None, env: Mapping[str, str] = os.environ) -> Endpoint:
    """The endpoint the docker CLI would use (``-H host`` when ``host`` is given)."""
    host = host or env.get("DOCKER_HOST")
    if host:
        return Endpoint(host, _env_tls(env) if host.startswith("tcp://") else None)
    name = current_context_name(env)
    if name == "default":
        return Endpoint(DEFAULT_HOST)
    return context_endpoint(name, env)


def docker_host() -> str:
    return resolve_endpoint().host


def connect(host: "str | Endpoint | None" = None, timeout: float | None = 30.0) -> socket.socket:
    """A connected socket to the endpoint (resolved as the docker CLI does when ``host`` is a string or None).
    DaemonConnectionError names the host when it cannot be reached."""
    endpoint = host if isinstance(host, Endpoint) else resolve_endpoint(host)
    url = urlsplit(endpoint.host)
    try:
        if url.scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(url.path)
            except BaseException:
                sock.close()
                raise
            return sock
        if url.scheme in ("tcp", "http", "https"):
            tls = endpoint.tls or (TlsFiles(None, None, None, True) if url.scheme == "https" else None)
            port = url.port or (TLS_PORT if tls else PLAIN_PORT)
            sock = socket.create_connection((url.hostname or "127.0.0.1", port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return _tls_bridge(sock, tls, url.hostname or "127.0.0.1", timeout) if tls else sock
        if url.scheme == "ssh":
            return _ssh_connect(endpoint.host, timeout)
    except OSError as exc:
        missing = exc.errno in (errno.ENOENT, errno.ECONNREFUSED)
        raise DaemonConnectionError(endpoint.host, exc.strerror or str(exc), missing) from exc
    raise SessionError(f"unsupported Docker host {endpoint.host!r}: use unix://, tcp:// or ssh://")


def go_verifying_context(cafile: str | None = None) -> ssl.SSLContext:
    """A client TLS context that verifies as Go's crypto/x509 does (the docker CLI, dockerd's registry client):
    since Python 3.13 the default context is also X509-strict (Debian 13's python3), which refuses certificates
    Go takes, e.g. one without an Authority Key Identifier ("Missing Authority Key Identifier"), as many
    hand-made Docker TLS and private-registry set-ups have."""
    context = ssl.create_default_context(cafile=cafile)
    context.verify_flags &= ~ssl.VERIFY_X509_STRICT
    return context


def _ssl_context(tls: TlsFiles) -> ssl.SSLContext:
    context = go_verifying_context(tls.ca)
    if not tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if tls.cert:
        context.load_cert_chain(tls.cert, tls.key)
    return context


def _tls_bridge(raw: socket.socket, tls: TlsFiles, server_name: str, timeout: float | None) -> socket.socket:
    """TLS on ``raw`` (handshake now, so a bad certificate fails the connect), served to the caller as the
    plain end of a socketpair."""
    try:
        secure = _ssl_context(tls).wrap_socket(raw, server_hostname=server_name)
    except BaseException:
        raw.close()
        raise
    app, inner = socket.socketpair()
    threading.Thread(target=_pump_tls, args=(secure, inner), name="tls-bridge", daemon=True).start()
    app.settimeout(timeout)
    return app


def _pump_tls(tls: ssl.SSLSocket, inner: socket.socket) -> None:
    """Moves bytes both ways on one thread: an SSL connection must not be read and written by two threads at
    once (h2 reads on one and writes on others). Ends when either side closes (a client's end of an Engine
    API connection is final) once what the other sent is delivered."""
    tls.setblocking(False)
    inner.setblocking(False)
    to_daemon, to_app = bytearray(), bytearray()
    daemon_open = app_open = True
    try:
        while (daemon_open or to_app) and (app_open or to_daemon):
            read_daemon = daemon_open and len(to_app) < _BRIDGE_BUFFER
            read_app = app_open and len(to_daemon) < _BRIDGE_BUFFER
            if read_daemon and tls.pending():
                readable, writable = [tls], []
            else:
                readable, writable, _ = select.select([s for s, on in ((tls, read_daemon), (inner, read_app)) if on],
                                                      [s for s, on in ((tls, to_daemon), (inner, to_app)) if on], [])
            if tls in readable:
                try:
                    data = tls.recv(_BRIDGE_READ)
                    daemon_open = bool(data)
                    to_app += data
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
                except OSError:
                    daemon_open = False
            if inner in readable:
                try:
                    data = inner.recv(_BRIDGE_READ)
                    app_open = bool(data)
                    to_daemon += data
                except BlockingIOError:
                    pass
                except OSError:
                    app_open = False
            if tls in writable and to_daemon:
                try:
                    del to_daemon[:tls.send(to_daemon)]
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
            if inner in writable and to_app:
                try:
                    del to_app[:inner.send(to_app)]
                except BlockingIOError:
                    pass
    except OSError:
        pass
    finally:
        for sock in (inner, tls):
            try:
                sock.close()
            except OSError:
                pass


class CommandSocket(socket.socket):
    """Our end of a socketpair whose other end is a command's stdin and stdout: ``ssh ... docker system
    dial-stdio``, the docker CLI's way to an ssh:// host. Closing it ends the command."""

    def _attach(self, host: str, proc: subprocess.Popen, stderr) -> None:
        self.host, self.proc, self._stderr = host, proc, stderr

    def failure(self) -> str:
        """What the command said when the connection ended before an answer."""
        try:
            code = self.proc.wait(_COMMAND_EXIT_WAIT)
        except subprocess.TimeoutExpired:
            return "the remote end closed the connection"
        self._stderr.seek(0)
        said = self._stderr.read().decode("utf-8", "replace").strip()
        return f"{self.proc.args[0]} exited with status {code}" + (f": {said}" if said else "")

    def close(self) -> None:
        super().close()
        stop_process(getattr(self, "proc", None), _COMMAND_EXIT_WAIT)
        stderr = getattr(self, "_stderr", None)
        if stderr is not None:
            stderr.close()


def ssh_command(host: str) -> list[str]:
    """The docker CLI's command for an ssh:// host: ``ssh [-l USER] [-p PORT] -- HOST docker [--host
    unix://SOCKET] system dial-stdio``."""
    url = urlsplit(host)
    if not url.hostname:
        raise SessionError(f"no host name in {host!r}")
    args = ["ssh", "-o", "ConnectTimeout=30", "-T"]
    if url.username:
        args += ["-l", url.username]
    if url.port:
        args += ["-p", str(url.port)]
    remote = ["docker"] + (["--host", f"unix://{url.path}"] if url.path not in ("", "/") else [])
    return args + ["--", url.hostname, *remote, "system", "dial-stdio"]


def _ssh_connect(host: str, timeout: float | None) -> socket.socket:
    args = ssh_command(host)
    app, inner = socket.socketpair()
    stderr = tempfile.TemporaryFile()
    try:
        # its own session: a Ctrl-C meant for us reaches ssh only through our close
        proc = subprocess.Popen(args, stdin=inner, stdout=inner, stderr=stderr, start_new_session=True)
    except BaseException:
        app.close()
        stderr.close()
        raise
    finally:
        inner.close()
    sock = CommandSocket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=app.detach())
    sock._attach(host, proc, stderr)
    sock.settimeout(timeout)
    return sock


def _closed_before_answer(sock: socket.socket) -> SessionError:
    if isinstance(sock, CommandSocket):
        return DaemonConnectionError(sock.host, sock.failure())
    return SessionError("the daemon closed the connection without answering")


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
        try:
            return self._request(method, target, headers, body)
        except DaemonConnectionError:
            raise
        except OSError as exc:
            if isinstance(self.sock, CommandSocket):  # ssh failed: say why, not "Broken pipe"
                raise _closed_before_answer(self.sock) from exc
            raise

    def _request(self, method: str, target: str, headers, body: bytes | None) -> Response:
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
        if isinstance(event, h11.ConnectionClosed):
            raise _closed_before_answer(self.sock)
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


def api_call(method: str, path: str, *, host: "str | Endpoint | None" = None, query: dict | None = None,
             body: bytes | None = None, headers: list[tuple[str, str]] = (),
             timeout: float | None = 30.0) -> tuple[Response, bytes]:
    sock = connect(host, timeout)
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
