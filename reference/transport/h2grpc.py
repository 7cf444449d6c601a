"""gRPC over HTTP/2 on an already connected socket, built on the ``h2`` package.

Both roles of the inverted session connection: ``serve_h2`` (build client =
HTTP/2 server) and ``connect_h2`` (daemon = HTTP/2 client). One reader thread
per connection owns socket reads and all h2 event handling; h2 state is guarded
by one lock; socket writes go through a second lock, so a thread blocked in
``sendall`` never stops the reader from acknowledging data or answering PINGs.
Output produced by the reader thread is written by a small writer thread.

Flow control: the connection window is credited as soon as DATA arrives, so a
consumer that stalls one stream never starves the others (the daemon's health
checks); a stream window is credited as its messages are consumed, unless
little is queued, which keeps memory bounded without deadlocking on messages
larger than the window.

This module must not import grpc.
"""

from __future__ import annotations

import base64
import binascii
import collections
import socket
import struct
import threading
import time
from collections.abc import Iterable

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from .base import (
    ClientConnection,
    Handler,
    Metadata,
    RpcError,
    RpcStream,
    ServerConnection,
    StatusCode,
    decode_grpc_message,
    encode_grpc_message,
    status_of_exception,
)

USER_AGENT = "docker-session-conformance-h2grpc/0.1"

# Our receive side: large windows so a fast sender is never throttled by
# round trips, and large frames so h2's per-frame cost stays small.
STREAM_WINDOW = 4 << 20
CONNECTION_WINDOW = 16 << 20
MAX_INBOUND_FRAME = 1 << 20
MAX_CONCURRENT_STREAMS = 1000
MAX_HEADER_LIST = 1 << 20
STREAM_CREDIT_BATCH = STREAM_WINDOW // 8
CONNECTION_CREDIT_BATCH = CONNECTION_WINDOW // 16
# Above this many bytes of complete, unconsumed messages a stream's window is
# only credited as the application reads.
STREAM_BACKLOG_LIMIT = STREAM_WINDOW
READ_SIZE = 256 << 10
# ``send`` buffers up to this much before writing.
SEND_BUFFER_LIMIT = 64 << 10
# ``send_many`` hands over data in pieces of about this size.
SEND_MANY_CHUNK = 1 << 20
# Largest message we accept, as grpc-go's default on both sides (MaxRecvMsgSize):
# a larger one fails its call at its 5-byte prefix, before any of it is buffered.
MAX_RECEIVE_MESSAGE = 4 << 20
HANDLER_JOIN_TIMEOUT = 5.0
CLOSE_GRACE = 1.0  # for handlers still running when the server is closed


def _data_frame_body_repr(frame) -> str:
    return f"data=<{len(frame.data)} bytes>"


def _describe_data_frames_by_length() -> None:
    """Give hyperframe's DataFrame a ``_body_repr`` that names the payload's length.

    h2 4.x formats ``repr(frame)`` for a disabled trace log on every frame it
    receives. Every other hyperframe frame class describes its own body;
    DataFrame falls back to copying its whole payload and hex-encoding it.
    With one small DATA frame per listed file (grpc-go's way), that was about
    a seventh of the reader thread's time.
    """
    import hyperframe.frame

    hyperframe.frame.DataFrame._body_repr = _data_frame_body_repr


_describe_data_frames_by_length()

_PREFIX = struct.Struct(">BI")
_pack_prefix = _PREFIX.pack
_unpack_prefix = _PREFIX.unpack_from

# Request headers that belong to the transport, not to the call's metadata
# (grpcio hides the same ones; it keeps user-agent).
_TRANSPORT_HEADERS = frozenset({
    "content-type", "te", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding",
})

# RST_STREAM error code -> status, as grpc-go maps them.
_RESET_STATUS = {
    h2.errors.ErrorCodes.NO_ERROR: StatusCode.INTERNAL,
    h2.errors.ErrorCodes.CANCEL: StatusCode.CANCELLED,
    h2.errors.ErrorCodes.REFUSED_STREAM: StatusCode.UNAVAILABLE,
    h2.errors.ErrorCodes.ENHANCE_YOUR_CALM: StatusCode.RESOURCE_EXHAUSTED,
    h2.errors.ErrorCodes.INADEQUATE_SECURITY: StatusCode.PERMISSION_DENIED,
}

# HTTP status of a non-gRPC response -> status (gRPC's http-grpc-status-mapping).
_HTTP_STATUS = {
    400: StatusCode.INTERNAL, 401: StatusCode.UNAUTHENTICATED, 403: StatusCode.PERMISSION_DENIED,
    404: StatusCode.UNIMPLEMENTED, 429: StatusCode.UNAVAILABLE, 502: StatusCode.UNAVAILABLE,
    503: StatusCode.UNAVAILABLE, 504: StatusCode.UNAVAILABLE,
}


def _encode_value(value: str | bytes) -> bytes:
    # surrogateescape lets raw bytes received from a peer travel back unchanged.
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")


