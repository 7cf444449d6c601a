"""``python -m reference.client build [options] CONTEXT``

What can be checked before a build starts is, as the docker CLI does: secret
files, output destinations, that the daemon can be reached.  SIGINT and
SIGTERM end the build cleanly (the session and any partial export file go
away) with the shell's status for the signal, not a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import stat as _st
import sys

from ..dockerhost import api_call
from ..errors import SessionError
from .build import BuildError, Output, build
from .display import progress_for


class _Signalled(BaseException):
    """SIGINT or SIGTERM arrived: unwind the build like an interrupt."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_signalled(signum, frame) -> None:
    raise _Signalled(signum)


def _pairs(values: list[str], what: str) -> dict[str, str]:
    out = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep:
            raise SystemExit(f"{what} needs KEY=VALUE, got {value!r}")
        out[key] = val
    return out


def _secret(value: str) -> tuple[str, str]:
    fields = dict(p.split("=", 1) for p in value.split(",") if "=" in p)
    if "id" not in fields or ("src" not in fields and "source" not in fields):
        raise SystemExit(f"--secret needs id=ID,src=FILE, got {value!r}")
    source = fields.get("src") or fields["source"]
    try:  # up front, as the docker CLI: a build must not run with a secret that cannot be read
        os.stat(source)
    except OSError as exc:
        raise SystemExit(f"error: could not parse secrets: [{value}]: failed to stat {source}: "
                         f"{(exc.strerror or str(exc)).lower()}") from None
    return fields["id"], source


