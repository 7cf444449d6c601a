"""Pulling a base image from a registry, with registry auth resolved through the client session.

``SessionAuthorizer`` plays the part of BuildKit's ``util/resolver/authorizer.go`` (bk eeb7b65):

* On a **Bearer** challenge it asks the session for ``GetTokenAuthority``. With an authority every
  token comes from the client's ``FetchToken`` (no fallback when that fails); without one
  (``Unimplemented`` or ``Unavailable``) it asks for ``Credentials`` and fetches tokens itself
  (GET, then the OAuth POST on 401/404, or 405 with a username).
* On a **Basic** challenge it asks for ``Credentials``. ``Unimplemented`` means anonymous.
* Handlers live per registry host in a ``HandlerCache`` shared by every session of the daemon;
  tokens are cached per scope set for 0.9 x their lifetime. A handler made for another session is
  reused only after ``VerifyTokenAuthority`` proves the new session holds the same key (or, for a
  handler without an authority, after its ``Credentials`` compare equal).

Unlike containerd's resolver (which retries a 401 up to five times), a request is retried at most
once after a challenge: a second 401 is reported as a clear error.

``pull_image`` downloads a manifest (Docker v2 or OCI; a manifest list or index is resolved for
this machine's platform), the config and the layers, verifies every digest (and each layer's
diff_id) and applies the layers to a directory through the safe applier.
"""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import json
import os
import platform
import re
import secrets
import tempfile
import threading
import time
import urllib.parse
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from ..applier import TreeApplier
from ..diffcopy import DeleteEntry, FileData, FileDone, PutEntry
from ..dockerhost import go_verifying_context
from ..paths import check_path_syntax
from ..pb import auth_pb2
from ..tarstream import TarReceiver
from ..transport.base import RpcError, StatusCode

AUTH = "/moby.filesync.v1.Auth/"
CREDENTIALS = AUTH + "Credentials"
FETCH_TOKEN = AUTH + "FetchToken"
GET_TOKEN_AUTHORITY = AUTH + "GetTokenAuthority"
VERIFY_TOKEN_AUTHORITY = AUTH + "VerifyTokenAuthority"
CLIENT_ID = "buildkit-client"

MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST_TYPES = (MEDIA_DOCKER_MANIFEST, MEDIA_OCI_MANIFEST)
INDEX_TYPES = (MEDIA_DOCKER_LIST, MEDIA_OCI_INDEX)
LAYER_TYPES = {
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
}

DEFAULT_INSECURE_HOSTS = ("localhost", "127.0.0.0/8", "::1/128")
# Token lifetime when the server gives none (the distribution token spec's default).
DEFAULT_TOKEN_SECONDS = 60
MAX_MANIFEST_BYTES = 4 << 20
MAX_CONFIG_BYTES = 8 << 20
CHUNK = 256 << 10

UnaryCall = Callable[[str, bytes], bytes]

_DAEMON_SALT = secrets.token_bytes(32)


def daemon_salt() -> bytes:
    """32 random bytes per daemon process, like BuildKit's ``getSalt``: keys never outlive a restart."""
    return _DAEMON_SALT


class RegistryError(Exception):
    """Pulling failed; the message is meant for the build's error output."""


class RegistryAuthError(RegistryError):
    pass


# -- references ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageReference:
    host: str  # as used on the wire (registry-1.docker.io for Docker Hub)
    repository: str
    tag: str | None
    digest: str | None

    @property
    def reference(self) -> str:
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        text = f"{self.host}/{self.repository}"
        if self.tag:
            text += ":" + self.tag
        if self.digest:
            text += "@" + self.digest
        return text


_REPO_PART = re.compile(r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


def parse_reference(text: str) -> ImageReference:
    """Docker's normalisation: a first component without ``.``/``:`` (and not ``localhost``) is on
    Docker Hub, where single names live under ``library/``."""
    rest, digest = text, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not _DIGEST.match(digest):
            raise RegistryError(f"invalid reference {text!r}: unsupported digest {digest!r}")
    tag = None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1:]
        if not _TAG.match(tag):
            raise RegistryError(f"invalid reference {text!r}: bad tag {tag!r}")
    first, _, remainder = rest.partition("/")
    if remainder and ("." in first or ":" in first or first == "localhost"):
        host, repository = first, remainder
    else:
        host, repository = "docker.io", rest
    if host in ("docker.io", "index.docker.io"):
        host = "registry-1.docker.io"
        if "/" not in repository:
            repository = "library/" + repository
    if not repository or not all(_REPO_PART.match(part) for part in repository.split("/")):
        raise RegistryError(f"invalid reference {text!r}: bad repository name {repository!r}")
    if tag is None and digest is None:
        tag = "latest"
    return ImageReference(host, repository, tag, digest)


