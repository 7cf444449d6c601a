"""The gRPC services a build client serves to the daemon over its session.

Every handler takes one ``RpcStream`` (see ``reference.transport``) and works
on either transport.  File sync and export drive the sans-IO machines from
``reference.diffcopy`` and ``reference.tarstream``.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

from grpc_health.v1 import health_pb2

from .. import diffcopy as dc
from ..errors import PeerError, ProtocolError
from ..metadata import ENCODED_SUFFIX, decode_values
from ..pb import filesync_pb2, secrets_pb2
from ..pb.fsutil_types_pb2 import Packet, Stat
from ..transport.base import RpcError, RpcStream, StatusCode
from ..patterns import PatternError
from ..plain import plain
from ..walker import WalkError, open_chunks, read_chunks, walk
from .methods import (  # noqa: F401  (the AUTH_ names are re-exported: the suite imports them from here)
    AUTH_CREDENTIALS,
    AUTH_FETCH_TOKEN,
    AUTH_GET_TOKEN_AUTHORITY,
    AUTH_VERIFY_TOKEN_AUTHORITY,
    FILESEND_DIFFCOPY,
    FILESYNC_DIFFCOPY,
    FILESYNC_TARSTREAM,
    HEALTH_CHECK,
    HEALTH_WATCH,
    SECRETS_GET,
    advertised_methods,
)

if TYPE_CHECKING:
    from .auth import AuthProvider

#: Secrets larger than this are refused, as the docker CLI's provider does.
MAX_SECRET_SIZE = 500 * 1024
#: An export may fill the client's disk up to this much free space.
EXPORT_MIN_FREE_DISK = 64 << 20


@dataclass
class StreamStats:
    """What one file-sync or export stream did (``--stats-json``)."""

    method: str
    dir_name: str = ""
    protocol: str = ""
    stats_sent: int = 0
    reqs_received: int = 0
    files_sent: int = 0
    bytes_sent: int = 0
    files_received: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    requested: list[str] = field(default_factory=list)
    error: str = ""


@dataclass
class SyncedDir:
    """A directory the daemon may read by ``dir-name``."""

    path: str
    owner: tuple[int, int] | None = None  # the context is sent as 0/0, like the docker CLI
    excludes: list[str] = field(default_factory=list)  # the provider's own (2017 clients)


def _check_forced_protocol(protocol: str) -> None:
    """``BUILD_STREAM_PROTOCOL`` permits only the named file sync protocol (both peers read it)."""
    forced = os.environ.get("BUILD_STREAM_PROTOCOL", "").strip().lower()
    if forced and forced != protocol:
        raise RpcError(StatusCode.FAILED_PRECONDITION,
                       f"failed to negotiate protocol: BUILD_STREAM_PROTOCOL={forced} does not permit {protocol}")


def _metadata_values(stream: RpcStream, key: str) -> list[str]:
    """The values of ``key`` as the daemon meant them: a generation n+1 daemon escapes a key's values when
    one is non-ASCII and marks it ``<key>-encoded``; unmarked values are taken as sent (META-DECODE-1)."""
    found: dict[str, list[str]] = {key: [], key + ENCODED_SUFFIX: []}
    for k, v in stream.metadata:
        if k in found:
            found[k].append(v)
    return decode_values(found, key)


class ClientServices:
    """Builds the handler table for one session and records what happened."""

    def __init__(
        self,
        dirs: dict[str, SyncedDir],
        *,
        filesync: tuple[str, ...] = ("diffcopy", "tarstream"),
        export: Callable[[RpcStream], None] | None = None,
        secrets: dict[str, str] | None = None,
        advertise_secrets: bool = False,  # also without secrets (buildx does; unknown IDs get NOT_FOUND)
        auth: "AuthProvider | None" = None,  # reference.client.auth.AuthProvider
        chunk_size: int = dc.GO_CHUNK_SIZE,
        stream_protocol_env: bool = True,  # honour BUILD_STREAM_PROTOCOL (generations n-1 and n)
        ssh=None,  # reference.client.sshforward.SSHForwardProvider: serves and advertises the SSH service
    ) -> None:
        self.dirs = dirs
        self.filesync = filesync
        self.export = export
        self.secrets = secrets or {}
        self.advertise_secrets = advertise_secrets or bool(self.secrets)
        self.auth = auth
        self.chunk_size = chunk_size
        self.stream_protocol_env = stream_protocol_env
        self.ssh = ssh
        self.streams: list[StreamStats] = []
        self.calls: list[str] = []  # every method the daemon called, in order
        self._lock = threading.Lock()

    # -- table ----------------------------------------------------------------
    def handlers(self) -> dict[str, Callable[[RpcStream], None]]:
        """What serves each advertised method; ``advertised_methods`` alone decides which are advertised."""
        served: dict[str, Callable[[RpcStream], None] | None] = {
            HEALTH_CHECK: self.health_check,
            HEALTH_WATCH: self.health_watch,
            FILESYNC_DIFFCOPY: self.filesync_diffcopy,
            FILESYNC_TARSTREAM: self.filesync_tarstream,
            FILESEND_DIFFCOPY: self.export,
            SECRETS_GET: self.get_secret,
        }
        if self.auth is not None:
            served.update(self.auth.handlers())
        if self.ssh is not None:
            served.update(self.ssh.handlers())
        methods = advertised_methods(self.filesync, exporting=self.export is not None, secrets=self.advertise_secrets,
                                     auth=self.auth is not None,
                                     token_authority=self.auth is not None and self.auth.token_authority,
                                     ssh=self.ssh is not None)
        return {method: self.traced(served[method]) for method in methods}

    def methods(self) -> list[str]:
        """The advertised list, in a stable order (one header line each)."""
        return sorted(self.handlers())

    def traced(self, handler):
        """``handler`` that first records its call in ``calls`` (also for handlers a caller substitutes)."""
        def run(stream: RpcStream) -> None:
            with self._lock:
                self.calls.append(stream.method)
            handler(stream)

        return run

    def record(self, stats: StreamStats) -> None:
        """Add a transfer's statistics to ``streams`` (export receivers report through it)."""
        with self._lock:
            self.streams.append(stats)

    # -- health -----------------------------------------------------------------
    def health_check(self, stream: RpcStream) -> None:
        stream.recv()
        stream.send(health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING).SerializeToString())

    def health_watch(self, stream: RpcStream) -> None:
        stream.recv()
        stream.send(health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING).SerializeToString())
        stream.flush()
        try:
            while stream.recv() is not None:
                pass
        except RpcError:
            pass

    # -- file sync ----------------------------------------------------------------
    def _synced_dir(self, stream: RpcStream) -> tuple[str, SyncedDir]:
        names = _metadata_values(stream, "dir-name")
        name = names[0] if names else ""
        synced = self.dirs.get(name)
        if synced is None:
            raise RpcError(StatusCode.NOT_FOUND, f"no access allowed to dir {name!r}")
        return name, synced

    def _entry_filter(self, stream: RpcStream, synced: SyncedDir):
        includes = _metadata_values(stream, "include-patterns")
        excludes = _metadata_values(stream, "exclude-patterns")
        followpaths = _metadata_values(stream, "followpaths")
        if synced.excludes and _metadata_values(stream, "override-excludes") != ["true"]:
            excludes = list(synced.excludes)
        if not (includes or excludes or followpaths):
            return None
        from ..followlinks import resolve_follow_paths
        from ..pathfilter import PathFilter

        resolved = resolve_follow_paths(synced.path, followpaths) if followpaths else []
        return PathFilter(includes, excludes, resolved)

    def filesync_diffcopy(self, stream: RpcStream) -> None:
        started = time.monotonic()
        if self.stream_protocol_env:
            _check_forced_protocol("diffcopy")
        name, synced = self._synced_dir(stream)
        record = StreamStats(FILESYNC_DIFFCOPY, dir_name=name, protocol="diffcopy")
        try:
            try:
                entry_filter = self._entry_filter(stream, synced)
            except PatternError as exc:  # ERR first, so the daemon can show the cause
                stream.send(dc.err_packet(f"invalid patterns: {exc}").SerializeToString())
                stream.flush()
                raise RpcError(StatusCode.INVALID_ARGUMENT, f"invalid patterns: {exc}") from None
            send_tree(stream, synced.path, entry_filter, synced.owner, record, self.chunk_size)
        except BaseException as exc:
            record.error = str(exc)
            raise
        finally:
            record.seconds = time.monotonic() - started
            self.record(record)

    def filesync_tarstream(self, stream: RpcStream) -> None:
        started = time.monotonic()
        if self.stream_protocol_env:
            _check_forced_protocol("tarstream")
        name, synced = self._synced_dir(stream)
        record = StreamStats(FILESYNC_TARSTREAM, dir_name=name, protocol="tarstream")
        try:
            entry_filter = self._entry_filter(stream, synced)
            stats = list(walk(synced.path, entry_filter=entry_filter, owner=synced.owner))
            record.stats_sent = len(stats)

            def read(path: str):
                record.files_sent += 1
                for chunk in read_chunks(os.path.join(synced.path, path)):
                    record.bytes_sent += len(chunk)
                    yield chunk

            from ..tarstream import tar_messages  # generation n only

            batch = []
            for payload in tar_messages(stats, read):
                batch.append(filesync_pb2.BytesMessage(data=payload).SerializeToString())
                if len(batch) >= 32:
                    stream.send_many(batch)
                    batch = []
            stream.send_many(batch)
            stream.flush()
        except WalkError as exc:
            record.error = str(exc)
            raise RpcError(StatusCode.UNKNOWN, str(exc)) from None
        finally:
            record.seconds = time.monotonic() - started
            self.record(record)

    # -- secrets --------------------------------------------------------------------
    def get_secret(self, stream: RpcStream) -> None:
        request = secrets_pb2.GetSecretRequest.FromString(stream.recv() or b"")
        source = self.secrets.get(request.ID)
        if source is None:
            raise RpcError(StatusCode.NOT_FOUND, f"secret {request.ID} not found")
        with open(source, "rb") as fh:
            data = fh.read(MAX_SECRET_SIZE + 1)
        if len(data) > MAX_SECRET_SIZE:
            raise RpcError(StatusCode.INVALID_ARGUMENT, f"secret {request.ID} is larger than 500 KiB")
        stream.send(secrets_pb2.GetSecretResponse(data=data).SerializeToString())


