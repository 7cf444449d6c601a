"""pytest plugin for differential runs: ``-p conformance.differential --differential-daemon URL``.

It only owns the option; conformance/test_differential.py reads it (and skips without it), so the test
file stays collectable in runs that do not load this plugin.
"""

from __future__ import annotations

import os

import pytest

OPTION = "differential_daemon"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("session-conformance", "Docker client session conformance")
    group.addoption("--differential-daemon", dest=OPTION, default=os.environ.get("SESSION_DIFFERENTIAL_DAEMON"),
                    help="Engine API URL of a real dockerd; the same docker CLI builds go to it and to the "
                         "reference daemon, and their local exports must be identical")
