"""Each requirement of a case is graded on its own: the verdicts of a case, their aggregation, and the
plugin writing them (results.json, summary.md, junit.xml, the terminal) in a subprocess run."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from conformance.outcomes import (ERROR, FAIL, NON_STRICT, NOT_APPLICABLE, NOT_REACHED, PASS, UNSUPPORTED, XFAIL,
                                  case_verdicts, checks_made, declared_not_applicable, expect, not_applicable,
                                  reset_checks)
from conformance.report import summarise

pytest_plugins = ["pytester"]

# Real catalogue IDs: expect() grades by the catalogue's level.
A, B, C = "DIFFCOPY-DATA-1", "HARDLINK-2", "STAT-OWNER-1"  # MUST
SHOULD = "STAT-PATH-1"
UNNAMED = "HARDLINK-1"


# -- a case's verdicts -------------------------------------------------------------------------------

def test_the_failed_requirement_takes_the_grade_and_the_others_are_not_reached():
    checked = {A: {"passed": 1, "failed": 0}, B: {"passed": 0, "failed": 1}}
    assert case_verdicts([A, B, C], FAIL, B, checked) == {A: NOT_REACHED, B: FAIL, C: NOT_REACHED}
    assert case_verdicts([A, B, C], XFAIL, B, checked) == {A: NOT_REACHED, B: XFAIL, C: NOT_REACHED}
    assert case_verdicts([A, SHOULD], NON_STRICT, SHOULD, {}) == {A: NOT_REACHED, SHOULD: NON_STRICT}


@pytest.mark.parametrize("grade", [PASS, FAIL, ERROR, UNSUPPORTED, "SKIPPED"])
def test_without_a_requirement_to_blame_every_requirement_takes_the_case_outcome(grade):
    assert case_verdicts([A, B], grade, None, {A: {"passed": 1, "failed": 0}}) == {A: grade, B: grade}


# -- the body-upload profile: its rules graded, the others UNSUPPORTED ---------------------------------------

def test_a_profile_grades_its_own_rules_and_makes_the_others_unsupported():
    from conformance.catalogue import in_profile
    from conformance.outcomes import grade_by_profile

    inside = lambda req_id: in_profile("body-upload", req_id)  # noqa: E731
    assert inside("HEALTH-1") and inside("AUTH-V1-1") and inside("BUILD-8") and not inside("BUILD-1")
    assert not inside("DIFFCOPY-DATA-1") and not inside("STAT-MODE-1")
    # the case failed at a profile rule: it keeps its FAIL, the rules outside are UNSUPPORTED
    assert grade_by_profile({"HEALTH-1": FAIL, "DIFFCOPY-DATA-1": NOT_REACHED}, FAIL, "HEALTH-1", inside) == (
        {"HEALTH-1": FAIL, "DIFFCOPY-DATA-1": UNSUPPORTED}, FAIL, {"DIFFCOPY-DATA-1"})
    # a PASS of rules outside the profile is no PASS
    assert grade_by_profile({"DIFFCOPY-DATA-1": PASS}, PASS, None, inside) == (
        {"DIFFCOPY-DATA-1": UNSUPPORTED}, UNSUPPORTED, {"DIFFCOPY-DATA-1"})
    # a plain assert (no rule to blame): the profile's rules were not reached, the case is UNSUPPORTED
    assert grade_by_profile({"HEALTH-1": FAIL, "STAT-MODE-1": FAIL}, FAIL, None, inside) == (
        {"HEALTH-1": NOT_REACHED, "STAT-MODE-1": UNSUPPORTED}, UNSUPPORTED, {"STAT-MODE-1"})
    # a harness ERROR stays an ERROR, unless a call the client does not implement broke the scenario
    assert grade_by_profile({"HEALTH-1": ERROR}, ERROR, None, inside)[1] == ERROR
    assert grade_by_profile({"HEALTH-1": ERROR}, ERROR, None, inside, missing_service=True)[1] == UNSUPPORTED


def test_a_check_of_an_unnamed_requirement_is_graded_too():
    assert case_verdicts([A], PASS, None, {UNNAMED: {"passed": 1, "failed": 0}}) == {A: PASS, UNNAMED: PASS}
    assert case_verdicts([A], FAIL, UNNAMED, {UNNAMED: {"passed": 0, "failed": 1}}) == {A: NOT_REACHED,
                                                                                           UNNAMED: FAIL}


def test_a_requirement_declared_not_applicable_stays_so_unless_it_ended_the_case():
    assert case_verdicts([A, B], PASS, None, {A: {"passed": 1, "failed": 0}}, {B: "why"}) == {
        A: PASS, B: NOT_APPLICABLE}
    assert case_verdicts([A, B, C], FAIL, A, {}, {B: "why"}) == {A: FAIL, B: NOT_APPLICABLE, C: NOT_REACHED}
    assert case_verdicts([A, B], ERROR, None, {}, {B: "why"}) == {A: ERROR, B: NOT_APPLICABLE}
    assert case_verdicts([A], FAIL, A, {}, {A: "why"}) == {A: FAIL}  # its own failed check is not hidden
    assert case_verdicts([A], PASS, None, {}, {UNNAMED: "why"}) == {A: PASS}  # claims nothing of UNNAMED


def test_expect_counts_each_check_it_makes():
    reset_checks()
    expect(A, True, "x", "x")
    expect(A, True, "x", "x")
    with pytest.raises(AssertionError):
        expect(B, False, "x", "y")
    not_applicable(C, "the target builds another way")
    assert checks_made() == {A: {"passed": 2, "failed": 0}, B: {"passed": 0, "failed": 1}}
    assert declared_not_applicable() == {C: "the target builds another way"}
    reset_checks()
    assert checks_made() == {} and declared_not_applicable() == {}


# -- aggregation over cases ----------------------------------------------------------------------------

def _record(nodeid: str, outcome: str, verdicts: dict | None, requirements=(A, B, C)) -> dict:
    record = {"nodeid": nodeid, "requirements": list(requirements), "outcome": outcome, "targets": {}}
    if verdicts is not None:
        record["verdicts"] = verdicts
    return record


def test_another_cases_verdict_decides_over_not_reached():
    summary = summarise([_record("t::stops", FAIL, {A: NOT_REACHED, B: FAIL, C: NOT_REACHED}),
                         _record("t::c", PASS, {C: PASS}, [C]),
                         _record("t::a", UNSUPPORTED, {A: UNSUPPORTED}, [A])])
    grades = {req_id: entry["outcome"] for req_id, entry in summary["requirements"].items()}
    assert grades == {A: UNSUPPORTED, B: FAIL, C: PASS}
    assert summary["targets"] == {"core": {FAIL: 1, PASS: 1, UNSUPPORTED: 1}}  # counts stay per case


def test_not_reached_ranks_only_above_skipped():
    summary = summarise([_record("t::stops", FAIL, {A: NOT_REACHED, B: FAIL}, [A, B]),
                         _record("t::skipped", "SKIPPED", {A: "SKIPPED"}, [A])])
    assert summary["requirements"][A]["outcome"] == NOT_REACHED


def test_a_case_that_graded_the_requirement_outranks_not_applicable_which_outranks_not_reached():
    summary = summarise([_record("t::na", PASS, {A: PASS, B: NOT_APPLICABLE}, [A, B]),
                         _record("t::stops", FAIL, {B: NOT_REACHED, C: FAIL}, [B, C]),
                         _record("t::pass", PASS, {A: NOT_APPLICABLE}, [A])])
    assert {r: e["outcome"] for r, e in summary["requirements"].items()} == {A: PASS, B: NOT_APPLICABLE, C: FAIL}


def test_a_record_without_verdicts_gives_its_outcome_to_every_requirement():
    summary = summarise([_record("t::old", FAIL, None)])
    assert {r: e["outcome"] for r, e in summary["requirements"].items()} == {A: FAIL, B: FAIL, C: FAIL}


# -- the plugin, in a subprocess ------------------------------------------------------------------------

HEADER = f'''
import threading
import pytest
from conformance import plugin
from conformance.outcomes import expect, not_applicable, unsupported

A, B, C, SHOULD, UNNAMED = {A!r}, {B!r}, {C!r}, {SHOULD!r}, {UNNAMED!r}
'''

STOPS_AT_B = HEADER + '''
@pytest.mark.requirement(A, B, C)
def test_stops_at_b():
    expect(A, True, "a", "a")
    expect(B, False, "b", "not b")
    expect(C, True, "c", "c")

@pytest.mark.requirement(C)
def test_c_alone():
    expect(C, True, "c", "c")
'''

KINDS = HEADER + '''
@pytest.fixture
def b_is_a_known_deviation(request):
    # what the daemon and client fixtures do for an identified target whose deviation SPEC.md lists
    request.node.stash.setdefault(plugin._DEVIATIONS_KEY, {})[B] = f"known deviation of the target from {B}"

@pytest.mark.requirement(A, B, C)
def test_plain_assert():
    expect(A, True, "a", "a")
    assert "harness" == "expected"

@pytest.mark.requirement(A, B, C)
def test_unsupported():
    expect(A, True, "a", "a")
    unsupported("the peer does not offer it")

@pytest.mark.requirement(A, B, C)
def test_known_deviation(b_is_a_known_deviation):
    expect(A, True, "a", "a")
    expect(B, False, "b", "not b")

@pytest.mark.requirement(A, SHOULD)
def test_should_not_met():
    expect(A, True, "a", "a")
    expect(SHOULD, False, "should", "did not")

@pytest.mark.requirement(A)
def test_checks_an_unnamed_requirement():
    expect(A, True, "a", "a")
    expect(UNNAMED, True, "u", "u")

@pytest.mark.requirement(A, B, C)
def test_b_not_applicable_then_a_fails():
    not_applicable(B, "the target builds another way")
    not_applicable(UNNAMED, "nothing to do with this case")
    expect(A, False, "a", "not a")

@pytest.mark.requirement(A, B)
def test_helper_thread_fails_b():
    failures = []
    def serve():
        try:
            expect(A, True, "a", "a")
            expect(B, False, "b", "not b")
        except AssertionError as exc:
            failures.append(exc)
    thread = threading.Thread(target=serve)
    thread.start()
    thread.join()
    raise failures[0]
'''

WORKERS = pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["serial", "xdist"])


def _run(pytester, module: str, workers: list[str]):
    pytester.makepyfile(**{module: {"test_stop": STOPS_AT_B, "test_kinds": KINDS}[module]})
    report_dir = pytester.path / "reports"
    result = pytester.runpytest_subprocess("--report-dir", str(report_dir), "-p", "no:cacheprovider", *workers)
    data = json.loads((report_dir / "results.json").read_text())
    return result, report_dir, data, {t["name"]: t for t in data["tests"]}


@WORKERS
def test_a_case_that_stops_at_b_accuses_only_b(pytester, workers):
    result, report_dir, data, tests = _run(pytester, "test_stop", workers)
    assert tests["test_stops_at_b"]["outcome"] == FAIL  # the case outcome keeps its meaning
    assert tests["test_stops_at_b"]["verdicts"] == {A: NOT_REACHED, B: FAIL, C: NOT_REACHED}
    assert tests["test_stops_at_b"]["checks"] == {A: {"passed": 1, "failed": 0}, B: {"passed": 0, "failed": 1}}
    assert tests["test_c_alone"]["verdicts"] == {C: PASS}
    assert {r: e["outcome"] for r, e in data["requirements"].items()} == {A: NOT_REACHED, B: FAIL, C: PASS}
    assert data["targets"] == {"core": {FAIL: 1, PASS: 1}}

    summary = (report_dir / "summary.md").read_text()
    assert f"| {B} | MUST | FAIL | core: FAIL |" in summary
    assert f"| {C} | MUST | PASS | core: PASS |" in summary
    assert f"| {A} | MUST | NOT REACHED | core: NOT REACHED |" in summary
    assert f"Requirements: {A} NOT REACHED, {B} FAIL, {C} NOT REACHED" in summary

    result.stdout.re_match_lines([r"=+ conformance verdicts =+", rf"FAIL +{B} \(MUST\) on core: .*",
                                  rf"not reached: 1 requirement on core, .*: {A}$", r"cases: 1 PASS, 1 FAIL, .*"])
    assert not any(A in line or C in line for line in result.stdout.lines if line.startswith("FAIL "))

    case = next(c for c in ET.parse(report_dir / "junit.xml").getroot().iter("testcase")
                if c.get("name") == "test_stops_at_b")
    properties = {p.get("name"): p.get("value") for p in case.iter("property")}
    assert {k: v for k, v in properties.items() if k.startswith("verdict:")} == {
        f"verdict:{A}": NOT_REACHED, f"verdict:{B}": FAIL, f"verdict:{C}": NOT_REACHED}
    assert properties["outcome"] == FAIL


@WORKERS
def test_each_way_a_case_ends_grades_its_requirements(pytester, workers):
    result, _, data, tests = _run(pytester, "test_kinds", workers)
    verdicts = {name: t["verdicts"] for name, t in tests.items()}
    assert verdicts == {
        "test_plain_assert": {A: FAIL, B: FAIL, C: FAIL},  # nothing to blame but the whole case
        "test_unsupported": {A: UNSUPPORTED, B: UNSUPPORTED, C: UNSUPPORTED},
        "test_known_deviation": {A: NOT_REACHED, B: XFAIL, C: NOT_REACHED},
        "test_should_not_met": {A: NOT_REACHED, SHOULD: NON_STRICT},
        "test_checks_an_unnamed_requirement": {A: PASS, UNNAMED: PASS},
        "test_helper_thread_fails_b": {A: NOT_REACHED, B: FAIL},
        "test_b_not_applicable_then_a_fails": {A: FAIL, B: NOT_APPLICABLE, C: NOT_REACHED},
    }
    assert tests["test_b_not_applicable_then_a_fails"]["not_applicable"] == {B: "the target builds another way"}
    assert tests["test_helper_thread_fails_b"]["checks"] == {A: {"passed": 1, "failed": 0},
                                                             B: {"passed": 0, "failed": 1}}
    assert tests["test_checks_an_unnamed_requirement"]["unnamed_checks"] == [UNNAMED]
    assert data["requirements"][UNNAMED]["outcome"] == PASS
    result.stdout.re_match_lines([(rf"harness warning: test_kinds.py::test_checks_an_unnamed_requirement checks "
                                   rf"{UNNAMED}, which its requirement marker does not name")])
    # the terminal: one line per non-PASS requirement in the grading's words, the counts, where the report is
    # (a requirement's line has its worst verdict over the run's cases: test_an_xfail_... shows the others)
    result.stdout.re_match_lines([r"=+ conformance verdicts =+", rf"FAIL +{A} \(MUST\) on core: .*",
                                  rf"FAIL +{B} \(MUST\) on core: .*", rf"FAIL +{C} \(MUST\) on core: .*",
                                  rf"NON-STRICT +{SHOULD} \(SHOULD\) on core: .*",
                                  r"cases: 1 PASS, 3 FAIL, 1 NON-STRICT, 1 UNSUPPORTED, 1 XFAIL, 0 ERROR",
                                  r"report: .*/summary.md \(results.json, junit.xml\)"])
    # summary.md opens with what was tested, when and how long, and the options; an XFAIL gives its deviation
    summary = (pytester.path / "reports" / "summary.md").read_text().splitlines()
    assert summary[2] == "## Identified implementations", summary[:10]
    assert any(line.startswith("Run: started ") and line.endswith(" s") for line in summary[:8]), summary[:10]
    assert any(line.startswith("Options: ") and "known_deviations=on" in line for line in summary[:10]), summary[:10]
    xfail = summary.index("### XFAIL: `test_kinds.py::test_known_deviation`")
    assert f"- Known deviation (conformance/SPEC.md): known deviation of the target from {B}" in summary[xfail:xfail + 12]
    assert tests["test_known_deviation"]["known_deviation"] == f"known deviation of the target from {B}"


XFAIL_AND_UNSUPPORTED = f"""
import pytest
from conformance import plugin
from conformance.outcomes import expect, unsupported

@pytest.fixture
def b_is_a_known_deviation(request):
    request.node.stash.setdefault(plugin._DEVIATIONS_KEY, {{}})[{B!r}] = "known deviation of the target from {B}"

@pytest.mark.requirement({B!r})
def test_known_deviation(b_is_a_known_deviation):
    expect({B!r}, False, "b", "not b")

@pytest.mark.requirement({C!r})
def test_unsupported():
    unsupported("the peer does not offer it")
"""


def test_an_xfail_and_an_unsupported_requirement_each_get_their_terminal_line(pytester):
    pytester.makepyfile(test_lines=XFAIL_AND_UNSUPPORTED)
    result = pytester.runpytest_subprocess("--report-dir", str(pytester.path / "reports"), "-p", "no:cacheprovider")
    result.stdout.re_match_lines([r"=+ conformance verdicts =+", rf"XFAIL +{B} \(MUST\) on core: .*",
                                  rf"UNSUPPORTED +{C} \(MUST\) on core: .*",
                                  r"cases: 0 PASS, 0 FAIL, 0 NON-STRICT, 1 UNSUPPORTED, 1 XFAIL, 0 ERROR",
                                  r"report: .*/summary.md \(results.json, junit.xml\)"])
