"""Smoke tests for the real-peer infrastructure (conformance/realpeers.py)."""

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conformance import realpeers


def tree_snapshot(root: Path) -> dict[str, tuple]:
    """relative path -> (kind, permission bits, content or link target); the root itself excluded."""
    snapshot = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            relative = path.relative_to(root).as_posix()
            if stat.S_ISLNK(st.st_mode):
                snapshot[relative] = ("symlink", None, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                snapshot[relative] = ("dir", stat.S_IMODE(st.st_mode), None)
            else:
                snapshot[relative] = ("file", stat.S_IMODE(st.st_mode), path.read_bytes())
    return snapshot


def completed(result) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result.stdout


def daemon_traces(directory: str) -> tuple[list[int], list[str]]:
    """Processes whose command line names directory, and mount points under it."""
    needle = (directory + "/").encode()
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if needle in Path(f"/proc/{entry}/cmdline").read_bytes():
                    pids.append(int(entry))
            except OSError:
                pass
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
              if line.split()[4] == directory or line.split()[4].startswith(directory + "/")]
    return pids, mounts


# -- skip/fail policy (no daemon needed) -----------------------------------------------------------

def test_missing_docker_skips_on_a_workstation_and_fails_on_ci(monkeypatch):
    monkeypatch.setenv("SESSION_PEERS_PREFIX", "/nonexistent/peers")
    reason = realpeers.no_docker_reason()
    assert "dockerd-20.10 is not installed" in reason and "conformance.peers install" in reason, reason
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        realpeers.require_docker()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        realpeers.require_docker()


# -- the session daemon ----------------------------------------------------------------------------

def test_ping_advertises_buildkit_and_api_1_41(dockerd):
    status, headers, body = dockerd.ping()
    assert (status, body) == (200, b"OK")
    assert headers["Api-Version"] == "1.41"
    assert headers["Builder-Version"] == "2"
    assert headers["Docker-Experimental"] == "true"


def test_cli_and_daemon_are_20_10(docker_cli):
    versions = completed(docker_cli("version", "--format", "{{.Client.Version}} {{.Server.Version}}"))
    client, server = versions.split()
    assert client.startswith("20.10."), client
    assert server.startswith("20.10."), server


def test_scratch_build_exports_the_context_to_a_local_dir(docker_cli, tmp_path):
    context = tmp_path / "context"
    (context / "sub" / "deeper").mkdir(parents=True)
    (context / "Dockerfile").write_text("FROM scratch\nCOPY . /\n")
    (context / "a.txt").write_bytes(b"alpha\n")
    (context / "sub" / "b.bin").write_bytes(bytes(range(256)) * 1000)
    (context / "sub" / "deeper" / "empty").write_bytes(b"")
    (context / "tool.sh").write_text("#!/bin/sh\necho tool\n")
    (context / "tool.sh").chmod(0o750)
    (context / "link").symlink_to("sub/b.bin")
    out = tmp_path / "out"

    completed(docker_cli("build", "--progress=plain", "-o", f"type=local,dest={out}", str(context)))

    assert tree_snapshot(out) == tree_snapshot(context)


def test_shell_image_runs_a_build_step_with_network_none(docker_cli, shell_image, tmp_path):
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text(
        f"FROM {shell_image} AS work\n"
        "RUN echo hi > /x && ls /bin/sh >> /x\n"
        "FROM scratch\n"
        "COPY --from=work /x /x\n"
    )
    out = tmp_path / "out"

    completed(docker_cli("build", "--progress=plain", "--network=none", "-o", f"type=local,dest={out}",
                         str(context)))

    assert (out / "x").read_text() == "hi\n/bin/sh\n"


def test_secret_mount_works_without_a_syntax_directive(docker_cli, shell_image, tmp_path):
    # The 20.10 builtin Dockerfile frontend accepts RUN --mount; the secret comes over the session.
    secret = tmp_path / "secret"
    secret.write_text("s3cr3t value\n")
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text(
        f"FROM {shell_image} AS work\n"
        "RUN --mount=type=secret,id=s cp /run/secrets/s /copied\n"
        "FROM scratch\n"
        "COPY --from=work /copied /copied\n"
    )
    out = tmp_path / "out"

    completed(docker_cli("build", "--progress=plain", "--network=none", "--secret", f"id=s,src={secret}",
                         "-o", f"type=local,dest={out}", str(context)))

    assert (out / "copied").read_text() == "s3cr3t value\n"


