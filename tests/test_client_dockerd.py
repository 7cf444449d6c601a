"""The reference client against a real dockerd 20.10 (started by the tests), with the
docker CLI 20.10 as the reference peer."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
import time

import pytest

from conformance.trees import diff_snapshots, snapshot
from reference.client import BuildError, Output, build
from reference.errors import SessionError

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def context(tmp_path):
    ctx = tmp_path / "ctx"
    (ctx / "sub" / "日本").mkdir(parents=True)
    (ctx / "Dockerfile").write_text("FROM scratch\nCOPY . /\n")
    (ctx / "a.txt").write_text("hello\n")
    (ctx / "sub" / "b.bin").write_bytes(os.urandom(100_000))
    (ctx / "sub" / "日本" / "é").write_text("unicode")
    (ctx / "exec.sh").write_text("#!/bin/sh\n")
    os.chmod(ctx / "exec.sh", 0o755)
    os.symlink("../a.txt", ctx / "sub" / "link")
    os.link(ctx / "a.txt", ctx / "hard")
    (ctx / "empty-dir").mkdir()
    return ctx


def _build(dockerd, ctx, **kw):
    return build(str(ctx), host=dockerd.host, timeout=120, **kw)


def _context_stream(result):
    """The DiffCopy stream that carried the build context (not the .dockerignore probe)."""
    streams = [s for s in result.streams if s.dir_name == "context" and s.protocol == "diffcopy"]
    return max(streams, key=lambda s: s.stats_sent)


def test_local_export_returns_the_context(dockerd, context, tmp_path):
    out = tmp_path / "out"
    result = _build(dockerd, context, outputs=[Output("local", str(out))])
    assert result.image_id is None or result.image_id.startswith("sha256:")
    me = (os.getuid(), os.getgid())
    problems = diff_snapshots(snapshot(str(context), owner=me, with_mtime_of_dirs=False),
                              snapshot(str(out), with_mtime_of_dirs=False))
    assert not problems, "\n".join(problems)


def test_tar_export_matches_the_context(dockerd, context, tmp_path):
    dest = tmp_path / "out.tar"
    _build(dockerd, context, outputs=[Output("tar", str(dest))])
    with tarfile.open(dest) as tf:
        names = {m.name.rstrip("/") for m in tf.getmembers()}
        assert tf.extractfile("sub/b.bin").read() == (context / "sub" / "b.bin").read_bytes()
    expected = {os.path.relpath(os.path.join(d, n), context) for d, ds, fs in os.walk(context) for n in ds + fs}
    assert expected <= names


def test_unchanged_rebuild_requests_nothing_and_an_edit_exactly_one_file(dockerd, context):
    tag = "session-test/incremental:latest"
    first = _build(dockerd, context, tags=[tag])
    assert first.image_id
    second = _build(dockerd, context, tags=[tag])
    ctx_stream = _context_stream(second)
    assert (ctx_stream.reqs_received, ctx_stream.bytes_sent) == (0, 0), ctx_stream
    (context / "sub" / "b.bin").write_bytes(b"changed")
    third = _build(dockerd, context, tags=[tag])
    assert _context_stream(third).requested == ["sub/b.bin"]
    assert third.image_id != second.image_id


def test_hardlinks_never_requested_and_no_stray_files(dockerd, tmp_path):
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM scratch\nCOPY . /\n")
    (ctx / "first").write_text("x" * 1000)
    for i in range(3):
        os.link(ctx / "first", ctx / f"link{i}")
    out = tmp_path / "out"
    first = _build(dockerd, ctx, outputs=[Output("local", str(out))])
    assert not any(r.startswith("link") for r in _context_stream(first).requested)
    shutil.rmtree(out)
    again = _build(dockerd, ctx, outputs=[Output("local", str(out))])
    assert _context_stream(again).requested == []
    # a stray .tmp.NNN file in the daemon's copy would show up in the COPY layer
    assert sorted(os.listdir(out)) == ["Dockerfile", "first", "link0", "link1", "link2"]


def _image_layer_entries(dockerd, image: str) -> dict[str, tuple]:
    """Entries of every layer of ``docker save``: name -> (type, mode, uid, gid, mtime, linkname, sha of data)."""
    import hashlib

    saved = dockerd.cli("save", image, capture_output=True, text=False, check=True).stdout
    entries = {}
    with tarfile.open(fileobj=io.BytesIO(saved)) as outer:
        manifest = json.load(outer.extractfile("manifest.json"))
        for layer in manifest[0]["Layers"]:
            with tarfile.open(fileobj=outer.extractfile(layer)) as tf:
                for m in tf.getmembers():
                    data = tf.extractfile(m).read() if m.isfile() else b""
                    # A directory's mtime in the layer is when dockerd's receiver wrote into a fresh
                    # copy of the context, not the source's (observed: two docker CLI builds of one
                    # context with different shared keys give two different directory mtimes), so
                    # it says nothing about the client; every other field must match.
                    mtime = None if m.isdir() else int(m.mtime)
                    entries[m.name.rstrip("/")] = (m.type, m.mode, m.uid, m.gid, mtime, m.linkname,
                                                   hashlib.sha256(data).hexdigest())
    return entries


def test_same_image_content_as_the_docker_cli(dockerd, context):
    ours = _build(dockerd, context, tags=["session-test/ours:latest"], no_cache=True)
    proc = dockerd.cli("build", "--no-cache", "-t", "session-test/cli:latest", str(context),
                       capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert ours.image_id
    theirs = _image_layer_entries(dockerd, "session-test/cli:latest")
    mine = _image_layer_entries(dockerd, "session-test/ours:latest")
    assert mine == theirs


def test_secret_readable_from_run_mount(dockerd, shell_image, tmp_path):
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(
        f"FROM {shell_image}\nRUN --mount=type=secret,id=token,required=true cat /run/secrets/token > /seen\n")
    secret = tmp_path / "token.txt"
    secret.write_text("s3cr3t-value")
    out = tmp_path / "out"
    result = _build(dockerd, ctx, secrets={"token": str(secret)}, network="none", outputs=[Output("local", str(out))])
    assert (out / "seen").read_text() == "s3cr3t-value"
    assert "/moby.buildkit.secrets.v1.Secrets/GetSecret" in result.calls


def test_generation_n_minus_1_fails_fast_against_dockerd(dockerd, context):
    # Generation n-1 sends the 2017 request (Dockerfile as body, no version=2): dockerd 20.10
    # refuses it at once; with the new request but tarstream only, it has no local source.
    started = time.monotonic()
    with pytest.raises(SessionError, match="v1 builder is no longer supported"):
        _build(dockerd, context, generation="n-1")
    with pytest.raises(BuildError, match="no local sources enabled"):
        _build(dockerd, context, generation="n", filesync=("tarstream",))
    assert time.monotonic() - started < 15


def test_old_auth_with_new_filesync_builds(dockerd, context):
    result = _build(dockerd, context, generation="n+1", filesync=("diffcopy",), auth="v1")
    assert "/moby.filesync.v1.Auth/GetTokenAuthority" not in result.methods
    assert result.image_id


@pytest.mark.parametrize("transport", ["h2", "grpcio"])
def test_both_transports_build(dockerd, context, tmp_path, transport):
    out = tmp_path / "out"
    _build(dockerd, context, transport=transport, outputs=[Output("local", str(out))])
    assert (out / "sub" / "b.bin").read_bytes() == (context / "sub" / "b.bin").read_bytes()


def test_health_answers_promptly_while_a_large_context_streams(dockerd, tmp_path, monkeypatch):
    """Health/Check must answer within 100 ms while ~200 MB of context streams."""
    ctx = tmp_path / "big"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM scratch\nCOPY . /\n")
    block = os.urandom(1 << 20)
    for i in range(200):
        (ctx / f"f{i:03d}").write_bytes(block[i:] + block[:i])
    latencies: list[float] = []
    from reference.client import services as svc

    original = svc.ClientServices.health_check

    def timed(self, stream):
        started = time.monotonic()
        original(self, stream)
        latencies.append(time.monotonic() - started)

    monkeypatch.setattr(svc.ClientServices, "health_check", timed)
    result = _build(dockerd, ctx)
    assert _context_stream(result).bytes_sent >= 200 << 20
    assert len(latencies) >= 1, "the daemon never checked health during the build"
    assert max(latencies) < 0.1, latencies


def test_cli_entry_point_writes_stats_json(dockerd, context, tmp_path):
    stats = tmp_path / "stats.json"
    env = dict(os.environ, DOCKER_HOST=dockerd.host, DOCKER_CONFIG=str(tmp_path / "cfg"))
    proc = subprocess.run(["python3", "-m", "reference.client", "build", "--progress", "plain", "-t",
                           "session-test/cli-entry:latest", "--stats-json", str(stats), str(context)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith("sha256:")
    data = json.loads(stats.read_text())
    ctx_streams = [s for s in data["streams"] if s["dir_name"] == "context"]
    assert ctx_streams and {"stats_sent", "reqs_received", "files_sent", "bytes_sent", "seconds"} <= set(ctx_streams[0])
    assert "load build context" in proc.stderr


def test_daemon_error_becomes_nonzero_exit(dockerd, tmp_path):
    ctx = tmp_path / "bad"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM scratch\nCOPY missing-file /\n")
    env = dict(os.environ, DOCKER_HOST=dockerd.host, DOCKER_CONFIG=str(tmp_path / "cfg"))
    proc = subprocess.run(["python3", "-m", "reference.client", "build", "--progress", "quiet", str(ctx)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "missing-file" in proc.stderr
