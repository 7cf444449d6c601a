"""The suite checks itself: every MUST of the catalogue has at least one test.

Requirement marks are read statically from the suite's test modules, so the
check does not depend on which cases a run selects.
"""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import conformance
from conformance.catalogue import load_catalogue


def _marked_requirements() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for info in pkgutil.iter_modules(conformance.__path__):
        if not info.name.startswith("test_"):
            continue
        module = importlib.import_module(f"conformance.{info.name}")
        for name, obj in vars(module).items():
            candidates = [obj]
            if isinstance(obj, type):  # test classes (e.g. hypothesis state machines' TestCase)
                candidates += [getattr(obj, n) for n in dir(obj) if n.startswith("test") or n == "runTest"]
            for fn in candidates:
                marks = list(getattr(fn, "pytestmark", []) or [])
                if isinstance(obj, type):
                    marks += list(getattr(obj, "pytestmark", []) or [])
                for mark in marks:
                    if mark.name == "requirement":
                        for req_id in mark.args:
                            found.setdefault(req_id, []).append(f"{info.name}::{name}")
    return found


def test_every_must_has_a_test():
    catalogue = load_catalogue()
    marked = _marked_requirements()
    missing = sorted(r.id for r in catalogue.values() if r.level == "MUST" and r.id not in marked)
    assert not missing, f"{len(missing)} MUST requirements have no test: {', '.join(missing)}"


def test_marks_name_only_known_requirements():
    catalogue = load_catalogue()
    unknown = sorted(set(_marked_requirements()) - set(catalogue))
    assert not unknown, f"tests name requirements that are not in SPEC.md: {unknown}"


def test_the_check_can_fail(monkeypatch):
    """Guard against a self-check that passes vacuously."""
    marked = _marked_requirements()
    assert marked, "no requirement marks found at all"
    monkeypatch.setattr("conformance.test_selfcheck._marked_requirements", lambda: {})
    with pytest.raises(AssertionError):
        test_every_must_has_a_test()