# -- challenges ------------------------------------------------------------------------------------

@dataclass
class Challenge:
    scheme: str  # lowercased
    params: dict[str, str]


_CHALLENGE_PARAM = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')


def parse_www_authenticate(values: Iterable[str]) -> list[Challenge]:
    """``WWW-Authenticate`` headers into challenges (one per header value; enough for registries)."""
    out = []
    for value in values:
        value = value.strip()
        if not value:
            continue
        scheme, _, rest = value.partition(" ")
        params = {}
        for match in _CHALLENGE_PARAM.finditer(rest):
            raw = match.group(2)
            params[match.group(1).lower()] = re.sub(r"\\(.)", r"\1", raw) if raw is not None else match.group(3)
        out.append(Challenge(scheme.lower(), params))
    return out


def _scope_set(scopes: Iterable[str]) -> dict[str, set[str]]:
    result: dict[str, set[str]] = {}
    for scope in scopes:
        for item in scope.split(" "):
            if not item:
                continue
            parts = item.split(":")
            name = ":".join(parts[:2]) if len(parts) >= 2 else parts[0]
            actions = result.setdefault(name, set())
            if len(parts) >= 3:
                actions.update(a for a in parts[2].split(",") if a)
    return result


def normalize_scopes(scopes: Iterable[str]) -> list[str]:
    """Merge and sort scopes like BuildKit: one ``type:name:a,b`` per resource, actions sorted."""
    merged = _scope_set(scopes)
    return [name + ":" + ",".join(sorted(merged[name])) for name in sorted(merged)]


# -- auth handlers ---------------------------------------------------------------------------------

