"""Engine API routes: the subset the docker CLI 20.10 and buildx use around ``docker build``.

Every route answers with and without a ``/vX.Y`` prefix; versions outside
1.12 up to the generation's API version (1.41 for n, 1.45 for n+1) are
refused like dockerd does.  For its own images it serves list, inspect, history, tag, delete and save
(a docker-archive tar, reference/daemon/imagearchive.py); every other Engine API route answers 501 "not
supported by the reference daemon: METHOD PATH", anything else dockerd's 404.  ``POST /grpc`` (generations n and n+1)
is BuildKit's Control API, reference/daemon/grpcapi.py.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import sys
import threading
import time

from ..plain import plain
from .builder import BadRequest, Builder, BuildOptions, go_arch
from .cache import ContextCache
from .config import API_VERSION, ENGINE_VERSION, MIN_API_VERSION, DaemonConfig
from .grpcapi import GrpcEndpoint
from .httpserver import Exchange, Request
from .imagearchive import write_docker_archive
from .images import ImageNotFound, ImageStore, InvalidReference, normalize_tag
from .progress import ProgressWriter
from .sessions import SessionManager

log = logging.getLogger("reference.daemon.api")

# reference.dockerhost's User-Agent: the project's Python clients and suite
OWN_USER_AGENT = "docker-session-reference/"
_VERSION_PREFIX = re.compile(r"^/v([0-9]+(?:\.[0-9]+)?)(/.*)$")
_IMAGE_ACTION = re.compile(r"^/images/(.+)/(json|history|get|tag)$")
_IMAGE = re.compile(r"^/images/(.+)$")
# Engine API areas dockerd serves and this daemon does not: a plain "not supported" (501) instead of dockerd's 404,
# which the docker CLI reads as "no such image" (`docker run` then tries to pull it) or "page not found".
_UNSERVED_AREAS = ("/containers", "/exec", "/networks", "/volumes", "/swarm", "/nodes", "/services", "/tasks",
                   "/secrets", "/configs", "/plugins", "/distribution", "/auth", "/events", "/commit")
_UNSERVED_IMAGE_ROUTES = re.compile(r"^/images/(create|load|search|prune)$|^/images/.+/push$")
NOT_SUPPORTED = ("not supported by the reference daemon: {request} (it builds images and serves the client "
                 "session; it runs no containers and keeps no registry or network state)")


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def default_headers(config: DaemonConfig | None = None) -> list[tuple[str, str]]:
    engine, api = (config.engine_version, config.api_version) if config else (ENGINE_VERSION, API_VERSION)
    return [("Server", f"Docker/{engine} (linux)"), ("Api-Version", api), ("Ostype", "linux")]


def _is_unserved_engine_route(path: str) -> bool:
    return (any(path == area or path.startswith(area + "/") for area in _UNSERVED_AREAS)
            or bool(_UNSERVED_IMAGE_ROUTES.match(path)))


class EngineApi:
    def __init__(self, config: DaemonConfig, sessions: SessionManager, cache: ContextCache,
                 images: ImageStore, builder: Builder, grpc: GrpcEndpoint | None = None):
        self.config = config
        self.sessions = sessions
        self.cache = cache
        self.images = images
        self.builder = builder
        self.grpc = grpc  # POST /grpc (BuildKit's Control API); None: the generation has no such route
        self.started_at = time.time()
        self.requests_seen: list[str] = []  # "METHOD /path" of every request (the stats endpoint shows them)
        self._lock = threading.Lock()

    def __call__(self, request: Request, exchange: Exchange) -> None:
        path = request.path
        match = _VERSION_PREFIX.match(path)
        if match:
            version, path = match.group(1), match.group(2)
            api_version = self.config.api_version
            if _version_tuple(version) > _version_tuple(api_version):
                exchange.error(400, f"client version {version} is too new. Maximum supported API version is {api_version}")
                return
            if _version_tuple(version) < _version_tuple(MIN_API_VERSION):
                exchange.error(400, f"client version {version} is too old. Minimum supported API version is "
                                    f"{MIN_API_VERSION}, please upgrade your client to a newer version")
                return
        with self._lock:
            self.requests_seen.append(f"{request.method} {path}")
            del self.requests_seen[:-500]
        method = request.method
        route = self._route(method, path)
        if route is None:
            if _is_unserved_engine_route(path):
                exchange.error(501, NOT_SUPPORTED.format(request=f"{method} {path}"))
            else:
                exchange.error(404, "page not found")
            return
        handler, args = route
        handler(request, exchange, *args)

    def _route(self, method: str, path: str):
        fixed = {
            ("GET", "/_ping"): self.ping,
            ("HEAD", "/_ping"): self.ping,
            ("GET", "/version"): self.version,
            ("GET", "/info"): self.info,
            ("POST", "/session"): self.session,
            ("POST", "/build"): self.build,
            ("POST", "/build/prune"): self.build_prune,
            ("POST", "/build/cancel"): self.build_cancel,
            ("GET", "/system/df"): self.system_df,
            ("GET", "/images/json"): self.images_list,
            ("GET", "/images/get"): self.images_save,
            ("GET", "/_reference/stats"): self.stats,
        }
        if self.grpc is not None:
            fixed[("POST", "/grpc")] = self.grpc.handle
        handler = fixed.get((method, path))
        if handler is not None:
            return handler, ()
        match = _IMAGE_ACTION.match(path)
        if match:
            name, action = match.groups()
            handler = {("GET", "json"): self.image_inspect, ("GET", "history"): self.image_history,
                       ("GET", "get"): self.image_save, ("POST", "tag"): self.image_tag}.get((method, action))
            if handler is not None:
                return handler, (name,)
        if method == "DELETE":
            match = _IMAGE.match(path)
            if match:
                return self.image_delete, (match.group(1),)
        return None

    # -- system ---------------------------------------------------------------------
    def ping(self, request: Request, exchange: Exchange) -> None:
        exchange.respond(200, b"OK", "text/plain; charset=utf-8", [
            ("Builder-Version", "2"),
            ("Docker-Experimental", "true"),
            ("Cache-Control", "no-cache, no-store, must-revalidate"),
            ("Pragma", "no-cache"),
        ])

    def version(self, request: Request, exchange: Exchange) -> None:
        kernel = platform.release()
        timers = self.config.timers()
        if not (request.header("user-agent") or "").startswith(OWN_USER_AGENT):
            # Go clients (the docker CLI, buildx, which asks before every build) decode a component's Details
            # as map[string]string: any other value fails the whole answer. The project's own clients get the
            # timers as an object.
            timers = json.dumps(timers, sort_keys=True)
        api_version, engine_version = self.config.api_version, self.config.engine_version
        details = {"ApiVersion": api_version, "Arch": go_arch(), "BuildTime": "", "Experimental": "true",
                   "GitCommit": "reference", "GoVersion": f"python{sys.version.split()[0]}",
                   "KernelVersion": kernel, "MinAPIVersion": MIN_API_VERSION, "Os": "linux"}
        exchange.json(200, {
            "Platform": {"Name": "docker-session-conformance reference daemon"},
            "Components": [
                {"Name": "Engine", "Version": engine_version, "Details": details},
                # the timers in effect, so a suite can judge this daemon's schedule by them
                {"Name": "reference-daemon", "Version": f"0.1.0 ({self.config.generation})",
                 "Details": {"Generation": self.config.generation, "Transport": self.config.transport,
                             "Timers": timers}},
            ],
            "Version": engine_version,
            "ApiVersion": api_version,
            "MinAPIVersion": MIN_API_VERSION,
            "GitCommit": "reference",
            "GoVersion": f"python{sys.version.split()[0]}",
            "Os": "linux",
            "Arch": go_arch(),
            "KernelVersion": kernel,
            "Experimental": True,
            "BuildTime": "",
        })

    def info(self, request: Request, exchange: Exchange) -> None:
        images = self.images.all_images()
        exchange.json(200, {
            "ID": "reference", "Containers": 0, "ContainersRunning": 0, "ContainersPaused": 0,
            "ContainersStopped": 0, "Images": len(images), "Driver": "reference", "DriverStatus": [],
            "OSType": "linux", "OperatingSystem": "docker-session-conformance reference daemon",
            "Architecture": platform.machine(), "KernelVersion": platform.release(),
            "ServerVersion": self.config.engine_version, "Name": platform.node(), "NCPU": os.cpu_count() or 1,
            "MemTotal": 0, "ExperimentalBuild": True, "DockerRootDir": "", "Labels": [],
            "Plugins": {"Volume": [], "Network": [], "Authorization": None, "Log": []},
            "RegistryConfig": {"IndexConfigs": {}, "InsecureRegistryCIDRs": [], "Mirrors": []},
            "SecurityOptions": [], "Warnings": None,
            # The docker CLI 20.10 prints a WARNING line for each of these that is false or missing; this daemon
            # runs no containers, so no resource control or network feature is missing from anything it runs.
            **dict.fromkeys(("MemoryLimit", "SwapLimit", "OomKillDisable", "CpuCfsQuota", "CpuCfsPeriod",
                             "CPUShares", "CPUSet", "IPv4Forwarding", "BridgeNfIptables", "BridgeNfIp6tables",
                             "KernelMemory", "PidsLimit"), True),
        })

    def system_df(self, request: Request, exchange: Exchange) -> None:
        images = [self.images.summary(image) for image in self.images.all_images()]
        exchange.json(200, {
            "LayersSize": self.images.layers_size(),
            "Images": images,
            "Containers": [],
            "Volumes": [],
            "BuildCache": self.cache.records(),
            "BuilderSize": 0,
        })

    def stats(self, request: Request, exchange: Exchange) -> None:
        """Not Engine API: what the reference daemon did, for tests."""
        with self.builder._records_lock:
            builds = [plain(r) for r in self.builder.records]
        exchange.json(200, {
            "builds": builds,
            "sessions_active": len(self.sessions.active()),
            "sessions_started": self.sessions.total_started,
            "requests": list(self.requests_seen),
            "threads": threading.active_count(),
            **({"grpc": self.grpc.stats()} if self.grpc is not None else {}),
        })

    # -- sessions and builds -------------------------------------------------------
    def session(self, request: Request, exchange: Exchange) -> None:
        self.sessions.handle(request, exchange)

    def build(self, request: Request, exchange: Exchange) -> None:
        try:
            options = BuildOptions.from_request(request)
        except BadRequest as exc:
            exchange.error(400, str(exc))
            return
        exchange.start_stream(200, "application/json")
        writer = ProgressWriter(exchange.write)
        record = self.builder.run(options, writer, exchange.client_gone)
        if not exchange.client_gone.is_set():
            exchange.end()
        elif record.error:
            log.info("build %s ended: %s", options.build_id, record.error)

    def build_prune(self, request: Request, exchange: Exchange) -> None:
        filters = _filters(request)
        older_than = None
        for value in filters.get("until", []):
            older_than = parse_duration(value)
            if older_than is None:
                exchange.error(400, f"invalid until filter {value!r}")
                return
        keep = request.param("keep-storage") or "0"
        try:
            keep_storage = int(float(keep))
        except ValueError:
            exchange.error(400, f"invalid keep-storage {keep!r}")
            return
        # "id": one regular expression matched against record IDs, as dockerd 20.10 and 26.1 take it (measured:
        # two values are refused with this message)
        ids = filters.get("id", [])
        if len(ids) > 1:
            exchange.error(400, "filters expect only one value")
            return
        try:
            id_pattern = re.compile(ids[0]) if ids else None
        except re.error as exc:
            exchange.error(400, f"invalid id filter {ids[0]!r}: {exc}")
            return
        deleted, reclaimed = self.cache.prune(
            all=request.flag("all"), older_than=older_than, keep_storage=keep_storage,
            selected=(lambda usage: bool(id_pattern.search(usage["id"]))) if id_pattern else (lambda usage: True))
        if request.flag("all") and older_than is None and not keep_storage and id_pattern is None:
            self.images.forget_steps()  # the COPY results are build cache too: the next build runs cold
        exchange.json(200, {"CachesDeleted": deleted or None, "SpaceReclaimed": reclaimed})

    def build_cancel(self, request: Request, exchange: Exchange) -> None:
        build_id = request.param("id", "") or ""
        if not build_id:
            exchange.error(400, "build ID not provided")
            return
        self.builder.cancel(build_id)
        exchange.respond(200, b"", None)

    # -- images -----------------------------------------------------------------------
    def images_list(self, request: Request, exchange: Exchange) -> None:
        exchange.json(200, [self.images.summary(image) for image in self.images.all_images()])

    def image_inspect(self, request: Request, exchange: Exchange, name: str) -> None:
        self._image_view(exchange, name, self.images.inspect)

    def image_history(self, request: Request, exchange: Exchange, name: str) -> None:
        self._image_view(exchange, name, self.images.history)

    def _image_view(self, exchange: Exchange, name: str, view) -> None:
        """``view(image)`` as JSON, or dockerd's 404 for a name that is no image."""
        try:
            image = self.images.get(name)
        except ImageNotFound as exc:
            exchange.error(404, str(exc))
            return
        exchange.json(200, view(image))

    def image_tag(self, request: Request, exchange: Exchange, name: str) -> None:
        repo, tag = request.param("repo") or "", request.param("tag") or ""
        try:
            image_id = self.images.resolve(name)
            self.images.tag(image_id, f"{repo}:{tag}" if tag else repo)
        except ImageNotFound as exc:
            exchange.error(404, str(exc))
            return
        except InvalidReference as exc:
            exchange.error(400, str(exc))
            return
        exchange.respond(201, b"", None)

    def image_save(self, request: Request, exchange: Exchange, name: str) -> None:
        self._save(exchange, [name])

    def images_save(self, request: Request, exchange: Exchange) -> None:
        self._save(exchange, request.params("names"))

    def _save(self, exchange: Exchange, names: list[str]) -> None:
        """``docker save``: every name is resolved before the first byte, so an unknown one is a plain 404.
        A name that is a tag records that tag; an id records none (as dockerd does)."""
        selection: dict[str, tuple] = {}
        try:
            for name in names:
                image = self.images.get(name)
                tags = selection.setdefault(image.id, (image, []))[1]
                try:
                    tag = normalize_tag(name)
                except InvalidReference:
                    continue
                if tag in self.images.tags_of(image.id) and tag not in tags:
                    tags.append(tag)
        except ImageNotFound as exc:
            exchange.error(404, str(exc))
            return
        exchange.start_stream(200, "application/x-tar")
        write_docker_archive(self.images, list(selection.values()), _ExchangeWriter(exchange))
        exchange.end()

    def image_delete(self, request: Request, exchange: Exchange, name: str) -> None:
        try:
            exchange.json(200, self.images.remove(name))
        except ImageNotFound as exc:
            exchange.error(404, str(exc))


class _ExchangeWriter:
    """A write-only file on a streamed response, for tarfile."""

    def __init__(self, exchange: Exchange):
        self.write = exchange.write


def _filters(request: Request) -> dict[str, list[str]]:
    text = request.param("filters")
    if not text:
        return {}
    try:
        raw = json.loads(text)
    except ValueError:
        return {}
    out: dict[str, list[str]] = {}
    for key, value in raw.items():
        if isinstance(value, dict):  # {"until": {"24h": true}}
            out[key] = [k for k, v in value.items() if v]
        elif isinstance(value, list):
            out[key] = [str(v) for v in value]
    return out


_DURATION_PART = re.compile(r"([0-9]*\.?[0-9]+)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float | None:
    """Go ``time.ParseDuration`` (``24h``, ``1h30m``) or a unix timestamp; seconds ago."""
    text = text.strip()
    if re.fullmatch(r"[0-9]+(\.[0-9]+)?", text):
        return max(0.0, time.time() - float(text))
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * _UNIT[match.group(2)]
        pos = match.end()
    return total if pos == len(text) and pos else None
