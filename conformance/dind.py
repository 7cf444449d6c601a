"""Docker in Docker: a dockerd (20.10 or 26.1) in a container on a host daemon, started with testcontainers.

Library code (no pytest import). The pieces:

* ``host_daemon()``: a context manager yielding the Engine URL of a host daemon to run containers on: the
  one named by DOCKER_HOST or at /var/run/docker.sock when it answers, otherwise a ``PrivateDockerd``
  started for the occasion (root and the installed peers needed). ``NoHostDaemon`` says why not.
* ``resolve_image()``: the requested image if it is present or can be pulled; otherwise (no registry, as on
  the project's machines) a local image of the same vintage, ``session-conformance/dind:<vintage>-local``,
  assembled ``FROM scratch`` out of that vintage's peer binaries (``conformance.peers``) and their shared
  libraries and built with the docker CLI 20.10.
* ``DindDaemon``: one container running ``dockerd --experimental`` with the options that work without
  ``--privileged`` (the hosts lack CAP_SYS_RESOURCE), its socket published through a bind-mounted folder.
  A small ``sh`` wrapper first remounts the container's cgroup mounts read-write, which RUN steps need.
* ``running_dind()``: all of the above for one or more images; ``python -m conformance.dind [-- CMD]`` keeps
  them running for manual runs (CMD gets SESSION_DAEMON_UNDER_TEST).

Run options, from /work/shared/protocol-notes.md section 10: ``--network none --cap-add ALL --cap-drop
SYS_RESOURCE --security-opt seccomp=unconfined --security-opt apparmor=unconfined --tmpfs
/var/lib/docker:exec --tmpfs /run:exec``.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import http.client
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from . import peers
from .owners import owner_alive, owner_line
from .realpeers import DOCKER_CLI, BUSYBOX_STATIC, PrivateDockerd, no_docker_reason, unix_http_get

DEFAULT_IMAGES = ("docker:20.10-dind", "docker:26.1-dind")
IMAGES_ENV = "SESSION_DIND_IMAGE"  # comma-separated, like --dind-image
# Built from the peers of each vintage when the requested image cannot be had (no registry here).
OFFLINE_IMAGES = {vintage: f"session-conformance/dind:{vintage}-local" for vintage in peers.VINTAGES}
OFFLINE_IMAGE = OFFLINE_IMAGES["20.10"]
# Label on the offline image: rebuilt when the host's binaries change.
_SOURCE_LABEL = "org.session-conformance.dind.source"
# Label on every dind container: "<pid> <start time>" of the owning process, to reclaim orphans.
_OWNER_LABEL = "org.session-conformance.dind.owner"

# Where the daemon inside the container puts its socket; the host sees it in a bind-mounted folder.
_SHARED_IN_CONTAINER = "/shared"
_SOCKET_NAME = "docker.sock"

# Binaries of a vintage's directory that make up its offline image: (path in the vintage, path in the image).
_OFFLINE_BINARIES = (
    ("usr/sbin/dockerd", "/usr/bin/dockerd"),
    ("usr/bin/containerd", "/usr/bin/containerd"),
    ("usr/bin/containerd-shim-runc-v2", "/usr/bin/containerd-shim-runc-v2"),
    ("usr/sbin/runc", "/usr/bin/runc"),
    ("usr/bin/docker-init", "/usr/bin/docker-init"),  # tini-static, for `docker run --init`
)


def _offline_binaries(vintage: str) -> list[tuple[str, str]]:
    """(path on the host, path in the image) for the offline image of a vintage."""
    directory = peers.vintage_dir(vintage)
    return [(str(directory / inside), image_path) for inside, image_path in _OFFLINE_BINARIES] + [
        (BUSYBOX_STATIC, "/bin/busybox"),  # sh and mount for the start-up wrapper (see command()); also for debugging
    ]


def vintage_of(image: str) -> str | None:
    """'docker:26.1-dind' or 'session-conformance/dind:26.1-local' -> '26.1'; None when no vintage matches."""
    match = re.search(r":(?:v)?(\d+\.\d+)", image)
    return match.group(1) if match and match.group(1) in peers.VINTAGES else None

_REMOUNT_CGROUPS_RW = (
    'for m in /sys/fs/cgroup /sys/fs/cgroup/*; do '
    '{ [ -d "$m" ] && [ ! -L "$m" ]; } || continue; '
    'mount -o remount,bind,rw "$m" 2>/dev/null || echo "dind: could not remount $m read-write" >&2; '
    'done; exec "$@"'
)

DEFAULT_DAEMON_ARGS = (
    # Same isolation as PrivateDockerd: the container has no network anyway (--network none).
    "--iptables=false",
    "--ip-masq=false",
    "--ip-forward=false",
    "--bridge=none",
    "--userland-proxy=false",
)


class DindError(RuntimeError):
    """The dind container exited, or its daemon never answered /_ping."""


class NoHostDaemon(RuntimeError):
    """No host Docker daemon is reachable and none can be started here."""


# -- host daemon -----------------------------------------------------------------------------------

def _socket_of(url: str) -> str | None:
    return url[len("unix://"):] if url.startswith("unix://") else None


def ping(url: str, timeout: float = 2.0) -> bool:
    """Whether the daemon at a unix:// URL answers /_ping with 200."""
    path = _socket_of(url)
    if path is None or not os.path.exists(path):
        return False
    try:
        status, _, _ = unix_http_get(path, "/_ping", timeout=timeout)
    except (OSError, http.client.HTTPException):
        return False
    return status == 200


