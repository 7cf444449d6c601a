"""The reference daemon's builds behind BuildKit's Control API (the backend of reference/daemon/control.py).

The builder's phases as the gateway calls come in, with the same context cache, step cache, image store and
build records as ``/build``:

* the frontend (``LLBBridge/Solve{Frontend: dockerfile.v0}``, or a ``Control/Solve`` naming it): the session is
  looked up, the Dockerfile and ``.dockerignore`` are transferred and planned, as BuildKit's Dockerfile frontend
  does before it answers;
* the solve, when the client returns the result (or asks for Evaluate): the context transfer and the steps;
* the export, by the Solve's exporter: ``moby`` into the image store (its ``name`` attribute: comma-separated
  tags), ``local`` and ``tar`` to the client over the session's FileSend.

Frontend options read: ``filename``, ``target``, ``build-arg:*``, ``label:*``, ``no-cache``; the others that buildx
and dockerd exchange (``image-resolve-mode``, ``platform``, ...) change nothing in a ``FROM scratch`` copy build.
"""

from __future__ import annotations

import os
import platform
import posixpath
import threading
import uuid
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp

from ..pb import control_pb2 as pb
from ..transport.base import RpcError, StatusCode
from .builder import BuildOptions, Builder, BuildState, Frontend, Plan, go_arch
from .cache import ContextCache
from .config import DaemonConfig
from .control import ExporterSpec, SolveJob
from .errors import BuildCancelled
from .images import ImageStore, InvalidReference, normalize_tag
from .progress import StatusEmitter

IMAGE_EXPORTERS = ("moby", "image")
CLIENT_EXPORTERS = ("local", "tar")
BUILDKIT_PACKAGE = "docker-session-conformance/reference-daemon"
# BuildKit's record filters: key, operator, value (containerd's syntax; buildx joins its --filter flags by commas)
FILTER_KEYS = {"id": "id", "type": "record_type", "description": "description"}

# x86-64 micro-architecture levels by the /proc/cpuinfo flags they need (as BuildKit's archutil probes them)
_AMD64_LEVELS = (
    ("v2", {"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"}),
    ("v3", {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}),
    ("v4", {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}),
)


@dataclass
class GatewayResult:
    """A frontend's result handed to the client by id; solved once returned (or evaluated)."""

    frontend: Frontend
    solved: bool = False


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def worker_platforms(cpu_levels: bool) -> list[pb.Platform]:
    """The platforms a worker lists: the host's (with its amd64 levels when asked), and 386 beside amd64."""
    arch = go_arch()
    platforms = [pb.Platform(Architecture=arch, OS="linux")]
    if arch == "amd64":
        if cpu_levels:
            flags = _cpu_flags()
            for level, needed in _AMD64_LEVELS:
                if not needed <= flags:
                    break
                platforms.append(pb.Platform(Architecture="amd64", OS="linux", Variant=level))
        platforms.append(pb.Platform(Architecture="386", OS="linux"))
    return platforms


def full_image_name(tag: str) -> str:
    """``app:1`` -> ``docker.io/library/app:1``, as an image exporter names what it tagged."""
    name = normalize_tag(tag)
    first, _, rest = name.partition("/")
    if not rest:
        return f"docker.io/library/{name}"
    if "." in first or ":" in first or first == "localhost":
        return name
    return f"docker.io/{name}"


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def record_filter(filters: list[str]):
    """A predicate over cache usage entries from BuildKit's filter strings (``type==source.local,id!=x``)."""
    terms = []
    for text in filters:
        for term in filter(None, (part.strip() for part in text.split(","))):
            for operator in ("==", "!=", "~=", "="):
                key, found, value = term.partition(operator)
                if found:
                    break
            else:
                raise RpcError(StatusCode.INVALID_ARGUMENT, f"invalid filter {term!r}: no operator")
            field = FILTER_KEYS.get(key.strip())
            if field is None:
                raise RpcError(StatusCode.INVALID_ARGUMENT, f"filter {term!r}: this daemon filters by "
                                                           f"{', '.join(sorted(FILTER_KEYS))}")
            terms.append((field, operator, value.strip()))

    def selected(usage: dict) -> bool:
        for field, operator, value in terms:
            actual = str(usage[field])
            matched = value in actual if operator == "~=" else actual == value
            if matched == (operator == "!="):
                return False
        return True
    return selected


