"""The reference daemon (``python -m reference.daemon``) against real and scripted peers.

Each daemon runs as a subprocess on a unix socket; builds come from the docker
CLI 20.10 (the ``docker-cli-20.10`` peer, DOCKER_BUILDKIT=1), from our reference client
(generations n and n+1), or from scripted sessions that misbehave on purpose.
What the daemon did is read from its ``GET /_reference/stats`` endpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from conformance.trees import diff_snapshots, snapshot, write_file
from reference import diffcopy as dc
from reference.client.build import BuildError, post_build, build
from reference.dockerhost import api_call, connect, HttpConnection
from reference.filemode import MODE_DIR
from reference.pb.fsutil_types_pb2 import Packet, Stat
from reference.session import SessionRequest, build_node_id, new_session_id, open_session
from reference.transport.base import RpcError
from reference.transport.h2grpc import serve_h2

from conformance.realpeers import DOCKER_CLI  # the CLI 20.10 peer, by absolute path

HEALTH = "/grpc.health.v1.Health/Check"
DIFFCOPY = "/moby.filesync.v1.FileSync/DiffCopy"
TARSTREAM = "/moby.filesync.v1.FileSync/TarStream"

needs_cli = pytest.mark.skipif(not os.path.exists(DOCKER_CLI), reason="docker CLI 20.10 not installed")


class RefDaemon:
    """``python -m reference.daemon`` in a subprocess, on a short unix socket path."""

    # n: these tests expect dockerd 20.10's wire (API 1.41, 1 s health checks, raw metadata, incremental
    # Dockerfile transfers); generation n+1's differences are tests/test_daemon_generations.py's
    def __init__(self, root: str, generation: str = "n", transport: str = "h2", args=(), env=None):
        self.root = root
        self.generation = generation
        self.transport = transport
        self.args = list(args)
        self.env = env or {}
        self.dir = tempfile.mkdtemp(prefix="rdt-", dir="/tmp")  # sun_path is short
        self.host = "unix://" + os.path.join(self.dir, "d.sock")
        self.log_path = os.path.join(self.dir, "daemon.log")
        self.proc = None
        self.start()

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "BUILD_STREAM_PROTOCOL"}
        env.update(self.env)
        cmd = [sys.executable, "-m", "reference.daemon", "--host", self.host, "--root", self.root,
               "--generation", self.generation, "--transport", self.transport, *self.args]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("daemon exited:\n" + self.logs())
            try:
                if self.get("/_ping")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("daemon not ready:\n" + self.logs())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def logs(self) -> str:
        with open(self.log_path, errors="replace") as fh:
            return fh.read()[-5000:]

    def get(self, path: str, method: str = "GET", headers=()):
        resp, body = api_call(method, path, host=self.host, headers=list(headers))
        return resp.status, resp, body

    def stats(self) -> dict:
        return json.loads(self.get("/_reference/stats")[2])

    def builds(self) -> list[dict]:
        return self.stats()["builds"]

    def wait_for(self, predicate, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.stats()):
                return True
            time.sleep(0.05)
        return False


@pytest.fixture(scope="module")
def refd(tmp_path_factory):
    d = RefDaemon(str(tmp_path_factory.mktemp("daemon") / "root"))
    yield d
    d.close()


@pytest.fixture(scope="module")
def impatient(tmp_path_factory):
    """Short waits, so the timeout paths are quick to test."""
    d = RefDaemon(str(tmp_path_factory.mktemp("impatient") / "root"),
                  args=["--stall-timeout", "1", "--session-wait", "0.5"])
    yield d
    d.close()


@pytest.fixture
def docker_config(tmp_path):
    path = tmp_path / "docker-config"
    path.mkdir()
    return str(path)


def run_docker(refd: RefDaemon, config: str, *args, cwd=None, timeout=60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "BUILDKIT_", "BUILDX_"))}
    env.update(DOCKER_BUILDKIT="1", DOCKER_HOST=refd.host, DOCKER_CONFIG=config)
    return subprocess.run([DOCKER_CLI, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def make_context(root) -> str:
    """A context with the entry kinds a build must carry unchanged."""
    root = str(root)
    os.makedirs(os.path.join(root, "sub", "deeper"))
    os.makedirs(os.path.join(root, "empty-dir"))
    write_file(root, "Dockerfile", b"FROM scratch\nCOPY . /\n")
    write_file(root, "hello.txt", b"hello\n")
    write_file(root, "empty", b"")
    write_file(root, "run.sh", b"#!/bin/sh\necho hi\n", mode=0o755)
    for i in range(6):  # larger than one DATA chunk, several files: exercises interleaving
        write_file(root, f"sub/blob{i}.bin", os.urandom(70_000 + i * 1000))
    write_file(root, "sub/deeper/note.md", "non-ascii: \u00e9\u00e8\n".encode())
    os.link(os.path.join(root, "sub", "blob0.bin"), os.path.join(root, "sub", "hardlink"))
    os.symlink("hello.txt", os.path.join(root, "link"))
    os.symlink("/etc/passwd", os.path.join(root, "sub", "abs-link"))
    return root


def requested_paths(build_record: dict, dir_name: str, *, followpaths: bool = False) -> list[str]:
    """Paths the daemon REQ'd in the stream(s) for ``dir_name``."""
    out = []
    for stream in build_record["streams"]:
        has_follow = any(k == "followpaths" for k, _ in stream["metadata"])
        if stream["dir_name"] == dir_name and has_follow == followpaths:
            out += stream["requested"]
    return out


