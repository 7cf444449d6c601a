"""A real distribution registry (Debian's ``docker-registry``, distribution 2.8) for auth and pull tests.

Library code: ``LocalRegistry`` starts ``/usr/bin/docker-registry serve <config>`` on 127.0.0.1 with
no auth, htpasswd Basic auth (bcrypt, written with ``htpasswd -B``) or token auth (a token service's
realm, service, issuer and the certificate of its signing key as ``rootcertbundle``), waits until
``/v2/`` answers, and stops it. ``push_image`` uploads a small image through the registry API, and
``registry.requests`` parses the registry's access log so tests can count what a peer asked for.

127.0.0.0/8 is an insecure registry for dockerd by default, so everything is plain HTTP.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.client
import io
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
import urllib.parse
from dataclasses import dataclass

from reference.processes import stop_process

DOCKER_REGISTRY = "/usr/bin/docker-registry"
HTPASSWD = "/usr/bin/htpasswd"

MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

# Apache combined log line, as distribution's access log writes it.
_ACCESS_LINE = re.compile(
    r'^(?P<addr>\S+) \S+ (?P<user>\S+) \[[^\]]*\] "(?P<method>[A-Z]+) (?P<uri>\S+) HTTP/[\d.]+" '
    r'(?P<status>\d{3}) \S+ "[^"]*" "(?P<agent>[^"]*)"')


class RegistryError(RuntimeError):
    pass


def no_registry_reason() -> str | None:
    for path, package in ((DOCKER_REGISTRY, "docker-registry"), (HTPASSWD, "apache2-utils")):
        if not os.access(path, os.X_OK):
            return f"{path} not found (Debian package {package}; run .ci/install-system-deps)"
    return None


def require_registry() -> None:
    """Skip (developer machine) or fail (CI) when the registry binaries are missing."""
    reason = no_registry_reason()
    if reason is None:
        return
    import pytest

    from .realpeers import running_in_ci

    if running_in_ci():
        pytest.fail(f"registry unavailable on CI: {reason}", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_htpasswd(path: str, users: dict[str, str]) -> None:
    """bcrypt entries (the only hash distribution's htpasswd auth accepts)."""
    lines = []
    for user, password in users.items():
        out = subprocess.run([HTPASSWD, "-B", "-b", "-n", user, password], check=True, capture_output=True,
                             text=True).stdout
        lines.append(out.strip())
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def registry_config(*, addr: str, storage_dir: str, htpasswd_path: str | None = None,
                    token: dict | None = None) -> dict:
    """The registry's config.yml as a dict (JSON is valid YAML). ``token``: realm, service, issuer,
    rootcertbundle."""
    config: dict = {
        "version": 0.1,
        "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
        "storage": {"filesystem": {"rootdirectory": storage_dir}, "delete": {"enabled": True},
                    "maintenance": {"uploadpurging": {"enabled": False}}},
        "http": {"addr": addr, "secret": secrets.token_hex(16), "headers": {"X-Content-Type-Options": ["nosniff"]}},
    }
    if htpasswd_path and token:
        raise ValueError("one auth method at a time")
    if htpasswd_path:
        config["auth"] = {"htpasswd": {"realm": "test-basic-realm", "path": htpasswd_path}}
    if token:
        config["auth"] = {"token": {k: token[k] for k in ("realm", "service", "issuer", "rootcertbundle")}}
    return config


@dataclass
class AccessRecord:
    method: str
    path: str
    status: int
    user_agent: str


class LocalRegistry:
    """``docker-registry serve`` on 127.0.0.1:<free port>; a context manager.

    ``auth``: None, ``"htpasswd"`` (``users`` required) or ``"token"`` (``token`` = dict with realm,
    service, issuer, rootcertbundle).
    """

    def __init__(self, *, auth: str | None = None, users: dict[str, str] | None = None,
                 token: dict | None = None, start_timeout: float = 15.0):
        self.auth = auth
        self.users = dict(users or {})
        self.token = token
        self.start_timeout = start_timeout
        self.dir: str | None = None
        self.port: int | None = None
        self.process: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def log_path(self) -> str:
        assert self.dir is not None
        return os.path.join(self.dir, "registry.log")

    def start(self) -> "LocalRegistry":
        reason = no_registry_reason()
        if reason:
            raise RegistryError(reason)
        self.dir = tempfile.mkdtemp(prefix="dsc-registry-")
        try:
            htpasswd_path = None
            if self.auth == "htpasswd":
                htpasswd_path = os.path.join(self.dir, "htpasswd")
                write_htpasswd(htpasswd_path, self.users)
            elif self.auth == "token":
                if not self.token:
                    raise ValueError("token auth needs token=dict(realm, service, issuer, rootcertbundle)")
            elif self.auth is not None:
                raise ValueError(f"unknown auth {self.auth!r}")
            for _attempt in range(3):  # the free port can be taken between probe and bind
                self.port = free_port()
                config = registry_config(addr=self.host, storage_dir=os.path.join(self.dir, "storage"),
                                         htpasswd_path=htpasswd_path,
                                         token=self.token if self.auth == "token" else None)
                config_path = os.path.join(self.dir, "config.yml")
                with open(config_path, "w") as fh:
                    json.dump(config, fh, indent=1)
                with open(self.log_path, "ab") as log:
                    self.process = subprocess.Popen([DOCKER_REGISTRY, "serve", config_path], stdin=subprocess.DEVNULL,
                                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                if self._wait_ready():
                    return self
                self._kill()
            raise RegistryError(f"docker-registry did not start; log:\n{self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/v2/", headers={"User-Agent": "dsc-readiness"})
                status = conn.getresponse().status
                conn.close()
                if status in (200, 401):
                    return True
            except OSError:
                pass
            time.sleep(0.05)
        return False

    def _kill(self) -> None:
        stop_process(self.process, 5)
        self.process = None

    def stop(self) -> None:
        self._kill()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> "LocalRegistry":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, errors="replace") as fh:
                return "".join(fh.readlines()[-lines:])
        except (OSError, AssertionError):
            return ""

    def requests(self, agent_fragment: str | None = None) -> list[AccessRecord]:
        """Every request in the access log (readiness probes excluded), optionally by user agent."""
        records = []
        try:
            with open(self.log_path, errors="replace") as fh:
                for line in fh:
                    match = _ACCESS_LINE.match(line.strip())
                    if not match or match["agent"] == "dsc-readiness":
                        continue
                    if agent_fragment and agent_fragment not in match["agent"]:
                        continue
                    records.append(AccessRecord(match["method"], match["uri"], int(match["status"]), match["agent"]))
        except OSError:
            pass
        return records


# -- images --------------------------------------------------------------------------------------------

def make_layer(files: dict[str, bytes], *, whiteouts: tuple[str, ...] = (), mode: int = 0o644) -> tuple[bytes, str]:
    """A gzip'd layer tar holding ``files`` (parents added); returns (blob, diff_id)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        seen: set[str] = set()
        for path in sorted(list(files) + list(whiteouts)):
            parts = path.split("/")
            for i in range(1, len(parts)):
                parent = "/".join(parts[:i])
                if parent not in seen:
                    seen.add(parent)
                    info = tarfile.TarInfo(parent + "/")
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_600_000_000
                    tar.addfile(info)
            data = files.get(path, b"")
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(data), mode, 1_600_000_000
            tar.addfile(info, io.BytesIO(data))
    tar_bytes = raw.getvalue()
    return gzip.compress(tar_bytes, mtime=0), "sha256:" + hashlib.sha256(tar_bytes).hexdigest()


def image_config(diff_ids: list[str], *, env: list[str] | None = None, cmd: list[str] | None = None) -> dict:
    return {"architecture": "amd64", "os": "linux", "created": "2020-09-13T12:26:40Z",
            "config": {"Env": env or ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                       "Cmd": cmd or ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created": "2020-09-13T12:26:40Z", "created_by": "test layer"} for _ in diff_ids]}


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class RegistryClient:
    """A minimal registry API client for setting tests up (independent of the daemon's puller).

    Answers Basic and Bearer challenges with ``credentials`` (user, password); bearer tokens come
    from the challenge's realm with a GET.
    """

    def __init__(self, base_url: str, credentials: tuple[str, str] | None = None,
                 user_agent: str = "dsc-test-setup"):
        self.base = urllib.parse.urlsplit(base_url)
        self.credentials = credentials
        self.user_agent = user_agent
        self._authorization: dict[str, str] = {}  # scope -> header

    def _raw(self, method: str, url: str, body: bytes | None = None, headers: dict | None = None):
        parts = urllib.parse.urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        path = parts.path + ("?" + parts.query if parts.query else "")
        try:
            conn.request(method, path, body=body, headers={"User-Agent": self.user_agent, **(headers or {})})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def request(self, method: str, path: str, *, scope: str, body: bytes | None = None,
                headers: dict | None = None, expect=(200, 201, 202)):
        url = path if path.startswith("http") else f"{self.base.scheme}://{self.base.netloc}{path}"
        for attempt in range(2):
            hdrs = dict(headers or {})
            if scope in self._authorization:
                hdrs["Authorization"] = self._authorization[scope]
            status, resp_headers, data = self._raw(method, url, body, hdrs)
            if status == 401 and attempt == 0 and self.credentials:
                self._authorization[scope] = self._answer(resp_headers.get("www-authenticate", ""), scope)
                continue
            break
        if status not in expect:
            raise RegistryError(f"{method} {url}: {status} {data[:300]!r}")
        return status, resp_headers, data

    def _answer(self, challenge: str, scope: str) -> str:
        user, password = self.credentials
        basic = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        if challenge.lower().startswith("basic"):
            return basic
        params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        query = urllib.parse.urlencode({"service": params.get("service", ""), "scope": scope})
        status, _, data = self._raw("GET", f"{params['realm']}?{query}", headers={"Authorization": basic})
        if status != 200:
            raise RegistryError(f"token request failed: {status} {data[:200]!r}")
        return "Bearer " + json.loads(data)["token"]

    def push_blob(self, repo: str, data: bytes) -> str:
        digest = digest_of(data)
        scope = f"repository:{repo}:pull,push"
        status, _, _ = self.request("HEAD", f"/v2/{repo}/blobs/{digest}", scope=scope, expect=(200, 404))
        if status == 200:
            return digest
        _, headers, _ = self.request("POST", f"/v2/{repo}/blobs/uploads/", scope=scope, expect=(202,))
        location = headers["location"]
        sep = "&" if "?" in location else "?"
        self.request("PUT", f"{location}{sep}digest={urllib.parse.quote(digest)}", scope=scope, body=data,
                     headers={"Content-Type": "application/octet-stream", "Content-Length": str(len(data))},
                     expect=(201,))
        return digest

    def push_manifest(self, repo: str, reference: str, manifest: dict | bytes, media_type: str) -> str:
        data = manifest if isinstance(manifest, bytes) else json.dumps(manifest, indent=1).encode()
        self.request("PUT", f"/v2/{repo}/manifests/{reference}", scope=f"repository:{repo}:pull,push", body=data,
                     headers={"Content-Type": media_type}, expect=(201,))
        return digest_of(data)


@dataclass
class PushedImage:
    reference: str  # host/repo:tag
    manifest_digest: str
    config: dict
    layer_digests: list[str]


def push_image(registry: LocalRegistry | str, repo: str, tag: str, layers: list[dict[str, bytes]], *,
               credentials: tuple[str, str] | None = None, oci: bool = False, index: bool = False,
               config_extra: dict | None = None) -> PushedImage:
    """Push an image whose layers hold ``layers`` (one files dict each). ``oci`` picks OCI media types;
    ``index`` wraps the manifest in a manifest list / OCI index (with a decoy arm64 entry first)."""
    base_url = registry.url if isinstance(registry, LocalRegistry) else registry
    host = urllib.parse.urlsplit(base_url).netloc
    client = RegistryClient(base_url, credentials)
    blobs = [make_layer(files) for files in layers]
    config = image_config([diff_id for _, diff_id in blobs])
    config.update(config_extra or {})
    config_bytes = json.dumps(config).encode()
    layer_media = MEDIA_OCI_LAYER if oci else MEDIA_DOCKER_LAYER
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_MANIFEST if oci else MEDIA_DOCKER_MANIFEST,
        "config": {"mediaType": MEDIA_OCI_CONFIG if oci else MEDIA_DOCKER_CONFIG, "size": len(config_bytes),
                   "digest": client.push_blob(repo, config_bytes)},
        "layers": [{"mediaType": layer_media, "size": len(blob), "digest": client.push_blob(repo, blob)}
                   for blob, _ in blobs],
    }
    manifest_type = manifest["mediaType"]
    manifest_bytes = json.dumps(manifest, indent=1).encode()
    if not index:
        digest = client.push_manifest(repo, tag, manifest_bytes, manifest_type)
    else:
        digest = client.push_manifest(repo, digest_of(manifest_bytes), manifest_bytes, manifest_type)
        # A decoy for another platform comes first: the puller must pick by platform, not by position.
        decoy_config = json.dumps(dict(image_config([]), architecture="arm64")).encode()
        decoy = {"schemaVersion": 2, "mediaType": manifest_type,
                 "config": {"mediaType": manifest["config"]["mediaType"], "size": len(decoy_config),
                            "digest": client.push_blob(repo, decoy_config)},
                 "layers": []}
        decoy_bytes = json.dumps(decoy).encode()
        decoy_digest = client.push_manifest(repo, digest_of(decoy_bytes), decoy_bytes, manifest_type)
        list_type = MEDIA_OCI_INDEX if oci else MEDIA_DOCKER_LIST
        listing = {"schemaVersion": 2, "mediaType": list_type, "manifests": [
            {"mediaType": manifest_type, "size": len(decoy_bytes), "digest": decoy_digest,
             "platform": {"architecture": "arm64", "os": "linux"}},
            {"mediaType": manifest_type, "size": len(manifest_bytes), "digest": digest,
             "platform": {"architecture": "amd64", "os": "linux"}},
        ]}
        client.push_manifest(repo, tag, listing, list_type)
    return PushedImage(f"{host}/{repo}:{tag}", digest, config, [layer["digest"] for layer in manifest["layers"]])


def load_token_service():
    """The test token service module (kept for callers that load it lazily)."""
    from .harness import token_service

    return token_service


def serving_image(auth: str, workdir: str, *, users: dict[str, str], repo: str, tag: str,
                  layers: list[dict[str, bytes]]):
    """A context manager: a registry with ``auth`` "htpasswd" (Basic) or "token" (with a test token
    service) holding one pushed image; yields the LocalRegistry with ``.pushed`` (and ``.tokens``)."""
    import contextlib

    @contextlib.contextmanager
    def run():
        require_registry()
        user, password = next(iter(users.items()))
        if auth == "htpasswd":
            with LocalRegistry(auth="htpasswd", users=users) as registry:
                registry.pushed = push_image(registry, repo, tag, layers, credentials=(user, password))
                yield registry
            return
        from .harness.token_service import TokenService

        tokens = TokenService(users=users, workdir=workdir)
        with tokens, LocalRegistry(auth="token", token=token_registry_settings(tokens)) as registry:
            registry.tokens = tokens
            registry.pushed = push_image(registry, repo, tag, layers, credentials=(user, password))
            tokens.requests.clear()
            yield registry

    return run()


def registry_fixture(auth: str, *, users: dict[str, str], repo: str, layers: list[dict[str, bytes]],
                     tag: str = "1"):
    """A pytest fixture (assign it to a module-level name): a fresh :func:`serving_image` per test.

    Fresh per test on purpose: a new port is a new registry host, so dockerd's
    auth cache from an earlier test cannot answer for this one.
    """
    import pytest

    @pytest.fixture
    def serving(tmp_path):
        with serving_image(auth, str(tmp_path), users=users, repo=repo, tag=tag, layers=layers) as registry:
            yield registry

    return serving


def write_docker_config(directory: str, host: str, user: str, password: str) -> None:
    """``config.json`` with Basic credentials for ``host``, as ``docker login`` leaves it."""
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    with open(os.path.join(directory, "config.json"), "w") as fh:
        json.dump({"auths": {host: {"auth": auth}}}, fh)


def token_registry_settings(service) -> dict:
    """The registry's ``auth.token`` settings for a fixtures/token_service.py TokenService."""
    return {"realm": service.realm, "service": service.service, "issuer": service.issuer,
            "rootcertbundle": service.cert_path}
