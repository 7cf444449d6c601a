"""Real peers for interop tests: private dockerd instances (20.10 or 26.1) and the docker CLIs.

Library code only; pytest is imported lazily (``require_docker``) so that non-test tools can use it.
Where the programs are installed is ``conformance.peers``'s business (a prefix the project owns).

Every ``PrivateDockerd`` lives in its own short directory under /tmp and shares nothing with the host's
docker set-up: its own socket, data root, exec root (hence its own managed containerd), config file,
trust key and CLI config. Several can run side by side.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import glob
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from reference.processes import stop_process

from . import peers
from .owners import owner_alive, owner_line

DEFAULT_DAEMON = "dockerd-20.10"
DEFAULT_CLIENT = "docker-cli-20.10"
# Absolute paths into the peers prefix, never a PATH lookup: /usr/local/bin/docker may be any client.
DOCKER_CLI = peers.binary(DEFAULT_CLIENT)
DOCKERD = peers.binary(DEFAULT_DAEMON)
# From Debian's busybox-static (installed as /bin/busybox; /bin is /usr/bin on merged-/usr systems).
BUSYBOX_STATIC = "/bin/busybox"

SHELL_IMAGE_TAG = "session-test/busybox:latest"

# sun_path is 108 bytes including the terminating NUL.
_MAX_UNIX_SOCKET_PATH = 107
# Client-side variables that would point the CLI elsewhere or change its behaviour.
_FOREIGN_CLIENT_VARS = (
    "DOCKER_CONTEXT",
    "DOCKER_TLS_VERIFY",
    "DOCKER_CERT_PATH",
    "DOCKER_API_VERSION",
    "DOCKER_DEFAULT_PLATFORM",
    "BUILDKIT_PROGRESS",
    "BUILDX_BUILDER",
)
_MNT_DETACH = 2
# Private daemon directories are /tmp/dsc-XXXXXXXX: short, because of the sun_path limit.
_DIR_ROOT = "/tmp"
_DIR_PREFIX = "dsc-"
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


class DockerdStartError(RuntimeError):
    """The private daemon exited or never answered /_ping."""


def no_docker_reason(*names: str) -> str | None:
    """Why real-peer tests with these peers (default: dockerd and CLI 20.10) cannot run here, or None."""
    if not os.uname().sysname == "Linux":
        return "real peers need Linux"
    for name in names or (DEFAULT_DAEMON, DEFAULT_CLIENT):
        reason = peers.missing_reason(name)
        if reason:
            return reason
    if os.geteuid() != 0:
        return "a private dockerd needs root (rootless dockerd is not supported by these tests)"
    return None


def running_in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_docker(*names: str) -> None:
    """Skip (developer machine) or fail (CI) the calling test when these real peers are unavailable."""
    reason = no_docker_reason(*names)
    if reason is None:
        return
    import pytest

    if running_in_ci():
        pytest.fail(f"real peers unavailable on CI: {reason}", pytrace=False)
    pytest.skip(reason)


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def unix_http_request(
    socket_path: str, method: str, path: str, timeout: float = 5.0
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request over a unix socket; returns (status, headers, body)."""
    conn = _UnixHTTPConnection(socket_path, timeout)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def unix_http_get(socket_path: str, path: str, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    return unix_http_request(socket_path, "GET", path, timeout)


def _mount_points_under(root: str) -> list[str]:
    """Mount points at or below root, deepest first (so children are detached before parents)."""
    prefix = root.rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as mountinfo:
        for line in mountinfo:
            # Field 5 is the mount point, with space, tab, newline and backslash octal-escaped.
            mount_point = _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), line.split(" ")[4])
            if mount_point == root or mount_point.startswith(prefix):
                found.append(mount_point)
    return sorted(set(found), key=lambda p: (p.count("/"), p), reverse=True)


def _unmount_all_under(root: str) -> list[str]:
    """Lazily unmount everything under root; returns what was still mounted (i.e. what dockerd left)."""
    left = _mount_points_under(root)
    if not left:
        return left
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    for mount_point in left:
        if libc.umount2(os.fsencode(mount_point), _MNT_DETACH) != 0:
            err = ctypes.get_errno()
            if err not in (errno.EINVAL, errno.ENOENT):  # already gone
                raise OSError(err, f"umount2({mount_point}): {os.strerror(err)}")
    return left


