"""reference/daemon/registry.py: pulling from a real distribution registry (Debian's docker-registry)
with registry auth resolved through a fake session whose Auth service is the reference client's
``AuthProvider``, plus the sans-registry pieces (references, challenges, scopes, layers)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import tarfile

import pytest

from conformance import registry as reg
from reference.client.auth import AuthProvider, StaticCredentials
from reference.daemon import registry as pull
from reference.pb import auth_pb2
from reference.transport.base import RpcError, RpcStream, StatusCode

pytestmark = pytest.mark.timeout(60)

USER, PASSWORD = "alice", "correct horse"
FILES = {"pulled/hello.txt": b"hello from the registry\n", "pulled/sub/data.bin": os.urandom(5000)}


# -- a session in memory -------------------------------------------------------------------------

class _MemoryStream(RpcStream):
    """One unary call served in memory: the handler reads the request and sends the response."""

    def __init__(self, method: str, request: bytes):
        self.method, self.metadata = method, []
        self._incoming = [request]
        self.sent: list[bytes] = []

    def recv(self, timeout=None):
        return self._incoming.pop(0) if self._incoming else None

    def send(self, message: bytes) -> None:
        self.sent.append(message)

    def flush(self) -> None: ...

    def close_send(self) -> None: ...

    def cancel(self) -> None: ...


class FakeSession:
    """``call(method, request) -> response`` backed by an AuthProvider's handlers; records every
    method called, including those answered Unimplemented."""

    def __init__(self, provider: AuthProvider, overrides: dict | None = None):
        self.handlers = dict(provider.handlers())
        self.handlers.update(overrides or {})
        self.calls: list[str] = []

    def __call__(self, method: str, request: bytes) -> bytes:
        self.calls.append(method.rsplit("/", 1)[-1])
        handler = self.handlers.get(method)
        if handler is None:
            raise RpcError(StatusCode.UNIMPLEMENTED, f"unknown method {method}")
        stream = _MemoryStream(method, request)
        handler(stream)
        return stream.sent[0]


def _provider(tmp_path, host, creds=(USER, PASSWORD), *, v2: bool, name="cfg"):
    config_dir = tmp_path / name
    config_dir.mkdir(exist_ok=True)
    return AuthProvider(StaticCredentials({host: creds}, str(config_dir)), token_authority=v2)


def _authorizer(session, cache, **kw):
    return pull.SessionAuthorizer(session, pull.daemon_salt(), cache=cache, **kw)


def _assert_pulled(rootfs, config, pushed):
    for path, data in FILES.items():
        assert (rootfs / path).read_bytes() == data
    assert config["rootfs"]["diff_ids"] == pushed.config["rootfs"]["diff_ids"]
    assert config["_digest"] == pushed.manifest_digest


# -- registries ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def basic_registry():
    reg.require_registry()
    with reg.LocalRegistry(auth="htpasswd", users={USER: PASSWORD}) as registry:
        registry.pushed = reg.push_image(registry, "test/img", "1", [FILES], credentials=(USER, PASSWORD))
        yield registry


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory):
    reg.require_registry()
    tokens = reg.load_token_service().TokenService(users={USER: PASSWORD}, workdir=str(tmp_path_factory.mktemp("tok")))
    with tokens, reg.LocalRegistry(auth="token", token=reg.token_registry_settings(tokens)) as registry:
        registry.tokens = tokens
        registry.pushed = reg.push_image(registry, "test/img", "1", [FILES], credentials=(USER, PASSWORD))
        registry.pushed_oci = reg.push_image(registry, "test/oci", "1", [{"a": b"1"}, FILES], oci=True,
                                             index=True, credentials=(USER, PASSWORD))
        yield registry


def test_basic_auth_uses_credentials(basic_registry, tmp_path):
    session = FakeSession(_provider(tmp_path, basic_registry.host, v2=True))
    rootfs = tmp_path / "rootfs"
    (tmp_path / "layers").mkdir()
    config = pull.pull_image(basic_registry.pushed.reference, str(rootfs), _authorizer(session, pull.HandlerCache()),
                             save_layers_to=str(tmp_path / "layers"))
    _assert_pulled(rootfs, config, basic_registry.pushed)
    [kept] = config["_layer_tars"]
    assert "sha256:" + hashlib.sha256(open(kept, "rb").read()).hexdigest() == config["rootfs"]["diff_ids"][0]
    # Basic never asks for the token authority, even from a client that has one.
    assert session.calls == ["Credentials"]


def test_basic_auth_wrong_password_is_one_clear_401(basic_registry, tmp_path):
    session = FakeSession(_provider(tmp_path, basic_registry.host, (USER, "wrong"), v2=False))
    before = len(basic_registry.requests())
    with pytest.raises(pull.RegistryAuthError, match="401 Unauthorized"):
        pull.pull_image(basic_registry.pushed.reference, str(tmp_path / "rootfs"),
                        _authorizer(session, pull.HandlerCache()))
    # The anonymous probe, then one retry with the credentials: no retry storm.
    assert len(basic_registry.requests()) - before == 2


def test_anonymous_client_gets_a_clear_error(basic_registry, tmp_path):
    session = FakeSession(_provider(tmp_path, basic_registry.host, v2=False), overrides={})
    session.handlers.clear()  # a client without the Auth service: everything is Unimplemented
    with pytest.raises(pull.RegistryAuthError, match="no usable credentials"):
        pull.pull_image(basic_registry.pushed.reference, str(tmp_path / "rootfs"),
                        _authorizer(session, pull.HandlerCache()))
    assert session.calls == ["Credentials"]


def test_token_auth_v2_client_fetches_the_token(token_registry, tmp_path):
    provider = _provider(tmp_path, token_registry.host, v2=True)
    session = FakeSession(provider)
    rootfs = tmp_path / "rootfs"
    config = pull.pull_image(token_registry.pushed.reference, str(rootfs), _authorizer(session, pull.HandlerCache()))
    _assert_pulled(rootfs, config, token_registry.pushed)
    assert session.calls == ["GetTokenAuthority", "FetchToken"]
    assert provider.token_requests and provider.token_requests[0][0] == "GET"
    assert "scope=repository%3Atest%2Fimg%3Apull" in provider.token_requests[0][1]


def test_token_auth_v1_daemon_fetches_the_token(token_registry, tmp_path):
    provider = _provider(tmp_path, token_registry.host, v2=False)
    session = FakeSession(provider)
    before = len(token_registry.tokens.requests)
    rootfs = tmp_path / "rootfs"
    authorizer = _authorizer(session, pull.HandlerCache())
    config = pull.pull_image(token_registry.pushed.reference, str(rootfs), authorizer)
    _assert_pulled(rootfs, config, token_registry.pushed)
    # GetTokenAuthority is answered Unimplemented by a v1 client, so the daemon asks for credentials.
    assert session.calls == ["GetTokenAuthority", "Credentials"]
    assert not provider.token_requests and authorizer.token_fetches == 1
    seen = token_registry.tokens.requests[before:]
    assert [(r.method, r.user, r.status) for r in seen] == [("GET", USER, 200)]


def test_oci_index_picks_the_platform_and_verifies_layers(token_registry, tmp_path):
    session = FakeSession(_provider(tmp_path, token_registry.host, v2=True))
    rootfs = tmp_path / "rootfs"
    config = pull.pull_image(token_registry.pushed_oci.reference, str(rootfs),
                             _authorizer(session, pull.HandlerCache()), platform=("linux", "amd64", None))
    assert config["architecture"] == "amd64"
    assert (rootfs / "a").read_bytes() == b"1"
    _assert_pulled(rootfs, config, token_registry.pushed_oci)


def test_tokens_are_cached_for_nine_tenths_of_their_lifetime(token_registry, tmp_path):
    now = [1_000_000_000.0]
    provider = _provider(tmp_path, token_registry.host, v2=True)
    session = FakeSession(provider)
    cache = pull.HandlerCache()
    authorizer = _authorizer(session, cache, clock=lambda: now[0])
    scopes = ["repository:test/img:pull"]
    authorizer.challenged(token_registry.host, [f'Bearer realm="{token_registry.tokens.realm}",'
                                                f'service="{token_registry.tokens.service}",scope="{scopes[0]}"'],
                          rejected=False)
    first = authorizer.authorization(token_registry.host, scopes)
    lifetime = token_registry.tokens.expires_in
    issued = _issued_at_of(first)
    now[0] = issued + 0.9 * lifetime - 1
    assert authorizer.authorization(token_registry.host, scopes) == first
    assert session.calls.count("FetchToken") == 1
    now[0] = issued + 0.9 * lifetime + 1
    authorizer.authorization(token_registry.host, scopes)
    assert session.calls.count("FetchToken") == 2


def _issued_at_of(bearer: str) -> int:
    claims = bearer.split(" ", 1)[1].split(".")[1]
    return json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))["iat"]


def test_handler_reused_across_sessions_only_after_verification(token_registry, tmp_path):
    cache = pull.HandlerCache()
    provider = _provider(tmp_path, token_registry.host, v2=True)
    first = FakeSession(provider)
    pull.pull_image(token_registry.pushed.reference, str(tmp_path / "r1"), _authorizer(first, cache))
    # Same client (same seed and credentials), new session: proves the key, then reuses the token.
    again = FakeSession(_provider(tmp_path, token_registry.host, v2=True))
    pull.pull_image(token_registry.pushed.reference, str(tmp_path / "r2"), _authorizer(again, cache))
    assert again.calls == ["VerifyTokenAuthority"]
    # Another client (its own seed): the signature does not verify, so it gets its own handler.
    stranger = FakeSession(_provider(tmp_path, token_registry.host, v2=True, name="other"))
    pull.pull_image(token_registry.pushed.reference, str(tmp_path / "r3"), _authorizer(stranger, cache))
    assert stranger.calls == ["VerifyTokenAuthority", "GetTokenAuthority", "FetchToken"]
    # A v1 client cannot verify (Unimplemented) and falls back to Credentials and its own token.
    v1 = FakeSession(_provider(tmp_path, token_registry.host, v2=False, name="v1"))
    pull.pull_image(token_registry.pushed.reference, str(tmp_path / "r4"), _authorizer(v1, cache))
    assert v1.calls == ["VerifyTokenAuthority", "VerifyTokenAuthority", "GetTokenAuthority", "Credentials"]


def test_authority_without_working_fetch_token_fails_without_fallback(token_registry, tmp_path):
    def broken_fetch(stream):
        stream.recv()
        raise RpcError(StatusCode.UNAVAILABLE, "token service unreachable from the client")

    provider = _provider(tmp_path, token_registry.host, v2=True)
    session = FakeSession(provider, overrides={"/moby.filesync.v1.Auth/FetchToken": broken_fetch})
    before = len(token_registry.tokens.requests)
    with pytest.raises(pull.RegistryAuthError, match="FetchToken on the session failed.*unreachable"):
        pull.pull_image(token_registry.pushed.reference, str(tmp_path / "rootfs"),
                        _authorizer(session, pull.HandlerCache()))
    assert session.calls == ["GetTokenAuthority", "FetchToken"]
    assert len(token_registry.tokens.requests) == before  # the daemon did not fetch one itself


def test_token_auth_wrong_password_fails_clearly(token_registry, tmp_path):
    session = FakeSession(_provider(tmp_path, token_registry.host, (USER, "wrong"), v2=False))
    before = len(token_registry.tokens.requests)
    with pytest.raises(pull.RegistryAuthError, match="failed to fetch oauth token: unexpected status: 401"):
        pull.pull_image(token_registry.pushed.reference, str(tmp_path / "rootfs"),
                        _authorizer(session, pull.HandlerCache()))
    # GET, then the OAuth POST the 401 calls for; nothing more.
    assert [r.method for r in token_registry.tokens.requests[before:]] == ["GET", "POST"]


def test_corrupted_blob_is_rejected(tmp_path):
    reg.require_registry()
    with reg.LocalRegistry() as registry:
        pushed = reg.push_image(registry, "test/bad", "1", [FILES])
        digest = pushed.layer_digests[0].split(":")[1]
        data_path = os.path.join(registry.dir, "storage", "docker", "registry", "v2", "blobs", "sha256",
                                 digest[:2], digest, "data")
        blob = bytearray(open(data_path, "rb").read())
        blob[-9] ^= 0xFF  # inside the gzip trailer's CRC: same size, different digest
        open(data_path, "wb").write(bytes(blob))
        with pytest.raises(pull.RegistryError, match="digest mismatch"):
            pull.pull_image(pushed.reference, str(tmp_path / "rootfs"), None)


# -- pieces without a registry -------------------------------------------------------------------

@pytest.mark.parametrize("text, host, repository, tag, digest", [
    ("127.0.0.1:5000/test/img:1", "127.0.0.1:5000", "test/img", "1", None),
    ("localhost/img", "localhost", "img", "latest", None),
    ("busybox", "registry-1.docker.io", "library/busybox", "latest", None),
    ("docker.io/user/app:v2", "registry-1.docker.io", "user/app", "v2", None),
    ("example.com/a/b/c@sha256:" + "ab" * 32, "example.com", "a/b/c", None, "sha256:" + "ab" * 32),
    ("registry:5000/x", "registry:5000", "x", "latest", None),
])
def test_parse_reference(text, host, repository, tag, digest):
    ref = pull.parse_reference(text)
    assert (ref.host, ref.repository, ref.tag, ref.digest) == (host, repository, tag, digest)


@pytest.mark.parametrize("text", ["UPPER/case", "host:5000/img:bad tag", "img@sha256:short", "a//b"])
def test_parse_reference_rejects(text):
    with pytest.raises(pull.RegistryError):
        pull.parse_reference(text)


def test_parse_www_authenticate():
    [bearer] = pull.parse_www_authenticate(
        ['Bearer realm="http://127.0.0.1:1/token",service="svc",scope="repository:a/b:pull,push",error="invalid_token"'])
    assert bearer.scheme == "bearer"
    assert bearer.params == {"realm": "http://127.0.0.1:1/token", "service": "svc",
                             "scope": "repository:a/b:pull,push", "error": "invalid_token"}
    [basic] = pull.parse_www_authenticate(['Basic realm="basic-realm"'])
    assert (basic.scheme, basic.params) == ("basic", {"realm": "basic-realm"})


def test_normalize_scopes_merges_actions():
    assert pull.normalize_scopes(["repository:b:push", "repository:a:pull", "repository:b:pull",
                                  "registry:catalog:*"]) == [
        "registry:catalog:*", "repository:a:pull", "repository:b:pull,push"]


def _tar(entries: list[tuple[str, bytes | None]]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def test_layers_apply_in_order_with_whiteouts(tmp_path):
    import gzip

    rootfs = tmp_path / "rootfs"
    lower = _tar([("etc", None), ("etc/keep", b"k"), ("etc/gone", b"g"), ("opq", None), ("opq/old", b"o"),
                  ("top", b"t")])
    upper = _tar([("etc/.wh.gone", b""), ("opq", None), ("opq/new", b"n"), ("opq/.wh..wh..opq", b""),
                  ("top", b"T")])
    for layer, compress in ((lower, True), (upper, False)):
        diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
        pull.apply_layer(io.BytesIO(gzip.compress(layer) if compress else layer), str(rootfs), diff_id)
    tree = sorted(str(p.relative_to(rootfs)) for p in rootfs.rglob("*"))
    assert tree == ["etc", "etc/keep", "opq", "opq/new", "top"]
    assert (rootfs / "top").read_bytes() == b"T"


def test_layer_diff_id_is_checked(tmp_path):
    layer = _tar([("f", b"x")])
    with pytest.raises(pull.RegistryError, match="diff_id mismatch"):
        pull.apply_layer(io.BytesIO(layer), str(tmp_path / "rootfs"), "sha256:" + "0" * 64)


def test_layer_cannot_escape_the_root(tmp_path):
    layer = _tar([("../evil", b"x")])
    with pytest.raises(Exception, match="escapes"):
        pull.apply_layer(io.BytesIO(layer), str(tmp_path / "rootfs"))
    assert not (tmp_path / "evil").exists()


def test_salt_must_be_32_bytes():
    with pytest.raises(ValueError):
        pull.SessionAuthorizer(lambda m, r: b"", b"short")
    assert len(pull.daemon_salt()) == 32 and pull.daemon_salt() == pull.daemon_salt()


def test_bad_public_key_length_is_an_error(tmp_path):
    def short_key(stream):
        stream.recv()
        stream.send(auth_pb2.GetTokenAuthorityResponse(PublicKey=b"x" * 31).SerializeToString())

    session = FakeSession(_provider(tmp_path, "h", v2=True),
                          overrides={"/moby.filesync.v1.Auth/GetTokenAuthority": short_key})
    authorizer = _authorizer(session, pull.HandlerCache())
    with pytest.raises(pull.RegistryAuthError, match="invalid pubkey length 31"):
        authorizer.challenged("h", ['Bearer realm="http://127.0.0.1:9/t"'], rejected=False)


def test_pull_over_a_real_h2_session(token_registry, tmp_path):
    """The daemon integration as the builder would wire it: unary calls on the session's connection."""
    import socket

    from reference.transport.h2grpc import connect_h2, serve_h2

    provider = _provider(tmp_path, token_registry.host, v2=True)
    client_sock, daemon_sock = socket.socketpair()
    server = serve_h2(client_sock, provider.handlers())
    conn = connect_h2(daemon_sock)
    try:
        authorizer = pull.SessionAuthorizer(lambda method, request: conn.unary(method, request, timeout=30.0),
                                            pull.daemon_salt(), session_id="session-1", cache=pull.HandlerCache())
        rootfs = tmp_path / "rootfs"
        config = pull.pull_image(token_registry.pushed.reference, str(rootfs), authorizer)
        _assert_pulled(rootfs, config, token_registry.pushed)
        assert provider.token_requests  # the client, not the daemon, fetched the token
        assert authorizer.token_fetches == 1
    finally:
        conn.close()
        server.close()
        client_sock.close()
        daemon_sock.close()