def send_tree(stream: RpcStream, root: str, entry_filter, owner, record: StreamStats, chunk_size: int) -> None:
    """Serve one DiffCopy as the fsutil sender: list, answer REQs, FIN."""
    sender = dc.DiffCopySender()
    batch: list[bytes] = []
    listed = sender.listed
    append = batch.append
    try:
        # Stats are built inside their STAT packets: no copy, no reading fields back
        for packet, path, mode in walk(root, entry_filter=entry_filter, owner=owner, as_packets=True):
            append(listed(packet, path, mode).SerializeToString())
            if len(batch) >= 512:
                stream.send_many(batch)
                batch = []
                append = batch.append
    except (WalkError, PatternError) as exc:
        stream.send_many(batch)
        stream.send(sender.error(str(exc)).SerializeToString())
        stream.flush()
        raise RpcError(StatusCode.UNKNOWN, str(exc)) from None
    record.stats_sent = sender.entries_listed
    batch.append(sender.end_listing().SerializeToString())
    stream.send_many(batch)
    stream.flush()
    _serve_requests(stream, sender, root, record, chunk_size)


#: fsutil's sender runs four workers, so the DATA of up to four requested files
#: interleave on the wire; the receiver (dockerd's disk writer) then writes and
#: hashes up to four files at once instead of handing chunks of one file over
#: one at a time.
FILES_IN_FLIGHT = 4


