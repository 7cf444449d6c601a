"""Helpers for daemon-role cases: raw handshakes, scripted context senders, metadata recording.

The scripted client (``scripted_client.run_build``) replaces one handler for
every call of a method; the helpers here route only the main ``context``
transfer to a scripted sender and serve everything else (the Dockerfile, the
``.dockerignore`` probe) normally, so a test controls exactly one stream.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from reference import diffcopy as dc
from reference.client.services import ClientServices, SyncedDir
from reference.dockerhost import connect
from reference.pb.fsutil_types_pb2 import Packet, Stat
from reference.transport.base import RpcError, RpcStream

from .scripted_client import DIR_MODE

FILE_MODE = 0o644
SYMLINK_MODE = 0x08000000 | 0o777
FIFO_MODE = 0x02000000 | 0o644
MODE_DEVICE = 0x04000000
MODE_CHAR_DEVICE = 0x00200000
MODE_SETUID, MODE_SETGID, MODE_STICKY = 0x00800000, 0x00400000, 0x00100000


# -- raw HTTP on the Engine socket --------------------------------------------------------

@dataclass
class RawResponse:
    status_line: bytes
    head: bytes  # everything up to and including the blank line
    rest: bytes  # bytes read after the head (the HTTP/2 preface for a 101, else the body)

    @property
    def status(self) -> int:
        parts = self.status_line.split(b" ", 2)
        return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else -1

    def header(self, name: str) -> list[str]:
        out = []
        for line in self.head.split(b"\r\n")[1:]:
            key, sep, value = line.partition(b":")
            if sep and key.strip().lower() == name.lower().encode():
                out.append(value.strip().decode("latin-1"))
        return out

    def body_text(self) -> str:
        return self.rest.decode("utf-8", "replace")


def raw_request(host: str, path: str, headers: list[tuple[str, str]], *, read_after: float = 1.0,
                keep_open: bool = False) -> tuple[RawResponse, socket.socket | None]:
    """Send one POST with exactly ``headers`` and read the response head plus what follows
    within ``read_after`` seconds. With ``keep_open`` the socket is returned open."""
    sock = connect(host, timeout=10.0)
    lines = [f"POST {path} HTTP/1.1", "Host: docker", *(f"{k}: {v}" for k, v in headers), "", ""]
    sock.sendall("\r\n".join(lines).encode("latin-1"))
    buf = b""
    deadline = time.monotonic() + 10.0
    while b"\r\n\r\n" not in buf and time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    head += b"\r\n\r\n"
    end = time.monotonic() + read_after
    sock.settimeout(0.1)
    while time.monotonic() < end:
        try:
            chunk = sock.recv(65536)
        except (socket.timeout, TimeoutError):
            if rest and not keep_open and b"\r\n\r\n" in head and not head.startswith(b"HTTP/1.1 101"):
                break
            continue
        if not chunk:
            break
        rest += chunk
    response = RawResponse(head.split(b"\r\n", 1)[0], head, rest)
    if keep_open:
        sock.settimeout(None)
        return response, sock
    sock.close()
    return response, None


def dechunk(body: bytes) -> bytes:
    """Undo HTTP/1.1 chunked transfer coding (best effort; returns the input when it is not chunked)."""
    out, rest = b"", body
    while rest:
        size_line, sep, rest = rest.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            return body
        if size == 0:
            return out
        out += rest[:size]
        rest = rest[size + 2:]
    return out


def session_headers(session_id: str, methods: Iterable[str], *, upgrade: str | None = "h2c") -> list[tuple[str, str]]:
    hdrs = [("Connection", "Upgrade")]
    if upgrade is not None:
        hdrs.append(("Upgrade", upgrade))
    hdrs += [("X-Docker-Expose-Session-Uuid", session_id), ("X-Docker-Expose-Session-Name", "probe"),
             ("X-Docker-Expose-Session-Sharedkey", "probe-" + session_id)]
    hdrs += [("X-Docker-Expose-Session-Grpc-Method", m) for m in methods]
    return hdrs


# -- routing the context transfer -----------------------------------------------------------

def metadata_values(stream: RpcStream, key: str) -> list[str]:
    return [v for k, v in stream.metadata if k == key]


def is_main_context_transfer(stream: RpcStream) -> bool:
    """The build context itself, not the Dockerfile and not the ``.dockerignore`` probe."""
    if metadata_values(stream, "dir-name") != ["context"]:
        return False
    return metadata_values(stream, "followpaths") != [".dockerignore"]


@dataclass
class CallRecord:
    dir_name: str
    metadata: list[tuple[str, str]]
    started: float
    scripted: bool


@dataclass
class FileSyncRouter:
    """A FileSync/DiffCopy handler: the main context transfer goes to ``scripted``,
    every other transfer is served normally from ``context_dir``/``dockerfile_dir``."""

    context_dir: str
    scripted: Callable[[RpcStream], None] | None = None
    dockerfile_dir: str | None = None
    calls: list[CallRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._services = ClientServices({"context": SyncedDir(self.context_dir, owner=(0, 0)),
                                         "dockerfile": SyncedDir(self.dockerfile_dir or self.context_dir)},
                                        filesync=("diffcopy",))
        self._lock = threading.Lock()

    @property
    def streams(self):
        return self._services.streams

    def __call__(self, stream: RpcStream) -> None:
        scripted = self.scripted is not None and is_main_context_transfer(stream)
        with self._lock:
            self.calls.append(CallRecord(",".join(metadata_values(stream, "dir-name")), list(stream.metadata),
                                         time.monotonic(), scripted))
        if scripted:
            self.scripted(stream)
        else:
            self._services.filesync_diffcopy(stream)


# -- an interactive scripted sender ---------------------------------------------------------

@dataclass
class Entry:
    """One entry of a scripted listing; ``data`` is sent when the receiver asks for it."""

    stat: Stat
    data: bytes = b""


def file_entry(path: str, data: bytes = b"", mode: int = FILE_MODE, mtime_ns: int = 1_600_000_000_123_456_789,
               **kw) -> Entry:
    return Entry(Stat(path=path, mode=mode, size=len(data), modTime=mtime_ns, **kw), data)


def dir_entry(path: str, mode: int = DIR_MODE, mtime_ns: int = 1_600_000_000_000_000_000) -> Entry:
    return Entry(Stat(path=path, mode=mode, modTime=mtime_ns))


def symlink_entry(path: str, target: str, mtime_ns: int = 1_600_000_000_000_000_000) -> Entry:
    return Entry(Stat(path=path, mode=SYMLINK_MODE, size=len(target.encode()), linkname=target, modTime=mtime_ns))


@dataclass
class SenderLog:
    transcript: list[str] = field(default_factory=list)
    requested: list[int] = field(default_factory=list)
    received_fin: bool = False
    error: str | None = None
    ended: str | None = None

    def add(self, line: str) -> None:
        self.transcript.append(line)


def interactive_sender(entries: list[Entry], *, log: SenderLog, chunk_size: int = dc.GO_CHUNK_SIZE,
                       interleave: bool = False, collect_reqs_for: float = 0.5, eof_order_reversed: bool = False,
                       extra_after_listing: list[Packet] = (), answer_fin: bool = True,
                       stall_after_listing: float | None = None, fin_early: bool = False,
                       hold_open_after_fin: float = 0.0, timeout: float = 20.0,
                       encode_stat: Callable[[Stat], bytes] | None = None,
                       after_first_eof: list[Packet] | Callable[[int], list[Packet]] = ()
                       ) -> Callable[[RpcStream], None]:
    """A FileSync/DiffCopy sender that lists ``entries`` as given (no sorting, no checks),
    then answers REQs. With ``interleave`` it first collects REQs for ``collect_reqs_for``
    seconds and then sends the chunks of all requested files round-robin.
    ``after_first_eof`` is sent right after the first end of file; as a callable it gets
    the id of the file that ended (the daemon's REQ order decides which one that is)."""

    def handler(stream: RpcStream) -> None:
        out = []
        for entry in entries:
            packet = dc.stat_packet(entry.stat)
            log.add("> " + dc.describe(packet))
            out.append(encode_stat(entry.stat) if encode_stat else packet.SerializeToString())
        out.append(dc.end_of_listing().SerializeToString())
        log.add("> STAT <end of listing>")
        for packet in extra_after_listing:
            log.add("> " + dc.describe(packet))
            out.append(packet.SerializeToString())
        if fin_early:
            out.append(dc.fin_packet().SerializeToString())
            log.add("> FIN (early)")
        stream.send_many(out)
        stream.flush()
        if fin_early:
            _drain(stream, log, hold_open_after_fin)
            return
        if stall_after_listing is not None:
            _drain(stream, log, stall_after_listing)
            return
        pending: list[int] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            wait = collect_reqs_for if (interleave and pending) else max(0.05, deadline - time.monotonic())
            raw = _receive(stream, log, wait)
            if raw is _CALL_ENDED:
                return
            if raw is None:  # nothing within the wait: send what was collected
                if pending:
                    _send_files(stream, entries, pending, log, chunk_size, interleave, eof_order_reversed,
                                after_first_eof)
                    pending = []
                continue
            packet = Packet.FromString(raw)
            log.add("< " + dc.describe(packet))
            if packet.type == dc.PACKET_REQ:
                log.requested.append(packet.ID)
                pending.append(packet.ID)
                if not interleave:
                    _send_files(stream, entries, pending, log, chunk_size, False, False)
                    pending = []
            elif packet.type == dc.PACKET_FIN:
                log.received_fin = True
                if answer_fin:
                    stream.send(dc.fin_packet().SerializeToString())
                    log.add("> FIN")
                stream.flush()
                if hold_open_after_fin:
                    _drain(stream, log, hold_open_after_fin)
                return
            elif packet.type == dc.PACKET_ERR:
                log.error = packet.data.decode("utf-8", "replace")
                return
        log.ended = "sender timed out"

    return handler


def _send_files(stream, entries, ids, log, chunk_size, interleave, eof_reversed, after_first_eof=()) -> None:
    chunks = {}
    for file_id in ids:
        data = entries[file_id].data if 0 <= file_id < len(entries) else b""
        chunks[file_id] = [data[i:i + chunk_size] for i in range(0, len(data), chunk_size)]
    out = []
    if interleave:
        while any(chunks.values()):
            for file_id in ids:
                if chunks[file_id]:
                    out.append((file_id, chunks[file_id].pop(0)))
    else:
        for file_id in ids:
            out += [(file_id, c) for c in chunks[file_id]]
    for file_id, chunk in out:
        stream.send(dc.data_packet(file_id, chunk).SerializeToString())
    if out:
        log.add(f"> DATA for {sorted(set(i for i, _ in out))}: {len(out)} chunks"
                + (" interleaved" if interleave else ""))
    for n, file_id in enumerate(list(reversed(ids)) if eof_reversed else ids):
        stream.send(dc.data_packet(file_id, b"").SerializeToString())
        log.add(f"> DATA {file_id} <eof>")
        if n == 0:
            late = after_first_eof(file_id) if callable(after_first_eof) else after_first_eof
            for packet in late:
                stream.send(packet.SerializeToString())
                log.add("> " + dc.describe(packet))
    stream.flush()


_CALL_ENDED = object()


def _receive(stream: RpcStream, log: SenderLog, timeout: float) -> bytes | None | object:
    """The next message from the daemon, None when none came within ``timeout``, or
    ``_CALL_ENDED`` when the call is over (how it ended is put in the log)."""
    try:
        raw = stream.recv(timeout=timeout)
    except TimeoutError:
        return None
    except RpcError as exc:
        log.ended = f"call ended: {exc.code.name}"
        log.add("< " + log.ended)
        return _CALL_ENDED
    if raw is None:
        log.ended = "end of stream"
        log.add("< end of stream")
        return _CALL_ENDED
    return raw


def _drain(stream: RpcStream, log: SenderLog, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        raw = _receive(stream, log, max(0.05, deadline - time.monotonic()))
        if raw is _CALL_ENDED:
            return
        if raw is None:
            log.add(f"(held the stream open for {seconds:.1f} s)")
            return
        packet = Packet.FromString(raw)
        log.add("< " + dc.describe(packet))
        if packet.type == dc.PACKET_REQ:
            log.requested.append(packet.ID)
        elif packet.type == dc.PACKET_FIN:
            log.received_fin = True


def tree_of(root: str) -> dict[str, tuple]:
    """A comparable description of what is below ``root`` (type, permissions, target, content)."""
    import stat as st

    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            info = os.lstat(full)
            if st.S_ISLNK(info.st_mode):
                out[rel] = ("symlink", os.readlink(full))
            elif st.S_ISDIR(info.st_mode):
                out[rel] = ("dir", st.S_IMODE(info.st_mode))
            elif st.S_ISREG(info.st_mode):
                with open(full, "rb") as fh:
                    out[rel] = ("file", st.S_IMODE(info.st_mode), fh.read())
            else:
                out[rel] = ("other", st.S_IFMT(info.st_mode), st.S_IMODE(info.st_mode), info.st_rdev)
    return out


# -- a live session and a raw /build ----------------------------------------------------------

class LiveSession:
    """A session opened and served like the scripted client does, kept open until ``close``."""

    def __init__(self, host: str, context_dir: str, *, session_id: str | None = None,
                 handler_overrides: dict | None = None, methods: list[str] | None = None,
                 filesync: tuple[str, ...] = ("diffcopy",)):
        from reference.session import SessionRequest, new_session_id, open_session
        from reference.transport.h2grpc import serve_h2

        self.services = ClientServices({"context": SyncedDir(context_dir, owner=(0, 0)),
                                        "dockerfile": SyncedDir(context_dir)}, filesync=filesync)
        handlers = self.services.handlers()
        for method, handler in (handler_overrides or {}).items():
            handlers[method] = self.services._traced(handler)
        self.session_id = session_id or new_session_id()
        request = SessionRequest(self.session_id, "probe", new_session_id(),
                                 list(methods) if methods is not None else sorted(handlers))
        self.sock, leftover = open_session(request, host)
        self.opened_at = time.monotonic()
        self.server = serve_h2(self.sock, handlers, leftover)
        self.closed_at: float | None = None

    def close(self) -> None:
        if self.closed_at is None:
            self.closed_at = time.monotonic()
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.server.close()
            self.sock.close()

    def __enter__(self) -> "LiveSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def build_query(session_id: str, **extra) -> dict:
    import secrets as _secrets

    query = {"version": "2", "session": session_id, "remote": "client-session", "dockerfile": "Dockerfile",
             "buildid": _secrets.token_hex(8), "rm": "1"}
    query.update(extra)
    return query


@dataclass
class RawBuild:
    status: int
    messages: list[dict]
    seconds: float
    ended: bool  # the response ended (rather than our timeout cutting it off)
    error_body: str = ""

    def errors(self) -> list[str]:
        return [m.get("errorDetail", {}).get("message") or m.get("error", "") for m in self.messages
                if "errorDetail" in m or "error" in m]


def raw_build(host: str, query: dict, *, body: bytes = b"", timeout: float = 30.0) -> RawBuild:
    """POST /build and collect every JSON message of the response, unparsed."""
    from urllib.parse import urlencode

    from reference.dockerhost import HttpConnection, error_message

    started = time.monotonic()
    sock = connect(host, timeout=timeout)
    messages: list[dict] = []
    try:
        http = HttpConnection(sock)
        resp = http.request("POST", "/build?" + urlencode(query, doseq=True), [], body)
        if resp.status != 200:
            return RawBuild(resp.status, [], time.monotonic() - started, True,
                            error_message(http.read_body()))
        try:
            for obj in http.json_stream():
                messages.append(obj)
            ended = True
        except (socket.timeout, TimeoutError):
            ended = False
        return RawBuild(resp.status, messages, time.monotonic() - started, ended)
    finally:
        sock.close()


def start_private_reference_daemon(generation: str = "n+1", transport: str = "h2", *, extra_args=(),
                                   env: dict | None = None, timeout: float = 30.0):
    """An extra embedded reference daemon with its own settings (stopped by the caller)."""
    import subprocess
    import sys
    import tempfile

    from ..targets import DaemonSpec, DaemonTarget, identify_daemon

    root = tempfile.mkdtemp(prefix="conf-dp-", dir="/tmp")
    sock = os.path.join(root, "d.sock")
    log_path = os.path.join(root, "daemon.log")
    cmd = [sys.executable, "-m", "reference.daemon", "--host", f"unix://{sock}", "--root", os.path.join(root, "root"),
           "--generation", generation, "--transport", transport, *extra_args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})
    target = DaemonTarget(DaemonSpec("private-reference", generation=generation, transport=transport),
                          f"unix://{sock}", "reference-daemon", proc, root, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"reference daemon exited with {proc.returncode}:\n{target.logs()}")
        if os.path.exists(sock) and target.alive():
            target.identity = identify_daemon(target.host)
            target.implementation = target.identity.implementation
            return target
        time.sleep(0.05)
    target.stop()
    raise RuntimeError(f"reference daemon not ready after {timeout} s:\n{target.logs()}")
