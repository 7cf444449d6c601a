"""conformance.wiretap: the recording proxy forwards every byte and decodes sessions (HTTP/2, gRPC, fsutil Packets).

The conversations are made with the h2 library playing both ends (the daemon is the HTTP/2 client of a session),
so HPACK's dynamic table, frame splitting and flow-control framing are as a real stack produces them; one test
records the docker CLI 20.10 against a private dockerd 20.10.
"""

import os
import socket
import tempfile
import threading
import time

import h2.config
import h2.connection
import pytest

from conformance import realpeers, wiretap
from conformance.wiretap import CLIENT, DAEMON, FILESEND, FILESYNC, Limits, Transfer, WireTap
from reference.pb.fsutil_types_pb2 import Packet, Stat

STAT, REQ, DATA, FIN = 0, 1, 2, 3
HEALTH = "/grpc.health.v1.Health/Check"
SESSION_REQUEST = (b"POST /session HTTP/1.1\r\nHost: \r\nUser-Agent: test\r\nContent-Length: 0\r\n"
                   b"Connection: Upgrade\r\nUpgrade: h2c\r\nX-Docker-Expose-Session-Uuid: abc\r\n\r\n")
SWITCHING = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
LONG_NAME = "long/" + "n" * 200
PATHS = ["a", "a/b", "b.txt", LONG_NAME, "c"]
METADATA = [("dir-name", "context"), ("exclude-patterns", "%2A.log"), ("exclude-patterns", "%21keep+me.log"),
            ("exclude-patterns", "%E6%97%A5%E6%9C%AC%2F%2A"), ("exclude-patterns-encoded", "1")]


def message(payload: bytes) -> bytes:
    return b"\0" + len(payload).to_bytes(4, "big") + payload


def packet(kind: int, **fields) -> bytes:
    return message(Packet(type=kind, **fields).SerializeToString())


def request_headers(path: str, metadata=()) -> list[tuple[bytes, bytes]]:
    return [(b":method", b"POST"), (b":scheme", b"http"), (b":path", path.encode()), (b":authority", b"localhost"),
            (b"content-type", b"application/grpc"), (b"te", b"trailers"),
            *((k.encode(), v.encode()) for k, v in metadata)]


def send_chunked(connection, stream_id: int, data: bytes, end_stream: bool = False) -> None:
    size = connection.max_outbound_frame_size
    for start in range(0, len(data), size):
        last = start + size >= len(data)
        connection.send_data(stream_id, data[start:start + size], end_stream=end_stream and last)


