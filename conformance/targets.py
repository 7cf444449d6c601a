"""What the suite tests: daemons (it plays the client) and clients (it plays the daemon).

A target is named, knows how to start and stop itself when it is embedded
or a real peer started for the run (``peer:NAME``), and says which
implementation it is (``conformance.identify``: from what it reports and
does), so known deviations of that implementation can be marked
expected-to-fail by requirement ID.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from reference.dockerhost import api_call
from reference.processes import stop_process
from reference.socketdirs import socket_dir

from . import peers
from .harness.warm_client import WarmClientLauncher
from .identify import (
    Identity, family_of, identify_client_from_requests, identify_client_from_version, identify_daemon,
)

# `--daemon-under-test peer:dockerd-26.1` / `--client-under-test peer:docker-cli-26.1`: a real peer of the
# catalogue (conformance/peers), started or run by the suite itself.
PEER_PREFIX = "peer:"


@dataclass(frozen=True)
class DaemonSpec:
    name: str
    url: str | None = None  # external daemon; None = start the reference daemon
    generation: str = "n+1"  # "auto": as detected (conformance.identify), else n+1
    transport: str = "h2"
    peer: str | None = None  # a daemon of the peers catalogue, started privately for the run
    daemon_args: tuple[str, ...] = ()  # extra options of an embedded reference daemon (e.g. faster timers)

    @property
    def id(self) -> str:
        return f"daemon={self.name}"


@dataclass(frozen=True)
class ClientSpec:
    name: str
    command: str  # template; "{context}" is replaced by [extra args..., context]
    generation: str = "n+1"  # "auto": as detected (conformance.identify), else n+1
    env: tuple[tuple[str, str], ...] = ()
    peer: str | None = None  # a client of the peers catalogue (its plugins are linked into DOCKER_CONFIG)
    implementation: str | None = None  # known without a probe (the embedded reference clients)
    warm: bool = False  # an embedded reference client: run from a warm interpreter (harness/warm_client.py)

    @property
    def id(self) -> str:
        return f"client={self.name}"


def reference_client_command(generation: str, transport: str = "h2", *, hang_timeout: float | None = None) -> str:
    """The command of a reference client; ``hang_timeout``: its grace after a failed step (None: its default,
    the 20 s a real user waits for)."""
    grace = "" if hang_timeout is None else f"--hang-timeout {hang_timeout:g} "
    return (f"{shlex.quote(sys.executable)} -m reference.client build --progress plain "
            f"--generation {generation} --transport {transport} {grace}{{context}}")


def peer_client_spec(name: str, generation: str = "auto") -> ClientSpec:
    """The ClientSpec of a client peer: its `docker build --progress plain` with its plugins."""
    peer = peers.program(name)
    if peer.kind != "client":
        raise ValueError(f"{name} is not a client peer")
    return ClientSpec(name, peers.client_command(name, "--progress plain"), generation, peer=name)


def peer_daemon_spec(name: str, generation: str = "auto") -> DaemonSpec:
    if peers.program(name).kind != "daemon":
        raise ValueError(f"{name} is not a daemon peer")
    return DaemonSpec(name, generation=generation, peer=name)


# The embedded daemons run their generation's session schedule faster than the real daemons do; they
# report their timers on /version, and the timing cases judge them by them (DaemonTarget.timing, scaled from
# the generation's windows). The defaults of reference/daemon are the real daemons' (reference/daemon/config.py);
# real peers always keep their own.
#   n-1, n (dockerd 20.10: checks every 1 s, 10 s deadline, an unknown session fails after 5 s):
#     checks every 0.25 s, 5 s deadline, an unknown session fails after 0.5 s.
#   n+1 (dockerd 26.1: checks every 5 s, 30 s deadline, 5 + 5 s session wait):
#     checks every 0.25 s, 3 s deadline, 0.25 + 0.25 s session wait.
# The cases wait on the interval and the session waits, never on a deadline: the deadlines stay long enough
# for a client that is slow to answer on a loaded machine (-n auto beside real daemons).
# Their roots go when they stop, so they write them without fsync. They refuse listings deeper than 256
# directories where dockerd goes to PATH_MAX (2048 one-byte names): the hostile 10,000-deep listing then fails
# after 257 entries instead of 2049 (4 MB of paths, 5 s of the main job); tests/test_hostile_daemon.py and
# tests/test_limits.py hold the reference daemon to the default limit.
_EMBEDDED_COMMON = ("--no-fsync", "--max-depth", "256")
EMBEDDED_N_DAEMON_ARGS = ("--health-interval", "0.25", "--health-timeout", "5", "--session-wait", "0.5",
                          *_EMBEDDED_COMMON)
EMBEDDED_N_PLUS_1_DAEMON_ARGS = ("--health-interval", "0.25", "--health-timeout", "3",
                                 "--session-wait", "0.25", "--session-group-wait", "0.25", *_EMBEDDED_COMMON)
# The embedded clients' grace after a failed step whose build never ends (the reference client's default,
# 20 s, is what a user waits; TIMEOUT-5 only asks for an end within its bound).
EMBEDDED_CLIENT_HANG_TIMEOUT = 0.5
# The launcher of the embedded clients' runs, one per process; the plugin closes it at pytest_unconfigure.
WARM_CLIENTS = WarmClientLauncher()


# One embedded pair per generation; generation n runs on the grpcio transport, so that the independent
# second gRPC stack is graded by the whole suite too (the transports are orthogonal to the generations).
# By default the generations real Docker has (20.10, 26.1); n-1, the 2017 design, has no real peer, and the main
# job leaves it out (--embedded-generations all; ./run-tests and the interop matrix run it).
EMBEDDED_GENERATIONS = ("n-1", "n", "n+1")
DEFAULT_EMBEDDED_GENERATIONS = "n,n+1"


def embedded_generations(value: str) -> tuple[str, ...]:
    """The --embedded-generations value: a comma-separated list of generations, or all."""
    if value.strip() == "all":
        return EMBEDDED_GENERATIONS
    chosen = tuple(part.strip() for part in value.split(",") if part.strip())
    unknown = [g for g in chosen if g not in EMBEDDED_GENERATIONS]
    if unknown or not chosen:
        raise ValueError(f"unknown generation(s) {', '.join(unknown) or value!r}: use n-1, n, n+1 or all")
    return tuple(g for g in EMBEDDED_GENERATIONS if g in chosen)


def embedded_daemon_specs(generations: tuple[str, ...] = EMBEDDED_GENERATIONS) -> list[DaemonSpec]:
    specs = [DaemonSpec("reference-n-1", generation="n-1", daemon_args=EMBEDDED_N_DAEMON_ARGS),
             DaemonSpec("reference-n-grpcio", generation="n", transport="grpcio", daemon_args=EMBEDDED_N_DAEMON_ARGS),
             DaemonSpec("reference-n+1", generation="n+1", daemon_args=EMBEDDED_N_PLUS_1_DAEMON_ARGS)]
    return [spec for spec in specs if spec.generation in generations]


def embedded_client_specs(generations: tuple[str, ...] = EMBEDDED_GENERATIONS) -> list[ClientSpec]:
    grace = EMBEDDED_CLIENT_HANG_TIMEOUT
    specs = [ClientSpec("reference-n-1", reference_client_command("n-1", hang_timeout=grace), "n-1",
                        implementation="reference-client 0.1 (n-1)", warm=True),
             ClientSpec("reference-n-grpcio", reference_client_command("n", "grpcio", hang_timeout=grace), "n",
                        implementation="reference-client 0.1 (n) via grpcio", warm=True),
             ClientSpec("reference-n+1", reference_client_command("n+1", hang_timeout=grace), "n+1",
                        implementation="reference-client 0.1 (n+1)", warm=True)]
    return [spec for spec in specs if spec.generation in generations]


class _Identified:
    """What a daemon and a client target share: the generation they are graded by (claimed, else as
    identified, else n+1) and the family their known deviations are listed under."""

    spec: DaemonSpec | ClientSpec
    implementation: str
    identity: Identity | None

    @property
    def generation(self) -> str:
        if self.spec.generation != "auto":
            return self.spec.generation
        return (self.identity.generation if self.identity else None) or "n+1"

    @property
    def family(self) -> str | None:
        return family_of(self.implementation)


@dataclass
class DaemonTarget(_Identified):
    spec: DaemonSpec
    host: str
    implementation: str
    process: subprocess.Popen | None = None
    root: str | None = None
    log_path: str | None = None
    identity: Identity | None = None
    private_peer: object | None = None  # realpeers.PrivateDockerd of a peer:NAME target
    restarted_after: str | None = None  # the log tail of the private peer that died before this one

    @property
    def name(self) -> str:
        return self.spec.name


    @property
    def timing(self):
        """The session timers the daemon runs (health schedule, session waits) and the windows the timing
        cases judge them by: its generation's, or those an embedded reference daemon reports."""
        from .harness.daemon_probes import daemon_timing

        return daemon_timing(self)

    def alive(self, *, ping: bool = True) -> bool:
        """Whether the daemon still answers (a destructive case may have killed it); ``ping=False``: for a daemon
        this run started, only whether its process still runs (what the fixture asks before every case)."""
        if self.private_peer is not None and self.private_peer.process.poll() is not None:
            return False
        if self.process is not None and self.process.poll() is not None:
            return False
        if not ping and self.process is not None:
            return True
        try:
            resp, _ = api_call("GET", "/_ping", host=self.host)
            return resp.status == 200
        except OSError:
            return False

    def logs(self) -> str:
        if self.private_peer is not None:
            return self.private_peer.log_tail(120)
        if self.log_path and os.path.exists(self.log_path):
            with open(self.log_path, errors="replace") as fh:
                return fh.read()[-8000:]
        return ""

    def stop(self) -> None:
        if self.private_peer is not None:
            self.private_peer.stop()
        stop_process(self.process, 10)
        if self.root:
            shutil.rmtree(self.root, ignore_errors=True)


