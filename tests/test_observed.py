"""conformance.observed: per-requirement, per-real-peer grades from interop results into SPEC.md lines."""

import json
from pathlib import Path

import pytest

from conformance import catalogue, observed


@pytest.mark.parametrize("implementation, name", [
    ("dockerd 20.10.24+dfsg1", "dockerd 20.10.24"),
    ("dockerd 26.1.5+dfsg1", "dockerd 26.1.5"),
    ("docker CLI 20.10.24+dfsg1", "docker CLI 20.10.24"),
    ("docker CLI 26.1.5+dfsg1 + buildx 0.13.1+ds1", "buildx 0.13.1"),
    ("reference-daemon 0.1.0 (n+1)", None),
    ("reference-client 0.1 (n) via grpcio", None),
])
def test_only_real_peers_are_named(implementation, name):
    assert observed.real_peer_name(implementation) == name


def _record(reqs, outcome, failed=None, daemon="dockerd 26.1.5+dfsg1"):
    return {"requirements": reqs, "outcome": outcome, "failed_requirement": failed,
            "implementations": {"daemon": daemon}}


def _write_run(root: Path, name: str, records: list) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "results.json").write_text(json.dumps({"tests": records}))


def test_grades_per_peer_take_the_worst_case_and_skip_unreached_requirements(tmp_path):
    _write_run(tmp_path, "a", [
        _record(["HEALTH-1", "HEALTH-2"], "PASS"),
        _record(["HEALTH-2", "HEALTH-4"], "XFAIL", failed="HEALTH-4"),
        _record(["HEALTH-1"], "XFAIL", failed="HEALTH-1", daemon="dockerd 20.10.24+dfsg1"),
        _record(["ROLE-1"], "PASS", daemon="reference-daemon 0.1.0 (n+1)"),
    ])
    _write_run(tmp_path, "b", [_record(["HEALTH-1"], "FAIL", failed="HEALTH-1")])
    result = observed.observe(str(tmp_path))
    assert result["HEALTH-1"] == {"dockerd 26.1.5": "fails", "dockerd 20.10.24": "known deviation"}
    assert result["HEALTH-2"] == {"dockerd 26.1.5": "conforms"}  # held in the PASS; not reached in the XFAIL
    assert result["HEALTH-4"] == {"dockerd 26.1.5": "known deviation"}
    assert "ROLE-1" not in result, "the reference daemon is no real peer"


def test_a_peer_is_graded_only_by_the_rules_of_its_generation(tmp_path):
    # HEALTH-3 (1 s checks) binds n, HEALTH-5 (5 s checks) n+1: a case naming both grades each peer by one.
    _write_run(tmp_path, "a", [_record(["HEALTH-3", "HEALTH-5"], "PASS", daemon="dockerd 20.10.24+dfsg1"),
                               _record(["HEALTH-3", "HEALTH-5"], "PASS", daemon="dockerd 26.1.5+dfsg1")])
    result = observed.observe(str(tmp_path))
    assert result["HEALTH-3"] == {"dockerd 20.10.24": "conforms"}
    assert result["HEALTH-5"] == {"dockerd 26.1.5": "conforms"}
    assert observed.generation_of("buildx 0.13.1") == "n+1" and observed.generation_of("docker CLI 20.10.24") == "n"


def test_rewrite_spec_adds_and_replaces_the_line_of_every_rule(tmp_path, monkeypatch):
    spec = tmp_path / "SPEC.md"
    source = Path(catalogue.__file__).with_name("SPEC.md").read_text().split("\n")
    spec.write_text("\n".join(line for line in source if not line.startswith("Real peers:")))  # lines to add
    grades = {"HEALTH-1": {"dockerd 26.1.5": "conforms", "dockerd 20.10.24": "conforms"}}
    rules = len(catalogue.load_catalogue())
    assert observed.rewrite_spec(str(spec), grades) >= rules - 1  # each rule gained (or kept) its line
    parsed = catalogue.parse_catalogue(spec.read_text())
    assert parsed["HEALTH-1"].real_peers == "dockerd 20.10.24 conforms; dockerd 26.1.5 conforms."
    assert all(rule.real_peers for rule in parsed.values())
    n_minus_1 = [rule for rule in parsed.values() if rule.generations == ("n-1",)]
    assert n_minus_1 and all(rule.real_peers.startswith("none") for rule in n_minus_1)
    before = spec.read_text()
    assert observed.rewrite_spec(str(spec), grades) == 0 and spec.read_text() == before, "idempotent"
    # Everything but the Real peers lines is untouched.
    original = source
    kept = [line for line in before.split("\n") if not line.startswith("Real peers:")]
    assert [line for line in original if not line.startswith("Real peers:")] == kept


def test_rewrite_spec_can_touch_only_the_named_rules(tmp_path):
    """A run of some cases updates the lines of its rules and leaves the others as the last full run wrote them."""
    spec = tmp_path / "SPEC.md"
    source = Path(catalogue.__file__).with_name("SPEC.md").read_text()
    spec.write_text(source)
    grades = {"HEALTH-1": {"dockerd 26.1.5": "fails"}, "HEALTH-3": {"dockerd 26.1.5": "fails"}}
    assert observed.rewrite_spec(str(spec), grades, only={"HEALTH-1"}) == 1
    parsed, before = catalogue.parse_catalogue(spec.read_text()), catalogue.parse_catalogue(source)
    assert parsed["HEALTH-1"].real_peers == "dockerd 26.1.5 fails."
    assert all(parsed[i].real_peers == before[i].real_peers for i in before if i != "HEALTH-1")
