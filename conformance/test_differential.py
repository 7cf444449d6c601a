"""Differential: one client command into our reference daemon and into a real dockerd.

Both daemons build the same context with the same Dockerfile and export it with ``-o type=local``; the
two trees the client writes must be identical, entry by entry (mode, owner, size, file times, link targets,
xattrs, contents). The clients: the docker CLI 20.10 (``POST /build``), against any dockerd; buildx 0.13 (the
docker CLI 26.1's ``docker build``, over ``POST /grpc``), against a dockerd 26.1, where an unchanged rebuild
must also request no file of the main context transfer from either daemon (counted on the wire by
conformance/wiretap.py). Runs only with ``-p conformance.differential --differential-daemon URL``.
"""

from __future__ import annotations

import os
import subprocess
import tempfile

import pytest

from . import peers
from .identify import identify_daemon
from .outcomes import unsupported
from .realpeers import no_docker_reason
from .targets import DaemonSpec, identify, start_reference_daemon
from .trees import diff_snapshots, snapshot, write_file
from .wiretap import WireTap

from .realpeers import DOCKER_CLI  # the CLI 20.10 peer, by absolute path

requirement = pytest.mark.requirement

# A fixed time for every context file, so a difference in exported times is the daemons' doing.
_CONTEXT_MTIME_NS = 1_600_000_000_123_456_789


def _differential_url(config: pytest.Config) -> str | None:
    try:
        return config.getoption("differential_daemon")
    except ValueError:  # the plugin (and so the option) is not loaded
        return None


@pytest.fixture(scope="module")
def real_daemon(request: pytest.FixtureRequest) -> str:
    url = _differential_url(request.config)
    if not url:
        pytest.skip("differential runs need -p conformance.differential --differential-daemon URL")
    implementation = identify(url)
    if not implementation.startswith("dockerd"):
        pytest.fail(f"--differential-daemon {url} is not a dockerd: {implementation}")
    return url


@pytest.fixture(scope="module")
def reference_daemon(real_daemon):
    target = start_reference_daemon(DaemonSpec("reference-n+1", generation="n+1"))
    yield target
    target.stop()


def _context_plain(root: str) -> str:
    write_file(root, "a.txt", b"alpha\n")
    write_file(root, "dir/b.bin", bytes(range(256)) * 64)
    write_file(root, "dir/sub/c", b"")
    write_file(root, "run.sh", b"#!/bin/sh\necho hi\n", mode=0o755)
    os.makedirs(os.path.join(root, "empty/nested"))
    return "FROM scratch\nCOPY . /\n"


def _context_links_and_modes(root: str) -> str:
    write_file(root, "file", b"content\n", mode=0o640)
    write_file(root, "setuid", b"x", mode=0o4755)
    write_file(root, "日本/é.txt", "unicode\n".encode())
    write_file(root, "with space", b"s")
    os.symlink("file", os.path.join(root, "rel-link"))
    os.symlink("/etc/passwd", os.path.join(root, "abs-link"))
    os.symlink("missing/target", os.path.join(root, "dangling"))
    os.link(os.path.join(root, "file"), os.path.join(root, "hard"))
    return "FROM scratch\nCOPY . /\n"


def _context_dockerignore(root: str) -> str:
    for rel in ("keep.txt", "logs/a.log", "logs/important.log", "build/out.o", "src/main.c", "src/tmp/x.tmp"):
        write_file(root, rel, rel.encode())
    write_file(root, ".dockerignore", b"logs/*.log\n!logs/important.log\nbuild\n**/*.tmp\n")
    return "FROM scratch\nCOPY . /ctx/\n"


def _context_workdir_chown(root: str) -> str:
    write_file(root, "one/x", b"1")
    write_file(root, "two/y", b"2", mode=0o600)
    write_file(root, "three", b"3")
    return ("FROM scratch\nARG DIR=/work\nENV SUB=two\nWORKDIR $DIR\nCOPY --chown=1000:2000 two ./$SUB/\n"
            "COPY one three /many/\nLABEL case=workdir-chown\n")


def _context_stages(root: str) -> str:
    write_file(root, "one/x", b"1")
    write_file(root, "two/y", b"2", mode=0o600)
    return ("FROM scratch AS base\nCOPY one /from-base/\n"
            "FROM scratch\nWORKDIR /work\nCOPY two ./two/\nCOPY --from=base /from-base /copied\n")


CASES = {
    "plain": (_context_plain, ["FILESEND-LOCAL-1"]),
    "links-and-modes": (_context_links_and_modes, ["FILESEND-LOCAL-1"]),
    "dockerignore": (_context_dockerignore, ["FILESEND-LOCAL-1", "DOCKERIGNORE-1"]),
    "stages": (_context_stages, ["FILESEND-LOCAL-1"]),
    "workdir-chown": (_context_workdir_chown, ["FILESEND-LOCAL-1"]),
}


def _make_context(case: str) -> str:
    root = tempfile.mkdtemp(prefix="diff-ctx-")
    dockerfile = CASES[case][0](root)
    write_file(root, "Dockerfile", dockerfile.encode())
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), ns=(_CONTEXT_MTIME_NS, _CONTEXT_MTIME_NS), follow_symlinks=False)
    return root


