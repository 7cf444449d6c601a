"""The daemon side of file sync: pick a protocol, pull a client directory into a cache entry.

DiffCopy: the daemon is the fsutil *receiver* on ``FileSync/DiffCopy`` and
diffs against the cache entry's tree, so only new or changed regular files
are requested.  TarStream (the 2017 protocol, generation "n-1"): the client
streams a whole tar; the entry is rebuilt from scratch.

Every receive has a stall timeout, and every incoming path goes through the
receiver's validator (stricter than fsutil: bare ``.``/``..`` are refused)
and an applier that cannot write outside the entry.  The receiver's limits
(path length, depth, entries, bytes against the free disk space) fail the
transfer at the STAT that exceeds them, before anything of it is written; the
gRPC message size limit is the transport's.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from google.protobuf.message import DecodeError

from .. import diffcopy as dc
from ..applier import ApplyError, TreeApplier, disk_limits, remove_tree
from ..errors import PeerError, ProtocolError
from ..paths import DEFAULT_LIMITS, ReceiveLimits
from ..pb import filesync_pb2
from ..pb.fsutil_types_pb2 import Packet
from ..tarstream import TarReceiver
from ..transport.base import RpcError, RpcStream, StatusCode
from ..walker import list_diff_base
from .errors import BuildCancelled, BuildError
from .sessions import Session

FILESYNC_SERVICE = "/moby.filesync.v1.FileSync/"
METHODS = {
    "diffcopy": FILESYNC_SERVICE + "DiffCopy",
    "tarstream": FILESYNC_SERVICE + "TarStream",
}
# REQs sent in one write while the listing arrives.
REQ_BATCH = 128
# Progress is reported after at least this many more bytes (and at the end).
PROGRESS_STEP = 256 << 10
# How long a receive waits before re-checking cancellation.
POLL = 0.25
# After the FIN exchange the sender should end its call promptly.
END_GRACE = 5.0
# After an ERR the sender should end its call; then we cancel it.
REJECT_GRACE = 2.0
# A transfer may fill the disk up to this much free space (``max_transfer_bytes`` otherwise).
MIN_FREE_DISK = 256 << 20


def config_limits(config) -> ReceiveLimits:
    """The receiver's limits a DaemonConfig sets (the free disk space is added per transfer)."""
    return ReceiveLimits(config.max_path_length, config.max_depth, config.max_entries, config.max_transfer_bytes)


def negotiate(session: Session, daemon_protocols: tuple[str, ...], forced: str | None = None) -> str:
    """The first daemon protocol (in preference order) the client advertises.

    ``forced`` (env BUILD_STREAM_PROTOCOL) narrows the daemon's list to one.
    """
    offered = list(daemon_protocols)
    if forced:
        offered = [p for p in offered if p == forced.lower()]
    for protocol in offered:
        if session.supports(METHODS[protocol]):
            return protocol
    client = [m for m in session.advertised(FILESYNC_SERVICE.lower())]
    daemon_text = ", ".join(offered) if offered else f"none (BUILD_STREAM_PROTOCOL={forced})"
    raise BuildError(
        f"no common file sync protocol: daemon offers [{daemon_text}], "
        f"client advertises [{', '.join(client)}]"
    )


@dataclass
class SyncRequest:
    """One directory transfer, described by the metadata BuildKit sends."""

    dir_name: str | None  # None: the 2017 unnamed directory (no dir-name sent)
    followpaths: list[str] = field(default_factory=list)
    include_patterns: list[str] = field(default_factory=list)
    exclude_patterns: list[str] = field(default_factory=list)

    def metadata(self) -> list[tuple[str, str]]:
        md: list[tuple[str, str]] = []
        if self.dir_name is not None:
            md.append(("dir-name", self.dir_name))
        md += [("include-patterns", p) for p in self.include_patterns]
        md += [("exclude-patterns", p) for p in self.exclude_patterns]
        md += [("followpaths", p) for p in self.followpaths]
        return md


@dataclass
class SyncRecord:
    """What one transfer did (reported by ``GET /_reference/stats``)."""

    dir_name: str | None
    protocol: str
    metadata: list[tuple[str, str]]
    entries: int = 0
    requested: list[str] = field(default_factory=list)
    files_received: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    error: str = ""
    changed: bool = False  # whether the tree was touched at all


Progress = Callable[[int], None]  # bytes received so far