def _parent_pids() -> dict[int, int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may contain spaces and parentheses; fields after the last ")" are fixed.
        parents[int(entry)] = int(stat[stat.rindex(b")") + 2 :].split()[1])
    return parents


def _pids_belonging_to(directory: str) -> list[int]:
    """Processes started for a daemon living in directory, children before parents.

    A process belongs if its command line names a path in directory (the managed containerd, shims,
    runc) or if it descends from such a process (container processes, whose command lines do not).
    """
    needle = directory.rstrip("/").encode() + b"/"
    parents = _parent_pids()
    roots = set()
    for pid in parents:
        if pid == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if needle in f.read():
                    roots.add(pid)
        except OSError:
            continue
    depth = {pid: 0 for pid in roots}
    frontier = roots
    while frontier:
        children = {pid for pid, parent in parents.items() if parent in frontier and pid not in depth}
        for child in children:
            depth[child] = depth[parents[child]] + 1
        frontier = children
    return sorted(depth, key=lambda pid: -depth[pid])


def _forget_shim(argv: list[str]) -> None:
    """Remove what a SIGKILLed containerd-shim-runc-v2 would have removed on a clean exit."""
    options = dict(zip(argv[1::2], argv[2::2]))
    container_id, namespace, address = options.get("-id"), options.get("-namespace"), options.get("-address")
    if not (container_id and namespace and address):
        return
    # containerd 1.6 names the shim socket after a hash of "<containerd address>/<namespace>/<id>".
    digest = hashlib.sha256(f"{address}/{namespace}/{container_id}".encode()).hexdigest()
    Path("/run/containerd/s", digest).unlink(missing_ok=True)
    # Empty per-container cgroups (cgroupfs driver, default "docker" parent; v1 and v2 layouts).
    for cgroup in glob.glob(f"/sys/fs/cgroup/*/docker/{container_id}") + glob.glob(
        f"/sys/fs/cgroup/docker/{container_id}"
    ):
        try:
            os.rmdir(cgroup)
        except OSError:
            pass


def _dismantle(directory: str) -> dict[str, list[str]]:
    """After dockerd has exited: kill its leftovers, unmount, delete directory. Returns what was left."""
    leftovers: dict[str, list[str]] = {"processes": [], "mounts": []}
    # A SIGKILLed (or crashed) dockerd leaves its containerd's shims and their containers running.
    stray = _pids_belonging_to(directory)
    shims = []
    for pid in stray:
        try:
            argv = [os.fsdecode(a) for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, FileNotFoundError):
            continue
        leftovers["processes"].append(f"{pid} {argv[0]}")
        if os.path.basename(argv[0]).startswith("containerd-shim"):
            shims.append(argv)
    for pid in stray:
        _wait_gone(pid, 5.0)
    for argv in shims:
        _forget_shim(argv)
    leftovers["mounts"] = _unmount_all_under(directory)
    shutil.rmtree(directory, ignore_errors=True)
    return leftovers


def _kill_running_containers(socket_path: str) -> None:
    """Best effort: on SIGTERM dockerd would otherwise wait out each container's stop timeout (10 s)."""
    try:
        status, _, body = unix_http_get(socket_path, "/containers/json", timeout=5.0)
        if status != 200:
            return
        for container in json.loads(body):
            unix_http_request(socket_path, "POST", f"/containers/{container['Id']}/kill", timeout=5.0)
    except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError):
        pass


