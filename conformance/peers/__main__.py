"""python -m conformance.peers list | start NAME | install: the real peers of this machine."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from . import PROGRAMS, VINTAGES, binary, client_command, missing_reason, prefix_dir, version
from .install import InstallError, install, read_manifest


def _list(as_json: bool) -> int:
    rows = []
    for name, peer in PROGRAMS.items():
        reason = missing_reason(name)
        manifest = read_manifest(prefix_dir() / peer.vintage) or {}
        packages = {p["name"]: p["version"] for p in manifest.get("packages", [])}
        rows.append({
            "name": name, "kind": peer.kind, "vintage": peer.vintage,
            "generation": VINTAGES[peer.vintage].generation,
            "version": version(name) if reason is None else None, "binary": binary(name),
            "installed": reason is None, "problem": reason, "packages": packages,
            **({"client_under_test": client_command(name, "--progress plain")} if peer.kind == "client" else {}),
        })
    if as_json:
        json.dump(rows, sys.stdout, indent=2)
        print()
        return 0
    print(f"peers prefix: {prefix_dir()}")
    for row in rows:
        state = row["version"] or f"NOT AVAILABLE: {row['problem']}"
        print(f"{row['name']:<18} {row['kind']:<7} generation {row['generation']:<4} {state}")
        print(f"{'':<18} {row['binary']}")
    return 0


def _start(name: str, extra_args: list[str]) -> int:
    from ..realpeers import DockerdStartError, PrivateDockerd

    if name not in PROGRAMS or PROGRAMS[name].kind != "daemon":
        daemons = [n for n, p in PROGRAMS.items() if p.kind == "daemon"]
        print(f"peers: {name!r} is not a daemon peer (daemons: {', '.join(daemons)})", file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: stop.set())
    daemon = PrivateDockerd(name, extra_args=extra_args)
    try:
        daemon.start()
    except DockerdStartError as exc:
        print(f"peers: {name} did not start: {exc}", file=sys.stderr)
        return 1
    try:
        # stdout carries only the assignment, so `eval "$(... start NAME &)"`-style use and scripts can read it.
        print(f"DOCKER_HOST={daemon.host}", flush=True)
        print(f"peers: {name} ({version(name)}) answers at {daemon.host}; SIGTERM or Ctrl-C stops it and "
              f"removes {daemon.dir}", file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            if daemon.process.poll() is not None:
                print(f"peers: {name} exited with status {daemon.process.returncode}:\n{daemon.log_tail(30)}",
                      file=sys.stderr)
                return 1
        return 0
    finally:
        daemon.stop()
        if daemon.leftovers.get("processes") or daemon.leftovers.get("mounts"):
            print(f"peers: cleaned up after {name}: {daemon.leftovers}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance.peers", description=__doc__.split(":")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="each real peer: name, kind, generation, version, binary")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    start = commands.add_parser("start", help="start a disposable private daemon; prints DOCKER_HOST=...; "
                                              "SIGTERM or Ctrl-C stops it and removes everything it made")
    start.add_argument("name", help="a daemon peer: " + ", ".join(n for n, p in PROGRAMS.items() if p.kind == "daemon"))
    start.add_argument("dockerd_args", nargs=argparse.REMAINDER, help="-- extra dockerd arguments")
    setup = commands.add_parser("install", help="bring the peers into the prefix (idempotent; needs root)")
    setup.add_argument("--prefix", help="default: $SESSION_PEERS_PREFIX or /opt/docker-session-peers")
    setup.add_argument("--vintage", action="append", choices=list(VINTAGES), help="only this vintage (repeatable)")
    setup.add_argument("--force", action="store_true", help="reinstall even when the manifest matches")
    args = parser.parse_args(argv)
    if args.command == "list":
        return _list(args.json)
    if args.command == "start":
        extra = args.dockerd_args[1:] if args.dockerd_args[:1] == ["--"] else args.dockerd_args
        return _start(args.name, extra)
    try:
        install(args.prefix, args.vintage, force=args.force)
    except InstallError as exc:
        print(f"peers: install failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
