"""The sans-IO converter from BuildKit StatusResponse messages to typed progress events."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from reference.client.progress import (LogLine, ProgressConverter, StatusRow, StepCached, StepDone, StepFailed,
                                       StepStarted, status_callback)
from reference.pb.control_pb2 import StatusResponse


def _stamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(round(seconds * 1e9)))
    return stamp


def vertex_update(digest="sha256:a", name="[1/2] RUN x", started=None, completed=None, cached=False, error=""):
    status = StatusResponse()
    vertex = status.vertexes.add(digest=digest, name=name, cached=cached, error=error)
    if started is not None:
        vertex.started.CopyFrom(_stamp(started))
    if completed is not None:
        vertex.completed.CopyFrom(_stamp(completed))
    return status


def test_a_step_starts_once_and_finishes_once_however_often_its_state_is_repeated():
    converter = ProgressConverter()
    events = []
    for update in (vertex_update(), vertex_update(started=10.0), vertex_update(started=10.0),
                   vertex_update(started=10.0, completed=10.5), vertex_update(started=10.0, completed=10.5)):
        events += converter.feed(update)
    assert events == [StepStarted("sha256:a", "[1/2] RUN x", 10.0), StepDone("sha256:a", "[1/2] RUN x", 10.0, 10.5)]
    assert events[1].seconds == 0.5


def test_a_step_restarted_with_a_new_start_time_is_started_and_finished_again():
    """BuildKit 0.8 completes the context load, then starts it again: the last completion is the real one."""
    converter = ProgressConverter()
    events = []
    for started, completed in ((100.0, 100.25), (101.0, None), (101.0, 102.5)):
        events += converter.feed(vertex_update(started=started, completed=completed))
    assert [type(e) for e in events] == [StepStarted, StepDone, StepStarted, StepDone]
    assert events[-1].seconds == 1.5


def test_cached_and_failed_steps():
    converter = ProgressConverter()
    cached = converter.feed(vertex_update("sha256:c", "[2/2] COPY . /", started=1.0, completed=1.0, cached=True))
    assert cached == [StepStarted("sha256:c", "[2/2] COPY . /", 1.0), StepCached("sha256:c", "[2/2] COPY . /", 1.0, 1.0)]
    failed = converter.feed(vertex_update("sha256:f", "[1/1] RUN false", started=2.0, completed=3.0,
                                          error="exit code: 1"))
    assert failed[1] == StepFailed("sha256:f", "[1/1] RUN false", 2.0, 3.0, "exit code: 1")
    assert converter.feed(vertex_update("sha256:f", "[1/1] RUN false", started=2.0, completed=3.0,
                                        error="exit code: 1")) == []


def test_status_rows_and_log_lines_keep_their_bytes_and_times():
    status = StatusResponse()
    row = status.statuses.add(ID="transferring context:", vertex="sha256:ctx", current=1024, total=0)
    row.timestamp.CopyFrom(_stamp(5.0))
    row.started.CopyFrom(_stamp(4.5))
    log = status.logs.add(vertex="sha256:run", stream=2, msg=b"hello\nwor")
    log.timestamp.CopyFrom(_stamp(6.25))
    assert ProgressConverter().feed(status) == [
        StatusRow("sha256:ctx", "transferring context:", "", 1024, 0, 5.0, 4.5, None),
        LogLine("sha256:run", 2, b"hello\nwor", 6.25)]


def test_the_callback_adapter_delivers_the_events_in_order():
    seen = []
    on_status = status_callback(seen.append)
    on_status(vertex_update(started=1.0))
    on_status(vertex_update(started=1.0, completed=2.0))
    assert [type(e) for e in seen] == [StepStarted, StepDone]
    assert status_callback(None) is None
