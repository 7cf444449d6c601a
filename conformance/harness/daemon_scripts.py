"""Scripted daemon behaviour for client-role tests.

``ScriptDaemon`` is an InstrumentedDaemon whose ``/session`` answer and
``/build`` response can be varied (refuse the upgrade, odd 101 heads, the
preface in the same write as the 101, a build response that never ends), and
which records what the client sends after the upgrade.  The helpers below
drive raw calls on the client's session and record what came back, so a test
can judge the client precisely.
"""

from __future__ import annotations

import json
import threading
import time
import traceback
from dataclasses import dataclass, field

from google.protobuf.timestamp_pb2 import Timestamp

from reference import diffcopy as dc
from reference.pb.control_pb2 import StatusResponse, Vertex
from reference.pb.fsutil_types_pb2 import Packet
from reference.transport.base import RpcError, RpcStream, StatusCode

from .instrumented_daemon import BuildRecord, InstrumentedDaemon, ScenarioResult, SessionRecord

DIFFCOPY = "/moby.filesync.v1.FileSync/DiffCopy"
TARSTREAM = "/moby.filesync.v1.FileSync/TarStream"
FILESEND = "/moby.filesync.v1.FileSend/DiffCopy"
HEALTH = "/grpc.health.v1.Health/Check"
GET_SECRET = "/moby.buildkit.secrets.v1.Secrets/GetSecret"
AUTH_CREDENTIALS = "/moby.filesync.v1.Auth/Credentials"
AUTH_FETCH_TOKEN = "/moby.filesync.v1.Auth/FetchToken"
AUTH_GET_TOKEN_AUTHORITY = "/moby.filesync.v1.Auth/GetTokenAuthority"
AUTH_VERIFY_TOKEN_AUTHORITY = "/moby.filesync.v1.Auth/VerifyTokenAuthority"

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class HarnessError(RuntimeError):
    """The scripted daemon itself broke: an ERROR of the suite, never a finding."""


@dataclass
class ScriptResult(ScenarioResult):
    """A scenario result with the extra behaviours of ScriptDaemon."""

    hang: bool = False  # send the trace, then keep the /build response open until the daemon closes


class Script:
    """Wraps a scenario function ``fn(build) -> ScenarioResult`` and keeps its
    traceback, so a bug in the script surfaces as a harness error."""

    def __init__(self, fn):
        self.fn = fn
        self.failure: str | None = None
        self.done = threading.Event()
        self.value = None

    def __call__(self, build: BuildRecord) -> ScenarioResult:
        try:
            result = self.fn(build)
            return result if result is not None else ScenarioResult()
        except Exception:
            self.failure = traceback.format_exc()
            return ScenarioResult(image_id=None, error="conformance harness: scenario failed")
        finally:
            self.done.set()

    def check(self, run=None) -> None:
        if self.failure:
            raise HarnessError(f"the scenario raised:\n{self.failure}\nclient output:\n{run.output if run else ''}")


class _PrefixedSocket:
    """A socket whose first ``sendall`` is preceded by ``prefix`` in the same
    write (the 101 head and the HTTP/2 preface in one segment), and which
    keeps the first bytes the peer sends."""

    def __init__(self, sock, prefix: bytes = b"", keep: int = 64):
        self._sock = sock
        self._prefix = prefix
        self._keep = keep
        self.first_bytes = bytearray()

    def sendall(self, data, *args):
        if self._prefix:
            data, self._prefix = self._prefix + bytes(data), b""
        return self._sock.sendall(data, *args)

    def send(self, data, *args):
        if self._prefix:
            self.sendall(data)
            return len(data)
        return self._sock.send(data, *args)

    def recv(self, n, *args):
        data = self._sock.recv(n, *args)
        if len(self.first_bytes) < self._keep:
            self.first_bytes += data[: self._keep - len(self.first_bytes)]
        return data

    def recv_into(self, buf, *args):
        n = self._sock.recv_into(buf, *args)
        if len(self.first_bytes) < self._keep:
            self.first_bytes += bytes(buf[:n])[: self._keep - len(self.first_bytes)]
        return n

    def __getattr__(self, name):
        return getattr(self._sock, name)


