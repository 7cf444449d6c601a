"""Typed build progress: what ``build(progress=...)`` delivers.

BuildKit reports progress as ``StatusResponse`` messages (the ``moby.buildkit.trace``
aux messages of POST /build, the Control/Status stream of /grpc) that repeat a
vertex's whole state on every update.  ``ProgressConverter`` turns them into
events that each say one thing happened; it is sans-IO (feed it messages, get
events) so both entry points and the tests share it.

Times are seconds since the epoch on the daemon's clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Union

if TYPE_CHECKING:
    from ..pb.control_pb2 import StatusResponse


@dataclass(frozen=True)
class StepStarted:
    digest: str
    name: str
    started: float


@dataclass(frozen=True)
class StepCached:
    digest: str
    name: str
    started: float | None
    completed: float | None


@dataclass(frozen=True)
class StepDone:
    digest: str
    name: str
    started: float | None
    completed: float

    @property
    def seconds(self) -> float:
        return self.completed - self.started if self.started is not None else 0.0


@dataclass(frozen=True)
class StepFailed:
    digest: str
    name: str
    started: float | None
    completed: float | None
    error: str


@dataclass(frozen=True)
class StatusRow:
    """A progress row of a step (``transferring context``, a layer's download): bytes done of ``total``
    (0 when unknown)."""

    vertex: str
    id: str
    name: str
    current: int
    total: int
    timestamp: float | None
    started: float | None
    completed: float | None


@dataclass(frozen=True)
class LogLine:
    """Output of a step: ``data`` as sent (may hold several lines or part of one); stream 1 stdout, 2 stderr."""

    vertex: str
    stream: int
    data: bytes
    timestamp: float | None


ProgressEvent = Union[StepStarted, StepCached, StepDone, StepFailed, StatusRow, LogLine]


def _seconds(message, field: str) -> float | None:
    return getattr(message, field).ToNanoseconds() / 1e9 if message.HasField(field) else None


class _Step:
    __slots__ = ("name", "started", "finished")

    def __init__(self, name: str):
        self.name = name
        self.started: float | None = None
        self.finished = False


class ProgressConverter:
    """StatusResponse messages in, ``ProgressEvent``s out, in the order BuildKit reported them.

    A step is started once per distinct ``started`` time: BuildKit 0.8 completes the context load and starts
    it again, and the last completion is the real one; a finished step is not reported finished again by the
    updates that repeat its state.
    """

    def __init__(self) -> None:
        self._steps: dict[str, _Step] = {}

    def feed(self, status: "StatusResponse") -> list[ProgressEvent]:
        events: list[ProgressEvent] = []
        for vertex in status.vertexes:
            step = self._steps.setdefault(vertex.digest, _Step(vertex.name))
            step.name = vertex.name or step.name
            started = _seconds(vertex, "started")
            completed = _seconds(vertex, "completed")
            if started is not None and started != step.started:
                step.started = started
                step.finished = False
                events.append(StepStarted(vertex.digest, step.name, started))
            if step.finished:
                continue
            if vertex.error:
                step.finished = True
                events.append(StepFailed(vertex.digest, step.name, step.started, completed, vertex.error))
            elif vertex.cached:
                step.finished = True
                events.append(StepCached(vertex.digest, step.name, step.started, completed))
            elif completed is not None:
                step.finished = True
                events.append(StepDone(vertex.digest, step.name, step.started, completed))
        for row in status.statuses:
            events.append(StatusRow(row.vertex, row.ID, row.name, row.current, row.total, _seconds(row, "timestamp"),
                                    _seconds(row, "started"), _seconds(row, "completed")))
        for log in status.logs:
            events.append(LogLine(log.vertex, log.stream, bytes(log.msg), _seconds(log, "timestamp")))
        return events


def status_callback(progress: Callable[[ProgressEvent], None] | None):
    """A StatusResponse callback that hands ``progress`` the events of each message (None for None)."""
    if progress is None:
        return None
    converter = ProgressConverter()

    def on_status(status: "StatusResponse") -> None:
        for event in converter.feed(status):
            progress(event)

    return on_status
