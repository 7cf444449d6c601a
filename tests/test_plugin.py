"""The conformance plugin's grading and reports, on a tiny suite run in a subprocess."""

from __future__ import annotations

import json
import pathlib
import re
import sys
import xml.etree.ElementTree as ET

import pytest

pytest_plugins = ["pytester"]

ROOT = pathlib.Path(__file__).resolve().parent.parent

SUITE = '''
import pytest
from conformance.outcomes import expect, unsupported

@pytest.mark.requirement("HANDSHAKE-1")
def test_pass():
    expect("HANDSHAKE-1", True, "x", "x")

@pytest.mark.requirement("HANDSHAKE-2")
def test_fail():
    expect("HANDSHAKE-2", False, "one Uuid header", "two", ["> line one", "< line two"])

@pytest.mark.requirement("HANDSHAKE-3")
def test_should_not_met():
    expect("HANDSHAKE-3", False, "a stable key", "a new key each run")

@pytest.mark.requirement("METHODS-1")
def test_optional_missing():
    unsupported("the peer does not advertise it")

@pytest.mark.requirement("METHODS-2")
def test_harness_breaks():
    raise KeyError("harness bug")
'''


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["serial", "xdist"])
def test_graded_outcomes_and_reports(pytester, workers):
    pytester.makepyfile(test_tiny=SUITE)
    report_dir = pytester.path / "reports"
    result = pytester.runpytest_subprocess("--report-dir", str(report_dir), "-p", "no:cacheprovider", *workers)
    assert result.ret != 0  # a FAIL and a harness ERROR never end in success
    result.stdout.re_match_lines([r".*2 failed, 2 passed, 1 skipped.*"])
    data = json.loads((report_dir / "results.json").read_text())
    outcomes = {t["name"]: t["outcome"] for t in data["tests"]}
    assert outcomes == {"test_pass": "PASS", "test_fail": "FAIL", "test_should_not_met": "NON-STRICT",
                        "test_optional_missing": "UNSUPPORTED", "test_harness_breaks": "ERROR"}
    failing = next(t for t in data["tests"] if t["name"] == "test_fail")
    assert (failing["expected"], failing["actual"]) == ("one Uuid header", "two")
    assert failing["transcript"] == ["> line one", "< line two"]
    assert data["requirements"]["HANDSHAKE-2"]["outcome"] == "FAIL"
    # one requirement per case: its verdict is the case's outcome (tests/test_requirement_grading.py: several)
    assert {t["name"]: t["verdicts"] for t in data["tests"]} == {
        t["name"]: {t["requirements"][0]: t["outcome"]} for t in data["tests"]}
    summary = (report_dir / "summary.md").read_text()
    assert "HANDSHAKE-2" in summary and "one Uuid header" in summary and "< line two" in summary
    cases = list(ET.parse(report_dir / "junit.xml").getroot().iter("testcase"))
    assert sorted(c.get("name") for c in cases) == sorted(outcomes)
    properties = {c.get("name"): {p.get("name"): p.get("value") for p in c.iter("property")} for c in cases}
    assert properties["test_fail"]["verdict:HANDSHAKE-2"] == "FAIL"
    assert properties["test_should_not_met"]["verdict:HANDSHAKE-3"] == "NON-STRICT"


def test_failure_message_names_requirement_expected_actual(pytester):
    pytester.makepyfile(test_one=SUITE)
    result = pytester.runpytest_subprocess("-k", "test_fail", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["*-> HANDSHAKE-2 (MUST):*", "*Expected: one Uuid header*", "*Actual:   two*",
                                 "*Transcript:*"])


def test_requirement_option_selects_the_cases_of_those_ids(pytester):
    pytester.makepyfile(test_tiny=SUITE)
    result = pytester.runpytest_subprocess("--requirement", "HANDSHAKE-1,METHODS-1", "-p", "no:cacheprovider")
    result.stdout.re_match_lines([r".*1 passed, 1 skipped, 3 deselected.*"])
    typo = pytester.runpytest_subprocess("--requirement", "HANDSHAKE-99", "-p", "no:cacheprovider")
    assert typo.ret != 0
    typo.stderr.re_match_lines([r".*--requirement: not in conformance/SPEC.md: HANDSHAKE-99.*"])


