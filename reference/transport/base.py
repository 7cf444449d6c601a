"""Transport-neutral interface for gRPC over a hijacked session connection.

After ``POST /session`` is upgraded, the build client is the HTTP/2 + gRPC
*server* and the daemon the gRPC *client*. Two interchangeable transports
implement both roles behind the synchronous, thread-based interface below:

* ``h2grpc``: a thin gRPC layer on the ``h2`` package that serves or dials the
  hijacked socket directly (fast; never imports grpc);
* ``grpcio_pump``: grpcio behind a byte pump to a private unix socket, because
  grpcio can neither serve nor dial an existing file descriptor.

Messages are raw bytes both ways; callers encode protobuf themselves.
"""

from __future__ import annotations

import abc
import enum
import threading
import time
from collections.abc import Callable, Iterable, Sequence

Metadata = Sequence[tuple[str, str]]


class StatusCode(enum.IntEnum):
    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16

    @classmethod
    def from_wire(cls, value: int | str | None) -> StatusCode:
        """Status from a ``grpc-status`` value; anything unparsable is UNKNOWN."""
        try:
            return cls(int(value))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return cls.UNKNOWN


class RpcError(Exception):
    """A gRPC call ended (or must end) with a non-OK status."""

    def __init__(self, code: StatusCode | int, details: str = "") -> None:
        self.code = StatusCode(code)
        self.details = details
        super().__init__(code, details)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}" if self.details else self.code.name

    def __repr__(self) -> str:
        return f"RpcError({self.code.name}, {self.details!r})"


class RpcStream(abc.ABC):
    """One gRPC call seen from either role.

    Server role: ``recv`` returns None once the peer half-closed and raises
    ``RpcError(CANCELLED)`` once the peer cancelled, after the messages that
    arrived before the cancellation; ``close_send`` and ``cancel`` are no-ops
    (returning from the handler ends the call).
    Client role: ``recv`` returns None when the call ended with OK and raises
    ``RpcError`` when it ended with another status; ``send`` after
    ``close_send`` raises.
    ``send`` may buffer: ``flush``, ``send_many``, ``close_send``, the end of a
    handler and a ``recv`` that has to wait push buffered messages out; once
    they return, the messages are in the transport, so a ``cancel`` right
    after does not lose them. Sending blocks while the peer's flow-control
    window is exhausted. One thread sends and one receives per stream.
    """

    method: str
    metadata: list[tuple[str, str]]

    @abc.abstractmethod
    def recv(self, timeout: float | None = None) -> bytes | None:
        """Next message payload; raises TimeoutError when ``timeout`` expires."""

    @abc.abstractmethod
    def send(self, message: bytes) -> None: ...

    def send_many(self, messages: Iterable[bytes]) -> None:
        for message in messages:
            self.send(message)
        self.flush()

    @abc.abstractmethod
    def flush(self) -> None: ...

    @abc.abstractmethod
    def close_send(self) -> None: ...

    @abc.abstractmethod
    def cancel(self) -> None: ...

    def __iter__(self):
        while (message := self.recv()) is not None:
            yield message


Handler = Callable[[RpcStream], None]


class ServerConnection(abc.ABC):
    """The build-client side: serves ``handlers`` on one connection.

    Started in background threads by ``serve_h2`` / ``serve_grpcio``;
    ``closed`` is set once the connection is gone.
    """

    closed: threading.Event

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the connection ends; False on timeout."""
        return self.closed.wait(timeout)

    def serve(self) -> None:
        """Run until the connection ends, then release everything."""
        self.wait()
        self.close()

    @abc.abstractmethod
    def close(self) -> None:
        """End the connection and wait for the transport's threads."""

    def stop(self) -> None:
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class ClientConnection(abc.ABC):
    """The daemon side: opens calls to the peer's gRPC server."""

    closed: threading.Event

    @abc.abstractmethod
    def open_stream(self, method: str, metadata: Metadata = ()) -> RpcStream: ...

    def unary(self, method: str, request: bytes, metadata: Metadata = (),
              timeout: float | None = None) -> bytes:
        deadline = None if timeout is None else time.monotonic() + timeout
        stream = self.open_stream(method, metadata)
        stream.send(request)
        stream.close_send()
        try:
            response = stream.recv(_remaining(deadline))
            if response is None:
                raise RpcError(StatusCode.INTERNAL, "unary call ended without a response")
            # Drain to the status: a non-OK status after the message wins.
            while stream.recv(_remaining(deadline)) is not None:
                pass
        except TimeoutError:
            stream.cancel()
            raise RpcError(StatusCode.DEADLINE_EXCEEDED, "deadline exceeded") from None
        return response

    @abc.abstractmethod
    def wait_peer_ready(self, timeout: float | None = None) -> bool:
        """Wait until the peer has sent its first bytes (an HTTP/2 server's SETTINGS):
        its gRPC server is running. False when the connection ended or ``timeout`` passed first."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def wait(self, timeout: float | None = None) -> bool:
        return self.closed.wait(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())


def status_of_exception(exc: BaseException) -> tuple[StatusCode, str]:
    """The status a handler's exception turns into (same for both transports)."""
    if isinstance(exc, RpcError):
        return exc.code, exc.details
    return StatusCode.UNKNOWN, str(exc)


# grpc-message is percent-encoded UTF-8: bytes outside printable ASCII, and '%'.
_MESSAGE_SAFE = frozenset(range(0x20, 0x7F)) - {ord("%")}


def encode_grpc_message(text: str) -> str:
    raw = text.encode("utf-8", "surrogatepass")
    if all(b in _MESSAGE_SAFE for b in raw):
        return text
    return "".join(chr(b) if b in _MESSAGE_SAFE else f"%{b:02X}" for b in raw)


def decode_grpc_message(value: str) -> str:
    if "%" not in value:
        return value
    raw = value.encode("utf-8", "surrogateescape")
    out = bytearray()
    i = 0
    while i < len(raw):
        if raw[i] == 0x25 and _is_hex(raw[i + 1:i + 3]):
            out.append(int(raw[i + 1:i + 3], 16))
            i += 3
        else:  # a lone '%' is kept as is, like grpc-go does
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", "replace")


def _is_hex(two: bytes) -> bool:
    return len(two) == 2 and all(c in b"0123456789abcdefABCDEF" for c in two)


def serve_h2(sock, handlers: dict[str, Handler], initial_bytes: bytes = b"", **options) -> ServerConnection:
    from . import h2grpc
    return h2grpc.serve_h2(sock, handlers, initial_bytes, **options)


def connect_h2(sock, initial_bytes: bytes = b"", **options) -> ClientConnection:
    from . import h2grpc
    return h2grpc.connect_h2(sock, initial_bytes, **options)


def serve_grpcio(sock, handlers: dict[str, Handler], initial_bytes: bytes = b"", **options) -> ServerConnection:
    from . import grpcio_pump
    return grpcio_pump.serve_grpcio(sock, handlers, initial_bytes, **options)


def connect_grpcio(sock, initial_bytes: bytes = b"", **options) -> ClientConnection:
    from . import grpcio_pump
    return grpcio_pump.connect_grpcio(sock, initial_bytes, **options)
