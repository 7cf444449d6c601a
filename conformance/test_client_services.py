"""Client role: Secrets and registry Auth, called by the scenario like a daemon would."""

from __future__ import annotations

import base64
import json
import os
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from reference.pb import auth_pb2, secrets_pb2
from reference.transport.base import StatusCode

from .harness.daemon_scripts import (
    AUTH_CREDENTIALS, AUTH_FETCH_TOKEN, AUTH_GET_TOKEN_AUTHORITY, AUTH_VERIFY_TOKEN_AUTHORITY, GET_SECRET, run_client,
    unary,
)
from .harness.instrumented_daemon import ScenarioResult
from .harness.scripted_client import make_context
from .outcomes import expect, not_applicable

requirement = pytest.mark.requirement


@requirement("SECRETS-1", "SECRETS-2", "METHODS-2")
def test_secrets_are_served_exactly(client, tmp_path):
    if client.generation == "n-1":
        pytest.skip("Secrets are generation n and later; this client is generation n-1")
    secret = bytes(range(256)) + b"\nconformance secret\x00end"
    src = tmp_path / "secret.bin"
    src.write_bytes(secret)
    seen = {}

    def scenario(build):
        s = build.session
        seen["methods"] = s.methods
        seen["s"] = unary(s, GET_SECRET, secrets_pb2.GetSecretRequest(ID="s").SerializeToString())
        seen["missing"] = unary(s, GET_SECRET, secrets_pb2.GetSecretRequest(ID="not-registered").SerializeToString())
        return ScenarioResult()

    daemon, run = run_client(client, make_context({"a": "a"}), scenario, extra_args=["--secret", f"id=s,src={src}"])
    expect("METHODS-2", any(m.lower() == GET_SECRET.lower() for m in seen["methods"]),
           "Secrets/GetSecret advertised when --secret is given", seen["methods"])
    o = seen["s"]
    data = secrets_pb2.GetSecretResponse.FromString(o.messages[0]).data if o.ok and o.messages else None
    expect("SECRETS-1", data == secret, f"the {len(secret)} bytes of the file", o.describe() if data is None else data)
    m = seen["missing"]
    expect("SECRETS-2", m.code == StatusCode.NOT_FOUND, "NOT_FOUND for an unknown ID", m.describe())


class _TokenServer:
    """A registry token service on 127.0.0.1: GET (docker token) and POST (OAuth2 password grant)."""

    def __init__(self):
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, params):
                outer.requests.append({"method": self.command, "path": self.path, "params": params,
                                       "authorization": self.headers.get("Authorization", "")})
                token = f"conformance-token-{len(outer.requests)}"
                body = json.dumps({"token": token, "access_token": token, "expires_in": 321,
                                   "issued_at": "2024-01-02T03:04:05Z"}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):  # noqa: N802
                self._answer(urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query))

            def do_POST(self):  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                self._answer(urllib.parse.parse_qs(self.rfile.read(length).decode()))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


ISSUED_AT = 1704164645  # 2024-01-02T03:04:05Z


