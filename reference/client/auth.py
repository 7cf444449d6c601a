"""The client's Auth service: registry credentials (v1) and the token authority (v2).

Generation n-1 serves only ``Credentials``.  Generations n and n+1 also serve
``GetTokenAuthority`` (an ed25519 key per host, derived like the docker CLI
from a stored seed, the daemon's salt and the credentials), ``FetchToken``
(the client talks to the token realm itself) and ``VerifyTokenAuthority``.

Behaviour follows the docker CLI 20.10 provider (buildkit eeb7b65
``session/auth/authprovider``) and containerd's ``remotes/docker/auth``
token fetchers that it calls.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import threading
import urllib.parse
from typing import Mapping, Protocol

from ..pb import auth_pb2
from ..session import docker_config_dir
from ..transport.base import RpcError, RpcStream, StatusCode
from .methods import AUTH_CREDENTIALS as CREDENTIALS
from .methods import AUTH_FETCH_TOKEN as FETCH_TOKEN
from .methods import AUTH_GET_TOKEN_AUTHORITY as GET_TOKEN_AUTHORITY
from .methods import AUTH_VERIFY_TOKEN_AUTHORITY as VERIFY_TOKEN_AUTHORITY

# The daemon asks for Docker Hub as registry-1.docker.io; the CLI keeps its credentials under this key.
DOCKER_HUB_HOSTS = {"registry-1.docker.io", "docker.io", "index.docker.io"}
DOCKER_HUB_CONFIG_KEY = "https://index.docker.io/v1/"
# The OAuth client id the CLI's provider uses for its POST, whatever the daemon's request says.
OAUTH_CLIENT_ID = "buildkit-client"
_HELPER_NOT_FOUND = "credentials not found in native keychain"


def _config_key(host: str) -> str:
    return DOCKER_HUB_CONFIG_KEY if host in DOCKER_HUB_HOSTS else host


def _hostname_of(config_key: str) -> str:
    """docker's ConvertToHostname: drop the scheme and any path of a config.json key."""
    for prefix in ("http://", "https://"):
        if config_key.startswith(prefix):
            config_key = config_key[len(prefix):]
            break
    return config_key.split("/", 1)[0]


class CredentialSource(Protocol):
    config_dir: str

    def lookup(self, host: str) -> tuple[str, str]: ...


