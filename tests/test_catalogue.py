"""The requirement catalogue: SPEC.md parses, its IDs are sound, and malformed input is refused clearly."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from conformance import catalogue
from conformance.catalogue import (
    GENERATIONS,
    LEVELS,
    ROLES,
    CatalogueError,
    Requirement,
    load_catalogue,
    parse_catalogue,
    requirement_ids_for_level,
)

SPEC_PATH = Path(catalogue.__file__).with_name("SPEC.md")

# IDs the lead and the brief refer to by name; renaming them would break the mapping of tests to rules.
ANCHOR_IDS = (
    "HANDSHAKE-3",
    "DIFFCOPY-ORDER-1",
    "STAT-MODE-2",
    "HEALTH-1",
    "NEGOTIATE-2",
    "AUTH-V2-3",
)

# Areas the brief asks SPEC.md to cover with rules.
REQUIRED_AREAS = (
    "Overview and roles",
    "Handshake",
    "Method advertisement",
    "Health",
    "FileSync DiffCopy",
    "Stat encoding",
    "Ordering and validation",
    "Incremental semantics",
    "Metadata",
    ".dockerignore handling",
    "TarStream",
    "Negotiation",
    "FileSend",
    "Registry auth",
    "Secrets",
    "Build API",
    "Timeouts and errors",
    "Safety",
)

MINIMAL_DOCUMENT = """\
# Title

## Area

#### AREA-1 (MUST; client; all)
The client MUST do a thing. It does it quickly.

