"""Daemon role, generation n-1: the 2017 build (Dockerfile in the body) with a TarStream context.

The suite plays a generation n-1 client: it serves `FileSync/TarStream` and
sends `POST /build?remote=client-session&session=ID` with the Dockerfile as body.
"""

from __future__ import annotations

import gzip
import io
import tarfile
import threading

import pytest

from reference.client.services import FILESYNC_TARSTREAM
from reference.pb import filesync_pb2
from reference.transport.base import RpcError, StatusCode

from .harness.daemon_probes import LiveSession, raw_build
from .harness.scripted_client import make_context
from .outcomes import expect

requirement = pytest.mark.requirement
DOCKERFILE = b"FROM scratch\nCOPY . /\n"


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _serving(payload: bytes | None, *, error: RpcError | None = None, seen: dict):
    """A TarStream handler that records whether the daemon sent anything, then serves ``payload``."""

    def handler(stream):
        seen["called"] = True
        got = []

        def drain():
            try:
                while (msg := stream.recv(timeout=5)) is not None:
                    got.append(msg)
            except (TimeoutError, RpcError):
                pass

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        if error is not None:
            raise error
        for i in range(0, len(payload), 32 * 1024):
            stream.send(filesync_pb2.BytesMessage(data=payload[i:i + 32 * 1024]).SerializeToString())
        stream.flush()
        reader.join(0.2)
        seen["daemon_messages"] = len(got)

    return handler


def _build(daemon, handler):
    ctx = make_context({})
    with LiveSession(daemon.host, ctx, handler_overrides={FILESYNC_TARSTREAM: handler},
                     filesync=("tarstream",)) as live:
        return raw_build(daemon.host, {"remote": "client-session", "session": live.session_id, "rm": "1"},
                         body=DOCKERFILE, timeout=30)


def needs_n(daemon) -> None:
    if daemon.generation != "n-1":
        pytest.skip("TarStream contexts with the Dockerfile in the body are generation n-1")


@requirement("TARSTREAM-3")
@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_tar_context_is_accepted_plain_or_compressed(daemon, compress):
    needs_n(daemon)
    archive = _tar({"Dockerfile": DOCKERFILE, "a.txt": b"a", "d/b": b"b" * 70000})
    seen: dict = {}
    build = _build(daemon, _serving(gzip.compress(archive) if compress else archive, seen=seen))
    expect("TARSTREAM-3", seen.get("called") and not build.errors() and build.ended,
           "the build succeeds from a TarStream context", (seen, build.errors(), build.messages[-2:]))
    expect("TARSTREAM-3", seen.get("daemon_messages") == 0, "the daemon sends no message on TarStream", seen)


@requirement("TARSTREAM-3")
@pytest.mark.parametrize("case", ["malformed", "error-status"])
def test_bad_tar_stream_fails_the_build(daemon, case):
    needs_n(daemon)
    seen: dict = {}
    if case == "malformed":
        handler = _serving(b"this is not a tar archive at all" * 40, seen=seen)
    else:
        handler = _serving(None, error=RpcError(StatusCode.UNKNOWN, "disk on fire"), seen=seen)
    build = _build(daemon, handler)
    expect("TARSTREAM-3", bool(seen.get("called")) and (bool(build.errors()) or build.status != 200),
           "the build fails", (seen, build.status, build.messages[-2:], build.error_body))
