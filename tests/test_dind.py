"""Docker in Docker (conformance/dind.py): dockerd 20.10 and 26.1 in a container answer on the published socket.

Needs a host Docker daemon: DOCKER_HOST or /var/run/docker.sock, or, as root with the installed peers, a
private one that dind.host_daemon() starts. Skipped when there is none, except on CI (CI set), where that is
a failure. The images are SESSION_DIND_IMAGE (default docker:20.10-dind,docker:26.1-dind); offline, the
locally built session-conformance/dind:<vintage>-local replaces each.
"""

import json
import subprocess
import tempfile
from pathlib import Path

import pytest

from conformance import dind, realpeers

pytestmark = [pytest.mark.real_peer, pytest.mark.slow]


@pytest.fixture(scope="module")
def host_url():
    try:
        with dind.host_daemon() as url:
            yield url
    except dind.NoHostDaemon as exc:
        if realpeers.running_in_ci():
            pytest.fail(f"CI is set but {exc}", pytrace=False)
        pytest.skip(str(exc))


@pytest.fixture(scope="module", params=dind.parse_images(None))
def dind_daemon(request, host_url):
    resolved = dind.resolve_image(host_url, request.param, log=lambda message: None)
    with dind.DindDaemon(resolved.image, host_url) as daemon:
        daemon.requested = request.param
        yield daemon


def test_dind_daemon_answers_ping_on_the_published_socket(dind_daemon):
    status, headers, body = realpeers.unix_http_get(dind_daemon.socket_path, "/_ping")
    assert (status, body) == (200, b"OK")
    # The daemon in the container, not the host's: experimental, and BuildKit advertised.
    assert headers.get("Docker-Experimental") == "true"
    assert headers.get("Builder-Version") == "2"
    status, _, body = realpeers.unix_http_get(dind_daemon.socket_path, "/info")
    assert status == 200
    info = json.loads(body)
    assert info["Containers"] == 0 and info["Images"] == 0, "a fresh daemon with an empty data root"
    vintage = dind.vintage_of(dind_daemon.requested)
    assert vintage is None or info["ServerVersion"].startswith(vintage + "."), info["ServerVersion"]


def test_a_run_step_works_inside_dind(dind_daemon):
    """RUN needs writable cgroups in the container: without --privileged, dind.py remounts them."""
    env = {"DOCKER_HOST": dind_daemon.url, "DOCKER_BUILDKIT": "1", "PATH": "/usr/bin:/bin"}
    with tempfile.TemporaryDirectory() as config, tempfile.TemporaryDirectory() as shell, \
            tempfile.TemporaryDirectory() as step:
        env["DOCKER_CONFIG"] = config
        realpeers._write_busybox_rootfs(Path(shell, "rootfs"))
        Path(shell, "Dockerfile").write_text("FROM scratch\nCOPY rootfs/ /\nENV PATH=/bin\n")
        built = subprocess.run([realpeers.DOCKER_CLI, "build", "-q", "-t", "shell", shell], env=env,
                               capture_output=True, text=True, timeout=120)
        assert built.returncode == 0, built.stderr
        Path(step, "Dockerfile").write_text("FROM shell\nRUN echo ran-in-dind-$((6 * 7)) && exit 3\n")
        # --network none: like PrivateDockerd, the daemon has no bridge network.
        run = subprocess.run([realpeers.DOCKER_CLI, "build", "--progress", "plain", "--network", "none", step],
                             env=env, capture_output=True, text=True, timeout=120)
    assert "ran-in-dind-42" in run.stderr, run.stderr[-2000:]
    assert "exit code: 3" in run.stderr, "the step's own status, not a runc set-up failure"


def test_stop_removes_the_container_and_the_socket_folder(host_url):
    import docker

    resolved = dind.resolve_image(host_url, dind.parse_images(None)[0], log=lambda message: None)
    daemon = dind.DindDaemon(resolved.image, host_url).start()
    container_id = daemon.container.get_wrapped_container().id
    folder = daemon.dir
    daemon.stop()
    client = docker.DockerClient(base_url=host_url)
    try:
        with pytest.raises(docker.errors.NotFound):
            client.containers.get(container_id)
    finally:
        client.close()
    assert not folder.exists()
    assert not dind.ping("unix://" + str(folder / "docker.sock"))


def test_a_container_that_exits_early_is_reported_with_its_logs(host_url):
    resolved = dind.resolve_image(host_url, dind.parse_images(None)[0], log=lambda message: None)
    with pytest.raises(dind.DindError) as failure:
        dind.DindDaemon(resolved.image, host_url, extra_args=("--no-such-flag",), start_timeout=30).start()
    assert "exited with status" in str(failure.value)
    assert "no-such-flag" in str(failure.value), "the container's logs are part of the error"
