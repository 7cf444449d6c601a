"""Daemon-side scenarios for the instrumented daemon, built from what dockerd 20.10 does (and, for a
generation n+1 client, with the metadata dockerd 26.1 sends)."""

from __future__ import annotations

from grpc_health.v1 import health_pb2

from reference.transport.base import RpcError

from .instrumented_daemon import BuildRecord, ScenarioResult, SessionRecord
from .recording import ReceiveResult, receive_tree

DIFFCOPY = "/moby.filesync.v1.FileSync/DiffCopy"
HEALTH = "/grpc.health.v1.Health/Check"


def health_check(session: SessionRecord, timeout: float = 10.0) -> int:
    """Status value of one Health/Check (raises RpcError on failure)."""
    raw = session.conn.unary(HEALTH, health_pb2.HealthCheckRequest().SerializeToString(), timeout=timeout)
    return health_pb2.HealthCheckResponse.FromString(raw).status


def fetch(session: SessionRecord, dir_name: str | None, *, followpaths=(), excludes=(), includes=(),
          extra_metadata=(), previous=(), timeout: float = 30.0) -> ReceiveResult:
    metadata = []
    if dir_name is not None:
        metadata.append(("dir-name", dir_name))
    metadata += [("followpaths", p) for p in followpaths]
    metadata += [("exclude-patterns", p) for p in excludes]
    metadata += [("include-patterns", p) for p in includes]
    # as the daemon of the session's generation sends them (dockerd 26.1 escapes non-ASCII keys); extras as given
    metadata = session.filesync_metadata(metadata) + list(extra_metadata)
    stream = session.conn.open_stream(DIFFCOPY, metadata)
    try:
        return receive_tree(stream, previous=previous, timeout=timeout)
    except RpcError as exc:
        result = ReceiveResult()
        result.error = f"RpcError: {exc}"
        return result


class DockerdLikeFetch:
    """A scenario that fetches what dockerd 20.10 fetches for ``docker build .``
    (Dockerfile, .dockerignore, then the context with its excludes) and records it."""

    def __init__(self, *, fetch_context: bool = True, check_health: bool = True):
        self.fetch_context = fetch_context
        self.check_health = check_health
        self.results: dict[str, ReceiveResult] = {}
        self.health_status: int | None = None
        self.health_error: str | None = None
        self.build: BuildRecord | None = None

    def __call__(self, build: BuildRecord) -> ScenarioResult:
        self.build = build
        session = build.session
        if session is None:  # a body upload without a session: there is nothing to call
            return ScenarioResult()
        if self.check_health:
            try:
                self.health_status = health_check(session)
            except RpcError as exc:
                self.health_error = str(exc)
        if build.api == "body":  # the context came as the request body: dockerd fetches nothing (BUILD-8)
            return ScenarioResult()
        name = (build.query.get("dockerfile") or ["Dockerfile"])[0]
        follow = [name, name + ".dockerignore"] + (["dockerfile"] if name == "Dockerfile" else [])
        self.results["dockerfile"] = fetch(session, "dockerfile", followpaths=follow)
        if self.results["dockerfile"].error:
            return ScenarioResult(image_id=None, error="failed to read dockerfile: " + self.results["dockerfile"].error)
        self.results["dockerignore"] = fetch(session, "context", followpaths=[".dockerignore"])
        if self.fetch_context:
            self.results["context"] = fetch(session, "context")
            if self.results["context"].error:
                return ScenarioResult(image_id=None, error="failed to load context: " + self.results["context"].error)
        return ScenarioResult()