def identify(host: str) -> str:
    """'dockerd 20.10.24', 'reference-daemon 0.1.0 (n+1)', or what the daemon says it is."""
    return identify_daemon(host).implementation


def start_reference_daemon(spec: DaemonSpec, timeout: float = 30.0, *, env: dict | None = None) -> DaemonTarget:
    return start_reference_daemons([spec], timeout, env=env)[0]


def start_reference_daemons(specs: list[DaemonSpec], timeout: float = 30.0, *,
                            env: dict | None = None) -> list[DaemonTarget]:
    """Embedded reference daemons, started side by side (each spends a few tenths of a second importing);
    ``env``: variables added to their environment."""
    launched = []
    try:
        for spec in specs:
            root = socket_dir("conf-d-")
            sock = os.path.join(root, "d.sock")
            log_path = os.path.join(root, "daemon.log")
            with open(log_path, "wb") as log:
                cmd = [sys.executable, "-m", "reference.daemon", "--host", f"unix://{sock}", "--root",
                       os.path.join(root, "root"), "--generation", spec.generation, "--transport", spec.transport,
                       *spec.daemon_args]
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                        env={**os.environ, **env} if env else None)
            launched.append(DaemonTarget(spec, f"unix://{sock}", "reference-daemon", proc, root, log_path))
        deadline = time.monotonic() + timeout
        for target in launched:
            _wait_ready(target, deadline, timeout)
        return launched
    except BaseException:
        for target in launched:
            target.stop()
        raise