def session_conversation(large: int = 40_000) -> tuple[bytes, bytes]:
    """(daemon bytes, client bytes) after the upgrade: a FileSync/DiffCopy of PATHS in which the daemon asks for
    IDs 2 and 4, and a Health/Check; the DATA of ID 2 is `large` bytes, over several frames."""
    daemon = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    daemon.initiate_connection()
    daemon.send_headers(1, request_headers(FILESYNC, METADATA))
    daemon.send_headers(3, request_headers(HEALTH))
    daemon.send_data(3, message(b""), end_stream=True)
    for packet_id in (2, 4):
        daemon.send_data(1, packet(REQ, ID=packet_id))
    daemon.send_data(1, packet(FIN), end_stream=True)
    daemon_bytes = daemon.data_to_send()
    client.initiate_connection()
    client.receive_data(daemon_bytes)
    client.send_headers(1, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    for path in PATHS:
        mode = 0x800001ED if path == "a" else 0o644
        client.send_data(1, message(Packet(type=STAT, stat=Stat(path=path, mode=mode)).SerializeToString()))
    client.send_data(1, message(b""))  # the end of the walk: a packet without stat
    send_chunked(client, 1, packet(DATA, ID=2, data=b"x" * large))
    client.send_data(1, packet(DATA, ID=2))
    client.send_data(1, packet(DATA, ID=4, data=b"last"))
    client.send_data(1, packet(DATA, ID=4))
    client.send_data(1, packet(FIN))
    client.send_headers(1, [(b"grpc-status", b"0")], end_stream=True)
    client.send_headers(3, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    client.send_data(3, message(b"\x08\x01"))
    client.send_headers(3, [(b"grpc-status", b"0")], end_stream=True)
    return daemon_bytes, client.data_to_send()


def decode(daemon_bytes: bytes, client_bytes: bytes, *, chunk: int | None = None, early: int = 0,
           limits: Limits = Limits()) -> tuple[wiretap.Connection, list[Transfer]]:
    """Feed one session to a decoder: the request and `early` client bytes before the 101, then the daemon's
    bytes and the client's, each in chunks. (The client answers what it has received, and the proxy decodes
    before it forwards: a daemon's HEADERS are always decoded before the client's DATA on that stream.)"""
    record = wiretap.Connection(1)
    transfers: list[Transfer] = []
    decoder = wiretap._ConnectionDecoder(record, limits, transfers.append)
    client_stream = SESSION_REQUEST + client_bytes
    daemon_stream = SWITCHING + daemon_bytes
    first = len(SESSION_REQUEST) + early
    decoder.feed(CLIENT, client_stream[:first])
    for side, data in ((DAEMON, daemon_stream), (CLIENT, client_stream[first:])):
        size = chunk or len(data) or 1
        for start in range(0, len(data), size):
            decoder.feed(side, data[start:start + size])
    return record, transfers


def check_context_transfer(transfer: Transfer, large: int = 40_000) -> None:
    assert transfer.method == FILESYNC and transfer.kind == "context"
    assert transfer.values("exclude-patterns") == ["*.log", "!keep me.log", "日本/*"]
    assert transfer.encoded_keys == ["exclude-patterns"]
    assert transfer.stat_paths[CLIENT] == PATHS and transfer.walk_ended[CLIENT]
    assert transfer.requests == 2 and transfer.requested_paths == ["b.txt", "c"]
    assert transfer.packets[CLIENT] == {"STAT": len(PATHS) + 1, "DATA": 4, "FIN": 1}
    assert transfer.packets[DAEMON] == {"REQ": 2, "FIN": 1}
    assert transfer.data_bytes[CLIENT] == large + len(b"last")
    assert transfer.grpc_status == "0"
    assert "client END_STREAM" in transfer.ended and "daemon END_STREAM" in transfer.ended


# -- decoding ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [1, 5, 9, 100, 16_393, None])
def test_decoding_does_not_depend_on_how_the_bytes_are_cut(chunk):
    daemon_bytes, client_bytes = session_conversation()
    # The client's SETTINGS may leave before the 101 has been read: 20 of its bytes do here.
    record, transfers = decode(daemon_bytes, client_bytes, chunk=chunk, early=20)
    assert record.session and record.request == "POST /session" and record.status == 101
    assert record.error == ""
    assert record.calls == {FILESYNC: 1, HEALTH: 1}
    [transfer] = transfers
    check_context_transfer(transfer)


def test_a_message_beyond_the_kept_prefix_still_counts_with_its_type_id_and_size():
    daemon_bytes, client_bytes = session_conversation(large=60_000)
    _, [transfer] = decode(daemon_bytes, client_bytes, chunk=777, limits=Limits(message_prefix_bytes=64))
    # The long name's STAT is cut off, yet keeps its place: REQ 4 still names "c".
    assert transfer.stat_paths[CLIENT] == ["a", "a/b", "b.txt", "<stat beyond the kept prefix>", "c"]
    assert transfer.requested_paths == ["b.txt", "c"]
    assert transfer.data_bytes[CLIENT] == 60_000 + 4


def test_messages_are_split_whatever_the_cut_and_an_empty_one_ends_with_its_header():
    splitter = wiretap._MessageSplitter(keep=4)
    assert list(splitter.feed(message(b""))) == [(False, 0, b"")]
    stream = message(b"abcdefgh") + message(b"") + message(b"xy")
    for size in (1, 3, 5, len(stream)):
        splitter = wiretap._MessageSplitter(keep=4)
        got = [m for start in range(0, len(stream), size) for m in splitter.feed(stream[start:start + size])]
        assert got == [(False, 8, b"abcd"), (False, 0, b""), (False, 2, b"xy")], size


def test_parse_packet_reads_what_precedes_the_data():
    whole = Packet(type=DATA, ID=300, data=b"y" * 1000).SerializeToString()
    assert wiretap.parse_packet(whole[:8]) == (DATA, None, False, 300, 1000)
    stat = Packet(type=STAT, stat=Stat(path="dir/file", size=3)).SerializeToString()
    kind, raw, complete, _, _ = wiretap.parse_packet(stat)
    assert (kind, complete, Stat.FromString(raw).path) == (STAT, True, "dir/file")
    assert wiretap.parse_packet(b"") == (STAT, None, False, 0, None)  # the end of a walk
    with pytest.raises(ValueError):
        wiretap.parse_packet(bytes([0x08, 9]))  # packet type 9
    with pytest.raises(ValueError):
        wiretap.parse_packet(bytes([0x0B]))  # wire type 3 (a group): no Packet


@pytest.mark.parametrize("metadata, expected", [
    ([("exclude-patterns", "%2A.log"), ("exclude-patterns", "a+b"), ("exclude-patterns-encoded", "1")],
     ["*.log", "a b"]),
    ([("exclude-patterns", "%2A.log"), ("exclude-patterns-encoded", "true")], ["*.log"]),
    ([("exclude-patterns", "%2A.log"), ("exclude-patterns-encoded", "0")], ["%2A.log"]),
    ([("exclude-patterns", "%2A.log"), ("exclude-patterns-encoded", "yes")], ["%2A.log"]),  # not a Go bool
    ([("exclude-patterns", "%2A.log"), ("followpaths-encoded", "1")], ["%2A.log"]),
    ([("exclude-patterns", "日本/*")], ["日本/*"]),
])
def test_values_are_percent_decoded_only_where_their_key_says_so(metadata, expected):
    assert wiretap.decoded_values(metadata, "exclude-patterns") == expected


@pytest.mark.parametrize("method, metadata, kind", [
    (FILESYNC, [("dir-name", "dockerfile"), ("followpaths", "Dockerfile")], "dockerfile"),
    (FILESYNC, [("dir-name", "context"), ("followpaths", ".dockerignore")], "dockerignore"),
    (FILESYNC, [("dir-name", "context"), ("exclude-patterns", "*.log")], "context"),
    (FILESYNC, [("dir-name", "context"), ("followpaths", "a.txt"), ("followpaths", "b")], "context"),
    (FILESYNC, [("dir-name", "other")], "other"),
    (FILESEND, [("buildkit-attachable-exporter-id", "0")], "export"),
])
def test_transfers_are_told_apart_by_method_and_metadata(method, metadata, kind):
    assert Transfer(1, 1, method, metadata).kind == kind


def test_on_file_send_the_requests_are_the_clients():
    transfer = Transfer(1, 1, FILESEND, [])
    transfer.stat_paths[DAEMON] = ["x", "y"]
    transfer.packets[CLIENT]["REQ"] = 1
    transfer.requested_ids[CLIENT] = [1]
    assert (transfer.sender, transfer.requests, transfer.requested_paths) == (DAEMON, 1, ["y"])


def test_undecodable_http2_stops_the_decoding_with_a_reason():
    bad_settings = (5).to_bytes(3, "big") + bytes([4, 0]) + bytes(4) + b"12345"  # not a multiple of 6
    record, transfers = decode(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bad_settings, b"")
    assert record.session and "InvalidFrame" in record.error and transfers == []


def test_limits_stop_the_decoding_not_the_session():
    daemon = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    daemon.initiate_connection()
    daemon.send_headers(1, request_headers(FILESYNC, [("dir-name", "context")]))
    daemon.send_headers(3, request_headers(HEALTH))
    record, _ = decode(daemon.data_to_send(), b"", limits=Limits(streams_per_connection=1))
    assert "more than 1 open streams" in record.error
    daemon = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    daemon.initiate_connection()
    daemon.send_headers(1, request_headers(FILESYNC, [("followpaths", "p" * 500)]))
    record, _ = decode(daemon.data_to_send(), b"", limits=Limits(header_block_bytes=256))
    assert "OversizedHeaderList" in record.error


# -- the proxy ---------------------------------------------------------------------------------------

class FakeDaemon:
    """Accepts connections on a unix socket; answers each request head with `reply`, then reads to the end."""

    def __init__(self, path: str, reply: bytes, hold: bool = False):
        self.reply, self.hold = reply, hold
        self.received: list[bytes] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                if self.hold:
                    conn.recv(1)  # until the proxy cuts the connection
                    continue
                conn.sendall(self.reply)
                while chunk := conn.recv(65536):
                    data += chunk
                self.received.append(data)

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(5)


@pytest.fixture
def sockdir():
    with tempfile.TemporaryDirectory(prefix="dsc-tt-", dir="/tmp") as directory:  # short: sun_path
        yield directory


def exchange(tap: WireTap, sent: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(tap.socket_path)
        sock.sendall(sent)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def test_a_session_is_forwarded_byte_for_byte_and_recorded(sockdir):
    daemon_bytes, client_bytes = session_conversation()
    fake = FakeDaemon(os.path.join(sockdir, "d.sock"), SWITCHING + daemon_bytes)
    try:
        with WireTap(fake.listener.getsockname()) as tap:
            received = exchange(tap, SESSION_REQUEST + client_bytes)
            recording = tap.take()
            assert tap.take().connections == [], "take() forgets finished connections"
    finally:
        fake.close()
    assert received == SWITCHING + daemon_bytes
    assert fake.received == [SESSION_REQUEST + client_bytes]
    [connection] = recording.connections
    assert connection.session and not connection.open and recording.decode_errors() == []
    [transfer] = recording.transfers
    check_context_transfer(transfer)
    assert recording.request_counts() == {"context": 2} and recording.requested_paths("context") == ["b.txt", "c"]


def test_other_connections_are_forwarded_verbatim_and_only_named(sockdir):
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK" + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    fake = FakeDaemon(os.path.join(sockdir, "d.sock"), reply)
    sent = b"GET /_ping HTTP/1.1\r\nHost: docker\r\n\r\nPOST /session HTTP/1.1\r\nHost: docker\r\n\r\n"
    try:
        with WireTap(fake.listener.getsockname()) as tap:
            received = exchange(tap, sent)
            recording = tap.take()
    finally:
        fake.close()
    assert received == reply and fake.received == [sent]
    [connection] = recording.connections
    assert (connection.request, connection.status, connection.session, connection.error) == \
        ("GET /_ping", 200, False, "")
    assert recording.transfers == []


def test_an_unreachable_daemon_is_recorded_and_the_client_let_go(sockdir):
    with WireTap(os.path.join(sockdir, "nothing.sock")) as tap:
        try:
            assert exchange(tap, b"GET /_ping HTTP/1.1\r\n\r\n") == b""
        except (ConnectionResetError, BrokenPipeError):  # closed before or with the request unread: let go all the same
            pass
        [connection] = tap.take().connections
    assert "cannot reach the daemon" in connection.error


def test_close_cuts_live_connections_and_leaves_nothing(sockdir):
    fake = FakeDaemon(os.path.join(sockdir, "d.sock"), b"", hold=True)
    tap = WireTap(fake.listener.getsockname()).start()
    own_dir = os.path.dirname(tap.socket_path)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(10)
    try:
        client.connect(tap.socket_path)
        client.sendall(b"GET /_ping HTTP/1.1\r\n\r\n")
        deadline = time.monotonic() + 5
        while not tap.take(wait=0).connections and time.monotonic() < deadline:
            time.sleep(0.01)  # until the proxy has accepted it
        assert not tap.wait_idle(timeout=0.3), "the connection is open"
        tap.close()
        assert client.recv(10) == b"", "the proxy cut the client's connection"
    finally:
        tap.close()
        client.close()
        fake.close()
    assert not os.path.exists(tap.socket_path) and not os.path.exists(own_dir)
    assert not [t for t in threading.enumerate() if t.name.startswith("wiretap")]
    tap.close()  # idempotent


# -- a real pair -------------------------------------------------------------------------------------

@pytest.mark.real_peer
@pytest.mark.slow
def test_the_docker_cli_and_dockerd_20_10_through_the_tap(tmp_path):
    realpeers.require_docker()
    context = tmp_path / "ctx"
    (context / "dir").mkdir(parents=True)
    (context / "Dockerfile").write_text("FROM scratch\nCOPY . /\n")
    for name in ("one", "dir/two", "dir/three"):
        (context / name).write_text(name)
    os.link(context / "one", context / "dir/one-again")  # a second name is linked, never requested
    os.symlink("one", context / "link")
    with realpeers.PrivateDockerd() as dockerd, WireTap(dockerd.socket_path) as tap:
        env = dict(dockerd.env(), DOCKER_HOST=tap.url)
        counts = []
        for _ in range(2):
            built = dockerd.cli("build", "-o", f"type=local,dest={tmp_path / 'out'}", str(context), env=env)
            assert built.returncode == 0, built.stderr
            recording = tap.take()
            assert recording.decode_errors() == [] and len(recording.sessions) == 1
            counts.append(recording.request_counts())
            if len(counts) == 1:
                # dir/one-again is the inode's first name in walk order: it carries the data, one is the link
                assert sorted(recording.requested_paths("context")) == \
                    ["Dockerfile", "dir/one-again", "dir/three", "dir/two"]
                assert recording.requested_paths("dockerfile") == ["Dockerfile"]
    assert counts[0]["context"] == 4 and counts[0]["export"] == 4
    assert counts[1]["context"] == 0 and counts[1]["dockerfile"] == 0, "dockerd 20.10 requests nothing unchanged"
    assert os.path.samefile(tmp_path / "out" / "one", tmp_path / "out" / "dir" / "one-again")
