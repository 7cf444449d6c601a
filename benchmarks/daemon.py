"""Suites "daemon" and "daemon-26.1": the docker CLI 20.10 into our reference daemon against the same CLI into
the real daemon of a generation: our daemon n against dockerd 20.10, our daemon n+1 against dockerd 26.1 (PAIRS).
Suite "daemon-buildx" (run_buildx): buildx 0.13, the docker CLI 26.1's ``docker build`` over ``POST /grpc``, into
our daemon n+1 against buildx into dockerd 26.1.

Same generated context (``FROM scratch`` + ``COPY . /``), ``docker build -q``,
whole wall time; cold and unchanged, interleaved (ours cold, dockerd cold, ours
unchanged, dockerd unchanged; the next run starts with dockerd, and so on, so
that neither side always builds unchanged right after the other's cold
build).  Cold means an empty build cache: ``docker
builder prune -af`` on dockerd; on our daemon the same prune, or, if it does
not support it, a restart on an empty ``--root`` (not timed).  Our daemon's
peak memory is its VmHWM (/proc/PID/status) read right after each cold build.
"""

from __future__ import annotations

import http.client
import importlib.util
import os
import re
import subprocess
import time
from dataclasses import dataclass

from conformance import peers, realpeers
from reference.processes import stop_process

from . import contexts
from .procs import MeasurementError, PROJECT_ROOT, Workspace, child_env, python_module, run_timed, settle
from .report import Row, SuiteResult, median

TARGET_COLD = 1.2
TARGET_UNCHANGED = 1.0
TARGET_PEAK_MB = 100.0
NOT_IMPLEMENTED = "reference daemon not implemented yet"


@dataclass(frozen=True)
class Pair:
    suite: str
    daemon: str  # a dockerd of conformance.peers
    generation: str  # our daemon's --generation


PAIRS = {"20.10": Pair("daemon", "dockerd-20.10", "n"), "26.1": Pair("daemon-26.1", "dockerd-26.1", "n+1")}


def reference_daemon_missing() -> bool:
    """True only when the package does not exist at all (a broken one must fail, not skip)."""
    return importlib.util.find_spec("reference.daemon") is None