def reachable_host_daemon() -> str | None:
    """DOCKER_HOST (unix:// only) or the default socket, if it answers."""
    candidates = [os.environ["DOCKER_HOST"]] if os.environ.get("DOCKER_HOST") else ["unix:///var/run/docker.sock"]
    for url in candidates:
        if ping(url):
            return url
    return None


@contextlib.contextmanager
def host_daemon(*, start_private: bool = True) -> Iterator[str]:
    """Yield the URL of a host daemon; start (and later stop) a private one when none answers."""
    url = reachable_host_daemon()
    if url is not None:
        yield url
        return
    configured = os.environ.get("DOCKER_HOST")
    if configured:
        raise NoHostDaemon(f"no host Docker daemon reachable: DOCKER_HOST={configured} does not answer /_ping")
    reason = no_docker_reason()
    if not start_private or reason is not None:
        raise NoHostDaemon("no host Docker daemon reachable (DOCKER_HOST unset, /var/run/docker.sock silent) "
                           f"and none can be started here: {reason or 'not allowed'}")
    with PrivateDockerd() as private:
        yield private.host


# -- the image -------------------------------------------------------------------------------------

def parse_images(spec: str | None) -> list[str]:
    """'a,b' -> ['a', 'b']; None or empty -> the environment's SESSION_DIND_IMAGE or the default."""
    spec = spec or os.environ.get(IMAGES_ENV) or ",".join(DEFAULT_IMAGES)
    return [part.strip() for part in spec.split(",") if part.strip()]


def _docker_client(host_url: str):
    import docker

    return docker.DockerClient(base_url=host_url, timeout=120)


@dataclass(frozen=True)
class ResolvedImage:
    requested: str
    image: str  # what the container runs: the requested image, or the offline one
    how: str  # "present", "pulled" or "built offline (pull failed: ...)"

    @property
    def tag(self) -> str:
        """A short name for reports: 'docker-20.10-dind', or 'offline-26.1' for a locally built image."""
        for vintage, image in OFFLINE_IMAGES.items():
            if self.image == image:
                return f"offline-{vintage}"
        return self.requested.rsplit("/", 1)[-1].replace(":", "-")


def resolve_image(host_url: str, requested: str, *, rebuild: bool = False, log=print) -> ResolvedImage:
    """The requested image when present or pullable, else the offline image of its vintage (built once per
    host daemon)."""
    import docker

    vintage = vintage_of(requested)
    client = _docker_client(host_url)
    try:
        if requested in OFFLINE_IMAGES.values():
            build_offline_image(host_url, vintage, rebuild=rebuild, log=log)
            return ResolvedImage(requested, requested, "built offline (requested)")
        try:
            client.images.get(requested)
            return ResolvedImage(requested, requested, "present")
        except docker.errors.ImageNotFound:
            pass
        try:
            client.images.pull(requested)
            return ResolvedImage(requested, requested, "pulled")
        except docker.errors.APIError as exc:
            why = str(exc.explanation or exc).splitlines()[0][:200]
        if vintage is None:
            raise DindError(f"cannot pull {requested} ({why}), and its tag names no vintage of the installed peers "
                            f"({', '.join(peers.VINTAGES)}) to build an offline image of")
        log(f"dind: cannot pull {requested} ({why}); using the offline image {OFFLINE_IMAGES[vintage]}")
        build_offline_image(host_url, vintage, rebuild=rebuild, log=log)
        return ResolvedImage(requested, OFFLINE_IMAGES[vintage], f"built offline (pull failed: {why})")
    finally:
        client.close()


