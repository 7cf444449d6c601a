"""The reference daemon's Engine API beyond the build: what it serves for its own images (tag, inspect,
history, save, delete) and how it refuses the rest, driven by the real docker CLIs 20.10 and 26.1."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile

import pytest

from conformance import peers, realpeers
from conformance.trees import write_file

from test_daemon import RefDaemon  # noqa: E402  (same tests directory)

CLIENTS = ("docker-cli-20.10", "docker-cli-26.1")


@pytest.fixture(autouse=True, scope="module")
def _clients_installed():
    realpeers.require_docker(*CLIENTS)  # skips on a developer machine without them, fails on CI


@pytest.fixture(scope="module")
def refd(tmp_path_factory):
    d = RefDaemon(str(tmp_path_factory.mktemp("refd") / "root"))
    yield d
    d.close()


@pytest.fixture(scope="module")
def cli(refd, tmp_path_factory):
    """cli(client, *args): a docker CLI peer against the reference daemon."""
    configs = tmp_path_factory.mktemp("cli-config")

    def run(client: str, *args: str, env_extra: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "BUILDKIT_", "BUILDX_"))}
        env.update(peers.client_env(client, str(configs / client)), DOCKER_HOST=refd.host, **(env_extra or {}))
        return subprocess.run([peers.binary(client), *args], env=env, capture_output=True, text=True,
                              timeout=120, **kwargs)
    return run


@pytest.fixture(scope="module")
def image(cli, tmp_path_factory) -> str:
    """The id of ``refimg:1``, two COPY layers and a metadata-only step, built by the docker CLI 20.10."""
    context = str(tmp_path_factory.mktemp("ctx"))
    write_file(context, "Dockerfile", b"FROM scratch\nCOPY a /a\nENV X=1\nCOPY b /b\n")
    write_file(context, "a", b"first\n")
    write_file(context, "b", os.urandom(50_000))
    proc = cli("docker-cli-20.10", "build", "-q", "-t", "refimg:1", context)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def _inspect(cli, client: str, name: str) -> dict:
    proc = cli(client, "image", "inspect", name)
    assert proc.returncode == 0, proc.stderr
    [found] = json.loads(proc.stdout)
    return found


@pytest.mark.parametrize("peer", CLIENTS)
def test_tag_inspect_and_remove(cli, image, peer):
    tag = f"other/name:{peer}"
    proc = cli(peer, "tag", "refimg:1", tag)
    assert proc.returncode == 0, proc.stderr
    found = _inspect(cli, peer, tag)
    assert found["Id"] == image and {"refimg:1", tag} <= set(found["RepoTags"])
    assert found["RootFS"]["Type"] == "layers" and len(found["RootFS"]["Layers"]) == 2
    assert "X=1" in found["Config"]["Env"]
    proc = cli(peer, "tag", "nope:1", "x:1")
    assert proc.returncode != 0 and "No such image: nope:1" in proc.stderr, proc.stderr
    proc = cli(peer, "rmi", tag)
    assert proc.returncode == 0 and f"Untagged: {tag}" in proc.stdout, proc.stdout + proc.stderr
    assert tag not in _inspect(cli, peer, "refimg:1")["RepoTags"]


def test_tag_errors_over_the_api(refd, image):
    status, _, body = refd.get("/v1.41/images/refimg:1/tag?repo=Bad%20Name&tag=1", "POST")
    assert status == 400 and "invalid reference format" in json.loads(body)["message"]
    status, _, body = refd.get("/v1.41/images/refimg:1/tag?repo=api-tagged", "POST")
    assert (status, body) == (201, b"")
    status, _, body = refd.get("/v1.41/images/api-tagged:latest/json")
    assert status == 200 and json.loads(body)["Id"] == image


@pytest.mark.parametrize("peer", CLIENTS)
def test_history(cli, image, peer):
    proc = cli(peer, "history", "--no-trunc", "--format", "{{.ID}}|{{.CreatedBy}}|{{.Size}}|{{.Comment}}",
               "refimg:1")
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("|") for line in proc.stdout.splitlines()]
    # newest first; only the top row names the image; the ENV step adds no layer
    assert [(r[0], r[1]) for r in rows] == [(image, "COPY b /b # buildkit"), ("<missing>", "ENV X=1"),
                                            ("<missing>", "COPY a /a # buildkit")]
    assert rows[1][2] == "0B" and rows[0][2] != "0B"
    assert {r[3] for r in rows} == {"buildkit.dockerfile.v0"}


def _check_archive(path: str, image: str, tags: list[str]) -> None:
    """A docker-archive: manifest.json names the config (whose digest is the image id) and the layers (whose
    digests are the config's diff ids); repositories maps each tag to the top layer's directory."""
    with tarfile.open(path) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))
        assert len(manifest) == 1 and manifest[0]["RepoTags"] == tags
        config_bytes = tar.extractfile(manifest[0]["Config"]).read()
        assert "sha256:" + hashlib.sha256(config_bytes).hexdigest() == image
        config = json.loads(config_bytes)
        layers = [tar.extractfile(name).read() for name in manifest[0]["Layers"]]
        assert ["sha256:" + hashlib.sha256(layer).hexdigest() for layer in layers] == config["rootfs"]["diff_ids"]
        names = tarfile.open(fileobj=io.BytesIO(layers[-1])).getnames()
        assert "b" in [n.lstrip("./") for n in names], names
        top = manifest[0]["Layers"][-1].split("/")[0]
        repositories = json.load(tar.extractfile("repositories"))
        assert repositories == {"refimg": {tag.split(":")[1]: top for tag in tags}}


@pytest.mark.parametrize("peer", CLIENTS)
def test_save_writes_a_docker_archive(cli, image, peer, tmp_path):
    out = tmp_path / "x.tar"
    proc = cli(peer, "save", "-o", str(out), "refimg:1")
    assert proc.returncode == 0, proc.stderr
    _check_archive(str(out), image, ["refimg:1"])
    by_id = tmp_path / "by-id.tar"  # named by id: no tag recorded, as dockerd
    proc = cli(peer, "save", "-o", str(by_id), image[len("sha256:"):][:12])
    assert proc.returncode == 0, proc.stderr
    with tarfile.open(by_id) as tar:
        [entry] = json.load(tar.extractfile("manifest.json"))
        assert entry["RepoTags"] is None and entry["Config"] == image[len("sha256:"):] + ".json"
        assert "repositories" not in tar.getnames()
    proc = cli(peer, "save", "-o", str(tmp_path / "y.tar"), "refimg:1", "nope:2")
    assert proc.returncode != 0 and "No such image: nope:2" in proc.stderr, proc.stderr


def test_saved_archive_loads_into_dockerd_26(cli, image, tmp_path):
    realpeers.require_docker("dockerd-26.1", "docker-cli-26.1")
    out = tmp_path / "x.tar"
    assert cli("docker-cli-26.1", "save", "-o", str(out), "refimg:1").returncode == 0
    with realpeers.PrivateDockerd("dockerd-26.1") as dockerd:
        proc = dockerd.cli("load", "-i", str(out), client="docker-cli-26.1")
        assert proc.returncode == 0 and "Loaded image: refimg:1" in proc.stdout, proc.stdout + proc.stderr
        proc = dockerd.cli("image", "inspect", "--format", "{{.Id}}", "refimg:1", client="docker-cli-26.1")
        assert proc.stdout.strip() == image, proc.stdout + proc.stderr


@pytest.mark.parametrize("peer", CLIENTS)
def test_run_and_create_say_the_daemon_runs_no_containers(cli, image, peer):
    for args in (("run", "--rm", "refimg:1"), ("create", "refimg:1")):
        proc = cli(peer, *args)
        assert proc.returncode != 0, proc.stdout
        assert "not supported by the reference daemon: POST /containers/create" in proc.stderr, proc.stderr
        assert "runs no containers" in proc.stderr and "Unable to find image" not in proc.stderr, proc.stderr


def test_the_classic_builder_is_refused_saying_why(cli, tmp_path):
    """DOCKER_BUILDKIT=0: the docker CLI 20.10 uploads the context as the body of POST /build (no session)."""
    write_file(str(tmp_path), "Dockerfile", b"FROM scratch\n")
    proc = cli("docker-cli-20.10", "build", str(tmp_path), env_extra={"DOCKER_BUILDKIT": "0"})
    assert proc.returncode != 0, proc.stdout
    assert "not supported by the reference daemon: the classic builder (DOCKER_BUILDKIT=0)" in proc.stderr, \
        proc.stdout + proc.stderr
    assert "remote ''" not in proc.stderr, proc.stderr


UNSERVED = [
    ("GET", "/containers/json"), ("POST", "/containers/create"), ("POST", "/containers/abc/start"),
    ("POST", "/exec/abc/start"), ("POST", "/commit"), ("GET", "/networks"), ("GET", "/volumes"),
    ("GET", "/swarm"), ("GET", "/nodes"), ("GET", "/services"), ("GET", "/tasks"), ("GET", "/secrets"),
    ("GET", "/configs"), ("GET", "/plugins"), ("GET", "/distribution/x/json"), ("POST", "/auth"),
    ("GET", "/events"), ("POST", "/images/create"), ("POST", "/images/load"), ("GET", "/images/search"),
    ("POST", "/images/prune"), ("POST", "/images/refimg:1/push"),
]


@pytest.mark.parametrize("method,path", UNSERVED)
def test_unserved_endpoints_say_so(refd, method, path):
    for prefixed in (path, "/v1.41" + path):
        status, _, body = refd.get(prefixed, method)
        assert status == 501, (prefixed, status, body)
        assert json.loads(body)["message"].startswith(f"not supported by the reference daemon: {method} {path} ")