def _check_output(output: Output) -> None:
    """Fail before the build when the result could not be written where asked."""
    dest = output.dest
    if output.type == "tar":
        if dest == "-":
            return
        if os.path.isdir(dest):
            raise SystemExit(f"error: failed to open {dest}: is a directory")
        parent = os.path.dirname(os.path.abspath(dest))
        if not os.path.isdir(parent):
            raise SystemExit(f"error: failed to open {dest}: no such directory {parent}")
        if not os.access(parent, os.W_OK):
            raise SystemExit(f"error: failed to open {dest}: permission denied")
        return
    # local: dest is created (with its parents) when the export arrives
    path = os.path.abspath(dest)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise SystemExit(f"error: output destination {dest}: {exc.strerror}") from None
    if not _st.S_ISDIR(st.st_mode):
        raise SystemExit(f"error: output destination {dest}: {path} is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise SystemExit(f"error: output destination {dest}: {path} is not writable")


def _check_daemon() -> None:
    """The daemon answers (DOCKER_HOST, the docker context, TLS, ssh:// resolved as the docker CLI does)."""
    try:
        api_call("GET", "/_ping", timeout=10.0)
    except (SessionError, OSError) as exc:  # DaemonConnectionError names the host
        raise SystemExit(f"error: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m reference.client")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build a context over a client session, as docker build does",
                       description="Build CONTEXT on the daemon at DOCKER_HOST through a BuildKit client session. "
                                   "Prints the image id on stdout when the build makes an image.")
    b.add_argument("context", metavar="CONTEXT", help="the build context directory")
    b.add_argument("-t", "--tag", action="append", default=[], metavar="NAME[:TAG]",
                   help="name the image (repeatable)")
    b.add_argument("-f", "--file", dest="dockerfile", metavar="PATH",
                   help="the Dockerfile (default: CONTEXT/Dockerfile)")
    b.add_argument("-o", "--output", action="append", default=[], metavar="type=local|tar,dest=PATH",
                   help="export the result to a directory (type=local) or a tar file (type=tar, dest=- for "
                        "stdout) instead of an image; a bare PATH is type=local")
    b.add_argument("-q", "--quiet", action="store_true",
                   help="print no progress, only the image id (as docker build -q)")
    b.add_argument("--secret", action="append", default=[], metavar="id=ID,src=FILE",
                   help="a secret file for RUN --mount=type=secret,id=ID (repeatable)")
    b.add_argument("--ssh", action="append", default=[], metavar="default|ID[=SOCKET|KEY[,KEY...]]",
                   help="an SSH agent (SSH_AUTH_SOCK, a socket, or key files) for RUN --mount=type=ssh; "
                        "only listing and signing with its keys are forwarded")
    b.add_argument("--build-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a build-time variable (repeatable)")
    b.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                   help="a label on the image (repeatable)")
    b.add_argument("--target", metavar="STAGE", help="build this stage of the Dockerfile")
    b.add_argument("--network", metavar="MODE", help="network of RUN steps: default, none or host")
    b.add_argument("--no-cache", action="store_true", help="do not use the daemon's build cache")
    b.add_argument("--pull", action="store_true", help="always look for newer base images")
    b.add_argument("--progress", choices=["auto", "plain", "quiet"], default="auto",
                   help="auto: a live view on a terminal, else plain; plain: the docker CLI's text; "
                        "quiet: none (default auto)")
    b.add_argument("--generation", choices=["n-1", "n", "n+1"], default="n+1",
                   help="n: as the docker CLI 20.10; n+1: as the docker CLI 26 with buildx 0.13; "
                        "n-1: the 2017 design (TarStream, Dockerfile in the request body)")
    b.add_argument("--filesync", metavar="LIST", help="comma-separated: diffcopy,tarstream (default by generation)")
    b.add_argument("--auth", choices=["v1", "v2"],
                   help="registry auth protocol served: v1 credentials only, v2 also tokens; "
                        "default by generation: n-1=v1, n and n+1=v2")
    b.add_argument("--transport", choices=["h2", "grpcio"], default="h2",
                   help="gRPC stack of the session: h2 (default) or grpcio")
    b.add_argument("--api", choices=["build", "grpc"], default=None,
                   help="build: POST /build, as the docker CLI 20.10; grpc: Control/Solve on POST /grpc (BuildKit's "
                        "Control API), as buildx; default by generation: n-1 and n build, n+1 grpc (build when "
                        "the daemon has no /grpc)")
    b.add_argument("--stats-json", metavar="FILE", help="write the session's calls and stream statistics as JSON")
    b.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="give up after this many seconds")
    b.add_argument("--hang-timeout", type=float, default=20.0, metavar="SECONDS",
                   help="seconds to wait for the end of a build after the daemon reported a failed step "
                        "(dockerd 20.10 may never end it)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    try:
        outputs = [Output.parse(o) for o in args.output]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    secrets = dict(_secret(s) for s in args.secret)
    try:  # up front, as the docker CLI: no build with an agent that is not there
        from .sshforward import SSHSpecError, parse_ssh_specs

        ssh = parse_ssh_specs(args.ssh) if args.ssh else None
    except SSHSpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for output in outputs:
        _check_output(output)
    _check_daemon()
    progress = progress_for("quiet" if args.quiet else args.progress, sys.stderr)
    previous = {signum: signal.signal(signum, _raise_signalled) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        result = build(
            args.context,
            tags=args.tag,
            dockerfile=args.dockerfile,
            outputs=outputs,
            secrets=secrets,
            ssh=ssh,
            build_args=_pairs(args.build_arg, "--build-arg"),
            labels=_pairs(args.label, "--label"),
            target=args.target,
            network=args.network,
            no_cache=args.no_cache,
            pull=args.pull,
            generation=args.generation,
            filesync=tuple(args.filesync.split(",")) if args.filesync else None,
            auth=args.auth,
            transport=args.transport,
            api=args.api,
            progress=progress,
            timeout=args.timeout,
            hang_timeout=args.hang_timeout,
        )
    except BuildError as exc:
        if progress is not None:
            progress.finish(failed=True)
        print(exc, file=sys.stderr)  # as the docker CLI: the daemon's message alone, after the excerpt
        return 1
    except (SessionError, OSError, ValueError) as exc:
        if progress is not None:
            progress.finish()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (_Signalled, KeyboardInterrupt) as exc:
        signum = exc.signum if isinstance(exc, _Signalled) else signal.SIGINT
        if progress is not None:
            progress.finish()
        print(f"error: build cancelled by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + signum
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if progress is not None:
        progress.finish()
    if args.stats_json:
        with open(args.stats_json, "w") as fh:
            json.dump(result.stats_json(), fh, indent=2)
    if result.image_id:
        print(result.image_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