class DockerConfigCredentials:
    """Looks credentials up in ``$DOCKER_CONFIG/config.json`` the way the docker CLI 20.10 does:
    a credential helper for the host (``credHelpers``, else ``credsStore``) replaces the file
    entirely; without one, the ``auths`` entry for the host (exact key, else a key whose
    hostname matches)."""

    def __init__(self, config_dir: str | None = None):
        self.config_dir = config_dir or docker_config_dir()

    def _config(self) -> dict:
        try:
            with open(os.path.join(self.config_dir, "config.json")) as fh:
                return json.load(fh)
        except (FileNotFoundError, ValueError):
            return {}

    def lookup(self, host: str) -> tuple[str, str]:
        """(username, secret); an identity token comes back with an empty username."""
        config = self._config()
        key = _config_key(host)
        helper = (config.get("credHelpers") or {}).get(key) or config.get("credsStore")
        if helper:
            return self._from_helper(helper, key)
        auths = config.get("auths") or {}
        entry = auths.get(key)
        if entry is None:
            entry = next((v for k, v in auths.items() if _hostname_of(k) == key), None) or {}
        if entry.get("identitytoken"):
            return "", entry["identitytoken"]
        user, password = entry.get("username", ""), entry.get("password", "")
        if entry.get("auth"):
            try:
                decoded = base64.b64decode(entry["auth"], validate=True).decode()
            except ValueError as exc:
                raise RpcError(StatusCode.UNKNOWN, f"invalid auth in {self.config_dir}/config.json: {exc}") from None
            if ":" not in decoded:
                raise RpcError(StatusCode.UNKNOWN, "Invalid auth configuration file")
            user, _, password = decoded.partition(":")
            password = password.strip("\0")
        return user, password

    @staticmethod
    def _from_helper(helper: str, key: str) -> tuple[str, str]:
        import subprocess  # credential helpers are rare; keep them off the start-up path

        try:
            proc = subprocess.run([f"docker-credential-{helper}", "get"], input=key.encode(),
                                  capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as exc:
            raise RpcError(StatusCode.UNKNOWN, f"error getting credentials: {exc}") from None
        out = proc.stdout.decode(errors="replace").strip()
        if proc.returncode != 0:
            if out == _HELPER_NOT_FOUND:
                return "", ""
            raise RpcError(StatusCode.UNKNOWN, f"error getting credentials - err: exit status {proc.returncode}, "
                                               f"out: `{out}`")
        data = json.loads(out)
        if data.get("Username") == "<token>":
            return "", data.get("Secret", "")
        return data.get("Username", ""), data.get("Secret", "")


class StaticCredentials:
    """Explicit credentials: ``{host: (username, secret)}``; other hosts are anonymous."""

    def __init__(self, table: Mapping[str, tuple[str, str]], config_dir: str | None = None):
        self.table = dict(table)
        self.config_dir = config_dir or docker_config_dir()

    def lookup(self, host: str) -> tuple[str, str]:
        return self.table.get(host) or self.table.get(_config_key(host)) or ("", "")


def _go_parse_bool(text: str) -> bool | None:
    """strconv.ParseBool: None when the text is not a boolean."""
    if text in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if text in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    return None


def _go_json_string(text: str) -> str:
    """A string as Go's encoding/json writes it (HTML-safe escaping, raw non-ASCII)."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif code < 0x20 or ch in "<>&" or code in (0x2028, 0x2029):
            out.append(f"\\u{code:04x}")
        elif 0xD800 <= code <= 0xDFFF:  # lone surrogate: Go writes U+FFFD for invalid UTF-8
            out.append("\ufffd")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def credentials_json(user: str, secret: str) -> bytes:
    """``json.NewEncoder(w).Encode(&CredentialsResponse{...})``: omitempty fields and a trailing newline."""
    fields = []
    if user:
        fields.append('"Username":' + _go_json_string(user))
    if secret:
        fields.append('"Secret":' + _go_json_string(secret))
    return ("{" + ",".join(fields) + "}\n").encode()


def authority_seed(salt: bytes, seed: bytes, user: str, secret: str) -> bytes:
    """The 32-byte ed25519 seed of the CLI's authority key for one host.

    HMAC-SHA256 keyed with the daemon's salt over ``seed || json(creds)``, but
    only when there is a secret: anonymous hosts get HMAC(salt, "") and so
    the same key from every client of one daemon.
    """
    mac = hmac.new(salt, digestmod=hashlib.sha256)
    if secret:
        mac.update(seed)
        mac.update(credentials_json(user, secret))
    return mac.digest()[:32]


class TokenSeeds:
    """``<config>/.token_seed``: ``{"<host>": {"Seed": "<base64 of 16 bytes>"}}`` as the CLI writes it,
    guarded by ``.token_seed.lock`` (flock) so the CLI and we can share one file."""

    def __init__(self, config_dir: str):
        self.config_dir = config_dir
        self._mem: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def get(self, host: str) -> bytes:
        with self._lock:
            try:
                os.makedirs(self.config_dir, 0o755, exist_ok=True)
            except OSError:
                pass
            lock_fd = None
            try:
                lock_fd = os.open(os.path.join(self.config_dir, ".token_seed.lock"), os.O_CREAT | os.O_RDWR, 0o600)
                fcntl.flock(lock_fd, fcntl.LOCK_EX)
            except OSError:
                lock_fd = None  # read-only config dir: keep the seeds in memory
            try:
                return self._get_locked(host)
            finally:
                if lock_fd is not None:
                    os.close(lock_fd)

    def _get_locked(self, host: str) -> bytes:
        path = os.path.join(self.config_dir, ".token_seed")
        stored: dict = {}
        try:
            with open(path) as fh:
                stored = json.load(fh)
        except (FileNotFoundError, NotADirectoryError):
            pass
        except ValueError as exc:
            raise RpcError(StatusCode.UNKNOWN, f"failed to parse {path}: {exc}") from None
        seeds = dict(self._mem)
        for name, entry in stored.items():
            # Go's json.Unmarshal matches field names case-insensitively.
            value = next((v for k, v in (entry or {}).items() if k.lower() == "seed"), None)
            if value:
                seeds[name] = base64.b64decode(value)
        if host not in seeds:
            seeds[host] = secrets.token_bytes(16)
        self._mem = seeds
        document = {name: {"Seed": base64.b64encode(seed).decode()} for name, seed in seeds.items()}
        try:
            tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump(document, fh, indent=2)
            os.replace(tmp, path)
        except OSError:
            pass  # like the CLI: an unwritable seed file is not an error
        return seeds[host]


class AuthProvider:
    """The Auth service; ``token_authority`` switches on the v2 methods."""

    def __init__(self, credentials: CredentialSource | None = None, *, token_authority: bool = False):
        self.credentials = credentials or DockerConfigCredentials()
        self.token_authority = token_authority
        self.seeds = TokenSeeds(self.credentials.config_dir)
        # Seen by tests: every token request this client made ((method, realm) pairs).
        self.token_requests: list[tuple[str, str]] = []

    def handlers(self):
        table = {CREDENTIALS: self.serve_credentials}
        if self.token_authority:
            table.update({
                FETCH_TOKEN: self.serve_fetch_token,
                GET_TOKEN_AUTHORITY: self.serve_get_token_authority,
                VERIFY_TOKEN_AUTHORITY: self.serve_verify_token_authority,
            })
        return table

    # -- v1 --------------------------------------------------------------------------
    def serve_credentials(self, stream: RpcStream) -> None:
        request = auth_pb2.CredentialsRequest.FromString(stream.recv() or b"")
        user, secret = self.credentials.lookup(request.Host)
        stream.send(auth_pb2.CredentialsResponse(Username=user, Secret=secret).SerializeToString())

    # -- v2 --------------------------------------------------------------------------
    def _private_key(self, host: str, salt: bytes):
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        if _go_parse_bool(os.environ.get("BUILDKIT_NO_CLIENT_TOKEN", "")):
            # Unavailable tells the daemon to fall back to Credentials.
            raise RpcError(StatusCode.UNAVAILABLE, "client side tokens disabled")
        user, secret = self.credentials.lookup(host)
        seed = self.seeds.get(host)
        return Ed25519PrivateKey.from_private_bytes(authority_seed(salt, seed, user, secret))

    def serve_get_token_authority(self, stream: RpcStream) -> None:
        from cryptography.hazmat.primitives import serialization

        request = auth_pb2.GetTokenAuthorityRequest.FromString(stream.recv() or b"")
        public = self._private_key(request.Host, request.Salt).public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        stream.send(auth_pb2.GetTokenAuthorityResponse(PublicKey=public).SerializeToString())

    def serve_verify_token_authority(self, stream: RpcStream) -> None:
        request = auth_pb2.VerifyTokenAuthorityRequest.FromString(stream.recv() or b"")
        key = self._private_key(request.Host, request.Salt)
        signed = key.sign(request.Payload) + request.Payload  # nacl sign format: signature || message
        stream.send(auth_pb2.VerifyTokenAuthorityResponse(Signed=signed).SerializeToString())

    def serve_fetch_token(self, stream: RpcStream) -> None:
        request = auth_pb2.FetchTokenRequest.FromString(stream.recv() or b"")
        user, secret = self.credentials.lookup(request.Host)
        token, expires_in, issued_at = fetch_token(request.Realm, request.Service, list(request.Scopes), user, secret,
                                                   log=self.token_requests)
        stream.send(auth_pb2.FetchTokenResponse(Token=token, ExpiresIn=expires_in, IssuedAt=issued_at).SerializeToString())


class TokenFetchError(Exception):
    """A token request failed; ``status`` is the HTTP status, or None without a response."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def fetch_token(realm: str, service: str, scopes: list[str], user: str, secret: str, *,
                client_id: str = OAUTH_CLIENT_ID, timeout: float = 30.0,
                log: list | None = None) -> tuple[str, int, int]:
    """Get a bearer token from ``realm`` like the CLI's provider: a GET (with basic auth when
    there is a secret); with a secret, a 401 or 404 (or a 405 with a username) is retried as
    an OAuth2 POST (password grant, or refresh-token grant for an identity token).

    Returns (token, expires_in seconds, issued_at unix seconds; 0 when the server sent none).
    Failures raise RpcError(UNKNOWN) with the CLI's wording."""
    try:
        if not secret:
            try:
                return _token_get(realm, service, scopes, user, secret, timeout, log)
            except TokenFetchError as exc:
                raise RpcError(StatusCode.UNKNOWN, f"failed to fetch anonymous token: {exc}") from None
        try:
            return _token_get(realm, service, scopes, user, secret, timeout, log)
        except TokenFetchError as exc:
            if exc.status in (401, 404) or (exc.status == 405 and user):
                return _token_post(realm, service, scopes, user, secret, client_id, timeout, log)
            raise
    except TokenFetchError as exc:
        raise RpcError(StatusCode.UNKNOWN, f"failed to fetch oauth token: {exc}") from None


