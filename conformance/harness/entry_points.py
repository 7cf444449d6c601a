"""Which way a client asked the instrumented daemon for its build: ``POST /build`` (the docker CLI 20.10, the
reference client n) or BuildKit's Control API on ``POST /grpc`` (buildx, the reference client n+1). Client-role
cases apply to either; the rules of one entry point do not apply to a client that used the other, and are graded
"not applicable" for it, never PASS or FAIL."""

from __future__ import annotations

from ..outcomes import not_applicable

# The rules of each entry point's request, by generation (n-1: the 2017 request with the Dockerfile as body).
BUILD_REQUEST_RULES = {"build": "BUILD-1", "grpc": "GRPC-3"}
LEGACY_BUILD_RULE = "BUILD-7"


class NoBuildRequested(RuntimeError):
    """The case needs a build and the client asked for none: an ERROR of the case's precondition, never a
    requirement's FAIL, reported with what the client said."""


def require_build(daemon, run) -> None:
    """Raise :class:`NoBuildRequested`, with the client's exit status and last output lines, unless it asked for a
    build on either entry point."""
    if daemon.builds:
        return
    tail = "\n".join(run.output.strip().splitlines()[-15:]) or "(no output)"
    solves = len(getattr(getattr(daemon.control_api, "record", None), "solves", []) or [])
    raise NoBuildRequested(
        f"harness precondition: the client asked for no build (no POST /build, no Control/Solve that ran the "
        f"Dockerfile frontend; {solves} other Solve(s)); requests: {[f'{m} {t}' for m, t in daemon.requests][:12]}; "
        f"exit status {run.returncode} after {run.seconds:.1f} s; last output:\n{tail}")


def entry_point(daemon) -> str:
    """``build`` or ``grpc``: how the client's (first) build came; ``build`` when it asked for none."""
    if daemon.builds:
        return daemon.builds[0].api
    record = getattr(daemon.control_api, "record", None)
    return "grpc" if record is not None and record.solves else "build"


def build_request_rule(client, daemon) -> str:
    """The rule that grades how this client asked for its build; the other entry point's are not applicable."""
    used = entry_point(daemon)
    rule = LEGACY_BUILD_RULE if client.generation == "n-1" else BUILD_REQUEST_RULES[used]
    for other in {LEGACY_BUILD_RULE, *BUILD_REQUEST_RULES.values()} - {rule}:
        not_applicable(other, f"the client asked for its build through POST /{used}")
    return rule
