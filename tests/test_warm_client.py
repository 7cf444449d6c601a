"""The warm launcher of the embedded reference clients (conformance/harness/warm_client.py) runs a client as
a process of its own would: its arguments, environment, working directory, output and exit status."""

import importlib
import os
import subprocess
import sys
import time

import pytest

from conformance.harness.warm_client import PRELOAD, WarmClientLauncher

CLIENT = [sys.executable, "-m", "reference.client"]


@pytest.fixture
def launcher():
    warm = WarmClientLauncher()
    yield warm
    warm.close()


def test_every_preloaded_module_imports():
    for name in PRELOAD:
        importlib.import_module(name)


def test_only_the_reference_client_of_this_python_is_launched_warm():
    assert WarmClientLauncher.handles([*CLIENT, "build", "."])
    assert not WarmClientLauncher.handles(["python3", "-m", "reference.client", "build", "."])
    assert not WarmClientLauncher.handles([sys.executable, "-m", "reference.daemon"])
    assert not WarmClientLauncher.handles(["docker", "build", "."])


def test_output_and_status_are_those_of_a_cold_run(launcher, tmp_path):
    for args in (["build", "--help"], ["build"], ["build", "--no-such-option", "x"]):
        cold = subprocess.run([*CLIENT, *args], capture_output=True, text=True, env=dict(os.environ))
        warm = launcher.run([*CLIENT, *args], dict(os.environ), timeout=30)
        assert (warm.returncode, warm.stdout, warm.stderr) == (cold.returncode, cold.stdout, cold.stderr), args


def test_environment_and_working_directory_are_the_requests(launcher, tmp_path, monkeypatch):
    (tmp_path / "ctx").mkdir()
    (tmp_path / "ctx" / "Dockerfile").write_text("FROM scratch\n")
    monkeypatch.chdir(tmp_path)
    env = {"PATH": os.environ["PATH"], "DOCKER_HOST": f"unix://{tmp_path}/missing.sock"}
    done = launcher.run([*CLIENT, "build", "ctx"], env, timeout=30)
    assert done.returncode == 1
    assert f"{tmp_path}/missing.sock" in done.stderr  # the host came from the request's environment


def test_a_run_past_its_timeout_is_killed(launcher, tmp_path):
    import socket

    # a daemon that accepts and never answers: the client waits on it
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "mute.sock"))
    sock.listen()
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    started = time.monotonic()
    try:
        done = launcher.run([*CLIENT, "build", str(tmp_path)],
                            {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/mute.sock"}, timeout=1)
    finally:
        sock.close()
    assert done.timed_out and done.returncode == -9
    assert time.monotonic() - started < 10


def test_close_stops_the_server_and_removes_its_directory(launcher):
    launcher.run([*CLIENT, "build", "--help"], dict(os.environ), timeout=30)
    server, directory = launcher._server, launcher._dir
    launcher.close()
    assert server.poll() is not None
    assert not os.path.exists(directory)