Upstream: somewhere:file.go:1-2
"""


@pytest.fixture(scope="module")
def requirements() -> dict[str, Requirement]:
    return load_catalogue()


def test_catalogue_loads_every_rule_heading(requirements):
    heading_lines = [line for line in SPEC_PATH.read_text(encoding="utf-8").splitlines() if line.startswith("#### ")]
    assert len(requirements) == len(heading_lines)
    assert 80 <= len(requirements) <= 200


def test_ids_are_unique_and_well_formed(requirements):
    ids = [requirement.id for requirement in requirements.values()]
    assert len(ids) == len(set(ids))
    assert all(catalogue.ID_PATTERN.match(rule_id) for rule_id in ids)
    assert all(key == requirement.id for key, requirement in requirements.items())


def test_anchor_ids_exist(requirements):
    assert set(ANCHOR_IDS) <= set(requirements)


def test_every_required_area_has_a_must(requirements):
    musts_per_area = Counter(r.section for r in requirements.values() if r.level == "MUST")
    areas = {r.section for r in requirements.values()}
    assert set(REQUIRED_AREAS) <= areas
    assert all(musts_per_area[area] >= 1 for area in areas)


def test_level_counts_are_sensible(requirements):
    counts = Counter(r.level for r in requirements.values())
    assert counts["MUST"] >= 60
    assert counts["SHOULD"] >= 8
    assert counts["MAY"] >= 1
    assert counts["MUST"] > counts["SHOULD"] + counts["MAY"]


def test_every_role_and_generation_is_bound(requirements):
    for role in ROLES:
        assert sum(r.binds(role) for r in requirements.values()) >= 10, role
    assert sum(r.generations == ("n-1",) for r in requirements.values()) >= 3
    assert sum(r.generations == ("n", "n+1") for r in requirements.values()) >= 60
    assert sum(r.generations == ("all",) for r in requirements.values()) >= 20


def test_attributes_use_the_known_vocabulary(requirements):
    for requirement in requirements.values():
        assert requirement.level in LEVELS
        assert requirement.roles and set(requirement.roles) <= set(ROLES)
        assert requirement.generations and set(requirement.generations) <= set(GENERATIONS)
        assert requirement.text.startswith(requirement.title)
        assert requirement.title.endswith((".", "!", "?")), requirement.id
        # The level in the heading is the strongest keyword of the rule, so the keyword appears in the text.
        assert requirement.level in requirement.text, requirement.id


def test_known_deviations_name_an_implementation_and_version(requirements):
    deviating = [r for r in requirements.values() if r.known_deviations]
    assert len(deviating) >= 10
    implementation = re.compile(r"\b(dockerd|docker CLI) \d+\.\d+\.\d+\b")
    for requirement in deviating:
        assert implementation.search(requirement.known_deviations), requirement.id


def test_protocol_notes_deviations_are_recorded(requirements):
    """Section 11 of the protocol notes: bare `..`/`.` accepted and no stall timeout in dockerd 20.10.24."""
    assert "dockerd 20.10.24" in requirements["VALIDATE-PATH-3"].known_deviations
    assert "dockerd 20.10.24" in requirements["TIMEOUT-3"].known_deviations
    assert requirements["TIMEOUT-3"].level == "SHOULD"


def test_cross_references_point_at_defined_rules(requirements):
    prefixes = {rule_id.rsplit("-", 1)[0] for rule_id in requirements}
    reference = re.compile(r"\b[A-Z][A-Z0-9]*(?:-[A-Z0-9]+)*-\d+\b")
    for requirement in requirements.values():
        for field in (requirement.text, requirement.upstream or "", requirement.observed or ""):
            for token in reference.findall(field):
                if token.rsplit("-", 1)[0] in prefixes:
                    assert token in requirements, f"{requirement.id} refers to undefined {token}"


def test_sections_and_subsections_are_recorded(requirements):
    assert requirements["DIFFCOPY-ORDER-1"].section == "FileSync DiffCopy"
    assert requirements["DIFFCOPY-ORDER-1"].subsection == "Ordering"
    assert requirements["HANDSHAKE-1"].subsection is None


def test_load_catalogue_returns_fresh_dicts():
    first = load_catalogue()
    first.clear()
    assert load_catalogue()


def test_requirement_ids_for_level(requirements):
    musts = requirement_ids_for_level("MUST")
    assert musts == tuple(r.id for r in requirements.values() if r.level == "MUST")
    assert set(musts).isdisjoint(requirement_ids_for_level("SHOULD"))
    with pytest.raises(ValueError, match="unknown level 'MUST NOT'"):
        requirement_ids_for_level("MUST NOT")


def test_generation_and_role_helpers():
    requirement = parse_catalogue(MINIMAL_DOCUMENT)["AREA-1"]
    assert requirement.applies_to("n-1") and requirement.applies_to("n") and requirement.applies_to("n+1")
    assert requirement.binds("client") and not requirement.binds("daemon")
    with pytest.raises(ValueError):
        requirement.binds("server")


def test_minimal_document_fields():
    requirement = parse_catalogue(MINIMAL_DOCUMENT)["AREA-1"]
    assert requirement.level == "MUST"
    assert requirement.roles == ("client",)
    assert requirement.generations == ("all",)
    assert requirement.title == "The client MUST do a thing."
    assert requirement.text == "The client MUST do a thing. It does it quickly."
    assert requirement.upstream == "somewhere:file.go:1-2"
    assert requirement.known_deviations is None
    assert requirement.section == "Area"
    assert requirement.line == 5


def test_trailers_and_paragraphs_are_separated():
    document = """\
## Area
### Sub
#### AREA-7 (SHOULD; sender, receiver; n, n+1)
First paragraph
wrapped over two lines.

