"""grpcio on a hijacked socket, through a byte pump to a private unix socket.

grpcio can neither serve nor dial an existing file descriptor (grpc/grpc#23760),
so:

* server role: a ``grpc.server`` listens on a unix socket in a private temp
  dir; one connection to it is pumped to and from the hijacked socket;
* client role: a one-shot unix listener accepts the single connection of a
  ``grpc.insecure_channel("unix:...")`` (authority ``localhost``) and pumps it
  to and from the hijacked socket.

grpcio's iterator style is adapted to ``RpcStream`` with queues and one thread
per direction and call. grpc is imported here only, and lazily.
"""

from __future__ import annotations

import os
import queue
import shutil
import socket
import threading
import time
from collections.abc import Iterable

from ..socketdirs import socket_dir
from .base import (
    ClientConnection,
    Handler,
    Metadata,
    RpcError,
    RpcStream,
    ServerConnection,
    StatusCode,
    status_of_exception,
)

SERVER_WORKERS = 32
PUMP_CHUNK = 1 << 20
ACCEPT_TIMEOUT = 10.0
THREAD_JOIN_TIMEOUT = 5.0

# Largest message received, grpc-go's default like the h2 transport's; sends are not limited.
MAX_RECEIVE_MESSAGE = 4 << 20


def _channel_options(max_receive_message: int) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", max_receive_message)]


_END = object()  # end of a message queue
# send() waits while more than this much is queued but not yet written.
OUTBOX_LIMIT = 4 << 20


