"""A scriptable session client: the suite plays the client to test a daemon.

Normal behaviour comes from the reference client's services; a test replaces
any handler (for example a DiffCopy sender that sends a crafted packet
sequence) or the advertised methods and headers, then runs one build and
gets back what the daemon did: the calls it made, its error text, progress.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from reference import diffcopy as dc
from reference.client import BuildError, post_build
from reference.client.services import (
    ClientServices, StreamStats, SyncedDir, local_export_handler, tar_export_handler,
)
from reference.dockerhost import EngineError
from reference.errors import SessionError
from reference.pb.fsutil_types_pb2 import Packet, Stat
from reference.session import SessionRequest, new_session_id, open_session
from reference.transport.base import RpcError, RpcStream

FILESYNC_SERVICE = "/moby.filesync.v1.FileSync/"


@dataclass
class BuildObservation:
    ok: bool
    image_id: str | None
    error: str | None
    seconds: float
    calls: list[str]
    streams: list[StreamStats]
    vertex_errors: list[str]
    progress: list = field(default_factory=list)
    transcript: list[str] = field(default_factory=list)
    session_id: str = ""

    def describe(self) -> str:
        return f"ok={self.ok} image={self.image_id} error={self.error!r} calls={self.calls}"


def make_context(files: dict[str, bytes | str], dockerfile: str = "FROM scratch\nCOPY . /\n") -> str:
    root = tempfile.mkdtemp(prefix="conf-ctx-")
    for rel, data in {"Dockerfile": dockerfile, **files}.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
    return root


def scripted_sender(packets: Iterable[Packet], *, then_wait: float = 5.0, answer_fin: bool = False,
                    transcript: list[str] | None = None) -> Callable[[RpcStream], None]:
    """A FileSync/DiffCopy handler that sends ``packets`` verbatim, then records
    what the daemon answers until it ends the call (or ``then_wait`` passes). With ``answer_fin``
    a FIN from the daemon is answered with FIN and the call ended, so a daemon that accepted the listing
    completes the transfer (and applies all of it) instead of waiting out ``then_wait`` for the sender."""

    def handler(stream: RpcStream) -> None:
        for packet in packets:
            if transcript is not None:
                transcript.append("> " + dc.describe(packet))
            stream.send(packet.SerializeToString())
        stream.flush()
        deadline = time.monotonic() + then_wait
        while time.monotonic() < deadline:
            try:
                raw = stream.recv(timeout=max(0.05, deadline - time.monotonic()))
            except TimeoutError:
                break
            except RpcError as exc:
                if transcript is not None:
                    transcript.append(f"< call ended: {exc.code.name}")
                return
            if raw is None:
                if transcript is not None:
                    transcript.append("< end of stream")
                return
            answer = dc.decode_packet(raw)
            if transcript is not None:
                transcript.append("< " + dc.describe(answer))
            if answer_fin and answer.type == dc.PACKET_FIN:
                fin = dc.fin_packet()
                if transcript is not None:
                    transcript.append("> " + dc.describe(fin))
                stream.send(fin.SerializeToString())
                stream.flush()
                return  # as a sender does: the exchange is complete, the handler's return ends the call

    return handler


def dir_name_of(stream: RpcStream) -> str:
    return next((v for k, v in stream.metadata if k == "dir-name"), "")


def run_build(
    daemon_host: str,
    context: str,
    *,
    dockerfile_dir: str | None = None,
    handler_overrides: dict[str, Callable[[RpcStream], None]] | None = None,
    methods: list[str] | None = None,
    extra_methods: list[str] = (),
    header_overrides: list[tuple[str, str]] | None = None,
    filesync: tuple[str, ...] = ("diffcopy",),
    output: tuple[str, str] | None = None,
    secrets: dict[str, str] | None = None,
    ssh=None,  # a reference.client.sshforward.SSHForwardProvider: served and advertised
    query: dict | None = None,
    timeout: float = 60.0,
    hang_timeout: float = 15.0,
    transport: str = "h2",
    session_id: str | None = None,
    shared_key: str | None = None,
) -> BuildObservation:
    """Open a session and run one build; never raises for what the daemon does."""
    started = time.monotonic()
    dirs = {"context": SyncedDir(context, owner=(0, 0)), "dockerfile": SyncedDir(dockerfile_dir or context)}
    services = ClientServices(dirs, filesync=filesync, secrets=secrets, ssh=ssh)
    out_attrs = []
    if output is not None:
        kind, dest = output
        make = local_export_handler if kind == "local" else tar_export_handler
        services.export = make(dest, services.record)
        out_attrs = [{"Type": kind, "Attrs": {}}]
    # the suite's client understands generation n+1's metadata encoding (its senders see decoded values)
    from .daemon_probes import decoding

    handlers = {method: decoding(handler) if method.startswith(FILESYNC_SERVICE) else handler
                for method, handler in services.handlers().items()}
    for method, handler in (handler_overrides or {}).items():
        handlers[method] = services.traced(handler)
    advertised = list(methods) if methods is not None else sorted(handlers) + list(extra_methods)
    request = SessionRequest(session_id or new_session_id(), os.path.basename(context),
                             shared_key or new_session_id(), advertised)
    if header_overrides is not None:
        request_headers = header_overrides
    else:
        request_headers = None
    import json
    import secrets as _secrets

    q = {"version": "2", "session": request.session_id, "remote": "client-session", "dockerfile": "Dockerfile",
         "buildid": _secrets.token_hex(8), "rm": "1"}
    if out_attrs:
        q["outputs"] = json.dumps(out_attrs)
    q.update(query or {})
    progress: list = []
    try:
        if request_headers is not None:
            request = _CustomHeaders(request, request_headers)
        sock, leftover = open_session(request, daemon_host)
    except (SessionError, OSError) as exc:
        return BuildObservation(False, None, f"session: {exc}", time.monotonic() - started, [], [], [])
    if transport == "grpcio":
        from reference.transport.grpcio_pump import serve_grpcio as serve
    else:
        from reference.transport.h2grpc import serve_h2 as serve
    server = serve(sock, handlers, leftover)
    try:
        image_id, vertex_errors = post_build(q, daemon_host, progress.append, timeout, hang_timeout)
        ok, error = True, None
    except (BuildError, EngineError, SessionError, OSError) as exc:
        image_id, vertex_errors, ok, error = None, [], False, str(exc)
    finally:
        server.close()
        sock.close()
    return BuildObservation(ok, image_id, error, time.monotonic() - started, list(services.calls),
                            list(services.streams), vertex_errors, progress, session_id=request.session_id)


class _CustomHeaders:
    """A SessionRequest whose header list is replaced wholesale (adversarial handshakes)."""

    def __init__(self, base: SessionRequest, headers: list[tuple[str, str]]):
        self.session_id = base.session_id
        self._headers = headers

    def headers(self) -> list[tuple[str, str]]:
        return self._headers


def stat(path: str, mode: int = 0o644, size: int = 0, **kw) -> Stat:
    return Stat(path=path, mode=mode, size=size, **kw)


DIR_MODE = 0x80000000 | 0o755