# -- Engine API surface --------------------------------------------------------------


def test_ping_version_and_unknown_routes(refd):
    status, resp, body = refd.get("/_ping")
    assert (status, body) == (200, b"OK")
    assert resp.header("api-version") == "1.41"
    assert resp.header("builder-version") == "2"
    assert resp.header("docker-experimental") == "true"
    assert resp.header("ostype") == "linux"
    status, resp, body = refd.get("/_ping", "HEAD")
    assert status == 200 and body == b"" and resp.header("builder-version") == "2"
    for path in ("/version", "/v1.41/version", "/v1.24/version"):
        status, _, body = refd.get(path)
        info = json.loads(body)
        assert status == 200 and info["ApiVersion"] == "1.41" and info["MinAPIVersion"] == "1.12"
        assert info["Os"] == "linux" and info["Arch"]
    for path in ("/nope", "/v1.41/build/nope"):
        status, _, body = refd.get(path)
        assert (status, json.loads(body)) == (404, {"message": "page not found"}), path
    # what dockerd serves and this daemon does not says so (a 404 makes the docker CLI look for an image to pull)
    for path in ("/v1.41/containers/json", "/containers/create", "/v1.41/images/refimg:1/push",
                 "/images/create", "/networks"):
        status, _, body = refd.get(path)
        message = json.loads(body)["message"]
        assert status == 501 and message.startswith("not supported by the reference daemon: GET ") and \
            "runs no containers" in message, (path, status, message)
    status, _, body = refd.get("/v1.99/version")
    assert status == 400 and "too new" in json.loads(body)["message"]


def session_post(refd: RefDaemon, headers: list[tuple[str, str]]):
    sock = connect(refd.host)
    try:
        http = HttpConnection(sock)
        resp = http.request("POST", "/session", headers)
        body = http.read_body() if resp.status != 101 else b""
        return resp, body
    finally:
        sock.close()


def test_session_handshake_errors(refd):
    base = [("X-Docker-Expose-Session-Uuid", new_session_id()), ("X-Docker-Expose-Session-Grpc-Method", HEALTH)]
    resp, body = session_post(refd, base)
    assert resp.status == 400 and json.loads(body) == {"message": "no upgrade proto in request"}
    for proto in ("websocket", "H2C"):
        resp, body = session_post(refd, base + [("Connection", "Upgrade"), ("Upgrade", proto)])
        assert resp.status == 400 and json.loads(body) == {"message": f"protocol {proto} not supported"}

    session = ScriptedSession(refd, {HEALTH: health})
    try:
        resp, body = session_post(refd, [("X-Docker-Expose-Session-Uuid", session.id),
                                           ("Connection", "Upgrade"), ("Upgrade", "h2c")])
        assert resp.status == 400
        assert json.loads(body) == {"message": f"session {session.id} already exists"}
    finally:
        session.close()


# -- scripted sessions --------------------------------------------------------------------


def health(stream) -> None:
    stream.recv()
    stream.send(b"\x08\x01")  # HealthCheckResponse{status: SERVING}


class ScriptedSession:
    def __init__(self, refd: RefDaemon, handlers: dict, methods: list[str] | None = None,
                 shared_key: str = "scripted"):
        self.id = new_session_id()
        request = SessionRequest(self.id, "ctx", shared_key, methods if methods is not None else sorted(handlers))
        self.sock, leftover = open_session(request, refd.host)
        self.server = serve_h2(self.sock, handlers, leftover)
        self.host = refd.host

    def build(self, timeout: float = 20.0, **query) -> str | None:
        params = {"version": "2", "session": self.id, "remote": "client-session",
                  "dockerfile": "Dockerfile", "buildid": new_session_id()}
        params.update(query)
        image_id, _ = post_build(params, self.host, None, timeout, 5.0)
        return image_id

    def close(self) -> None:
        self.server.close()
        self.sock.close()