def _export(host: str, context: str) -> tuple[str, subprocess.CompletedProcess]:
    dest = tempfile.mkdtemp(prefix="diff-out-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
    env.update(DOCKER_HOST=host, DOCKER_BUILDKIT="1", DOCKER_CONFIG=tempfile.mkdtemp(prefix="diff-cfg-"))
    proc = subprocess.run([DOCKER_CLI, "build", "--progress", "plain", "-o", f"type=local,dest={dest}", context],
                          env=env, capture_output=True, text=True, timeout=120)
    return dest, proc


@pytest.mark.parametrize("case", [pytest.param(name, marks=requirement(*CASES[name][1])) for name in sorted(CASES)])
def test_local_export_is_identical(case, real_daemon, reference_daemon, request):
    request.node.user_properties.append(("target", "reference-n+1 vs dockerd"))
    context = _make_context(case)
    real_dest, real = _export(real_daemon, context)
    if real.returncode != 0:  # the case itself is broken: an ERROR, not a FAIL of ours
        raise RuntimeError(f"dockerd could not build the case:\n{real.stderr[-3000:]}")
    ours_dest, ours = _export(reference_daemon.host, context)
    if ours.returncode != 0 and "unsupported instruction" in ours.stderr:
        # The reference daemon implements a Dockerfile subset on purpose; that is not a protocol matter.
        unsupported(f"the reference daemon does not implement this case's Dockerfile: {ours.stderr[-300:]}")
    assert ours.returncode == 0, f"the reference daemon failed where dockerd succeeded:\n{ours.stderr[-3000:]}"
    # Directory times are left out: the receiving CLI touches a directory when it writes into it, so they
    # differ even between two exports by the same dockerd.
    differences = diff_snapshots(snapshot(real_dest, with_mtime_of_dirs=False),
                                 snapshot(ours_dest, with_mtime_of_dirs=False))
    assert not differences, "local exports differ (expected: dockerd's, actual: ours):\n" + "\n".join(differences)


# -- buildx 0.13 (the docker CLI 26.1) into both daemons ------------------------------------------------------

BUILDX = "docker-cli-26.1"


@pytest.fixture(scope="module")
def buildx_real_daemon(real_daemon: str) -> str:
    """The differential daemon, when it is of buildx 0.13's generation (dockerd 26.1)."""
    reason = no_docker_reason(BUILDX)
    if reason:
        pytest.skip(f"buildx differential: {reason}")
    identity = identify_daemon(real_daemon)
    if identity.generation != "n+1":
        pytest.skip(f"the buildx differential compares with a dockerd of buildx 0.13's generation (26.1), "
                    f"not {identity.implementation}")
    return real_daemon


def _unix_path(url: str) -> str:
    if not url.startswith("unix://"):
        pytest.skip(f"the wire is counted through a unix socket proxy; {url} is not one")
    return url[len("unix://"):]


def _buildx_export(host: str, context: str, config_dir: str) -> tuple[str, subprocess.CompletedProcess]:
    dest = tempfile.mkdtemp(prefix="diff-bx-out-")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "BUILDKIT_", "BUILDX_"))}
    env.update(peers.client_env(BUILDX, config_dir), DOCKER_HOST=host)
    proc = subprocess.run([peers.binary(BUILDX), "build", "--progress", "plain", "-o", f"type=local,dest={dest}",
                           context], env=env, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    return dest, proc


def _build_twice(url: str, context: str) -> tuple[str, subprocess.CompletedProcess, int, int]:
    """Two buildx builds through a recording proxy: (the first export, its process, the main context transfers
    seen on the rebuild, the files they requested)."""
    config_dir = tempfile.mkdtemp(prefix="diff-bx-cfg-")
    with WireTap(_unix_path(url)) as tap:
        dest, proc = _buildx_export(tap.url, context, config_dir)
        if proc.returncode != 0:
            return dest, proc, 0, 0
        tap.take()
        again, rebuilt = _buildx_export(tap.url, context, config_dir)
        recording = tap.take()
    assert rebuilt.returncode == 0, f"the unchanged rebuild failed:\n{rebuilt.stderr[-3000:]}"
    return dest, proc, len(recording.of_kind("context")), recording.requests("context")


@pytest.mark.parametrize("case", [pytest.param(name, marks=requirement(*CASES[name][1], "INCREMENTAL-2"))
                                  for name in sorted(CASES)])
def test_buildx_local_export_is_identical_and_a_rebuild_requests_nothing(case, buildx_real_daemon,
                                                                         reference_daemon, request):
    request.node.user_properties.append(("target", "reference-n+1 vs dockerd 26.1, client buildx 0.13"))
    context = _make_context(case)
    real_dest, real, real_transfers, real_requests = _build_twice(buildx_real_daemon, context)
    if real.returncode != 0:  # the case itself is broken: an ERROR, not a FAIL of ours
        raise RuntimeError(f"dockerd could not build the case with buildx:\n{real.stderr[-3000:]}")
    ours_dest, ours, transfers, requests = _build_twice(reference_daemon.host, context)
    if ours.returncode != 0 and "unsupported instruction" in ours.stderr:
        unsupported(f"the reference daemon does not implement this case's Dockerfile: {ours.stderr[-300:]}")
    assert ours.returncode == 0, f"buildx into the reference daemon failed where dockerd succeeded:\n{ours.stderr[-3000:]}"
    # Directory times are left out: a WORKDIR or COPY destination made during the build has the build's time.
    differences = diff_snapshots(snapshot(real_dest, with_mtime_of_dirs=False),
                                 snapshot(ours_dest, with_mtime_of_dirs=False))
    assert not differences, "local exports differ (expected: dockerd's, actual: ours):\n" + "\n".join(differences)
    assert real_transfers and real_requests == 0, "dockerd 26.1 itself re-requested context files"
    assert transfers, "no main context transfer seen on the reference daemon's rebuild"
    assert requests == 0, f"the reference daemon requested {requests} context file(s) on an unchanged rebuild"
