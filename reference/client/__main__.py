"""``python -m reference.client build [options] CONTEXT``"""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import SessionError
from .build import Output, build, progress_for


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
    return fields["id"], fields.get("src") or fields["source"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reference.client")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build a context over a client session")
    b.add_argument("context")
    b.add_argument("-t", "--tag", action="append", default=[])
    b.add_argument("-f", "--file", dest="dockerfile")
    b.add_argument("-o", "--output", action="append", default=[])
    b.add_argument("--secret", action="append", default=[])
    b.add_argument("--build-arg", action="append", default=[])
    b.add_argument("--label", action="append", default=[])
    b.add_argument("--target")
    b.add_argument("--network")
    b.add_argument("--no-cache", action="store_true")
    b.add_argument("--pull", action="store_true")
    b.add_argument("--progress", choices=["auto", "plain", "quiet"], default="auto")
    b.add_argument("--generation", choices=["n-1", "n", "n+1"], default="n+1",
                   help="n: as the docker CLI 20.10; n+1: as the docker CLI 26 with buildx 0.13; "
                        "n-1: the 2017 design (TarStream, Dockerfile in the request body)")
    b.add_argument("--filesync", help="comma-separated: diffcopy,tarstream (default by generation)")
    b.add_argument("--auth", choices=["v1", "v2"], help="default by generation: n-1=v1, n and n+1=v2")
    b.add_argument("--transport", choices=["h2", "grpcio"], default="h2")
    b.add_argument("--stats-json", metavar="FILE")
    b.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    args = parser.parse_args(argv)

    progress = progress_for(args.progress, sys.stderr)
    try:
        result = build(
            args.context,
            tags=args.tag,
            dockerfile=args.dockerfile,
            outputs=[Output.parse(o) for o in args.output],
            secrets=dict(_secret(s) for s in args.secret),
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
            progress=progress,
            timeout=args.timeout,
        )
    except (SessionError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.stats_json:
        with open(args.stats_json, "w") as fh:
            json.dump(result.stats_json(), fh, indent=2)
    if result.image_id:
        print(result.image_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
