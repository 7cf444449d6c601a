"""buildx 0.13 (the docker CLI 26.1's ``docker build``) against the reference daemon, n+1 and n, over ``POST /grpc``.

Everything the issue's "done when" names, with the real client: ``-o type=local`` and ``-o type=tar`` of the
skew matrix's awkward context equal to buildx's exports from a private dockerd 26.1 (the local trees entry by
entry, times included; the tars member by member, PAX records included), ``-t`` into the image store (then
``docker images`` and ``docker image inspect``), plain progress with every step and the cache hits of a rebuild,
a failing build's error, ``buildx ls``, ``inspect``, ``du``, ``prune -f``, and an unchanged rebuild that requests
no file of the main context transfer, counted on the wire (conformance/wiretap.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile

import pytest

from conformance import peers, realpeers
from conformance.wiretap import WireTap
from interop import awkward, exports
from reference.daemon.config import DaemonConfig
from reference.daemon.service import Daemon
from reference.dockerhost import api_call

pytestmark = [pytest.mark.timeout(300), pytest.mark.real_peer]

BUILDX = "docker-cli-26.1"
STEPS = ("[internal] load build definition from Dockerfile", "[internal] load .dockerignore",
         "[internal] load build context", "[1/1] COPY . /")


def _buildx(host: str, config_dir: str, *args: str, cwd: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "BUILDKIT_", "BUILDX_"))}
    env.update(peers.client_env(BUILDX, config_dir), DOCKER_HOST=host)
    return subprocess.run([peers.binary(BUILDX), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"{' '.join(proc.args[1:])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc


def tar_members(path: str) -> list[tuple]:
    """Every member as a reader sees it: name, type, mode, owner, size, mtime, link, contents, PAX records."""
    members = []
    with tarfile.open(path) as archive:
        for m in archive.getmembers():
            data = archive.extractfile(m).read() if m.isfile() else b""
            members.append((m.name, m.type, m.mode, m.uid, m.gid, m.size, m.mtime, m.linkname,
                            hashlib.sha256(data).hexdigest(), sorted(m.pax_headers.items())))
    return members


@pytest.fixture(scope="module")
def workdir():
    path = tempfile.mkdtemp(prefix="bxref-", dir="/tmp")  # short: unix sockets live here
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def context(workdir):
    root = os.path.join(workdir, "context")
    awkward.write(root)
    return root


@pytest.fixture(scope="module")
def dockerd_exports(workdir, context):
    """buildx's local and tar exports of the context from a private dockerd 26.1."""
    realpeers.require_docker("dockerd-26.1", BUILDX)
    local, tar = os.path.join(workdir, "dockerd-local"), os.path.join(workdir, "dockerd.tar")
    config = os.path.join(workdir, "config-dockerd")
    with realpeers.PrivateDockerd("dockerd-26.1") as dockerd:
        _ok(_buildx(dockerd.host, config, "build", "--progress", "plain", "-o", f"type=local,dest={local}", context,
                    cwd=workdir))
        _ok(_buildx(dockerd.host, config, "build", "--progress", "plain", "-o", f"type=tar,dest={tar}", context,
                    cwd=workdir))
    return exports.snapshot(local), tar_members(tar)


@contextlib.contextmanager
def reference_daemon(workdir: str, generation: str):
    directory = tempfile.mkdtemp(prefix=f"d{generation}-", dir=workdir)
    daemon = Daemon(DaemonConfig(root=os.path.join(directory, "root"), generation=generation),
                    f"unix://{directory}/d.sock").start()
    try:
        with WireTap(os.path.join(directory, "d.sock")) as tap:
            yield daemon, tap
    finally:
        daemon.close()


def _daemon_json(daemon, path: str):
    return json.loads(api_call("GET", path, host=daemon.server.bound_address)[1])