class ScriptDaemon(InstrumentedDaemon):
    """InstrumentedDaemon with a scriptable handshake and build response.

    refuse:        (status, body) answers /session without upgrading
    reason:        reason phrase of the 101
    extra_headers: more header lines in the 101 head
    coalesce:      write the 101 head and our HTTP/2 preface in one sendall
    refuse_build:  (status, body) answers /build at once, without waiting for the session
                   (as dockerd does with options it rejects, e.g. an unknown isolation); a Control/Solve that
                   is not a capability probe fails at once with the body's message
    hold_upgrade:  seconds the 101 waits for the build's answer; if that answer goes out first,
                   the upgrade is never completed (the connection stays open until the daemon closes)
    """

    def __init__(self, scenario=None, *, refuse: tuple[int, bytes] | None = None,
                 reason: str = "Switching Protocols", extra_headers: list[tuple[str, str]] = (),
                 coalesce: bool = False, session_wait: float = 5.0, transport: str = "h2",
                 refuse_build: tuple[int, bytes] | None = None, hold_upgrade: float = 0.0, generation: str = "n"):
        super().__init__(scenario, transport=transport, session_wait=session_wait, generation=generation)
        self.refuse = refuse
        self.refuse_build = refuse_build
        self.hold_upgrade = hold_upgrade
        self._build_answered = threading.Event()
        self.timeline: list[tuple[float, str]] = []  # (monotonic time, "build answered" | "101 sent" | "101 withheld")
        self.reason = reason
        self.extra_headers = list(extra_headers)
        self.coalesce = coalesce
        self.build_arrivals: list[float] = []
        self.session_requests: list[tuple[float, list[tuple[str, str]]]] = []
        self.after_refusal: list[bytes] = []  # what the client sent on a refused connection
        self.client_first_bytes: dict[str, bytes] = {}
        self._wrapped: dict[str, _PrefixedSocket] = {}
        self._stop = threading.Event()

    def close(self) -> None:
        self._stop.set()
        super().close()

    def first_bytes(self, session_id: str) -> bytes:
        wrapped = self._wrapped.get(session_id)
        return bytes(wrapped.first_bytes) if wrapped is not None else b""

    # -- session ------------------------------------------------------------------------
    def _session(self, sock, conn, headers) -> bool:
        self.session_requests.append((time.monotonic(), headers))
        if self.refuse is not None:
            status, body = self.refuse
            self._respond(sock, conn, status, body)
            # Record anything the client still sends on this connection (it must not start HTTP/2).
            sock.settimeout(1.0)
            try:
                data = sock.recv(65536)
                if data:
                    self.after_refusal.append(data)
            except OSError:
                pass
            return False
        if self.hold_upgrade and self._build_answered.wait(self.hold_upgrade):
            self.timeline.append((time.monotonic(), "101 withheld"))
            self._stop.wait()
            return False
        return super()._session(sock, conn, headers)

    def _upgrade_head(self) -> bytes:
        lines = [f"HTTP/1.1 101 {self.reason}", "Connection: Upgrade", "Upgrade: h2c"]
        lines += [f"{k}: {v}" for k, v in self.extra_headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def _send_upgrade(self, sock, head: bytes, session_id: str, leftover: bytes):
        # with coalesce, the head goes out in the same write as our HTTP/2 preface
        wrapped = _PrefixedSocket(sock, head if self.coalesce else b"")
        if leftover:
            wrapped.first_bytes += leftover[:64]
        self._wrapped[session_id] = wrapped
        if not self.coalesce:
            sock.sendall(head)
        self.timeline.append((time.monotonic(), "101 sent"))
        return wrapped

    # -- build ------------------------------------------------------------------------------
    def _build(self, sock, conn, target: str, body: bytes) -> None:
        self.build_arrivals.append(time.monotonic())
        if self.refuse_build is not None:
            status, answer = self.refuse_build
            self._respond(sock, conn, status, answer)
        else:
            super()._build(sock, conn, target, body)
        self.timeline.append((time.monotonic(), "build answered"))
        self._build_answered.set()

    def refused_solve(self, request) -> str | None:
        if self.refuse_build is None or request.Internal:
            return None
        self.build_arrivals.append(time.monotonic())
        _, answer = self.refuse_build
        try:
            message = json.loads(answer).get("message", "")
        except ValueError:
            message = answer.decode("utf-8", "replace")
        self.timeline.append((time.monotonic(), "build answered"))
        self._build_answered.set()
        return message or "refused"

    def _keeps_response_open(self, result) -> bool:
        return isinstance(result, ScriptResult) and result.hang

    def _hold_response_open(self) -> None:
        # Like dockerd 20.10 after a FileSend error: the response stays open.
        self._stop.wait()


def run_client(client, context: str, fn=None, *, daemon_kw: dict | None = None, expect_build: bool | None = None,
               **run_kw):
    """Run the client once against a ScriptDaemon whose scenario is ``fn``.

    The daemon plays the client's generation (dockerd 26.1's metadata for an n+1 client).
    Returns (daemon, run); a scenario bug raises HarnessError. A case with a scenario needs the client to ask for
    a build (``expect_build``, default: whether ``fn`` is given): a client that asked for none raises
    NoBuildRequested, with its exit status and output, instead of failing the case's checks."""
    from .entry_points import require_build

    script = Script(fn) if fn is not None else None
    with ScriptDaemon(script, **{"generation": client.generation, **(daemon_kw or {})}) as daemon:
        run = client.run(context, daemon.host, **run_kw)
    if script is not None:
        script.check(run)
    if expect_build if expect_build is not None else fn is not None:
        require_build(daemon, run, client)
    return daemon, run


def vertex_error_trace(message: str, name: str = "[conformance 1/1] step") -> bytes:
    now = Timestamp()
    now.GetCurrentTime()
    vertex = Vertex(digest="sha256:" + "c" * 64, name=name, error=message, started=now, completed=now)
    return StatusResponse(vertexes=[vertex]).SerializeToString()


# -- raw calls ------------------------------------------------------------------------------

@dataclass
class CallOutcome:
    """How a raw call ended, and what it carried."""

    messages: list[bytes] = field(default_factory=list)
    code: StatusCode | None = None  # None: still open when we stopped waiting
    details: str = ""
    seconds: float = 0.0
    transcript: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.code == StatusCode.OK

    def describe(self) -> str:
        state = "still open" if self.code is None else self.code.name
        return f"{state} {self.details!r} after {len(self.messages)} messages in {self.seconds:.2f} s"


def finish(stream: RpcStream, outcome: CallOutcome, timeout: float, *, packets: bool = False,
           started: float | None = None) -> CallOutcome:
    """Read ``stream`` until the call ends (or ``timeout`` passes) into ``outcome``."""
    started = started or time.monotonic()
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            raw = stream.recv(timeout=left)
            if raw is None:
                outcome.code = StatusCode.OK
                outcome.transcript.append("> call ended OK")
                break
            outcome.messages.append(raw)
            if packets:
                outcome.transcript.append("> " + dc.describe(dc.decode_packet(raw)))
    except RpcError as exc:
        outcome.code, outcome.details = exc.code, exc.details
        outcome.transcript.append(f"> call ended {exc.code.name}: {exc.details}")
    except TimeoutError:
        outcome.transcript.append(f"> still open after {timeout} s; cancelled")
        try:
            stream.cancel()
        except Exception:
            pass
    outcome.seconds = time.monotonic() - started
    return outcome


def unary(session: SessionRecord, method: str, request: bytes, *, metadata=(), timeout: float = 10.0) -> CallOutcome:
    started = time.monotonic()
    outcome = CallOutcome()
    try:
        stream = session.conn.open_stream(method, metadata)
        stream.send(request)
        stream.close_send()
    except RpcError as exc:
        outcome.code, outcome.details = exc.code, exc.details
        return outcome
    return finish(stream, outcome, timeout, started=started)


def recv_packet(stream: RpcStream, timeout: float, transcript: list[str]) -> Packet | None:
    raw = stream.recv(timeout=timeout)
    if raw is None:
        transcript.append("> call ended OK")
        return None
    packet = dc.decode_packet(raw)
    transcript.append("> " + dc.describe(packet))
    return packet


def send_packet(stream: RpcStream, packet: Packet, transcript: list[str]) -> None:
    transcript.append("< " + dc.describe(packet))
    stream.send(packet.SerializeToString())
    stream.flush()


@dataclass
class Listing:
    stats: list = field(default_factory=list)
    ended: bool = False
    early: list = field(default_factory=list)  # non-STAT packets seen during the listing


def read_listing(stream: RpcStream, transcript: list[str], timeout: float = 20.0, on_stat=None) -> Listing:
    """Read STATs until the end-of-listing packet; ``on_stat(index, stat)`` may act meanwhile."""
    listing = Listing()
    while True:
        packet = recv_packet(stream, timeout, transcript)
        if packet is None:
            return listing
        if packet.type != dc.PACKET_STAT:
            listing.early.append(packet)
            if packet.type == dc.PACKET_ERR:
                return listing
            continue
        if not packet.HasField("stat"):
            listing.ended = True
            return listing
        listing.stats.append(packet.stat)
        if on_stat is not None:
            on_stat(len(listing.stats) - 1, packet.stat)


def open_diffcopy(session: SessionRecord, dir_name: str | None, *, raw_metadata=None, **options) -> RpcStream:
    """FileSync/DiffCopy with these options, sent as the daemon of the session's generation sends them;
    ``raw_metadata`` replaces all of it with exactly these pairs."""
    if raw_metadata is not None:
        return session.conn.open_stream(DIFFCOPY, list(raw_metadata))
    metadata = [] if dir_name is None else [("dir-name", dir_name)]
    for key in ("followpaths", "exclude-patterns", "include-patterns", "override-excludes"):
        metadata += [(key, v) for v in options.get(key.replace("-", "_"), ())]
    return session.conn.open_stream(DIFFCOPY, session.filesync_metadata(metadata))


@dataclass
class StrictTransfer:
    """One FileSync/DiffCopy pulled with every packet checked against the sender rules."""

    listing: Listing = field(default_factory=Listing)
    contents: dict[str, bytes] = field(default_factory=dict)
    requested: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    data_sizes: list[int] = field(default_factory=list)
    fin_reply: bool = False
    end: CallOutcome = field(default_factory=CallOutcome)
    transcript: list[str] = field(default_factory=list)

    @property
    def by_path(self) -> dict:
        return {s.path: s for s in self.listing.stats}

    @property
    def paths(self) -> list[str]:
        return [s.path for s in self.listing.stats]

    @property
    def ok(self) -> bool:
        return self.listing.ended and self.fin_reply and self.end.ok and not self.violations


def strict_transfer(stream: RpcStream, *, request=None, timeout: float = 20.0, before_reqs=None) -> StrictTransfer:
    """Read the listing, REQ the regular files chosen by ``request(stat)`` (default:
    every regular file without linkname), read DATA strictly, FIN, and read to the end."""
    from reference import filemode

    t = StrictTransfer()
    tr = t.transcript
    try:
        t.listing = read_listing(stream, tr, timeout)
        if not t.listing.ended:
            t.end = finish(stream, CallOutcome(transcript=tr), timeout, packets=True)
            return t
        if before_reqs is not None:
            before_reqs(t.listing)
        choose = request or (lambda s: filemode.is_regular(s.mode) and not s.linkname)
        pending = {}
        for i, s in enumerate(t.listing.stats):
            if choose(s):
                pending[i] = s.path
                t.requested.append(s.path)
                tr.append("< " + dc.describe(dc.req_packet(i)))
                stream.send(dc.req_packet(i).SerializeToString())
        stream.flush()
        chunks: dict[int, list[bytes]] = {i: [] for i in pending}
        done: set[int] = set()
        while len(done) < len(pending):
            raw = stream.recv(timeout=timeout)
            if raw is None:
                t.violations.append("the call ended before every requested file was sent")
                t.end.code = StatusCode.OK
                return t
            p = dc.decode_packet(raw)
            if p.type != dc.PACKET_DATA or p.data:
                tr.append("> " + dc.describe(p))
            if p.type != dc.PACKET_DATA:
                t.violations.append(f"unexpected {dc.describe(p)} while files were outstanding")
                if p.type == dc.PACKET_ERR:
                    t.end = finish(stream, CallOutcome(transcript=tr), timeout, packets=True)
                    return t
                continue
            t.data_sizes.append(len(raw))
            if p.ID not in pending or p.ID in done:
                t.violations.append(f"DATA for id {p.ID}, which is not requested or already ended")
                continue
            if p.data:
                chunks[p.ID].append(p.data)
            else:
                tr.append("> " + dc.describe(p))
                done.add(p.ID)
        for i, path in pending.items():
            t.contents[path] = b"".join(chunks[i])
        send_packet(stream, dc.fin_packet(), tr)
        after = finish(stream, CallOutcome(transcript=tr), timeout, packets=True)
        packets = [dc.decode_packet(m) for m in after.messages]
        t.fin_reply = bool(packets) and packets[0].type == dc.PACKET_FIN
        if len(packets) > 1 or (packets and not t.fin_reply):
            t.violations.append(f"packets after our FIN other than one FIN: {[dc.describe(p) for p in packets]}")
        t.end = after
    except RpcError as exc:
        t.end.code, t.end.details = exc.code, exc.details
        tr.append(f"> call ended {exc.code.name}: {exc.details}")
    except TimeoutError:
        t.violations.append(f"no packet within {timeout} s")
        tr.append(f"> nothing for {timeout} s")
        try:
            stream.cancel()
        except Exception:
            pass
    return t
