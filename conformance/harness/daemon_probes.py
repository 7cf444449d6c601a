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
                keep_open: bool = False, enough: Callable[[bytes], bool] | None = None
                ) -> tuple[RawResponse, socket.socket | None]:
    """Send one POST with exactly ``headers`` and read the response head plus what follows
    within ``read_after`` seconds, or until ``enough(what followed)``. With ``keep_open`` the socket is
    returned open."""
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
    whole = (lambda rest: False) if keep_open else (lambda rest: _body_complete(head, rest))
    while time.monotonic() < end and not (enough is not None and enough(rest)) and not whole(rest):
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


def _body_complete(head: bytes, rest: bytes) -> bool:
    """Whether ``rest`` holds the whole body the head announces (Content-Length, or chunked up to its last
    chunk); False where only the connection's end can tell (a 101, a body without either)."""
    lines = head.decode("latin-1").split("\r\n")
    if not lines[0].startswith("HTTP/1.1 ") or lines[0].startswith("HTTP/1.1 101"):
        return False
    fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if ":" in line)}
    if "chunked" in fields.get("transfer-encoding", "").lower():
        return rest.endswith(b"0\r\n\r\n") and dechunk(rest) != rest
    length = fields.get("content-length")
    return length is not None and length.isdigit() and len(rest) >= int(length)


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

def decoded_metadata(pairs) -> list[tuple[str, str]]:
    """Request metadata as the daemon meant it: a key's values unescaped when its ``<key>-encoded`` marker
    is true (generation n+1, reference.metadata), and the markers dropped. Raw metadata (generation n)
    comes back unchanged."""
    from reference import metadata as md

    by_key: dict[str, list[str]] = {}
    for key, value in pairs:
        by_key.setdefault(key, []).append(value)
    markers = {key for key in by_key if key.endswith(md.ENCODED_SUFFIX) and key[:-len(md.ENCODED_SUFFIX)] in by_key}
    decoded = {key: iter(md.decode_values(by_key, key)) for key in by_key if key not in markers}
    return [(key, next(decoded[key])) for key, _ in pairs if key not in markers]


def metadata_values(stream: RpcStream, key: str) -> list[str]:
    """The (decoded) values of ``key`` on a call."""
    return [v for k, v in decoded_metadata(stream.metadata) if k == key]


class DecodedStream:
    """A stream whose metadata reads decoded (``decoded_metadata``): the suite plays a client that
    understands generation n+1's encoding, whatever the reference client's sender does with it."""

    def __init__(self, stream: RpcStream):
        self._stream = stream
        self.method = stream.method
        self.metadata = decoded_metadata(stream.metadata)
        self.raw_metadata = list(stream.metadata)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def decoding(handler: Callable[[RpcStream], None]) -> Callable[[RpcStream], None]:
    """``handler`` with decoded metadata on every call."""

    def run(stream: RpcStream) -> None:
        handler(DecodedStream(stream))

    return run


def is_main_context_transfer(stream: RpcStream) -> bool:
    """The build context itself, not the Dockerfile and not the ``.dockerignore`` probe."""
    if metadata_values(stream, "dir-name") != ["context"]:
        return False
    return metadata_values(stream, "followpaths") != [".dockerignore"]


@dataclass
class CallRecord:
    dir_name: str
    metadata: list[tuple[str, str]]  # as sent (generation n+1: encoded values and their markers)
    started: float
    scripted: bool
    requested: list[str] | None = None  # what the daemon requested of a normally served transfer

    @property
    def main_context(self) -> bool:
        """The build context itself, not the Dockerfile and not the ``.dockerignore`` probe."""
        return self.dir_name == "context" and self.values("followpaths") != [".dockerignore"]

    def values(self, key: str) -> list[str]:
        """The decoded values of ``key``."""
        return [v for k, v in decoded_metadata(self.metadata) if k == key]


