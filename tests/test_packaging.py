"""Packaging: the reference client and daemon install and run without the test stack."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_STACK = {"pytest", "hypothesis", "pytest-xdist", "pytest-timeout", "tox", "testcontainers", "grpcio-tools"}


def _project() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        return tomllib.load(fh)["project"]


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_the_base_install_pulls_in_no_test_stack():
    base = {_name(r) for r in _project()["dependencies"]}
    assert not base & TEST_STACK, f"base dependencies include the test stack: {sorted(base & TEST_STACK)}"
    assert not {name for name in base if name.startswith("pytest")}
    suite = {_name(r) for r in _project()["optional-dependencies"]["suite"]}
    assert {"pytest", "hypothesis", "pytest-xdist", "pytest-timeout"} <= suite  # the suite's extra carries them


# Runs a module as `python -m` would, with the test stack unimportable: what a base install has.
WITHOUT_TEST_STACK = r"""
import importlib.abc, runpy, sys

class NoTestStack(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("pytest", "_pytest", "hypothesis", "xdist", "pytest_timeout", "conformance"):
            raise ImportError(f"{name} is not part of the base install")
        return None

sys.meta_path.insert(0, NoTestStack())
sys.argv = [sys.argv[1], "--help"]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("module", ["reference.client", "reference.daemon"])
def test_reference_entry_points_run_without_the_test_stack(module):
    env = {**os.environ, "PYTHONPATH": ROOT}
    done = subprocess.run([sys.executable, "-c", WITHOUT_TEST_STACK, module], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "usage:" in done.stdout