def scripted_sender(listings: dict[str, list[Packet]], contents: dict[str, bytes], log: list[str]):
    """A FileSync/DiffCopy handler that sends fixed packets per dir-name and records what comes back."""

    def handler(stream) -> None:
        name = dict(stream.metadata).get("dir-name", "")
        stats = listings.get(name, [])
        for packet in stats:
            stream.send(packet.SerializeToString())
        stream.send(dc.end_of_listing().SerializeToString())
        stream.flush()
        by_id = {i: p.stat.path for i, p in enumerate(stats)}
        while True:
            raw = stream.recv(10)
            if raw is None:
                return
            packet = Packet.FromString(raw)
            log.append(f"{name}: {dc.describe(packet)}")
            if packet.type == dc.PACKET_REQ:
                data = contents.get(by_id.get(packet.ID, ""), b"")
                if data:
                    stream.send(dc.data_packet(packet.ID, data).SerializeToString())
                stream.send(dc.data_packet(packet.ID, b"").SerializeToString())
                stream.flush()
            elif packet.type == dc.PACKET_FIN:
                stream.send(dc.fin_packet().SerializeToString())
                return
            elif packet.type == dc.PACKET_ERR:
                return

    return handler


def file_stat(path: str, data: bytes) -> Packet:
    return dc.stat_packet(Stat(path=path, mode=0o644, size=len(data), modTime=1_600_000_000_000_000_000))


def test_malformed_stream_is_rejected_and_reported(refd, tmp_path):
    """A client listing ``..`` as a directory: fsutil 0834f99 lets it through; we refuse it."""
    dockerfile = b"FROM scratch\nCOPY . /\n"
    log: list[str] = []
    bad = [dc.stat_packet(Stat(path="..", mode=MODE_DIR | 0o777, modTime=1)), file_stat("../x", b"owned")]
    handlers = {HEALTH: health, DIFFCOPY: scripted_sender({"dockerfile": bad}, {}, log)}
    session = ScriptedSession(refd, handlers)
    cache_dir = os.path.join(refd.root, "cache")
    before = {name: os.stat(os.path.join(cache_dir, name)).st_mode for name in os.listdir(cache_dir)}
    started = time.monotonic()
    try:
        with pytest.raises(BuildError) as info:
            session.build()
    finally:
        session.close()
    message = str(info.value)
    assert time.monotonic() - started < 5
    assert "escapes the root" in message and "'..'" in message
    assert refd.root not in message
    assert any("ERR" in line and "escapes the root" in line for line in log), log
    assert {n: os.stat(os.path.join(cache_dir, n)).st_mode for n in before} == before
    assert not os.path.exists(os.path.join(os.path.dirname(cache_dir), "x"))
    # still serving, and a good build on the same daemon works
    good = {"dockerfile": [file_stat("Dockerfile", dockerfile)], "context": [file_stat("a", b"a")]}
    session = ScriptedSession(refd, {HEALTH: health, DIFFCOPY: scripted_sender(
        good, {"Dockerfile": dockerfile, "a": b"a"}, [])})
    try:
        assert session.build().startswith("sha256:")
    finally:
        session.close()


def test_comma_joined_method_header_is_one_bogus_method(refd):
    joined = [",".join([HEALTH, DIFFCOPY])]
    session = ScriptedSession(refd, {HEALTH: health, DIFFCOPY: health}, methods=joined)
    try:
        with pytest.raises(BuildError) as info:
            session.build()
    finally:
        session.close()
    assert "no common file sync protocol: daemon offers [diffcopy], client advertises []" in str(info.value)


def test_session_without_health_service_is_dropped(refd):
    session = ScriptedSession(refd, {DIFFCOPY: health})  # health answers UNIMPLEMENTED
    started = time.monotonic()
    try:
        assert session.server.wait(5), "the daemon kept a session whose health check fails"
        assert 0.5 < time.monotonic() - started < 3
    finally:
        session.close()


def test_vanished_client_frees_session_and_threads(refd):
    assert refd.wait_for(lambda s: s["sessions_active"] == 0)
    baseline = refd.stats()["threads"]
    session = ScriptedSession(refd, {HEALTH: health})
    assert refd.wait_for(lambda s: s["sessions_active"] == 1)
    session.sock.shutdown(socket.SHUT_RDWR)
    session.close()
    assert refd.wait_for(lambda s: s["sessions_active"] == 0 and s["threads"] <= baseline, timeout=5), refd.stats()


