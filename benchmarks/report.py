"""Rows, verdicts and tables shared by the suites."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field

PASS, MISS, ERROR, INFO = "PASS", "MISS", "ERROR", "-"


def median(samples: list[float]) -> float | None:
    return statistics.median(samples) if samples else None


@dataclass
class Row:
    """One compared metric: ``ours`` against ``peer`` (medians), judged by ``target``.

    ``target_kind`` "ratio": PASS when ours/peer <= target.  "absolute": PASS
    when ours <= target (in ``unit``; the peer column is only for context).
    ``resolution``: the coarsest step the figures are reported in (the docker
    CLI prints durations to 0.1 s); two values below it compare as equal.
    ``extra`` rows are shown but left out of the summary's verdict counts.
    """

    metric: str
    ours: float | None
    peer: float | None
    unit: str = "s"
    target: float | None = None
    target_kind: str = "ratio"
    extra: bool = False
    resolution: float = 0.0
    note: str = ""
    error: str = ""
    ours_samples: list[float] = field(default_factory=list)
    peer_samples: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        if self.ours is None or self.peer is None:
            return None
        if self.resolution and max(self.ours, self.peer) <= self.resolution * 1.01:
            return None  # both within one step of zero: indistinguishable at this resolution
        if self.peer <= self.resolution / 2:
            return math.inf
        return self.ours / self.peer

    @property
    def verdict(self) -> str:
        if self.error:
            return ERROR
        if self.target is None:
            return INFO
        if self.target_kind == "absolute":
            return PASS if self.ours is not None and self.ours <= self.target else MISS
        if self.ours is None or self.peer is None:
            return ERROR
        ratio = self.ratio
        if ratio is None:  # indistinguishable at the resolution
            return PASS
        return PASS if ratio <= self.target else MISS

    def as_dict(self) -> dict:
        data = asdict(self)
        ratio = self.ratio
        data["ratio"] = None if ratio is None or math.isinf(ratio) else ratio
        data["verdict"] = self.verdict
        return data


@dataclass
class SuiteResult:
    name: str
    title: str
    peer_name: str = "peer"
    ours_name: str = "ours"
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str = ""
    error: str = ""
    details: dict = field(default_factory=dict)  # raw samples and anything else worth keeping
    appendix: str = ""  # free text printed after the table (profiles)

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "title": self.title,
            "ours": self.ours_name,
            "peer": self.peer_name,
            "skipped": self.skipped,
            "error": self.error,
            "notes": self.notes,
            "rows": [r.as_dict() for r in self.rows],
            "details": self.details,
        }


def _value(value: float | None, unit: str, resolution: float = 0.0) -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value:.2f} s" if resolution >= 0.1 else f"{value:.3f} s"
    return f"{value:.1f} {unit}"


def _ratio(row: Row) -> str:
    if row.target_kind == "absolute":
        return "-"  # judged on our figure alone
    ratio = row.ratio
    if ratio is None:
        if row.ours is not None and row.peer is not None:
            return f"~1 (<={row.resolution:g} s)"
        return "-"
    if math.isinf(ratio):
        return "inf"
    return f"{ratio:.2f}x"


def _target(row: Row) -> str:
    if row.target is None:
        return "-"
    if row.target_kind == "absolute":
        return f"<= {row.target:g} {row.unit}"
    return f"<= {row.target:g}x"


def format_table(result: SuiteResult) -> str:
    lines = [f"== {result.title} =="]
    if result.skipped:
        lines.append(f"skipped: {result.skipped}")
        return "\n".join(lines)
    if not result.rows:
        lines.append(f"SUITE ERROR: {result.error or 'nothing was measured'}")
        return "\n".join(lines)
    header = ("metric", result.ours_name, result.peer_name, "ratio", "target", "result")
    cells = [header]
    for row in result.rows:
        verdict = row.verdict + (" (extra)" if row.extra and row.target is not None else "")
        cells.append((row.metric, _value(row.ours, row.unit, row.resolution),
                      _value(row.peer, row.unit, row.resolution), _ratio(row),
                      _target(row), verdict))
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    for n, c in enumerate(cells):
        lines.append("  ".join(c[i].ljust(widths[i]) if i == 0 else c[i].rjust(widths[i]) for i in range(len(c))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    for row in result.rows:
        if row.error:
            lines.append(f"error [{row.metric}]: {row.error}")
    for row in result.rows:
        if row.note:
            lines.append(f"note [{row.metric}]: {row.note}")
    for note in result.notes:
        lines.append(f"* {note}")
    if result.error:
        lines.append(f"SUITE ERROR: {result.error}")
    if result.appendix:
        lines.append(result.appendix.rstrip())
    return "\n".join(lines)


def format_summary(results: list[SuiteResult]) -> tuple[str, bool]:
    """The closing summary, and whether every suite that ran measured everything it had to."""
    lines = ["== summary =="]
    complete = True
    for result in results:
        if result.skipped:
            lines.append(f"{result.name}: skipped ({result.skipped})")
            continue
        primary = [r for r in result.rows if not r.extra and r.target is not None]
        counts = {v: sum(1 for r in primary if r.verdict == v) for v in (PASS, MISS, ERROR)}
        text = f"{result.name}: {counts[PASS]} PASS, {counts[MISS]} MISS, {counts[ERROR]} ERROR"
        misses = [r for r in primary if r.verdict == MISS]
        if misses:
            text += " | missed: " + "; ".join(f"{r.metric} {_ratio(r) if r.target_kind == 'ratio' else _value(r.ours, r.unit)}"
                                             f" (target {_target(r)})" for r in misses)
        extra_bad = [r for r in result.rows if r.extra and r.verdict in (MISS, ERROR)]
        if extra_bad:
            text += " | extra rows: " + "; ".join(f"{r.metric} {r.verdict}" for r in extra_bad)
        if result.error:
            text += f" | SUITE ERROR: {result.error.splitlines()[0]}"
        lines.append(text)
        if counts[ERROR] or result.error:
            complete = False
    lines.append("A MISS never fails this command; an ERROR (a measurement that could not be made) does.")
    return "\n".join(lines), complete
