"""What ``python -m reference.client build`` shows of a build's progress, as ``docker build`` does.

``--progress plain`` follows the docker CLI 20.10's text format (BuildKit's progressui printer): a block per
step, ``#N name``, ``#N sha256:...``, its status rows (``#N transferring context: 695B done``), its log lines
with the seconds since the step started (``#5 0.115 hello``) and its end (``#N DONE 0.0s``, ``#N CACHED``,
``#N ERROR: ...``); a step that is left while still running ends its block with ``#N ...``.  Updates are
printed at most every 100 ms, as the CLI does, so that the repeated states of one instant show once.
A failed build ends with the failed step's excerpt.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import TextIO

from . import progress as ev

FLUSH_INTERVAL = 0.1  # the CLI's plain display limit
# A status row still in progress is printed again only when it moved this much or this long after the last time.
MIN_PROGRESS_DELTA = 0.05
MIN_TIME_DELTA = 5.0


def format_bytes(count: int) -> str:
    """Decimal units as the CLI prints them: 695B, 1.23kB, 4.56MB."""
    units = ("B", "kB", "MB", "GB", "TB", "PB", "EB")
    value, unit = float(count), 0
    while abs(value) >= 1000 and unit < len(units) - 1:
        value /= 1000
        unit += 1
    return f"{count}B" if unit == 0 else f"{value:.2f}{units[unit]}"


def log_prefix(seconds: float) -> str:
    """Seconds since the step started, three decimals below 10 s, two below 100 s, then one."""
    precision = 3 if seconds < 10 else 2 if seconds < 100 else 1
    return f"{seconds:.{precision}f}"


class _Row:
    __slots__ = ("event", "updated")

    def __init__(self, event: ev.StatusRow):
        self.event = event
        self.updated = True


class Step:
    """One vertex as the display knows it."""

    def __init__(self, index: int, digest: str, name: str):
        self.index = index
        self.digest = digest
        self.name = name
        self.started: float | None = None
        self.completed: float | None = None
        self.cached = False
        self.error = ""
        self.rows: dict[str, _Row] = {}
        self.lines: list[str] = []  # log lines not printed yet
        self.partial = False  # the last line of lines is not ended yet
        self.offset = 0  # characters of the first line already printed
        self.history: list[str] = []  # every log line (as printed), for the failure excerpt and the live view
        self.updated = False

    @property
    def finished(self) -> bool:
        return self.completed is not None or self.cached or bool(self.error)


class StepTable:
    """The steps of a build, updated from progress events (no output)."""

    def __init__(self) -> None:
        self.steps: dict[str, Step] = {}

    def step(self, digest: str, name: str = "") -> Step:
        step = self.steps.get(digest)
        if step is None:
            step = self.steps[digest] = Step(len(self.steps) + 1, digest, name)
        elif name:
            step.name = name
        return step

    def apply(self, event: ev.ProgressEvent) -> Step:
        if isinstance(event, ev.StatusRow):
            step = self.step(event.vertex)
            row = step.rows.get(event.id)
            if row is None:
                step.rows[event.id] = _Row(event)
            else:
                row.event, row.updated = event, True
        elif isinstance(event, ev.LogLine):
            step = self.step(event.vertex)
            since = event.timestamp - step.started if event.timestamp is not None and step.started else 0.0
            text = event.data.decode("utf-8", "replace")
            pieces = text.split("\n")
            ended = pieces[-1] == ""
            if ended:
                pieces.pop()
            for i, piece in enumerate(pieces):
                if i == 0 and step.partial and step.history:
                    if step.lines:
                        step.lines[-1] += piece
                    step.history[-1] += piece
                else:
                    step.lines.append(f"#{step.index} {log_prefix(max(since, 0.0))} {piece}")
                    step.history.append(step.lines[-1])
            if pieces:
                step.partial = not ended
        else:
            step = self.step(event.digest, event.name)
            if isinstance(event, ev.StepStarted):
                step.started, step.completed, step.cached, step.error = event.started, None, False, ""
            elif isinstance(event, ev.StepCached):
                step.cached, step.completed = True, event.completed or event.started or 0.0
            elif isinstance(event, ev.StepDone):
                step.started, step.completed = event.started, event.completed
            elif isinstance(event, ev.StepFailed):
                step.error, step.completed = event.error, event.completed or event.started or 0.0
        step.updated = True
        return step


class PlainPrinter:
    """The text of ``--progress plain`` from a StepTable: ``flush()`` returns what to print for the updates
    since the last flush (sans-IO: the caller writes it)."""

    def __init__(self, table: StepTable):
        self.table = table
        self.current: Step | None = None
        self.printed_any = False
        self.last_rows: dict[str, tuple[int, float]] = {}

    def _block(self, step: Step, out: list[str]) -> None:
        if step is not self.current:
            if self.current is not None:
                if self.current.partial:
                    out.append("\n")
                self.current.offset = 0
                out.append(f"#{self.current.index} ...\n")
            if self.printed_any:
                out.append("\n")
            self.printed_any = True
            out.append(f"#{step.index} {step.name}\n#{step.index} {step.digest}\n")
        for row_id, row in step.rows.items():
            if not row.updated:
                continue
            row.updated = False
            out_line = self._row(step, row.event)
            if out_line is not None:
                out.append(out_line)
        for i, line in enumerate(step.lines):
            out.append(line[step.offset:] if i == 0 else line)
            if i != len(step.lines) - 1 or not step.partial:
                out.append("\n")
        if step.lines:
            if step.partial:
                step.lines = step.lines[-1:]
                step.offset = len(step.lines[0])
            else:
                step.lines, step.offset = [], 0
        self.current = step
        if step.finished:
            self.current = None
            if step.error:
                if step.partial:
                    out.append("\n")
                out.append(f"#{step.index} ERROR: {step.error}\n")
            elif step.cached:
                out.append(f"#{step.index} CACHED\n")
            else:
                took = f" {step.completed - step.started:.1f}s" if step.started is not None else ""
                out.append(f"#{step.index} DONE{took}\n")
        step.updated = False

    def _row(self, step: Step, row: ev.StatusRow) -> str | None:
        stamp = row.timestamp or 0.0
        last = self.last_rows.get(row.id)
        if last is not None and row.completed is None:
            moved = (row.current - last[0]) / row.total if row.total > 0 else 0.0
            if moved < MIN_PROGRESS_DELTA and stamp - last[1] < MIN_TIME_DELTA:
                return None
        self.last_rows[row.id] = (row.current, stamp)
        size = ""
        if row.total:
            size = f" {format_bytes(row.current)} / {format_bytes(row.total)}"
        elif row.current:
            size = f" {format_bytes(row.current)}"
        took = ""
        end = row.completed if row.completed is not None else stamp
        if row.started is not None and end - row.started > 0.01:
            took = f" {end - row.started:.1f}s"
        if row.completed is not None:
            took += " done"
        return f"#{step.index} {row.id}{size}{took}\n"

    def flush(self) -> str:
        out: list[str] = []
        updated = [s for s in self.table.steps.values() if s.updated]
        finished = sorted((s for s in updated if s.finished), key=lambda s: s.completed or 0.0)
        if self.current in finished:  # the step being shown ends first
            finished.remove(self.current)
            finished.insert(0, self.current)
        for step in finished:
            self._block(step, out)
        running = [s for s in updated if not s.finished]
        if self.current is not None and self.current in running:
            self._block(self.current, out)
        elif self.current is None and running:
            self._block(running[0], out)
        elif self.current is None:
            for step in self.table.steps.values():  # make an open step the shown one
                if step.started is not None and not step.finished and (step.lines or step.updated):
                    self._block(step, out)
                    break
        return "".join(out)

    def failure_excerpt(self, with_logs: bool = False) -> str:
        """The CLI's summary of each failed step: its name between dashes (with its last log lines on a
        terminal)."""
        out = []
        for step in self.table.steps.values():
            if step.error:
                out.append("------\n")
                out.append(f" > {step.name}:\n")
                if with_logs:
                    out.extend(f"{line}\n" for line in step.history[-10:])
                out.append("------\n")
        return "".join(out)


class PlainProgress:
    """``--progress plain``: the progress callback that writes PlainPrinter's text to ``out``."""

    def __init__(self, out: TextIO = sys.stderr, interval: float = FLUSH_INTERVAL):
        self.out = out
        self.interval = interval
        self.table = StepTable()
        self.printer = PlainPrinter(self.table)
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._last_flush = float("-inf")

    def __call__(self, event: ev.ProgressEvent) -> None:
        with self._lock:
            self.table.apply(event)
            if self._timer is not None:
                return
            # at once when the last print is old enough (the first update too), else at the next slot
            wait = self._last_flush + self.interval - time.monotonic()
            self._timer = threading.Timer(max(wait, 0.0), self._flush)
            self._timer.daemon = True
            self._timer.start()

    def _flush(self) -> None:
        with self._lock:
            self._timer = None
            self._last_flush = time.monotonic()
            text = self.printer.flush()
        if text:
            self.out.write(text)
            self.out.flush()

    def finish(self, failed: bool = False) -> None:
        """Print what is left and, for a failed build, the failure excerpt."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            text = self.printer.flush()
            if failed:
                text += self.printer.failure_excerpt()
        self.out.write(text)
        self.out.flush()


class LiveProgress:
    """``--progress auto`` on a terminal, as the docker CLI's: a ``[+] Building 1.2s (N/N)`` header and a line
    per step with its running timer, redrawn every 150 ms; only the lines that changed are rewritten."""

    TICK = 0.15
    LOG_LINES = 6  # last log lines shown under a running step
    BLUE, RED, DIM, RESET = "\x1b[34m", "\x1b[31m", "\x1b[2m", "\x1b[0m"

    def __init__(self, out: TextIO = sys.stderr, width: int | None = None):
        self.out = out
        if width is None:
            try:
                width = os.get_terminal_size(out.fileno()).columns
            except (OSError, ValueError, AttributeError):
                width = 80
        self.width = max(width, 40)
        self.table = StepTable()
        self.printer = PlainPrinter(self.table)  # for the failure excerpt
        self.t0 = time.monotonic()
        self.clock_offset: float | None = None  # local minus daemon clock, from the first start seen
        self.shown: list[str] = []
        self.finished = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="progress-tty", daemon=True)
        self._ticker.start()

    def __call__(self, event: ev.ProgressEvent) -> None:
        with self._lock:
            if isinstance(event, ev.StepStarted) and self.clock_offset is None:
                self.clock_offset = time.time() - event.started
            self.table.apply(event)

    def _tick(self) -> None:
        while not self._stop.wait(self.TICK):
            with self._lock:
                self._draw()

    def _line(self, text: str, seconds: float | None, color: str = "") -> str:
        timer = f"{seconds:.1f}s" if seconds is not None else ""
        room = self.width - 1 - len(timer) - 1
        if len(text) > room:
            text = text[:room]
        line = text.ljust(self.width - 1 - len(timer)) + timer
        return f"{color}{line}{self.RESET}" if color else line

    def _frame(self) -> list[str]:
        now = time.time() - (self.clock_offset or 0.0)
        steps = list(self.table.steps.values())
        done = sum(1 for s in steps if s.finished)
        header = f"[+] Building {time.monotonic() - self.t0:.1f}s ({done}/{len(steps)})"
        if self.finished:
            header += " FINISHED"
        lines = [header.ljust(self.width - 1)]
        for step in steps:
            if step.started is None and not step.finished:
                continue
            end = step.completed if step.finished else now
            seconds = max(end - step.started, 0.0) if step.started is not None and end is not None else None
            label = "ERROR " if step.error else "CACHED " if step.cached else ""
            color = self.RED if step.error else self.BLUE if step.finished else ""
            lines.append(self._line(f" => {label}{step.name}", seconds, color))
            for row in step.rows.values():
                r = row.event
                size = (f" {format_bytes(r.current)} / {format_bytes(r.total)}" if r.total
                        else f" {format_bytes(r.current)}" if r.current else "")
                row_end = r.completed if r.completed is not None else (now if not step.finished else r.timestamp)
                took = max(row_end - r.started, 0.0) if r.started is not None and row_end is not None else None
                lines.append(self._line(f" => => {r.id}{size}", took, color))
            if not step.finished:
                for log in step.history[-self.LOG_LINES:]:
                    text = log.split(" ", 2)[2] if log.count(" ") >= 2 else ""
                    lines.append(self._line(f" => => # {text}", None, self.DIM))
        return lines

    def _draw(self) -> None:
        frame = self._frame()
        rows = max(len(frame), len(self.shown))
        frame += [""] * (rows - len(frame))
        out = []
        below = len(self.shown)  # the cursor sits on the row after the frame shown
        for i, line in enumerate(frame):
            if i < len(self.shown):
                if line == self.shown[i]:
                    continue
                up = below - i
                out.append(f"\x1b[{up}A\r{line}\x1b[K\x1b[{up}B\r")
            else:
                out.append(f"{line}\n")
        self.shown = frame
        if out:
            self.out.write("".join(out))
            self.out.flush()

    def finish(self, failed: bool = False) -> None:
        self._stop.set()
        self._ticker.join(1.0)
        with self._lock:
            self.finished = True
            self._draw()
            if failed:
                self.out.write(self.printer.failure_excerpt(with_logs=True))
                self.out.flush()


def progress_for(mode: str, out: TextIO = sys.stderr):
    """The progress callback for ``--progress auto|plain|quiet``, like ``docker build`` (None for quiet)."""
    if mode == "quiet":
        return None
    if mode == "auto" and out.isatty() and os.environ.get("TERM") != "dumb":
        return LiveProgress(out)
    return PlainProgress(out)