def test_missing_session_and_stalled_sender_time_out(impatient):
    started = time.monotonic()
    with pytest.raises(BuildError) as info:
        post_build({"version": "2", "session": "nosuchsession", "remote": "client-session"},
                   impatient.host, None, 10, 5)
    assert "no active session for nosuchsession: context deadline exceeded" in str(info.value)
    assert 0.4 < time.monotonic() - started < 3

    def never_answers(stream):
        stream.send(file_stat("Dockerfile", b"FROM scratch\n").SerializeToString())
        stream.send(dc.end_of_listing().SerializeToString())
        stream.flush()
        try:
            while stream.recv(5) is not None:  # REQ arrives, DATA never goes out
                pass
        except Exception:
            pass

    session = ScriptedSession(impatient, {HEALTH: health, DIFFCOPY: never_answers})
    started = time.monotonic()
    try:
        with pytest.raises(BuildError) as info:
            session.build()
    finally:
        session.close()
    assert "the client stalled: no data for 1 s" in str(info.value)
    assert time.monotonic() - started < 4


def test_local_export_interleaves_and_half_closes_after_fin(refd):
    """The daemon as fsutil sender on FileSend: DATA of several files interleave, and after
    the FIN exchange it half-closes (FILESEND-LOCAL-4; BuildKit 0.8 cancels instead)."""
    dockerfile = b"FROM scratch\nCOPY . /\n"
    blobs = {f"f{i}": os.urandom(3 * 32 * 1024 + i) for i in range(4)}
    listing = [file_stat(name, data) for name, data in sorted(blobs.items())]
    sender = scripted_sender({"dockerfile": [file_stat("Dockerfile", dockerfile)], "context": listing},
                             {"Dockerfile": dockerfile, **blobs}, [])
    seen: list[tuple[str, bool]] = []  # (file, end of file) per DATA, in arrival order
    ending: list[str] = []

    def receiver(stream) -> None:
        ids, done = {}, set()
        while True:
            try:
                raw = stream.recv(10)
            except RpcError as exc:
                ending.append(exc.code.name)
                return
            if raw is None:
                ending.append("EOF")
                return
            packet = Packet.FromString(raw)
            if packet.type == dc.PACKET_STAT and packet.HasField("stat"):
                ids[len(ids)] = packet.stat.path
                stream.send(dc.req_packet(len(ids) - 1).SerializeToString())
            elif packet.type == dc.PACKET_STAT:
                stream.flush()
            elif packet.type == dc.PACKET_DATA:
                seen.append((ids[packet.ID], not packet.data))
                if not packet.data:
                    done.add(packet.ID)
                    if len(done) == len(blobs):
                        stream.send(dc.fin_packet().SerializeToString())
                        stream.flush()
            elif packet.type == dc.PACKET_FIN:
                ending.append("FIN")

    session = ScriptedSession(refd, {HEALTH: health, DIFFCOPY: sender,
                                     "/moby.filesync.v1.FileSend/DiffCopy": receiver})
    try:
        session.build(outputs=json.dumps([{"Type": "local", "Attrs": {}}]))
    finally:
        session.close()
    first_eof = next(i for i, (_, eof) in enumerate(seen) if eof)
    assert len({name for name, _ in seen[:first_eof]}) > 1, f"no interleaving: {seen}"
    # FIN, then the end of the daemon's side of the call
    assert ending == ["FIN", "EOF"], ending


def test_build_cancel_endpoint(impatient):
    def slow(stream):
        stream.send(file_stat("Dockerfile", b"FROM scratch\n").SerializeToString())
        stream.send(dc.end_of_listing().SerializeToString())
        stream.flush()
        try:
            while stream.recv(5) is not None:
                pass
        except Exception:
            pass

    session = ScriptedSession(impatient, {HEALTH: health, DIFFCOPY: slow})
    build_id = new_session_id()
    threading.Timer(0.3, lambda: impatient.get(f"/v1.41/build/cancel?id={build_id}", "POST")).start()
    started = time.monotonic()
    try:
        with pytest.raises(BuildError) as info:
            session.build(buildid=build_id)
    finally:
        session.close()
    # cancelled at 0.3 s: ended by the cancel, long before the 60 s stall timeout would
    assert "context canceled" in str(info.value) and time.monotonic() - started < 5


