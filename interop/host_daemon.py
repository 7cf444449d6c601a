"""Keep a private host dockerd 20.10 (conformance.realpeers.PrivateDockerd) running for interop runs.

Two ways to use it (both need root and the Debian docker.io binaries):

    python -m interop.host_daemon --host-file FILE &   # writes DOCKER_HOST=unix://... to FILE, runs until
                                                       # SIGTERM/SIGINT, then stops the daemon and deletes FILE
    python -m interop.host_daemon -- CMD ARGS...       # runs CMD with DOCKER_HOST set; exits with its status

interop/run.py starts such a daemon by itself when no host daemon answers, so `tox -e interop` needs
neither form; they are for keeping one daemon (and its cached dind image) across several invocations.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading

from conformance.realpeers import PrivateDockerd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host-file", help="write 'DOCKER_HOST=unix://...' here once the daemon answers")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...: run it with DOCKER_HOST set")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command and not args.host_file:
        parser.error("give --host-file FILE, or -- CMD ARGS...")

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: stop.set())

    with PrivateDockerd() as daemon:
        print(f"host_daemon: dockerd answers at {daemon.host} (pid {daemon.process.pid})", file=sys.stderr, flush=True)
        try:
            if args.host_file:
                temporary = args.host_file + ".tmp"
                with open(temporary, "w") as fh:
                    fh.write(f"DOCKER_HOST={daemon.host}\n")
                os.replace(temporary, args.host_file)  # readers never see a half-written file
            if command:
                child = subprocess.Popen(command, env={**os.environ, "DOCKER_HOST": daemon.host})
                while child.poll() is None and not stop.is_set():
                    stop.wait(0.2)
                if child.poll() is None:  # we were told to stop: pass it on
                    child.terminate()
                return child.wait()
            while not stop.wait(0.5):
                pass
            return 0
        finally:
            if args.host_file:
                try:
                    os.unlink(args.host_file)
                except FileNotFoundError:
                    pass


if __name__ == "__main__":
    sys.exit(main())
