"""The reference daemon under hostile input, end to end (issue 15): after each failure it keeps
serving, restarts cleanly, and the next honest build with the same shared key is exact; names that
are not UTF-8 cross in both roles, against the docker CLI 20.10 and dockerd 20.10 too."""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from conformance import realpeers
from conformance.harness.daemon_probes import FileSyncRouter
from conformance.harness.scripted_client import make_context, run_build
from conformance.trees import diff_snapshots, snapshot
from reference import diffcopy as dc
from reference.applier import remove_tree
from reference.client.services import FILESYNC_DIFFCOPY
from reference.dockerhost import api_call
from reference.pb.fsutil_types_pb2 import Stat
from reference.transport.base import RpcError


class Daemon:
    """``python -m reference.daemon`` in a subprocess on a short socket path; restartable on its root."""

    def __init__(self, root: str | None = None, args=()):
        self.dir = tempfile.mkdtemp(prefix="rdl-", dir="/tmp")  # a short socket path
        self.root = root or os.path.join(self.dir, "root")
        self.host = "unix://" + os.path.join(self.dir, "d.sock")
        self.log_path = os.path.join(self.dir, "daemon.log")
        self.args = list(args)
        self.proc: subprocess.Popen | None = None
        atexit.register(self.close)  # even when a worker dies before its fixtures' teardown

    def start(self) -> "Daemon":
        env = {k: v for k, v in os.environ.items() if k != "BUILD_STREAM_PROTOCOL"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "reference.daemon", "--host", self.host,
                                          "--root", self.root, *self.args], stdout=log, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("the daemon exited at start-up:\n" + self.logs())
            try:
                if api_call("GET", "/_ping", host=self.host)[0].status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("the daemon did not start:\n" + self.logs())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> "Daemon":
        self.stop()
        return self.start()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def logs(self) -> str:
        with open(self.log_path, errors="replace") as fh:
            return fh.read()[-8000:]

    def get(self, path: str, method: str = "GET"):
        resp, body = api_call(method, path, host=self.host)
        return resp.status, body

    def stats(self) -> dict:
        return json.loads(self.get("/_reference/stats")[1])

    def close(self) -> None:
        self.stop()
        remove_tree(self.dir)

    def __enter__(self) -> "Daemon":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


# -- scripted hostile senders (the suite's harness serves everything but the context) ---------------

DIR = dc.filemode.MODE_DIR | 0o755
SHARED_KEY = "hostile-" + os.urandom(4).hex()


def _send_until_refused(packets):
    """A DiffCopy sender that streams ``packets`` lazily and stops once the daemon ends the call."""

    def handler(stream):
        try:
            for packet in packets():
                stream.send(packet.SerializeToString())
            stream.flush()
            while stream.recv(10) is not None:
                pass
        except (RpcError, TimeoutError):
            pass

    return handler


def deep_listing():
    path = ""
    for _ in range(10_000):
        path = f"{path}/a" if path else "a"
        yield dc.stat_packet(Stat(path=path, mode=DIR))
    yield dc.end_of_listing()


def long_path_listing():
    parts = ["x" * 254 + str(i % 10) for i in range(32)]  # 8 KB when whole
    for depth in range(1, 33):
        yield dc.stat_packet(Stat(path="/".join(parts[:depth]), mode=DIR))
    yield dc.end_of_listing()


def big_message_sender(size: int):
    def handler(stream):
        try:
            stream.send(dc.stat_packet(Stat(path="big", mode=0o644, size=size)).SerializeToString())
            stream.send(dc.end_of_listing().SerializeToString())
            stream.flush()
            if dc.decode_packet(stream.recv(10)).type == dc.PACKET_REQ:
                stream.send(dc.data_packet(0, b"\0" * size).SerializeToString())  # one message
                stream.flush()
            while stream.recv(10) is not None:
                pass
        except (RpcError, TimeoutError):
            pass

    return handler


def cut_sender(stream):
    """Lists a file, sends half its data, then ends the call."""
    stream.send(dc.stat_packet(Stat(path="half", mode=0o644, size=100_000)).SerializeToString())
    stream.send(dc.end_of_listing().SerializeToString())
    stream.flush()
    stream.recv(10)
    stream.send(dc.data_packet(0, b"h" * 50_000).SerializeToString())
    stream.flush()


HOSTILE = {
    "depth-10000": (_send_until_refused(deep_listing), "max_depth"),
    "path-8k": (_send_until_refused(long_path_listing), "max_path_length"),
    "message-5mib": (big_message_sender(5 << 20), "larger than max"),
    "message-64mib": (big_message_sender(64 << 20), "larger than max"),
    "cut-transfer": (cut_sender, "ended the transfer early"),
}


