"""Which way a client asked the instrumented daemon for its build: ``POST /build`` (the docker CLI 20.10, the
reference client n) or BuildKit's Control API on ``POST /grpc`` (buildx, the reference client n+1). Client-role
cases apply to either; the rules of one entry point do not apply to a client that used the other, and are graded
"not applicable" for it, never PASS or FAIL."""

from __future__ import annotations

import io
import os
import tarfile

from ..outcomes import Unsupported, not_applicable

# The rules of each entry point's request, by generation (n-1: the 2017 request with the Dockerfile as body).
BUILD_REQUEST_RULES = {"build": "BUILD-1", "grpc": "GRPC-3", "body": "BUILD-8"}  # body: the body-upload profile
LEGACY_BUILD_RULE = "BUILD-7"


class NoBuildRequested(RuntimeError):
    """The case needs a build and the client asked for none: an ERROR of the case's precondition, never a
    requirement's FAIL, reported with what the client said."""


def builds_without_options(client) -> bool:
    """Whether the client is known to build at all: an embedded target, a peer, or its identification probe (a
    plain build) succeeded."""
    identity = getattr(client, "identity", None)
    return identity is not None and any(e == "embedded target" or e.startswith(("probe build exited 0",
                                                                                 "its own version report"))
                                        for e in identity.evidence)


def require_build(daemon, run, client=None) -> None:
    """Raise :class:`NoBuildRequested`, with the client's exit status and last output lines, unless it asked for a
    build on either entry point."""
    if daemon.builds:
        return
    tail = "\n".join(run.output.strip().splitlines()[-15:]) or "(no output)"
    if run.extra_args and run.returncode != 0 and builds_without_options(client):
        # a client that builds, but not with the case's options (-o, --secret, --ssh, -f): a capability it
        # does not offer
        raise Unsupported(f"the client did not build with the case's options {list(run.extra_args)}: exit status "
                          f"{run.returncode} after {run.seconds:.1f} s; last output:\n{tail}")
    solves = len(getattr(getattr(daemon.control_api, "record", None), "solves", []) or [])
    raise NoBuildRequested(
        f"harness precondition: the client asked for no build (no POST /build, no Control/Solve that ran the "
        f"Dockerfile frontend; {solves} other Solve(s)); requests: {[f'{m} {t}' for m, t in daemon.requests][:12]}; "
        f"exit status {run.returncode} after {run.seconds:.1f} s; last output:\n{tail}")


def entry_point(daemon) -> str:
    """``build``, ``grpc`` or ``body`` (a /build with the context as its body): how the client's (first) build
    came; ``build`` when it asked for none."""
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


def tar_names(body: bytes) -> list[str]:
    """The entry names of a body-upload build's context archive (normalised: ``./Dockerfile`` is ``Dockerfile``)."""
    try:
        with tarfile.open(fileobj=io.BytesIO(body)) as tar:
            return [os.path.normpath(name) for name in tar.getnames()]
    except tarfile.TarError as exc:
        return [f"(not a tar: {exc})"]