def _offline_source_id(vintage: str) -> str:
    """Identifies the host binaries the offline image is made of (size and mtime of each)."""
    h = hashlib.sha256()
    for host_path, _ in _offline_binaries(vintage):
        st = os.stat(host_path)
        h.update(f"{host_path} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _shared_libraries(binary: str) -> list[str]:
    """Absolute paths (as the loader names them) of the libraries a dynamic binary needs; [] if static."""
    proc = subprocess.run(["ldd", binary], capture_output=True, text=True)
    if proc.returncode != 0:  # "not a dynamic executable"
        return []
    libraries = []
    for line in proc.stdout.splitlines():
        line = line.strip()
        if "=>" in line:
            target = line.split("=>", 1)[1].split("(")[0].strip()
            if target.startswith("/"):
                libraries.append(target)
        elif line.startswith("/"):  # the loader itself
            libraries.append(line.split()[0])
    return libraries


def _copy_into(rootfs: Path, host_path: str, image_path: str) -> None:
    destination = rootfs / image_path.lstrip("/")
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(os.path.realpath(host_path), destination)  # the file itself, not a symlink to it


def write_offline_rootfs(rootfs: Path, vintage: str = "20.10") -> None:
    """A minimal root filesystem for a vintage's dockerd: the binaries, their libraries, a few /etc files."""
    binaries = _offline_binaries(vintage)
    missing = [path for path, _ in binaries if not os.access(path, os.X_OK)]
    if missing:
        raise DindError(f"cannot build {OFFLINE_IMAGES[vintage]}: missing {', '.join(missing)} "
                        "(install the peers and busybox-static: .ci/install-system-deps)")
    libraries: set[str] = set()
    for host_path, image_path in binaries:
        _copy_into(rootfs, host_path, image_path)
        libraries.update(_shared_libraries(host_path))
    for library in sorted(libraries):
        # Kept at the path the loader uses (/lib/..., /lib64/...): the image has no merged-/usr symlinks.
        _copy_into(rootfs, library, library)
    bin_dir = rootfs / "bin"
    for applet in ("sh", "ls", "cat", "ps", "mount", "umount", "mkdir", "ip"):
        (bin_dir / applet).symlink_to("busybox")
    etc = rootfs / "etc"
    etc.mkdir(exist_ok=True)
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
    (etc / "group").write_text("root:x:0:\ndocker:x:999:\nnogroup:x:65534:\n")
    (etc / "nsswitch.conf").write_text("hosts: files dns\n")
    (etc / "docker").mkdir()
    for directory, mode in (("tmp", 0o1777), ("root", 0o700), ("var/lib/docker", 0o711), ("run", 0o755),
                            (_SHARED_IN_CONTAINER.lstrip("/"), 0o755)):
        path = rootfs / directory
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(mode)


def _image_label(host_url: str, image: str, label: str) -> str | None:
    import docker

    client = _docker_client(host_url)
    try:
        return (client.images.get(image).labels or {}).get(label)
    except docker.errors.ImageNotFound:
        return None
    finally:
        client.close()


def build_offline_image(host_url: str, vintage: str = "20.10", *, rebuild: bool = False, log=print) -> str:
    """Build the vintage's offline image FROM scratch out of its peer binaries with the docker CLI 20.10;
    cached by tag and source."""
    tag = OFFLINE_IMAGES[vintage]
    source = _offline_source_id(vintage)
    if not rebuild and _image_label(host_url, tag, _SOURCE_LABEL) == source:
        return tag
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dsc-dindimg-") as context, \
            tempfile.TemporaryDirectory(prefix="dsc-cfg-") as cli_config:
        write_offline_rootfs(Path(context, "rootfs"), vintage)
        Path(context, "Dockerfile").write_text(
            "FROM scratch\n"
            "COPY rootfs/ /\n"
            "ENV PATH=/usr/bin:/bin\n"
            f'LABEL {_SOURCE_LABEL}="{source}"\n'
            'CMD ["dockerd"]\n'
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        env.update(DOCKER_HOST=host_url, DOCKER_BUILDKIT="1", DOCKER_CONFIG=cli_config)
        proc = subprocess.run([DOCKER_CLI, "build", "--progress=plain", "-t", tag, context],
                              env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise DindError(f"building {tag} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    log(f"dind: built {tag} from the {vintage} peer binaries in {time.monotonic() - started:.1f} s")
    return tag


# -- the container ---------------------------------------------------------------------------------

def _disable_ryuk_unless_available(host_url: str) -> None:
    """Ryuk (testcontainers' reaper) is an image to pull; without it, cleanup is ours (stop() and orphans)."""
    from testcontainers.core.config import testcontainers_config

    if os.environ.get("TESTCONTAINERS_RYUK_DISABLED"):
        return
    socket_path = _socket_of(host_url)
    available = _image_present(host_url, testcontainers_config.ryuk_image)
    if available and socket_path:
        # Ryuk mounts the host daemon's socket; it must be the one we use.
        os.environ.setdefault("TESTCONTAINERS_DOCKER_SOCKET_OVERRIDE", socket_path)
        return
    os.environ["TESTCONTAINERS_RYUK_DISABLED"] = "true"
    testcontainers_config.ryuk_disabled = True


def _image_present(host_url: str, image: str) -> bool:
    import docker

    client = _docker_client(host_url)
    try:
        client.images.get(image)
        return True
    except docker.errors.ImageNotFound:
        return False
    finally:
        client.close()


def reap_orphaned_containers(host_url: str) -> list[str]:
    """Remove dind containers whose owning process is gone (Ryuk is usually disabled here)."""
    client = _docker_client(host_url)
    removed = []
    try:
        for container in client.containers.list(all=True, filters={"label": _OWNER_LABEL}):
            if owner_alive(container.labels[_OWNER_LABEL]):
                continue
            container.remove(force=True)
            removed.append(container.name)
    finally:
        client.close()
    for directory in glob.glob("/tmp/dsc-dind-*"):
        owner = Path(directory, "owner")
        try:
            line = owner.read_text()
        except OSError:
            continue
        if not owner_alive(line):
            shutil.rmtree(directory, ignore_errors=True)
    return removed


class DindDaemon:
    """dockerd (experimental) in a container on ``host_url``; ``url`` is its socket as seen from the host.

    Use as a context manager, or call start()/stop(). ``image`` must be present on the host daemon (see
    resolve_image).
    """

    def __init__(self, image: str, host_url: str, *, extra_args: tuple[str, ...] = (), start_timeout: float = 90.0,
                 name: str | None = None, daemon_config: dict | None = None):
        self.image = image
        self.daemon_config = {"features": {"buildkit": True}} if daemon_config is None else daemon_config
        self.host_url = host_url
        self.extra_args = tuple(extra_args)
        self.start_timeout = start_timeout
        self.name = name
        self.dir: Path | None = None
        self.container = None
        self.ready_seconds: float | None = None
        self._final_logs = ""

    @property
    def socket_path(self) -> str:
        assert self.dir is not None, "dind daemon not started"
        return str(self.dir / _SOCKET_NAME)

    @property
    def url(self) -> str:
        return "unix://" + self.socket_path

    def dockerd_command(self) -> list[str]:
        return ["dockerd", "--experimental", "-H", f"unix://{_SHARED_IN_CONTAINER}/{_SOCKET_NAME}",
                "--config-file", f"{_SHARED_IN_CONTAINER}/daemon.json", *DEFAULT_DAEMON_ARGS, *self.extra_args]

    def command(self) -> list[str]:
        # Without --privileged the cgroup (v1) mounts are read-only, and a RUN step then fails with "unable to
        # apply cgroup configuration: mkdir /sys/fs/cgroup/cpuset/docker: read-only file system". CAP_SYS_ADMIN
        # without seccomp or AppArmor may remount them read-write; then exec dockerd (as PID 1).
        return ["sh", "-c", _REMOUNT_CGROUPS_RW, "dind", *self.dockerd_command()]

    def __enter__(self) -> "DindDaemon":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> "DindDaemon":
        from testcontainers.core.container import DockerContainer

        assert self.container is None, "already started"
        _disable_ryuk_unless_available(self.host_url)
        reap_orphaned_containers(self.host_url)
        # Short on purpose: the socket path must fit in sun_path (108 bytes).
        self.dir = Path(tempfile.mkdtemp(prefix="dsc-dind-", dir="/tmp"))
        owner = owner_line()
        (self.dir / "owner").write_text(owner + "\n")
        # As for PrivateDockerd: /_ping then advertises "Builder-Version: 2", which clients use to pick BuildKit.
        (self.dir / "daemon.json").write_text(json.dumps(self.daemon_config))
        container = (
            DockerContainer(self.image, docker_client_kw={"environment": {"DOCKER_HOST": self.host_url}})
            .with_command(self.command())
            .with_env("DOCKER_TLS_CERTDIR", "")  # official docker:dind images: no TLS set-up, we use -H unix://
            .with_volume_mapping(str(self.dir), _SHARED_IN_CONTAINER, "rw")
            # with_kwargs replaces the dict: every docker-py create() option in one call.
            .with_kwargs(
                network=None,  # keeps testcontainers from choosing a network; network_mode decides
                network_mode="none",
                cap_add=["ALL"],
                cap_drop=["SYS_RESOURCE"],  # the host lacks it, so --privileged fails ("unable to apply caps")
                security_opt=["seccomp=unconfined", "apparmor=unconfined"],
                labels={_OWNER_LABEL: owner},
            )
        )
        if self.name:
            container.with_name(self.name)
        # docker run --tmpfs PATH:exec (with_tmpfs_mount only takes a size).
        container.tmpfs.update({"/var/lib/docker": "exec", "/run": "exec"})
        self.container = container
        started = time.monotonic()
        try:
            container.start()
            self._wait_ready(started)
        except BaseException:
            self.stop()
            raise
        self.ready_seconds = time.monotonic() - started
        return self

    def _status(self) -> str:
        wrapped = self.container.get_wrapped_container()
        wrapped.reload()
        return wrapped.status

    def _wait_ready(self, started: float) -> None:
        deadline = started + self.start_timeout
        while time.monotonic() < deadline:
            if ping(self.url):
                return
            status = self._status()
            if status in ("exited", "dead"):
                code = self.container.get_wrapped_container().attrs["State"].get("ExitCode")
                raise DindError(f"dind container ({self.image}) exited with status {code} before answering "
                                f"/_ping; its logs:\n{self.log_tail()}")
            time.sleep(0.1)
        raise DindError(f"dind daemon ({self.image}) did not answer /_ping within {self.start_timeout:.0f} s; "
                        f"its logs:\n{self.log_tail()}")

    def logs(self) -> str:
        if self.container is None or self.container._container is None:
            return self._final_logs
        try:
            out, err = self.container.get_logs()
        except Exception as exc:  # the container may be gone already
            return self._final_logs or f"<no logs: {exc}>"
        return (out + err).decode("utf-8", "replace")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.logs().splitlines()[-lines:])

    def stop(self) -> None:
        """Stop and remove the container, delete the socket folder. Idempotent."""
        if self.container is not None:
            self._final_logs = self.logs()
            if self.container._container is not None:
                try:
                    self.container.stop()  # kill + remove (force, with volumes)
                except Exception:
                    pass
            self.container = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


@contextlib.contextmanager
def running_dind(images: list[str] | None = None, *, host_url: str | None = None, log=print,
                 ) -> Iterator[list[tuple[ResolvedImage, DindDaemon]]]:
    """Start one dind daemon per distinct resolved image (host daemon found or started); stop them all."""
    with contextlib.ExitStack() as stack:
        if host_url is None:
            host_url = stack.enter_context(host_daemon())
        daemons: list[tuple[ResolvedImage, DindDaemon]] = []
        seen = set()
        for requested in images or parse_images(None):
            resolved = resolve_image(host_url, requested, log=log)
            if resolved.image in seen:
                log(f"dind: {requested} resolves to {resolved.image}, already running; not started twice")
                continue
            seen.add(resolved.image)
            daemon = stack.enter_context(DindDaemon(resolved.image, host_url))
            log(f"dind: {resolved.image} ({resolved.how}) answers at {daemon.url} "
                f"after {daemon.ready_seconds:.1f} s")
            daemons.append((resolved, daemon))
        yield daemons


def main(argv: list[str] | None = None) -> int:
    """Keep dind daemon(s) running for manual runs: ``python -m conformance.dind [--dind-image I] [-- CMD]``.

    With CMD: runs it with SESSION_DAEMON_UNDER_TEST (and DIND_DOCKER_HOST) set to the first dind daemon and
    exits with its status. Without: prints the URLs and waits for SIGTERM or Ctrl-C.
    """
    import argparse
    import signal
    import sys
    import threading

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("--dind-image", help=f"comma-separated (default ${IMAGES_ENV} or {','.join(DEFAULT_IMAGES)})")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: stop.set())
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    with running_dind(parse_images(args.dind_image), log=log) as daemons:
        for resolved, daemon in daemons:
            print(f"{resolved.tag} {daemon.url}", flush=True)
        if not command:
            while not stop.wait(0.5):
                pass
            return 0
        url = daemons[0][1].url
        child = subprocess.Popen(command, env={**os.environ, "SESSION_DAEMON_UNDER_TEST": url, "DIND_DOCKER_HOST": url})
        while child.poll() is None and not stop.is_set():
            stop.wait(0.2)
        if child.poll() is None:
            child.terminate()
        return child.wait()


if __name__ == "__main__":
    raise SystemExit(main())