def honest_context(tmp_path) -> str:
    ctx = make_context({"a.txt": "alpha\n", "sub/b.bin": os.urandom(70_000), "sub/deeper/c": "c"})
    with open(os.path.join(os.fsencode(ctx), b"caf\xe9.txt"), "wb") as fh:
        fh.write(b"latin-1 name\n")
    return ctx


def assert_exact_build(daemon: Daemon, ctx: str, out: str) -> None:
    obs = run_build(daemon.host, ctx, output=("local", out), shared_key=SHARED_KEY, query={"nocache": "1"},
                    timeout=60)
    assert obs.ok, f"{obs.describe()}\n{daemon.logs()}"
    me = (os.getuid(), os.getgid())
    problems = diff_snapshots(snapshot(ctx, owner=me, with_mtime_of_dirs=False),
                              snapshot(out, with_mtime_of_dirs=False))
    assert not problems, "\n".join(problems)
    remove_tree(out)


@pytest.fixture(scope="module")
def hostile_daemon():
    with Daemon(args=["--generation", "n"]) as daemon:  # dockerd 20.10's limits (a 4 MiB message)
        yield daemon


@pytest.mark.parametrize("case", list(HOSTILE))
def test_after_each_hostile_input_the_daemon_serves_restarts_and_builds_exactly(hostile_daemon, tmp_path, case):
    """Failed before: depth 10,000 -> ``maximum recursion depth exceeded`` and (from about 1,200
    levels) a cache entry that failed every later build with the key; the 8 KB path -> every later
    build failed with ``File name too long``; the messages -> accepted whole."""
    daemon = hostile_daemon
    sender, reason = HOSTILE[case]
    ctx = honest_context(tmp_path)
    out = str(tmp_path / "out")
    assert_exact_build(daemon, ctx, out)  # the shared key's entry holds the honest tree first
    router = FileSyncRouter(ctx, sender)
    started = time.monotonic()
    obs = run_build(daemon.host, ctx, handler_overrides={FILESYNC_DIFFCOPY: router}, shared_key=SHARED_KEY,
                    timeout=60, hang_timeout=10)
    took = time.monotonic() - started
    assert not obs.ok and reason in (obs.error or ""), f"{obs.describe()}\n{daemon.logs()}"
    assert took < 20, f"{took:.1f} s to fail"
    assert daemon.alive()
    assert_exact_build(daemon, ctx, out)  # corrected exactly from whatever the failure left
    status, _ = daemon.get("/build/prune?all=1", "POST")
    assert status == 200
    daemon.restart()
    assert not [n for n in os.listdir(os.path.join(daemon.root, "cache")) if n.startswith(".deleting-")]
    assert_exact_build(daemon, ctx, out)
    assert "Traceback" not in daemon.logs(), daemon.logs()
    remove_tree(ctx)


def test_a_deep_tree_left_in_the_cache_by_an_older_daemon_is_handled(tmp_path):
    """A complete entry whose tree is 3,000 deep (host paths beyond PATH_MAX), a half-deleted one,
    damaged metadata: the daemon starts, the next build with the key is exact, GC and prune work.
    Failed before: the daemon could not start (RecursionError loading its cache)."""
    import json

    sys.path.insert(0, os.path.dirname(__file__))
    from test_cache_recovery import deep_chain, entry_on_disk

    daemon = Daemon(args=["--cache-max-size", "0"])  # GC after every build removes every free entry
    try:
        cache = os.path.join(daemon.root, "cache")
        os.makedirs(cache)
        entry_on_disk(cache, "deep" + "0" * 21, depth=3000)
        deep_chain(os.path.join(cache, ".deleting-" + "1" * 25, "tree"), 3000)
        entry_on_disk(cache, "bad" + "2" * 22, meta="[" * 50_000)
        daemon.start()
        assert os.listdir(cache) == ["deep" + "0" * 21]
        ctx = honest_context(tmp_path)
        out = str(tmp_path / "out")
        assert_exact_build(daemon, ctx, out)  # GC then removed the deep entry after the build answered
        assert daemon.get("/build/prune?all=1", "POST")[0] == 200
        assert [n for n in os.listdir(cache) if n.startswith(".deleting-")] == []
        assert json.loads(daemon.get("/system/df")[1])["BuildCache"] == []
        remove_tree(ctx)
    finally:
        daemon.close()


# -- names that are not UTF-8, end to end -------------------------------------------------------

DOCKER_CLI = realpeers.DOCKER_CLI  # the docker CLI 20.10 in the peers prefix (no system package provides it)


def byte_names(root: str) -> set[bytes]:
    found = set()
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        rel = os.path.relpath(dirpath, os.fsencode(root))
        found |= {n if rel == b"." else rel + b"/" + n for n in dirnames + filenames}
    return found


