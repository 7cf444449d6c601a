"""The instrumented daemon the suite plays to test clients.

A real dockerd cannot answer ``/build`` before the client's session is up: it
needs the session to fetch the Dockerfile. A scripted build that makes no call
could answer first, and the docker CLI 20.10 then hangs for good: its
``Session.Close()`` finds no connection yet, so it closes nothing and waits for
a ``Run`` that never ends (seen as a 60 s timeout in CI, about 1 run in 300
under load). The harness therefore answers a build only once the client's
HTTP/2 server has spoken.
"""

from __future__ import annotations

import socket
import threading
import time

import h11
import pytest

from conformance.harness.instrumented_daemon import InstrumentedDaemon, ScenarioResult
from reference.transport.base import connect_grpcio, connect_h2

pytestmark = pytest.mark.timeout(60)

CLIENTS = {"h2": connect_h2, "grpcio": connect_grpcio}


def _server_preface() -> bytes:
    import h2.config
    import h2.connection

    peer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    peer.initiate_connection()
    return peer.data_to_send()


@pytest.mark.parametrize("transport", sorted(CLIENTS))
def test_client_connection_knows_when_the_peer_has_spoken(transport):
    ours, theirs = socket.socketpair()
    conn = CLIENTS[transport](ours)
    try:
        assert not conn.wait_peer_ready(0.3), "ready before the peer sent anything"
        theirs.sendall(_server_preface())
        assert conn.wait_peer_ready(5)
    finally:
        conn.close()
        theirs.close()


@pytest.mark.parametrize("transport", sorted(CLIENTS))
def test_peer_ready_wait_ends_when_the_connection_does(transport):
    ours, theirs = socket.socketpair()
    conn = CLIENTS[transport](ours)
    try:
        theirs.close()
        started = time.monotonic()
        assert not conn.wait_peer_ready(10)
        assert time.monotonic() - started < 5
    finally:
        conn.close()


def _http(sock: socket.socket, method: str, target: str, headers=()) -> None:
    conn = h11.Connection(h11.CLIENT)
    data = conn.send(h11.Request(method=method, target=target,
                                 headers=[("Host", "docker"), ("Content-Length", "0"), *headers]))
    data += conn.send(h11.EndOfMessage())
    sock.sendall(data)


def _read_until(sock: socket.socket, marker: bytes, timeout: float) -> bytes:
    sock.settimeout(timeout)
    got = b""
    try:
        while marker not in got:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
    except TimeoutError:
        pass
    return got


def test_build_is_answered_only_after_the_clients_session_has_spoken():
    session_id = "harness-wait-1"
    with InstrumentedDaemon(lambda build: ScenarioResult()) as daemon:
        path = daemon.socket_path
        session = socket.socket(socket.AF_UNIX)
        session.connect(path)
        _http(session, "POST", "/v1.41/session",
              [("Connection", "Upgrade"), ("Upgrade", "h2c"), ("X-Docker-Expose-Session-Uuid", session_id)])
        assert b"101" in _read_until(session, b"\r\n\r\n", 5)
        build = socket.socket(socket.AF_UNIX)
        build.connect(path)
        _http(build, "POST", f"/v1.41/build?session={session_id}&remote=client-session")
        early = _read_until(build, b"moby.image.id", 1.0)
        assert b"moby.image.id" not in early, "build answered before the client's HTTP/2 server spoke"
        session.sendall(_server_preface())
        late = early + _read_until(build, b"moby.image.id", 5)
        assert b"moby.image.id" in late
        build.close()
        session.close()
