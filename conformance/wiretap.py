"""A recording proxy for the Docker Engine API socket: what a daemon asks of a client's session, on the wire.

    with WireTap("/tmp/dsc-x/docker.sock") as tap:     # listens on tap.socket_path (tap.url for DOCKER_HOST)
        ... run any client with DOCKER_HOST=tap.url ...
        recording = tap.take()                        # waits until the client's connections are closed
        recording.requests("context")                 # REQ packets the daemon sent on the main context transfer

    python -m conformance.wiretap --upstream /run/docker.sock [--listen SOCK] [--json FILE]

Every byte is forwarded unchanged, in both directions, and decoded before it is passed on (so whatever a client
has seen has been counted). Of each connection the first request head is read; when it is ``POST /session``
(bare or ``/vX.Y/session``) and the daemon answers 101, the rest of the connection is HTTP/2 (the daemon is the
HTTP/2 client): frames are parsed with hyperframe, header blocks with one hpack decoder per direction, and the
gRPC messages of ``FileSync/DiffCopy`` and ``FileSend/DiffCopy`` calls as fsutil Packets: per call its metadata
(``dir-name``, ``followpaths``, ``exclude-patterns``, percent-decoded where ``<key>-encoded`` says so, as
BuildKit 0.12+ sends them), the paths of the STATs each side sent, the IDs each side REQuested, DATA bytes and how
the call ended. Every other connection (``/_ping``, ``/build``, buildx's ``/grpc``) is forwarded without decoding
beyond its first request line and status. A client that sent ``/session`` after another request on the same
connection would not be decoded; the docker CLIs and the reference client dial a fresh connection to hijack, and
``Recording.sessions`` shows what was seen.

Bounded: an HTTP/1.1 head up to ``Limits.head_bytes``, one HPACK block up to ``header_block_bytes``, of each
gRPC message only its first ``message_prefix_bytes`` (a Packet's type, stat and ID precede its data), at most
``streams_per_connection`` live streams and ``paths_per_transfer`` STAT paths per call; a frame is at most
2**24 + 9 bytes by the protocol. Anything beyond a limit, or undecodable, stops the decoding of that connection
(``Connection.error``), never its forwarding.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from urllib.parse import unquote_plus

from hpack import Decoder as HpackDecoder
from hpack.exceptions import HPACKError
from hyperframe import frame as h2frame
from hyperframe.exceptions import HyperframeError

from reference.pb.fsutil_types_pb2 import Stat  # generated from the wire-exact proto/fsutil types
from reference.socketdirs import socket_dir

FILESYNC = "/moby.filesync.v1.FileSync/DiffCopy"
FILESEND = "/moby.filesync.v1.FileSend/DiffCopy"
CLIENT, DAEMON = "client", "daemon"
PACKET_NAMES = {0: "STAT", 1: "REQ", 2: "DATA", 3: "FIN", 4: "ERR"}
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_SESSION_TARGET = re.compile(r"/(?:v\d+(?:\.\d+)*/)?session")
_RECV_CHUNK = 256 * 1024


@dataclass(frozen=True)
class Limits:
    head_bytes: int = 64 * 1024
    header_block_bytes: int = 1 << 20
    header_table_bytes: int = 64 * 1024
    message_prefix_bytes: int = 64 * 1024
    streams_per_connection: int = 4096
    paths_per_transfer: int = 100_000
    connections_kept: int = 10_000


class _StopDecoding(Exception):
    """This connection cannot (or may no longer) be decoded; forwarding goes on."""


def parse_bool(value: str) -> bool:
    """Go's strconv.ParseBool, which BuildKit applies to ``<key>-encoded``; anything else is false."""
    return value in ("1", "t", "T", "TRUE", "true", "True")


def decoded_values(metadata: list[tuple[str, str]], key: str) -> list[str]:
    """The values of ``key`` as the daemon meant them: URL-query-unescaped when ``<key>-encoded`` is true."""
    values = [v for k, v in metadata if k == key]
    if any(parse_bool(v) for k, v in metadata if k == key + "-encoded"):
        return [unquote_plus(v, errors="strict") for v in values]
    return values


