"""Daemon settings: one place for every timeout and limit."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

API_VERSION = "1.41"
MIN_API_VERSION = "1.12"
ENGINE_VERSION = "20.10.24-reference"

GENERATIONS = {
    # generation: file sync protocols the daemon knows, in order of preference.
    # n-1 models the 2017 design; n is dockerd 20.10 (BuildKit 0.8), n+1 dockerd 26.1 (BuildKit 0.13):
    # both real ones know diffcopy alone (conformance/SPEC.md, "Protocol generations").
    "n-1": ("tarstream",),
    "n": ("diffcopy",),
    "n+1": ("diffcopy",),
}


@dataclass
class DaemonConfig:
    root: str
    generation: str = "n+1"
    transport: str = "h2"  # h2 | grpcio
    # A build waits this long for its session to appear (BuildKit: 5 s).
    session_wait: float = 5.0
    # Health checks: BuildKit 0.8 polls every second with a 10 s timeout and
    # ends the session at the first failure.
    health_interval: float = 1.0
    health_timeout: float = 10.0
    # A file transfer with no message from the peer for this long fails.
    stall_timeout: float = 60.0
    # Context cache garbage collection (the 2017 fscache defaults).
    cache_max_size: int = 512 << 20
    cache_max_age: float = 7 * 24 * 3600.0
    gc_interval: float = 300.0
    # Largest request body accepted (the v1 path sends the Dockerfile as body).
    max_body: int = 16 << 20
    # env BUILD_STREAM_PROTOCOL, read at start-up like dockerd reads its own env
    forced_protocol: str | None = field(default_factory=lambda: os.environ.get("BUILD_STREAM_PROTOCOL") or None)

    def __post_init__(self) -> None:
        self.root = os.path.abspath(self.root)
        if self.generation not in GENERATIONS:
            raise ValueError(f"unknown generation {self.generation!r} (n-1, n or n+1)")
        if self.transport not in ("h2", "grpcio"):
            raise ValueError(f"unknown transport {self.transport!r} (h2 or grpcio)")

    @property
    def protocols(self) -> tuple[str, ...]:
        return GENERATIONS[self.generation]

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)
