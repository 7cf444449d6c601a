"""Daemon role: registry auth through the session (v1 Credentials, v2 token authority).

The suite plays the client and serves the Auth methods itself, recording every
call, while the daemon under test pulls ``FROM`` a real distribution registry on
127.0.0.1 (Debian's docker-registry) with Basic or token auth.
"""

from __future__ import annotations

import threading

import pytest

from reference.client.auth import AuthProvider, StaticCredentials
from reference.pb import auth_pb2
from reference.transport.base import RpcError, RpcStream, StatusCode

from . import registry as reg
from .harness.scripted_client import make_context, run_build
from .outcomes import expect

requirement = pytest.mark.requirement
AUTH = "/moby.filesync.v1.Auth/"
USER, PASSWORD = "conformance", "c0nf pass"
FILES = {"base/hello.txt": b"from the registry\n"}


token_registry = reg.registry_fixture("token", users={USER: PASSWORD}, repo="conf/base", layers=[FILES])
basic_registry = reg.registry_fixture("htpasswd", users={USER: PASSWORD}, repo="conf/base", layers=[FILES])


class RecordingAuth:
    """The Auth service of the reference client, with every request recorded and
    any method replaceable by a fixed failure."""

    def __init__(self, host: str, *, authority: bool, fail: dict[str, StatusCode] | None = None,
                 password: str = PASSWORD):
        self.provider = AuthProvider(StaticCredentials({host: (USER, password)}), token_authority=authority)
        self.fail = fail or {}
        self.requests: list[tuple[str, object]] = []
        self._lock = threading.Lock()

    def handlers(self) -> dict:
        table = {}
        for method, handler in self.provider.handlers().items():
            table[method] = self._wrap(method, handler)
        for name in self.fail:  # also methods the provider would not serve (v1 has no token methods)
            table.setdefault(AUTH + name, self._wrap(AUTH + name, None))
        return table

    def _wrap(self, method: str, handler):
        name = method[len(AUTH):]
        request_type = getattr(auth_pb2, f"{name}Request")

        def serve(stream: RpcStream) -> None:
            raw = stream.recv()
            with self._lock:
                self.requests.append((name, request_type.FromString(raw or b"")))
            if name in self.fail:
                raise RpcError(self.fail[name], f"{name} refused by the conformance suite")
            replay = _Replay(stream, raw)
            handler(replay)

        return serve

    def names(self) -> list[str]:
        return [name for name, _ in self.requests]


class _Replay(RpcStream):
    """Hands an already-read request to the real handler."""

    def __init__(self, stream: RpcStream, raw: bytes | None):
        self._stream, self._raw = stream, raw
        self.method, self.metadata = stream.method, stream.metadata

    def recv(self, timeout=None):
        raw, self._raw = self._raw, None
        return raw

    def send(self, message):
        self._stream.send(message)

    def flush(self):
        self._stream.flush()

    def close_send(self): ...

    def cancel(self): ...


def _build(daemon, registry, auth: RecordingAuth):
    ctx = make_context({"x": "from the context\n"}, dockerfile=f"FROM {registry.pushed.reference}\nCOPY x /x\n")
    filesync = ("diffcopy",) if daemon.generation != "n-1" else ("tarstream",)
    obs = run_build(daemon.host, ctx, handler_overrides=auth.handlers(), query={"nocache": "1"},
                    filesync=filesync, timeout=90, hang_timeout=15)
    if not obs.ok and obs.error and any(t in obs.error for t in ("connection refused", "no route to host",
                                                                   "network is unreachable", "dial tcp")):
        pytest.skip(f"the daemon under test cannot reach the test registry at {registry.host} "
                    f"(a Docker-in-Docker daemon without a network, say): {obs.error}")
    return obs


def _n_plus_1(daemon):
    if daemon.generation == "n-1":
        pytest.skip("the token authority is generation n and later; this daemon is generation n-1")


@requirement("AUTH-V2-1", "AUTH-V2-3")
def test_bearer_challenge_uses_the_clients_token_authority(daemon, token_registry):
    _n_plus_1(daemon)
    auth = RecordingAuth(token_registry.host, authority=True)
    obs = _build(daemon, token_registry, auth)
    names = auth.names()
    expect("AUTH-V2-1", obs.ok, "the pull and build succeed", obs.describe(), names)
    expect("AUTH-V2-1", names[:1] == ["GetTokenAuthority"], "GetTokenAuthority first on a Bearer challenge", names)
    first = auth.requests[0][1]
    expect("AUTH-V2-1", first.Host == token_registry.host and len(first.Salt) == 32,
           "Host of the registry and a 32-byte salt", (first.Host, len(first.Salt)))
    fetches = [r for n, r in auth.requests if n == "FetchToken"]
    expect("AUTH-V2-3", fetches and "Credentials" not in names, "every token through FetchToken, no Credentials",
           names)
    f = fetches[0]
    expect("AUTH-V2-3", f.ClientID == "buildkit-client" and f.Realm.startswith("http") and f.Service
           and any("conf/base" in s and "pull" in s for s in f.Scopes),
           "ClientID buildkit-client with the challenge's realm, service and scopes",
           (f.ClientID, f.Realm, f.Service, list(f.Scopes)))
    salts = {bytes(r.Salt) for n, r in auth.requests if n == "GetTokenAuthority"}
    expect("AUTH-V2-1", len(salts) == 1, "one salt for the daemon's lifetime", len(salts))