def _serve_requests(stream: RpcStream, sender: dc.DiffCopySender, root: str, record: StreamStats,
                    chunk_size: int) -> None:
    """Answer REQs until the receiver's FIN: up to ``FILES_IN_FLIGHT`` files are
    read at once, one chunk of each per round, and new REQs are taken between
    rounds without waiting."""
    waiting: collections.deque = collections.deque()  # requested, not opened yet
    active: list[tuple[int, Iterator[bytes]]] = []  # (file id, chunks)
    while True:
        # Read what the receiver sent; block only when there is nothing to send.
        while True:
            try:
                raw = stream.recv(timeout=0 if (active or waiting) else None)
            except TimeoutError:
                break
            if raw is None:
                raise RpcError(StatusCode.CANCELLED, "the receiver closed the stream without FIN")
            event = sender.receive(Packet.FromString(raw))
            if not isinstance(event, dc.FileRequested):  # FIN: answer it and end the call
                stream.send(sender.fin().SerializeToString())
                stream.flush()
                return
            record.reqs_received += 1
            record.requested.append(event.path)
            waiting.append(event)
        while waiting and len(active) < FILES_IN_FLIGHT:
            event = waiting.popleft()
            try:
                active.append((event.file_id, open_chunks(os.path.join(root, event.path), chunk_size)))
            except OSError as exc:  # ERR rather than an empty file nobody notices
                message = f"cannot read {event.path!r}: {exc.strerror}"
                stream.send(sender.error(message).SerializeToString())
                stream.flush()
                raise RpcError(StatusCode.UNKNOWN, message) from None
        out = []
        for entry in list(active):
            file_id, chunks = entry
            chunk = next(chunks, None)
            if chunk is None:
                out.append(sender.end_file(file_id).SerializeToString())
                record.files_sent += 1
                active.remove(entry)
            else:
                out.append(sender.data(file_id, chunk).SerializeToString())
                record.bytes_sent += len(chunk)
        if out:
            stream.send_many(out)
        if not active and not waiting:
            stream.flush()


