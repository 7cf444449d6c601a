"""Daemon settings: one place for every timeout and limit."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..paths import DEFAULT_LIMITS

MIN_API_VERSION = "1.12"


@dataclass(frozen=True)
class GenerationProfile:
    """What a generation's real daemon does where the generations differ (conformance/SPEC.md, "Protocol
    generations"). Every timer here is only a default: DaemonConfig (and the CLI) can override each one."""

    protocols: tuple[str, ...]  # file sync protocols the daemon knows, in order of preference
    token_authority: bool  # registry auth asks the client for a token authority first (Auth/GetTokenAuthority)
    api_version: str  # the highest Engine API version (/_ping's Api-Version, /version)
    engine_version: str
    health_first: float  # the first Health/Check, seconds after the upgrade
    health_interval: float  # then one per tick of this period (a Go ticker: late ticks are dropped)
    health_timeout: float  # the deadline of a check ...
    health_timeout_factor: float  # ... or this many times the previous check's duration, if longer (0: fixed)
    session_wait: float  # a build waits this long for its session to appear (BuildKit's sm.Get) ...
    session_group_wait: float  # ... then this long again (BuildKit 0.13's session group), 0: fail at once
    max_message_size: int  # largest gRPC message received
    frontend_error_prefix: str  # put before the frontend's error texts
    encode_metadata: bool  # per-key percent-encoding of FileSync metadata with <key>-encoded: 1
    exporter_id: bool  # buildkit-attachable-exporter-id on every FileSend call
    traceparent: bool  # a W3C traceparent on FileSync and FileSend calls
    incremental_dockerfile: bool  # the Dockerfile and .dockerignore transfers use a diff base
    probe_ignored_dockerignore: bool  # the context's .dockerignore transferred even if <Dockerfile>.dockerignore exists
    # what a build naming a session whose connection closed (not yet noticed by a health check) fails with:
    # grpc-go redials, and BuildKit's one-shot dialer refuses (bk session/grpc.go:37-43)
    redial_error: str
    # BUILD_STREAM_PROTOCOL narrows the file sync protocols (NEGOTIATE-3); BuildKit 0.10 dropped it (bk 35fcb28a0)
    stream_protocol_env: bool = True
    # POST /grpc, BuildKit's Control API and gateway (reference/daemon/control.py): buildx's way in.
    control_api: bool = True  # dockerd 20.10 and 26.1 serve it; the 2017 design had no such route
    # the worker of ListWorkers and Ping: dockerd 20.10 names it "moby"; 26.1 gives it a UUID (None: one per --root)
    worker_id: str | None = "moby"
    worker_cpu_levels: bool = False  # list the amd64 micro-architecture levels the CPU has (26.1), not just amd64
    # BuildkitVersion.version in ListWorkers and Info; "": none, and Control/Info is unimplemented (20.10)
    buildkit_version: str = ""
    export_vertex_local: str = "exporting to client"  # the export's vertex on /grpc (measured)
    export_vertex_tar: str = "exporting to client"
    # the keys of an image export's SolveResponse (20.10: the image id alone)
    image_exporter_response: tuple[str, ...] = ("containerimage.digest",)


_BUILDKIT_0_8 = dict(
    api_version="1.41", engine_version="20.10.24-reference",
    # bk session/grpc.go:78-99: 1 s ticker, 10 s timeout; bk session/group.go:75: a 5 s wait
    health_first=1.0, health_interval=1.0, health_timeout=10.0, health_timeout_factor=0.0,
    session_wait=5.0, session_group_wait=0.0,
    max_message_size=4 << 20,  # grpc-go's default MaxRecvMsgSize
    frontend_error_prefix="failed to solve with frontend dockerfile.v0: ",
    encode_metadata=False, exporter_id=False, traceparent=False, incremental_dockerfile=True,
    probe_ignored_dockerignore=True,
    redial_error='rpc error: code = Unavailable desc = connection error: desc = "transport: Error while dialing '
                 'only one connection allowed"',
)