def _decode_value(value: bytes) -> str:
    # dockerd 20.10 sends non-ASCII metadata (followpaths) as raw UTF-8.
    return value.decode("utf-8", "surrogateescape")


def _decode_headers(headers) -> list[tuple[str, str]]:
    return [(name.decode("ascii", "surrogateescape"), _decode_value(value)) for name, value in headers]


def _encode_metadata_value(key: str, value: str | bytes) -> bytes:
    raw = _encode_value(value)
    if key.endswith("-bin"):  # binary metadata travels as unpadded base64
        return base64.b64encode(raw).rstrip(b"=")
    return raw


def _decode_metadata_value(key: str, value: str) -> str:
    # Binary metadata is shown decoded, as grpcio's server shows it.
    if key.endswith("-bin"):
        try:
            raw = base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
        except (binascii.Error, ValueError):
            return value
        return _decode_value(raw)
    return value


def format_grpc_timeout(seconds: float) -> str:
    """``grpc-timeout`` value: at most 8 digits, the finest unit that fits."""
    micros = max(0, int(seconds * 1_000_000))
    for unit, scale in (("u", 1), ("m", 1_000), ("S", 1_000_000), ("M", 60_000_000), ("H", 3_600_000_000)):
        value = -(-micros // scale)
        if value < 100_000_000:
            return f"{value}{unit}"
    return "99999999H"


class _Stream(RpcStream):
    """State shared by both roles: inbound message parsing and buffered sends."""

    def __init__(self, conn: _Connection, stream_id: int, method: str, metadata: list[tuple[str, str]]):
        self._conn = conn
        self.stream_id = stream_id
        self.method = method
        self.metadata = metadata
        # Inbound: the reader thread appends whole messages; one consumer pops.
        self._inbox: collections.deque[bytes] = collections.deque()
        self._inbox_cond = threading.Condition(threading.Lock())
        # Messages parsed from one read, handed to the inbox together (guarded by conn._lock).
        self._arrived: list[bytes] = []
        self._partial: list[bytes] = []
        self._partial_len = 0
        self._partial_need = 0  # bytes of prefix + payload of the message being assembled
        self._max_message = conn.max_receive_message if conn is not None else MAX_RECEIVE_MESSAGE
        # Single-writer counters: backlog = queued - consumed.
        self._queued_bytes = 0
        self._consumed_bytes = 0
        self._uncredited = 0  # guarded by conn._lock
        # (code, details) once nothing more will arrive; guarded by _inbox_cond.
        self._end: tuple[StatusCode, str] | None = None
        self._remote_closed = False  # guarded by conn._lock
        self._local_closed = False  # guarded by conn._lock
        # Set once sending is pointless or wrong; checked cheaply by send().
        self._send_error: RpcError | None = None
        # Outbound buffer, guarded by _send_mutex (held across flow-control waits).
        self._send_mutex = threading.Lock()
        self._pending: list[bytes] = []
        self._pending_bytes = 0

    # -- inbound (reader thread, conn._lock held) -------------------------

    def _parse(self, data: bytes) -> None:
        """Split DATA payload into messages for ``_arrived``; keeps a partial tail for later."""
        size = len(data)
        if not self._partial and size >= 5:
            # the usual case: a DATA frame holding exactly one message
            flag, length = _unpack_prefix(data, 0)
            if size == 5 + length and not flag and length <= self._max_message:
                self._arrived.append(data[5:])
                self._queued_bytes += size
                return
        if self._partial:
            self._partial.append(data)
            self._partial_len += size
            if self._partial_len < 5:
                return
            if not self._partial_need:
                head = b"".join(self._partial)
                self._partial = [head]
                flag, length = _unpack_prefix(head, 0)
                self._check_size(length)
                self._partial_need = 5 + length
            if self._partial_len < self._partial_need:
                return
            data = b"".join(self._partial)
            size = len(data)
            self._partial = []
            self._partial_len = self._partial_need = 0
        arrived = self._arrived
        pos = 0
        while size - pos >= 5:
            flag, length = _unpack_prefix(data, pos)
            if flag:
                raise _CompressedMessage()
            self._check_size(length)
            end = pos + 5 + length
            if end > size:
                break
            arrived.append(data[pos + 5:end])
            self._queued_bytes += 5 + length
            pos = end
        if pos < size:
            tail = data[pos:]
            self._partial = [tail]
            self._partial_len = len(tail)
            if len(tail) >= 5:
                length = _unpack_prefix(tail, 0)[1]
                self._check_size(length)
                self._partial_need = 5 + length

    def _check_size(self, length: int) -> None:
        if length > self._max_message:
            self._partial, self._partial_len, self._partial_need = [], 0, 0
            raise _MessageTooLarge(length, self._max_message)

    def _deliver(self) -> None:
        """Hand the messages parsed so far to the consumer: one wake-up per read, not per frame."""
        if self._arrived:
            with self._inbox_cond:
                self._inbox.extend(self._arrived)
                self._inbox_cond.notify()
            self._arrived = []

    def _set_end(self, code: StatusCode, details: str) -> None:
        self._deliver()  # what arrived before the end is still delivered
        with self._inbox_cond:
            if self._end is None:
                self._end = (code, details)
            self._inbox_cond.notify_all()

    # -- inbound (consumer) ------------------------------------------------

    def recv(self, timeout: float | None = None) -> bytes | None:
        try:
            message = self._inbox.popleft()
        except IndexError:
            # About to wait: what we buffered may be what the peer waits for.
            if self._pending:
                self._flush_for_recv()
            message = self._wait_message(timeout)
            if message is None:
                return None
        self._consumed_bytes += 5 + len(message)
        if (self._uncredited >= STREAM_CREDIT_BATCH
                and self._queued_bytes - self._consumed_bytes < STREAM_BACKLOG_LIMIT):
            self._conn._credit_stream(self)
        return message

    def _wait_message(self, timeout: float | None) -> bytes | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._inbox_cond:
            while True:
                # Messages that arrived before a cancellation are still delivered
                # (the daemon's FIN is often followed at once by RST_STREAM).
                if self._inbox:
                    return self._inbox.popleft()
                self._check_aborted()
                if self._end is not None:
                    code, details = self._end
                    if code == StatusCode.OK:
                        return None
                    raise RpcError(code, details)
                if deadline is None:
                    self._inbox_cond.wait()
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError(f"no message on {self.method} within {timeout} s")
                    self._inbox_cond.wait(remaining)

    def _check_aborted(self) -> None:
        """Server role raises here once the peer cancelled."""

    # -- outbound ----------------------------------------------------------

    def send(self, message: bytes) -> None:
        if self._send_error is not None:
            raise self._send_error
        size = len(message)
        with self._send_mutex:
            if size < 4096:
                self._pending.append(_pack_prefix(0, size) + message)
            else:
                self._pending.append(_pack_prefix(0, size))
                self._pending.append(message)
            self._pending_bytes += size + 5
            if self._pending_bytes >= SEND_BUFFER_LIMIT:
                self._flush_locked(False)

    def send_many(self, messages: Iterable[bytes]) -> None:
        if self._send_error is not None:
            raise self._send_error
        parts: list[bytes] = []
        append = parts.append
        pack = _pack_prefix
        total = 0
        for message in messages:
            size = len(message)
            if size < 4096:
                append(pack(0, size) + message)
            else:
                append(pack(0, size))
                append(message)
            total += size + 5
            if total >= SEND_MANY_CHUNK:
                self._send_parts(parts, total, flush=True)
                parts = []
                append = parts.append
                total = 0
        self._send_parts(parts, total, flush=True)

    def _send_parts(self, parts: list[bytes], total: int, flush: bool) -> None:
        with self._send_mutex:
            self._pending.extend(parts)
            self._pending_bytes += total
            if flush:
                self._flush_locked(False)

    def flush(self) -> None:
        with self._send_mutex:
            self._flush_locked(False)

    def _flush_locked(self, end_stream: bool) -> None:
        parts = self._pending
        if not parts and not end_stream:
            return
        self._pending = []
        self._pending_bytes = 0
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self._conn._send_data(self, data, end_stream)

    def _flush_for_recv(self) -> None:
        # Never wait for a concurrent sender here: it may itself be waiting for
        # window that only our reading can give back to the peer.
        if self._send_mutex.acquire(blocking=False):
            try:
                self._flush_locked(False)
            finally:
                self._send_mutex.release()

    # -- role specifics, called with conn._lock held ------------------------

    def _send_blocker(self) -> RpcError | bool | None:
        """Why data cannot be sent now: an error to raise, True to drop it, or None."""
        raise NotImplementedError

    def _prepare_send(self) -> None:
        """Emit whatever must precede the first DATA frame (server: headers)."""

    def _on_connection_lost(self, reason: str) -> None:
        raise NotImplementedError


class _CompressedMessage(Exception):
    """A message with the compressed flag: we never negotiate compression."""


class _MessageTooLarge(Exception):
    def __init__(self, length: int, limit: int):
        # grpc-go's wording, so a peer's logs read the same whichever stack refused
        super().__init__(f"grpc: received message larger than max ({length} vs. {limit})")


class _ServerStream(_Stream):
    def __init__(self, conn, stream_id, method, metadata):
        super().__init__(conn, stream_id, method, metadata)
        self._headers_sent = False
        self._finished = False
        self._aborted: RpcError | None = None

    def _check_aborted(self) -> None:
        if self._aborted is not None:
            raise self._aborted

    def _abort(self, code: StatusCode, details: str) -> None:
        # Deliver first: a handler that sees the abort must already have every message
        # that arrived before it (the daemon's last FIN often shares a read with its reset).
        self._deliver()
        self._aborted = self._send_error = RpcError(code, details)
        self._set_end(code, details)

    def _send_blocker(self):
        if self._aborted is not None:
            return self._aborted
        if self._finished or self._local_closed:
            return RpcError(StatusCode.INTERNAL, "send after the call finished")
        return None

    def _prepare_send(self) -> None:
        if not self._headers_sent:
            self._headers_sent = True
            self._conn._h2.send_headers(self.stream_id, [
                (b":status", b"200"), (b"content-type", b"application/grpc"),
            ])

    def close_send(self) -> None:
        self.flush()

    def cancel(self) -> None:
        pass

    def _on_connection_lost(self, reason: str) -> None:
        self._abort(StatusCode.CANCELLED, f"connection lost: {reason}")


class _ClientStream(_Stream):
    def __init__(self, conn, stream_id, method, metadata):
        super().__init__(conn, stream_id, method, metadata)
        self._response_headers: list[tuple[str, str]] | None = None
        self._trailers: list[tuple[str, str]] | None = None
        self._status: tuple[StatusCode, str] | None = None  # guarded by conn._lock

    def _send_blocker(self):
        if self._status is not None:
            code, details = self._status
            return True if code == StatusCode.OK else RpcError(code, details)
        if self._local_closed:
            return RpcError(StatusCode.INTERNAL, "send after close_send")
        return None

    def close_send(self) -> None:
        with self._send_mutex:
            if not self._local_closed:
                self._flush_locked(True)

    def cancel(self) -> None:
        self._conn._cancel_client_stream(self, StatusCode.CANCELLED, "cancelled by the client")

    def _finish(self, code: StatusCode, details: str) -> None:
        """Record the final status (conn._lock held)."""
        if self._status is None:
            self._status = (code, details)
            self._set_end(code, details)

    def _on_connection_lost(self, reason: str) -> None:
        self._finish(StatusCode.UNAVAILABLE, f"connection lost: {reason}")


class _Connection:
    """One HTTP/2 connection on a socket; subclasses pick the role."""

    client_side: bool

    def __init__(self, sock: socket.socket, initial_bytes: bytes,
                 max_receive_message: int = MAX_RECEIVE_MESSAGE) -> None:
        sock.setblocking(True)
        self._sock = sock
        self.max_receive_message = max_receive_message
        config = h2.config.H2Configuration(client_side=self.client_side, header_encoding=None)
        self._h2 = h2.connection.H2Connection(config=config)
        self._lock = threading.Lock()
        self._window_cond = threading.Condition(self._lock)
        self._send_lock = threading.Lock()
        self._out: collections.deque[bytes] = collections.deque()
        self._out_ready = threading.Event()
        self._streams: dict[int, _Stream] = {}
        # streams that got DATA in the read being handled, in arrival order (reader thread only)
        self._fed_streams: dict[_Stream, None] = {}
        self._conn_uncredited = 0
        self._dead: str | None = None
        self._goaway_received = False
        self.closed = threading.Event()
        # set at the peer's first SETTINGS, or when the connection ends without it
        self._peer_spoke = threading.Event()
        self._peer_settings_seen = False

        settings = {
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_INBOUND_FRAME,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
        }
        if self.client_side:
            settings[h2.settings.SettingCodes.ENABLE_PUSH] = 0
        self._h2.initiate_connection()
        self._h2.update_settings(settings)
        # Accept large header blocks (long exclude-patterns) even before the
        # peer has acknowledged the setting.
        self._h2.decoder.max_header_list_size = MAX_HEADER_LIST
        # Likewise large frames: h2 raises its frame-size limit only at the start
        # of the receive_data() call after the peer's SETTINGS ACK, so an ACK and
        # a large DATA frame that arrive in one read would be refused as overlong.
        self._h2.max_inbound_frame_size = MAX_INBOUND_FRAME
        self._h2.incoming_buffer.max_frame_size = MAX_INBOUND_FRAME
        self._h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self._out.append(self._h2.data_to_send())

        role = "client" if self.client_side else "server"
        self._writer = threading.Thread(target=self._writer_loop, name=f"h2grpc-{role}-writer", daemon=True)
        self._reader = threading.Thread(target=self._reader_loop, args=(initial_bytes,),
                                        name=f"h2grpc-{role}-reader", daemon=True)
        self._writer.start()
        self._out_ready.set()
        self._reader.start()

    # -- output ----------------------------------------------------------

    def _flush_out(self) -> None:
        """Write queued output in order (callers must not hold ``_lock``)."""
        with self._send_lock:
            self._flush_out_locked()

    def _flush_out_locked(self) -> None:
        out = self._out
        while out:
            chunks = []
            try:
                while True:
                    chunks.append(out.popleft())
            except IndexError:
                pass
            data = b"".join(chunks)
            if not data:
                continue
            try:
                self._sock.sendall(data)
            except OSError as exc:
                out.clear()
                self._connection_lost(f"write failed: {exc}")
                return

    def _writer_loop(self) -> None:
        while True:
            self._out_ready.wait()
            self._out_ready.clear()
            if self._dead is not None:
                return
            self._flush_out()

    # -- input -------------------------------------------------------------

    def _reader_loop(self, initial_bytes: bytes) -> None:
        reason = "connection closed by peer"
        try:
            if initial_bytes:
                self._receive(initial_bytes)
            recv = self._sock.recv
            while self._dead is None:
                data = recv(READ_SIZE)
                if not data:
                    break
                self._receive(data)
        except h2.exceptions.ProtocolError as exc:
            reason = f"HTTP/2 protocol error: {exc}"
            self._flush_out()  # h2 queued a GOAWAY
        except OSError as exc:
            reason = f"read failed: {exc}"
        except Exception as exc:  # a bug here must still release every waiter
            reason = f"internal error: {exc!r}"
        finally:
            self._connection_lost(reason)
            self._out_ready.set()
            self._writer.join()
            try:
                self._sock.close()
            except OSError:
                pass
            self._peer_spoke.set()
            self.closed.set()

    def _receive(self, data: bytes) -> None:
        started: list = []
        with self._lock:
            events = self._h2.receive_data(data)
            fed = self._fed_streams
            for event in events:
                self._dispatch(event, started)
            if fed:
                for stream in fed:
                    self._after_data(stream)
                fed.clear()
            if self._conn_uncredited >= CONNECTION_CREDIT_BATCH:
                self._h2.increment_flow_control_window(self._conn_uncredited)
                self._conn_uncredited = 0
            out = self._h2.data_to_send()
            if out:
                self._out.append(out)
        if out:
            self._out_ready.set()
        for thread in started:
            thread.start()

    def _dispatch(self, event, started: list) -> None:
        kind = type(event)
        if kind is h2.events.DataReceived:
            self._on_data(event)
        elif kind is h2.events.WindowUpdated:
            self._window_cond.notify_all()
        elif kind is h2.events.RemoteSettingsChanged:
            self._window_cond.notify_all()
            if not self._peer_settings_seen:
                self._peer_settings_seen = True
                self._peer_spoke.set()
        elif kind is h2.events.StreamEnded:
            self._on_stream_ended(event.stream_id)
        elif kind is h2.events.StreamReset:
            self._on_stream_reset(event)
        elif kind is h2.events.ConnectionTerminated:
            self._goaway_received = True
            self._on_goaway(event)
        else:
            self._on_other(event, started)

    def _on_data(self, event: h2.events.DataReceived) -> None:
        self._conn_uncredited += event.flow_controlled_length
        stream = self._streams.get(event.stream_id)
        if stream is None:
            return
        stream._uncredited += event.flow_controlled_length
        try:
            stream._parse(event.data)
        except _CompressedMessage:
            self._stream_protocol_error(stream, "compressed message, but no grpc-encoding was negotiated")
            return
        except _MessageTooLarge as exc:
            stream._deliver()  # the messages before it still count
            self._stream_protocol_error(stream, str(exc), StatusCode.RESOURCE_EXHAUSTED)
            return
        self._fed_streams[stream] = None

    def _after_data(self, stream: _Stream) -> None:
        """Once per read and stream: deliver its messages, credit its window."""
        stream._deliver()
        if (stream._uncredited >= STREAM_CREDIT_BATCH
                and stream._queued_bytes - stream._consumed_bytes < STREAM_BACKLOG_LIMIT):
            self._credit_stream_locked(stream)

    def _credit_stream_locked(self, stream: _Stream) -> None:
        amount = stream._uncredited
        if not amount or stream._remote_closed or self._dead is not None:
            return
        stream._uncredited = 0
        try:
            self._h2.increment_flow_control_window(amount, stream_id=stream.stream_id)
        except (h2.exceptions.StreamClosedError, KeyError):
            pass

    def _credit_stream(self, stream: _Stream) -> None:
        """Called by a consumer: return window for what it has read."""
        with self._lock:
            if stream._queued_bytes - stream._consumed_bytes >= STREAM_BACKLOG_LIMIT:
                return
            self._credit_stream_locked(stream)
            out = self._h2.data_to_send()
            if out:
                self._out.append(out)
        if out:
            self._out_ready.set()

    # -- sending DATA ------------------------------------------------------

    def _send_data(self, stream: _Stream, data: bytes, end_stream: bool) -> None:
        view = memoryview(data)
        total = len(view)
        pos = 0
        h2conn = self._h2
        stream_id = stream.stream_id
        while True:
            with self._lock:
                while True:
                    blocker = self._blocker(stream)
                    if blocker is True:
                        return
                    if blocker is not None:
                        raise blocker
                    try:
                        stream._prepare_send()
                        window = h2conn.local_flow_control_window(stream_id)
                    except h2.exceptions.StreamClosedError:
                        raise RpcError(StatusCode.CANCELLED, "the stream is closed") from None
                    if window > 0 or pos >= total:
                        break
                    self._window_cond.wait()
                max_frame = h2conn.max_outbound_frame_size
                try:
                    while pos < total and window > 0:
                        size = min(window, max_frame, total - pos)
                        last = end_stream and pos + size == total
                        h2conn.send_data(stream_id, view[pos:pos + size], end_stream=last)
                        pos += size
                        window -= size
                        if last:
                            stream._local_closed = True
                    if pos >= total and end_stream and not stream._local_closed:
                        h2conn.end_stream(stream_id)
                        stream._local_closed = True
                except h2.exceptions.StreamClosedError:
                    self._out.append(h2conn.data_to_send())
                    raise RpcError(StatusCode.CANCELLED, "the stream is closed") from None
                if end_stream:
                    stream._send_error = RpcError(StatusCode.INTERNAL, "send after close_send")
                self._out.append(h2conn.data_to_send())
            self._flush_out()
            if pos >= total:
                return

    def _blocker(self, stream: _Stream):
        if self._dead is not None:
            blocker = stream._send_blocker()
            if blocker is not None:
                return blocker
            return RpcError(StatusCode.UNAVAILABLE, f"connection lost: {self._dead}")
        return stream._send_blocker()

    # -- teardown ----------------------------------------------------------

    def _connection_lost(self, reason: str) -> None:
        with self._lock:
            if self._dead is not None:
                return
            self._dead = reason
            streams = list(self._streams.values())
            self._streams.clear()
            for stream in streams:
                stream._on_connection_lost(reason)
            self._window_cond.notify_all()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._out_ready.set()

    def _shutdown(self) -> None:
        """Say GOAWAY, then end the connection and wait for our threads."""
        with self._lock:
            if self._dead is None:
                try:
                    self._h2.close_connection()
                    self._out.append(self._h2.data_to_send())
                except h2.exceptions.ProtocolError:
                    pass
        # A sender stuck in sendall (peer not reading) must not block close.
        if self._dead is None and self._send_lock.acquire(timeout=1.0):
            try:
                self._flush_out_locked()
            finally:
                self._send_lock.release()
        self._connection_lost("closed locally")
        if threading.current_thread() is not self._reader:
            self._reader.join()

    def _reset_quietly(self, stream_id: int, error_code) -> None:
        """RST_STREAM unless h2 already considers the stream closed."""
        try:
            self._h2.reset_stream(stream_id, error_code)
        except h2.exceptions.StreamClosedError:
            pass

    # role hooks
    def _on_stream_ended(self, stream_id: int) -> None: ...
    def _on_stream_reset(self, event) -> None: ...
    def _on_goaway(self, event) -> None: ...
    def _on_other(self, event, started: list) -> None: ...
    def _stream_protocol_error(self, stream: _Stream, details: str,
                               code: StatusCode = StatusCode.INTERNAL) -> None: ...


class H2ServerConnection(_Connection, ServerConnection):
    """The build client's side: answers the daemon's calls with ``handlers``."""

    client_side = False

    def __init__(self, sock: socket.socket, handlers: dict[str, Handler], initial_bytes: bytes = b"",
                 max_receive_message: int = MAX_RECEIVE_MESSAGE):
        self._handlers = dict(handlers)
        self._handler_threads: set[threading.Thread] = set()
        self._threads_lock = threading.Lock()
        super().__init__(sock, initial_bytes, max_receive_message)

    def _on_other(self, event, started: list) -> None:
        if type(event) is h2.events.RequestReceived:
            self._on_request(event, started)

    def _on_request(self, event: h2.events.RequestReceived, started: list) -> None:
        stream_id = event.stream_id
        headers = _decode_headers(event.headers)
        path = next((value for name, value in headers if name == ":path"), "")
        metadata = [(name, _decode_metadata_value(name, value)) for name, value in headers
                    if not name.startswith(":") and name not in _TRANSPORT_HEADERS]
        handler = self._handlers.get(path)
        remote_closed = event.stream_ended is not None
        if handler is None:
            self._send_trailers_only(stream_id, StatusCode.UNIMPLEMENTED,
                                     f"method {path} not implemented", remote_closed)
            return
        stream = _ServerStream(self, stream_id, path, metadata)
        self._streams[stream_id] = stream
        thread = threading.Thread(target=self._run_handler, args=(stream, handler),
                                  name=f"h2grpc-handler-{stream_id}", daemon=True)
        with self._threads_lock:
            self._handler_threads.add(thread)
        started.append(thread)

    def _send_trailers_only(self, stream_id: int, code: StatusCode, details: str, remote_closed: bool) -> None:
        headers = [(b":status", b"200"), (b"content-type", b"application/grpc"),
                   (b"grpc-status", str(int(code)).encode())]
        if details:
            headers.append((b"grpc-message", encode_grpc_message(details).encode()))
        self._h2.send_headers(stream_id, headers, end_stream=True)
        if not remote_closed:
            # The peer may still be sending: tell it to stop (as grpc-go does).
            self._reset_quietly(stream_id, h2.errors.ErrorCodes.NO_ERROR)

    def _run_handler(self, stream: _ServerStream, handler: Handler) -> None:
        try:
            try:
                handler(stream)
                code, details = StatusCode.OK, ""
            except Exception as exc:
                code, details = status_of_exception(exc)
            self._finish_stream(stream, code, details)
        finally:
            with self._threads_lock:
                self._handler_threads.discard(threading.current_thread())

    def _finish_stream(self, stream: _ServerStream, code: StatusCode, details: str) -> None:
        with stream._send_mutex:
            try:
                stream._flush_locked(False)
            except RpcError:
                pass  # cancelled or connection gone: nobody to tell
            with self._lock:
                if stream._aborted is not None or self._dead is not None or stream._finished:
                    self._streams.pop(stream.stream_id, None)
                    return
                stream._finished = True
                stream._local_closed = True
                stream._send_error = RpcError(StatusCode.INTERNAL, "send after the call finished")
                self._streams.pop(stream.stream_id, None)
                try:
                    if stream._headers_sent:
                        trailers = [(b"grpc-status", str(int(code)).encode())]
                        if details:
                            trailers.append((b"grpc-message", encode_grpc_message(details).encode()))
                        self._h2.send_headers(stream.stream_id, trailers, end_stream=True)
                        if not stream._remote_closed:
                            self._reset_quietly(stream.stream_id, h2.errors.ErrorCodes.NO_ERROR)
                    else:
                        self._send_trailers_only(stream.stream_id, code, details, stream._remote_closed)
                except h2.exceptions.StreamClosedError:
                    return
                except h2.exceptions.ProtocolError:
                    if self._h2.state_machine.state is not h2.connection.ConnectionState.CLOSED:
                        raise
                    return  # the peer sent GOAWAY: the session is ending, nobody to tell
                self._out.append(self._h2.data_to_send())
            self._flush_out()

    def _on_stream_ended(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream._remote_closed = True
            stream._set_end(StatusCode.OK, "")

    def _on_stream_reset(self, event) -> None:
        stream = self._streams.pop(event.stream_id, None)
        if stream is not None:
            stream._remote_closed = True
            stream._abort(StatusCode.CANCELLED, f"cancelled by the peer (RST_STREAM {event.error_code!s})")
            self._window_cond.notify_all()

    def _stream_protocol_error(self, stream, details, code=StatusCode.INTERNAL) -> None:
        self._streams.pop(stream.stream_id, None)
        stream._abort(code, details)
        stream._finished = True
        if not stream._headers_sent:
            self._send_trailers_only(stream.stream_id, code, details, stream._remote_closed)
        elif code == StatusCode.RESOURCE_EXHAUSTED:  # a status for the peer, as grpc-go's server sends
            trailers = [(b"grpc-status", str(int(code)).encode()),
                        (b"grpc-message", encode_grpc_message(details).encode())]
            try:
                self._h2.send_headers(stream.stream_id, trailers, end_stream=True)
            except h2.exceptions.StreamClosedError:
                return
            self._reset_quietly(stream.stream_id, h2.errors.ErrorCodes.NO_ERROR)
        else:
            self._reset_quietly(stream.stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)

    def close(self) -> None:
        # A handler may still be finishing its exchange when the build is answered (an export
        # waits for the daemon's last FIN, which travels on this connection, not with the
        # answer): it gets a moment before the connection goes.
        self._join_handlers(CLOSE_GRACE)
        self._shutdown()
        self._join_handlers(HANDLER_JOIN_TIMEOUT)

    def _join_handlers(self, timeout: float) -> None:
        with self._threads_lock:
            threads = list(self._handler_threads)
        deadline = time.monotonic() + timeout
        for thread in threads:
            # A handler thread is registered before the reader starts it (after the frames of one read
            # are dispatched): one not started yet has nothing to wait for.
            if thread is not threading.current_thread() and thread.ident is not None:
                thread.join(max(0.0, deadline - time.monotonic()))


class H2ClientConnection(_Connection, ClientConnection):
    """The daemon's side: opens calls on the client's gRPC server."""

    client_side = True

    def wait_peer_ready(self, timeout: float | None = None) -> bool:
        self._peer_spoke.wait(timeout)
        return self._peer_settings_seen

    def open_stream(self, method: str, metadata: Metadata = (), *, timeout: float | None = None) -> _ClientStream:
        headers = [
            (b":method", b"POST"), (b":scheme", b"http"), (b":path", _encode_value(method)),
            (b":authority", b"localhost"), (b"content-type", b"application/grpc"),
            (b"user-agent", USER_AGENT.encode()), (b"te", b"trailers"),
        ]
        if timeout is not None:
            headers.append((b"grpc-timeout", format_grpc_timeout(timeout).encode()))
        metadata = [(key.lower(), value) for key, value in metadata]
        headers.extend((key.encode("ascii"), _encode_metadata_value(key, value)) for key, value in metadata)
        with self._lock:
            while True:
                if self._dead is not None:
                    raise RpcError(StatusCode.UNAVAILABLE, f"connection lost: {self._dead}")
                if self._goaway_received:
                    raise RpcError(StatusCode.UNAVAILABLE, "the server sent GOAWAY")
                if self._h2.open_outbound_streams < self._h2.remote_settings.max_concurrent_streams:
                    break
                self._window_cond.wait()
            stream_id = self._h2.get_next_available_stream_id()
            self._h2.send_headers(stream_id, headers)
            stream = _ClientStream(self, stream_id, method, metadata)
            self._streams[stream_id] = stream
            self._out.append(self._h2.data_to_send())
        self._flush_out()
        return stream

    def unary(self, method: str, request: bytes, metadata: Metadata = (),
              timeout: float | None = None) -> bytes:
        deadline = None if timeout is None else time.monotonic() + timeout
        stream = self.open_stream(method, metadata, timeout=timeout)
        with stream._send_mutex:
            stream._pending.append(_pack_prefix(0, len(request)) + request)
            stream._flush_locked(True)
        try:
            response = stream.recv(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if response is None:
                raise RpcError(StatusCode.INTERNAL, "unary call ended without a response")
            while stream.recv(None if deadline is None else max(0.0, deadline - time.monotonic())) is not None:
                pass
        except TimeoutError:
            self._cancel_client_stream(stream, StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
            raise RpcError(StatusCode.DEADLINE_EXCEEDED, "deadline exceeded") from None
        return response

    def _cancel_client_stream(self, stream: _ClientStream, code: StatusCode, details: str) -> None:
        with self._lock:
            if stream._status is not None or self._dead is not None:
                return
            stream._finish(code, details)
            self._streams.pop(stream.stream_id, None)
            self._reset_quietly(stream.stream_id, h2.errors.ErrorCodes.CANCEL)
            self._out.append(self._h2.data_to_send())
            self._window_cond.notify_all()
        self._flush_out()

    def _on_other(self, event, started: list) -> None:
        kind = type(event)
        if kind is h2.events.ResponseReceived:
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream._response_headers = _decode_headers(event.headers)
        elif kind is h2.events.TrailersReceived:
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream._trailers = _decode_headers(event.headers)

    def _on_stream_ended(self, stream_id: int) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is None:
            return
        stream._remote_closed = True
        stream._finish(*self._final_status(stream))
        if not stream._local_closed:
            # We are done whether or not we half-closed; release the stream.
            stream._local_closed = True
            self._reset_quietly(stream_id, h2.errors.ErrorCodes.NO_ERROR)
        self._window_cond.notify_all()

    @staticmethod
    def _final_status(stream: _ClientStream) -> tuple[StatusCode, str]:
        headers = stream._response_headers or []
        http_status = next((value for name, value in headers if name == ":status"), "")
        # A trailers-only response carries grpc-status in its only HEADERS.
        trailers = stream._trailers if stream._trailers is not None else headers
        fields = dict(trailers)
        if http_status != "200":
            code = _HTTP_STATUS.get(int(http_status) if http_status.isdigit() else 0, StatusCode.UNKNOWN)
            return code, f"unexpected HTTP status {http_status or 'missing'}"
        if "grpc-status" not in fields:
            return StatusCode.UNKNOWN, "the server sent no grpc-status"
        return StatusCode.from_wire(fields["grpc-status"]), decode_grpc_message(fields.get("grpc-message", ""))

    def _on_stream_reset(self, event) -> None:
        stream = self._streams.pop(event.stream_id, None)
        if stream is None:
            return
        stream._remote_closed = stream._local_closed = True
        code = _RESET_STATUS.get(event.error_code, StatusCode.INTERNAL)
        stream._finish(code, f"stream reset by the server ({event.error_code!s})")
        self._window_cond.notify_all()

    def _on_goaway(self, event) -> None:
        last = event.last_stream_id
        for stream_id in [sid for sid in self._streams if last is not None and sid > last]:
            stream = self._streams.pop(stream_id)
            stream._finish(StatusCode.UNAVAILABLE, "the server sent GOAWAY before handling the call")
        self._window_cond.notify_all()

    def _stream_protocol_error(self, stream, details, code=StatusCode.INTERNAL) -> None:
        self._streams.pop(stream.stream_id, None)
        stream._finish(code, details)
        stream._local_closed = True
        # grpc-go cancels a call whose message it refused; anything else is the peer's protocol error
        self._reset_quietly(stream.stream_id, h2.errors.ErrorCodes.CANCEL if code == StatusCode.RESOURCE_EXHAUSTED
                            else h2.errors.ErrorCodes.PROTOCOL_ERROR)

    def close(self) -> None:
        self._shutdown()


def serve_h2(sock: socket.socket, handlers: dict[str, Handler], initial_bytes: bytes = b"",
             max_receive_message: int = MAX_RECEIVE_MESSAGE) -> H2ServerConnection:
    """Serve gRPC ``handlers`` on a hijacked socket whose peer is the gRPC client."""
    return H2ServerConnection(sock, handlers, initial_bytes, max_receive_message)


def connect_h2(sock: socket.socket, initial_bytes: bytes = b"",
               max_receive_message: int = MAX_RECEIVE_MESSAGE) -> H2ClientConnection:
    """Be the gRPC client on a hijacked socket whose peer serves gRPC."""
    return H2ClientConnection(sock, initial_bytes, max_receive_message)
