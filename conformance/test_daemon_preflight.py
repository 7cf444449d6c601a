"""Daemon role, pre-flight: the causes that would fail every case alike get one verdict each
(conformance/preflight.py says what is probed and what the run does with the answer)."""

from __future__ import annotations

import pytest

from . import preflight
from .outcomes import expect, not_applicable

pytestmark = pytest.mark.preflight


@pytest.mark.requirement("HANDSHAKE-8")
def test_daemon_serves_the_session_endpoint(daemon):
    endpoint = preflight.session_endpoint(daemon.host)
    expect("HANDSHAKE-8", endpoint.ok,
           "a daemon with the session protocol: /_ping answers 200 and POST /session is a route (400 without "
           "Upgrade, never 404); without it no other case can run, and none was run",
           endpoint.evidence)


@pytest.mark.requirement("META-1", "META-ENCODE-1")
def test_daemon_speaks_the_generation_it_is_graded_by(daemon):
    check = preflight.generation_check(daemon)
    if daemon.generation not in preflight.PROBED_RULE:
        pytest.skip(f"generation {daemon.generation} runs no DiffCopy build to tell it by")
    rule = preflight.PROBED_RULE[daemon.generation]
    for other in set(preflight.PROBED_RULE.values()) - {rule}:
        not_applicable(other, f"the rule of the other generation than {daemon.generation}")
    expect(rule, check.seen is not None, f"a DiffCopy call that shows generation {daemon.generation}'s metadata form",
           "; ".join(check.evidence))
    expect(rule, not check.disagrees, f"the daemon behaves as generation {daemon.generation}", check.reason())