@dataclass
class AuthHandler:
    """How to authorize requests to one host, as learnt from one session's answers."""

    host: str
    scheme: str  # "basic" or "bearer"
    username: str = ""
    secret: str = ""
    authority: bytes | None = None  # the client's ed25519 public key (v2)
    realm: str = ""
    service: str = ""
    scopes: list[str] = field(default_factory=list)
    tokens: dict[str, tuple[str, float | None]] = field(default_factory=dict)  # scope key -> (token, expiry)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class HandlerCache:
    """Handlers of every session, per host: ``(host, session id) -> handler``."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.handlers: dict[tuple[str, str], AuthHandler] = {}

    def for_session(self, host: str, session_id: str) -> AuthHandler | None:
        return self.handlers.get((host, session_id))

    def candidates(self, host: str) -> list[AuthHandler]:
        seen: list[AuthHandler] = []
        for (h, _), handler in self.handlers.items():
            if h == host and all(handler is not s for s in seen):
                seen.append(handler)
        return seen

    def bind(self, host: str, session_id: str, handler: AuthHandler) -> None:
        self.handlers[(host, session_id)] = handler

    def drop(self, handler: AuthHandler) -> None:
        for key in [k for k, v in self.handlers.items() if v is handler]:
            del self.handlers[key]


SHARED_HANDLERS = HandlerCache()


class SessionAuthorizer:
    """Registry auth for one build session.

    ``call(method, request_bytes) -> response_bytes`` performs a unary call on the session (raising
    ``RpcError``); ``salt`` is the daemon's 32-byte salt (``daemon_salt()``).
    """

    def __init__(self, call: UnaryCall, salt: bytes, *, session_id: str | None = None,
                 cache: HandlerCache | None = None, clock: Callable[[], float] = time.time,
                 token_timeout: float = 30.0, token_authority: bool = True):
        if len(salt) != 32:
            raise ValueError("the salt must be 32 bytes")
        self.call = call
        self.salt = salt
        self.session_id = session_id or secrets.token_hex(8)
        self.cache = cache if cache is not None else SHARED_HANDLERS
        self.clock = clock
        self.token_timeout = token_timeout
        self.token_fetches = 0  # tokens this authorizer obtained (not served from the cache)
        # generation n-1 daemons know only Credentials and fetch every token themselves
        self.token_authority = token_authority

    # -- session calls ---------------------------------------------------------------------------
    def _rpc(self, method: str, request, response_type, *, absent: tuple[StatusCode, ...] = (StatusCode.UNIMPLEMENTED,)):
        """The response, or None when the client answers with one of ``absent``."""
        try:
            raw = self.call(method, request.SerializeToString())
        except RpcError as exc:
            if exc.code in absent:
                return None
            raise RegistryAuthError(f"{method.rsplit('/', 1)[-1]} on the session failed: {exc}") from None
        return response_type.FromString(raw)

    def _credentials(self, host: str) -> tuple[str, str]:
        resp = self._rpc(CREDENTIALS, auth_pb2.CredentialsRequest(Host=host), auth_pb2.CredentialsResponse)
        return ("", "") if resp is None else (resp.Username, resp.Secret)

    def _token_authority(self, host: str) -> bytes | None:
        if not self.token_authority:
            return None
        resp = self._rpc(GET_TOKEN_AUTHORITY, auth_pb2.GetTokenAuthorityRequest(Host=host, Salt=self.salt),
                         auth_pb2.GetTokenAuthorityResponse,
                         absent=(StatusCode.UNIMPLEMENTED, StatusCode.UNAVAILABLE))
        if resp is None:
            return None
        if len(resp.PublicKey) != 32:
            raise RegistryAuthError(f"invalid pubkey length {len(resp.PublicKey)}")
        return resp.PublicKey

    def _verify_authority(self, host: str, public_key: bytes) -> bool:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        payload = secrets.token_bytes(32)
        resp = self._rpc(VERIFY_TOKEN_AUTHORITY,
                         auth_pb2.VerifyTokenAuthorityRequest(Host=host, Salt=self.salt, Payload=payload),
                         auth_pb2.VerifyTokenAuthorityResponse)
        if resp is None or len(resp.Signed) < 64:
            return False
        signature, message = resp.Signed[:64], resp.Signed[64:]
        try:
            Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
        except InvalidSignature:
            return False
        return secrets.compare_digest(message, payload)

    # -- handlers --------------------------------------------------------------------------------
    def _handler(self, host: str) -> AuthHandler | None:
        """This session's handler for ``host``, adopting another session's after proof."""
        handler = self.cache.for_session(host, self.session_id)
        if handler is not None:
            return handler
        for candidate in self.cache.candidates(host):
            try:
                if candidate.authority is not None:
                    ok = self._verify_authority(host, candidate.authority)
                else:
                    ok = self._credentials(host) == (candidate.username, candidate.secret)
            except RegistryAuthError:
                ok = False
            if ok:
                self.cache.bind(host, self.session_id, candidate)
                return candidate
        return None

    def authorization(self, host: str, scopes: list[str]) -> str | None:
        """The ``Authorization`` header for a request to ``host`` needing ``scopes``, if any is known."""
        with self.cache.lock:
            handler = self._handler(host)
        if handler is None:
            return None
        if handler.scheme == "basic":
            import base64

            return "Basic " + base64.b64encode(f"{handler.username}:{handler.secret}".encode()).decode()
        return "Bearer " + self._token(handler, normalize_scopes(list(handler.scopes) + list(scopes)))

    def challenged(self, host: str, www_authenticate: list[str], *, rejected: bool) -> None:
        """A 401 from ``host``. ``rejected``: the request carried our authorization and it was refused
        (the handler is dropped so that fresh answers are asked for). Raises when there is no way in."""
        challenges = parse_www_authenticate(www_authenticate)
        with self.cache.lock:
            handler = self.cache.for_session(host, self.session_id)
            old_scopes: list[str] = []
            if handler is not None and rejected:
                self.cache.drop(handler)
                old_scopes = handler.scopes
                handler = None
            for challenge in challenges:
                if challenge.scheme == "bearer":
                    if handler is not None:
                        return
                    realm = challenge.params.get("realm")
                    if not realm:
                        raise RegistryAuthError(f"{host}: no realm specified for token auth challenge")
                    authority = self._token_authority(host)
                    username = secret = ""
                    if authority is None:
                        username, secret = self._credentials(host)
                    scopes = [challenge.params["scope"]] if challenge.params.get("scope") else []
                    self.cache.bind(host, self.session_id, AuthHandler(
                        host, "bearer", username, secret, authority, realm, challenge.params.get("service", ""),
                        normalize_scopes(scopes + old_scopes)))
                    return
                if challenge.scheme == "basic":
                    username, secret = self._credentials(host)
                    if username and secret:
                        self.cache.bind(host, self.session_id, AuthHandler(host, "basic", username, secret))
                        return
        schemes = ", ".join(c.scheme for c in challenges) or "none"
        raise RegistryAuthError(f"{host}: 401 Unauthorized and no usable credentials (challenge: {schemes})")

    # -- tokens ----------------------------------------------------------------------------------
    def _token(self, handler: AuthHandler, scopes: list[str]) -> str:
        key = " ".join(scopes)
        with handler.lock:  # one fetch per scope set at a time (BuildKit uses a flightcontrol group)
            cached = handler.tokens.get(key)
            now = self.clock()
            if cached is not None and (cached[1] is None or cached[1] > now):
                return cached[0]
            token, expires_in, issued_at = self._fetch_token(handler, scopes)
            self.token_fetches += 1
            lifetime = expires_in if expires_in > 0 else DEFAULT_TOKEN_SECONDS
            start = issued_at if issued_at > 0 else now
            handler.tokens[key] = (token, start + 0.9 * lifetime)
            return token

    def _fetch_token(self, handler: AuthHandler, scopes: list[str]) -> tuple[str, int, int]:
        if handler.authority is not None:
            # No fallback: a client that holds an authority must fetch every token itself.
            try:
                raw = self.call(FETCH_TOKEN, auth_pb2.FetchTokenRequest(
                    ClientID=CLIENT_ID, Host=handler.host, Realm=handler.realm, Service=handler.service,
                    Scopes=scopes).SerializeToString())
            except RpcError as exc:
                raise RegistryAuthError(f"failed to authorize: FetchToken on the session failed: {exc.details or exc}") \
                    from None
            resp = auth_pb2.FetchTokenResponse.FromString(raw)
            if not resp.Token:
                raise RegistryAuthError("failed to authorize: the client's FetchToken returned no token")
            return resp.Token, resp.ExpiresIn, resp.IssuedAt
        from ..client.auth import fetch_token

        try:
            return fetch_token(handler.realm, handler.service, scopes, handler.username, handler.secret,
                               timeout=self.token_timeout)
        except RpcError as exc:
            raise RegistryAuthError(f"failed to authorize: {exc.details}") from None


# -- HTTP ------------------------------------------------------------------------------------------

def _is_insecure(host: str, insecure_hosts: Iterable[str]) -> bool:
    hostname = urllib.parse.urlsplit("//" + host).hostname or host
    for entry in insecure_hosts:
        if entry == host or entry == hostname:
            return True
        try:
            if ipaddress.ip_address(hostname) in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue
    return False


class _Response:
    def __init__(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse):
        self.conn, self.resp = conn, resp
        self.status = resp.status
        self.headers = resp.headers

    def read(self, limit: int) -> bytes:
        data = self.resp.read(limit + 1)
        if len(data) > limit:
            self.close()
            raise RegistryError(f"response larger than {limit} bytes")
        return data

    def chunks(self) -> Iterator[bytes]:
        while chunk := self.resp.read(CHUNK):
            yield chunk

    def close(self) -> None:
        self.conn.close()


class RegistryClient:
    """Registry API requests for one repository, authorized through a ``SessionAuthorizer``."""

    def __init__(self, ref: ImageReference, authorizer: SessionAuthorizer | None, *,
                 insecure_hosts: Iterable[str] = DEFAULT_INSECURE_HOSTS, timeout: float = 60.0,
                 user_agent: str = "docker-session-reference/0.1"):
        self.ref = ref
        self.authorizer = authorizer
        self.scheme = "http" if _is_insecure(ref.host, insecure_hosts) else "https"
        self.timeout = timeout
        self.user_agent = user_agent
        self.scopes = [f"repository:{ref.repository}:pull"]
        self.requests = 0

    def _open(self, method: str, url: str, headers: dict[str, str]) -> _Response:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=self.timeout,
                                               context=go_verifying_context())  # as dockerd verifies
        else:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=self.timeout)
        path = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        try:
            conn.request(method, path, headers={"User-Agent": self.user_agent, **headers})
            self.requests += 1
            return _Response(conn, conn.getresponse())
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise RegistryError(f"{method} {url}: {exc}") from None

    def get(self, path: str, *, accept: Iterable[str] = (), method: str = "GET") -> _Response:
        """GET ``/v2/<repo>/<path>``, answering at most one auth challenge and following redirects
        (without our credentials once they leave the registry host)."""
        url = f"{self.scheme}://{self.ref.host}/v2/{self.ref.repository}/{path}"
        base_headers = {"Accept": ", ".join(accept)} if accept else {}
        answered = False
        for _redirect in range(6):
            headers = dict(base_headers)
            same_host = urllib.parse.urlsplit(url).netloc == self.ref.host
            sent_auth = False
            if same_host and self.authorizer is not None:
                value = self.authorizer.authorization(self.ref.host, self.scopes)
                if value:
                    headers["Authorization"] = value
                    sent_auth = True
            resp = self._open(method, url, headers)
            if resp.status == 401 and same_host:
                challenges = resp.headers.get_all("WWW-Authenticate") or []
                body = resp.read(64 << 10) if method != "HEAD" else b""
                resp.close()
                if self.authorizer is None or answered:
                    raise RegistryAuthError(f"pulling from host {self.ref.host} failed: {method} {path}: "
                                            f"401 Unauthorized{_error_detail(body)}")
                self.authorizer.challenged(self.ref.host, challenges, rejected=sent_auth)
                answered = True
                continue
            if resp.status in (301, 302, 303, 307, 308) and resp.headers.get("Location"):
                url = urllib.parse.urljoin(url, resp.headers["Location"])
                resp.close()
                continue
            if resp.status != 200:
                body = resp.read(64 << 10) if method != "HEAD" else b""
                resp.close()
                what = "not found" if resp.status == 404 else f"{resp.status} {resp.resp.reason}"
                raise RegistryError(f"{self.ref}: {method} {path}: {what}{_error_detail(body)}")
            return resp
        raise RegistryError(f"{self.ref}: too many redirects for {path}")


def _error_detail(body: bytes) -> str:
    try:
        errors = json.loads(body).get("errors") or []
        text = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors)
        return f" ({text})" if text else ""
    except (ValueError, AttributeError):
        return ""


# -- pulling ---------------------------------------------------------------------------------------

def _machine_platform() -> tuple[str, str, str | None]:
    machine = platform.machine().lower()
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "i686": "386",
            "i386": "386", "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}.get(machine)
    if arch is None and machine.startswith("armv"):
        return "linux", "arm", "v" + machine[4]
    return "linux", arch or machine, ("v8" if arch == "arm64" else None)


def _verify(data: bytes, digest: str, what: str) -> None:
    algorithm, _, expected = digest.partition(":")
    if algorithm not in ("sha256", "sha512"):
        raise RegistryError(f"{what}: unsupported digest algorithm {algorithm!r}")
    if hashlib.new(algorithm, data).hexdigest() != expected:
        raise RegistryError(f"{what}: digest mismatch (expected {digest})")


def _media_type(resp: _Response, document: dict) -> str:
    return document.get("mediaType") or (resp.headers.get("Content-Type") or "").split(";")[0].strip()


def fetch_manifest(client: RegistryClient, platform_: tuple[str, str, str | None] | None = None) -> tuple[dict, str]:
    """The image manifest for this platform (resolving a list/index) and its digest."""
    ref = client.ref
    accept = (MEDIA_DOCKER_MANIFEST, MEDIA_DOCKER_LIST, MEDIA_OCI_MANIFEST, MEDIA_OCI_INDEX)
    want_os, want_arch, want_variant = platform_ or _machine_platform()
    reference, expected = ref.reference, ref.digest
    for _depth in range(2):
        resp = client.get(f"manifests/{reference}", accept=accept)
        try:
            data = resp.read(MAX_MANIFEST_BYTES)
        finally:
            resp.close()
        digest = expected or resp.headers.get("Docker-Content-Digest") or "sha256:" + hashlib.sha256(data).hexdigest()
        _verify(data, digest, f"manifest {ref.repository}@{reference}")
        try:
            document = json.loads(data)
        except ValueError:
            raise RegistryError(f"manifest of {ref} is not JSON") from None
        media = _media_type(resp, document)
        if media in MANIFEST_TYPES or (not media and "layers" in document):
            return document, digest
        if media in INDEX_TYPES or (not media and "manifests" in document):
            choices = [m for m in document.get("manifests", [])
                       if (m.get("platform") or {}).get("os") == want_os
                       and (m.get("platform") or {}).get("architecture") == want_arch]
            exact = [m for m in choices if (m.get("platform") or {}).get("variant") in (None, want_variant)]
            pick = (exact or choices or [None])[0]
            if pick is None:
                raise RegistryError(f"{ref}: no image for platform {want_os}/{want_arch}")
            reference = expected = pick["digest"]
            continue
        if document.get("schemaVersion") == 1:
            raise RegistryError(f"{ref}: schema 1 manifests are not supported")
        raise RegistryError(f"{ref}: unsupported manifest media type {media!r}")
    raise RegistryError(f"{ref}: an index points at another index")


def fetch_blob_to(client: RegistryClient, descriptor: dict, fh) -> None:
    """Stream a blob into ``fh``, checking its size and digest."""
    digest = descriptor["digest"]
    algorithm, _, expected = digest.partition(":")
    if algorithm not in ("sha256", "sha512") or not re.fullmatch(r"[0-9a-f]+", expected):
        raise RegistryError(f"blob {digest}: unsupported digest")
    hasher = hashlib.new(algorithm)
    size = 0
    limit = descriptor.get("size")
    resp = client.get(f"blobs/{digest}")
    try:
        for chunk in resp.chunks():
            size += len(chunk)
            if limit is not None and size > limit:
                raise RegistryError(f"blob {digest}: larger than the {limit} bytes its descriptor says")
            hasher.update(chunk)
            fh.write(chunk)
    finally:
        resp.close()
    if limit is not None and size != limit:
        raise RegistryError(f"blob {digest}: got {size} bytes, the descriptor says {limit}")
    if hasher.hexdigest() != expected:
        raise RegistryError(f"blob {digest}: digest mismatch")


class _WhiteoutFilter:
    """Turns AUFS-style whiteouts into deletions of lower-layer entries.

    ``.wh.<name>`` deletes ``<name>``; ``.wh..wh..opq`` empties its directory of everything that
    came from lower layers. The whiteout files themselves are never written.
    """

    def __init__(self, root: str):
        self.root = root
        self.added: set[str] = set()
        self.skipped_ids: set[int] = set()

    def __call__(self, actions: list) -> Iterator:
        for action in actions:
            if isinstance(action, PutEntry):
                parent, _, base = action.path.rpartition("/")
                if base.startswith(".wh."):
                    if action.file_id is not None:
                        self.skipped_ids.add(action.file_id)
                    if base == ".wh..wh..opq":
                        for name in self._lower_children(parent):
                            yield DeleteEntry(f"{parent}/{name}" if parent else name)
                    else:
                        target = f"{parent}/{base[4:]}" if parent else base[4:]
                        check_path_syntax(target)
                        if target not in self.added:
                            yield DeleteEntry(target)
                    continue
                self.added.add(action.path)
                yield action
            elif isinstance(action, (FileData, FileDone)) and action.file_id in self.skipped_ids:
                continue
            else:
                yield action

    def _lower_children(self, path: str) -> list[str]:
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            for part in [p for p in path.split("/") if p]:
                try:
                    child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                except OSError:
                    return []
                os.close(fd)
                fd = child
            names = os.listdir(fd)
        finally:
            os.close(fd)
        prefix = f"{path}/" if path else ""
        return sorted(n for n in names if prefix + n not in self.added)


def _decompressed(fh) -> Iterator[bytes]:
    """The layer's tar bytes: gzip is detected by its magic (some registries mislabel layers)."""
    head = fh.read(2)
    fh.seek(0)
    if head != b"\x1f\x8b":
        while chunk := fh.read(CHUNK):
            yield chunk
        return
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    while chunk := fh.read(CHUNK):
        while chunk:
            out = inflater.decompress(chunk, CHUNK)
            if out:
                yield out
            chunk = inflater.unconsumed_tail
            if inflater.eof:
                rest = inflater.unused_data
                if not rest.strip(b"\0"):  # trailing padding after the last member
                    if rest:
                        chunk = b""
                    break
                inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)  # concatenated gzip members
                chunk = rest
    tail = inflater.flush()
    if tail:
        yield tail


