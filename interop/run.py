"""Run the conformance suite against real peers and the embedded reference pairs; merge a matrix.

    python -m interop.run [--dind-image IMG[,IMG...]] [--report-root reports/interop] [--jobs 2] [--no-dind]
                          [--no-skew] [-- PYTEST ARGS]

Runs (each a separate process writing DIR/{pytest.log,run.json} and, the pytest ones,
DIR/{results.json,summary.md,junit.xml}):

  dind-<tag>          daemon role against dockerd in Docker in Docker, one per image (default: dockerd 20.10
                      and 26.1; offline, images built from the peers' binaries), i.e.
                      pytest conformance --daemon-under-test unix:///tmp/dsc-dind-.../docker.sock
  docker-cli-20.10    client role with the real CLI (--client-under-test peer:docker-cli-20.10, POST /build)
  docker-cli-26.1     client role with the CLI 26.1 + buildx 0.13 (--client-under-test peer:docker-cli-26.1,
                      BuildKit's control API on POST /grpc)
  embedded            the embedded reference pairs (plain pytest conformance)
  differential-<tag>  one docker CLI command into our reference daemon and into the dind daemon: identical
                      local exports (conformance/test_differential.py, -p conformance.differential)
  skew                the client x daemon skew matrix: real builds of one awkward context by the docker CLI 20.10,
                      the CLI 26.1 + buildx 0.13 and the reference clients n, n+1 into dockerd 20.10, 26.1 and the
                      reference daemons n, n+1, requests counted on the wire (python -m interop.skew, skew.json)

Host daemon for the dind containers: DOCKER_HOST, else /var/run/docker.sock, else (root, docker.io installed)
a private dockerd started here for the duration (conformance.realpeers.PrivateDockerd). Without any, the dind
runs are skipped with a warning, or, when CI is set, the whole run fails.

Exit status: 0 when every run exited 0, no test ended FAIL or ERROR (known deviations, xfail, are fine) and no
skew cell FAILed (a documented known defect is fine).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from conformance import dind, realpeers
from conformance import peers
from conformance.targets import PEER_PREFIX, identify

from . import matrix as matrix_module

DEFAULT_REPORT_ROOT = os.path.join("reports", "interop")
# The real clients put under test, one client-role run each: the CLI 20.10 builds with POST /build, the CLI 26.1
# runs buildx 0.13, which builds through BuildKit's control API on POST /grpc.
CLIENT_PEERS = ("docker-cli-20.10", "docker-cli-26.1")
CLIENT_PEERS_LABELS = {"docker-cli-20.10": "docker CLI 20.10", "docker-cli-26.1": "docker CLI 26.1 + buildx 0.13"}
# pytest runs from the project root, whatever the caller's directory (test paths are relative to it).
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Run:
    name: str
    kind: str  # daemon, client, embedded, differential, skew
    implementation: str
    pytest_args: list[str]
    argv: list[str] | None = None  # a command that is not a pytest run (the skew matrix)
    report_dir: str = ""
    returncode: int | None = None
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)  # extra facts for run.json (the dind image and how it was got)


def _log(message: str) -> None:
    print(f"[interop {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _command(run: Run, extra: list[str]) -> list[str]:
    """The run's pytest command line (with the extra arguments), or its own argv."""
    if run.argv is not None:
        return list(run.argv)
    return [sys.executable, "-m", "pytest", *run.pytest_args,
            "-p", "conformance.differential", "-p", "no:cacheprovider",
            "--report-dir", run.report_dir, "-q", "-rfEX", *extra]


def _start(run: Run, extra: list[str]) -> subprocess.Popen:
    os.makedirs(run.report_dir, exist_ok=True)
    with open(os.path.join(run.report_dir, "run.json"), "w") as fh:
        json.dump({"kind": run.kind, "implementation": run.implementation, **run.details,
                   "command": " ".join(_command(run, extra))}, fh, indent=2)
    log = open(os.path.join(run.report_dir, "pytest.log"), "wb")
    try:
        # Own process group, so a timeout can stop pytest and the daemons and clients it started.
        return subprocess.Popen(_command(run, extra), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=PROJECT_ROOT)
    finally:
        log.close()