def _token_get(realm, service, scopes, user, secret, timeout, log) -> tuple[str, int, int]:
    parts = urllib.parse.urlsplit(realm)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    if service:
        query.append(("service", service))
    query += [("scope", s) for s in scopes]
    query.sort(key=lambda kv: kv[0])  # Go's url.Values.Encode sorts by key
    url = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))
    from urllib.request import Request  # token fetches are rare; urllib.request costs ~20 ms of start-up

    req = Request(url)
    if secret:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode())
    body = _token_request(req, timeout, log)
    token = body.get("access_token") or body.get("token") or ""
    if not token:
        raise TokenFetchError("authorization server did not include a token in the response")
    return token, _int(body.get("expires_in")), _issued_at(body.get("issued_at"))


def _token_post(realm, service, scopes, user, secret, client_id, timeout, log) -> tuple[str, int, int]:
    form = {}
    if scopes:
        form["scope"] = " ".join(scopes)
    form["service"] = service
    form["client_id"] = client_id
    if user:
        form.update(grant_type="password", username=user, password=secret)
    else:
        form.update(grant_type="refresh_token", refresh_token=secret)
    data = urllib.parse.urlencode(sorted(form.items())).encode()
    from urllib.request import Request

    req = Request(realm, data=data, method="POST",
                                 headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"})
    body = _token_request(req, timeout, log)
    token = body.get("access_token") or ""
    if not token:
        raise TokenFetchError("authorization server did not include a token in the response")
    return token, _int(body.get("expires_in")), _issued_at(body.get("issued_at"))


def _token_request(req: "urllib.request.Request", timeout: float, log: list | None) -> dict:
    from urllib.error import HTTPError, URLError
    from urllib.request import urlopen

    if log is not None:
        log.append((req.get_method(), req.full_url))
    try:
        with urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
    except HTTPError as exc:
        raise TokenFetchError(f"unexpected status: {exc.code} {exc.reason}", exc.code) from None
    except (URLError, OSError) as exc:
        raise TokenFetchError(f"{req.get_method()} {req.full_url}: {exc}") from None
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise TokenFetchError(f"unable to decode token response: {exc}") from None
    if not isinstance(body, dict):
        raise TokenFetchError("unable to decode token response: not a JSON object")
    return body


def _int(value) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _issued_at(text) -> int:
    """RFC 3339 ``issued_at`` as unix seconds; 0 (Go's zero time, so no IssuedAt on the wire) when absent."""
    if not text:
        return 0
    from datetime import datetime

    try:
        return int(datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0
