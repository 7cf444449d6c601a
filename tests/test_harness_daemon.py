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
import time

import h11
import pytest

from conformance.harness.instrumented_daemon import InstrumentedDaemon, ScenarioResult
from reference.dockerhost import connect
from reference.session import SessionRequest, open_session
from reference.transport.base import connect_grpcio, connect_h2, serve_h2

pytestmark = pytest.mark.timeout(60)

CLIENTS = {"h2": connect_h2, "grpcio": connect_grpcio}


@pytest.mark.parametrize("transport", sorted(CLIENTS))
def test_client_connection_knows_when_the_peer_has_spoken(transport):
    ours, theirs = socket.socketpair()
    conn = CLIENTS[transport](ours)
    server = None
    try:
        assert not conn.wait_peer_ready(0.3), "ready before the peer sent anything"
        server = serve_h2(theirs, {})  # the peer's server starts: it sends its SETTINGS
        assert conn.wait_peer_ready(5)
    finally:
        conn.close()
        if server is not None:
            server.close()
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


def _post(sock: socket.socket, target: str) -> None:
    """Send a bodiless POST without waiting for the answer (HttpConnection.request would wait)."""
    conn = h11.Connection(h11.CLIENT)
    data = conn.send(h11.Request(method="POST", target=target, headers=[("Host", "docker"), ("Content-Length", "0")]))
    sock.sendall(data + conn.send(h11.EndOfMessage()))


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
        session, leftover = open_session(SessionRequest(session_id, "harness", "", []), daemon.host)
        build = connect(daemon.host)
        server = None
        try:
            _post(build, f"/v1.41/build?session={session_id}&remote=client-session")
            early = _read_until(build, b"moby.image.id", 1.0)
            assert b"moby.image.id" not in early, "build answered before the client's HTTP/2 server spoke"
            server = serve_h2(session, {}, leftover)  # now the client's server speaks
            late = early + _read_until(build, b"moby.image.id", 5)
            assert b"moby.image.id" in late
        finally:
            if server is not None:
                server.close()
            build.close()
            session.close()
