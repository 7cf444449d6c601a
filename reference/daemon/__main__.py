"""``python -m reference.daemon --host unix:///PATH --root DIR``"""

from __future__ import annotations

import argparse
import logging
import select
import signal
import socket
import sys

from .config import DaemonConfig
from .service import Daemon, RootInUse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reference.daemon",
                                     description="Reference daemon for the Docker client-session protocol")
    parser.add_argument("--host", required=True, help="unix:///PATH or tcp://127.0.0.1:PORT")
    parser.add_argument("--root", required=True, help="directory for the context cache and image store")
    parser.add_argument("--generation", choices=["n-1", "n", "n+1"], default="n+1",
                        help="n: as dockerd 20.10 (BuildKit 0.8); n+1: as dockerd 26.1 (BuildKit 0.13); "
                             "n-1: the 2017 design (TarStream, Dockerfile in the request body)")
    parser.add_argument("--transport", choices=["h2", "grpcio"], default="h2")
    parser.add_argument("--stall-timeout", type=float, default=60.0,
                        help="seconds a transfer may go without a message from the client")
    # timers: the defaults are the generation's (reference/daemon/config.py, PROFILES)
    parser.add_argument("--session-wait", type=float, default=None,
                        help="seconds a build waits for its session to appear (n: 5, n+1: 5 then --session-group-wait)")
    parser.add_argument("--session-group-wait", type=float, default=None,
                        help="seconds a build then waits again (n: 0, n+1: 5)")
    parser.add_argument("--health-first", type=float, default=None,
                        help="seconds from the upgrade to the first health check (default: --health-interval)")
    parser.add_argument("--health-interval", type=float, default=None, help="seconds between health checks (n: 1, n+1: 5)")
    parser.add_argument("--health-timeout", type=float, default=None,
                        help="deadline of a health check (n: 10; n+1: 30, or 1.5 x the previous check if longer)")
    parser.add_argument("--max-message-size", type=int, default=None,
                        help="largest gRPC message received, bytes (n: 4 MiB, n+1: 16 MiB)")
    defaults = DaemonConfig.__dataclass_fields__
    parser.add_argument("--max-path-length", type=int, default=defaults["max_path_length"].default,
                        help="longest received path, bytes (default: PATH_MAX less its NUL)")
    parser.add_argument("--max-depth", type=int, default=defaults["max_depth"].default,
                        help="deepest received path, in directories")
    parser.add_argument("--max-entries", type=int, default=defaults["max_entries"].default,
                        help="most entries of one listing")
    parser.add_argument("--max-transfer-bytes", type=int, default=None,
                        help="most file bytes of one transfer (default: the free disk space less --min-free-disk)")
    parser.add_argument("--min-free-disk", type=int, default=defaults["min_free_disk"].default,
                        help="bytes a transfer must leave free on the cache's filesystem")
    parser.add_argument("--cache-max-size", type=int, default=512 << 20, help="bytes")
    parser.add_argument("--cache-max-age", type=float, default=7 * 24 * 3600.0, help="seconds")
    parser.add_argument("--gc-interval", type=float, default=300.0, help="seconds")
    parser.add_argument("--no-fsync", action="store_true",
                        help="write the context cache and image store without syncing them to disk: faster, and "
                             "lost in a crash; for a root thrown away after use (the conformance suite's embedded "
                             "daemons)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = DaemonConfig(
            root=args.root, generation=args.generation, transport=args.transport,
            stall_timeout=args.stall_timeout, fsync=not args.no_fsync, session_wait=args.session_wait,
            session_group_wait=args.session_group_wait, health_first=args.health_first,
            health_interval=args.health_interval, health_timeout=args.health_timeout,
            max_message_size=args.max_message_size, max_path_length=args.max_path_length,
            max_depth=args.max_depth, max_entries=args.max_entries, max_transfer_bytes=args.max_transfer_bytes,
            min_free_disk=args.min_free_disk,
            cache_max_size=args.cache_max_size, cache_max_age=args.cache_max_age, gc_interval=args.gc_interval,
        )
        daemon = Daemon(config, args.host)
    except (RootInUse, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    def stop(signum, frame):
        daemon.close()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    logging.getLogger("reference.daemon").info(
        "listening on %s (generation %s, transport %s)", daemon.server.bound_address, args.generation, args.transport)
    print(f"listening on {daemon.server.bound_address}", flush=True)
    try:
        daemon.start()
        _wait_until_stopped(daemon)
    finally:
        daemon.close()
    return 0


def _wait_until_stopped(daemon: Daemon) -> None:
    """Block until a signal's handler (or a failure of the server thread) stops the daemon.

    The kernel may deliver SIGTERM to any thread, grpcio's own among them, while Python runs handlers only in
    the main thread, and only once it is woken: blocked in accept() it was not, and the daemon ignored the
    signal (about one stop in ten with the grpcio transport). Here the main thread waits in select() on the
    wakeup descriptor, which the C-level handler writes to from whichever thread the signal hit."""
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    try:
        while not daemon.stopped and daemon.server.serving:
            select.select([wake_r], [], [], 1.0)  # the timeout notices a server thread that died
            try:
                wake_r.recv(4096)
            except BlockingIOError:
                pass
    finally:
        signal.set_wakeup_fd(-1)
        wake_r.close()
        wake_w.close()


if __name__ == "__main__":
    sys.exit(main())
