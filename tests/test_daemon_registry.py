"""The reference daemon pulls FROM a real registry, resolving auth through the client's session:
our client x our daemon of every generation that can build together (a generation n-1 client serves only
TarStream, which the real generations' daemons do not speak), with Basic and token auth, asserting which Auth
RPCs ran."""

from __future__ import annotations

import pytest

from conformance import registry as reg
from conformance.targets import DaemonSpec, start_reference_daemon
from reference.client import BuildError, Output, build

pytestmark = pytest.mark.timeout(180)

USER, PASSWORD = "bob", "pa55 word"
PULLED = {"base/hello.txt": b"hello from the base image\n"}
AUTH = "/moby.filesync.v1.Auth/"


@pytest.fixture(scope="module", params=["n-1", "n", "n+1"])
def our_daemon(request):
    target = start_reference_daemon(DaemonSpec(f"reference-{request.param}", generation=request.param))
    yield target
    target.stop()


@pytest.fixture
def docker_config(tmp_path, monkeypatch):
    directory = tmp_path / "cfg"
    directory.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(directory))

    def write(host: str, password: str = PASSWORD) -> None:
        reg.write_docker_config(str(directory), host, USER, password)

    return write


token_registry = reg.registry_fixture("token", users={USER: PASSWORD}, repo="test/base", layers=[PULLED])
basic_registry = reg.registry_fixture("htpasswd", users={USER: PASSWORD}, repo="test/base", layers=[PULLED])


def _build(daemon, tmp_path, image: str, client_generation: str):
    ctx = tmp_path / "ctx"
    ctx.mkdir(exist_ok=True)
    (ctx / "Dockerfile").write_text(f"FROM {image}\nCOPY x /x\n")
    (ctx / "x").write_text("from the context\n")
    out = tmp_path / "out"
    # generation n-1 uses the 2017 request, which has no export: check the image instead
    outputs = [Output("local", str(out))] if client_generation != "n-1" else []
    result = build(str(ctx), host=daemon.host, generation=client_generation, outputs=outputs,
                   no_cache=True, timeout=60, hang_timeout=10)
    if outputs:
        assert (out / "base" / "hello.txt").read_bytes() == PULLED["base/hello.txt"]
        assert (out / "x").read_text() == "from the context\n"
    return [c[len(AUTH):] for c in result.calls if c.startswith(AUTH)], result


def _compatible(daemon_generation: str, client_generation: str) -> bool:
    return client_generation != "n-1" or daemon_generation == "n-1"


@pytest.mark.parametrize("client_generation", ["n-1", "n", "n+1"])
def test_token_auth_matrix(our_daemon, client_generation, docker_config, token_registry, tmp_path):
    if not _compatible(our_daemon.generation, client_generation):
        with pytest.raises(BuildError, match="no common file sync protocol"):
            _build(our_daemon, tmp_path, token_registry.pushed.reference, client_generation)
        return
    docker_config(token_registry.host)
    calls, result = _build(our_daemon, tmp_path, token_registry.pushed.reference, client_generation)
    seen = token_registry.tokens.requests
    assert seen, "nobody fetched a token"
    if our_daemon.generation != "n-1" and client_generation != "n-1":
        # the client is the token authority: it fetches (the daemon never saw the password,
        # so the authenticated token requests can only be the client's)
        assert calls[:2] == ["GetTokenAuthority", "FetchToken"] and "Credentials" not in calls
        assert all(r.user == USER for r in seen)
    else:
        # a generation n-1 client serves only Credentials; a generation n-1 daemon asks only for them
        assert "Credentials" in calls and "FetchToken" not in calls
        assert all(r.user == USER for r in seen)
    if our_daemon.generation == "n-1":
        assert "GetTokenAuthority" not in calls
    if client_generation != "n-1":
        assert result.image_id is None  # exported, not committed


@pytest.mark.parametrize("client_generation", ["n-1", "n", "n+1"])
def test_basic_auth_matrix(our_daemon, client_generation, docker_config, basic_registry, tmp_path):
    if not _compatible(our_daemon.generation, client_generation):
        with pytest.raises(BuildError, match="no common file sync protocol"):
            _build(our_daemon, tmp_path, basic_registry.pushed.reference, client_generation)
        return
    docker_config(basic_registry.host)
    calls, _ = _build(our_daemon, tmp_path, basic_registry.pushed.reference, client_generation)
    assert calls == ["Credentials"]


def test_wrong_password_is_a_clear_error_without_a_storm(our_daemon, docker_config, basic_registry, tmp_path):
    docker_config(basic_registry.host, password="wrong")
    before = len(basic_registry.requests())
    with pytest.raises(BuildError, match="401"):
        _build(our_daemon, tmp_path, basic_registry.pushed.reference, "n+1")
    assert len(basic_registry.requests()) - before <= 6


def test_registry_tls_verifies_as_dockerd_does_not_x509_strict(monkeypatch):
    """Python 3.13's default context is X509-strict and refuses registry certificates Go's crypto/x509 takes
    (no Authority Key Identifier, say): the reference daemon's registry client verifies as dockerd does."""
    import http.client
    import ssl

    from reference.daemon import registry

    seen = {}

    class Refused(Exception):
        pass

    class Capture:
        def __init__(self, host, port, timeout=None, context=None):
            seen["context"] = context
            raise Refused

    monkeypatch.setattr(http.client, "HTTPSConnection", Capture)
    client = registry.RegistryClient(registry.parse_reference("registry.example:5000/x:1"), None, insecure_hosts=())
    with pytest.raises(Refused):
        client._open("GET", "https://registry.example:5000/v2/", {})
    context = seen["context"]
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert not context.verify_flags & ssl.VERIFY_X509_STRICT