# -- records -----------------------------------------------------------------------------------------

@dataclass
class Transfer:
    """One ``FileSync/DiffCopy`` (the client sends files) or ``FileSend/DiffCopy`` (the daemon exports) call."""

    connection: int
    stream_id: int
    method: str
    metadata: list[tuple[str, str]]  # the daemon's request headers, pseudo-headers left out
    stat_paths: dict[str, list[str]] = field(default_factory=lambda: {CLIENT: [], DAEMON: []})
    requested_ids: dict[str, list[int]] = field(default_factory=lambda: {CLIENT: [], DAEMON: []})
    packets: dict[str, dict[str, int]] = field(default_factory=lambda: {CLIENT: {}, DAEMON: {}})
    data_bytes: dict[str, int] = field(default_factory=lambda: {CLIENT: 0, DAEMON: 0})
    walk_ended: dict[str, bool] = field(default_factory=lambda: {CLIENT: False, DAEMON: False})
    ended: list[str] = field(default_factory=list)  # "daemon END_STREAM", "client RST_STREAM(8)", ...
    grpc_status: str | None = None
    paths_truncated: bool = False
    undecoded_messages: int = 0

    def values(self, key: str) -> list[str]:
        return decoded_values(self.metadata, key)

    @property
    def encoded_keys(self) -> list[str]:
        return sorted(k[: -len("-encoded")] for k, v in self.metadata if k.endswith("-encoded") and parse_bool(v))

    @property
    def dir_name(self) -> str:
        return ",".join(self.values("dir-name"))

    @property
    def sender(self) -> str:
        """The side that owns the files: the client on FileSync, the daemon on FileSend."""
        return CLIENT if self.method == FILESYNC else DAEMON

    @property
    def receiver(self) -> str:
        return DAEMON if self.sender == CLIENT else CLIENT

    @property
    def kind(self) -> str:
        """export, dockerfile, dockerignore (the context's .dockerignore probe), context (the main transfer)."""
        if self.method == FILESEND:
            return "export"
        followpaths = self.values("followpaths")
        if self.dir_name == "dockerfile":
            return "dockerfile"
        if self.dir_name == "context":
            if followpaths and all(p.endswith(".dockerignore") for p in followpaths):
                return "dockerignore"
            return "context"
        return "other"

    @property
    def requests(self) -> int:
        """REQ packets the receiving side sent: files it asked for."""
        return self.packets[self.receiver].get("REQ", 0)

    @property
    def requested_paths(self) -> list[str]:
        sent = self.stat_paths[self.sender]
        return [sent[i] if i < len(sent) else f"<unknown ID {i}>" for i in self.requested_ids[self.receiver]]

    def as_dict(self, paths: int = 50) -> dict:
        return {
            "connection": self.connection, "stream": self.stream_id, "method": self.method, "kind": self.kind,
            "dir_name": self.dir_name, "followpaths": self.values("followpaths"),
            "exclude_patterns": self.values("exclude-patterns"), "encoded_keys": self.encoded_keys,
            "stats_sent": len(self.stat_paths[self.sender]), "requests": self.requests,
            "requested_paths": self.requested_paths[:paths], "packets": self.packets,
            "data_bytes": self.data_bytes, "ended": self.ended, "grpc_status": self.grpc_status,
            **({"paths_truncated": True} if self.paths_truncated else {}),
            **({"undecoded_messages": self.undecoded_messages} if self.undecoded_messages else {}),
        }


@dataclass
class Connection:
    number: int
    request: str = ""  # first request line without the version: "POST /session"
    status: int | None = None
    session: bool = False  # a /session answered 101: decoded as HTTP/2
    error: str = ""  # why decoding stopped
    calls: dict[str, int] = field(default_factory=dict)  # gRPC method -> calls the daemon made
    frames: dict[str, dict[str, int]] = field(default_factory=lambda: {CLIENT: {}, DAEMON: {}})
    bytes: dict[str, int] = field(default_factory=lambda: {CLIENT: 0, DAEMON: 0})
    open: bool = True

    def as_dict(self) -> dict:
        return {"number": self.number, "request": self.request, "status": self.status, "session": self.session,
                "error": self.error, "calls": self.calls, "bytes": self.bytes}