class _ChangeNotice:
    """Calls ``on_change`` once, just before the first write to the tree."""

    def __init__(self, record: SyncRecord, on_change: Callable[[], None] | None):
        self._record = record
        self._on_change = on_change

    def __call__(self) -> None:
        if not self._record.changed:
            self._record.changed = True
            if self._on_change is not None:
                self._on_change()


class _Receive:
    """Receives messages with a stall timeout, giving up on cancellation."""

    def __init__(self, stream: RpcStream, session: Session, cancelled: threading.Event, stall_timeout: float):
        self.stream = stream
        self.session = session
        self.cancelled = cancelled
        self.stall_timeout = stall_timeout

    def __call__(self) -> bytes | None:
        waited = 0.0
        while True:
            if self.cancelled.is_set():
                self.stream.cancel()
                raise BuildCancelled()
            if self.session.closed.is_set():
                self.stream.cancel()
                raise BuildError(f"session ended: {self.session.close_reason}")
            try:
                return self.stream.recv(POLL)
            except TimeoutError:
                waited += POLL
                if waited >= self.stall_timeout:
                    self.stream.cancel()
                    raise BuildError(f"the client stalled: no data for {self.stall_timeout:g} s") from None


def sync(
    session: Session,
    protocol: str,
    request: SyncRequest,
    tree: str,
    *,
    cancelled: threading.Event,
    stall_timeout: float,
    progress: Progress | None = None,
    previous: list | None = None,
    on_change: Callable[[], None] | None = None,
    limits: ReceiveLimits | None = None,
    wire_metadata: list[tuple[str, str]] | None = None,
    min_free_disk: int = MIN_FREE_DISK,
) -> SyncRecord:
    """Make ``tree`` equal to the client's directory; raises BuildError on failure.

    ``previous`` is the tree's listing if the caller has it, as Stats or as
    the receiver's diff-base entries (else the tree is walked); ``on_change``
    runs once, before anything in the tree changes.  ``limits`` (see :func:`config_limits`)
    default to :data:`reference.paths.DEFAULT_LIMITS`; the byte limit is at most the free
    disk space less ``min_free_disk``.
    """
    # wire_metadata: what the generation sends for request.metadata() (encoded values, traceparent)
    record = SyncRecord(request.dir_name, protocol, wire_metadata or request.metadata())
    changing = _ChangeNotice(record, on_change)
    started = time.monotonic()
    try:
        stream = session.conn.open_stream(METHODS[protocol], record.metadata)
    except RpcError as exc:
        raise BuildError(f"cannot open {protocol} stream: {exc.details or exc.code.name}") from None
    receive = _Receive(stream, session, cancelled, stall_timeout)
    limits = disk_limits(tree, limits or DEFAULT_LIMITS, min_free_disk)
    try:
        if protocol == "diffcopy":
            if previous is None:
                previous = list_diff_base(tree)
            _receive_diffcopy(stream, receive, tree, record, progress, previous, changing, limits)
        else:
            _receive_tarstream(stream, receive, tree, record, progress, changing, limits)
    except RpcError as exc:
        record.error = f"{_rpc_text(exc)} ({protocol} transfer of {request.dir_name or 'the context'!r})"
        raise BuildError(record.error) from None
    except BuildError as exc:
        record.error = str(exc)
        raise
    finally:
        record.seconds = time.monotonic() - started
    return record


def _rpc_text(exc: RpcError) -> str:
    return f"rpc error: code = {_go_code_name(exc.code)} desc = {exc.details}"


def _go_code_name(code: StatusCode) -> str:
    """grpc-go's spelling of a status code (``Unknown``, ``NotFound``, ...)."""
    return "".join(part.capitalize() for part in code.name.split("_")) if code != StatusCode.OK else "OK"


def _reject(stream: RpcStream, reason: str) -> BuildError:
    """Tell the sender why (ERR packet), end the call, and fail the build."""
    try:
        stream.send(dc.err_packet(reason).SerializeToString())
        stream.close_send()
    except RpcError:
        pass
    # A cancel right away could overtake the ERR at the peer; give it a moment to end the call.
    _drain(stream, REJECT_GRACE)
    return BuildError(reason)


