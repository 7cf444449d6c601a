"""The reference daemon next to dockerd 20.10: same requests, same answers, same exported tree."""

from __future__ import annotations

import json
import os

import pytest

from conformance.realpeers import DOCKER_CLI
from conformance.trees import diff_snapshots, snapshot
from reference.dockerhost import HttpConnection, api_call, connect
from reference.session import new_session_id

from test_daemon import RefDaemon, make_context, run_docker  # noqa: E402  (same tests directory)

pytestmark = pytest.mark.skipif(not os.path.exists(DOCKER_CLI), reason="docker CLI 20.10 not installed")


@pytest.fixture(scope="module")
def refd(tmp_path_factory):
    d = RefDaemon(str(tmp_path_factory.mktemp("refd") / "root"))
    yield d
    d.close()


def _session_answer(host: str, headers) -> tuple[int, str]:
    sock = connect(host)
    try:
        http = HttpConnection(sock)
        resp = http.request("POST", "/session", headers)
        if resp.status == 101:
            return 101, resp.header("upgrade") or ""
        return resp.status, json.loads(http.read_body())["message"]
    finally:
        sock.close()


def test_session_errors_match_dockerd(dockerd, refd):
    method = ("X-Docker-Expose-Session-Grpc-Method", "/grpc.health.v1.Health/Check")
    cases = [
        [method],
        [method, ("Connection", "Upgrade"), ("Upgrade", "websocket")],
        [method, ("Connection", "Upgrade"), ("Upgrade", "H2C")],
    ]
    for extra in cases:
        headers = [("X-Docker-Expose-Session-Uuid", new_session_id())] + extra
        assert _session_answer(refd.host, headers) == _session_answer(dockerd.host, headers), extra


def test_ping_headers_match_dockerd(dockerd, refd):
    real, _ = api_call("GET", "/_ping", host=dockerd.host)
    ours, _ = api_call("GET", "/_ping", host=refd.host)
    for name in ("api-version", "builder-version", "docker-experimental", "ostype"):
        assert ours.header(name) == real.header(name), name


def test_local_export_matches_dockerd(dockerd, refd, tmp_path):
    context = make_context(tmp_path / "ctx")
    real_out, our_out = tmp_path / "real", tmp_path / "ours"
    proc = dockerd.cli("build", "-o", f"type=local,dest={real_out}", context)
    assert proc.returncode == 0, proc.stderr
    config = tmp_path / "cfg"
    config.mkdir()
    proc = run_docker(refd, str(config), "build", "-o", f"type=local,dest={our_out}", context)
    assert proc.returncode == 0, proc.stderr
    owner = (os.getuid(), os.getgid())
    # Both leave directory mtimes at the time the CLI wrote into them, so those are not compared.
    real = snapshot(str(real_out), owner=owner, with_mtime_of_dirs=False)
    assert diff_snapshots(real, snapshot(str(our_out), owner=owner, with_mtime_of_dirs=False)) == []
    assert diff_snapshots(snapshot(context, owner=owner, with_mtime_of_dirs=False), real) == []


def test_generated_contexts_export_identically(dockerd, refd, tmp_path_factory):
    """Differential over generated contexts (.dockerignore with `!` rules, symlinks, hardlinks,
    unicode names, empty directories): the docker CLI 20.10 gets the same `-o type=local` tree
    from our daemon as from dockerd 20.10."""
    from hypothesis import HealthCheck, given, settings

    from conformance.test_daemon_properties import contexts, materialise

    owner = (os.getuid(), os.getgid())

    @settings(max_examples=8, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(contexts())
    def check(spec):
        context = materialise(spec)
        base = tmp_path_factory.mktemp("diff")
        real_out, our_out, config = base / "real", base / "ours", base / "cfg"
        config.mkdir()
        proc = dockerd.cli("build", "--no-cache", "-o", f"type=local,dest={real_out}", context)
        assert proc.returncode == 0, proc.stderr
        proc = run_docker(refd, str(config), "build", "--no-cache", "-o", f"type=local,dest={our_out}", context)
        assert proc.returncode == 0, proc.stderr
        # directory mtimes are the CLI's write times on both sides (not compared)
        real = snapshot(str(real_out), owner=owner, with_mtime_of_dirs=False)
        ours = snapshot(str(our_out), owner=owner, with_mtime_of_dirs=False)
        assert diff_snapshots(real, ours) == [], f"context spec {spec!r}"

    check()
