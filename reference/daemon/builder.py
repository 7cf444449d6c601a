"""Build execution: the ``/build`` request from session lookup to exported result.

BuildKit path (``version=2&remote=client-session``), transfers in dockerd's
order and with its metadata: the ``dockerfile`` directory (followpaths
``[name, name.dockerignore, "dockerfile" if name is "Dockerfile"]``), then
``.dockerignore`` from ``context``, then ``context`` with ``exclude-patterns``.
Generation n+1 (dockerd 26.1) differs on the wire: metadata values of a key
are percent-encoded when one is non-ASCII, every FileSync and FileSend call
carries a ``traceparent`` (FileSend also ``buildkit-attachable-exporter-id``),
the Dockerfile and ``.dockerignore`` transfers have no diff base, and errors
lack the ``failed to solve with frontend dockerfile.v0:`` prefix.
The 2017 path (``version=1``) takes the Dockerfile from the request body and
syncs one unnamed directory.  Steps run into a root filesystem under
``<root>/tmp``; the result is an image in the store, or an export to the
client.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import posixpath
import threading
import time
from dataclasses import dataclass, field

from .. import filemode
from .. import metadata as wire_md
from ..applier import remove_tree
from ..plain import plain
from ..walker import WalkError
from . import dockerfile as dfp
from . import export, filesync
from .cache import ContextCache, Lease
from .config import DaemonConfig, GenerationProfile
from .errors import BuildCancelled, BuildError, Redactor
from .httpserver import ClientGone
from .fsops import (Copier, FsError, SourceLinks, clean, extract_layer, resolve_in_root, source_digest,
                    write_layer)
from .images import ImageStore, InvalidReference, normalize_tag, rfc3339_now
from .listing import TreeListing
from .progress import ProgressWriter, TraceEmitter, VertexProgress
from .sessions import Session, SessionManager

log = logging.getLogger("reference.daemon.builder")

DEFAULT_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_DOCKERFILE = 4 << 20


class BadRequest(Exception):
    """The /build request itself is invalid (HTTP 400 before anything runs)."""


def go_arch() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386", "i386": "386"}.get(machine, machine)


@dataclass
class BuildOptions:
    version: str
    session_id: str
    remote: str
    dockerfile_name: str
    tags: list[str]
    build_args: dict[str, str | None]
    labels: dict[str, str]
    output: dict | None  # {"Type": ..., "Attrs": {...}}
    target: str | None
    build_id: str
    dockerfile_body: bytes = b""
    quiet: bool = False  # q=1: the image id alone, as a stream line (dockerd's postBuild)
    no_cache: bool = False

    @classmethod
    def from_request(cls, request) -> "BuildOptions":
        version = request.param("version", "1") or "1"
        remote = request.param("remote", "") or ""
        if version not in ("1", "2"):
            raise BadRequest(f"unsupported builder version {version!r}")
        if not remote:  # the context is the request body: the classic builder (DOCKER_BUILDKIT=0) or an upload
            kind = "the classic builder (DOCKER_BUILDKIT=0)" if version == "1" else "a build whose context is the body"
            raise BadRequest(f"not supported by the reference daemon: {kind}; it builds with BuildKit over a client "
                             f"session (DOCKER_BUILDKIT=1 docker build, or docker buildx build)")
        if remote != "client-session":
            raise BadRequest(f"remote {remote!r} is not supported by this daemon (use a client session)")
        session_id = request.param("session", "") or ""
        if not session_id:
            raise BadRequest("a client session build needs the session parameter")
        tags = request.params("t")
        for tag in tags:
            try:
                normalize_tag(tag)
            except InvalidReference as exc:
                raise BadRequest(str(exc)) from None
        build_args = _json_param(request, "buildargs", {})
        labels = _json_param(request, "labels", {})
        outputs = _json_param(request, "outputs", [])
        if not isinstance(outputs, list) or len(outputs) > 1:
            raise BadRequest("multiple outputs not supported")
        output = outputs[0] if outputs else None
        if output is not None:
            kind = output.get("Type") if isinstance(output, dict) else None
            if kind not in ("local", "tar", "image", "moby", "cacheonly"):
                raise BadRequest(f"unsupported output type {kind!r} (local, tar, image)")
            if kind in ("image", "moby"):
                output = None
        name = request.param("dockerfile", "") or "Dockerfile"
        return cls(version, session_id, remote, posixpath.basename(name) if version == "2" else name, tags,
                   build_args, labels, output, request.param("target") or None,
                   request.param("buildid", "") or "", request.body, request.flag("q"),
                   request.flag("nocache"))


def _json_param(request, name: str, default):
    text = request.param(name)
    if not text:
        return default
    try:
        return json.loads(text)
    except ValueError:
        raise BadRequest(f"invalid {name} parameter: not JSON") from None


@dataclass
class BuildRecord:
    build_id: str
    session_id: str
    version: str
    protocol: str = ""
    streams: list[dict] = field(default_factory=list)
    export: dict | None = None
    image_id: str | None = None
    error: str = ""
    started_at: float = field(default_factory=time.time)
    seconds: float = 0.0
    entry: str = "/build"  # the Engine API route that started it: /build, or /grpc (BuildKit's Control API)


@dataclass
class Step:
    text: str  # as shown in the vertex name, e.g. "COPY . /"
    kind: str  # COPY | WORKDIR
    sources: list[str] = field(default_factory=list)
    dest: str = ""
    workdir: str = "/"
    chown: tuple[int, int] | None = None


@dataclass
class Plan:
    steps: list[Step]
    env: list[str]
    labels: dict[str, str]
    workdir: str
    history: list[dict]
    base: str = "scratch"
    workdir_set: bool = False


@dataclass
class BaseImage:
    """A pulled base image: its layers (registered in the image store) and config."""

    reference: str
    digest: str
    layers: list[dict]
    config: dict


EXPORTER_ID = "buildkit-attachable-exporter-id"


class CallMetadata:
    """The metadata a generation puts on the calls of one build, beyond the transfer's options:
    BuildKit 0.12+ percent-encodes a key's values when one is non-ASCII (reference.metadata), and 0.13
    adds a W3C traceparent (one trace per build, a new span per call; never on Health) and, on FileSend,
    the index of the exporter."""

    def __init__(self, profile: GenerationProfile):
        self.profile = profile
        self.trace_id = os.urandom(16).hex()

    def _trace(self) -> list[tuple[str, str]]:
        if not self.profile.traceparent:
            return []
        return [("traceparent", f"00-{self.trace_id}-{os.urandom(8).hex()}-01")]

    def filesync(self, request: filesync.SyncRequest) -> list[tuple[str, str]]:
        pairs = request.metadata()
        if self.profile.encode_metadata:
            by_key: dict[str, list[str]] = {}
            for key, value in pairs:
                by_key.setdefault(key, []).append(value)
            pairs = [(key, value) for key, values in wire_md.encode(by_key).items() for value in values]
        return pairs + self._trace()

    def filesend(self, exporter_index: int = 0) -> list[tuple[str, str]]:
        pairs = [(EXPORTER_ID, str(exporter_index))] if self.profile.exporter_id else []
        return pairs + self._trace()


def _every_file_changed(diff_base: list) -> list:
    """A diff base against which nothing but directories is unchanged: BuildKit's ``local.differ: none``
    (fsutil's sameFile is always false), so every listed file is requested while deletions still happen."""
    out = []
    for key, fields in diff_base:
        if not fields[1] & filemode.MODE_DIR:
            fields = (*fields[:4], -1, *fields[5:])  # no real size is -1
        out.append((key, fields))
    return out


def _remove_build_dir(path: str) -> None:
    """A build's directory holds the client's tree as deep as it came: remove it without recursion."""
    try:
        remove_tree(path)
    except OSError as exc:
        log.warning("could not remove build directory %s: %s", path, exc)


@dataclass
class Frontend:
    """What the Dockerfile frontend made of one request: the plan and the context's exclusions
    (BuildKit's frontend answer, before anything of the context has been transferred)."""

    options: BuildOptions
    plan: Plan
    excludes: list[str]


@dataclass
class BuildState:
    """One build between its phases: the frontend (Dockerfile and .dockerignore), the solve
    (context, base image, steps) and the export. ``/build`` runs the phases in one go; the
    Control API (reference/daemon/control.py) runs them as the gateway calls arrive."""

    options: BuildOptions
    record: BuildRecord
    cancelled: threading.Event
    workdir: str
    started: float = field(default_factory=time.monotonic)
    leases: list[Lease] = field(default_factory=list)
    trace: TraceEmitter | None = None
    calls: CallMetadata | None = None
    session: Session | None = None
    protocol: str = ""
    # the solve's result
    layers: list[dict] = field(default_factory=list)
    base: BaseImage | None = None
    previous: list[str] = field(default_factory=list)  # digest of the last step's vertex

    @property
    def rootfs(self) -> str:
        return os.path.join(self.workdir, "rootfs")


class Builder:
    def __init__(self, config: DaemonConfig, sessions: SessionManager, cache: ContextCache, images: ImageStore):
        self.config = config
        self.sessions = sessions
        self.cache = cache
        self.images = images
        self.redact = Redactor(config.root)
        self.records: list[BuildRecord] = []
        self._records_lock = threading.Lock()
        self._running: dict[str, threading.Event] = {}
        self._stats_log = config.path("stats.jsonl")

    # -- cancel -----------------------------------------------------------------
    def cancel(self, build_id: str) -> bool:
        with self._records_lock:
            event = self._running.get(build_id)
        if event is None:
            return False
        event.set()
        return True

    # -- a build's life ---------------------------------------------------------
    def begin(self, options: BuildOptions, cancelled: threading.Event, *, entry: str = "/build") -> BuildState:
        """Register a build (its record, its cancel event under its id) and name its directory."""
        record = BuildRecord(options.build_id, options.session_id, options.version, entry=entry)
        if options.build_id:
            with self._records_lock:
                self._running[options.build_id] = cancelled
        workdir = self.config.path("tmp", hashlib.sha256(os.urandom(16)).hexdigest()[:16])
        return BuildState(options, record, cancelled, workdir)

    def end(self, state: BuildState) -> None:
        """Release what the build holds and store its record (before the client learns the outcome)."""
        for lease in state.leases:
            lease.release()
        # removing a large tree takes seconds: not on the client's time
        threading.Thread(target=_remove_build_dir, args=(state.workdir,), name="build-cleanup", daemon=True).start()
        record = state.record
        record.seconds = time.monotonic() - state.started
        with self._records_lock:
            if self._running.get(state.options.build_id) is state.cancelled:
                self._running.pop(state.options.build_id, None)
            self.records.append(record)
            del self.records[:-200]
        self._log_record(record)

    def failure(self, state: BuildState, exc: BaseException) -> str:
        """The message a failed build reports (redacted), recorded on its record."""
        if isinstance(exc, BuildError):
            message = self.redact(str(exc))
        else:  # a bug: still end the build with a message
            log.error("build %s failed", state.options.build_id, exc_info=exc)
            message = self.redact(f"internal error: {exc}")
        state.record.error = message
        return message

    def collect_garbage(self) -> None:
        try:
            self.cache.gc()
        except OSError:
            log.exception("cache gc failed")

    # -- entry point ------------------------------------------------------------
    def run(self, options: BuildOptions, writer: ProgressWriter, cancelled: threading.Event) -> BuildRecord:
        state = self.begin(options, cancelled)
        record = state.record
        error = None
        try:
            os.makedirs(state.rootfs, mode=0o755)
            if options.version == "2":
                self._run_v2(state, writer)
            else:
                self._run_v1(options, writer, cancelled, record, state.workdir, state.leases)
        except ClientGone:
            record.error = "the client went away"
            cancelled.set()
        except Exception as exc:
            error = self.failure(state, exc)
        finally:
            self.end(state)
        # the record is stored before the client learns the outcome
        if error is not None:
            try:
                writer.error(error)
            except ClientGone:
                pass
        self.collect_garbage()
        return record

    def _log_record(self, record: BuildRecord) -> None:
        try:
            with open(self._stats_log, "a") as fh:
                fh.write(json.dumps(plain(record)) + "\n")
        except OSError:
            pass

    # -- BuildKit path ----------------------------------------------------------
    def _run_v2(self, state: BuildState, writer: ProgressWriter) -> None:
        options = state.options
        state.trace = TraceEmitter(writer, options.build_id or os.urandom(8).hex())
        frontend = self.load_frontend(state, options)
        # exports need the whole tree on disk; an image only needs the layers, so steps may be cached
        self.solve(state, frontend, use_cache=options.output is None and not options.no_cache)
        if options.output is not None and options.output.get("Type") in ("local", "tar"):
            self.export_to_client(state, options.output["Type"], "exporting to client")
            return
        if options.output is not None:  # cacheonly: nothing to export
            return
        image_id = self.export_image(state, frontend, options.tags)
        writer.aux("moby.image.id", {"ID": image_id})
        if options.quiet:
            writer.stream(image_id + "\n")

    def _calls(self, state: BuildState) -> CallMetadata:
        if state.calls is None:
            state.calls = CallMetadata(self.config.profile)
        return state.calls

    def load_frontend(self, state: BuildState, options: BuildOptions) -> Frontend:
        """The Dockerfile and .dockerignore transfers and the plan: what BuildKit's Dockerfile frontend does
        before it hands back its result (the session is looked up here, waiting for it as BuildKit does)."""
        trace, cancelled, record, leases = state.trace, state.cancelled, state.record, state.leases
        profile = self.config.profile
        prefix = profile.frontend_error_prefix  # dockerd 20.10's wording; 26.1 has none
        calls = self._calls(state)
        name = options.dockerfile_name
        vertex = trace.vertex(f"[internal] load build definition from {name}").start()
        try:
            if state.session is None:
                state.session = self.sessions.get(options.session_id, cancelled=cancelled)
                state.protocol = filesync.negotiate(state.session, self.config.protocols,
                                                    self.config.forced_protocol)
                record.protocol = state.protocol
            session, protocol = state.session, state.protocol
            followpaths = [name, name + ".dockerignore"] + (["dockerfile"] if name == "Dockerfile" else [])
            df_lease = self._acquire(session, "dockerfile", "dockerfile", leases)
            df_request = filesync.SyncRequest("dockerfile", followpaths=followpaths)
            self._sync(session, protocol, df_request, df_lease, vertex, "dockerfile", cancelled, record,
                       wire=calls.filesync(df_request), incremental=profile.incremental_dockerfile)
            text = _read_small(df_lease.tree, name, "Dockerfile", required=True)
            override_ignore = _read_small(df_lease.tree, name + ".dockerignore", ".dockerignore")
            vertex.done()
        except BuildError as exc:
            vertex.fail(self.redact(str(exc)))
            raise BuildError(f"{prefix}failed to read dockerfile: {exc}") from None

        # Only once the Dockerfile's transfer has ended, as dockerd 20.10.24 does (protocol-notes §10).
        # dockerd 26.1 skips the context's .dockerignore when the Dockerfile's own one exists.
        vertex = trace.vertex("[internal] load .dockerignore").start()
        ignore_lease = None
        try:
            if override_ignore is None or profile.probe_ignored_dockerignore:
                ignore_lease = self._acquire(session, "context", "context-.dockerignore", leases)
                ignore_request = filesync.SyncRequest("context", followpaths=[".dockerignore"])
                self._sync(session, protocol, ignore_request, ignore_lease, vertex, "context", cancelled, record,
                           wire=calls.filesync(ignore_request), incremental=profile.incremental_dockerfile)
            ignore = override_ignore if override_ignore is not None else _read_small(
                ignore_lease.tree, ".dockerignore", ".dockerignore")
            excludes = parse_dockerignore(ignore) if ignore is not None else []
            vertex.done()
        except BuildError as exc:
            vertex.fail(self.redact(str(exc)))
            raise BuildError(f"{prefix}failed to read .dockerignore: {exc}") from None
        for lease in (df_lease, ignore_lease):
            if lease is not None:
                lease.release()

        try:
            plan = plan_build(text.decode("utf-8", "replace"), options)
        except dfp.DockerfileError as exc:
            raise BuildError(f"{prefix}failed to create LLB definition: {exc}") from None
        return Frontend(options, plan, excludes)

    def solve(self, state: BuildState, frontend: Frontend, *, use_cache: bool) -> None:
        """The context transfer (only when a step copies from it), the base image and the steps, into
        ``state.rootfs``; the layers land in ``state.layers``."""
        trace, cancelled, record, leases = state.trace, state.cancelled, state.record, state.leases
        session, protocol, plan = state.session, state.protocol, frontend.plan
        prefix = self.config.profile.frontend_error_prefix
        calls = self._calls(state)
        context_tree = context_listing = None
        if any(step.kind == "COPY" for step in plan.steps):
            vertex = trace.vertex("[internal] load build context").start()
            try:
                context_lease = self._acquire(session, "context", "context", leases)
                context_request = filesync.SyncRequest("context", exclude_patterns=frontend.excludes)
                self._sync(session, protocol, context_request, context_lease, vertex, "context", cancelled, record,
                           wire=calls.filesync(context_request))
                context_tree = context_lease.tree
                context_listing = context_lease.listing()
                vertex.done()
            except BuildError as exc:
                vertex.fail(self.redact(str(exc)))
                raise BuildError(f"{prefix}failed to load build context: {exc}") from None

        rootfs = state.rootfs
        base = None
        if plan.base.lower() != "scratch":
            vertex = trace.vertex(f"[internal] load metadata for {plan.base}").start()
            try:
                base = self._pull_base(plan.base, session, rootfs, state.workdir)
                vertex.done()
            except BuildError as exc:
                vertex.fail(self.redact(str(exc)))
                raise BuildError(f"{prefix}failed to create LLB definition: {exc}") from None
        runner = StepRunner(self, context_tree, rootfs, state.workdir, use_cache=use_cache, base=base,
                            context_listing=context_listing)
        previous = []
        for index, step in enumerate(plan.steps, 1):
            vertex = trace.vertex(f"[{index}/{len(plan.steps)}] {step.text}", previous).start()
            try:
                _check(session, cancelled)
                cached = runner.run(index, step)
                vertex.done(cached=cached)
            except (BuildError, FsError) as exc:
                vertex.fail(self.redact(str(exc)))
                raise BuildError(f"{prefix}failed to build: {exc}") from None
            previous = [vertex.digest]
        state.layers, state.base, state.previous = runner.layers, base, previous

    def export_to_client(self, state: BuildState, kind: str, vertex_name: str, *,
                         error_prefix: str = "failed to solve: ") -> None:
        """``state.rootfs`` to the client over FileSend: ``local`` (a tree) or ``tar``."""
        session, cancelled = state.session, state.cancelled
        vertex = state.trace.vertex(vertex_name, state.previous).start()
        try:
            _check(session, cancelled)
            run = export.export_local if kind == "local" else export.export_tar
            result = run(session, state.rootfs, cancelled=cancelled, stall_timeout=self.config.stall_timeout,
                         progress=lambda n: vertex.status("copying files", n),
                         metadata=self._calls(state).filesend(0))
            state.record.export = plain(result)
            vertex.done()
        except BuildError as exc:
            vertex.fail(self.redact(str(exc)))
            raise BuildError(f"{error_prefix}{exc}") from None

    def export_image(self, state: BuildState, frontend: Frontend, tags: list[str]) -> str:
        """The image into the store, tagged; returns its id (the config's digest)."""
        vertex = state.trace.vertex("exporting to image", state.previous).start()
        vertex.status("exporting layers", 0, completed=True)
        image_id = self._commit(frontend.plan, state.layers, frontend.options, state.base)
        vertex.status(f"writing image {image_id}", 0, completed=True)
        for tag in tags:
            self.images.tag(image_id, tag)
            vertex.status(f"naming to docker.io/library/{normalize_tag(tag)}"
                          if "/" not in tag else f"naming to {normalize_tag(tag)}", 0, completed=True)
        vertex.done()
        state.record.image_id = image_id
        return image_id

    def _pull_base(self, reference: str, session: Session, rootfs: str, workdir: str) -> BaseImage:
        """Pull the base image into ``rootfs``, resolving registry auth through the session."""
        from . import registry

        authorizer = registry.SessionAuthorizer(
            lambda method, request: session.conn.unary(method, request, timeout=60.0),
            registry.daemon_salt(), session_id=session.id, token_authority=self.config.profile.token_authority)
        try:
            config = registry.pull_image(reference, rootfs, authorizer, save_layers_to=workdir)
        except registry.RegistryError as exc:
            raise BuildError(str(exc)) from None
        layers = []
        for tar_path, diff_id in zip(config.pop("_layer_tars"), config["rootfs"]["diff_ids"]):
            size = os.path.getsize(tar_path)
            self.images.add_layer(tar_path, diff_id)  # moves the tar into the store
            layers.append({"step": f"FROM {reference}", "diff_id": diff_id, "size": size})
        return BaseImage(reference, config.pop("_digest", ""), layers, config)

    def _acquire(self, session: Session, dir_name: str, purpose: str, leases: list[Lease]) -> Lease:
        lease = self.cache.acquire(session.shared_key, dir_name, purpose)
        leases.append(lease)
        return lease

    def _sync(self, session, protocol, request, lease, vertex: VertexProgress | None, label, cancelled, record,
              *, wire: list[tuple[str, str]] | None = None, incremental: bool = True) -> None:
        status = f"transferring {label}:"
        try:
            # the entry's kept listing is the diff base: an unchanged tree is not walked again
            previous = lease.listing().diff_base() if protocol == "diffcopy" else None
            if previous is not None and not incremental:
                previous = _every_file_changed(previous)
            result = filesync.sync(
                session, protocol, request, lease.tree, cancelled=cancelled,
                stall_timeout=self.config.stall_timeout,
                progress=(lambda n: vertex.status(status, n)) if vertex is not None else None,
                previous=previous, on_change=lease.begin_sync, wire_metadata=wire,
                limits=filesync.config_limits(self.config),  # DaemonConfig's receiver limits (issue 15)
                min_free_disk=self.config.min_free_disk,
            )
            if result.changed or not lease.complete:
                lease.sync_complete()
        except WalkError as exc:
            raise BuildError(self.redact(f"cannot list the cached {label}: {exc}")) from None
        except BuildError as exc:
            record.streams.append({"dir_name": request.dir_name, "protocol": protocol,
                                   "metadata": wire or request.metadata(), "error": self.redact(str(exc))})
            raise BuildError(self.redact(str(exc))) from None
        record.streams.append(plain(result))
        if vertex is not None:
            vertex.status(status, result.bytes_received, completed=True)

    def _run_step(self, step: Step, context_tree: str | None, rootfs: str, workdir: str, index: int,
                  links: SourceLinks | None = None) -> dict:
        copier = Copier(context_tree or rootfs, rootfs, step.chown, links if context_tree else None)
        try:
            if step.kind == "COPY":
                copier.copy(step.sources, step.dest, step.workdir)
            else:
                copier.mkdir_all(step.dest)
        except FsError:
            raise
        except OSError as exc:
            raise BuildError(f"{step.text}: {exc.strerror or exc}") from None
        if not copier.changed:
            return {"step": step.text, "diff_id": None, "size": 0}
        tar_path = os.path.join(workdir, f"layer-{index}.tar")
        diff_id, size = write_layer(rootfs, copier.changed, tar_path)
        self.images.add_layer(tar_path, diff_id)
        return {"step": step.text, "diff_id": diff_id, "size": size}

    def _commit(self, plan: Plan, layers: list[dict], options: BuildOptions, base: BaseImage | None = None) -> str:
        diff_ids = [layer["diff_id"] for layer in layers if layer["diff_id"]]
        base_config = dict((base.config.get("config") or {}) if base else {})
        image_config: dict = base_config
        base_env = base_config.get("Env") or []
        ours = plan.env
        if any(e.startswith("PATH=") for e in base_env):  # the scratch default must not hide the base's PATH
            ours = [e for e in ours if e != DEFAULT_PATH_ENV]
        image_config["Env"] = _merge_env(base_env, ours)
        if plan.workdir_set or (plan.workdir != "/" and not base_config.get("WorkingDir")):
            image_config["WorkingDir"] = plan.workdir
        if base is not None:
            layers = layers[len(base.layers):]
        labels = dict(image_config.get("Labels") or {})
        labels.update(plan.labels)
        labels.update({k: v for k, v in options.labels.items() if isinstance(v, str)})
        if labels:
            image_config["Labels"] = labels
        history = list(base.config.get("history") or []) if base else []
        base_history = len(history)
        layer_iter = iter(layers)
        for entry in plan.history:
            item = {"created_by": entry["created_by"], "comment": "buildkit.dockerfile.v0"}
            if entry["layer"]:
                layer = next(layer_iter)
                if not layer["diff_id"]:
                    item["empty_layer"] = True
            else:
                item["empty_layer"] = True
            history.append(item)
        config = {
            "architecture": go_arch(),
            "os": "linux",
            "config": image_config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": history,
        }
        build_key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
        created = rfc3339_now()
        config["created"] = created
        for item in history[base_history:]:
            item["created"] = created
        return self.images.add_image(config, build_key)

    # -- 2017 path -------------------------------------------------------------
    def _run_v1(self, options, writer, cancelled, record, workdir, leases) -> None:
        if len(options.dockerfile_body) > MAX_DOCKERFILE:
            raise BuildError("the Dockerfile in the request body is too large")
        try:
            plan = plan_build(options.dockerfile_body.decode("utf-8", "replace"), options)
        except dfp.DockerfileError as exc:
            raise BuildError(str(exc)) from None
        session = self.sessions.get(options.session_id, cancelled=cancelled)
        protocol = filesync.negotiate(session, self.config.protocols, self.config.forced_protocol)
        record.protocol = protocol
        say = (lambda text: None) if options.quiet else writer.stream
        say("Sending build context to Docker daemon over the client session\n")
        lease = self._acquire(session, "", "legacy", leases)
        self._sync(session, protocol, filesync.SyncRequest(None), lease, None, "context", cancelled, record)
        rootfs = os.path.join(workdir, "rootfs")
        base = None
        if plan.base.lower() != "scratch":
            say(f"Pulling {plan.base}\n")
            base = self._pull_base(plan.base, session, rootfs, workdir)
        runner = StepRunner(self, lease.tree, rootfs, workdir, use_cache=not options.no_cache, base=base,
                            context_listing=lease.listing())
        total = len(plan.history)
        steps = iter(plan.steps)
        for index, entry in enumerate(plan.history, 1):
            say(f"Step {index}/{total} : {entry['created_by']}\n")
            if entry["layer"]:
                step = next(steps)
                _check(session, cancelled)
                try:
                    if runner.run(index, step):
                        say(" ---> Using cache\n")
                except FsError as exc:
                    raise BuildError(str(exc)) from None
        image_id = self._commit(plan, runner.layers, options, base)
        record.image_id = image_id
        writer.aux(None, {"ID": image_id})
        for tag in options.tags:
            self.images.tag(image_id, tag)
        if options.quiet:
            writer.stream(image_id + "\n")
            return
        writer.stream(f"Successfully built {image_id.split(':', 1)[1][:12]}\n")
        for tag in options.tags:
            writer.stream(f"Successfully tagged {normalize_tag(tag)}\n")


class StepRunner:
    """Runs a stage's steps into ``rootfs``; with ``use_cache`` a step whose inputs are
    unchanged reuses its earlier layer (BuildKit's CACHED) and the tree is rebuilt
    from layers only when a later step has to run for real."""

    def __init__(self, builder: "Builder", context_tree: str | None, rootfs: str, workdir: str, *, use_cache: bool,
                 base: BaseImage | None = None, context_listing: TreeListing | None = None):
        self.builder = builder
        self.context_tree = context_tree
        self.context_listing = context_listing
        # COPY hardlinks files from the context (leased until the build ends) instead of copying them
        self.links = SourceLinks(context_listing.multi_named()) if context_listing is not None else None
        self.rootfs = rootfs
        self.workdir = workdir
        self.use_cache = use_cache
        # a base image is already applied to ``rootfs`` by the pull
        self.layers: list[dict] = list(base.layers) if base else []
        self._in_rootfs = len(self.layers)  # how many of ``layers`` the tree on disk reflects
        self._key = hashlib.sha256(f"FROM {base.digest}".encode() if base else b"FROM scratch").hexdigest()

    def _step_key(self, step: Step) -> str:
        spec = json.dumps([step.kind, step.sources, step.dest, step.workdir, step.chown])
        inputs = (source_digest(self.context_tree, step.sources, self.context_listing)
                  if step.kind == "COPY" and self.context_tree else "")
        return hashlib.sha256(f"{self._key}\n{spec}\n{inputs}".encode()).hexdigest()

    def run(self, index: int, step: Step) -> bool:
        """Run (or reuse) one step; True when it came from the cache."""
        images = self.builder.images
        key = self._step_key(step) if self.use_cache else None
        if key is not None:
            hit = images.cached_step(key)
            if hit is not None:
                self.layers.append({"step": step.text, **hit})
                self._key = key
                return True
        for layer in self.layers[self._in_rootfs:]:  # catch the tree up with cached steps
            if layer["diff_id"]:
                extract_layer(images.layer_path(layer["diff_id"]), self.rootfs)
        layer = self.builder._run_step(step, self.context_tree, self.rootfs, self.workdir, index, self.links)
        self.layers.append(layer)
        self._in_rootfs = len(self.layers)
        if key is not None:
            images.remember_step(key, layer["diff_id"], layer["size"])
            self._key = key
        return False


def _merge_env(base: list[str], ours: list[str]) -> list[str]:
    """The base image's environment, overridden and extended by the Dockerfile's."""
    merged: dict[str, str] = {}
    for entry in [*base, *ours]:
        key = entry.split("=", 1)[0]
        merged.pop(key, None)
        merged[key] = entry
    return list(merged.values())


def _check(session: Session, cancelled: threading.Event) -> None:
    if cancelled.is_set():
        raise BuildCancelled()
    session.check_alive()


def _read_small(tree: str, name: str, what: str, *, required: bool = False) -> bytes | None:
    """A file from a synced tree (symlinks resolved inside the tree)."""
    path = resolve_in_root(tree, name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        if required:
            raise BuildError(f"open {name}: no such file or directory") from None
        return None
    except OSError as exc:
        raise BuildError(f"open {name}: {exc.strerror}") from None
    try:
        data = os.read(fd, MAX_DOCKERFILE + 1)
    except IsADirectoryError:
        raise BuildError(f"read {name}: is a directory") from None
    finally:
        os.close(fd)
    if len(data) > MAX_DOCKERFILE:
        raise BuildError(f"{what} is larger than {MAX_DOCKERFILE} bytes")
    return data


def parse_dockerignore(data: bytes) -> list[str]:
    from ..patterns import parse_dockerignore as parse

    try:
        return parse(data)
    except ValueError as exc:
        raise BuildError(f"invalid .dockerignore: {exc}") from None


def plan_build(text: str, options: BuildOptions) -> Plan:
    """Evaluate the target stage into steps and image metadata; reject what we cannot build."""
    parsed = dfp.parse(text)
    lex = dfp.ShellLex(parsed.escape)
    build_args = {k: v for k, v in options.build_args.items() if v is not None}
    global_scope: dict[str, str] = {}
    for inst in parsed.global_args:
        for name, default in _arg_pairs(inst):
            value = build_args.get(name, lex.word(default, global_scope) if default is not None else None)
            if value is not None:
                global_scope[name] = value
    stage = parsed.target(options.target)
    base = lex.word(stage.base, global_scope)  # scratch, or an image pulled from its registry
    args: dict[str, str] = {}
    env: dict[str, str] = {}
    labels: dict[str, str] = {}
    env_order = ["PATH"]
    env["PATH"] = DEFAULT_PATH_ENV.split("=", 1)[1]
    workdir = "/"
    steps: list[Step] = []
    history: list[dict] = []

    def scope() -> dict[str, str]:
        merged = dict(args)
        merged.update(env)
        return merged

    for inst in stage.instructions:
        command = inst.command
        if command not in dfp.SUPPORTED or command == "FROM":
            raise inst.fail(f"unsupported instruction {command}: this daemon supports "
                            "FROM scratch, COPY, WORKDIR, ENV, LABEL and ARG")
        if command == "ARG":
            for name, default in _arg_pairs(inst):
                if name in build_args:
                    args[name] = build_args[name]
                elif default is not None:
                    args[name] = lex.word(default, scope())
                elif name in global_scope:
                    args[name] = global_scope[name]
            history.append({"created_by": f"ARG {inst.rest}", "layer": False})
        elif command == "ENV":
            pairs = dfp.key_value_pairs(inst, lex, scope())
            for key, value in pairs:
                if key not in env:
                    env_order.append(key)
                env[key] = value
            history.append({"created_by": "ENV " + " ".join(f"{k}={v}" for k, v in pairs), "layer": False})
        elif command == "LABEL":
            pairs = dfp.key_value_pairs(inst, lex, scope())
            labels.update(pairs)
            history.append({"created_by": "LABEL " + " ".join(f"{k}={v}" for k, v in pairs), "layer": False})
        elif command == "WORKDIR":
            if not inst.rest:
                raise inst.fail("WORKDIR requires exactly one argument")
            value = lex.word(inst.rest, scope())
            workdir = clean(posixpath.join(workdir, value))
            steps.append(Step(f"WORKDIR {value}", "WORKDIR", dest=workdir))
            history.append({"created_by": f"WORKDIR {workdir}", "layer": True})
        elif command == "COPY":
            dfp.prepare(inst)
            unknown = set(inst.flags) - {"chown"}
            if unknown:
                raise inst.fail(f"unsupported instruction COPY --{sorted(unknown)[0]}: "
                                "only --chown is supported")
            words = inst.json_args if inst.json_args is not None else lex.words(inst.rest, scope())
            if inst.json_args is not None:
                words = [lex.word(w, scope()) for w in words]
            if len(words) < 2:
                raise inst.fail("COPY requires at least two arguments")
            chown = _parse_chown(inst, lex.word(inst.flags["chown"], scope())) if "chown" in inst.flags else None
            steps.append(Step(f"COPY {inst.original.split(None, 1)[1]}", "COPY", words[:-1], words[-1],
                              workdir, chown))
            history.append({"created_by": f"COPY {' '.join(words)} # buildkit", "layer": True})
    return Plan(steps, [f"{k}={env[k]}" for k in env_order], labels, workdir, history, base,
                any(entry["created_by"].startswith("WORKDIR ") for entry in history))


def _arg_pairs(inst: dfp.Instruction) -> list[tuple[str, str | None]]:
    pairs = []
    for word in dfp.raw_words(inst.rest, "\\"):
        name, eq, default = word.partition("=")
        if not name:
            raise inst.fail("ARG names can not be blank")
        pairs.append((name, default if eq else None))
    if not pairs:
        raise inst.fail("ARG requires exactly one argument")
    return pairs


def _parse_chown(inst: dfp.Instruction, value: str) -> tuple[int, int]:
    user, _, group = value.partition(":")
    try:
        uid = int(user)
        gid = int(group) if group else uid
    except ValueError:
        raise inst.fail(f"unsupported --chown={value}: this daemon has no /etc/passwd "
                        "in a scratch image; use numeric uid:gid") from None
    if not (0 <= uid < 1 << 32 and 0 <= gid < 1 << 32):
        raise inst.fail(f"invalid --chown={value}")
    return uid, gid