@pytest.mark.parametrize("generation", ["n+1", "n"])
def test_buildx_builds_exports_and_manages_the_cache_of_the_reference_daemon(generation, workdir, context,
                                                                              dockerd_exports):
    dockerd_tree, dockerd_tar = dockerd_exports
    config = os.path.join(workdir, f"config-{generation}")
    export_vertex = "exporting to client directory" if generation == "n+1" else "exporting to client"
    with reference_daemon(workdir, generation) as (daemon, tap):
        def buildx(*args):
            return _buildx(tap.url, config, *args, cwd=workdir)

        ls = _ok(buildx("buildx", "ls")).stdout
        assert "running" in ls and "linux/amd64" in ls, ls
        inspect = _ok(buildx("buildx", "inspect")).stdout
        assert re.search(r"Driver:\s+docker\n", inspect) and re.search(r"Status:\s+running\n", inspect), inspect
        # n+1 answers Control/Info as dockerd 26.1 does; n does not (20.10), and buildx names it from /version
        version = re.search(r"BuildKit version:\s+(\S+)", inspect).group(1)
        assert version == ("v0.13.2+reference" if generation == "n+1" else "v0.8+unknown"), inspect

        # -o type=local: the same tree as from dockerd 26.1, and every step in the plain progress
        local = os.path.join(workdir, f"ours-{generation}-local")
        tap.take()
        cold = _ok(buildx("build", "--progress", "plain", "-o", f"type=local,dest={local}", context))
        for step in (*STEPS, export_vertex):
            assert step in cold.stderr, f"{step!r} not in the progress:\n{cold.stderr}"
        assert not exports.differences(dockerd_tree, exports.snapshot(local)), \
            exports.differences(dockerd_tree, exports.snapshot(local))
        cold_wire = tap.take()
        assert cold_wire.requests("context") > 0

        # the same build unchanged: nothing of the main context transfer is requested
        shutil.rmtree(local)
        _ok(buildx("build", "--progress", "plain", "-o", f"type=local,dest={local}", context))
        rebuild = tap.take()
        assert rebuild.of_kind("context"), "no main context transfer seen"
        assert rebuild.requests("context") == 0, rebuild.requested_paths("context")
        assert not exports.differences(dockerd_tree, exports.snapshot(local))

        # -o type=tar: member by member as dockerd 26.1's
        tar = os.path.join(workdir, f"ours-{generation}.tar")
        _ok(buildx("build", "--progress", "plain", "-o", f"type=tar,dest={tar}", context))
        assert tar_members(tar) == dockerd_tar

        # -t: into the image store, listed and inspected through the CLI; a rebuild's steps are cache hits
        tag = f"buildx-ref:{generation.replace('+', 'plus')}"
        _ok(buildx("build", "--progress", "plain", "-t", tag, context))
        again = _ok(buildx("build", "--progress", "plain", "-t", tag, context))
        assert "#4 CACHED" in again.stderr or "CACHED" in again.stderr.split("[1/1] COPY . /", 1)[1], again.stderr
        listed = _ok(buildx("images", "--format", "{{.Repository}}:{{.Tag}} {{.ID}}")).stdout.split()
        assert tag in listed, listed
        image_id = _ok(buildx("image", "inspect", "--format", "{{.Id}}", tag)).stdout.strip()
        assert image_id.startswith("sha256:") and image_id[7:19] == listed[listed.index(tag) + 1]
        assert tag in [t for i in _daemon_json(daemon, "/images/json") if i["Id"] == image_id for t in i["RepoTags"]]

        # a failing build: buildx's error line with the daemon's message, exit 1
        broken = os.path.join(workdir, f"broken-{generation}")
        os.makedirs(broken, exist_ok=True)
        with open(os.path.join(broken, "Dockerfile"), "w") as fh:
            fh.write("FROM scratch\nCOPY does-not-exist /\n")
        failed = buildx("build", "--progress", "plain", broken)
        assert failed.returncode == 1, failed.stderr
        error_line = next(line for line in failed.stderr.splitlines() if line.startswith("ERROR: failed to solve:"))
        assert '"/does-not-exist"' in error_line and "not found" in error_line, failed.stderr
        assert "[1/1] COPY does-not-exist /" in failed.stderr  # the failed step, named in the progress

        # du and prune -f: the daemon's context cache, as /system/df shows it
        cached = {record["ID"] for record in _daemon_json(daemon, "/system/df")["BuildCache"]}
        assert cached
        du = _ok(buildx("buildx", "du")).stdout
        assert all(record_id in du for record_id in cached), du
        pruned = _ok(buildx("buildx", "prune", "-f")).stdout
        assert all(record_id in pruned for record_id in cached), pruned
        assert _daemon_json(daemon, "/system/df")["BuildCache"] == []
        assert re.search(r"^Total:\s+0B$", _ok(buildx("buildx", "du")).stdout, re.M)

        builds = _daemon_json(daemon, "/_reference/stats")["builds"]
        assert {b["entry"] for b in builds} == {"/grpc"}
        assert _daemon_json(daemon, "/_reference/stats")["grpc"]["solves_active"] == 0