def test_terminal_verdicts_and_a_rerun_command_per_case(pytester):
    pytester.makepyfile(test_tiny=SUITE)
    report_dir = pytester.path / "reports"
    result = pytester.runpytest_subprocess("--report-dir", str(report_dir), "-p", "no:cacheprovider")
    result.stdout.re_match_lines([r"=+ conformance verdicts =+",
                                  r"ERROR +METHODS-2 \(MUST\) on core: .*",
                                  r"FAIL +HANDSHAKE-2 \(MUST\) on core: .*",
                                  r"NON-STRICT +HANDSHAKE-3 \(SHOULD\) on core: .*",
                                  r"UNSUPPORTED +METHODS-1 \(MUST\) on core: .*",
                                  r"cases: 1 PASS, 1 FAIL, 1 NON-STRICT, 1 UNSUPPORTED, 0 XFAIL, 1 ERROR",
                                  rf"report: {report_dir}/summary.md .*"])
    # a test outside the installed package (tests/ of a clone, here pytester's directory): its node id
    result.stdout.re_match_lines([r".*rerun this case.*", r"python -m pytest test_tiny.py::test_fail .*"])
    data = json.loads((report_dir / "results.json").read_text())
    rerun = next(t["rerun"] for t in data["tests"] if t["name"] == "test_fail")
    assert rerun.startswith("python -m pytest test_tiny.py::test_fail ")
    again = pytester.run(*rerun.replace("python", sys.executable, 1).split())
    again.stdout.re_match_lines([r".*1 failed in .*"])  # exactly that case, nothing else


# An unrelated project in an environment where the suite is installed: a `client` fixture of its own and a marker
# the suite uses too.
UNRELATED = '''
import pytest

@pytest.fixture
def client():
    return "the project's own client"

def test_own_client(client):
    assert client == "the project's own client"

@pytest.mark.slow
def test_slow():
    pass
'''

SUITE_MARKERS = "".join(f"    {line}\n" for line in ("slow: x", "requirement: x", "destructive: x", "real_peer: x"))


def _normalised(lines: list[str]) -> list[str]:
    return [re.sub(r" in [0-9.]+s( \(.*\))?", " in Ns", line) for line in lines]


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["serial", "xdist"])
def test_a_run_without_conformance_cases_is_left_alone(pytester, monkeypatch, workers):
    pytester.makepyfile(test_unrelated=UNRELATED)
    monkeypatch.setenv("SESSION_REPORT_DIR", str(pytester.path / "reports"))
    warnings = ("-W", "error::pytest.PytestUnknownMarkWarning")
    with_plugin = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", *warnings, *workers)
    assert with_plugin.ret == 0, with_plugin.stdout.str()
    with_plugin.assert_outcomes(passed=2)  # the project's `client` is not parametrized by the suite
    written = {path.name for path in pytester.path.rglob("*")} & {"reports", "junit.xml", "results.json", "summary.md"}
    assert not written
    output = with_plugin.stdout.str() + with_plugin.stderr.str()
    assert "UnknownMark" not in output and "conformance" not in output
    # the same run without the plugin (its markers declared by the project instead) prints the same lines
    pytester.makeini("[pytest]\nmarkers =\n" + SUITE_MARKERS)
    without = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", *warnings,
                                            "-p", "no:docker_session_conformance", *workers)
    assert without.ret == 0, without.stdout.str()
    assert _normalised(with_plugin.outlines) == _normalised(without.outlines)


def test_an_unrelated_project_sees_the_options(pytester):
    result = pytester.runpytest_subprocess("--help")
    result.stdout.fnmatch_lines(["*Docker client session conformance*", "*--daemon-under-test*", "*--report-dir*"])