def reap_orphaned_daemons() -> list[str]:
    """Stop private daemons whose owning process died without stopping them (e.g. a killed pytest).

    Returns the directories reclaimed. Daemons of live owners, in this or other sessions, are left alone.
    """
    reclaimed = []
    for owner_file in glob.glob(f"{_DIR_ROOT}/{_DIR_PREFIX}*/owner"):
        directory = os.path.dirname(owner_file)
        try:
            if owner_alive(Path(owner_file).read_text()):
                continue
        except OSError:
            continue
        try:
            dockerd_pid = int(Path(directory, "pid").read_text())
        except (OSError, ValueError):
            dockerd_pid = None
        if dockerd_pid is not None and f"{directory}/".encode() in _cmdline(dockerd_pid):
            _kill_running_containers(os.path.join(directory, "docker.sock"))
            _terminate(dockerd_pid, 20.0)
        _dismantle(directory)
        reclaimed.append(directory)
    return reclaimed


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _terminate(pid: int, timeout: float) -> None:
    """SIGTERM, then SIGKILL after timeout; never signals the pid again once it has exited (reuse)."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if _wait_gone(pid, timeout):
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    _wait_gone(pid, 5.0)


class PrivateDockerd:
    """A disposable dockerd (20.10 by default, or any daemon peer) with BuildKit, isolated in a short
    temporary directory.

    Use as a context manager, or call start()/stop().
    """

    def __init__(
        self,
        peer: str = DEFAULT_DAEMON,
        *,
        extra_args: tuple[str, ...] | list[str] = (),
        daemon_config: dict | None = None,
        start_timeout: float = 60.0,
        stop_timeout: float = 20.0,
        debug: bool = False,
    ):
        if peers.program(peer).kind != "daemon":
            raise ValueError(f"{peer} is not a daemon")
        self.peer = peer
        self.extra_args = list(extra_args)
        # features.buildkit makes /_ping advertise "Builder-Version: 2"; without it the key is absent.
        self.daemon_config = {"features": {"buildkit": True}} if daemon_config is None else daemon_config
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.debug = debug
        self.dir: Path | None = None
        self.process: subprocess.Popen | None = None
        self.ready_seconds: float | None = None
        self.leftovers: dict[str, list] = {}
        self._final_log: str | None = None

    # -- paths ---------------------------------------------------------------------------------
    @property
    def socket_path(self) -> str:
        assert self.dir is not None, "daemon not started"
        return str(self.dir / "docker.sock")

    @property
    def host(self) -> str:
        return "unix://" + self.socket_path

    @property
    def log_path(self) -> Path:
        assert self.dir is not None, "daemon not started"
        return self.dir / "dockerd.log"

    # -- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> "PrivateDockerd":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _make_dir(self) -> Path:
        # Not tempfile.gettempdir(): a long $TMPDIR could push the sockets past the sun_path limit.
        directory = Path(tempfile.mkdtemp(prefix=_DIR_PREFIX, dir=_DIR_ROOT))
        longest = directory / "exec" / "containerd" / "containerd.sock.ttrpc"
        if len(str(longest)) > _MAX_UNIX_SOCKET_PATH:
            shutil.rmtree(directory)
            raise DockerdStartError(f"socket path too long: {longest}")
        return directory

    def command(self) -> list[str]:
        assert self.dir is not None
        d = self.dir
        args = [
            peers.binary(self.peer),
            "--experimental",
            "-H", self.host,
            "--data-root", str(d / "root"),
            "--exec-root", str(d / "exec"),
            "--pidfile", str(d / "pid"),
            # Never read /etc/docker/daemon.json (the trust key path is set inside ours, see start()).
            "--config-file", str(d / "daemon.json"),
            # No host-wide networking side effects. Without a bridge, a RUN step on the default build
            # network fails ("network bridge not found"): build with --network=none (or host).
            "--iptables=false",
            "--ip-masq=false",
            "--ip-forward=false",
            "--bridge=none",
            "--userland-proxy=false",
        ]
        if self.debug:
            args.append("--debug")
        return args + self.extra_args

    def start(self) -> "PrivateDockerd":
        reason = no_docker_reason(self.peer)
        if reason is not None:
            raise DockerdStartError(reason)
        assert self.process is None, "already started"
        reap_orphaned_daemons()
        self.dir = self._make_dir()
        try:
            self._launch()
        except BaseException:
            self.stop()
            raise
        return self

    def _launch(self) -> None:
        # Lets reap_orphaned_daemons() tell a daemon whose owner died from one still in use.
        (self.dir / "owner").write_text(owner_line() + "\n")
        config = dict(self.daemon_config)
        # The libtrust key otherwise goes to /etc/docker/key.json, shared by every daemon on the host.
        config.setdefault("deprecated-key-path", str(self.dir / "key.json"))
        (self.dir / "daemon.json").write_text(json.dumps(config))
        (self.dir / "cli-config").mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        env["PATH"] = peers.daemon_search_path(self.peer)
        started = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                # Own session: a Ctrl-C in the test terminal must not reach the daemon before stop() runs.
                start_new_session=True,
            )
        self._wait_ready(started)
        self.ready_seconds = time.monotonic() - started

    def _wait_ready(self, started: float) -> None:
        deadline = started + self.start_timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise DockerdStartError(
                    f"{self.peer} exited with status {self.process.returncode} before answering /_ping; "
                    f"last log lines:\n{self.log_tail()}"
                )
            try:
                status, _, _ = unix_http_get(self.socket_path, "/_ping", timeout=2.0)
                if status == 200:
                    return
                last_error = RuntimeError(f"/_ping answered {status}")
            except (OSError, http.client.HTTPException) as exc:
                last_error = exc
            time.sleep(0.05)
        raise DockerdStartError(
            f"dockerd did not answer /_ping within {self.start_timeout:.0f} s ({last_error}); "
            f"last log lines:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """Terminate the daemon, kill whatever it left, unmount, delete the directory. Idempotent."""
        if self.dir is None:
            return
        if self.process is not None and self.process.poll() is None:
            _kill_running_containers(self.socket_path)
            stop_process(self.process, self.stop_timeout)
        self._final_log = self.logs()
        self.leftovers = _dismantle(str(self.dir))
        self.dir = None
        self.process = None

    # -- client side ---------------------------------------------------------------------------
    def env(self, client: str = DEFAULT_CLIENT) -> dict[str, str]:
        """Environment for a docker CLI peer (or any client) aimed at this daemon only."""
        assert self.dir is not None, "daemon not started"
        env = {k: v for k, v in os.environ.items() if k not in _FOREIGN_CLIENT_VARS}
        env["DOCKER_HOST"] = self.host
        env.update(peers.client_env(client, str(self.dir / "cli-config" / client)))
        return env

    def cli(self, *args: str, client: str = DEFAULT_CLIENT, **kwargs) -> subprocess.CompletedProcess:
        """Run a docker CLI peer (default 20.10) against this daemon; captures text output unless told
        otherwise."""
        kwargs.setdefault("env", self.env(client))
        kwargs.setdefault("timeout", 300)
        if "stdout" not in kwargs and "stderr" not in kwargs:
            kwargs.setdefault("capture_output", True)
        if "input" not in kwargs or isinstance(kwargs.get("input"), str):
            kwargs.setdefault("text", True)
        return subprocess.run([peers.binary(client), *args], **kwargs)

    def ping(self) -> tuple[int, dict[str, str], bytes]:
        return unix_http_get(self.socket_path, "/_ping")

    def logs(self) -> str:
        """The daemon's combined stdout/stderr (kept after stop())."""
        if self.dir is None:
            return self._final_log or ""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.logs().splitlines()[-lines:])