Second paragraph.
Upstream: a.go:1
Observed: seen once
Known deviations: dockerd 20.10.24 does not,
and says so on a wrapped line.
"""
    requirement = parse_catalogue(document)["AREA-7"]
    assert requirement.roles == ("sender", "receiver")
    assert requirement.generations == ("n", "n+1")
    assert requirement.applies_to("n")
    assert requirement.text == "First paragraph wrapped over two lines.\n\nSecond paragraph."
    assert requirement.title == "First paragraph wrapped over two lines."
    assert requirement.upstream == "a.go:1"
    assert requirement.observed == "seen once"
    assert requirement.known_deviations == "dockerd 20.10.24 does not, and says so on a wrapped line."
    assert requirement.subsection == "Sub"


@pytest.mark.parametrize(
    ("heading", "message"),
    [
        ("#### AREA-1 MUST; client; all", "malformed rule heading"),
        ("#### AREA-1 (MUST; client)", "2 ';'-separated fields"),
        ("#### AREA-1 (MUSTN'T; client; all)", "unknown level \"MUSTN'T\""),
        ("#### AREA-1 (must; client; all)", "unknown level 'must'"),
        ("#### AREA-1 (MUST; server; all)", "unknown role 'server'"),
        ("#### AREA-1 (MUST; client, client; all)", "role is listed twice"),
        ("#### AREA-1 (MUST; client; n+2)", "unknown generation 'n+2'"),
        ("#### AREA-1 (MUST; client; all, n)", "'all' cannot be combined"),
        ("#### area-1 (MUST; client; all)", "malformed requirement ID 'area-1'"),
        ("#### AREA (MUST; client; all)", "malformed requirement ID 'AREA'"),
        ("#### AREA--1 (MUST; client; all)", "malformed requirement ID 'AREA--1'"),
        ("##### AREA-1 (MUST; client; all)", "unexpected heading level 5"),
    ],
)
def test_malformed_heading_is_rejected_with_a_clear_message(heading, message):
    document = f"## Area\n\n{heading}\nThe client MUST do a thing.\n"
    with pytest.raises(CatalogueError) as raised:
        parse_catalogue(document, source="bad.md")
    assert message in str(raised.value)
    assert str(raised.value).startswith("bad.md:3: ")


def test_duplicate_id_is_rejected():
    document = MINIMAL_DOCUMENT + "\n#### AREA-1 (MAY; daemon; n)\nThe daemon MAY do it too.\n"
    expected = r"<string>:10: duplicate requirement ID AREA-1 \(first defined on line 5\)"
    with pytest.raises(CatalogueError, match=expected):
        parse_catalogue(document)


def test_rule_outside_a_section_is_rejected():
    with pytest.raises(CatalogueError, match="not inside any '##' section"):
        parse_catalogue("# Title\n\n#### AREA-1 (MUST; client; all)\nThe client MUST do a thing.\n")


def test_rule_without_text_is_rejected():
    with pytest.raises(CatalogueError, match="rule AREA-1 has no text"):
        parse_catalogue("## Area\n#### AREA-1 (MUST; client; all)\nUpstream: x\n")


def test_text_after_trailers_is_rejected():
    document = MINIMAL_DOCUMENT + "\nMore text after the Upstream line.\n"
    with pytest.raises(CatalogueError, match="text after its Upstream/Observed/Known deviations/Real peers lines"):
        parse_catalogue(document)


def test_repeated_trailer_is_rejected():
    document = MINIMAL_DOCUMENT + "Upstream: again\n"
    with pytest.raises(CatalogueError, match="more than one 'Upstream:' line"):
        parse_catalogue(document)


def test_headings_inside_code_fences_are_ignored():
    document = MINIMAL_DOCUMENT.replace("# Title\n", "# Title\n\n```\n#### not a rule\n```\n")
    assert list(parse_catalogue(document)) == ["AREA-1"]


def test_catalogue_exports_as_json():
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "conformance.catalogue"], capture_output=True, text=True, check=True)
    data = json.loads(out.stdout)
    assert {r["id"] for r in data} == set(load_catalogue())
    assert all(r["level"] in ("MUST", "SHOULD", "MAY") for r in data)


def test_every_rule_says_on_which_real_peers_it_was_observed(requirements):
    """conformance.observed writes the lines from an interop run; a rule without one was added since."""
    missing = [r.id for r in requirements.values() if not r.real_peers]
    assert not missing, f"run `python -m conformance.observed reports/interop --write` (missing: {missing})"
    for requirement in requirements.values():
        if requirement.generations == ("n-1",):
            assert requirement.real_peers.startswith("none"), requirement.id


def test_retired_ids_are_not_rules_again(requirements):
    text = SPEC_PATH.read_text(encoding="utf-8")
    retired = text[text.index("## Retired requirements"):text.index("## Out of scope")]
    ids = re.findall(r"^\* `([A-Z0-9-]+)`", retired, flags=re.M)
    assert ids and not set(ids) & set(requirements)