def test_export_to_a_silent_client_times_out(impatient):
    dockerfile = b"FROM scratch\nCOPY . /\n"
    sender = scripted_sender({"dockerfile": [file_stat("Dockerfile", dockerfile)], "context": [file_stat("a", b"a")]},
                             {"Dockerfile": dockerfile, "a": b"a"}, [])

    def silent(stream) -> None:
        time.sleep(3)  # never asks for a file, never says FIN

    session = ScriptedSession(impatient, {HEALTH: health, DIFFCOPY: sender,
                                          "/moby.filesync.v1.FileSend/DiffCopy": silent})
    started = time.monotonic()
    try:
        with pytest.raises(BuildError) as info:
            session.build(outputs=json.dumps([{"Type": "local", "Attrs": {}}]))
        elapsed = time.monotonic() - started
    finally:
        session.close()
    assert "export to client stalled" in str(info.value) and elapsed < 3


# -- our client, generations n and n+1 ------------------------------------------------------


@pytest.fixture(scope="module")
def daemons_by_generation(tmp_path_factory):
    daemons = {generation: RefDaemon(str(tmp_path_factory.mktemp(f"daemon-{generation}") / "root"),
                                     generation=generation) for generation in ("n-1", "n", "n+1")}
    yield daemons
    for daemon in daemons.values():
        daemon.close()


@pytest.mark.parametrize("client_generation", ["n-1", "n", "n+1"])
@pytest.mark.parametrize("daemon_generation", ["n-1", "n", "n+1"])
def test_generation_matrix(daemons_by_generation, client_generation, daemon_generation, tmp_path, monkeypatch):
    """Every client generation against every daemon generation: the 2017 model (TarStream only) meets the
    real generations (DiffCopy only) in one direction only, because their clients still serve TarStream."""
    target = daemons_by_generation[daemon_generation]
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "cfg"))
    context = make_context(tmp_path / "ctx")
    write_file(context, ".dockerignore", b"empty\n")
    tag = "matrix:" + client_generation.replace("+1", "plus1").replace("-1", "minus1")
    if client_generation == "n-1" and daemon_generation != "n-1":
        with pytest.raises(BuildError, match=r"no common file sync protocol: daemon offers \[diffcopy\], "
                                             r"client advertises \[tarstream\]"):
            build(context, tags=[tag], generation=client_generation, host=target.host, timeout=30)
        return
    result = build(context, tags=[tag], generation=client_generation,
                   host=target.host, timeout=30)
    record = target.builds()[-1]
    assert record["error"] == ""
    assert record["image_id"] and record["image_id"] == (result.image_id or record["image_id"])
    expected = "tarstream" if daemon_generation == "n-1" else "diffcopy"
    assert record["protocol"] == expected
    assert record["version"] == ("1" if client_generation == "n-1" else "2")
    assert {s.protocol for s in result.streams} == {expected}
    image = json.loads(target.get(f"/images/{tag}/json")[2])
    assert image["Id"] == record["image_id"] and len(image["RootFS"]["Layers"]) == 1


def test_forced_protocol_without_overlap_fails_fast(tmp_path, monkeypatch):
    forced = RefDaemon(str(tmp_path / "root"), env={"BUILD_STREAM_PROTOCOL": "diffcopy"})
    try:
        monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "cfg"))
        context = make_context(tmp_path / "ctx")
        started = time.monotonic()
        with pytest.raises(BuildError) as info:
            build(context, generation="n-1", host=forced.host, timeout=30)
        assert time.monotonic() - started < 3
        assert "no common file sync protocol: daemon offers [diffcopy], client advertises [tarstream]" in str(info.value)
    finally:
        forced.close()


def test_export_needs_filesend(refd, tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "cfg"))
    context = make_context(tmp_path / "ctx")
    started = time.monotonic()
    with pytest.raises(BuildError) as info:  # outputs requested, FileSend not advertised
        build(context, host=refd.host, timeout=30, extra_query={"outputs": json.dumps([{"Type": "local"}])})
    assert "method /moby.filesync.v1.FileSend/diffcopy not supported by the client" in str(info.value)
    assert time.monotonic() - started < 5


def test_unsupported_instruction(refd, tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "cfg"))
    context = make_context(tmp_path / "ctx")
    write_file(context, "Dockerfile", b"FROM scratch\nCOPY . /\nRUN echo hi\n")
    with pytest.raises(BuildError) as info:
        build(context, host=refd.host, timeout=30)
    assert "line 3: unsupported instruction RUN" in str(info.value)
    # nothing of the context was transferred for a Dockerfile we cannot build
    record = refd.builds()[-1]
    assert [s["dir_name"] for s in record["streams"]] == ["dockerfile", "context"], record


