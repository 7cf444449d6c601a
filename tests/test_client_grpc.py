"""The reference client's ``--api grpc``: Control/Solve on ``POST /grpc`` with the Dockerfile frontend named in
the request (reference/client/grpcsolve.py), against dockerd 20.10, dockerd 26.1 and the reference daemon, with
local, tar and image exports; which entry point each generation uses by default.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

import pytest

from conformance import realpeers
from conformance.trees import diff_snapshots, snapshot, write_file
from reference.client import Output, build
from reference.client.build import DEFAULT_API
from reference.daemon.config import DaemonConfig
from reference.daemon.service import Daemon
from reference.dockerhost import EngineError, api_call

pytestmark = pytest.mark.timeout(180)


def _context(root: str) -> str:
    write_file(root, "Dockerfile", b"FROM scratch\nCOPY . /\n")
    write_file(root, "a.txt", b"alpha\n")
    write_file(root, "dir/b.bin", bytes(range(256)) * 16, mode=0o600)
    write_file(root, "dir/run.sh", b"#!/bin/sh\n", mode=0o4755)
    write_file(root, "日本/é.txt", "unicode\n".encode())
    os.symlink("a.txt", os.path.join(root, "link"))
    os.link(os.path.join(root, "a.txt"), os.path.join(root, "hard"))
    os.makedirs(os.path.join(root, "empty"))
    return root


@pytest.fixture
def context(tmp_path):
    return _context(str(tmp_path / "ctx"))


@contextlib.contextmanager
def reference_daemon(generation: str = "n+1"):
    directory = tempfile.mkdtemp(prefix="rcg-", dir="/tmp")
    daemon = Daemon(DaemonConfig(root=os.path.join(directory, "root"), generation=generation),
                    f"unix://{directory}/d.sock").start()
    try:
        yield daemon.server.bound_address, daemon
    finally:
        daemon.close()
        shutil.rmtree(directory, ignore_errors=True)


def _records(host: str) -> dict[str, dict]:
    return {r["session_id"]: r for r in json.loads(api_call("GET", "/_reference/stats", host=host)[1])["builds"]}


def _tar_members(path: str) -> list[tuple]:
    with tarfile.open(path) as archive:
        return [(m.name, m.type, m.mode, m.uid, m.gid, m.size, m.linkname) for m in archive.getmembers()]


def _exports_of_every_kind(host: str, context: str, out: str, tag: str):
    """local, tar and image builds over /grpc: (local tree, tar members, image id)."""
    local, tar = os.path.join(out, "local"), os.path.join(out, "out.tar")
    results = [build(context, host=host, api="grpc", outputs=[Output("local", local)], timeout=90),
               build(context, host=host, api="grpc", outputs=[Output("tar", tar)], timeout=90),
               build(context, host=host, api="grpc", tags=[tag], timeout=90)]
    assert [r.api for r in results] == ["grpc"] * 3
    assert results[0].image_id is None and results[2].image_id.startswith("sha256:")
    return snapshot(local, with_mtime_of_dirs=False), _tar_members(tar), results[2].image_id


def _expected(context: str):
    return snapshot(context, owner=(0, 0), with_mtime_of_dirs=False)


@pytest.mark.real_peer
@pytest.mark.parametrize("peer", ["dockerd-20.10", "dockerd-26.1"])
def test_grpc_builds_on_real_daemons(peer, context, tmp_path):
    realpeers.require_docker(peer)
    with realpeers.PrivateDockerd(peer) as dockerd:
        tree, members, image_id = _exports_of_every_kind(dockerd.host, context, str(tmp_path / "out"), "grpc:real")
        inspected = dockerd.cli("image", "inspect", "--format", "{{.Id}}", "grpc:real")
        assert inspected.returncode == 0 and inspected.stdout.strip() == image_id, inspected.stderr
    problems = diff_snapshots(_expected(context), tree)
    assert not problems, f"the local export from {peer} is not the context:\n" + "\n".join(problems)
    assert {m[0] for m in members} == set(tree) and all(m[3:5] == (0, 0) for m in members)


@pytest.mark.parametrize("generation", ["n+1", "n"])
def test_grpc_builds_on_the_reference_daemon(generation, context, tmp_path):
    with reference_daemon(generation) as (host, _):
        tree, members, image_id = _exports_of_every_kind(host, context, str(tmp_path / "out"), "grpc:ours")
        images = json.loads(api_call("GET", "/images/json", host=host)[1])
        assert "grpc:ours" in next(i["RepoTags"] for i in images if i["Id"] == image_id)
        assert {r["entry"] for r in _records(host).values()} == {"/grpc"}
    assert not diff_snapshots(_expected(context), tree)
    assert {m[0] for m in members} == set(tree)


def test_the_default_entry_point_is_the_generations_real_client(context):
    assert DEFAULT_API == {"n-1": "build", "n": "build", "n+1": "grpc"}
    with reference_daemon("n+1") as (host, _):
        as_cli_20 = build(context, host=host, generation="n", timeout=30)
        as_buildx = build(context, host=host, generation="n+1", timeout=30)
        records = _records(host)
    assert (as_cli_20.api, as_buildx.api) == ("build", "grpc")
    assert records[as_cli_20.session_id]["entry"] == "/build" and records[as_buildx.session_id]["entry"] == "/grpc"


def test_a_daemon_without_the_control_api_gets_build_by_default_and_an_error_when_asked(context):
    with reference_daemon("n-1") as (host, _):  # the 2017 design has no /grpc
        assert build(context, host=host, generation="n+1", timeout=30).api == "build"
        with pytest.raises(EngineError) as refused:
            build(context, host=host, generation="n+1", api="grpc", timeout=30)
        assert refused.value.status == 404
    with pytest.raises(ValueError):
        build(context, generation="n-1", api="grpc")


def test_a_failed_grpc_build_reports_the_daemons_error(tmp_path):
    from reference.client.build import BuildError

    context = str(tmp_path / "ctx")
    write_file(context, "Dockerfile", b"FROM scratch\nCOPY missing /\n")
    with reference_daemon("n+1") as (host, _):
        with pytest.raises(BuildError) as failed:
            build(context, host=host, api="grpc", timeout=30)
    assert '"/missing" not found' in str(failed.value)


def test_the_command_line_takes_api_and_prints_the_progress(context, tmp_path):
    dest = str(tmp_path / "out")
    with reference_daemon("n+1") as (host, _):
        env = {**os.environ, "DOCKER_HOST": host}
        proc = subprocess.run([sys.executable, "-m", "reference.client", "build", "--progress", "plain", "--api",
                               "grpc", "-o", f"type=local,dest={dest}", "--stats-json", str(tmp_path / "s.json"),
                               context], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for step in ("[internal] load build definition from Dockerfile", "[internal] load build context",
                 "[1/1] COPY . /", "exporting to client directory"):
        assert step in proc.stderr, proc.stderr
    with open(tmp_path / "s.json") as fh:
        assert json.load(fh)["api"] == "grpc"
    assert sorted(os.listdir(dest)) == sorted(os.listdir(context))


@pytest.mark.parametrize("api", ["build", "grpc"])
def test_tags_and_outputs_may_be_given_as_docker_build_writes_them(api, context, tmp_path):
    """build(tags="x:y") is one tag, not one per character; outputs take -o strings, alone or in a list."""
    dest = str(tmp_path / "out")
    with reference_daemon("n+1") as (host, _):
        image = build(context, host=host, tags="api:one", api=api, timeout=60).image_id
        images = json.loads(api_call("GET", "/images/json", host=host)[1])
        assert next(i["RepoTags"] for i in images if i["Id"] == image) == ["api:one"]
        build(context, host=host, outputs=f"type=local,dest={dest}", api=api, timeout=60)
        assert not diff_snapshots(_expected(context), snapshot(dest, with_mtime_of_dirs=False))
        tar = str(tmp_path / "out.tar")
        build(context, host=host, outputs=[f"type=tar,dest={tar}"], api=api, timeout=60)
        assert tarfile.is_tarfile(tar)
    with pytest.raises(ValueError, match="unsupported output type"):
        build(context, outputs="type=registry,dest=x")
