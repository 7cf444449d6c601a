"""A small Docker registry token service for tests (stdlib http.server + ES256 JWTs).

It speaks the distribution token protocol: ``GET <realm>?service=&scope=...`` with optional
Basic auth, and the OAuth2 ``POST <realm>`` (password and refresh_token grants). Tokens are
JWTs signed with a throwaway P-256 key whose self-signed certificate the registry trusts
through ``auth.token.rootcertbundle``; the certificate travels in the JWT ``x5c`` header,
which distribution 2.8 verifies against that bundle (it also accepts a ``kid`` in libtrust
fingerprint form, which we add for completeness).

Usage (in-process, as the tests do)::

    service = TokenService(users={"alice": "s3cret"}, workdir=tmp)
    service.start()          # service.realm, service.cert_path
    ...
    service.stop()

Every request is recorded in ``service.requests`` (method, user agent, authenticated user, status).

Part of the installed suite, so the auth cases run without a clone; `fixtures/token_service.py`
starts it standalone.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import secrets
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def libtrust_key_id(public_key) -> str:
    """libtrust's key fingerprint: base32 of the first 30 bytes of sha256(DER SubjectPublicKeyInfo),
    in 12 colon-separated groups of 4."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    text = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(text[i:i + 4] for i in range(0, 48, 4))


@dataclass
class TokenRequest:
    method: str
    user_agent: str
    user: str | None  # None: anonymous or wrong credentials
    status: int
    scopes: list[str] = field(default_factory=list)
    grant_type: str = ""


class TokenService:
    """Issues registry tokens. ``users``: {name: password}; ``refresh_tokens``: {token: name}."""

    def __init__(self, *, users: dict[str, str], workdir: str, service: str = "test-registry",
                 issuer: str = "test-token-issuer", expires_in: int = 300,
                 refresh_tokens: dict[str, str] | None = None, allow_anonymous: bool = False,
                 get_disabled: bool = False):
        self.users = dict(users)
        self.refresh_tokens = dict(refresh_tokens or {})
        self.workdir = workdir
        self.service = service
        self.issuer = issuer
        self.expires_in = expires_in
        self.allow_anonymous = allow_anonymous
        self.get_disabled = get_disabled  # answer GET with 404, like registries that only do OAuth POST
        self.requests: list[TokenRequest] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._cert = self._self_signed_cert()
        self.cert_path = os.path.join(workdir, "token-signing.crt")
        with open(self.cert_path, "wb") as fh:
            fh.write(self._cert.public_bytes(serialization.Encoding.PEM))
        self.key_id = libtrust_key_id(self._key.public_key())

    def _self_signed_cert(self) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test token signer")])
        now = datetime.datetime.now(datetime.timezone.utc)
        return (x509.CertificateBuilder()
                .subject_name(name).issuer_name(name)
                .public_key(self._key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=30))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False, key_agreement=False,
                                             crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
                .sign(self._key, hashes.SHA256()))

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> "TokenService":
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                owner._handle(self, "GET")

            def do_POST(self):
                owner._handle(self, "POST")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="token-service", daemon=True)  # a prompt shutdown()
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "TokenService":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def requests_from(self, agent_fragment: str) -> list[TokenRequest]:
        with self._lock:
            return [r for r in self.requests if agent_fragment in r.user_agent]

    # -- tokens ------------------------------------------------------------------------
    def issue(self, subject: str, scopes: list[str]) -> tuple[str, int]:
        """A signed JWT granting ``subject`` every action asked for in ``scopes``."""
        access = []
        for scope in scopes:
            for item in scope.split(" "):
                parts = item.split(":")
                if len(parts) < 3:
                    continue
                kind, name, actions = parts[0], ":".join(parts[1:-1]), parts[-1]
                access.append({"type": kind, "name": name, "actions": [a for a in actions.split(",") if a]})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "ES256", "kid": self.key_id,
                  "x5c": [base64.b64encode(self._cert.public_bytes(serialization.Encoding.DER)).decode()]}
        claims = {"iss": self.issuer, "sub": subject, "aud": self.service, "exp": now + self.expires_in,
                  "nbf": now - 5, "iat": now, "jti": secrets.token_hex(8), "access": access}
        signing_input = _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        der = self._key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")  # JWS wants raw r||s
        return signing_input + "." + _b64url(signature), now

    def _basic_user(self, header: str | None) -> tuple[bool, str | None]:
        """(credentials were sent, the authenticated user or None)."""
        if not header or not header.lower().startswith("basic "):
            return False, None
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except ValueError:
            return True, None
        return True, user if user in self.users and self.users[user] == password else None

    def _handle(self, http: BaseHTTPRequestHandler, method: str) -> None:
        url = urllib.parse.urlsplit(http.path)
        query = urllib.parse.parse_qs(url.query)
        scopes = query.get("scope", [])
        grant_type = ""
        status, body, user = 404, {"errors": [{"code": "NOT_FOUND"}]}, None
        if url.path == "/token" and method == "GET":
            sent, user = self._basic_user(http.headers.get("Authorization"))
            if self.get_disabled:
                status = 404
            elif sent and user is None:
                status, body = 401, {"details": "invalid username or password"}
            elif user is None and not self.allow_anonymous:
                status, body = 401, {"details": "authentication required"}
            else:
                token, issued = self.issue(user or "", scopes)
                status, body = 200, self._token_body(token, issued, oauth=False)
        elif url.path == "/token" and method == "POST":
            length = int(http.headers.get("Content-Length") or 0)
            form = urllib.parse.parse_qs(http.rfile.read(length).decode())
            grant_type = (form.get("grant_type") or [""])[0]
            scopes = (form.get("scope") or [""])[0].split(" ") if form.get("scope") else []
            if grant_type == "password":
                name, password = (form.get("username") or [""])[0], (form.get("password") or [""])[0]
                user = name if self.users.get(name) == password and name in self.users else None
            elif grant_type == "refresh_token":
                user = self.refresh_tokens.get((form.get("refresh_token") or [""])[0])
            if user is None:
                status, body = 401, {"details": "invalid grant"}
            else:
                token, issued = self.issue(user, scopes)
                status, body = 200, self._token_body(token, issued, oauth=True)
        with self._lock:
            self.requests.append(TokenRequest(method, http.headers.get("User-Agent", ""), user, status, scopes,
                                              grant_type))
        payload = json.dumps(body).encode()
        http.send_response(status)
        if status == 401:
            http.send_header("WWW-Authenticate", 'Basic realm="token"')
        http.send_header("Content-Type", "application/json")
        http.send_header("Content-Length", str(len(payload)))
        http.end_headers()
        http.wfile.write(payload)

    def _token_body(self, token: str, issued: int, *, oauth: bool) -> dict:
        issued_at = datetime.datetime.fromtimestamp(issued, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {"access_token": token, "expires_in": self.expires_in, "issued_at": issued_at}
        if not oauth:
            body["token"] = token
        return body


def load_signing_key_pem(service: TokenService) -> bytes:
    """The private key (PEM), for tests that forge tokens."""
    return service._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())