def apply_layer(fh, dest_rootfs_dir: str, diff_id: str | None = None, *, keep_tar: str | None = None) -> int:
    """Apply one (possibly gzipped) layer tar from ``fh`` to ``dest_rootfs_dir``; returns tar bytes.
    ``diff_id`` (the digest of the uncompressed tar) is checked before the layer is completed.
    ``keep_tar``: also write the uncompressed tar there (for an image store)."""
    keep = open(keep_tar, "wb") if keep_tar else None
    try:
        return _apply_layer(fh, dest_rootfs_dir, diff_id, keep)
    finally:
        if keep is not None:
            keep.close()


def _apply_layer(fh, dest_rootfs_dir: str, diff_id: str | None, keep) -> int:
    receiver = TarReceiver()
    filt = _WhiteoutFilter(dest_rootfs_dir)
    hasher = hashlib.sha256()
    total = 0
    applier = TreeApplier(dest_rootfs_dir, chown=None)
    try:
        for chunk in _decompressed(fh):
            hasher.update(chunk)
            total += len(chunk)
            if keep is not None:
                keep.write(chunk)
            if not receiver.done:
                for action in filt(receiver.feed(chunk)):
                    applier.apply(action)
        for action in filt(receiver.end()):
            applier.apply(action)
        if diff_id and diff_id != "sha256:" + hasher.hexdigest():
            raise RegistryError(f"layer diff_id mismatch (expected {diff_id})")
    except (zlib.error, EOFError) as exc:
        applier.abort()
        raise RegistryError(f"corrupt layer: {exc}") from None
    except BaseException:
        applier.abort()
        raise
    applier.finish()
    return total


