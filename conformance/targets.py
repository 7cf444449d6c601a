"""What the suite tests: daemons (it plays the client) and clients (it plays the daemon).

A target is named, knows how to start and stop itself when it is embedded,
and says which implementation it is, so known deviations of that
implementation can be marked expected-to-fail by requirement ID.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from reference.dockerhost import api_call


@dataclass(frozen=True)
class DaemonSpec:
    name: str
    url: str | None = None  # external daemon; None = start the reference daemon
    generation: str = "n+1"
    transport: str = "h2"

    @property
    def id(self) -> str:
        return f"daemon={self.name}"


@dataclass(frozen=True)
class ClientSpec:
    name: str
    command: str  # template; "{context}" is replaced by [extra args..., context]
    generation: str = "n+1"
    env: tuple[tuple[str, str], ...] = ()

    @property
    def id(self) -> str:
        return f"client={self.name}"


def reference_client_command(generation: str, transport: str = "h2") -> str:
    return (f"{shlex.quote(sys.executable)} -m reference.client build --progress plain "
            f"--generation {generation} --transport {transport} {{context}}")


DOCKER_CLI_COMMAND = "/usr/bin/docker build --progress plain {context}"


def embedded_daemon_specs() -> list[DaemonSpec]:
    return [DaemonSpec("reference-n", generation="n"), DaemonSpec("reference-n+1", generation="n+1"),
            DaemonSpec("reference-n+1-grpcio", generation="n+1", transport="grpcio")]


def embedded_client_specs() -> list[ClientSpec]:
    return [ClientSpec("reference-n", reference_client_command("n"), "n"),
            ClientSpec("reference-n+1", reference_client_command("n+1"), "n+1"),
            ClientSpec("reference-n+1-grpcio", reference_client_command("n+1", "grpcio"), "n+1")]


@dataclass
class DaemonTarget:
    spec: DaemonSpec
    host: str
    implementation: str
    process: subprocess.Popen | None = None
    root: str | None = None
    log_path: str | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def generation(self) -> str:
        return self.spec.generation

    def alive(self) -> bool:
        """Whether the daemon still answers (a destructive case may have killed it)."""
        if self.process is not None and self.process.poll() is not None:
            return False
        try:
            resp, _ = api_call("GET", "/_ping", host=self.host)
            return resp.status == 200
        except OSError:
            return False

    def logs(self) -> str:
        if self.log_path and os.path.exists(self.log_path):
            with open(self.log_path, errors="replace") as fh:
                return fh.read()[-8000:]
        return ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.root:
            shutil.rmtree(self.root, ignore_errors=True)


def identify(host: str) -> str:
    """'dockerd 20.10.24', 'reference-daemon 0.1.0 (n+1)', or what /version says."""
    try:
        resp, body = api_call("GET", "/version", host=host)
        info = json.loads(body)
    except (OSError, ValueError) as exc:
        return f"unknown ({exc})"
    version = info.get("Version", "?")
    for component in info.get("Components") or []:
        if component.get("Name") == "reference-daemon":
            return f"reference-daemon {component.get('Version', version)}"
    if info.get("Platform", {}).get("Name", "").startswith("Docker Engine") or "GitCommit" in info:
        return f"dockerd {version}"
    return f"{info.get('Platform', {}).get('Name', 'daemon')} {version}"


def start_reference_daemon(spec: DaemonSpec, timeout: float = 30.0) -> DaemonTarget:
    root = tempfile.mkdtemp(prefix="conf-d-", dir="/tmp")
    sock = os.path.join(root, "d.sock")
    log_path = os.path.join(root, "daemon.log")
    log = open(log_path, "wb")
    cmd = [sys.executable, "-m", "reference.daemon", "--host", f"unix://{sock}", "--root", os.path.join(root, "root"),
           "--generation", spec.generation, "--transport", spec.transport]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    host = f"unix://{sock}"
    target = DaemonTarget(spec, host, "reference-daemon", proc, root, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"reference daemon exited with {proc.returncode}:\n{target.logs()}")
        if os.path.exists(sock) and target.alive():
            target.implementation = identify(host) + ("" if spec.transport == "h2" else f" via {spec.transport}")
            return target
        time.sleep(0.05)
    target.stop()
    raise RuntimeError(f"reference daemon not ready after {timeout} s:\n{target.logs()}")


def attach_daemon(spec: DaemonSpec) -> DaemonTarget:
    return DaemonTarget(spec, spec.url, identify(spec.url))


@dataclass
class ClientRun:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    argv: list[str] = field(default_factory=list)

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


@dataclass
class ClientTarget:
    spec: ClientSpec
    implementation: str

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def generation(self) -> str:
        return self.spec.generation

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
        if "DOCKER_CONFIG" not in (env or {}):
            full_env["DOCKER_CONFIG"] = tempfile.mkdtemp(prefix="conf-cfg-")
        full_env.update(env or {})
        argv = self.argv(context, list(extra_args))
        started = time.monotonic()
        try:
            proc = subprocess.run(argv, env=full_env, capture_output=True, timeout=timeout, text=True)
            return ClientRun(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started, argv)
        except subprocess.TimeoutExpired as exc:
            def text(value) -> str:
                return value.decode("utf-8", "replace") if isinstance(value, bytes) else (value or "")

            return ClientRun(-9, text(exc.stdout), text(exc.stderr) + f"\n<timed out after {timeout} s>",
                             time.monotonic() - started, argv)