def _wait_ready(target: DaemonTarget, deadline: float, timeout: float) -> None:
    sock = target.host[len("unix://"):]
    while time.monotonic() < deadline:
        if target.process.poll() is not None:
            raise RuntimeError(f"reference daemon exited with {target.process.returncode}:\n{target.logs()}")
        if os.path.exists(sock) and target.alive():
            target.identity = identify_daemon(target.host)
            target.implementation = target.identity.implementation + (
                "" if target.spec.transport == "h2" else f" via {target.spec.transport}")
            return
        time.sleep(0.02)
    raise RuntimeError(f"reference daemon not ready after {timeout} s:\n{target.logs()}")


def attach_daemon(spec: DaemonSpec) -> DaemonTarget:
    identity = identify_daemon(spec.url)
    return DaemonTarget(spec, spec.url, identity.implementation, identity=identity)


def start_peer_daemon(spec: DaemonSpec) -> DaemonTarget:
    """A private daemon of the peers catalogue, for this run only."""
    from .realpeers import PrivateDockerd

    private = PrivateDockerd(spec.peer).start()
    identity = identify_daemon(private.host)
    return DaemonTarget(spec, private.host, identity.implementation, identity=identity, private_peer=private)


@dataclass
class ClientRun:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    argv: list[str] = field(default_factory=list)
    extra_args: tuple[str, ...] = ()  # the options the case added (require_build: a capability not offered)

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