PROFILES = {
    # n-1 models the 2017 design (TarStream; its health poll and session wait are 20.10's, near enough)
    "n-1": GenerationProfile(protocols=("tarstream",), token_authority=False, control_api=False, **_BUILDKIT_0_8),
    # n: dockerd 20.10.24 (BuildKit 0.8)
    "n": GenerationProfile(protocols=("diffcopy",), token_authority=True, **_BUILDKIT_0_8),
    # n+1: dockerd 26.1.5 (BuildKit 0.13.2), as measured (docs/observed/dockerd-26.1-against-the-suite.md)
    "n+1": GenerationProfile(
        protocols=("diffcopy",), token_authority=True, api_version="1.45", engine_version="26.1.5-reference",
        # bk13 session/grpc.go:87,93,106: 5 s ticker, deadline max(30 s, 1.5 x the previous check)
        health_first=5.0, health_interval=5.0, health_timeout=30.0, health_timeout_factor=1.5,
        # bk13 source/local/source.go:144-151 then session/group.go:75-78: 5 s + 5 s
        session_wait=5.0, session_group_wait=5.0,
        max_message_size=16 << 20,  # bk13 session/grpc.go:48-49
        frontend_error_prefix="",
        encode_metadata=True, exporter_id=True, traceparent=True,
        incremental_dockerfile=False,  # bk13 frontend/dockerui/config.go:325,417 (local.differ: none)
        probe_ignored_dockerignore=False,  # measured: no context transfer with followpaths .dockerignore then
        stream_protocol_env=False,
        redial_error='rpc error: code = Unavailable desc = rpc error: code = Unavailable desc = connection error: '
                     'desc = "transport: Error while dialing: only one connection allowed"',
        worker_id=None, worker_cpu_levels=True, buildkit_version="v0.13.2+reference",
        export_vertex_local="exporting to client directory", export_vertex_tar="exporting to client tarball",
        image_exporter_response=("containerimage.config.digest", "containerimage.digest", "image.name"),
    ),
}

# generation: its file sync protocols (kept for callers that only need those)
GENERATIONS = {name: profile.protocols for name, profile in PROFILES.items()}
# The highest API version any generation serves, and the engine version of the default generation.
API_VERSION = PROFILES["n+1"].api_version
ENGINE_VERSION = PROFILES["n+1"].engine_version

# The timers a DaemonConfig takes from its generation's profile unless it is given them.
PROFILE_TIMERS = ("health_first", "health_interval", "health_timeout", "session_wait", "session_group_wait")


@dataclass
class DaemonConfig:
    root: str
    generation: str = "n+1"
    transport: str = "h2"  # h2 | grpcio
    # Timers; None: the generation's (PROFILES). Both generations end a session at the first failed check.
    session_wait: float | None = None
    session_group_wait: float | None = None
    health_first: float | None = None
    health_interval: float | None = None
    health_timeout: float | None = None
    # A file transfer with no message from the peer for this long fails.
    stall_timeout: float = 60.0
    fsync: bool = True  # False: the root's state may be lost in a crash (a root thrown away after the run)
    # Context cache garbage collection (the 2017 fscache defaults).
    cache_max_size: int = 512 << 20
    cache_max_age: float = 7 * 24 * 3600.0
    gc_interval: float = 300.0
    # Largest request body accepted (the v1 path sends the Dockerfile as body).
    max_body: int = 16 << 20
    # What one session may send (dockerd-like: what a Linux dockerd can take at all).
    # Largest gRPC message received (grpc-go's default MaxRecvMsgSize, as dockerd's).
    # None: the generation's (4 MiB for n-1 and n, 16 MiB for n+1).
    max_message_size: int | None = None
    # A received path, in bytes (PATH_MAX less its NUL), and its depth (the deepest a
    # path within max_path_length can go); entries of one listing; bytes of one
    # transfer (None: the free disk space less min_free_disk).
    max_path_length: int = DEFAULT_LIMITS.max_path_length
    max_depth: int = DEFAULT_LIMITS.max_depth
    max_entries: int = DEFAULT_LIMITS.max_entries
    max_transfer_bytes: int | None = None
    min_free_disk: int = 256 << 20
    # env BUILD_STREAM_PROTOCOL, read at start-up like dockerd reads its own env
    forced_protocol: str | None = field(default_factory=lambda: os.environ.get("BUILD_STREAM_PROTOCOL") or None)

    def __post_init__(self) -> None:
        self.root = os.path.abspath(self.root)
        if self.generation not in PROFILES:
            raise ValueError(f"unknown generation {self.generation!r} (n-1, n or n+1)")
        if not PROFILES[self.generation].stream_protocol_env:
            self.forced_protocol = None
        if self.health_first is None and self.health_interval is not None:
            self.health_first = self.health_interval  # a Go ticker's first tick is one period in
        for name in PROFILE_TIMERS:
            if getattr(self, name) is None:
                setattr(self, name, getattr(self.profile, name))
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.health_interval <= 0:
            raise ValueError("health_interval must be positive")
        if self.max_message_size is None:
            self.max_message_size = self.profile.max_message_size
        if self.transport not in ("h2", "grpcio"):
            raise ValueError(f"unknown transport {self.transport!r} (h2 or grpcio)")

    @property
    def profile(self) -> GenerationProfile:
        return PROFILES[self.generation]

    @property
    def protocols(self) -> tuple[str, ...]:
        return self.profile.protocols

    @property
    def api_version(self) -> str:
        return self.profile.api_version

    @property
    def engine_version(self) -> str:
        return self.profile.engine_version

    def timers(self) -> dict[str, float]:
        """The timers in effect (what /version reports, so the suite can judge a target by them)."""
        return {name: getattr(self, name) for name in PROFILE_TIMERS}

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)
