"""The client's Auth service: registry credentials (v1) and the token authority (v2).

Generation n serves only ``Credentials``.  Generation n+1 also serves
``GetTokenAuthority`` (an ed25519 key per host, derived like the docker CLI
from a stored seed, the daemon's salt and the credentials), ``FetchToken``
(the client talks to the token realm itself) and ``VerifyTokenAuthority``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from ..pb import auth_pb2
from ..session import docker_config_dir
from ..transport.base import RpcError, RpcStream, StatusCode

CREDENTIALS = "/moby.filesync.v1.Auth/Credentials"
FETCH_TOKEN = "/moby.filesync.v1.Auth/FetchToken"
GET_TOKEN_AUTHORITY = "/moby.filesync.v1.Auth/GetTokenAuthority"
VERIFY_TOKEN_AUTHORITY = "/moby.filesync.v1.Auth/VerifyTokenAuthority"

DOCKER_HUB_HOSTS = {"registry-1.docker.io", "docker.io", "index.docker.io"}
DOCKER_HUB_CONFIG_KEY = "https://index.docker.io/v1/"


def _config_key(host: str) -> str:
    return DOCKER_HUB_CONFIG_KEY if host in DOCKER_HUB_HOSTS else host


class DockerConfigCredentials:
    """Looks credentials up in ``$DOCKER_CONFIG/config.json`` the way the docker CLI does:
    a credential helper for the host, else the global store, else inline ``auths``."""

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
        helper = config.get("credHelpers", {}).get(key) or config.get("credsStore")
        if helper:
            found = self._from_helper(helper, key)
            if found is not None:
                return found
        entry = config.get("auths", {}).get(key) or config.get("auths", {}).get(f"https://{key}") or {}
        if entry.get("identitytoken"):
            return "", entry["identitytoken"]
        if entry.get("auth"):
            user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            return user, password
        return entry.get("username", ""), entry.get("password", "")

    @staticmethod
    def _from_helper(helper: str, key: str) -> tuple[str, str] | None:
        try:
            out = subprocess.run([f"docker-credential-{helper}", "get"], input=key.encode(),
                                 capture_output=True, timeout=30, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        data = json.loads(out)
        if data.get("Username") == "<token>":
            return "", data.get("Secret", "")
        return data.get("Username", ""), data.get("Secret", "")


class AuthProvider:
    """The Auth service; ``token_authority`` switches on the v2 methods."""

    def __init__(self, credentials: DockerConfigCredentials | None = None, *, token_authority: bool = False):
        self.credentials = credentials or DockerConfigCredentials()
        self.token_authority = token_authority
        self._seeds: dict[str, bytes] = {}
        self._lock = threading.Lock()

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
    def _seed(self, host: str) -> bytes:
        """16 random bytes per host, kept in ``<config>/.token_seed`` like the docker CLI."""
        path = os.path.join(self.credentials.config_dir, ".token_seed")
        with self._lock:
            if host in self._seeds:
                return self._seeds[host]
            try:
                with open(path) as fh:
                    stored = json.load(fh)
            except (FileNotFoundError, ValueError):
                stored = {}
            entry = stored.get(host, {}).get("seed")
            if entry:
                seed = base64.b64decode(entry)
            else:
                seed = secrets.token_bytes(16)
                stored[host] = {"seed": base64.b64encode(seed).decode()}
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = f"{path}.{os.getpid()}.tmp"
                with open(tmp, "w") as fh:
                    json.dump(stored, fh)
                os.replace(tmp, path)
            self._seeds[host] = seed
            return seed

    def _private_key(self, host: str, salt: bytes):
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        user, secret = self.credentials.lookup(host)
        message = self._seed(host)
        if secret:
            message += json.dumps({"Username": user, "Secret": secret}, separators=(",", ":")).encode()
        digest = hmac.new(salt, message, hashlib.sha256).digest()
        return Ed25519PrivateKey.from_private_bytes(digest[:32])

    def serve_get_token_authority(self, stream: RpcStream) -> None:
        from cryptography.hazmat.primitives import serialization

        request = auth_pb2.GetTokenAuthorityRequest.FromString(stream.recv() or b"")
        if os.environ.get("BUILDKIT_NO_CLIENT_TOKEN", "").lower() in ("1", "true"):
            raise RpcError(StatusCode.UNAVAILABLE, "client side tokens disabled")
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
        token, expires_in, issued_at = fetch_token(request.Realm, request.Service, list(request.Scopes),
                                                   request.ClientID, user, secret)
        stream.send(auth_pb2.FetchTokenResponse(Token=token, ExpiresIn=expires_in, IssuedAt=issued_at).SerializeToString())


def fetch_token(realm: str, service: str, scopes: list[str], client_id: str, user: str, secret: str,
                timeout: float = 30.0) -> tuple[str, int, int]:
    """Get a bearer token from ``realm``: GET with basic auth (or an OAuth POST for an
    identity token), as the docker CLI's provider does.  Returns (token, expires_in, issued_at)."""
    if secret and not user:  # identity token: OAuth2 refresh-token grant
        form = urllib.parse.urlencode({"grant_type": "refresh_token", "refresh_token": secret, "service": service,
                                       "client_id": client_id, "scope": " ".join(scopes)}).encode()
        req = urllib.request.Request(realm, data=form, method="POST",
                                     headers={"Content-Type": "application/x-www-form-urlencoded"})
    else:
        query = [("service", service)] + [("scope", s) for s in scopes]
        if client_id:
            query.append(("client_id", client_id))
        req = urllib.request.Request(realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query))
        if secret:
            req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = json.load(resp)
    except urllib.error.HTTPError as exc:
        code = StatusCode.UNAUTHENTICATED if exc.code == 401 else StatusCode.UNKNOWN
        raise RpcError(code, f"token request to {realm} failed: {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise RpcError(StatusCode.UNAVAILABLE, f"token request to {realm} failed: {exc}") from None
    token = body.get("token") or body.get("access_token") or ""
    issued = body.get("issued_at")
    issued_at = int(time.time())
    if issued:
        try:
            from datetime import datetime

            issued_at = int(datetime.fromisoformat(issued.replace("Z", "+00:00")).timestamp())
        except ValueError:
            pass
    return token, int(body.get("expires_in") or 60), issued_at
