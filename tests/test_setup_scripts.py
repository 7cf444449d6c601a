"""The README's two commands and the set-up behind them (.ci/set-up): idempotent, and fast the second time."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["run-conformance", "run-tests", ".ci/set-up", ".ci/install-system-deps", ".ci/run", ".ci/check-proto"]


def test_the_readmes_first_code_block_is_the_two_commands():
    with open(os.path.join(ROOT, "README.md")) as fh:
        first_block = re.search(r"```sh\n(.*?)```", fh.read(), re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.split("#")[0].strip()]
    assert commands == ["./run-conformance", "./run-tests"]
    for command in commands:
        assert os.access(os.path.join(ROOT, command), os.X_OK)


def test_the_scripts_parse():
    for script in SCRIPTS:
        done = subprocess.run(["bash", "-n", os.path.join(ROOT, script)], capture_output=True, text=True)
        assert done.returncode == 0, f"{script}: {done.stderr}"


def test_ci_runs_the_second_command():
    with open(os.path.join(ROOT, ".ci", "run")) as fh:
        assert re.search(r"^\./run-tests$", fh.read(), re.M)


# Stand-ins that record their calls: the system packages, and the venv's python (pip).
STUB_DEPS = '#!/bin/sh\necho "deps $*" >> "$CALLS"\n'
STUB_PYTHON = '#!/bin/sh\n[ "$1" = -c ] && exit 0\necho "python $*" >> "$CALLS"\n'


def _project_copy(tmp_path):
    project = tmp_path / "project"
    (project / ".ci").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), project)
    shutil.copy(os.path.join(ROOT, ".ci", "set-up"), project / ".ci")
    for path, text in ((project / ".ci" / "install-system-deps", STUB_DEPS),
                       (project / ".venv" / "bin" / "python", STUB_PYTHON)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return project


def _set_up(project, level, calls):
    env = {**os.environ, "CALLS": str(calls)}
    env.pop("FORCE_SETUP", None)
    done = subprocess.run([str(project / ".ci" / "set-up"), level], capture_output=True, text=True, env=env,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    lines = calls.read_text().splitlines() if calls.exists() else []
    calls.unlink(missing_ok=True)
    return lines


def test_set_up_runs_once_until_its_inputs_change(tmp_path):
    project, calls = _project_copy(tmp_path), tmp_path / "calls"
    # after pip, the venv's packages are compiled (the stub venv has no lib/python3.X: the glob stays as written)
    compiled = f"python -m compileall -q -j 0 {project}/.venv/lib/python3*/site-packages"
    assert _set_up(project, "suite", calls) == [
        "deps --suite-only", f"python -m pip install --quiet --editable {project}[suite]", compiled]
    assert _set_up(project, "suite", calls) == []  # done: nothing installed again
    assert _set_up(project, "dev", calls) == ["deps ", f"python -m pip install --quiet --editable {project}[dev]", compiled]
    assert _set_up(project, "dev", calls) == []
    assert _set_up(project, "suite", calls) == []  # the dev set-up holds the suite's
    with open(project / "pyproject.toml", "a") as fh:
        fh.write("\n# changed\n")
    assert _set_up(project, "suite", calls) == [
        "deps --suite-only", f"python -m pip install --quiet --editable {project}[suite]", compiled]


# A peer named by a system path: no set-up installs Docker as a system package (the peers live in the project's
# prefix, conformance.peers), so such a test is skipped on every machine, CI too, without anyone noticing.
SYSTEM_PEER_PATH = re.compile(r"""["'](/usr(?:/local)?/s?bin/(?:docker|dockerd|docker-buildx|containerd|runc))["']""")


def test_no_test_runs_a_peer_from_a_system_path():
    sources = [os.path.join(ROOT, "conformance", name) for name in os.listdir(os.path.join(ROOT, "conformance"))
               if name.startswith("test_") and name.endswith(".py")]
    for folder in ("tests", "interop", "benchmarks"):
        for dirpath, _, filenames in os.walk(os.path.join(ROOT, folder)):
            sources += [os.path.join(dirpath, name) for name in filenames if name.endswith(".py")]
    found = []
    for source in sources:
        with open(source, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if SYSTEM_PEER_PATH.search(line) and "SYSTEM_PEER_PATH" not in line:
                    found.append(f"{os.path.relpath(source, ROOT)}:{number}: {line.strip()}")
    assert not found, "use conformance.peers.binary(...) / realpeers.DOCKER_CLI:\n" + "\n".join(found)