def test_dockerignore_is_asked_for_after_the_dockerfile_transfer_ends(refd, tmp_path):
    """dockerd 20.10.24 opens the context's .dockerignore transfer only once the Dockerfile's has
    ended (40-55 ms later, measured): the reference daemon keeps that order on the wire."""
    from conformance.harness.daemon_probes import FileSyncRouter
    from conformance.harness.scripted_client import run_build
    from reference.client.services import FILESYNC_DIFFCOPY

    context = make_context(tmp_path / "ctx")
    router = FileSyncRouter(context)
    events: list[str] = []
    lock = threading.Lock()

    def handler(stream) -> None:
        followpaths = [value for key, value in stream.metadata if key == "followpaths"]
        what = "dockerfile" if "Dockerfile" in followpaths else "ignore" if followpaths else "context"
        with lock:
            events.append(what + " started")
        if what == "dockerfile":
            time.sleep(0.3)  # a daemon that asks for both at once shows it within this
        router(stream)
        with lock:
            events.append(what + " ended")

    obs = run_build(refd.host, context, handler_overrides={FILESYNC_DIFFCOPY: handler})
    assert obs.ok, obs.describe()
    assert events[:4] == ["dockerfile started", "dockerfile ended", "ignore started", "ignore ended"], events
    record = refd.builds()[-1]
    assert [s["dir_name"] for s in record["streams"]] == ["dockerfile", "context", "context"], record
    assert record["streams"][1]["metadata"] == [["dir-name", "context"], ["followpaths", ".dockerignore"]]


def test_missing_dockerfile_fails_before_the_dockerignore_is_asked_for(refd, tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "cfg"))
    context = make_context(tmp_path / "ctx")
    os.unlink(os.path.join(context, "Dockerfile"))
    with pytest.raises(BuildError) as info:
        build(context, host=refd.host, timeout=30)
    assert "failed to read dockerfile: open Dockerfile: no such file or directory" in str(info.value)
    record = refd.builds()[-1]
    assert [s["dir_name"] for s in record["streams"]] == ["dockerfile"], record


def test_concurrent_builds_with_one_shared_key(refd, tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "cfg"))
    context = make_context(tmp_path / "ctx")
    build_node_id()  # created once up front: the client's first-use creation is not thread-safe
    results, errors = [], []

    def one() -> None:
        try:
            results.append(build(context, host=refd.host, timeout=30).image_id)
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(40)
    assert not errors and len(results) == 3 and len(set(results)) == 1


# -- docker CLI 20.10 -----------------------------------------------------------------------


@needs_cli
def test_cli_build_export_and_incremental_rebuild(refd, docker_config, tmp_path):
    context = make_context(tmp_path / "ctx")
    started = time.monotonic()
    proc = run_docker(refd, docker_config, "build", "-t", "clitest:1", "--progress", "plain", context)
    first_build = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr + refd.logs()
    for text in ("[internal] load build definition from Dockerfile", "[internal] load .dockerignore",
                 "[internal] load build context", "[1/1] COPY . /", "exporting to image",
                 "naming to docker.io/library/clitest:1"):
        assert text in proc.stderr
    record = refd.builds()[-1]
    first = requested_paths(record, "context")
    assert "hello.txt" in first and "sub/blob5.bin" in first and "sub/hardlink" not in first
    dockerfile_stream = next(s for s in record["streams"] if s["dir_name"] == "dockerfile")
    assert dockerfile_stream["metadata"] == [["dir-name", "dockerfile"], ["followpaths", "Dockerfile"],
                                             ["followpaths", "Dockerfile.dockerignore"],
                                             ["followpaths", "dockerfile"]]

    proc = run_docker(refd, docker_config, "build", "-q", context)  # q=1: only the id, as dockerd does
    assert proc.returncode == 0 and proc.stdout.strip() == refd.builds()[-1]["image_id"], proc.stderr

    proc = run_docker(refd, docker_config, "image", "inspect", "clitest:1")
    assert proc.returncode == 0, proc.stderr
    image_id = json.loads(proc.stdout)[0]["Id"]
    assert image_id == record["image_id"]

    started = time.monotonic()
    proc = run_docker(refd, docker_config, "build", "-t", "clitest:1", context)
    rebuild = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    record = refd.builds()[-1]
    assert [s["requested"] for s in record["streams"]] == [[], [], []], "an unchanged rebuild transferred files"
    assert record["image_id"] == image_id

    write_file(context, "sub/deeper/note.md", b"changed\n")
    proc = run_docker(refd, docker_config, "build", context)
    assert proc.returncode == 0, proc.stderr
    assert requested_paths(refd.builds()[-1], "context") == ["sub/deeper/note.md"]

    out = tmp_path / "out"
    proc = run_docker(refd, docker_config, "build", "-o", f"type=local,dest={out}", context)
    assert proc.returncode == 0, proc.stderr
    owner = (os.getuid(), os.getgid())  # the CLI gives exported files its own uid/gid
    # directory mtimes: the CLI's receiver (fsutil Merge) moves them while it writes children
    assert diff_snapshots(snapshot(context, owner=owner, with_mtime_of_dirs=False),
                          snapshot(str(out), owner=owner, with_mtime_of_dirs=False)) == []
    export_record = refd.builds()[-1]["export"]
    # every regular file but the second name of the hardlink: Dockerfile, hello.txt, empty, run.sh, 6 blobs, note.md
    assert export_record["type"] == "local" and len(export_record["requested"]) == 11

    tar_path = tmp_path / "out.tar"
    proc = run_docker(refd, docker_config, "build", "-o", f"type=tar,dest={tar_path}", context)
    assert proc.returncode == 0, proc.stderr
    import tarfile

    with tarfile.open(tar_path) as tar:
        names = set(tar.getnames())
    assert {"hello.txt", "sub/deeper/note.md", "sub/hardlink", "link"} <= names
    print(f"CLI cold build {first_build:.2f} s, unchanged rebuild {rebuild:.2f} s")