@dataclass
class Recording:
    connections: list[Connection]
    transfers: list[Transfer]

    @property
    def sessions(self) -> list[Connection]:
        return [c for c in self.connections if c.session]

    def of_kind(self, kind: str) -> list[Transfer]:
        return [t for t in self.transfers if t.kind == kind]

    def requests(self, kind: str) -> int:
        return sum(t.requests for t in self.of_kind(kind))

    def requested_paths(self, kind: str) -> list[str]:
        return [p for t in self.of_kind(kind) for p in t.requested_paths]

    def request_counts(self) -> dict[str, int]:
        """REQs per kind of transfer, for the kinds seen (the export's are the client's REQs)."""
        counts: dict[str, int] = {}
        for t in self.transfers:
            counts[t.kind] = counts.get(t.kind, 0) + t.requests
        return counts

    def decode_errors(self) -> list[str]:
        return [f"connection {c.number} ({c.request}): {c.error}" for c in self.connections if c.error]

    def as_dict(self) -> dict:
        return {"request_counts": self.request_counts(),
                "connections": [c.as_dict() for c in self.connections],
                "transfers": [t.as_dict() for t in self.transfers]}


# -- decoding ----------------------------------------------------------------------------------------

def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise IndexError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def parse_packet(buf: bytes) -> tuple[int, bytes | None, bool, int, int | None]:
    """(type, stat bytes or None, stat complete, ID, data length) of an fsutil Packet, from as much of the
    message as was kept: fields are serialised in number order, so type (1), stat (2) and ID (3) precede data
    (4). Raises ValueError on bytes that are no Packet."""
    kind = packet_id = 0
    stat: bytes | None = None
    stat_complete = False
    data_length: int | None = None
    pos = 0
    try:
        while pos < len(buf):
            key, pos = _varint(buf, pos)
            number, wire = key >> 3, key & 7
            if wire == 0:
                value, pos = _varint(buf, pos)
                if number == 1:
                    kind = value
                elif number == 3:
                    packet_id = value
            elif wire == 2:
                length, pos = _varint(buf, pos)
                if number == 2:
                    stat = bytes(buf[pos:pos + length])
                    stat_complete = pos + length <= len(buf)
                elif number == 4:
                    data_length = length
                pos += length
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            else:
                raise ValueError(f"wire type {wire} in a Packet")
    except IndexError:
        pass  # the kept prefix ends inside a field: what came before it stands
    if kind not in PACKET_NAMES:
        raise ValueError(f"packet type {kind}")
    return kind, stat, stat_complete, packet_id, data_length


class _MessageSplitter:
    """One direction of a gRPC stream as (compressed, length, first `keep` bytes) per message."""

    def __init__(self, keep: int):
        self.keep = keep
        self.prefix = bytearray()  # the 5-byte message header being read
        self.remaining: int | None = None
        self.length = 0
        self.compressed = False
        self.kept = bytearray()

    def feed(self, data: bytes):
        view = memoryview(data)
        pos = 0
        while True:
            if self.remaining is None:
                take = min(5 - len(self.prefix), len(view) - pos)
                self.prefix += view[pos:pos + take]
                pos += take
                if len(self.prefix) < 5:
                    return
                self.compressed = bool(self.prefix[0] & 1)
                self.length = self.remaining = int.from_bytes(self.prefix[1:5], "big")
                self.prefix.clear()
                self.kept = bytearray()
            take = min(self.remaining, len(view) - pos)
            room = self.keep - len(self.kept)
            if room > 0:
                self.kept += view[pos:pos + min(take, room)]
            pos += take
            self.remaining -= take
            if self.remaining == 0:  # an empty message is complete with its header
                self.remaining = None
                yield self.compressed, self.length, bytes(self.kept)
            elif pos == len(view):
                return