@requirement("AUTH-V2-2")
@pytest.mark.parametrize("code", [StatusCode.UNIMPLEMENTED, StatusCode.UNAVAILABLE], ids=["UNIMPLEMENTED", "UNAVAILABLE"])
def test_without_an_authority_the_daemon_fetches_tokens_itself(daemon, token_registry, code):
    _n_plus_1(daemon)
    auth = RecordingAuth(token_registry.host, authority=True, fail={"GetTokenAuthority": code})
    obs = _build(daemon, token_registry, auth)
    names = auth.names()
    expect("AUTH-V2-2", obs.ok, "the pull succeeds with the daemon's own token fetch", obs.describe(), names)
    expect("AUTH-V2-2", "Credentials" in names and "FetchToken" not in names,
           "Credentials, then the daemon fetches the token itself", names)
    users = {r.user for r in token_registry.tokens.requests}
    expect("AUTH-V2-2", users == {USER}, "the token service saw the client's user", users)


@requirement("AUTH-V2-3")
def test_no_fallback_when_fetch_token_fails(daemon, token_registry):
    _n_plus_1(daemon)
    auth = RecordingAuth(token_registry.host, authority=True, fail={"FetchToken": StatusCode.UNAVAILABLE})
    obs = _build(daemon, token_registry, auth)
    names = auth.names()
    expect("AUTH-V2-3", not obs.ok, "the pull fails: no fallback once an authority is offered", obs.describe(), names)
    expect("AUTH-V2-3", "Credentials" not in names and not token_registry.tokens.requests,
           "neither Credentials nor a token request by the daemon", (names, len(token_registry.tokens.requests)))


@requirement("AUTH-V2-6")
def test_reuse_across_sessions_verifies_the_authority(daemon, token_registry):
    _n_plus_1(daemon)
    first = RecordingAuth(token_registry.host, authority=True)
    obs = _build(daemon, token_registry, first)
    expect("AUTH-V2-6", obs.ok, "the first build succeeds", obs.describe(), first.names())
    second = RecordingAuth(token_registry.host, authority=True)
    obs = _build(daemon, token_registry, second)
    names = second.names()
    expect("AUTH-V2-6", obs.ok, "the second build succeeds", obs.describe(), names)
    verifies = [r for n, r in second.requests if n == "VerifyTokenAuthority"]
    reused = "GetTokenAuthority" not in names  # the daemon kept its handler for the host
    if reused:
        expect("AUTH-V2-6", verifies and len(verifies[0].Payload) == 32,
               "VerifyTokenAuthority with a fresh 32-byte payload before reusing the handler", names)
    else:
        expect("AUTH-V2-6", names[:1] in (["GetTokenAuthority"], ["VerifyTokenAuthority"]),
               "a new authority handshake (no unverified reuse)", names)


@requirement("AUTH-V1-3")
def test_basic_challenge_asks_for_credentials(daemon, basic_registry):
    auth = RecordingAuth(basic_registry.host, authority=daemon.generation != "n-1")
    obs = _build(daemon, basic_registry, auth)
    names = auth.names()
    expect("AUTH-V1-3", obs.ok and "Credentials" in names and "FetchToken" not in names,
           "Basic auth through Credentials only", (obs.describe(), names))


@requirement("AUTH-V1-3")
def test_unimplemented_credentials_mean_anonymous(daemon, basic_registry):
    auth = RecordingAuth(basic_registry.host, authority=False, fail={"Credentials": StatusCode.UNIMPLEMENTED})
    obs = _build(daemon, basic_registry, auth)
    expect("AUTH-V1-3", not obs.ok and "401" in (obs.error or "") or "unauthorized" in (obs.error or "").lower(),
           "an anonymous pull, refused by the registry with 401", obs.describe(), auth.names())
    expect("AUTH-V1-3", "Credentials" in auth.names(), "Credentials was asked", auth.names())


@requirement("AUTH-V1-3")
def test_other_credentials_errors_fail_the_pull(daemon, basic_registry):
    auth = RecordingAuth(basic_registry.host, authority=False, fail={"Credentials": StatusCode.PERMISSION_DENIED})
    obs = _build(daemon, basic_registry, auth)
    expect("AUTH-V1-3", not obs.ok, "the pull fails", obs.describe(), auth.names())