@needs_cli
def test_cli_system_df_and_builder_prune(refd, docker_config, tmp_path):
    context = make_context(tmp_path / "ctx")
    assert run_docker(refd, docker_config, "build", context).returncode == 0
    proc = run_docker(refd, docker_config, "system", "df")
    assert proc.returncode == 0, proc.stderr
    assert "Build Cache" in proc.stdout
    df = json.loads(refd.get("/v1.41/system/df")[2])
    assert df["BuildCache"] and all(r["Type"] == "source.local" for r in df["BuildCache"])
    assert all(r["Description"].startswith("local source for ") for r in df["BuildCache"])
    total = sum(r["Size"] for r in df["BuildCache"])
    assert total >= 6 * 70_000
    proc = run_docker(refd, docker_config, "builder", "prune", "-af")
    assert proc.returncode == 0, proc.stderr
    assert "Total reclaimed space" in proc.stdout
    assert json.loads(refd.get("/system/df")[2])["BuildCache"] == []
    assert os.listdir(os.path.join(refd.root, "cache")) == []


@needs_cli
def test_cli_info_is_clean_and_run_says_what_the_daemon_does_not_do(refd, docker_config, tmp_path):
    info = run_docker(refd, docker_config, "info")
    assert info.returncode == 0 and "WARNING" not in info.stdout + info.stderr, info.stdout + info.stderr
    context = make_context(tmp_path / "ctx")
    assert run_docker(refd, docker_config, "build", "-q", "-t", "refimg:1", context).returncode == 0
    run = run_docker(refd, docker_config, "run", "--rm", "refimg:1")
    # not "Unable to find image ... locally" and a pull: the image exists; running it is what is not supported
    assert run.returncode != 0 and "not supported by the reference daemon: POST /containers/create" in run.stderr
    assert "Unable to find image" not in run.stderr, run.stderr


@needs_cli
def test_cli_cache_survives_restart_and_grpcio_transport(tmp_path, docker_config):
    context = make_context(tmp_path / "ctx")
    d = RefDaemon(str(tmp_path / "root"), transport="grpcio")
    try:
        assert run_docker(d, docker_config, "build", context).returncode == 0, d.logs()
        assert requested_paths(d.builds()[-1], "context")
        d.stop()
        d.start()
        proc = run_docker(d, docker_config, "build", context)
        assert proc.returncode == 0, proc.stderr + d.logs()
        assert [s["requested"] for s in d.builds()[-1]["streams"]] == [[], [], []]
        out = tmp_path / "out"
        assert run_docker(d, docker_config, "build", "-o", f"type=local,dest={out}", context).returncode == 0
        owner = (os.getuid(), os.getgid())
        assert diff_snapshots(snapshot(context, owner=owner, with_mtime_of_dirs=False),
                              snapshot(str(out), owner=owner, with_mtime_of_dirs=False)) == []
    finally:
        d.close()


