"""Export to the client over ``FileSend/DiffCopy``: ``-o type=local`` and ``type=tar``.

local: the daemon is the fsutil *sender* (STATs, then DATA for what the
client requests, several files interleaved like BuildKit's four workers);
after the FIN exchange it half-closes and waits for the client's status
(BuildKit 0.8 cancels the call instead; clients must accept both).  tar: raw tar bytes in ``BytesMessage``s, then a
half-close and a wait for the client to end the call.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from google.protobuf.message import DecodeError

from .. import diffcopy as dc
from ..errors import PeerError, ProtocolError
from ..pb import filesync_pb2
from ..pb.fsutil_types_pb2 import Packet
from ..tarstream import tar_messages
from ..transport.base import RpcError
from ..walker import read_chunks, walk
from .errors import BuildCancelled, BuildError
from .sessions import Session

FILESEND_DIFFCOPY = "/moby.filesync.v1.FileSend/DiffCopy"
# Files whose DATA may interleave (BuildKit's sender runs four workers).
PARALLEL_FILES = 4
POLL = 0.25


@dataclass
class ExportRecord:
    type: str
    entries: int = 0
    requested: list[str] = field(default_factory=list)
    bytes_sent: int = 0
    seconds: float = 0.0
    error: str = ""


Progress = Callable[[int], None]


class _Watchdog:
    """Cancels the stream when the build is cancelled, the session ends, or nothing
    moved for ``stall_timeout``: a send blocked on flow control (a client that
    stops reading) cannot hold the build forever."""

    def __init__(self, stream, session: Session, cancelled: threading.Event, stall_timeout: float):
        self.stream = stream
        self.session = session
        self.cancelled = cancelled
        self.stall_timeout = stall_timeout
        self.last_progress = time.monotonic()
        self.fired: str | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="export-watchdog", daemon=True)

    def progress(self) -> None:
        self.last_progress = time.monotonic()

    def _watch(self) -> None:
        while not self._done.wait(POLL):
            if self.cancelled.is_set():
                self.fired = "context canceled"
            elif self.session.closed.is_set():
                self.fired = f"session ended: {self.session.close_reason}"
            elif time.monotonic() - self.last_progress > self.stall_timeout:
                self.fired = f"export to client stalled: no progress for {self.stall_timeout:g} s"
            if self.fired:
                self.stream.cancel()
                return

    def __enter__(self) -> "_Watchdog":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()


def require_filesend(session: Session) -> None:
    if not session.supports(FILESEND_DIFFCOPY):
        raise BuildError("method /moby.filesync.v1.FileSend/diffcopy not supported by the client")


def _checks(session: Session, cancelled: threading.Event, stream) -> None:
    if cancelled.is_set():
        stream.cancel()
        raise BuildCancelled()
    if session.closed.is_set():
        stream.cancel()
        raise BuildError(f"session ended: {session.close_reason}")


@contextlib.contextmanager
def _export_call(session: Session, kind: str, cancelled: threading.Event, stall_timeout: float,
                 metadata: list[tuple[str, str]] = ()):
    """A FileSend call to the client under a watchdog: yields ``(stream, record, watchdog)``,
    turns a failed call into a BuildError (or BuildCancelled) and times the export."""
    require_filesend(session)
    record = ExportRecord(kind)
    started = time.monotonic()
    stream = session.conn.open_stream(FILESEND_DIFFCOPY, list(metadata))  # n+1: exporter id, traceparent
    watchdog = _Watchdog(stream, session, cancelled, stall_timeout)
    try:
        with watchdog:
            yield stream, record, watchdog
    except RpcError as exc:
        if watchdog.fired:
            raise (BuildCancelled() if cancelled.is_set() else BuildError(watchdog.fired)) from None
        record.error = f"export to client failed: {exc.details or exc.code.name}"
        raise BuildError(record.error) from None
    except (ProtocolError, PeerError, DecodeError) as exc:
        stream.cancel()
        record.error = f"export to client failed: {exc}"
        raise BuildError(record.error) from None
    finally:
        record.seconds = time.monotonic() - started


def export_local(session: Session, rootfs: str, *, cancelled: threading.Event, stall_timeout: float,
                 progress: Progress | None = None,
                 metadata: list[tuple[str, str]] = ()) -> ExportRecord:
    with _export_call(session, "local", cancelled, stall_timeout, metadata) as (stream, record, watchdog):
        _send_tree(session, stream, rootfs, record, cancelled, stall_timeout, progress, watchdog)
    return record


def _send_tree(session, stream, rootfs, record, cancelled, stall_timeout, progress, watchdog) -> None:
    sender = dc.DiffCopySender()
    batch = []
    for stat in walk(rootfs):
        batch.append(sender.stat(stat).SerializeToString())
        record.entries += 1
        if len(batch) >= 512:
            stream.send_many(batch)
            batch = []
    batch.append(sender.end_listing().SerializeToString())
    stream.send_many(batch)
    waiting: deque[tuple[int, str]] = deque()  # requested, not started
    active: dict[int, object] = {}  # file id -> chunk iterator
    idle = 0.0
    while True:
        _checks(session, cancelled, stream)
        try:
            raw = stream.recv(0 if (active or waiting) else POLL)
        except TimeoutError:
            raw = b""  # nothing arrived
            if not (active or waiting):
                idle += POLL
                if idle >= stall_timeout:
                    stream.cancel()
                    raise BuildError(f"export to client stalled: no request for {stall_timeout:g} s") from None
        else:
            idle = 0.0
            watchdog.progress()
            if raw is None:
                raise BuildError("export to client failed: the client ended the call before FIN")
            event = sender.receive(Packet.FromString(raw))
            if isinstance(event, dc.FileRequested):
                record.requested.append(event.path)
                waiting.append((event.file_id, event.path))
            else:  # FIN
                if event.unfinished:
                    raise ProtocolError(f"FIN while {len(event.unfinished)} files were still being sent")
                stream.send(sender.fin().SerializeToString())
                stream.close_send()  # FILESEND-LOCAL-4: half-close (BuildKit 0.8 cancels instead)
                _await_end(stream, FINAL_STATUS_WAIT)
                return
            continue
        while waiting and len(active) < PARALLEL_FILES:
            file_id, path = waiting.popleft()
            active[file_id] = iter(read_chunks(os.path.join(rootfs, path)))
        out = []
        for file_id in list(active):  # one chunk of each active file in turn
            chunk = next(active[file_id], None)
            if chunk is None:
                del active[file_id]
                out.append(sender.end_file(file_id).SerializeToString())
            else:
                record.bytes_sent += len(chunk)
                out.append(sender.data(file_id, chunk).SerializeToString())
        if out:
            stream.send_many(out)
            watchdog.progress()
            if progress is not None:
                progress(record.bytes_sent)


#: How long the client may take to end the call after the FIN exchange.
FINAL_STATUS_WAIT = 10.0


def _await_end(stream, timeout: float) -> None:
    """Wait for the client to end the call after our half-close; a client that keeps
    it open is cut off (the export itself is complete by then)."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if stream.recv(max(0.01, deadline - time.monotonic())) is None:
                return
    except TimeoutError:
        pass
    except RpcError:
        return
    stream.cancel()