class _Stream:
    def __init__(self, number: int, method: str, transfer: Transfer | None, keep: int):
        self.number = number
        self.method = method
        self.transfer = transfer
        self.splitters = {CLIENT: _MessageSplitter(keep), DAEMON: _MessageSplitter(keep)}
        self.encoding = {CLIENT: "identity", DAEMON: "identity"}
        self.closed = {CLIENT: False, DAEMON: False}


class _ConnectionDecoder:
    """Both directions of one tapped connection. Not thread-safe: the caller serialises feed()."""

    def __init__(self, record: Connection, limits: Limits, on_transfer):
        self.record = record
        self.limits = limits
        self.on_transfer = on_transfer
        self.phase = "request"  # -> "response" -> "h2" | "off"
        self.pending = {CLIENT: bytearray(), DAEMON: bytearray()}
        self.request_body = 0
        self.upgrading = False  # the first request is POST /session
        self.buffers = {CLIENT: bytearray(), DAEMON: bytearray()}
        self.preface_checked = {CLIENT: False, DAEMON: False}
        self.hpack = {}
        self.block: tuple[str, int, bool, bytearray] | None = None  # an open HEADERS + CONTINUATION block
        self.streams: dict[int, _Stream] = {}

    def feed(self, side: str, data: bytes) -> None:
        self.record.bytes[side] += len(data)
        if self.phase == "off":
            return
        try:
            if self.phase == "h2":
                self._feed_h2(side, data)
            else:
                self._feed_http1(side, data)
        except _StopDecoding as exc:
            self._stop(str(exc))
        except (HyperframeError, HPACKError, ValueError, IndexError, KeyError, zlib.error) as exc:
            self._stop(f"{type(exc).__name__}: {exc}")

    def _stop(self, why: str) -> None:
        if self.phase == "h2" or self.record.session:
            self.record.error = why
        self.phase = "off"
        self.pending = self.buffers = {CLIENT: bytearray(), DAEMON: bytearray()}
        self.streams.clear()

    # HTTP/1.1: the first request head, then its response head
    def _feed_http1(self, side: str, data: bytes) -> None:
        pending = self.pending[side]
        pending += data
        if self.phase == "request" and side == CLIENT:
            head = self._head(pending)
            if head is None:
                return
            lines = head.split(b"\r\n")
            method, _, rest = lines[0].decode("latin-1").partition(" ")
            target = rest.rsplit(" ", 1)[0]
            self.record.request = f"{method} {target}"
            self.upgrading = method == "POST" and bool(_SESSION_TARGET.fullmatch(target.split("?", 1)[0]))
            for line in lines[1:]:
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length" and value.strip().isdigit():
                    self.request_body = int(value.strip())
            del pending[:len(head) + 4]
            self.phase = "response"
            if self.pending[DAEMON]:
                self._feed_http1(DAEMON, b"")
        elif self.phase == "response" and side == DAEMON:
            head = self._head(pending)
            if head is None:
                return
            status_line = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            self.record.status = int(status_line[1]) if len(status_line) > 1 and status_line[1].isdigit() else None
            if not self.upgrading or self.record.status != 101:
                self._stop("")
                return
            self.record.session = True
            del pending[:len(head) + 4]
            client_bytes = self.pending[CLIENT][self.request_body:]
            self.phase = "h2"
            self.hpack = {s: self._new_hpack() for s in (CLIENT, DAEMON)}
            self._feed_h2(DAEMON, bytes(pending))
            self._feed_h2(CLIENT, bytes(client_bytes))
            self.pending = {CLIENT: bytearray(), DAEMON: bytearray()}
        elif len(pending) > self.limits.head_bytes:
            raise _StopDecoding(f"more than {self.limits.head_bytes} bytes before the HTTP/1.1 exchange ended")

    def _head(self, pending: bytearray) -> bytes | None:
        end = pending.find(b"\r\n\r\n")
        if end < 0:
            if len(pending) > self.limits.head_bytes:
                raise _StopDecoding(f"HTTP/1.1 head longer than {self.limits.head_bytes} bytes")
            return None
        return bytes(pending[:end])

    def _new_hpack(self) -> HpackDecoder:
        decoder = HpackDecoder(max_header_list_size=self.limits.header_block_bytes)
        decoder.max_allowed_table_size = self.limits.header_table_bytes
        return decoder

    # HTTP/2
    def _feed_h2(self, side: str, data: bytes) -> None:
        buf = self.buffers[side]
        buf += data
        if not self.preface_checked[side]:
            if len(buf) < len(_PREFACE) and _PREFACE.startswith(bytes(buf)):
                return
            if buf.startswith(_PREFACE):
                del buf[:len(_PREFACE)]
            self.preface_checked[side] = True
        pos = 0
        while len(buf) - pos >= 9:
            frame, length = h2frame.Frame.parse_frame_header(memoryview(bytes(buf[pos:pos + 9])))
            if len(buf) - pos - 9 < length:
                break
            frame.parse_body(memoryview(bytes(buf[pos + 9:pos + 9 + length])))
            pos += 9 + length
            self._on_frame(side, frame)
            if self.phase != "h2":
                return
        del buf[:pos]

    def _on_frame(self, side: str, frame) -> None:
        name = type(frame).__name__.removesuffix("Frame")
        counts = self.record.frames[side]
        counts[name] = counts.get(name, 0) + 1
        if self.block is not None and not isinstance(frame, h2frame.ContinuationFrame):
            raise _StopDecoding(f"{name} frame inside a header block")
        if isinstance(frame, h2frame.HeadersFrame):
            self.block = (side, frame.stream_id, "END_STREAM" in frame.flags, bytearray(frame.data))
            if "END_HEADERS" in frame.flags:
                self._end_block()
        elif isinstance(frame, h2frame.ContinuationFrame):
            if self.block is None or self.block[:2] != (side, frame.stream_id):
                raise _StopDecoding("CONTINUATION without its HEADERS")
            self.block[3].extend(frame.data)
            if len(self.block[3]) > self.limits.header_block_bytes:
                raise _StopDecoding(f"header block longer than {self.limits.header_block_bytes} bytes")
            if "END_HEADERS" in frame.flags:
                self._end_block()
        elif isinstance(frame, h2frame.DataFrame):
            stream = self.streams.get(frame.stream_id)
            if stream is not None:
                self._on_data(stream, side, bytes(frame.data))
                if "END_STREAM" in frame.flags:
                    self._ended(stream, side, "END_STREAM")
        elif isinstance(frame, h2frame.RstStreamFrame):
            stream = self.streams.get(frame.stream_id)
            if stream is not None:
                self._ended(stream, side, f"RST_STREAM({frame.error_code})", both=True)

    def _end_block(self) -> None:
        side, stream_id, end_stream, block = self.block
        self.block = None
        headers = [(k.decode("latin-1"), v.decode("utf-8", "replace"))
                   for k, v in self.hpack[side].decode(bytes(block), raw=True)]
        stream = self.streams.get(stream_id)
        if stream is None:
            if side != DAEMON:  # on a session only the daemon opens streams
                return
            if len(self.streams) >= self.limits.streams_per_connection:
                raise _StopDecoding(f"more than {self.limits.streams_per_connection} open streams")
            method = next((v for k, v in headers if k == ":path"), "")
            self.record.calls[method] = self.record.calls.get(method, 0) + 1
            transfer = None
            if method in (FILESYNC, FILESEND):
                transfer = Transfer(self.record.number, stream_id, method,
                                    [(k, v) for k, v in headers if not k.startswith(":")])
                self.on_transfer(transfer)
            stream = self.streams[stream_id] = _Stream(stream_id, method, transfer, self.limits.message_prefix_bytes)
        for key, value in headers:
            if key == "grpc-encoding":
                stream.encoding[side] = value
            elif key == "grpc-status" and stream.transfer is not None:
                stream.transfer.grpc_status = value
        if end_stream:
            self._ended(stream, side, "END_STREAM")

    def _on_data(self, stream: _Stream, side: str, data: bytes) -> None:
        for compressed, length, kept in stream.splitters[side].feed(data):
            if stream.transfer is None:
                continue
            if compressed:
                if stream.encoding[side] != "gzip":
                    raise _StopDecoding(f"a compressed message in encoding {stream.encoding[side]!r}")
                kept = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(kept, self.limits.message_prefix_bytes)
            self._on_packet(stream.transfer, side, kept, complete=len(kept) == length and not compressed)

    def _on_packet(self, transfer: Transfer, side: str, kept: bytes, complete: bool) -> None:
        try:
            kind, stat, stat_complete, packet_id, data_length = parse_packet(kept)
        except ValueError:
            transfer.undecoded_messages += 1
            return
        name = PACKET_NAMES[kind]
        counts = transfer.packets[side]
        counts[name] = counts.get(name, 0) + 1
        if name == "STAT":
            if stat is None:
                transfer.walk_ended[side] = True
                return
            paths = transfer.stat_paths[side]
            if len(paths) >= self.limits.paths_per_transfer:
                transfer.paths_truncated = True
                return
            # A path cut off with its message still keeps its place: REQ IDs count every STAT.
            paths.append(Stat.FromString(stat).path if stat_complete else "<stat beyond the kept prefix>")
        elif name == "REQ":
            if len(transfer.requested_ids[side]) < self.limits.paths_per_transfer:
                transfer.requested_ids[side].append(packet_id)
        elif name == "DATA":
            transfer.data_bytes[side] += data_length or 0

    def _ended(self, stream: _Stream, side: str, how: str, both: bool = False) -> None:
        if stream.transfer is not None:
            stream.transfer.ended.append(f"{side} {how}")
        for s in ((CLIENT, DAEMON) if both else (side,)):
            stream.closed[s] = True
        if all(stream.closed.values()):
            self.streams.pop(stream.number, None)


