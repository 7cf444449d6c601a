"""The grading of implementations that do only part of the protocol: run the suite in a subprocess against
scripted partial targets and check the verdicts a third party would read (results.json)."""

from __future__ import annotations

import json
import subprocess
import sys


def _suite(tmp_path, *args: str) -> list[dict]:
    report = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--report-dir", str(report),
                           *args], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert (report / "results.json").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((report / "results.json").read_text())["tests"]


def test_a_client_that_exits_before_asking_for_a_build_gets_errors_that_quote_it(tmp_path):
    client = "sh -c 'echo this client cannot build >&2; exit 3' {context}"
    tests = _suite(tmp_path, "--pyargs", "conformance.test_client_session", "conformance.test_client_handshake",
                   "--client-under-test", client)
    graded = [t for t in tests if t["outcome"] != "SKIPPED"]
    assert graded and {t["outcome"] for t in graded} == {"ERROR"}, [(t["name"], t["outcome"]) for t in graded]
    for test in graded:
        # a precondition of the harness, never a requirement's FAIL, with what the client said and its exit status
        assert "harness precondition" in test["message"] and "this client cannot build" in test["message"], test
        assert "exit status 3" in test["message"], test["message"]
        assert set(test["verdicts"].values()) == {"ERROR"}