def pull_image(reference: str, dest_rootfs_dir: str, authorizer: SessionAuthorizer | None, *,
               insecure_hosts: Iterable[str] = DEFAULT_INSECURE_HOSTS,
               platform: tuple[str, str, str | None] | None = None,
               progress: Callable[[str], None] | None = None,
               save_layers_to: str | None = None) -> dict:
    """Pull ``reference`` and apply its layers, in order, to ``dest_rootfs_dir``.

    Returns the image config (the whole JSON document: ``config``, ``rootfs``, ``history``...),
    with ``"_digest"`` set to the manifest digest the reference resolved to. With
    ``save_layers_to`` (a directory), the uncompressed layer tars are kept there as
    ``base-layer-<n>.tar`` and listed, in order, in ``"_layer_tars"``.
    """
    ref = parse_reference(reference)
    client = RegistryClient(ref, authorizer, insecure_hosts=insecure_hosts)
    manifest, manifest_digest = fetch_manifest(client, platform)
    config_desc = manifest.get("config") or {}
    if "digest" not in config_desc:
        raise RegistryError(f"{ref}: manifest without a config")
    resp = client.get(f"blobs/{config_desc['digest']}")
    try:
        config_bytes = resp.read(MAX_CONFIG_BYTES)
    finally:
        resp.close()
    _verify(config_bytes, config_desc["digest"], f"config of {ref}")
    config = json.loads(config_bytes)
    layers = manifest.get("layers") or []
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
    if len(diff_ids) != len(layers):
        raise RegistryError(f"{ref}: {len(layers)} layers but {len(diff_ids)} diff_ids in the config")
    os.makedirs(dest_rootfs_dir, exist_ok=True)
    kept: list[str] = []
    for index, (layer, diff_id) in enumerate(zip(layers, diff_ids)):
        media = layer.get("mediaType", "")
        if media and media not in LAYER_TYPES:
            raise RegistryError(f"{ref}: unsupported layer media type {media!r}")
        if progress:
            progress(f"layer {index + 1}/{len(layers)} {layer['digest']}")
        with tempfile.TemporaryFile(dir=os.path.dirname(os.path.abspath(dest_rootfs_dir))) as fh:
            fetch_blob_to(client, layer, fh)
            fh.seek(0)
            keep_tar = os.path.join(save_layers_to, f"base-layer-{index + 1}.tar") if save_layers_to else None
            apply_layer(fh, dest_rootfs_dir, diff_id, keep_tar=keep_tar)
            if keep_tar:
                kept.append(keep_tar)
    config["_digest"] = manifest_digest
    if save_layers_to:
        config["_layer_tars"] = kept
    return config