class ReferenceDaemon:
    """``python -m reference.daemon --host unix://SOCK --root DIR`` as a child in its own session."""

    def __init__(self, workdir: str, start_timeout: float = 60.0, generation: str = "n+1"):
        self.workdir = workdir
        self.daemon_generation = generation
        self.socket_path = os.path.join(workdir, "d.sock")
        self.start_timeout = start_timeout
        self.process: subprocess.Popen | None = None
        self.generation = 0
        self.root = ""

    @property
    def host(self) -> str:
        return "unix://" + self.socket_path

    def start(self) -> "ReferenceDaemon":
        self.generation += 1
        self.root = os.path.join(self.workdir, f"root{self.generation}")
        log = open(os.path.join(self.workdir, "daemon.log"), "ab")
        try:
            self.process = subprocess.Popen(
                python_module("reference.daemon", "--host", self.host, "--root", self.root,
                              "--generation", self.daemon_generation),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=child_env(),
                cwd=PROJECT_ROOT,
                start_new_session=True,  # a Ctrl-C must not reach it before stop() runs
            )
        finally:
            log.close()
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise MeasurementError(f"the reference daemon exited with status {self.process.returncode}:\n"
                                       + self.log_tail())
            try:
                status, _, _ = realpeers.unix_http_get(self.socket_path, "/_ping", timeout=2.0)
                if status == 200:
                    return self
            except (OSError, http.client.HTTPException):
                pass
            time.sleep(0.05)
        raise MeasurementError(f"the reference daemon did not answer /_ping within {self.start_timeout:.0f} s:\n"
                               + self.log_tail())

    def stop(self) -> None:
        if self.process is None:
            return
        stop_process(self.process, 10)
        self.process = None
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)

    def restart_empty(self) -> None:
        self.stop()
        try:
            self.start()
        except BaseException:
            self.stop()
            raise

    def __enter__(self) -> "ReferenceDaemon":
        try:
            return self.start()
        except BaseException:
            self.stop()  # __exit__ does not run when __enter__ fails
            raise

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def peak_rss_mb(self) -> float | None:
        if self.process is None:
            return None
        try:
            with open(f"/proc/{self.process.pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(os.path.join(self.workdir, "daemon.log"), errors="replace") as fh:
                return "\n".join(fh.read().splitlines()[-lines:])
        except OSError:
            return ""


_RECLAIMED = re.compile(r"^Total(?: reclaimed space)?:\s*(\S+)", re.M)


def reclaimed_nothing(prune_output: str) -> bool:
    m = _RECLAIMED.search(prune_output)
    return m is None or m.group(1) in ("0B", "0")


def _cli_env(host: str, config_dir: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_") and k != "BUILDKIT_PROGRESS"}
    env.update(DOCKER_HOST=host, DOCKER_BUILDKIT="1", DOCKER_CONFIG=config_dir)
    return env


def run(opts, vintage: str = "20.10") -> SuiteResult:
    pair = PAIRS[vintage]
    result = SuiteResult(pair.suite, f"{pair.suite}: docker CLI 20.10 into our daemon {pair.generation} vs into "
                                     f"dockerd {vintage}", ours_name="our daemon", peer_name=f"dockerd {vintage}")
    if reference_daemon_missing():
        result.skipped = NOT_IMPLEMENTED
        return result
    reason = realpeers.no_docker_reason(pair.daemon, realpeers.DEFAULT_CLIENT)
    if reason:
        result.error = f"real peers unavailable: {reason}"
        return result
    samples = {"ours": {"cold": [], "unchanged": []}, "dockerd": {"cold": [], "unchanged": []}, "peak_mb": []}
    result.details["samples"] = samples
    restarted_for_cold = False
    with Workspace("dmn") as ws:
        context = ws.sub("ctx")
        tree = contexts.generate_tree(context, opts.files, opts.megabytes, seed=opts.seed, dockerfile=True)
        contexts.preread(context)
        result.details["tree"] = tree.describe()
        print(f"  {pair.suite}: context {tree.describe()}; {opts.runs} interleaved runs", flush=True)
        os.makedirs(ws.sub("ours"))
        with realpeers.PrivateDockerd(pair.daemon) as dockerd, \
                ReferenceDaemon(ws.sub("ours"), generation=pair.generation) as ours:
            envs = {"dockerd": _cli_env(dockerd.host, ws.sub("cfg-dockerd")),
                    "ours": _cli_env(ours.host, ws.sub("cfg-ours"))}

            def cli(target: str, *args: str) -> subprocess.CompletedProcess:
                return subprocess.run([realpeers.DOCKER_CLI, *args], env=envs[target], capture_output=True,
                                      text=True, timeout=300)

            def build(target: str, what: str) -> float:
                settle()
                timed = run_timed([realpeers.DOCKER_CLI, "build", "-q", context], env=envs[target],
                                  scratch=ws.path, timeout=900)
                return timed.check(f"docker build into {target} ({what})").seconds

            def make_cold(run_index: int) -> None:
                nonlocal restarted_for_cold
                prune = cli("dockerd", "builder", "prune", "-af")
                if prune.returncode != 0:
                    raise MeasurementError(f"docker builder prune on dockerd failed: {prune.stderr.strip()}")
                prune = cli("ours", "builder", "prune", "-af")
                # After a build there is cache to reclaim: a prune that reclaims nothing did not make it cold.
                if prune.returncode != 0 or (run_index > 0 and reclaimed_nothing(prune.stdout)):
                    ours.restart_empty()
                    restarted_for_cold = True

            _interleaved_runs(opts.runs, pair.suite, samples, ours, make_cold, build)

    _timing_rows(result, samples, TARGET_COLD, TARGET_UNCHANGED, tree)
    result.notes.append(f"context: {tree.describe()}; docker CLI 20.10 'build -q', whole wall time; "
                        f"median of {opts.runs} interleaved runs" + (" (fewer than 3: indicative only)"
                                                                        if opts.runs < 3 else ""))
    result.notes.append(f"ours: python -m reference.daemon --generation {pair.generation}; peer: "
                        f"{peers.version(pair.daemon) or pair.daemon} (private)")
    result.notes.append("cold: 'docker builder prune -af' on dockerd; on our daemon "
                        + ("a restart on an empty --root (its prune failed or reclaimed nothing)" if restarted_for_cold
                           else "the same prune"))
    return result


# -- suite "daemon-buildx": buildx 0.13 into our daemon n+1 against buildx into dockerd 26.1 -------------------

BUILDX_CLIENT = "docker-cli-26.1"
TARGET_BUILDX_COLD = 1.0
TARGET_BUILDX_UNCHANGED = 1.0


def _interleaved_runs(runs: int, suite: str, samples: dict, ours: ReferenceDaemon, make_cold, build) -> None:
    """``runs`` rounds of: ``make_cold(round)``, a cold build on each daemon (our peak RSS read after ours), then
    an unchanged build on each. Whoever goes first in a phase runs its unchanged build right after the other's cold
    one (whose writes are still being flushed): the order alternates per round."""
    for run_index in range(runs):
        make_cold(run_index)
        order = ("ours", "dockerd") if run_index % 2 == 0 else ("dockerd", "ours")
        for target in order:
            samples[target]["cold"].append(build(target, "cold"))
            if target == "ours":
                peak = ours.peak_rss_mb()
                if peak is not None:
                    samples["peak_mb"].append(peak)
        for target in order:
            samples[target]["unchanged"].append(build(target, "unchanged"))
        print(f"  {suite}: run {run_index + 1}/{runs}: cold {samples['ours']['cold'][-1]:.3f} s vs "
              f"{samples['dockerd']['cold'][-1]:.3f} s, unchanged {samples['ours']['unchanged'][-1]:.3f} s "
              f"vs {samples['dockerd']['unchanged'][-1]:.3f} s", flush=True)


def _timing_rows(result: SuiteResult, samples: dict, target_cold: float, target_unchanged: float, tree) -> None:
    """The cold and unchanged wall-time medians against their targets, and our daemon's worst peak RSS."""
    for label, kind, target in (("wall time, cold", "cold", target_cold),
                                ("wall time, unchanged", "unchanged", target_unchanged)):
        ours_s, peer_s = samples["ours"][kind], samples["dockerd"][kind]
        result.rows.append(Row(label, median(ours_s), median(peer_s), target=target,
                               ours_samples=ours_s, peer_samples=peer_s))
    peaks = samples["peak_mb"]
    result.rows.append(Row("our daemon's peak RSS (VmHWM)", max(peaks) if peaks else None, None, unit="MB",
                           target=TARGET_PEAK_MB, target_kind="absolute", ours_samples=peaks,
                           error="" if peaks else "VmHWM could not be read",
                           note=f"read after each cold build of ~{tree.total_bytes / 1e6:.0f} MB; worst run"))


def _buildx_env(host: str, config_dir: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "BUILDKIT_", "BUILDX_"))}
    env.update(peers.client_env(BUILDX_CLIENT, config_dir), DOCKER_HOST=host)
    return env


