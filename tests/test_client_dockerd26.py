"""The reference client against a private dockerd 26.1 (generation n+1 daemon), compared with dockerd 20.10.

dockerd 26.1 escapes the values of a FileSync metadata key as soon as one of them is non-ASCII and marks the
key with ``<key>-encoded: 1`` (conformance/SPEC.md, META-DECODE-1). A client that ignores the marker loses
every ``.dockerignore`` exclusion and cannot serve a non-ASCII COPY source or ``-f`` name. Each build runs
against both daemons: the export from dockerd 26.1 must be exactly the one dockerd 20.10 (raw UTF-8 metadata)
gives, and that one is checked against the expected tree written out by hand.
"""

from __future__ import annotations

import os

import pytest

from conformance import realpeers
from conformance.trees import diff_snapshots, snapshot
from reference.client import Output, build

pytestmark = [pytest.mark.timeout(300), pytest.mark.real_peer]

DOCKERIGNORE = "*.log\n!keep.log\n日本/*\n!日本/keep.txt\n"
# -f with a non-ASCII name; every COPY source named, so the context transfer carries followpaths
NAMED_DOCKERFILE = "日本.Dockerfile"
NAMED_COPIES = "FROM scratch\nCOPY ünïcødé.txt /\nCOPY 日本 /日本/\nCOPY *.log /logs/\n"
NAMED_EXPECTED = {"ünïcødé.txt", "日本", "日本/keep.txt", "logs", "logs/keep.log"}
# the default Dockerfile copying the whole context: only the exclusions decide what arrives
WHOLE_CONTEXT = "FROM scratch\nCOPY . /\n"
WHOLE_EXPECTED = {".dockerignore", "Dockerfile", NAMED_DOCKERFILE, "a.txt", "keep.log", "ünïcødé.txt", "日本",
                  "日本/keep.txt", "sub", "sub/b.txt"}


@pytest.fixture(scope="module")
def dockerd26():
    """A private dockerd 26.1 for this module."""
    realpeers.require_docker("dockerd-26.1")
    with realpeers.PrivateDockerd("dockerd-26.1") as daemon:
        yield daemon


@pytest.fixture
def context(tmp_path):
    ctx = tmp_path / "kontext-ü"  # the session's Name and Sharedkey headers then carry raw UTF-8, as Go sends them
    (ctx / "日本").mkdir(parents=True)
    (ctx / "sub").mkdir()
    files = {".dockerignore": DOCKERIGNORE, "Dockerfile": WHOLE_CONTEXT, NAMED_DOCKERFILE: NAMED_COPIES,
             "a.txt": "a\n", "keep.log": "kept\n", "drop.log": "excluded by *.log\n", "ünïcødé.txt": "unicode\n",
             "日本/keep.txt": "re-included\n", "日本/x.txt": "excluded by 日本/*\n", "sub/b.txt": "b\n"}
    for rel, text in files.items():
        (ctx / rel).write_text(text, encoding="utf-8")
    return ctx


def _export(daemon, ctx, dest, generation: str, dockerfile: str | None):
    build(str(ctx), host=daemon.host, dockerfile=str(ctx / dockerfile) if dockerfile else None,
          outputs=[Output("local", str(dest))], generation=generation, timeout=120)
    return snapshot(str(dest), with_mtime_of_dirs=False)


@pytest.mark.parametrize("generation", ["n", "n+1"])
@pytest.mark.parametrize("dockerfile, expected", [(NAMED_DOCKERFILE, NAMED_EXPECTED), (None, WHOLE_EXPECTED)],
                         ids=["named-sources-and-f", "whole-context"])
def test_non_ascii_metadata_from_dockerd_26_is_decoded(dockerd, dockerd26, context, tmp_path, generation,
                                                       dockerfile, expected):
    from_20 = _export(dockerd, context, tmp_path / "out-20.10", generation, dockerfile)
    assert set(from_20) == expected, sorted(set(from_20) ^ expected)
    from_26 = _export(dockerd26, context, tmp_path / "out-26.1", generation, dockerfile)
    problems = diff_snapshots(from_20, from_26)
    assert not problems, "dockerd 26.1's export differs from dockerd 20.10's:\n" + "\n".join(problems)
    with open(os.path.join(tmp_path / "out-26.1", "ünïcødé.txt"), encoding="utf-8") as fh:
        assert fh.read() == "unicode\n"


@pytest.fixture
def varied_context(tmp_path):
    """Every entry type a context usually holds (as tests/test_client_dockerd.py's context)."""
    ctx = tmp_path / "varied"
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


@pytest.mark.parametrize("generation", ["n", "n+1"])
def test_exports_from_dockerd_26_return_the_context(dockerd26, varied_context, tmp_path, generation):
    import tarfile

    out = tmp_path / "out"
    result = build(str(varied_context), host=dockerd26.host, outputs=[Output("local", str(out))],
                   generation=generation, timeout=120)
    me = (os.getuid(), os.getgid())
    problems = diff_snapshots(snapshot(str(varied_context), owner=me, with_mtime_of_dirs=False),
                              snapshot(str(out), with_mtime_of_dirs=False))
    assert not problems, "\n".join(problems)
    # generation n+1 serves Secrets and SSH on every session, as buildx does (SSH with no agent: CheckAgent
    # answers that the key is unset)
    secrets = "/moby.buildkit.secrets.v1.Secrets/GetSecret"
    assert (secrets in result.methods) == (generation == "n+1"), result.methods
    ssh = {"/moby.sshforward.v1.SSH/CheckAgent", "/moby.sshforward.v1.SSH/ForwardAgent"}
    assert (ssh <= set(result.methods)) == (generation == "n+1"), result.methods
    dest = tmp_path / "out.tar"
    build(str(varied_context), host=dockerd26.host, outputs=[Output("tar", str(dest))], generation=generation,
          timeout=120)
    with tarfile.open(dest) as tf:
        names = {m.name.rstrip("/") for m in tf.getmembers()}
        assert tf.extractfile("sub/b.bin").read() == (varied_context / "sub" / "b.bin").read_bytes()
    expected = {os.path.relpath(os.path.join(d, n), varied_context)
                for d, ds, fs in os.walk(varied_context) for n in ds + fs}
    assert names == expected, sorted(names ^ expected)
