"""Registry auth through the session against a real registry (Debian's docker-registry, distribution
2.8) and the real dockerd 20.10: which Auth RPCs dockerd calls for Basic and token auth, who fetches
the token (our client with auth v2, dockerd itself with v1), and how failures surface. Plus unit
tests of the client's Auth service (reference/client/auth.py) against the CLI's formats."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat

import pytest

from conformance import registry as reg
from reference.client import BuildError, Output, build
from reference.client import auth as client_auth
from reference.client.auth import AuthProvider, DockerConfigCredentials, StaticCredentials
from reference.pb import auth_pb2
from reference.transport.base import RpcError, RpcStream, StatusCode

pytestmark = pytest.mark.timeout(120)

USER, PASSWORD = "alice", "s3cret pass"
PULLED = {"pulled/hello.txt": b"hello from the registry\n"}
AUTH = "/moby.filesync.v1.Auth/"


def _auth_calls(result_or_calls) -> list[str]:
    calls = result_or_calls.calls if hasattr(result_or_calls, "calls") else result_or_calls
    return [c[len(AUTH):] for c in calls if c.startswith(AUTH)]


# -- fixtures ----------------------------------------------------------------------------------

@pytest.fixture
def docker_config(tmp_path, monkeypatch):
    """Writes DOCKER_CONFIG/config.json for the given registry credentials and points build() at it."""
    directory = tmp_path / "docker-config"
    directory.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(directory))
    monkeypatch.delenv("BUILDKIT_NO_CLIENT_TOKEN", raising=False)

    def write(host: str, user: str, password: str) -> str:
        reg.write_docker_config(str(directory), host, user, password)
        return str(directory)

    return write


basic_registry = reg.registry_fixture("htpasswd", users={USER: PASSWORD}, repo="test/img", layers=[PULLED])
token_registry = reg.registry_fixture("token", users={USER: PASSWORD}, repo="test/img", layers=[PULLED])


def _context(tmp_path, image: str):
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"FROM {image}\nCOPY x /x\n")
    (ctx / "x").write_text("from the context\n")
    return ctx


def _build_from(dockerd, tmp_path, registry, *, auth: str):
    out = tmp_path / "out"
    result = build(str(_context(tmp_path, registry.pushed.reference)), host=dockerd.host, generation="n+1",
                   filesync=("diffcopy",), auth=auth, outputs=[Output("local", str(out))], no_cache=True,
                   timeout=60, hang_timeout=10)
    return result, out


def _assert_exported(out):
    assert (out / "pulled" / "hello.txt").read_bytes() == PULLED["pulled/hello.txt"]
    assert (out / "x").read_text() == "from the context\n"


def _is_dockerd(agent: str) -> bool:
    return agent.startswith("containerd/")  # dockerd 20.10's resolver; our client sends Python-urllib


# -- the real dockerd --------------------------------------------------------------------------

def test_basic_auth_dockerd_asks_for_credentials(dockerd, docker_config, basic_registry, tmp_path):
    docker_config(basic_registry.host, USER, PASSWORD)
    result, out = _build_from(dockerd, tmp_path, basic_registry, auth="v2")
    _assert_exported(out)
    # Basic needs only Credentials, even from a client that offers a token authority.
    assert _auth_calls(result) == ["Credentials"]
    statuses = [r.status for r in basic_registry.requests("containerd/") if "/manifests/" in r.path]
    assert statuses[:2] == [401, 200]


def test_token_auth_v2_client_fetches_the_token(dockerd, docker_config, token_registry, tmp_path):
    docker_config(token_registry.host, USER, PASSWORD)
    result, out = _build_from(dockerd, tmp_path, token_registry, auth="v2")
    _assert_exported(out)
    calls = _auth_calls(result)
    assert calls[:2] == ["GetTokenAuthority", "FetchToken"] and "Credentials" not in calls
    seen = token_registry.tokens.requests
    assert seen and all(not _is_dockerd(r.user_agent) for r in seen), seen
    assert (seen[0].method, seen[0].user, seen[0].status) == ("GET", USER, 200)
    assert seen[0].scopes == ["repository:test/img:pull"]


def test_token_auth_v1_dockerd_fetches_the_token(dockerd, docker_config, token_registry, tmp_path):
    docker_config(token_registry.host, USER, PASSWORD)
    result, out = _build_from(dockerd, tmp_path, token_registry, auth="v1")
    _assert_exported(out)
    calls = _auth_calls(result)
    assert calls == ["Credentials"]  # GetTokenAuthority was tried and answered Unimplemented
    seen = token_registry.tokens.requests
    assert [(r.method, r.user, r.status) for r in seen] == [("GET", USER, 200)]
    assert _is_dockerd(seen[0].user_agent)


def test_basic_auth_wrong_password_is_a_clear_bounded_401(dockerd, docker_config, basic_registry, tmp_path):
    docker_config(basic_registry.host, USER, "wrong")
    with pytest.raises(BuildError, match="401 Unauthorized"):
        _build_from(dockerd, tmp_path, basic_registry, auth="v1")
    tries = [r for r in basic_registry.requests("containerd/") if "/manifests/" in r.path]
    assert tries and all(r.status == 401 for r in tries)
    # containerd's resolver retries a 401 at most five times: a bounded loop, not a storm.
    assert len(tries) <= 6


def test_token_auth_wrong_password_v1(dockerd, docker_config, token_registry, tmp_path):
    docker_config(token_registry.host, USER, "wrong")
    with pytest.raises(BuildError, match="failed to fetch oauth token: unexpected status: 401"):
        _build_from(dockerd, tmp_path, token_registry, auth="v1")
    seen = token_registry.tokens.requests
    # dockerd's GET, then the OAuth POST a 401 calls for, and then it gives up.
    assert [(r.method, r.status) for r in seen] == [("GET", 401), ("POST", 401)]
    assert all(_is_dockerd(r.user_agent) for r in seen)


def test_token_auth_wrong_password_v2(dockerd, docker_config, token_registry, tmp_path):
    docker_config(token_registry.host, USER, "wrong")
    with pytest.raises(BuildError, match="failed to fetch oauth token: unexpected status: 401"):
        _build_from(dockerd, tmp_path, token_registry, auth="v2")
    seen = token_registry.tokens.requests
    assert [(r.method, r.status) for r in seen] == [("GET", 401), ("POST", 401)]
    assert not any(_is_dockerd(r.user_agent) for r in seen)


def test_authority_with_failing_fetch_token_fails_without_fallback(dockerd, docker_config, token_registry,
                                                                    tmp_path, monkeypatch):
    docker_config(token_registry.host, USER, PASSWORD)

    def unreachable(*args, **kwargs):
        raise RpcError(StatusCode.UNAVAILABLE, "token realm unreachable from the client")

    monkeypatch.setattr(client_auth, "fetch_token", unreachable)
    # The client's status reaches the build error as is; Unavailable is fatal here even though it
    # means "no authority" when GetTokenAuthority answers it.
    with pytest.raises(BuildError, match="failed to authorize: rpc error: code = Unavailable desc = "
                                         "token realm unreachable from the client"):
        _build_from(dockerd, tmp_path, token_registry, auth="v2")
    # dockerd neither asked for credentials nor fetched a token itself.
    assert token_registry.tokens.requests == []


# -- the client's Auth service (no peers) ------------------------------------------------------

class _Stream(RpcStream):
    def __init__(self, request: bytes):
        self.method, self.metadata, self._in, self.sent = "", [], [request], []

    def recv(self, timeout=None):
        return self._in.pop(0) if self._in else None

    def send(self, message):
        self.sent.append(message)

    def flush(self): ...

    def close_send(self): ...

    def cancel(self): ...


def _serve(handler, request):
    stream = _Stream(request.SerializeToString())
    handler(stream)
    return stream.sent[0]


@pytest.mark.parametrize("user, secret, expected", [
    ("u", "p", b'{"Username":"u","Secret":"p"}\n'),
    ("", "tok", b'{"Secret":"tok"}\n'),
    ("a<b>&", "\"\\\n\x01", b'{"Username":"a\\u003cb\\u003e\\u0026","Secret":"\\"\\\\\\n\\u0001"}\n'),
    ("j\u00e9", "\u2028", '{"Username":"j\u00e9","Secret":"\\u2028"}\n'.encode()),
])
def test_credentials_json_matches_go_encoder(user, secret, expected):
    assert client_auth.credentials_json(user, secret) == expected


def test_seed_file_is_shared_with_the_docker_cli(tmp_path):
    # The CLI's json.MarshalIndent of map[string]struct{Seed []byte}.
    known = bytes(range(16))
    (tmp_path / ".token_seed").write_text(json.dumps({"other:5000": {"Seed": base64.b64encode(known).decode()}},
                                                     indent=2))
    seeds = client_auth.TokenSeeds(str(tmp_path))
    assert seeds.get("other:5000") == known
    fresh = seeds.get("new:5000")
    assert len(fresh) == 16
    stored = json.loads((tmp_path / ".token_seed").read_text())
    assert stored == {"other:5000": {"Seed": base64.b64encode(known).decode()},
                      "new:5000": {"Seed": base64.b64encode(fresh).decode()}}
    assert stat.S_IMODE(os.stat(tmp_path / ".token_seed").st_mode) == 0o600
    assert client_auth.TokenSeeds(str(tmp_path)).get("new:5000") == fresh


def test_authority_key_derivation(tmp_path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    salt = os.urandom(32)
    provider = AuthProvider(StaticCredentials({"withcreds": ("u", "p")}, str(tmp_path)), token_authority=True)

    def public(host, salt_=salt):
        return auth_pb2.GetTokenAuthorityResponse.FromString(_serve(
            provider.serve_get_token_authority, auth_pb2.GetTokenAuthorityRequest(Host=host, Salt=salt_))).PublicKey

    # Anonymous: HMAC(salt, "") alone, the same for every client of one daemon.
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    anonymous_seed = hmac.new(salt, b"", hashlib.sha256).digest()
    expected = Ed25519PrivateKey.from_private_bytes(anonymous_seed).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert public("nocreds") == expected
    # With credentials: seed || json(creds) under the salt.
    seed = client_auth.TokenSeeds(str(tmp_path)).get("withcreds")
    key_seed = hmac.new(salt, seed + b'{"Username":"u","Secret":"p"}\n', hashlib.sha256).digest()
    assert public("withcreds") == Ed25519PrivateKey.from_private_bytes(key_seed).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert public("withcreds", os.urandom(32)) != public("withcreds")
    # VerifyTokenAuthority answers in nacl sign format (signature || payload) with that key.
    payload = os.urandom(32)
    signed = auth_pb2.VerifyTokenAuthorityResponse.FromString(_serve(
        provider.serve_verify_token_authority,
        auth_pb2.VerifyTokenAuthorityRequest(Host="withcreds", Salt=salt, Payload=payload))).Signed
    assert signed[64:] == payload
    Ed25519PublicKey.from_public_bytes(public("withcreds")).verify(signed[:64], payload)


@pytest.mark.parametrize("value, disabled", [("t", True), ("TRUE", True), ("1", True), ("0", False),
                                             ("yes", False), ("", False)])
def test_no_client_token_switch(tmp_path, monkeypatch, value, disabled):
    monkeypatch.setenv("BUILDKIT_NO_CLIENT_TOKEN", value)
    provider = AuthProvider(StaticCredentials({}, str(tmp_path)), token_authority=True)
    request = auth_pb2.GetTokenAuthorityRequest(Host="h", Salt=os.urandom(32))
    if disabled:
        with pytest.raises(RpcError) as info:
            _serve(provider.serve_get_token_authority, request)
        assert info.value.code == StatusCode.UNAVAILABLE
    else:
        assert len(auth_pb2.GetTokenAuthorityResponse.FromString(
            _serve(provider.serve_get_token_authority, request)).PublicKey) == 32


def test_v1_provider_serves_only_credentials(tmp_path):
    assert list(AuthProvider(StaticCredentials({}, str(tmp_path))).handlers()) == [AUTH + "Credentials"]
    assert sorted(AuthProvider(StaticCredentials({}, str(tmp_path)), token_authority=True).handlers()) == sorted(
        AUTH + m for m in ("Credentials", "FetchToken", "GetTokenAuthority", "VerifyTokenAuthority"))


@pytest.mark.parametrize("entry, host, expected", [
    ({"127.0.0.1:5000": {"auth": base64.b64encode(b"u:p:colon").decode()}}, "127.0.0.1:5000", ("u", "p:colon")),
    ({"https://127.0.0.1:5000/v2/": {"auth": base64.b64encode(b"u:p").decode()}}, "127.0.0.1:5000", ("u", "p")),
    ({"h": {"identitytoken": "idt", "auth": base64.b64encode(b"u:p").decode()}}, "h", ("", "idt")),
    ({"https://index.docker.io/v1/": {"auth": base64.b64encode(b"hub:pw").decode()}}, "registry-1.docker.io",
     ("hub", "pw")),
    ({"other": {"auth": base64.b64encode(b"u:p").decode()}}, "h", ("", "")),
])
def test_docker_config_lookup(tmp_path, entry, host, expected):
    (tmp_path / "config.json").write_text(json.dumps({"auths": entry}))
    assert DockerConfigCredentials(str(tmp_path)).lookup(host) == expected


def test_credential_helper_replaces_the_file(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-fake"
    helper.write_text('#!/bin/sh\nread host\nif [ "$host" = "h" ]; then\n'
                      '  echo \'{"ServerURL":"h","Username":"<token>","Secret":"from-helper"}\'\nelse\n'
                      '  echo "credentials not found in native keychain"; exit 1\nfi\n')
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    (tmp_path / "config.json").write_text(json.dumps({
        "credsStore": "fake", "auths": {"other": {"auth": base64.b64encode(b"u:p").decode()}}}))
    creds = DockerConfigCredentials(str(tmp_path))
    assert creds.lookup("h") == ("", "from-helper")
    assert creds.lookup("other") == ("", "")  # the store answers for every host, the file is not used


@pytest.fixture
def token_service(tmp_path):
    with reg.load_token_service().TokenService(users={USER: PASSWORD}, workdir=str(tmp_path),
                                               refresh_tokens={"refresh-me": USER}) as service:
        yield service


def test_fetch_token_get_with_basic_auth(token_service):
    log = []
    token, expires_in, issued_at = client_auth.fetch_token(
        token_service.realm, token_service.service, ["repository:a/b:pull"], USER, PASSWORD, log=log)
    assert token.count(".") == 2 and expires_in == token_service.expires_in and issued_at > 0
    assert [(r.method, r.user) for r in token_service.requests] == [("GET", USER)]
    assert log[0][1].endswith("?scope=repository%3Aa%2Fb%3Apull&service=test-registry")


def test_fetch_token_identity_token_falls_back_to_oauth_refresh(token_service):
    token, _, _ = client_auth.fetch_token(token_service.realm, token_service.service, ["repository:a/b:pull"],
                                          "", "refresh-me")
    assert token
    assert [(r.method, r.status, r.grant_type) for r in token_service.requests] == [
        ("GET", 401, ""), ("POST", 200, "refresh_token")]


def test_fetch_token_404_on_get_uses_oauth_password_grant(token_service):
    token_service.get_disabled = True
    client_auth.fetch_token(token_service.realm, token_service.service, ["repository:a/b:pull"], USER, PASSWORD)
    assert [(r.method, r.status, r.grant_type) for r in token_service.requests] == [
        ("GET", 404, ""), ("POST", 200, "password")]


def test_fetch_token_anonymous_failure_message(token_service):
    with pytest.raises(RpcError, match="failed to fetch anonymous token: unexpected status: 401") as info:
        client_auth.fetch_token(token_service.realm, token_service.service, ["repository:a/b:pull"], "", "")
    assert info.value.code == StatusCode.UNKNOWN
    assert len(token_service.requests) == 1  # anonymous: no OAuth retry