@requirement("AUTH-V1-1", "AUTH-V1-2", "AUTH-V2-4", "AUTH-V2-5", "AUTH-V2-7")
def test_registry_auth(client, tmp_path):
    config = tmp_path / "docker-config"
    config.mkdir()
    with _TokenServer() as tokens:
        registry = f"127.0.0.1:{tokens.port}"
        (config / "config.json").write_text(json.dumps({"auths": {
            registry: {"auth": base64.b64encode(b"conf-user:conf-pass").decode()},
            "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hub-user:hub-pass").decode()},
            "idtoken.conformance.invalid": {"auth": base64.b64encode(b"<token>:").decode(),
                                            "identitytoken": "conf-identity-token"},
        }}))
        seen = {}
        salt = os.urandom(32)
        payload = os.urandom(32)

        def creds(s, host):
            return unary(s, AUTH_CREDENTIALS, auth_pb2.CredentialsRequest(Host=host).SerializeToString())

        def scenario(build):
            s = build.session
            seen["methods"] = [m.lower() for m in s.methods]
            seen["stored"] = creds(s, registry)
            seen["identity"] = creds(s, "idtoken.conformance.invalid")
            seen["anonymous"] = creds(s, "nothing-stored.conformance.invalid")
            seen["hub"] = creds(s, "registry-1.docker.io")
            if client.generation != "n-1":
                gta = auth_pb2.GetTokenAuthorityRequest(Host=registry, Salt=salt).SerializeToString()
                seen["key1"] = unary(s, AUTH_GET_TOKEN_AUTHORITY, gta)
                seen["key2"] = unary(s, AUTH_GET_TOKEN_AUTHORITY, gta)
                seen["verify"] = unary(s, AUTH_VERIFY_TOKEN_AUTHORITY, auth_pb2.VerifyTokenAuthorityRequest(
                    Host=registry, Salt=salt, Payload=payload).SerializeToString())
                seen["token"] = unary(s, AUTH_FETCH_TOKEN, auth_pb2.FetchTokenRequest(
                    ClientID="buildkit-client", Host=registry, Realm=f"http://{registry}/token",
                    Service="conformance-registry", Scopes=["repository:conf/image:pull"]).SerializeToString(),
                    timeout=20)
            return ScenarioResult()

        env = {"DOCKER_CONFIG": str(config), "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
        daemon, run = run_client(client, make_context({"a": "a"}), scenario, env=env)

    def answer(key):
        o = seen[key]
        if not o.ok or not o.messages:
            return o.describe()
        r = auth_pb2.CredentialsResponse.FromString(o.messages[0])
        return (r.Username, r.Secret)

    expect("AUTH-V1-1", answer("stored") == ("conf-user", "conf-pass"), "the stored user name and secret",
           answer("stored"))
    expect("AUTH-V1-1", answer("identity") == ("", "conf-identity-token"),
           "an identity token as Secret with an empty Username", answer("identity"))
    expect("AUTH-V1-1", answer("anonymous") == ("", ""), "empty fields for a host without credentials",
           answer("anonymous"))
    if client.generation == "n-1":
        expect("AUTH-V1-2", answer("hub") == ("hub-user", "hub-pass"),
               "registry-1.docker.io looked up under https://index.docker.io/v1/", answer("hub"))
        pytest.skip("the token authority is generation n and later; Credentials checked")
    k1, k2 = seen["key1"], seen["key2"]
    if k1.code in (StatusCode.UNAVAILABLE, StatusCode.UNIMPLEMENTED):
        expect("AUTH-V2-7", True, "", "")
        expect("AUTH-V1-2", answer("hub") == ("hub-user", "hub-pass"),
               "registry-1.docker.io looked up under https://index.docker.io/v1/", answer("hub"))
        # declining is allowed (AUTH-V2-7): the token-authority rules do not apply, the Credentials checks stand
        for rule in ("AUTH-V2-4", "AUTH-V2-5"):
            not_applicable(rule, f"the client declines to be a token authority ({k1.code.name}, AUTH-V2-7)")
        return
    expect("AUTH-V2-7", k1.ok, "a key, or UNAVAILABLE/UNIMPLEMENTED to decline", k1.describe())
    key = auth_pb2.GetTokenAuthorityResponse.FromString(k1.messages[0]).PublicKey
    key2 = auth_pb2.GetTokenAuthorityResponse.FromString(k2.messages[0]).PublicKey if k2.ok and k2.messages else None
    expect("AUTH-V2-4", len(key) == 32 and key == key2, "the same 32-byte public key for the same host and salt",
           (key.hex(), key2 and key2.hex()))
    v = seen["verify"]
    expect("AUTH-V2-4", v.ok and v.messages, "VerifyTokenAuthority answers", v.describe())
    signed = auth_pb2.VerifyTokenAuthorityResponse.FromString(v.messages[0]).Signed
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(key).verify(signed[:64], payload)
        verified = signed[64:] == payload and len(signed) == 96
    except (InvalidSignature, ValueError):
        verified = False
    expect("AUTH-V2-4", verified, "Signed = Ed25519 signature of Payload with that key, then Payload",
           signed.hex())
    t = seen["token"]
    expect("AUTH-V2-5", t.ok and t.messages, "FetchToken answers", t.describe(), [json.dumps(tokens.requests)])
    r = auth_pb2.FetchTokenResponse.FromString(t.messages[0])
    issued = [f"conformance-token-{i + 1}" for i in range(len(tokens.requests))]
    expect("AUTH-V2-5", r.Token in issued and r.Token, "the token the realm issued", r.Token,
           [json.dumps(tokens.requests)])
    params = tokens.requests[-1]["params"] if tokens.requests else {}
    expect("AUTH-V2-5", params.get("service") == ["conformance-registry"] and
           params.get("scope") == ["repository:conf/image:pull"], "the requested service and scopes", params)
    expect("AUTH-V2-5", r.ExpiresIn == 321 and r.IssuedAt == ISSUED_AT, "ExpiresIn 321 and IssuedAt in Unix s",
           (r.ExpiresIn, r.IssuedAt))
    expect("AUTH-V1-2", answer("hub") == ("hub-user", "hub-pass"),
           "registry-1.docker.io looked up under https://index.docker.io/v1/", answer("hub"))