def run_buildx(opts) -> SuiteResult:
    """The docker CLI 26.1's ``docker build -q`` (buildx 0.13, docker driver, over POST /grpc) into our daemon n+1
    and into a private dockerd 26.1, interleaved as in ``run``; cold is an empty build cache on both (``buildx
    prune -af``, which reaches our context cache through Control/Prune)."""
    suite = "daemon-buildx"
    result = SuiteResult(suite, f"{suite}: buildx 0.13 into our daemon n+1 vs into dockerd 26.1",
                         ours_name="our daemon", peer_name="dockerd 26.1")
    if reference_daemon_missing():
        result.skipped = NOT_IMPLEMENTED
        return result
    reason = realpeers.no_docker_reason("dockerd-26.1", BUILDX_CLIENT)
    if reason:
        result.error = f"real peers unavailable: {reason}"
        return result
    samples = {"ours": {"cold": [], "unchanged": []}, "dockerd": {"cold": [], "unchanged": []}, "peak_mb": []}
    result.details["samples"] = samples
    buildx = peers.binary(BUILDX_CLIENT)
    with Workspace("dbx") as ws:
        context = ws.sub("ctx")
        tree = contexts.generate_tree(context, opts.files, opts.megabytes, seed=opts.seed, dockerfile=True)
        contexts.preread(context)
        result.details["tree"] = tree.describe()
        print(f"  {suite}: context {tree.describe()}; {opts.runs} interleaved runs", flush=True)
        os.makedirs(ws.sub("ours"))
        with realpeers.PrivateDockerd("dockerd-26.1") as dockerd, \
                ReferenceDaemon(ws.sub("ours"), generation="n+1") as ours:
            envs = {"dockerd": _buildx_env(dockerd.host, ws.sub("cfg-dockerd")),
                    "ours": _buildx_env(ours.host, ws.sub("cfg-ours"))}

            def prune(target: str) -> subprocess.CompletedProcess:
                return subprocess.run([buildx, "buildx", "prune", "-af"], env=envs[target], capture_output=True,
                                      text=True, timeout=300)

            def build(target: str, what: str) -> float:
                settle()
                timed = run_timed([buildx, "build", "-q", context], env=envs[target], scratch=ws.path, timeout=900)
                return timed.check(f"buildx build into {target} ({what})").seconds

            def make_cold(run_index: int) -> None:
                for target in ("dockerd", "ours"):
                    pruned = prune(target)
                    if pruned.returncode != 0:
                        raise MeasurementError(f"buildx prune on {target} failed: {pruned.stderr.strip()}")
                    if target == "ours" and run_index > 0 and reclaimed_nothing(pruned.stdout):
                        raise MeasurementError("buildx prune -af reclaimed nothing on our daemon: not cold")

            _interleaved_runs(opts.runs, suite, samples, ours, make_cold, build)

    _timing_rows(result, samples, TARGET_BUILDX_COLD, TARGET_BUILDX_UNCHANGED, tree)
    result.notes.append(f"context: {tree.describe()}; buildx 'build -q' (docker driver, image export), whole wall "
                        f"time including buildx's two capability probes; median of {opts.runs} interleaved runs"
                        + (" (fewer than 3: indicative only)" if opts.runs < 3 else ""))
    result.notes.append(f"ours: python -m reference.daemon --generation n+1; peer: "
                        f"{peers.version('dockerd-26.1') or 'dockerd-26.1'} (private); client: "
                        f"{peers.version(BUILDX_CLIENT) or BUILDX_CLIENT}")
    result.notes.append("cold: 'docker buildx prune -af' on both daemons before each run")
    return result