def latin1_context(tmp_path, dockerfile: bytes = b"FROM scratch\nCOPY . /\n") -> str:
    ctx = os.fsencode(tmp_path / "ctx")
    os.makedirs(os.path.join(ctx, b"d\xff"))
    for rel, data in ((b"Dockerfile", dockerfile), (b"caf\xe9.txt", b"x\n"), (b"d\xff/\x80", b"y\n")):
        with open(os.path.join(ctx, rel), "wb") as fh:
            fh.write(data)
    os.symlink(b"to-\xfe", os.path.join(ctx, b"link"))
    return os.fsdecode(ctx)


@pytest.fixture(scope="module")
def names_daemon():
    with Daemon() as daemon:
        yield daemon


def test_reference_client_and_daemon_carry_non_utf8_names_byte_for_byte(names_daemon, tmp_path):
    """Failed before: the client refused the context (``file name is not valid UTF-8``)."""
    from reference.client import Output, build

    ctx = latin1_context(tmp_path)
    out = str(tmp_path / "out")
    build(ctx, host=names_daemon.host, outputs=[Output("local", out)], timeout=60)
    assert byte_names(out) == byte_names(ctx)
    assert os.readlink(os.path.join(os.fsencode(out), b"link")) == b"to-\xfe"


def test_the_dockerfile_alone_needs_no_walk_of_such_names(names_daemon, tmp_path):
    """Failed before: refused outright although only the Dockerfile is read."""
    from reference.client import build

    ctx = latin1_context(tmp_path, b"FROM scratch\nLABEL only=dockerfile\n")
    assert build(ctx, host=names_daemon.host, tags=["names:label"], timeout=60).image_id


def test_docker_cli_builds_and_exports_non_utf8_names_on_our_daemon(names_daemon, tmp_path):
    """Failed before: ``invalid packet from the client: not a fsutil Packet``."""
    realpeers.require_docker(realpeers.DEFAULT_CLIENT)  # skips on a developer machine without it, fails on CI
    ctx = latin1_context(tmp_path)
    out = str(tmp_path / "cli-out")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "BUILDKIT_"))}
    env.update(DOCKER_BUILDKIT="1", DOCKER_HOST=names_daemon.host, DOCKER_CONFIG=str(tmp_path / "cfg"))
    run = subprocess.run([DOCKER_CLI, "build", "--progress", "plain", "-o", f"type=local,dest={out}", ctx],
                         env=env, capture_output=True, timeout=120)
    assert run.returncode == 0, run.stderr.decode(errors="replace")[-3000:]
    assert byte_names(out) == byte_names(ctx)


def test_reference_client_on_dockerd_carries_non_utf8_names_byte_for_byte(dockerd, tmp_path):
    from reference.client import Output, build

    ctx = latin1_context(tmp_path)
    out = str(tmp_path / "out")
    build(ctx, host=dockerd.host, outputs=[Output("local", out)], timeout=120)
    assert byte_names(out) == byte_names(ctx)
    assert os.readlink(os.path.join(os.fsencode(out), b"link")) == b"to-\xfe"


def test_a_deep_honest_context_copied_into_a_build_leaves_a_daemon_that_restarts(tmp_path):
    """1,500 levels (host paths within PATH_MAX, so COPY succeeds): the build's root filesystem is as
    deep, and removing it must not recurse, neither after the build nor at the next start."""
    from reference.client import build

    sys.path.insert(0, os.path.dirname(__file__))
    from test_limits import make_chain

    ctx = str(tmp_path / "ctx")
    os.mkdir(ctx)
    with open(os.path.join(ctx, "Dockerfile"), "w") as fh:
        fh.write("FROM scratch\nCOPY . /\n")
    make_chain(ctx, 1500, name="c")
    daemon = Daemon().start()
    try:
        assert build(ctx, host=daemon.host, tags=["deep:copy"], timeout=120).image_id
        deadline = time.monotonic() + 8
        while os.listdir(os.path.join(daemon.root, "tmp")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert os.listdir(os.path.join(daemon.root, "tmp")) == [], "the build's directory was not removed"
        daemon.restart()
    finally:
        daemon.close()
        remove_tree(ctx)


def test_limits_set_on_the_command_line_are_the_ones_enforced(tmp_path):
    """--max-depth and --max-path-length of ``python -m reference.daemon`` reach the receiver."""
    ctx = honest_context(tmp_path)
    with Daemon(args=["--generation", "n", "--max-depth", "7", "--max-path-length", "300"]) as daemon:
        for sender, reason in ((deep_listing, "max_depth=7"), (long_path_listing, "max_path_length=300")):
            router = FileSyncRouter(ctx, _send_until_refused(sender))
            obs = run_build(daemon.host, ctx, handler_overrides={FILESYNC_DIFFCOPY: router}, timeout=60,
                            hang_timeout=10)
            assert not obs.ok and reason in (obs.error or ""), obs.describe()
        assert_exact_build(daemon, ctx, str(tmp_path / "out"))  # an honest build within the limits
    remove_tree(ctx)
