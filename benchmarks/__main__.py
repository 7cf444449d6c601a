"""``python -m benchmarks [--suite core|client|client-26.1|daemon|daemon-26.1|daemon-buildx|all] [--runs 3]
[--files 5000] [--megabytes 200] [--json FILE]``"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback

from . import contexts
from .procs import compile_bytecode
from conformance import peers

from .report import SuiteResult, format_summary, format_table

# client and daemon: against the 20.10 peers; client-26.1 and daemon-26.1: against the 26.1 ones, same run;
# daemon-buildx: buildx 0.13 (the CLI 26.1) into our daemon n+1 and into dockerd 26.1.
SUITES = ("core", "client", "client-26.1", "daemon", "daemon-26.1", "daemon-buildx")


def _interrupt(signum, _frame):
    # SIGTERM/SIGHUP take the same path as Ctrl-C, so every cleanup (daemons, /tmp) runs.
    raise KeyboardInterrupt(f"signal {signum}")


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unavailable"
    return out.splitlines()[0] if out else "unavailable"


def _machine() -> dict:
    return {
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "rsync": _version(["/usr/bin/rsync", "--version"]),
        **{name: peers.version(name) or "unavailable" for name in peers.PROGRAMS},
    }


def _run_suite(name: str, opts) -> SuiteResult:
    kind, _, vintage = name.partition("-")
    if kind == "core":
        from . import core as module
    elif kind == "client":
        from . import client as module
    else:
        from . import daemon as module
    try:
        if name == "daemon-buildx":
            return module.run_buildx(opts)
        return module.run(opts) if kind == "core" else module.run(opts, vintage or "20.10")
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # one broken suite must not hide the others' numbers
        result = SuiteResult(name, f"{name}: failed")
        result.error = f"{type(exc).__name__}: {exc}"
        result.details["traceback"] = traceback.format_exc()
        return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--suite", choices=(*SUITES, "all"), default="all")
    parser.add_argument("--runs", type=int, default=3, help="interleaved runs per measurement (median; >= 3 for real figures)")
    parser.add_argument("--files", type=int, default=5000, help="files in the generated tree")
    parser.add_argument("--megabytes", type=float, default=200.0, help="approximate size of the generated tree (MiB)")
    parser.add_argument("--seed", type=int, default=contexts.DEFAULT_SEED)
    parser.add_argument("--json", metavar="FILE", help="write every number here")
    parser.add_argument("--profile", action="store_true", help="core: also cProfile one cold and one unchanged sync")
    opts = parser.parse_args(argv)
    if opts.runs < 1 or opts.files < 1 or opts.megabytes < 0:
        parser.error("--runs and --files must be at least 1, --megabytes not negative")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)

    machine = _machine()
    machine["bytecode"] = compile_bytecode()
    print(f"benchmarks: {opts.files} files, ~{opts.megabytes:g} MiB, {opts.runs} runs, seed {opts.seed}; "
          f"{machine['cpus']} CPUs, load {machine['loadavg'][0]:.2f}; {machine['bytecode']}", flush=True)
    names = SUITES if opts.suite == "all" else (opts.suite,)
    results: list[SuiteResult] = []
    started = time.monotonic()
    interrupted = False
    current = names[0]
    try:
        for name in names:
            current = name
            result = _run_suite(name, opts)
            results.append(result)
            print(format_table(result) + "\n", flush=True)
    except KeyboardInterrupt:
        interrupted = True
        results.append(SuiteResult(current, f"{current}: interrupted", error="interrupted"))
        print("\ninterrupted: everything started has been stopped and removed", file=sys.stderr)
    summary, complete = format_summary(results)
    print(summary)
    if opts.json:
        with open(opts.json, "w") as fh:
            json.dump({"parameters": {k: v for k, v in vars(opts).items() if k != "json"},
                       "machine": machine, "seconds": time.monotonic() - started, "interrupted": interrupted,
                       "suites": [r.as_dict() for r in results]}, fh, indent=2)
    if interrupted:
        return 130
    return 0 if complete and all(not r.error for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
