"""Graded outcomes and the three-part failure message (requirement, expected, actual).

PASS        the requirement is met
FAIL        a MUST is not met (or a SHOULD test asserts plainly)
NON-STRICT  a SHOULD is not met: reported, not a failure of the run
UNSUPPORTED the peer does not offer an optional capability the test needs
ERROR       the harness itself broke: never counted as a pass
"""

from __future__ import annotations

import pytest

PASS, FAIL, NON_STRICT, UNSUPPORTED, ERROR, XFAIL = "PASS", "FAIL", "NON-STRICT", "UNSUPPORTED", "ERROR", "XFAIL"


def _requirement_line(req_id: str) -> str:
    from .catalogue import load_catalogue

    req = load_catalogue().get(req_id)
    if req is None:
        return f"-> {req_id} (not in the catalogue)"
    return f"-> {req.id} ({req.level}): {req.title}"


def format_failure(req_id: str, expected, actual, transcript: list[str] | None = None, seed: str | None = None) -> str:
    lines = [_requirement_line(req_id), f"Expected: {expected}", f"Actual:   {actual}"]
    if seed:
        lines.append(f"Seed: {seed}")
    if transcript:
        lines.append("Transcript:")
        shown = transcript if len(transcript) <= 60 else transcript[:30] + [f"... {len(transcript) - 50} more ..."] + transcript[-20:]
        lines.extend("  " + line for line in shown)
    return "\n".join(lines)


class RequirementFailure(AssertionError):
    """A MUST was not met by the implementation under test."""

    def __init__(self, req_id: str, expected, actual, transcript: list[str] | None = None, seed: str | None = None):
        self.req_id = req_id
        self.expected = expected
        self.actual = actual
        self.transcript = list(transcript or [])
        self.seed = seed
        super().__init__(format_failure(req_id, expected, actual, transcript, seed))


class NonStrict(Exception):
    """A SHOULD was not met."""

    def __init__(self, req_id: str, expected, actual, transcript: list[str] | None = None):
        self.req_id = req_id
        self.expected = expected
        self.actual = actual
        self.transcript = list(transcript or [])
        super().__init__(format_failure(req_id, expected, actual, transcript))


class Unsupported(Exception):
    """The peer does not advertise something optional that the test needs."""


def expect(req_id: str, ok: bool, expected, actual, transcript: list[str] | None = None, seed: str | None = None) -> None:
    """Fail requirement ``req_id`` unless ``ok``; SHOULD rules grade as NON-STRICT."""
    if ok:
        return
    from .catalogue import load_catalogue

    req = load_catalogue().get(req_id)
    if req is not None and req.level in ("SHOULD", "MAY"):
        raise NonStrict(req_id, expected, actual, transcript)
    raise RequirementFailure(req_id, expected, actual, transcript, seed)


def unsupported(reason: str) -> None:
    raise Unsupported(reason)


def classify(report: pytest.TestReport, call_excinfo) -> str:
    """Map a pytest report (of the call phase, or a failed setup) to an outcome."""
    if hasattr(report, "wasxfail"):
        return XFAIL if report.skipped else FAIL  # an unexpected pass of a known deviation is strict-failed
    if report.passed:
        return PASS
    exc = call_excinfo.value if call_excinfo is not None else None
    if report.skipped:
        if isinstance(exc, Unsupported) or "UNSUPPORTED" in str(report.longrepr):
            return UNSUPPORTED
        return "SKIPPED"
    if isinstance(exc, NonStrict):
        return NON_STRICT
    if report.when != "call":
        return ERROR
    if isinstance(exc, AssertionError):
        return FAIL
    return ERROR