def _stop_group(process: subprocess.Popen) -> None:
    # SIGINT first: pytest then finishes the session and still writes results.json for what ran.
    for signum, grace in ((signal.SIGINT, 30.0), (signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            return
        try:
            process.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _last_line(path: str) -> str:
    try:
        with open(path, errors="replace") as fh:
            lines = [line.strip() for line in fh if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def _judge(run: Run) -> None:
    """Fill run.problems from its exit status and its results.json (skew.json for the skew matrix)."""
    if run.kind == "skew":
        _judge_skew(run)
        return
    if run.returncode == 5:
        run.problems.append("pytest collected no tests")
    elif run.returncode != 0:
        run.problems.append(f"pytest exited with status {run.returncode}")
    results_path = os.path.join(run.report_dir, "results.json")
    if not os.path.isfile(results_path):
        run.problems.append("no results.json")
        return
    with open(results_path) as fh:
        tests = json.load(fh).get("tests", [])
    bad = [t for t in tests if t["outcome"] in ("FAIL", "ERROR")]
    if bad:
        run.problems.append(f"{len(bad)} test(s) FAIL or ERROR")


def _judge_skew(run: Run) -> None:
    path = os.path.join(run.report_dir, "skew.json")
    if not os.path.isfile(path):
        run.problems.append(f"no skew.json (exit status {run.returncode})")
        return
    with open(path) as fh:
        cells = json.load(fh).get("cells", [])
    failed = [f"{c['client']} -> {c['daemon']}" for c in cells if c["verdict"] == "FAIL"]
    if failed:
        run.problems.append(f"{len(failed)} skew cell(s) FAIL: {', '.join(failed)}")
    elif run.returncode != 0:
        run.problems.append(f"the skew matrix exited with status {run.returncode}")


def execute(runs: list[Run], extra: list[str], jobs: int, timeout: float) -> None:
    """Run up to `jobs` pytest processes at a time; each is stopped after `timeout` seconds."""
    pending = list(runs)
    active: list[tuple[Run, subprocess.Popen, float]] = []
    while pending or active:
        while pending and len(active) < jobs:
            run = pending.pop(0)
            _log(f"start {run.name}: {' '.join(_command(run, extra))}")
            active.append((run, _start(run, extra), time.monotonic()))
        time.sleep(0.2)
        for entry in list(active):
            run, process, started = entry
            if process.poll() is None and time.monotonic() - started > timeout:
                _stop_group(process)
                run.problems.append(f"stopped after {timeout:.0f} s")
            if process.poll() is None:
                continue
            active.remove(entry)
            run.returncode = process.returncode
            run.seconds = time.monotonic() - started
            _judge(run)
            verdict = "ok" if not run.problems else "PROBLEM: " + "; ".join(run.problems)
            _log(f"done  {run.name} in {run.seconds:.1f} s: {_last_line(os.path.join(run.report_dir, 'pytest.log'))}"
                 f" [{verdict}]")


def plan_runs(dind_daemons: list[tuple[dind.ResolvedImage, dind.DindDaemon]], report_root: str,
              with_cli: bool | tuple[str, ...], with_skew: bool = False) -> list[Run]:
    # Longest first (the embedded pairs), so the other runs share the second job slot.
    # (every generation the reference has, n-1 too: the matrix shows all the pairs)
    runs: list[Run] = [Run("embedded", "embedded", "embedded reference pairs",
                           ["conformance", "--embedded-generations", "all"])]
    for resolved, daemon in dind_daemons:
        details = {"requested_image": resolved.requested, "image": resolved.image, "image_source": resolved.how}
        # identify() reads /version: "dockerd 20.10.24+dfsg1" (an image of another version names itself).
        runs.append(Run(f"dind-{resolved.tag}", "daemon", f"{identify(daemon.url)} (dind {resolved.tag})",
                        ["conformance", "--daemon-under-test", daemon.url], details=details))
    clients = CLIENT_PEERS if with_cli is True else tuple(with_cli or ())
    for name in clients:
        label = CLIENT_PEERS_LABELS[name]
        runs.append(Run(name, "client", f"{label} ({peers.version(name)})",
                        ["conformance", "--client-under-test", PEER_PREFIX + name]))
    for resolved, daemon in dind_daemons:
        runs.append(Run(f"differential-{resolved.tag}", "differential",
                        f"differential: our daemon n+1 vs dind {resolved.tag}",
                        ["conformance/test_differential.py", "--differential-daemon", daemon.url],
                        details={"image": resolved.image}))
    if with_skew:
        runs.append(Run("skew", "skew", "client x daemon skew matrix (real builds, requests counted on the wire)",
                        [], argv=[sys.executable, "-m", "interop.skew", "--report-dir",
                                  os.path.join(report_root, "skew")]))
    for run in runs:
        run.report_dir = os.path.join(report_root, run.name)
        if run.kind not in ("embedded", "skew"):
            # The suite's self-check is about the catalogue, not the peer: once, in the embedded run.
            run.pytest_args.append("--ignore=conformance/test_selfcheck.py")
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dind-image", default=None,
                        help=f"image(s) for Docker in Docker, comma-separated (default: ${dind.IMAGES_ENV} or "
                             f"{','.join(dind.DEFAULT_IMAGES)}); offline, {dind.OFFLINE_IMAGE} is built instead")
    parser.add_argument("--report-root", default=DEFAULT_REPORT_ROOT)
    parser.add_argument("--jobs", type=int, default=2, help="pytest runs at a time (default 2)")
    parser.add_argument("--run-timeout", type=float, default=600.0, help="seconds before a run is stopped")
    parser.add_argument("--no-dind", action="store_true", help="skip the dind and differential runs")
    parser.add_argument("--no-skew", action="store_true", help="skip the client x daemon skew matrix")
    parser.add_argument("pytest_args", nargs=argparse.REMAINDER, help="-- extra arguments for every pytest run")
    args = parser.parse_args(argv)
    extra = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
    args.report_root = os.path.abspath(args.report_root)
    in_ci = realpeers.running_in_ci()
    started = time.monotonic()
    setup_problems: list[str] = []

    shutil.rmtree(args.report_root, ignore_errors=True)  # a stale run must not reach the matrix
    os.makedirs(args.report_root)

    with_cli = []
    for name in CLIENT_PEERS:
        missing_cli = peers.missing_reason(name)
        if missing_cli is None:
            with_cli.append(name)
        else:
            message = f"client-role interop run of {name} skipped: {missing_cli}"
            (setup_problems.append if in_ci else _log)(message)
    with_cli = tuple(with_cli)

    missing_skew = "skipped (--no-skew)" if args.no_skew else realpeers.no_docker_reason(
        "dockerd-20.10", "dockerd-26.1", "docker-cli-20.10", "docker-cli-26.1")
    with_skew = missing_skew is None
    if not with_skew and not args.no_skew:
        message = f"skew matrix skipped: {missing_skew}"
        (setup_problems.append if in_ci else _log)(message)

    with contextlib.ExitStack() as stack:
        daemons: list[tuple[dind.ResolvedImage, dind.DindDaemon]] = []
        if not args.no_dind:
            try:
                host_url = stack.enter_context(dind.host_daemon())
                _log(f"host daemon for dind: {host_url}")
                daemons = stack.enter_context(
                    dind.running_dind(dind.parse_images(args.dind_image), host_url=host_url, log=_log))
            except dind.NoHostDaemon as exc:
                if in_ci:
                    setup_problems.append(str(exc))
                else:
                    _log(f"WARNING: {exc}; dind and differential runs skipped")
            except dind.DindError as exc:
                setup_problems.append(str(exc))
                _log(f"ERROR: {exc}")
        runs = plan_runs(daemons, args.report_root, with_cli, with_skew)
        execute(runs, extra, max(1, args.jobs), args.run_timeout)
        for resolved, daemon in daemons:  # for reading failures after the containers are gone
            with open(os.path.join(args.report_root, f"dind-{resolved.tag}", "dockerd.log"), "w") as fh:
                fh.write(daemon.logs())
    # The dind containers and the host daemon (when started here) are stopped by now.

    merged = matrix_module.write_matrix(args.report_root)
    sys.stdout.write("\n" + matrix_module.render_markdown(merged) + "\n")
    problems = setup_problems + [f"{run.name}: {p}" for run in runs for p in run.problems]
    _log(f"reports: {args.report_root}/matrix.md, matrix.json; per run: {args.report_root}/<run>/")
    _log(f"total {time.monotonic() - started:.1f} s; " + ("ok" if not problems else "PROBLEMS:"))
    for problem in problems:
        print(f"  - {problem}", flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