@dataclass
class ClientTarget(_Identified):
    spec: ClientSpec
    implementation: str
    identity: Identity | None = None

    @property
    def name(self) -> str:
        return self.spec.name


    def argv(self, context: str, extra_args: list[str] = ()) -> list[str]:
        out = []
        for token in shlex.split(self.spec.command):
            if token == "{context}":
                out.extend(extra_args)
                out.append(context)
            else:
                out.append(token.replace("{context}", context))
        return out

    def run(self, context: str, docker_host: str, *, extra_args: list[str] = (), env: dict | None = None,
            timeout: float = 60.0) -> ClientRun:
        full_env = dict(os.environ)
        full_env.update(dict(self.spec.env))
        full_env.update({"DOCKER_HOST": docker_host, "DOCKER_BUILDKIT": "1"})
        own_config = None
        if "DOCKER_CONFIG" not in (env or {}):
            own_config = full_env["DOCKER_CONFIG"] = tempfile.mkdtemp(prefix="conf-cfg-")
        full_env.update(env or {})
        if self.spec.peer:
            full_env.update(peers.client_env(self.spec.peer, full_env["DOCKER_CONFIG"]))
        argv = self.argv(context, list(extra_args))
        started = time.monotonic()
        timed_out = f"\n<timed out after {timeout} s>"
        try:
            if self.spec.warm and WARM_CLIENTS.handles(argv):
                done = WARM_CLIENTS.run(argv, full_env, timeout)
                code, stdout, stderr = done.returncode, done.stdout, done.stderr
                if done.timed_out:
                    code, stderr = -9, stderr + timed_out
            else:
                try:
                    proc = subprocess.run(argv, env=full_env, capture_output=True, timeout=timeout, text=True)
                    code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
                except subprocess.TimeoutExpired as exc:
                    code, stdout, stderr = -9, _text(exc.stdout), _text(exc.stderr) + timed_out
            return ClientRun(code, stdout, stderr, time.monotonic() - started, argv, tuple(extra_args))
        finally:
            if own_config:
                shutil.rmtree(own_config, ignore_errors=True)


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else (value or "")


def identify_client(spec: ClientSpec, timeout: float = 30.0) -> Identity:
    """Run the client once against a recording daemon that answers every build at once, and name it
    from its requests (conformance.identify)."""
    if spec.implementation:
        return Identity(spec.implementation, family_of(spec.implementation),
                        spec.generation if spec.generation != "auto" else None, ["embedded target"])
    if spec.peer:
        report = peers.version(spec.peer)
        if report is None:
            raise RuntimeError(peers.missing_reason(spec.peer) or f"{spec.peer} does not report its version")
        return identify_client_from_version(report, peers.VINTAGES[peers.program(spec.peer).vintage].generation)
    from .harness.instrumented_daemon import InstrumentedDaemon

    context = tempfile.mkdtemp(prefix="conf-id-")
    try:
        with open(os.path.join(context, "Dockerfile"), "w") as fh:
            fh.write("FROM scratch\n")
        with InstrumentedDaemon() as daemon:
            run = ClientTarget(spec, spec.name).run(context, daemon.host, timeout=timeout)
            identity = identify_client_from_requests(list(daemon.request_log))
    finally:
        shutil.rmtree(context, ignore_errors=True)
    last = (run.stderr.strip().splitlines() or [""])[-1][:200]
    identity.evidence.append(f"probe build exited {run.returncode}" + (f": {last}" if run.returncode and last else ""))
    return identity