# -- export ---------------------------------------------------------------------------

def local_export_handler(dest: str, records: Callable[[StreamStats], None]) -> Callable[[RpcStream], None]:
    """FileSend/DiffCopy for ``-o type=local,dest=DIR``: the daemon sends, we merge.

    BuildKit 0.8 never half-closes after the FIN exchange; the call is
    cancelled instead, and that counts as success.
    """

    uid, gid = os.getuid(), os.getgid()

    def as_own(stat: Stat) -> Stat:
        stat.uid, stat.gid = uid, gid
        return stat

    def handler(stream: RpcStream) -> None:
        started = time.monotonic()
        record = StreamStats(FILESEND_DIFFCOPY, protocol="diffcopy")
        os.makedirs(dest, mode=0o700, exist_ok=True)
        from ..applier import TreeApplier, disk_limits  # exports only
        from google.protobuf.message import DecodeError

        limits = disk_limits(dest, dc.DEFAULT_LIMITS, EXPORT_MIN_FREE_DISK)
        receiver = dc.DiffCopyReceiver(merge=True, stat_filter=as_own, limits=limits)
        applier = TreeApplier(dest, chown=None)
        complete = False
        try:
            while not complete:
                try:
                    raw = stream.recv()
                except RpcError as exc:
                    if exc.code != StatusCode.CANCELLED:
                        raise
                    raw = None
                try:
                    actions = receiver.receive(dc.decode_packet(raw)) if raw is not None else receiver.peer_closed()
                except DecodeError:
                    raise ProtocolError("invalid packet from the daemon: not a fsutil Packet") from None
                for action in actions:
                    if isinstance(action, dc.SendPacket):
                        if action.packet.type == dc.PACKET_REQ:
                            record.reqs_received += 1
                        stream.send(action.packet.SerializeToString())
                    elif isinstance(action, dc.TransferComplete):
                        complete = True
                    else:
                        if isinstance(action, dc.FileData):
                            record.bytes_received += len(action.chunk)
                        applier.apply(action)
                stream.flush()
            applier.finish(receiver.directories)
            record.files_received = applier.files_written
            record.requested = receiver.requested
        except (ProtocolError, PeerError) as exc:
            applier.abort()
            record.error = str(exc)
            raise RpcError(StatusCode.INVALID_ARGUMENT, str(exc)) from None
        except BaseException as exc:
            applier.abort()
            record.error = str(exc)
            raise
        finally:
            record.seconds = time.monotonic() - started
            records(record)

    return handler


def tar_export_handler(dest: str, records: Callable[[StreamStats], None]) -> Callable[[RpcStream], None]:
    """FileSend/DiffCopy for ``-o type=tar,dest=FILE``: raw tar bytes in BytesMessages."""

    def handler(stream: RpcStream) -> None:
        started = time.monotonic()
        record = StreamStats(FILESEND_DIFFCOPY, protocol="tar")
        out = sys.stdout.buffer if dest == "-" else open(dest + ".partial", "wb")
        try:
            while True:
                raw = stream.recv()
                if raw is None:
                    break
                data = filesync_pb2.BytesMessage.FromString(raw).data
                record.bytes_received += len(data)
                out.write(data)
            if dest != "-":
                out.close()
                os.replace(dest + ".partial", dest)
        except BaseException as exc:
            record.error = str(exc)
            if dest != "-":
                out.close()
                os.unlink(dest + ".partial")
            raise
        finally:
            record.seconds = time.monotonic() - started
            records(record)

    return handler


def stats_as_dicts(streams: list[StreamStats]) -> list[dict]:
    return [plain(s) for s in streams]