class _Outbox:
    """Messages handed to grpcio through the iterator it consumes.

    grpcio pulls the next message only once the previous one was written, so
    counting pulls tells ``flush`` when everything queued has reached the
    transport; that makes flush-then-cancel deliver like the h2 transport, and
    bounds memory when the peer reads slowly.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._cond = threading.Condition(threading.Lock())
        self._pending_bytes = 0  # queued, not yet written
        self._pending_count = 0
        self._waiters = 0
        self.finished = False  # the consumer is gone, or has seen the end
        self.final = None  # what ended the queue (_END or a status tuple)

    def put(self, messages: list[bytes]) -> None:
        size = sum(map(len, messages))
        with self._cond:
            self._pending_bytes += size
            self._pending_count += len(messages)
        self._queue.put(messages)
        if self._pending_bytes > OUTBOX_LIMIT:
            self.wait(OUTBOX_LIMIT)

    def end(self, final=_END) -> None:
        self._queue.put(final)

    def wait(self, limit: int = 0) -> None:
        """Block until at most ``limit`` bytes (0: nothing) are unwritten."""
        with self._cond:
            self._waiters += 1
            try:
                while not self.finished and (self._pending_bytes > limit or (limit == 0 and self._pending_count)):
                    self._cond.wait()
            finally:
                self._waiters -= 1

    def wait_finished(self) -> None:
        with self._cond:
            while not self.finished:
                self._cond.wait()

    def abandon(self) -> None:
        """The call is over: release waiters and a consumer blocked in get()."""
        with self._cond:
            self.finished = True
            self._cond.notify_all()
        self._queue.put(_END)

    def drain(self):
        """Generator for grpcio: yields messages until the end marker."""
        try:
            while True:
                item = self._queue.get()
                if not isinstance(item, list):
                    self.final = item
                    return
                for message in item:
                    yield message
                    # Resumed: grpcio has written this message.
                    with self._cond:
                        self._pending_bytes -= len(message)
                        self._pending_count -= 1
                        if self._waiters:
                            self._cond.notify_all()
        finally:
            with self._cond:
                self.finished = True
                self._cond.notify_all()


def _grpc():
    import grpc
    return grpc


def _to_grpc_code(code: StatusCode):
    grpc = _grpc()
    for member in grpc.StatusCode:
        if member.value[0] == int(code):
            return member
    return grpc.StatusCode.UNKNOWN


def _grpcio_metadata(metadata: Metadata) -> list[tuple[str, str | bytes]]:
    """Lowercase keys; grpcio wants bytes for binary (``-bin``) values."""
    result = []
    for key, value in metadata:
        key = key.lower()
        if key.endswith("-bin") and isinstance(value, str):
            value = value.encode("utf-8", "surrogateescape")
        result.append((key, value))
    return result


def _from_grpc_error(exc) -> RpcError:
    try:
        code = StatusCode(exc.code().value[0])
        details = exc.details() or ""
    except Exception:  # a bare grpc.RpcError without status accessors
        code, details = StatusCode.UNKNOWN, str(exc)
    return RpcError(code, details)


# -- byte pump ---------------------------------------------------------------

class _Pump:
    """Copies bytes both ways between two connected stream sockets.

    Uses ``os.splice`` through a pipe when available (no copy through Python),
    else recv/sendall. EOF from the outer (hijacked) socket half-closes the
    inner one; EOF from grpcio or any error ends both directions. ``done`` is
    set when both directions have ended.
    """

    def __init__(self, outer: socket.socket, inner: socket.socket, name: str) -> None:
        self.outer = outer
        self.inner = inner
        self.done = threading.Event()
        # set at the first bytes from the outer socket, or when the pump ends without any
        self.outer_spoke = threading.Event()
        self.outer_bytes_seen = False
        self._ended = 0
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(outer, inner), name=f"{name}-in", daemon=True),
            threading.Thread(target=self._run, args=(inner, outer), name=f"{name}-out", daemon=True),
        ]

    def start(self, initial_bytes: bytes = b"") -> None:
        if initial_bytes:
            self.inner.sendall(initial_bytes)
            self._outer_spoke()
        for thread in self._threads:
            thread.start()

    def _run(self, src: socket.socket, dst: socket.socket) -> None:
        failed = False
        first = self._outer_spoke if src is self.outer else None
        try:
            if hasattr(os, "splice"):
                self._splice(src, dst, first)
            else:
                self._copy(src, dst, first)
        except OSError:
            failed = True
        try:
            dst.shutdown(socket.SHUT_RDWR if failed else socket.SHUT_WR)
        except OSError:
            pass
        # grpcio closing its end means the connection is over for good; the
        # peer closing only half-closes, so that grpcio sees EOF and finishes.
        if failed or src is self.inner:
            self.abort()
        with self._lock:
            self._ended += 1
            if self._ended == 2:
                self.outer_spoke.set()
                self.done.set()

    def _outer_spoke(self) -> None:
        self.outer_bytes_seen = True
        self.outer_spoke.set()

    @staticmethod
    def _splice(src: socket.socket, dst: socket.socket, first=None) -> None:
        read_end, write_end = os.pipe()
        try:
            try:  # a larger pipe means fewer splice calls per megabyte
                import fcntl
                fcntl.fcntl(write_end, getattr(fcntl, "F_SETPIPE_SZ", 1031), PUMP_CHUNK)
            except OSError:
                pass
            src_fd, dst_fd = src.fileno(), dst.fileno()
            while True:
                moved = os.splice(src_fd, write_end, PUMP_CHUNK)
                if moved == 0:
                    return
                if first is not None:
                    first()
                    first = None
                while moved:
                    moved -= os.splice(read_end, dst_fd, moved)
        finally:
            os.close(read_end)
            os.close(write_end)

    @staticmethod
    def _copy(src: socket.socket, dst: socket.socket, first=None) -> None:
        while data := src.recv(PUMP_CHUNK):
            if first is not None:
                first()
                first = None
            dst.sendall(data)

    def abort(self) -> None:
        for sock in (self.outer, self.inner):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def join(self, timeout: float | None = None) -> None:
        for thread in self._threads:
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join(timeout)

    def close(self) -> None:
        self.abort()
        self.join()
        for sock in (self.outer, self.inner):
            sock.close()


# -- server role -------------------------------------------------------------

class _ServerStream(RpcStream):
    """Handler view of one grpcio call; the handler runs in its own thread."""

    def __init__(self, method: str, request_iterator, context) -> None:
        self.method = method
        self.metadata = [(key, value if isinstance(value, str) else value.decode("utf-8", "surrogateescape"))
                         for key, value in context.invocation_metadata()]
        self._requests = request_iterator
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._outbox = _Outbox()
        self._request_error: RpcError | None = None
        self._request_done = False
        self._cancelled: RpcError | None = None
        self._reader = threading.Thread(target=self._pump_requests, name="grpcio-requests", daemon=True)
        self._reader.start()

    def _pump_requests(self) -> None:
        try:
            for request in self._requests:
                self._inbox.put(request)
        except Exception as exc:  # grpcio raises a bare RpcError on cancellation
            self._request_error = RpcError(StatusCode.CANCELLED, f"call ended while reading: {exc!r}")
        self._inbox.put(_END)

    def on_terminated(self, cancelled: bool) -> None:
        if cancelled:
            self._cancelled = RpcError(StatusCode.CANCELLED, "cancelled by the peer")
            self._inbox.put(_END)
        self._outbox.abandon()  # frees the grpcio worker and any waiting sender

    def recv(self, timeout: float | None = None) -> bytes | None:
        # Requests read before a cancellation are delivered first, as by h2grpc.
        if self._request_done:
            return None
        try:
            item = self._inbox.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no message on {self.method} within {timeout} s") from None
        if item is _END:
            self._inbox.put(_END)  # later calls see the end too
            if self._cancelled is not None:
                raise self._cancelled
            if self._request_error is not None:
                raise self._request_error
            self._request_done = True
            return None
        return item

    def _check_sendable(self) -> None:
        if self._cancelled is not None:
            raise self._cancelled
        if self._outbox.finished:
            raise RpcError(StatusCode.CANCELLED, "the call has ended")

    def send(self, message: bytes) -> None:
        self._check_sendable()
        self._outbox.put([message])

    def send_many(self, messages: Iterable[bytes]) -> None:
        self._check_sendable()
        self._outbox.put(list(messages))
        self.flush()

    def flush(self) -> None:
        self._outbox.wait()
        if self._cancelled is not None:
            raise self._cancelled

    def close_send(self) -> None:
        self.flush()

    def cancel(self) -> None:
        pass

    def responses(self):
        """Generator run by the grpcio worker thread."""
        return self._outbox.drain()


class GrpcioServerConnection(ServerConnection):
    def __init__(self, sock: socket.socket, handlers: dict[str, Handler], initial_bytes: bytes = b"",
                 max_receive_message: int = MAX_RECEIVE_MESSAGE) -> None:
        grpc = _grpc()
        from concurrent.futures import ThreadPoolExecutor

        sock.setblocking(True)
        self.closed = threading.Event()
        self._handlers = dict(handlers)
        self._handler_threads: set[threading.Thread] = set()
        self._threads_lock = threading.Lock()
        self._close_lock = threading.Lock()
        self._closing = False
        self._tmpdir = socket_dir("session-grpc-")
        path = os.path.join(self._tmpdir, "server.sock")
        self._executor = ThreadPoolExecutor(max_workers=SERVER_WORKERS, thread_name_prefix="grpcio-server")
        self._server = grpc.server(self._executor, handlers=[_GenericHandler(self)],
                                   options=_channel_options(max_receive_message) + [("grpc.so_reuseport", 0)])
        self._server.add_insecure_port("unix:" + path)
        self._server.start()
        inner = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            inner.connect(path)
        finally:
            # Nobody else may connect, and nothing is left behind if this
            # process dies: the listener keeps working unlinked.
            shutil.rmtree(self._tmpdir, ignore_errors=True)
        self._pump = _Pump(sock, inner, "grpcio-server-pump")
        self._pump.start(initial_bytes)
        self._watcher = threading.Thread(target=self._watch, name="grpcio-server-watch", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        self._pump.done.wait()
        self._teardown()

    def _behavior(self, method: str, handler: Handler):
        def behavior(request_iterator, context):
            stream = _ServerStream(method, request_iterator, context)
            status: list = []
            context.add_callback(lambda: stream.on_terminated(cancelled=not status))
            thread = threading.Thread(target=self._run_handler, args=(stream, handler, context, status),
                                      name="grpcio-handler", daemon=True)
            with self._threads_lock:
                self._handler_threads.add(thread)
            thread.start()
            yield from stream.responses()
            # No status: cancelled; never hold a worker for the handler.
            if status and status[0][0] != StatusCode.OK:
                code, details = status[0]
                context.set_code(_to_grpc_code(code))
                context.set_details(details)
        return behavior

    def _run_handler(self, stream: _ServerStream, handler: Handler, context, status: list) -> None:
        try:
            try:
                handler(stream)
                result = (StatusCode.OK, "")
            except Exception as exc:
                result = status_of_exception(exc)
            status.append(result)
            stream._outbox.end(result)
        finally:
            with self._threads_lock:
                self._handler_threads.discard(threading.current_thread())

    def _teardown(self) -> None:
        with self._close_lock:
            if self._closing:
                return
            self._closing = True
        self._pump.abort()
        self._server.stop(grace=None).wait()
        self._pump.close()
        with self._threads_lock:
            threads = list(self._handler_threads)
        deadline = time.monotonic() + THREAD_JOIN_TIMEOUT
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._executor.shutdown(wait=True)
        self.closed.set()

    def close(self) -> None:
        self._pump.abort()
        if threading.current_thread() is not self._watcher:
            self._watcher.join()


def _generic_handler_class():
    grpc = _grpc()

    class GenericHandler(grpc.GenericRpcHandler):
        def __init__(self, connection: GrpcioServerConnection) -> None:
            self._connection = connection

        def service(self, handler_call_details):
            method = handler_call_details.method
            handler = self._connection._handlers.get(method)
            if handler is None:
                return None  # grpcio answers UNIMPLEMENTED
            return grpc.stream_stream_rpc_method_handler(
                self._connection._behavior(method, handler),
                request_deserializer=None, response_serializer=None)

    return GenericHandler


def _GenericHandler(connection):  # noqa: N802 - built lazily so grpc is imported only when used
    return _generic_handler_class()(connection)


# -- client role -------------------------------------------------------------

class _ClientStream(RpcStream):
    def __init__(self, channel, method: str, metadata: list[tuple[str, str]]) -> None:
        self.method = method
        self.metadata = metadata
        self._outbox = _Outbox()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._final: RpcError | None = None
        self._ended = False
        self._send_closed = False
        multi = channel.stream_stream(method, request_serializer=None, response_deserializer=None)
        self._call = multi(self._outbox.drain(), metadata=metadata)
        self._call.add_done_callback(lambda _call: self._outbox.abandon())
        self._reader = threading.Thread(target=self._pump_responses, name="grpcio-responses", daemon=True)
        self._reader.start()

    def _pump_responses(self) -> None:
        grpc = _grpc()
        try:
            for response in self._call:
                self._inbox.put(response)
            self._inbox.put(None)
        except grpc.RpcError as exc:
            self._inbox.put(_from_grpc_error(exc))

    def recv(self, timeout: float | None = None) -> bytes | None:
        if self._ended:
            if self._final is not None:
                raise self._final
            return None
        try:
            item = self._inbox.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no message on {self.method} within {timeout} s") from None
        if item is None:
            self._ended = True
            return None
        if isinstance(item, RpcError):
            self._ended = True
            self._final = item
            raise item
        return item

    def _check_sendable(self) -> bool:
        if self._send_closed:
            raise RpcError(StatusCode.INTERNAL, "send after close_send")
        if self._call.done():
            exc = self._call.exception() if not self._call.cancelled() else None
            if self._call.cancelled():
                raise RpcError(StatusCode.CANCELLED, "call cancelled")
            if exc is not None:
                raise _from_grpc_error(exc)
            return False
        return True

    def send(self, message: bytes) -> None:
        if self._check_sendable():
            self._outbox.put([message])

    def send_many(self, messages: Iterable[bytes]) -> None:
        if self._check_sendable():
            self._outbox.put(list(messages))
            self._outbox.wait()

    def flush(self) -> None:
        self._outbox.wait()

    def close_send(self) -> None:
        """Half-close; returns once grpcio has taken every message and the end."""
        if not self._send_closed:
            self._send_closed = True
            self._outbox.end()
            self._outbox.wait_finished()

    def cancel(self) -> None:
        self._call.cancel()


class GrpcioClientConnection(ClientConnection):
    def __init__(self, sock: socket.socket, initial_bytes: bytes = b"",
                 max_receive_message: int = MAX_RECEIVE_MESSAGE) -> None:
        grpc = _grpc()
        sock.setblocking(True)
        self.closed = threading.Event()
        self._close_lock = threading.Lock()
        self._closing = False
        self._tmpdir = socket_dir("session-grpc-")
        path = os.path.join(self._tmpdir, "client.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(path)
            listener.listen(1)
            listener.settimeout(ACCEPT_TIMEOUT)
            self._channel = grpc.insecure_channel(
                "unix:" + path,
                options=_channel_options(max_receive_message) + [("grpc.default_authority", "localhost")],
            )
            # Connect now, not at the first call (the peer may talk first).
            self._ready = grpc.channel_ready_future(self._channel)
            inner, _ = listener.accept()
        finally:
            # Exactly one connection: a reconnect by grpcio must fail, like
            # the daemon's dialer ("only one connection allowed").
            listener.close()
            shutil.rmtree(self._tmpdir, ignore_errors=True)
        inner.setblocking(True)
        self._pump = _Pump(sock, inner, "grpcio-client-pump")
        self._pump.start(initial_bytes)
        self._watcher = threading.Thread(target=self._watch, name="grpcio-client-watch", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        self._pump.done.wait()
        self._teardown()

    def wait_peer_ready(self, timeout: float | None = None) -> bool:
        self._pump.outer_spoke.wait(timeout)
        return self._pump.outer_bytes_seen

    def open_stream(self, method: str, metadata: Metadata = ()) -> _ClientStream:
        if self._closing or self._pump.done.is_set():
            raise RpcError(StatusCode.UNAVAILABLE, "connection closed")
        return _ClientStream(self._channel, method, _grpcio_metadata(metadata))

    def unary(self, method: str, request: bytes, metadata: Metadata = (),
              timeout: float | None = None) -> bytes:
        grpc = _grpc()
        if self._closing or self._pump.done.is_set():
            raise RpcError(StatusCode.UNAVAILABLE, "connection closed")
        call = self._channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        try:
            return call(request, metadata=_grpcio_metadata(metadata), timeout=timeout)
        except grpc.RpcError as exc:
            raise _from_grpc_error(exc) from None

    def _teardown(self) -> None:
        with self._close_lock:
            if self._closing:
                return
            self._closing = True
        self._ready.cancel()
        self._channel.close()
        self._pump.close()
        self.closed.set()

    def close(self) -> None:
        self._pump.abort()
        if threading.current_thread() is not self._watcher:
            self._watcher.join()


def serve_grpcio(sock: socket.socket, handlers: dict[str, Handler], initial_bytes: bytes = b"",
                 max_receive_message: int = MAX_RECEIVE_MESSAGE) -> GrpcioServerConnection:
    return GrpcioServerConnection(sock, handlers, initial_bytes, max_receive_message)


def connect_grpcio(sock: socket.socket, initial_bytes: bytes = b"",
                   max_receive_message: int = MAX_RECEIVE_MESSAGE) -> GrpcioClientConnection:
    return GrpcioClientConnection(sock, initial_bytes, max_receive_message)