def test_every_marker_the_project_uses_is_registered_by_the_plugin(pytester):
    from conformance.plugin import MARKERS

    registered = {line.split(":")[0].split("(")[0] for line in MARKERS}
    builtin = {"parametrize", "skip", "skipif", "xfail", "usefixtures", "filterwarnings",
               "timeout"}  # pytest's own, and pytest-timeout's (registered by it)
    used = set()
    for folder in ("conformance", "tests"):
        for path in (ROOT / folder).glob("*.py"):
            used |= set(re.findall(r"pytest\.mark\.([a-z_]+)", path.read_text()))
    assert used - builtin <= registered, f"not registered by conformance/plugin.py: {sorted(used - builtin - registered)}"
    # and, installed, nothing warns: the project's own markers are not needed
    pytester.makepyfile(test_marks="".join(
        f"import pytest\n\n@pytest.mark.{name}\ndef test_{name}():\n    pass\n\n" for name in sorted(registered)))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error::pytest.PytestUnknownMarkWarning")
    result.assert_outcomes(passed=len(registered))


def test_a_suite_case_rerun_line_pasted_in_another_directory_reruns_exactly_that_case(tmp_path):
    """The rerun of a case of the suite works wherever it is pasted (``--pyargs``: installed or in a clone)."""
    import os
    import shlex
    import subprocess

    report_dir = tmp_path / "reports"
    subprocess.run([sys.executable, "-m", "pytest", "--pyargs", "conformance.test_daemon_preflight", "-p",
                    "no:cacheprovider", "-q", "--report-dir", str(report_dir)], cwd=tmp_path, capture_output=True,
                   timeout=300, check=False)
    records = json.loads((report_dir / "results.json").read_text())["tests"]
    record = next(t for t in records if t["name"] == "test_daemon_serves_the_session_endpoint[daemon=reference-n+1]")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    argv = shlex.split(record["rerun"])
    assert argv[:4] == ["python", "-m", "pytest", "--pyargs"], argv
    again = subprocess.run([sys.executable, *argv[1:], "-q"], cwd=elsewhere, capture_output=True, text=True,
                           timeout=300, env={**os.environ})
    assert again.returncode == 0 and "1 passed" in again.stdout, again.stdout[-2000:] + again.stderr[-2000:]


def test_embedded_generations_choose_the_embedded_pairs():
    from conformance.targets import (DEFAULT_EMBEDDED_GENERATIONS, embedded_client_specs, embedded_daemon_specs,
                                     embedded_generations)

    assert embedded_generations(DEFAULT_EMBEDDED_GENERATIONS) == ("n", "n+1")  # what real Docker has
    assert embedded_generations("all") == ("n-1", "n", "n+1")
    assert embedded_generations("n+1, n-1") == ("n-1", "n+1")
    with pytest.raises(ValueError, match="n-2"):
        embedded_generations("n,n-2")
    assert [s.name for s in embedded_daemon_specs(("n", "n+1"))] == ["reference-n-grpcio", "reference-n+1"]
    assert [s.generation for s in embedded_client_specs(("n-1",))] == ["n-1"]


def test_an_n_minus_1_case_reruns_with_the_generations_it_ran_with(tmp_path):
    """A case of the n-1 pair, from a run with --embedded-generations all, carries the option in its rerun."""
    import shlex
    import subprocess

    report_dir = tmp_path / "reports"
    done = subprocess.run([sys.executable, "-m", "pytest", "--pyargs", "conformance.test_daemon_preflight", "-p",
                           "no:cacheprovider", "-q", "--report-dir", str(report_dir), "--embedded-generations", "all"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    results = json.loads((report_dir / "results.json").read_text())
    assert results["options"]["embedded_generations"] == ["n-1", "n", "n+1"]
    record = next((t for t in results["tests"] if "reference-n-1" in t["name"]), None)
    assert record is not None, done.stdout[-2000:]
    assert "--embedded-generations n-1,n,n+1" in record["rerun"], record["rerun"]
    default = subprocess.run([sys.executable, "-m", "pytest", "--pyargs", "conformance.test_daemon_preflight", "-p",
                              "no:cacheprovider", "-q", "--collect-only"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=300)
    assert "reference-n-1" not in default.stdout and "reference-n+1" in default.stdout, default.stdout[-2000:]