def _receive_diffcopy(stream: RpcStream, receive: _Receive, tree: str, record: SyncRecord,
                      progress: Progress | None, previous: list, changing: _ChangeNotice,
                      limits: ReceiveLimits = DEFAULT_LIMITS) -> None:
    # the whole previous listing up front: applying changes must not disturb a walk
    receiver = dc.DiffCopyReceiver(previous, limits=limits)
    applier = TreeApplier(tree, chown=None)
    complete = False
    unflushed = 0
    next_progress = 0
    parse_packet = Packet.FromString
    parse_name_packet = dc.decode_name_packet
    handle_packet = receiver.receive
    try:
        while not complete:
            raw = receive()
            try:
                if raw is None:
                    # unlike an export receiver, the daemon needs the sender's FIN: without it
                    # the client may not have seen our FIN (fsutil fails the transfer too)
                    raise BuildError("the client ended the transfer without answering FIN"
                                     if receiver.state is dc.ReceiverState.FIN_SENT
                                     else "the client ended the transfer early")
                try:
                    packet = parse_packet(raw)
                except DecodeError:  # names that are not UTF-8 (DecodeError again if no Packet at all)
                    packet = parse_name_packet(raw)
                actions = handle_packet(packet)
                for action in actions:
                    if isinstance(action, dc.FileData):
                        record.bytes_received += len(action.chunk)
                        if progress is not None and record.bytes_received >= next_progress:
                            progress(record.bytes_received)
                            next_progress = record.bytes_received + PROGRESS_STEP
                        applier.apply(action)
                    elif isinstance(action, dc.SendPacket):
                        stream.send(action.packet.SerializeToString())
                        unflushed += 1
                    elif isinstance(action, dc.TransferComplete):
                        complete = True
                    else:
                        if isinstance(action, (dc.PutEntry, dc.DeleteEntry)):
                            changing()
                        applier.apply(action)
            except DecodeError:
                raise _reject(stream, "invalid packet from the client: not a fsutil Packet") from None
            except PeerError as exc:
                stream.cancel()
                raise BuildError(str(exc)) from None
            except (ProtocolError, ApplyError) as exc:
                raise _reject(stream, str(exc)) from None
            except OSError as exc:
                raise _reject(stream, f"cannot write the received tree: {exc.strerror}") from None
            # REQs go out in batches while the listing streams in; anything else at once
            if unflushed and (unflushed >= REQ_BATCH
                              or not (packet.type == dc.PACKET_STAT and packet.HasField("stat"))):
                stream.flush()
                unflushed = 0
        record.entries = receiver._next_id
        record.requested = list(receiver.requested)
        applier.finish(receiver.directories)
        record.files_received = applier.files_written
    except BaseException:
        applier.abort()
        raise
    # The sender answers our FIN with FIN and ends its call; wait briefly for that.
    _drain(stream, END_GRACE)


def _drain(stream: RpcStream, grace: float) -> None:
    deadline = time.monotonic() + grace
    try:
        while stream.recv(max(0.0, deadline - time.monotonic())) is not None:
            pass
    except (TimeoutError, RpcError):
        stream.cancel()


def _receive_tarstream(stream: RpcStream, receive: _Receive, tree: str, record: SyncRecord,
                       progress: Progress | None, changing: _ChangeNotice,
                       limits: ReceiveLimits = DEFAULT_LIMITS) -> None:
    # no diff base in this protocol: start from an empty tree
    changing()
    try:
        remove_tree(tree)
        os.makedirs(tree, mode=0o755)
    except OSError as exc:
        raise BuildError(f"cannot empty the cached tree: {exc.strerror}") from None
    stream.close_send()
    receiver = TarReceiver(limits)
    applier = TreeApplier(tree, chown=None)
    try:
        while True:
            raw = receive()
            try:
                if raw is None:
                    for action in receiver.end():
                        applier.apply(action)
                    break
                data = filesync_pb2.BytesMessage.FromString(raw).data
                record.bytes_received += len(data)
                if progress is not None:
                    progress(record.bytes_received)
                for action in receiver.feed(data):
                    if isinstance(action, dc.PutEntry):
                        record.entries += 1
                    applier.apply(action)
            except DecodeError:
                raise BuildError("invalid tar stream message from the client") from None
            except (ProtocolError, ApplyError) as exc:
                stream.cancel()
                raise BuildError(str(exc)) from None
            except OSError as exc:
                stream.cancel()
                raise BuildError(f"cannot write the received tree: {exc.strerror}") from None
        record.requested = list(receiver.requested)
        applier.finish()
        record.files_received = applier.files_written
    except BaseException:
        applier.abort()
        raise
