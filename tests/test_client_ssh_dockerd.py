"""The reference client's ``--ssh`` against the real daemons: a real ssh-agent (Debian's openssh-client) forwarded to
dockerd 20.10 and 26.1 for ``RUN --mount=type=ssh,required=true``, where Debian's ``ssh-add`` in the step lists
the key through the daemon's socket and cannot delete it; and key files, of which the step sees exactly those."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import uuid

import pytest

from conformance import realpeers
from conformance.harness.daemon_probes import ssh_tools_image
from conformance.harness.ssh_agent import RealAgent, have_openssh, make_key

pytestmark = [pytest.mark.timeout(300), pytest.mark.real_peer,
              pytest.mark.skipif(have_openssh() is not None, reason=str(have_openssh()))]


@pytest.fixture(scope="module")
def dockerd26():
    realpeers.require_docker("dockerd-26.1")
    with realpeers.PrivateDockerd("dockerd-26.1") as daemon:
        yield daemon


@pytest.fixture(params=["dockerd-20.10", "dockerd-26.1"])
def real_daemon(request):
    return request.getfixturevalue("dockerd" if request.param == "dockerd-20.10" else "dockerd26")


def _client(daemon, ctx, generation: str, ssh: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reference.client", "build", "--progress", "plain", "--network", "none",
                           "--no-cache", "--generation", generation, "--ssh", ssh, str(ctx)],
                          env={**os.environ, "DOCKER_HOST": daemon.host, **env}, capture_output=True, text=True,
                          timeout=180)


def _step(image: str, mount: str, script: str) -> str:
    return f"FROM {image}\nRUN --mount=type=ssh{mount} sh -c 'echo {uuid.uuid4().hex} >/dev/null; {script}'\n"


@pytest.mark.parametrize("generation", ["n", "n+1"])
def test_a_real_agent_reaches_a_required_mount_and_stays_intact(real_daemon, generation, tmp_path):
    key = make_key(str(tmp_path), "forwarded-key")
    public = base64.b64encode(key.blob).decode()
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    # listed through the daemon's socket; deleting all keys is refused; still listed afterwards
    (ctx / "Dockerfile").write_text(_step(ssh_tools_image(real_daemon), ",required=true",
                                          f"ssh-add -L | grep -q {public} || exit 3; ssh-add -D && exit 4; "
                                          f"ssh-add -L | grep -q {public} || exit 5"))
    with RealAgent([key]) as agent:
        proc = _client(real_daemon, ctx, generation, "default", {"SSH_AUTH_SOCK": agent.socket})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert agent.identities() == [key.blob]


@pytest.mark.parametrize("generation", ["n", "n+1"])
def test_key_files_are_all_the_step_sees(real_daemon, generation, tmp_path):
    chosen, other = make_key(str(tmp_path), "chosen-key"), make_key(str(tmp_path), "other-key")
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(_step(ssh_tools_image(real_daemon), ",id=deploy,required=true",
                                          "test $(ssh-add -L | wc -l) = 1 || exit 3; "
                                          f"ssh-add -L | grep -q {base64.b64encode(chosen.blob).decode()} || exit 4"))
    with RealAgent([other]) as agent:  # the user's agent holds another key: it must not show
        proc = _client(real_daemon, ctx, generation, f"deploy={chosen.path}", {"SSH_AUTH_SOCK": agent.socket})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_a_required_mount_the_client_does_not_forward_fails_naming_it(real_daemon, tmp_path):
    key = make_key(str(tmp_path), "some-key")
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(_step(ssh_tools_image(real_daemon), ",id=not-given,required=true", "exit 3"))
    proc = _client(real_daemon, ctx, "n+1", f"deploy={key.path}", {})
    assert proc.returncode != 0 and "not-given" in proc.stdout + proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "exit code: 3" not in proc.stdout + proc.stderr
