"""Graded outcomes and the three-part failure message (requirement, expected, actual).

PASS           the requirement is met
FAIL           a MUST is not met (or a SHOULD test asserts plainly)
NON-STRICT     a SHOULD is not met: reported, not a failure of the run
UNSUPPORTED    the peer does not offer an optional capability the test needs
ERROR          the harness itself broke: never counted as a pass
XFAIL          a known deviation of the identified target (conformance/SPEC.md "Known deviations")
NOT REACHED    the case stopped at another requirement's failure before it finished grading this one
NOT APPLICABLE the case found that the requirement does not apply to this target (``not_applicable``)

A case grades each requirement it names on its own (``case_verdicts``). Only the requirement
whose check ended the case takes the case's FAIL, XFAIL or NON-STRICT; the case's other
requirements are NOT REACHED, even those whose checks passed so far: the rest of the case
might have checked them again, so a PASS would claim more than was seen. The raw counts of
passed and failed checks are kept next to the verdicts (``checks_made``). NOT REACHED is
not a result of its own: over several cases, any other verdict of the requirement decides.
A requirement the case declared not applicable stays NOT APPLICABLE however the case ends,
unless its own check ended the case.
"""

from __future__ import annotations

import threading

import pytest

PASS, FAIL, NON_STRICT, UNSUPPORTED, ERROR, XFAIL = "PASS", "FAIL", "NON-STRICT", "UNSUPPORTED", "ERROR", "XFAIL"
NOT_REACHED, NOT_APPLICABLE = "NOT REACHED", "NOT APPLICABLE"


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
        folded = fold_transcript(transcript)
        lines.append("Transcript:" if len(folded) == len(transcript) else
                     f"Transcript ({len(transcript)} lines, repeats folded):")
        shown = folded if len(folded) <= 60 else folded[:30] + [f"... {len(folded) - 50} more ..."] + folded[-20:]
        lines.extend("  " + line for line in shown)
    return "\n".join(lines)


def fold_transcript(transcript: list[str]) -> list[str]:
    """Runs of one repeated line as that line once with ``×N`` (a 5 MB file is 160 equal DATA lines)."""
    folded: list[str] = []
    previous, count = None, 0
    for line in [*transcript, None]:
        if line == previous:
            count += 1
            continue
        if previous is not None:
            folded.append(previous if count == 1 else f"{previous} ×{count}")
        previous, count = line, 1
    return folded


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
    _record_check(req_id, bool(ok))
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


# -- the checks of the running test ---------------------------------------------------------------
# One test runs at a time per process (an xdist worker is a process of its own), so one module-level
# tally is "the current test's". It is deliberately not thread-local: a test's helper threads (a
# served connection, a watchdog) call expect() too. The plugin resets it when a test's setup starts,
# so only a thread that outlives its test could count toward the next one.

_checks_lock = threading.Lock()
_checks: dict[str, dict[str, int]] = {}
_not_applicable: dict[str, str] = {}
_profiles: dict[str, str] = {}  # a profile the target showed in this case (catalogue.PROFILES) -> how

BODY_UPLOAD = "body-upload"


def _record_check(req_id: str, passed: bool) -> None:
    with _checks_lock:
        tally = _checks.setdefault(req_id, {"passed": 0, "failed": 0})
        tally["passed" if passed else "failed"] += 1


def not_applicable(req_id: str, reason: str) -> None:
    """Grade ``req_id`` NOT APPLICABLE in the running case (e.g. a /build rule for a client that builds
    through /grpc) and go on: the case's other requirements are still graded."""
    with _checks_lock:
        _not_applicable[req_id] = reason


def declare_profile(profile: str, evidence: str) -> None:
    """The target showed ``profile`` in the running case (the instrumented daemon declares a body-upload
    build): only the profile's rules are graded (``grade_by_profile``)."""
    with _checks_lock:
        _profiles.setdefault(profile, evidence)


def declared_profiles() -> dict[str, str]:
    with _checks_lock:
        return dict(_profiles)


def redeclare_profiles(profiles: dict[str, str]) -> None:
    """A case that reuses another case's client run (a per-client cache) inherits the profiles it showed."""
    for profile, evidence in profiles.items():
        declare_profile(profile, evidence)


def grade_by_profile(verdicts: dict[str, str], grade: str, failed_req: str | None,
                     applies, missing_service: bool = False) -> tuple[dict[str, str], str, set[str]]:
    """A case's verdicts for a target of a profile whose rules are those ``applies(req_id)`` accepts.

    A rule outside the profile is UNSUPPORTED (the target does not offer what it needs), never PASS or FAIL. When
    the case ended at such a rule, or at no rule, the profile's rules it had not finished are NOT REACHED. The
    case's grade is the worst verdict of the profile's rules, UNSUPPORTED when none has one. A harness ERROR
    counts as ending outside when ``missing_service`` (a call the client does not implement broke the
    scenario). Returns the
    verdicts, the grade and the IDs made UNSUPPORTED.
    """
    outside = {r for r in verdicts if not applies(r)}
    ended_outside = failed_req is None or failed_req in outside
    out = {}
    for req_id, verdict in verdicts.items():
        if req_id in outside:
            out[req_id] = UNSUPPORTED
        elif ended_outside and verdict == grade and (grade not in (PASS, ERROR, UNSUPPORTED) or missing_service):
            out[req_id] = NOT_REACHED
        else:
            out[req_id] = verdict
    inside = [out[r] for r in out if r not in outside]
    for worst in (ERROR, FAIL, XFAIL, NON_STRICT, PASS):
        if worst in inside:
            return out, worst, outside
    return out, UNSUPPORTED, outside


def reset_checks() -> None:
    with _checks_lock:
        _checks.clear()
        _not_applicable.clear()
        _profiles.clear()


def checks_made() -> dict[str, dict[str, int]]:
    """{requirement ID: {"passed": n, "failed": m}} of the expect() calls since the last reset."""
    with _checks_lock:
        return {req_id: dict(tally) for req_id, tally in _checks.items()}


def declared_not_applicable() -> dict[str, str]:
    """{requirement ID: reason} of the not_applicable() calls since the last reset."""
    with _checks_lock:
        return dict(_not_applicable)


def case_verdicts(named: list[str], grade: str, failed_req: str | None, checked,
                  not_applicable_ids=()) -> dict[str, str]:
    """Each requirement's verdict in one case that ended with ``grade``.

    ``named`` are the IDs of the case's requirement marker, ``checked`` those expect() saw (an ID the
    marker does not name is graded too: the check happened), ``failed_req`` the ID that the exception
    ending the case carries, if any, ``not_applicable_ids`` those the case declared not applicable (an
    ID the case neither names nor checks stays out: the case claims nothing about it).
    """
    graded = list(dict.fromkeys([*named, *checked, *([failed_req] if failed_req else [])]))
    blamed = failed_req is not None and grade in (FAIL, XFAIL, NON_STRICT)
    if grade == PASS:
        verdicts = dict.fromkeys(graded, PASS)
    elif not blamed:
        # No requirement to blame (a plain assert, a harness error), or nothing was graded (UNSUPPORTED,
        # SKIPPED, a setup ERROR): the case's outcome is every requirement's, as the case is one unit.
        verdicts = dict.fromkeys(graded, grade)
    else:
        verdicts = dict.fromkeys(graded, NOT_REACHED)
    for req_id in not_applicable_ids:
        if req_id in verdicts:
            verdicts[req_id] = NOT_APPLICABLE
    if blamed:
        verdicts[failed_req] = grade
    return verdicts