class BuilderBackend:
    """Control API builds on the reference daemon's :class:`Builder`."""

    exporter_types = IMAGE_EXPORTERS + CLIENT_EXPORTERS

    def __init__(self, config: DaemonConfig, builder: Builder, cache: ContextCache, images: ImageStore):
        self.config = config
        self.builder = builder
        self.cache = cache
        self.images = images
        profile = config.profile
        # dockerd 26.1 names its worker with a UUID kept in its root: one per --root here too
        worker_id = profile.worker_id or str(uuid.uuid5(uuid.NAMESPACE_URL, f"file://{config.root}"))
        self._worker = pb.WorkerRecord(ID=worker_id, platforms=worker_platforms(profile.worker_cpu_levels))
        if profile.buildkit_version:
            self._worker.BuildkitVersion.CopyFrom(self.buildkit_version())
        self._lock = threading.Lock()

    # -- what the daemon is -------------------------------------------------------------------
    def workers(self) -> list[pb.WorkerRecord]:
        return [self._worker]

    def buildkit_version(self) -> pb.BuildkitVersion | None:
        version = self.config.profile.buildkit_version
        if not version:
            return None
        return pb.BuildkitVersion(package=BUILDKIT_PACKAGE, version=version, revision=platform.python_version())

    # -- builds ---------------------------------------------------------------------------------
    def build_options(self, job: SolveJob, options: dict[str, str]) -> BuildOptions:
        """The builder's options from the frontend's and the exporter's attributes."""
        exporter = job.exporters[0] if job.exporters else None
        tags: list[str] = []
        if exporter is None:
            output = {"Type": "cacheonly", "Attrs": {}}
        elif exporter.type in IMAGE_EXPORTERS:
            output, tags = None, self._tags(exporter)
        else:
            output = {"Type": exporter.type, "Attrs": {}}
        filename = options.get("filename") or "Dockerfile"
        # a path inside the Dockerfile's directory, as BuildKit joins it to "/"
        name = posixpath.normpath("/" + filename).lstrip("/") or "Dockerfile"
        return BuildOptions(
            version="2", session_id=job.session_id, remote="client-session", dockerfile_name=name, tags=tags,
            build_args={k[len("build-arg:"):]: v for k, v in options.items() if k.startswith("build-arg:")},
            labels={k[len("label:"):]: v for k, v in options.items() if k.startswith("label:")},
            output=output, target=options.get("target") or None, build_id=job.ref,
            no_cache="no-cache" in options,  # "" (every stage) or stage names: either way nothing is reused
        )

    @staticmethod
    def _tags(exporter: ExporterSpec) -> list[str]:
        tags = [t.strip() for t in exporter.attrs.get("name", "").split(",") if t.strip()]
        for tag in tags:
            try:
                normalize_tag(tag)
            except InvalidReference as exc:
                raise RpcError(StatusCode.UNKNOWN, str(exc)) from None
        return tags

    def _state(self, job: SolveJob) -> BuildState:
        """The job's build, begun (recorded, its directory made) at its first frontend or export."""
        with job.lock:
            if job.backend_state is None:
                state = self.builder.begin(self.build_options(job, {}), job.cancelled, entry="/grpc")
                state.trace = StatusEmitter(job.status.publish, job.ref)
                job.backend_state = state
                os.makedirs(state.rootfs, mode=0o755)
            return job.backend_state

    def _failed(self, job: SolveJob, state: BuildState, exc: Exception) -> RpcError:
        if isinstance(exc, RpcError):
            state.record.error = exc.details
            return exc
        message = self.builder.failure(state, exc)
        if isinstance(exc, BuildCancelled) or job.cancelled.is_set():
            return RpcError(StatusCode.CANCELLED, message)
        return RpcError(StatusCode.UNKNOWN, message)

    def frontend(self, job: SolveJob, frontend: str, options: dict[str, str]) -> GatewayResult:
        state = self._state(job)
        try:
            return GatewayResult(self.builder.load_frontend(state, self.build_options(job, options)))
        except Exception as exc:
            raise self._failed(job, state, exc) from None

    def _use_cache(self, job: SolveJob, frontend: Frontend) -> bool:
        # exports need the whole tree on disk; an image only needs the layers, so steps may be cached
        exporter = job.exporters[0] if job.exporters else None
        return (exporter is None or exporter.type in IMAGE_EXPORTERS) and not frontend.options.no_cache

    def evaluate(self, job: SolveJob, result: GatewayResult) -> None:
        state = self._state(job)
        try:
            self.builder.solve(state, result.frontend, use_cache=self._use_cache(job, result.frontend))
            result.solved = True
        except Exception as exc:
            raise self._failed(job, state, exc) from None

    def export(self, job: SolveJob, result: GatewayResult | None) -> dict[str, str]:
        if result is None and not job.exporters:
            return {}  # buildx's capability probes
        state = self._state(job)
        try:
            if result is None:  # nothing returned: an empty tree or image is exported
                frontend = Frontend(self.build_options(job, {}), Plan([], [], {}, "/", []), [])
            else:
                frontend = result.frontend
                if not result.solved:
                    self.builder.solve(state, frontend, use_cache=self._use_cache(job, frontend))
                    result.solved = True
            if not job.exporters:
                return {}
            exporter = job.exporters[0]
            if exporter.type in CLIENT_EXPORTERS:
                if state.session is None:
                    state.session = self.builder.sessions.get(job.session_id, cancelled=job.cancelled)
                profile = self.config.profile
                vertex = profile.export_vertex_local if exporter.type == "local" else profile.export_vertex_tar
                # buildx puts "failed to solve: " before a Solve's error itself
                self.builder.export_to_client(state, exporter.type, vertex, error_prefix="")
                return {}
            image_id = self.builder.export_image(state, frontend, frontend.options.tags)
            return self._image_response(image_id, frontend.options.tags)
        except Exception as exc:
            raise self._failed(job, state, exc) from None

    def _image_response(self, image_id: str, tags: list[str]) -> dict[str, str]:
        values = {"containerimage.config.digest": image_id, "containerimage.digest": image_id}
        if tags:
            values["image.name"] = ",".join(full_image_name(tag) for tag in tags)
        return {key: values[key] for key in self.config.profile.image_exporter_response if key in values}

    def finish(self, job: SolveJob, error: str | None) -> None:
        state = job.backend_state
        if state is None:
            return  # a probe: nothing was begun
        if error is not None and not state.record.error:
            state.record.error = error
        self.builder.end(state)
        self.builder.collect_garbage()

    # -- build cache ----------------------------------------------------------------------------
    @staticmethod
    def _usage_record(usage: dict) -> pb.UsageRecord:
        return pb.UsageRecord(
            ID=usage["id"], Mutable=True, InUse=usage["in_use"], Size=usage["size"],
            CreatedAt=_timestamp(usage["created_at"]), LastUsedAt=_timestamp(usage["last_used_at"]),
            UsageCount=usage["usage_count"], Description=usage["description"], RecordType=usage["record_type"])

    def disk_usage(self, filters: list[str]) -> list[pb.UsageRecord]:
        selected = record_filter(filters)
        return [self._usage_record(usage) for usage in self.cache.usage() if selected(usage)]

    def prune(self, request: pb.PruneRequest) -> list[pb.UsageRecord]:
        filters = [f for f in request.filter if f]
        selected = record_filter(filters)
        older_than = request.keepDuration / 1e9 if request.keepDuration > 0 else None
        with self._lock:
            deleted = self.cache.prune_usage(older_than=older_than, keep_storage=max(0, request.keepBytes),
                                             selected=selected)
            if request.all and not filters and older_than is None and request.keepBytes <= 0:
                self.images.forget_steps()  # the COPY results are build cache too: the next build runs cold
        return [self._usage_record(usage) for usage in deleted]
