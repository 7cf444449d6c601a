"""Build progress as dockerd writes it: JSON lines on the ``/build`` response.

BuildKit builds (``version=2``) report through aux messages with id
``moby.buildkit.trace`` whose value is a serialized ``StatusResponse``,
base64-encoded (Go's JSON encoding of ``[]byte``); the docker CLI renders them
as its usual ``#N [internal] load ...`` vertex output.  Failure is an
``errorDetail`` line; the HTTP status stays 200.  The 2017 path
(``version=1``) reports classic ``stream`` lines instead.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from typing import Callable

from google.protobuf.timestamp_pb2 import Timestamp

from ..pb.control_pb2 import StatusResponse, Vertex, VertexLog, VertexStatus

Writer = Callable[[bytes], None]

# Byte-count status updates are sent at most this often per status.
STATUS_INTERVAL = 0.1


def _now() -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(time.time_ns())
    return ts


def json_line(obj: dict) -> bytes:
    return (json.dumps(obj, separators=(",", ":")) + "\r\n").encode()


class ProgressWriter:
    """Serializes JSON lines from any thread onto the response."""

    def __init__(self, write: Writer):
        self._write = write
        self._lock = threading.Lock()

    def send(self, obj: dict) -> None:
        with self._lock:
            self._write(json_line(obj))

    def error(self, message: str) -> None:
        self.send({"errorDetail": {"message": message}, "error": message})

    def aux(self, aux_id: str | None, value) -> None:
        obj = {"aux": value}
        if aux_id is not None:
            obj = {"id": aux_id, "aux": value}
        self.send(obj)

    def stream(self, text: str) -> None:
        self.send({"stream": text})


class TraceEmitter:
    """Vertexes of one BuildKit build, sent as ``moby.buildkit.trace`` aux messages."""

    def __init__(self, writer: ProgressWriter | None, build_id: str):
        self.writer = writer
        self.build_id = build_id
        self._count = 0
        self._lock = threading.Lock()

    def vertex(self, name: str, inputs: list[str] = ()) -> "VertexProgress":
        with self._lock:
            self._count += 1
            seed = f"{self.build_id}:{self._count}:{name}"
        digest = "sha256:" + hashlib.sha256(seed.encode()).hexdigest()
        return VertexProgress(self, Vertex(digest=digest, name=name, inputs=list(inputs)))

    def publish(self, response: StatusResponse) -> None:
        data = base64.b64encode(response.SerializeToString()).decode("ascii")
        self.writer.aux("moby.buildkit.trace", data)


class StatusEmitter(TraceEmitter):
    """The same vertexes for BuildKit's Control API, where ``Control/Status`` streams the
    ``StatusResponse`` messages themselves (``publish`` hands each one over)."""

    def __init__(self, publish: Callable[[StatusResponse], None], build_id: str):
        super().__init__(None, build_id)
        self._publish = publish

    def publish(self, response: StatusResponse) -> None:
        self._publish(response)


class VertexProgress:
    def __init__(self, emitter: TraceEmitter, vertex: Vertex):
        self._emitter = emitter
        self.vertex = vertex
        self._statuses: dict[str, VertexStatus] = {}
        self._last_status_sent: dict[str, float] = {}

    @property
    def digest(self) -> str:
        return self.vertex.digest

    def _send_vertex(self) -> None:
        self._emitter.publish(StatusResponse(vertexes=[self.vertex]))

    def start(self) -> "VertexProgress":
        self.vertex.started.CopyFrom(_now())
        self._send_vertex()
        return self

    def done(self, *, cached: bool = False) -> None:
        if cached:
            self.vertex.cached = True
        if not self.vertex.HasField("started"):
            self.vertex.started.CopyFrom(_now())
        self.vertex.completed.CopyFrom(_now())
        for status_id, status in self._statuses.items():
            if not status.HasField("completed"):
                self.status(status_id, status.current, status.total, completed=True)
        self._send_vertex()

    def fail(self, message: str) -> None:
        if not self.vertex.HasField("started"):
            self.vertex.started.CopyFrom(_now())
        self.vertex.completed.CopyFrom(_now())
        self.vertex.error = message
        self._send_vertex()

    def status(self, status_id: str, current: int, total: int = 0, *, completed: bool = False,
               force: bool = False) -> None:
        """A named counter under this vertex (``transferring context: 2.1kB``)."""
        status = self._statuses.get(status_id)
        clock = time.monotonic()
        if (status is not None and not (completed or force)
                and clock - self._last_status_sent.get(status_id, 0.0) < STATUS_INTERVAL):
            status.current = current  # sent with the next update
            status.total = total
            return
        now = _now()
        if status is None:
            status = VertexStatus(ID=status_id, vertex=self.vertex.digest)
            status.started.CopyFrom(now)
            self._statuses[status_id] = status
        status.current = current
        status.total = total
        status.timestamp.CopyFrom(now)
        if completed:
            status.completed.CopyFrom(now)
        self._last_status_sent[status_id] = clock
        self._emitter.publish(StatusResponse(statuses=[status]))

    def log(self, text: str, stream: int = 1) -> None:
        entry = VertexLog(vertex=self.vertex.digest, stream=stream, msg=text.encode())
        entry.timestamp.CopyFrom(_now())
        self._emitter.publish(StatusResponse(logs=[entry]))