@dataclass
class FileSyncRouter:
    """A FileSync/DiffCopy handler: the main context transfer goes to ``scripted``,
    every other transfer is served normally from ``context_dir``/``dockerfile_dir``."""

    context_dir: str
    scripted: Callable[[RpcStream], None] | None = None
    dockerfile_dir: str | None = None
    calls: list[CallRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._streams: list = []

    def _services(self) -> ClientServices:
        return ClientServices({"context": SyncedDir(self.context_dir, owner=(0, 0)),
                               "dockerfile": SyncedDir(self.dockerfile_dir or self.context_dir)},
                              filesync=("diffcopy",))

    @property
    def streams(self):
        """StreamStats of the normally served transfers, in the order they ended."""
        with self._lock:
            return list(self._streams)

    def __call__(self, stream: RpcStream) -> None:
        scripted = self.scripted is not None and is_main_context_transfer(stream)
        call = CallRecord(",".join(metadata_values(stream, "dir-name")), list(stream.metadata), time.monotonic(),
                          scripted)
        with self._lock:
            self.calls.append(call)
        if scripted:
            self.scripted(stream)
            return
        services = self._services()  # one per call: its StreamStats are this call's
        try:
            services.filesync_diffcopy(DecodedStream(stream))
        finally:
            with self._lock:
                self._streams.extend(services.streams)
                call.requested = [p for stats in services.streams for p in stats.requested]


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
        # what a receiver can request: the regular files (no hard links); once it has asked for all of them,
        # interleaving need not wait out collect_reqs_for for more
        requestable = {i for i, e in enumerate(entries) if e.stat.mode & ~0o7777 == 0 and not e.stat.linkname}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            wait = collect_reqs_for if (interleave and pending) else max(0.05, deadline - time.monotonic())
            if interleave and pending and requestable <= set(log.requested):
                wait = 0.0
            raw = _receive(stream, log, wait)
            if raw is _CALL_ENDED:
                return
            if raw is None:  # nothing within the wait: send what was collected
                if pending:
                    _send_files(stream, entries, pending, log, chunk_size, interleave, eof_order_reversed,
                                after_first_eof)
                    pending = []
                continue
            packet = dc.decode_packet(raw)
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
        packet = dc.decode_packet(raw)
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
        handlers = {method: decoding(handler) if "/moby.filesync.v1.FileSync/" in method else handler
                    for method, handler in self.services.handlers().items()}
        for method, handler in (handler_overrides or {}).items():
            handlers[method] = self.services.traced(handler)
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
    from ..targets import DaemonSpec, start_reference_daemon

    spec = DaemonSpec("private-reference", generation=generation, transport=transport, daemon_args=tuple(extra_args))
    return start_reference_daemon(spec, timeout, env=env)


# -- what the target's generation means for a case ---------------------------------------------

# Rules whose meaning changed between the generations: the ID each generation is graded by (SPEC.md).
GENERATION_RULES = {
    "health-schedule": {"n-1": "HEALTH-3", "n": "HEALTH-3", "n+1": "HEALTH-5"},
    "unknown-session": {"n-1": "TIMEOUT-1", "n": "TIMEOUT-1", "n+1": "TIMEOUT-7"},
    "filesync-metadata": {"n-1": "META-1", "n": "META-1", "n+1": "META-ENCODE-1"},
    "filesend-local": {"n-1": "FILESEND-LOCAL-1", "n": "FILESEND-LOCAL-1", "n+1": "FILESEND-LOCAL-5"},
}


def rule_for(daemon, what: str) -> str:
    """The requirement ID that states ``what`` for the daemon's generation."""
    return GENERATION_RULES[what][daemon.generation]


@dataclass(frozen=True)
class _Nominal:
    """A generation's timers as its real daemon runs them, and the windows its rules allow."""

    health_first: float
    health_interval: float
    health_timeout: float
    unknown_session_wait: float  # a build naming an unknown session fails after this long
    first_check_window: tuple[float, float]
    check_gap_window: tuple[float, float]
    unknown_session_window: tuple[float, float]


# dockerd 20.10.24: checks at 1, 2, 3 s with a 10 s deadline, unknown session after 5.05 s (HEALTH-3, TIMEOUT-1);
# dockerd 26.1.5: checks at 5.00, 10.00, 15.00 s with a 30 s deadline, unknown session after 10.01-10.06 s
# (HEALTH-5, TIMEOUT-7). The 2017 model polls like 20.10.
_BUILDKIT_0_8_TIMING = _Nominal(1.0, 1.0, 10.0, 5.0, (0.0, 2.0), (0.5, 2.0), (4.0, 10.0))
NOMINAL_TIMING = {
    "n-1": _BUILDKIT_0_8_TIMING,
    "n": _BUILDKIT_0_8_TIMING,
    "n+1": _Nominal(5.0, 5.0, 30.0, 10.0, (4.0, 7.0), (4.0, 7.0), (8.0, 12.0)),
}


@dataclass(frozen=True)
class DaemonTiming:
    """The session timers a daemon runs, and the windows a case judges them by.

    A real daemon runs its generation's (NOMINAL_TIMING). The reference daemon reports the timers it was
    started with (``/version``, component ``reference-daemon``, ``Timers``), so the embedded targets can
    run the same schedule faster: each window is then the rule's window scaled by declared/nominal."""

    generation: str
    health_first: float
    health_interval: float
    health_timeout: float
    unknown_session_wait: float
    declared: bool = False  # reported by the target rather than its generation's

    @property
    def nominal(self) -> _Nominal:
        return NOMINAL_TIMING[self.generation]

    def _scaled(self, window: tuple[float, float], actual: float, nominal: float) -> tuple[float, float]:
        factor = actual / nominal
        return (window[0] * factor, window[1] * factor)

    @property
    def first_check_window(self) -> tuple[float, float]:
        return self._scaled(self.nominal.first_check_window, self.health_first, self.nominal.health_first)

    @property
    def check_gap_window(self) -> tuple[float, float]:
        return self._scaled(self.nominal.check_gap_window, self.health_interval, self.nominal.health_interval)

    @property
    def unknown_session_window(self) -> tuple[float, float]:
        return self._scaled(self.nominal.unknown_session_window, self.unknown_session_wait,
                            self.nominal.unknown_session_wait)

    @property
    def survival_window(self) -> float:
        """How long a case watches the daemon for a deferred crash after a hostile listing (SAFETY-4).
        dockerd 20.10.24 dies 2.5-3.4 s after the stream (its content hash recursing): a real daemon is
        watched for 6 s. The embedded reference daemon (declared timers) rejects the listing before the build
        ends, and what it still does with the session afterwards (dropping it, at a health tick) is over
        within one health interval: it is watched for that long, at least 0.25 s."""
        if not self.declared:
            return 6.0
        return max(0.25, self.health_interval)

    def tick_after(self, opened_at: float, moment: float) -> float:
        """The first health-check tick at or after ``moment`` for a session upgraded at ``opened_at``
        (the daemon notices a closed connection, or fails a check, only then)."""
        first = opened_at + self.health_first
        if moment <= first:
            return first
        ticks = -(-(moment - first) // self.health_interval)  # ceil
        return first + ticks * self.health_interval

    def describe(self) -> str:
        source = "declared by the target" if self.declared else f"generation {self.generation}'s"
        return (f"{source} timers: first check {self.health_first:g} s, every {self.health_interval:g} s, "
                f"unknown session after {self.unknown_session_wait:g} s")


_timings: dict[str, DaemonTiming] = {}


def daemon_timing(daemon) -> DaemonTiming:
    """The timing of a daemon target (cached per host)."""
    cached = _timings.get(daemon.host)
    if cached is not None and cached.generation == daemon.generation:
        return cached
    nominal = NOMINAL_TIMING[daemon.generation]
    timing = DaemonTiming(daemon.generation, nominal.health_first, nominal.health_interval, nominal.health_timeout,
                          nominal.unknown_session_wait)
    if str(daemon.implementation).startswith("reference-daemon"):
        import json

        from reference.dockerhost import api_call

        try:
            _, body = api_call("GET", "/version", host=daemon.host)
            components = json.loads(body).get("Components") or []
            timers = next(c for c in components if c.get("Name") == "reference-daemon")["Details"]["Timers"]
            timing = DaemonTiming(daemon.generation, float(timers["health_first"]), float(timers["health_interval"]),
                                  float(timers["health_timeout"]),
                                  float(timers["session_wait"]) + float(timers["session_group_wait"]), declared=True)
        except (OSError, ValueError, KeyError, StopIteration, TypeError):
            pass  # an older reference daemon: its generation's
    _timings[daemon.host] = timing
    return timing


# -- a shell on the daemon: RUN steps -------------------------------------------------------------

SHELL_TAG = "conf-daemon-busybox:latest"
_shells: dict[str, str | None] = {}  # host -> tag, or None when the daemon cannot run RUN steps
_shell_problem: dict[str, str] = {}


def shell_image(daemon) -> str:
    """A busybox image on the daemon, built once per daemon through a session build (nothing is pulled),
    on which a RUN step has been seen to work. A daemon that cannot run RUN steps (the reference daemon
    runs none) makes the case UNSUPPORTED; without the host's busybox-static it is skipped."""
    import pytest

    from ..outcomes import unsupported
    from ..realpeers import BUSYBOX_STATIC, _write_busybox_rootfs
    from .scripted_client import make_context, run_build

    if daemon.host in _shells:
        if _shells[daemon.host] is None:
            unsupported(_shell_problem[daemon.host])
        return _shells[daemon.host]
    if not os.access(BUSYBOX_STATIC, os.X_OK):
        pytest.skip(f"{BUSYBOX_STATIC} is missing: no image with a shell can be built offline")
    from pathlib import Path

    ctx = make_context({}, dockerfile="FROM scratch\nCOPY rootfs/ /\nENV PATH=/bin\n")
    _write_busybox_rootfs(Path(ctx) / "rootfs")
    obs = run_build(daemon.host, ctx, query={"t": SHELL_TAG})
    if not obs.ok:
        pytest.skip(f"the daemon cannot build the busybox image needed for RUN steps: {obs.error}")
    probe = run_build(daemon.host, make_context({}, dockerfile=f"FROM {SHELL_TAG}\nRUN /bin/true\n"),
                      query={"networkmode": "none", "nocache": "1"}, hang_timeout=10)
    if not probe.ok:
        _shells[daemon.host] = None
        _shell_problem[daemon.host] = f"the daemon cannot run a RUN step on a local image: {probe.error}"
        unsupported(_shell_problem[daemon.host])
    _shells[daemon.host] = SHELL_TAG
    return SHELL_TAG


SSH_TOOLS_TAG = "conf-daemon-ssh-tools:latest"
SSH_TOOLS = ("/usr/bin/ssh-add",)  # dynamically linked: copied with the libraries ldd names
_ssh_images: dict[str, str] = {}


def ssh_tools_image(daemon) -> str:
    """An image with busybox and Debian's ``ssh-add`` (with its libraries) for ``RUN --mount=type=ssh`` steps,
    built once per daemon after :func:`shell_image` (so a daemon that runs no RUN steps is UNSUPPORTED)."""
    import pytest

    shell_image(daemon)
    if daemon.host in _ssh_images:
        return _ssh_images[daemon.host]
    missing = [tool for tool in SSH_TOOLS if not os.access(tool, os.X_OK)]
    if missing:
        pytest.skip(f"{missing[0]} is missing (Debian: openssh-client, installed by .ci/install-system-deps)")
    import shutil
    import subprocess
    from pathlib import Path

    from ..realpeers import _write_busybox_rootfs
    from .scripted_client import make_context, run_build

    ctx = make_context({}, dockerfile="FROM scratch\nCOPY rootfs/ /\nENV PATH=/bin:/usr/bin\n")
    try:
        rootfs = Path(ctx) / "rootfs"
        _write_busybox_rootfs(rootfs)
        for tool in SSH_TOOLS:
            files = [tool] + [part for line in subprocess.run(["ldd", tool], capture_output=True, text=True,
                                                              check=True).stdout.splitlines()
                              for part in line.split() if part.startswith("/")]
            for path in files:
                target = rootfs / path.lstrip("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(os.path.realpath(path), target)  # the file itself, under the name the loader asks for
        obs = run_build(daemon.host, ctx, query={"t": SSH_TOOLS_TAG})
    finally:
        shutil.rmtree(ctx, ignore_errors=True)
    if not obs.ok:
        pytest.skip(f"the daemon cannot build the image with ssh-add needed for SSH mounts: {obs.error}")
    _ssh_images[daemon.host] = SSH_TOOLS_TAG
    return SSH_TOOLS_TAG