# -- extra private daemons -------------------------------------------------------------------------

def test_two_private_daemons_run_side_by_side(dockerd):
    with realpeers.PrivateDockerd() as first, realpeers.PrivateDockerd() as second:
        assert len({dockerd.host, first.host, second.host}) == 3
        realpeers.build_shell_image(first, "side-by-side/first:1")
        realpeers.build_shell_image(second, "side-by-side/second:1")
        assert realpeers.image_exists(first, "side-by-side/first:1")
        assert not realpeers.image_exists(first, "side-by-side/second:1")
        assert realpeers.image_exists(second, "side-by-side/second:1")
        assert not realpeers.image_exists(dockerd, "side-by-side/first:1")
        directories = [str(first.dir), str(second.dir)]
    assert first.leftovers == second.leftovers == {"processes": [], "mounts": []}
    for directory in directories:
        assert daemon_traces(directory) == ([], [])
        assert not os.path.exists(directory)
    assert dockerd.ping()[0] == 200


@pytest.mark.real_peer
def test_stop_leaves_no_process_mount_or_directory():
    realpeers.require_docker()
    daemon = realpeers.PrivateDockerd()
    daemon.start()
    try:
        image = realpeers.build_shell_image(daemon)
        completed(daemon.cli("run", "-d", "--network", "none", image, "sleep", "600"))
        directory = str(daemon.dir)
        pids, mounts = daemon_traces(directory)
        assert pids and mounts  # dockerd, containerd, the shim; data-root bind, overlay, netns
    finally:
        daemon.stop()
    assert daemon_traces(directory) == ([], [])
    assert not os.path.exists(directory)
    assert "Daemon shutdown complete" in daemon.logs()


@pytest.mark.real_peer
def test_stop_after_dockerd_was_killed_cleans_up_shim_and_container():
    realpeers.require_docker()
    daemon = realpeers.PrivateDockerd()
    daemon.start()
    try:
        image = realpeers.build_shell_image(daemon)
        completed(daemon.cli("run", "-d", "--network", "none", image, "sleep", "600"))
        directory = str(daemon.dir)
        daemon.process.send_signal(signal.SIGKILL)
        daemon.process.wait()
    finally:
        daemon.stop()
    kinds = sorted(os.path.basename(entry.split(" ", 1)[1]) for entry in daemon.leftovers["processes"])
    assert "containerd-shim-runc-v2" in kinds and "sleep" in kinds, daemon.leftovers
    assert daemon.leftovers["mounts"], "dockerd was killed, so it unmounted nothing"
    assert daemon_traces(directory) == ([], [])
    assert not os.path.exists(directory)


@pytest.mark.real_peer
def test_a_daemon_that_cannot_start_reports_its_log():
    realpeers.require_docker()
    daemon = realpeers.PrivateDockerd(extra_args=["--no-such-flag"])
    with pytest.raises(realpeers.DockerdStartError, match="unknown flag: --no-such-flag"):
        daemon.start()
    assert daemon.dir is None


@pytest.mark.real_peer
def test_a_daemon_whose_owner_died_is_reaped_by_the_next_start():
    realpeers.require_docker()
    owner = subprocess.Popen(
        [sys.executable, "-c",
         "from conformance.realpeers import PrivateDockerd\n"
         "daemon = PrivateDockerd().start()\n"
         "print(daemon.dir, flush=True)\n"
         "import time; time.sleep(600)\n"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        directory = owner.stdout.readline().strip()
    finally:
        owner.kill()
        owner.wait()
    assert directory.startswith("/tmp/dsc-")
    assert daemon_traces(directory)[0], "the orphaned daemon should still be running"

    assert directory in realpeers.reap_orphaned_daemons()

    assert daemon_traces(directory) == ([], [])
    assert not os.path.exists(directory)