# -- the proxy ---------------------------------------------------------------------------------------

class WireTap:
    """A unix-socket proxy in front of a daemon's socket that records its sessions (see the module doc)."""

    def __init__(self, upstream: str, socket_path: str | None = None, *, limits: Limits = Limits()):
        self.upstream = upstream[len("unix://"):] if upstream.startswith("unix://") else upstream
        self.limits = limits
        self._own_dir = None
        if socket_path is None:
            self._own_dir = socket_dir("dsc-tap-")
            socket_path = os.path.join(self._own_dir, "tap.sock")
        self.socket_path = socket_path
        self._listener: socket.socket | None = None
        self._accepter: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._numbers = itertools.count(1)
        self._connections: list[Connection] = []
        self._transfers: list[Transfer] = []
        # number -> (client socket, daemon socket once connected, its thread)
        self._live: dict[int, tuple[socket.socket, socket.socket | None, threading.Thread]] = {}
        self.dropped_connections = 0

    @property
    def url(self) -> str:
        return "unix://" + self.socket_path

    def start(self) -> "WireTap":
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.socket_path)
            listener.listen(64)
            listener.settimeout(0.2)  # accept() polls the stop flag
        except BaseException:
            listener.close()
            self._remove_files()
            raise
        self._listener = listener
        self._accepter = threading.Thread(target=self._accept_loop, name="wiretap-accept", daemon=True)
        self._accepter.start()
        return self

    def __enter__(self) -> "WireTap":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, cut every live connection, join the threads, remove the socket. Idempotent."""
        self._stopping.set()
        if self._accepter is not None:
            self._accepter.join(timeout)
            self._accepter = None
        with self._lock:
            live = list(self._live.values())
        for downstream, upstream, _ in live:
            for sock in (downstream, upstream):
                try:
                    if sock is not None:
                        sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for _, _, thread in live:
            thread.join(timeout)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._remove_files()

    def _remove_files(self) -> None:
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)
            self._own_dir = None

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until no tapped connection is open (a finished client's sockets are closed)."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._live:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def take(self, wait: float = 10.0) -> Recording:
        """Everything recorded so far; finished connections (and their transfers) are forgotten."""
        self.wait_idle(wait)
        with self._lock:
            recording = Recording(list(self._connections), list(self._transfers))
            finished = {c.number for c in self._connections if not c.open}
            self._connections = [c for c in self._connections if c.open]
            self._transfers = [t for t in self._transfers if t.connection not in finished]
        return recording

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                downstream, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            downstream.settimeout(None)
            record = Connection(next(self._numbers))
            thread = threading.Thread(target=self._serve, args=(downstream, record), name="wiretap-conn",
                                      daemon=True)
            with self._lock:  # open from the moment it is accepted: wait_idle() waits for it
                self._live[record.number] = (downstream, None, thread)
            self._keep(record)
            thread.start()

    def _add_transfer(self, transfer: Transfer) -> None:
        with self._lock:
            self._transfers.append(transfer)

    def _serve(self, downstream: socket.socket, record: Connection) -> None:
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                upstream.connect(self.upstream)
            except OSError as exc:
                record.error = f"cannot reach the daemon at {self.upstream}: {exc}"
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                self._live[record.number] = (downstream, upstream, threading.current_thread())
            decoder = _ConnectionDecoder(record, self.limits, self._add_transfer)
            feed_lock = threading.Lock()
            back = threading.Thread(target=self._pump, args=(upstream, downstream, DAEMON, decoder, feed_lock),
                                    name="wiretap-pump", daemon=True)
            back.start()
            self._pump(downstream, upstream, CLIENT, decoder, feed_lock)
            back.join()
        finally:
            downstream.close()
            upstream.close()
            with self._idle:
                record.open = False
                self._live.pop(record.number, None)
                self._idle.notify_all()

    def _keep(self, record: Connection) -> None:
        with self._lock:
            if len(self._connections) >= self.limits.connections_kept:
                self.dropped_connections += 1
                return
            self._connections.append(record)

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, side: str, decoder: _ConnectionDecoder,
              feed_lock: threading.Lock) -> None:
        while True:
            try:
                data = source.recv(_RECV_CHUNK)
            except OSError:
                data = b""
            if not data:
                try:
                    sink.shutdown(socket.SHUT_WR)  # pass the half-close on
                except OSError:
                    pass
                return
            with feed_lock:
                decoder.feed(side, data)  # before forwarding: what the other side sees has been counted
            try:
                sink.sendall(data)
            except OSError:
                for sock in (source, sink):
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                return


# -- command line ------------------------------------------------------------------------------------

def _describe(transfer: Transfer) -> str:
    extra = f" followpaths={transfer.values('followpaths')}" if transfer.values("followpaths") else ""
    if transfer.values("exclude-patterns"):
        extra += f" excludes={len(transfer.values('exclude-patterns'))}"
    if transfer.encoded_keys:
        extra += f" encoded={transfer.encoded_keys}"
    return (f"connection {transfer.connection} stream {transfer.stream_id} {transfer.kind}: "
            f"{len(transfer.stat_paths[transfer.sender])} STAT, {transfer.requests} REQ{extra}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance.wiretap", description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="the daemon's socket (path or unix:// URL)")
    parser.add_argument("--listen", help="the socket to listen on (default: tap.sock in a new dsc-tap-* temporary directory)")
    parser.add_argument("--json", metavar="FILE", help="write the whole recording here on exit")
    args = parser.parse_args(argv)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: stop.set())
    with WireTap(args.upstream, args.listen) as tap:
        print(f"DOCKER_HOST={tap.url}", flush=True)
        taken: list[Recording] = []
        while not stop.wait(0.5):
            recording = tap.take(wait=0)
            done = [t for t in recording.transfers if not any(c.open for c in recording.connections
                                                               if c.number == t.connection)]
            for transfer in done:
                print(_describe(transfer), flush=True)
            taken.append(Recording([c for c in recording.connections if not c.open], done))
        taken.append(tap.take(wait=2.0))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"connections": [c.as_dict() for r in taken for c in r.connections],
                       "transfers": [t.as_dict() for r in taken for t in r.transfers]}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