def _wait_gone(pid: int, timeout: float) -> bool:
    """Wait until pid has exited; a zombie counts as exited (its parent, maybe not us, reaps it)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            return True
        if stat[stat.rindex(b")") + 2 :].startswith(b"Z"):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def image_exists(daemon: PrivateDockerd, reference: str) -> bool:
    return daemon.cli("image", "inspect", "--format", "{{.Id}}", reference).returncode == 0


def _write_busybox_rootfs(rootfs: Path) -> None:
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX_STATIC, rootfs / "bin" / "busybox")
    applets = subprocess.run(
        [BUSYBOX_STATIC, "--list"], check=True, capture_output=True, text=True
    ).stdout.split()
    for applet in applets:
        if applet != "busybox" and "/" not in applet:
            (rootfs / "bin" / applet).symlink_to("busybox")
    tmp = rootfs / "tmp"
    tmp.mkdir()
    tmp.chmod(0o1777)
    etc = rootfs / "etc"
    etc.mkdir()
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
    (etc / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    (rootfs / "root").mkdir(mode=0o700)


def build_shell_image(daemon: PrivateDockerd, tag: str = SHELL_IMAGE_TAG) -> str:
    """Build (once per daemon) a busybox image from the host's busybox-static, pulling nothing."""
    if image_exists(daemon, tag):
        return tag
    if not os.access(BUSYBOX_STATIC, os.X_OK):
        raise RuntimeError(f"{BUSYBOX_STATIC} missing: install Debian's busybox-static")
    with tempfile.TemporaryDirectory(prefix="dsc-shell-") as context:
        context_path = Path(context)
        _write_busybox_rootfs(context_path / "rootfs")
        (context_path / "Dockerfile").write_text(
            "FROM scratch\n"
            "COPY rootfs/ /\n"
            "ENV PATH=/bin\n"
            'CMD ["/bin/sh"]\n'
        )
        result = daemon.cli("build", "--progress=plain", "-t", tag, context)
    if result.returncode != 0:
        raise RuntimeError(f"building {tag} failed:\n{result.stdout}\n{result.stderr}")
    return tag