def export_tar(session: Session, rootfs: str, *, cancelled: threading.Event, stall_timeout: float,
               progress: Progress | None = None,
               metadata: list[tuple[str, str]] = ()) -> ExportRecord:
    with _export_call(session, "tar", cancelled, stall_timeout, metadata) as (stream, record, watchdog):
        stats = list(walk(rootfs))
        record.entries = len(stats)
        batch = []
        for payload in tar_messages(stats, lambda path: read_chunks(os.path.join(rootfs, path))):
            batch.append(filesync_pb2.BytesMessage(data=payload).SerializeToString())
            record.bytes_sent += len(payload)
            if len(batch) >= 32:
                _checks(session, cancelled, stream)
                stream.send_many(batch)
                batch = []
                watchdog.progress()
                if progress is not None:
                    progress(record.bytes_sent)
        stream.send_many(batch)
        stream.close_send()
        waited = 0.0
        while True:  # the client ends the call once it has the whole tar
            _checks(session, cancelled, stream)
            try:
                if stream.recv(POLL) is None:
                    break
            except TimeoutError:
                waited += POLL
                if waited >= stall_timeout:
                    stream.cancel()
                    raise BuildError(f"export to client stalled: the client did not finish within {stall_timeout:g} s") from None
    if progress is not None:
        progress(record.bytes_sent)
    return record