@needs_cli
def test_cli_dockerignore_and_failure_output(refd, docker_config, tmp_path):
    context = make_context(tmp_path / "ctx")
    write_file(context, ".dockerignore", b"sub/blob*\n!sub/blob3.bin\n")
    write_file(context, "Dockerfile", b"FROM scratch\nARG DIR=/app\nWORKDIR $DIR\n"
                                      b"COPY --chown=7:8 hello.txt sub/ ./\nENV A=1\nLABEL x=y\n")
    proc = run_docker(refd, docker_config, "build", "-t", "ignored", context)
    assert proc.returncode == 0, proc.stderr
    record = refd.builds()[-1]
    context_stream = [s for s in record["streams"] if s["dir_name"] == "context"][-1]
    assert ["exclude-patterns", "sub/blob*"] in context_stream["metadata"]
    assert ["exclude-patterns", "!sub/blob3.bin"] in context_stream["metadata"]
    inspect = json.loads(run_docker(refd, docker_config, "image", "inspect", "ignored").stdout)[0]
    assert inspect["Config"]["WorkingDir"] == "/app" and inspect["Config"]["Labels"] == {"x": "y"}
    assert "A=1" in inspect["Config"]["Env"]
    layer = os.path.join(refd.root, "images", "layers", inspect["RootFS"]["Layers"][-1].split(":")[1] + ".tar")
    import tarfile

    with tarfile.open(layer) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert "app/hello.txt" in members and "app/blob3.bin" in members and "app/blob0.bin" not in members
    assert (members["app/hello.txt"].uid, members["app/hello.txt"].gid) == (7, 8)

    write_file(context, "Dockerfile", b"FROM scratch\nCOPY missing /\n")
    proc = run_docker(refd, docker_config, "build", context)
    assert proc.returncode != 0
    assert '"/missing" not found' in proc.stderr
    assert refd.root not in proc.stderr


def _layer_members(refd: RefDaemon, diff_id: str) -> dict:
    import hashlib
    import tarfile

    path = os.path.join(refd.root, "images", "layers", diff_id.split(":")[1] + ".tar")
    out = {}
    with tarfile.open(path) as tar:
        for m in tar:
            data = tar.extractfile(m).read() if m.isfile() else b""
            out[m.name] = (m.type, m.mode, m.uid, m.gid, m.linkname, hashlib.sha256(data).hexdigest(),
                           m.mtime if not m.isdir() else None)
    return out


@needs_cli
def test_cli_step_cache(refd, docker_config, tmp_path):
    """Unchanged steps are CACHED; a step after cached ones runs on a tree rebuilt from
    their layers and yields the same layer content as a build without cache."""
    context = make_context(tmp_path / "ctx")
    write_file(context, "Dockerfile", b"FROM scratch\nWORKDIR /app\nCOPY hello.txt ./\nCOPY sub/ ./sub/\n")
    assert run_docker(refd, docker_config, "build", "-t", "steps", context).returncode == 0
    proc = run_docker(refd, docker_config, "build", "--progress", "plain", "-t", "steps", context)
    assert proc.returncode == 0 and proc.stderr.count("CACHED") == 3, proc.stderr
    write_file(context, "sub/deeper/note.md", b"edited\n")
    proc = run_docker(refd, docker_config, "build", "--progress", "plain", "-t", "steps", context)
    assert proc.returncode == 0 and proc.stderr.count("CACHED") == 2, proc.stderr
    cached_layers = json.loads(refd.get("/images/steps/json")[2])["RootFS"]["Layers"]
    proc = run_docker(refd, docker_config, "build", "--no-cache", "--progress", "plain", "-t", "fresh", context)
    assert proc.returncode == 0 and "CACHED" not in proc.stderr, proc.stderr
    fresh_layers = json.loads(refd.get("/images/fresh/json")[2])["RootFS"]["Layers"]
    assert len(cached_layers) == len(fresh_layers) == 3
    assert _layer_members(refd, cached_layers[-1]) == _layer_members(refd, fresh_layers[-1])


def test_build_prune_takes_one_id_pattern_as_dockerd_does(tmp_path, monkeypatch):
    d = RefDaemon(str(tmp_path / "root"))
    try:
        monkeypatch.setenv("DOCKER_HOST", d.host)
        for name in ("one", "two"):
            ctx = tmp_path / name
            ctx.mkdir()
            (ctx / "Dockerfile").write_text("FROM scratch\nCOPY . /\n")
            (ctx / f"{name}.txt").write_text(name)
            build(str(ctx), generation="n", host=d.host, timeout=30)
        records = [r["ID"] for r in json.loads(d.get("/system/df")[2])["BuildCache"]]
        assert len(records) >= 2
        resp, body = api_call("POST", "/build/prune", host=d.host,
                              query={"all": "1", "filters": json.dumps({"id": records[:2]})})
        assert resp.status == 400 and json.loads(body)["message"] == "filters expect only one value"
        resp, body = api_call("POST", "/build/prune", host=d.host,
                              query={"all": "1", "filters": json.dumps({"id": [f"^{records[0]}$"]})})
        assert resp.status == 200 and json.loads(body)["CachesDeleted"] == [records[0]]
        left = [r["ID"] for r in json.loads(d.get("/system/df")[2])["BuildCache"]]
        assert sorted(left) == sorted(records[1:])
    finally:
        d.close()
