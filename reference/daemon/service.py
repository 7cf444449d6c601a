"""The daemon as one object: root directory, components, listener, background GC."""

from __future__ import annotations

import fcntl
import logging
import os
import threading

from ..applier import remove_tree
from .api import EngineApi, default_headers
from .builder import Builder
from .cache import ContextCache
from .config import DaemonConfig
from .control import ControlService
from .grpcapi import GrpcEndpoint
from .httpserver import HttpServer
from .images import ImageStore
from .sessions import SessionManager
from .solvebackend import BuilderBackend

log = logging.getLogger("reference.daemon")


class RootInUse(RuntimeError):
    pass


class Daemon:
    def __init__(self, config: DaemonConfig, host: str):
        self.config = config
        os.makedirs(config.root, mode=0o700, exist_ok=True)
        # one daemon per root: the cache and image store are not shared between processes
        self._lock_fd = os.open(config.path("daemon.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise RootInUse("another daemon is using this --root") from None
        try:  # build directories of a previous run, as deep as its clients' trees: no recursion
            remove_tree(config.path("tmp"))
        except OSError as exc:
            log.warning("could not remove %s of a previous run: %s", config.path("tmp"), exc)
        os.makedirs(config.path("tmp"), mode=0o700, exist_ok=True)
        self.sessions = SessionManager(config)
        self.cache = ContextCache(config.path("cache"), max_size=config.cache_max_size, max_age=config.cache_max_age,
                                  durable=config.fsync)
        self.images = ImageStore(config.path("images"), durable=config.fsync)
        self.builder = Builder(config, self.sessions, self.cache, self.images)
        self.grpc = None
        if config.profile.control_api:  # POST /grpc: the same builder, cache and images behind the Control API
            backend = BuilderBackend(config, self.builder, self.cache, self.images)
            self.grpc = GrpcEndpoint(config, ControlService(backend))
        self.api = EngineApi(config, self.sessions, self.cache, self.images, self.builder, self.grpc)
        self.server = HttpServer(host, self.api, default_headers=default_headers(config), max_body=config.max_body)
        self._stop = threading.Event()
        self._gc_thread = threading.Thread(target=self._gc_loop, name="cache-gc", daemon=True)

    def _gc_loop(self) -> None:
        while not self._stop.wait(self.config.gc_interval):
            try:
                deleted, reclaimed = self.cache.gc()
                if deleted:
                    log.info("cache gc: removed %d entries, %d bytes", len(deleted), reclaimed)
            except OSError:
                log.exception("cache gc failed")

    def start(self) -> "Daemon":
        self._gc_thread.start()
        self.server.start()
        return self

    def serve_forever(self) -> None:
        self._gc_thread.start()
        self.server.serve_forever()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self.server.close()
        if self.grpc is not None:
            self.grpc.close()
        self.sessions.close_all()
        self.cache.save_usage()  # what the usage writer has not written yet
        os.close(self._lock_fd)
