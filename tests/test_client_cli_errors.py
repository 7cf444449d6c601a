"""``python -m reference.client build``: what is wrong is said up front, signals end it cleanly
(issue 15, defect 5). The docker CLI 20.10 refuses a missing secret file and an output it cannot
open before it builds; a build cancelled by SIGINT or SIGTERM leaves no partial export."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conformance.harness.daemon_scripts import FILESEND, ScriptDaemon
from conformance.harness.instrumented_daemon import ScenarioResult
from reference.pb import filesync_pb2


def run_client(*args, host: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "DOCKER_HOST": host}
    return subprocess.run([sys.executable, "-m", "reference.client", "build", "--progress", "plain", *args],
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def context(tmp_path):
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM scratch\nCOPY . /\n")
    return str(ctx)


@pytest.fixture
def script_daemon():
    with ScriptDaemon() as d:
        yield d


def test_a_missing_secret_file_is_refused_before_the_build(script_daemon, context):
    """Failed before: accepted, and the build exited 0."""
    run = run_client("--secret", "id=s1,src=/nonexistent", context, host=script_daemon.host)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "could not parse secrets: [id=s1,src=/nonexistent]: failed to stat /nonexistent" in run.stderr
    assert script_daemon.builds == [] and script_daemon.sessions == {}


def test_an_unreachable_daemon_is_named(context, tmp_path):
    """Failed before: ``[Errno 2] No such file or directory`` without the socket's path."""
    host = f"unix://{tmp_path}/no-daemon.sock"
    run = run_client(context, host=host)
    assert run.returncode == 1
    assert f"Cannot connect to the Docker daemon at {host}. Is the docker daemon running?" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize("output, message", [
    ("type=tar,dest={tmp}/missing-dir/out.tar", "failed to open"),
    ("type=tar,dest={tmp}", "is a directory"),
    ("type=local,dest={tmp}/a-file/out", "is not a directory"),
])
def test_a_bad_output_is_reported_before_the_build(script_daemon, context, tmp_path, output, message):
    """Failed before: reported only after the build had run."""
    (tmp_path / "a-file").write_text("x")
    run = run_client("-o", output.format(tmp=tmp_path), context, host=script_daemon.host)
    assert run.returncode == 1 and message in run.stderr and "Traceback" not in run.stderr
    assert script_daemon.builds == []


def _slow_tar_export(sent):
    def scenario(build):
        stream = build.session.conn.open_stream(FILESEND, [])
        stream.send(filesync_pb2.BytesMessage(data=b"\0" * 4096).SerializeToString())
        stream.flush()
        sent.set()
        time.sleep(20)  # the rest never comes: the client is signalled meanwhile
        return ScenarioResult()

    return scenario


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_a_tar_export_leaves_no_partial_file_and_no_traceback(context, tmp_path, signum):
    """Failed before: SIGINT printed a traceback; SIGTERM left ``<dest>.partial``."""
    import threading

    sent = threading.Event()
    dest = tmp_path / "out.tar"
    with ScriptDaemon(_slow_tar_export(sent)) as daemon:
        env = {**os.environ, "DOCKER_HOST": daemon.host}
        proc = subprocess.Popen([sys.executable, "-m", "reference.client", "build", "--progress", "plain",
                                 "-o", f"type=tar,dest={dest}", context], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert sent.wait(30)
            deadline = time.monotonic() + 10
            while not os.path.exists(f"{dest}.partial") and time.monotonic() < deadline:
                time.sleep(0.02)
            assert os.path.exists(f"{dest}.partial")
            proc.send_signal(signum)
            _, stderr = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 128 + signum, stderr
    assert "Traceback" not in stderr and f"cancelled by {signal.Signals(signum).name}" in stderr
    assert not os.path.exists(f"{dest}.partial") and not os.path.exists(dest)
