"""Golden wire tests for the protobuf messages in reference.pb.

The expected bytes are built with a tiny protobuf encoder defined here (independent of the
protobuf runtime) or written out by hand, from the field tables of the upstream .proto files
(fsutil@0834f99 types/{stat,wire}.proto, buildkit@eeb7b65 session/* and control.proto).
"""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FieldDescriptor as FD
from google.protobuf.timestamp_pb2 import Timestamp

from reference.pb import auth_pb2, control_pb2, filesync_pb2, fsutil_types_pb2, secrets_pb2

Stat = fsutil_types_pb2.Stat
Packet = fsutil_types_pb2.Packet

REPO_ROOT = Path(__file__).resolve().parent.parent
GENERATED_MODULES = ("fsutil_types", "filesync", "auth", "secrets", "control", "sshforward")

# Go os.FileMode bits, which Stat.mode carries instead of Unix st_mode bits.
GO_MODE_DIR = 0x80000000
GO_MODE_SETUID = 0x00800000


# --- a minimal protobuf encoder, so expected bytes do not come from the library under test ---

def varint(value: int) -> bytes:
    if value < 0:  # int64 negatives are sent as their 64-bit two's complement
        value += 1 << 64
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def vint(field: int, value: int) -> bytes:
    return varint(field << 3 | 0) + varint(value)


def ldelim(field: int, payload: bytes | str) -> bytes:
    if isinstance(payload, str):
        payload = payload.encode()
    return varint(field << 3 | 2) + varint(len(payload)) + payload


def timestamp(field: int, seconds: int, nanos: int) -> bytes:
    # proto3 leaves zero-valued scalars off the wire
    return ldelim(field, (vint(1, seconds) if seconds else b"") + (vint(2, nanos) if nanos else b""))


# --- names and field tables ---

FULL_NAMES = [
    (Stat, "fsutil.types.Stat"),
    (Packet, "fsutil.types.Packet"),
    (filesync_pb2.BytesMessage, "moby.filesync.v1.BytesMessage"),
    (auth_pb2.CredentialsRequest, "moby.filesync.v1.CredentialsRequest"),
    (auth_pb2.CredentialsResponse, "moby.filesync.v1.CredentialsResponse"),
    (auth_pb2.FetchTokenRequest, "moby.filesync.v1.FetchTokenRequest"),
    (auth_pb2.FetchTokenResponse, "moby.filesync.v1.FetchTokenResponse"),
    (auth_pb2.GetTokenAuthorityRequest, "moby.filesync.v1.GetTokenAuthorityRequest"),
    (auth_pb2.GetTokenAuthorityResponse, "moby.filesync.v1.GetTokenAuthorityResponse"),
    (auth_pb2.VerifyTokenAuthorityRequest, "moby.filesync.v1.VerifyTokenAuthorityRequest"),
    (auth_pb2.VerifyTokenAuthorityResponse, "moby.filesync.v1.VerifyTokenAuthorityResponse"),
    (secrets_pb2.GetSecretRequest, "moby.buildkit.secrets.v1.GetSecretRequest"),
    (secrets_pb2.GetSecretResponse, "moby.buildkit.secrets.v1.GetSecretResponse"),
    (control_pb2.StatusResponse, "moby.buildkit.v1.StatusResponse"),
    (control_pb2.Vertex, "moby.buildkit.v1.Vertex"),
    (control_pb2.VertexStatus, "moby.buildkit.v1.VertexStatus"),
    (control_pb2.VertexLog, "moby.buildkit.v1.VertexLog"),
]

TS = "google.protobuf.Timestamp"
REPEATED = "repeated"

# message -> [(field name, number, type, repeated?, message type name or None)]
FIELD_TABLES = {
    Stat: [
        ("path", 1, FD.TYPE_STRING), ("mode", 2, FD.TYPE_UINT32), ("uid", 3, FD.TYPE_UINT32),
        ("gid", 4, FD.TYPE_UINT32), ("size", 5, FD.TYPE_INT64), ("modTime", 6, FD.TYPE_INT64),
        ("linkname", 7, FD.TYPE_STRING), ("devmajor", 8, FD.TYPE_INT64),
        ("devminor", 9, FD.TYPE_INT64),
        # xattrs (10) is a map and checked on its own below
    ],
    Packet: [
        ("type", 1, FD.TYPE_ENUM), ("stat", 2, FD.TYPE_MESSAGE, "fsutil.types.Stat"),
        ("ID", 3, FD.TYPE_UINT32), ("data", 4, FD.TYPE_BYTES),
    ],
    filesync_pb2.BytesMessage: [("data", 1, FD.TYPE_BYTES)],
    auth_pb2.CredentialsRequest: [("Host", 1, FD.TYPE_STRING)],
    auth_pb2.CredentialsResponse: [("Username", 1, FD.TYPE_STRING), ("Secret", 2, FD.TYPE_STRING)],
    auth_pb2.FetchTokenRequest: [
        ("ClientID", 1, FD.TYPE_STRING), ("Host", 2, FD.TYPE_STRING), ("Realm", 3, FD.TYPE_STRING),
        ("Service", 4, FD.TYPE_STRING), ("Scopes", 5, FD.TYPE_STRING, REPEATED),
    ],
    auth_pb2.FetchTokenResponse: [
        ("Token", 1, FD.TYPE_STRING), ("ExpiresIn", 2, FD.TYPE_INT64), ("IssuedAt", 3, FD.TYPE_INT64),
    ],
    auth_pb2.GetTokenAuthorityRequest: [("Host", 1, FD.TYPE_STRING), ("Salt", 2, FD.TYPE_BYTES)],
    auth_pb2.GetTokenAuthorityResponse: [("PublicKey", 1, FD.TYPE_BYTES)],
    auth_pb2.VerifyTokenAuthorityRequest: [
        ("Host", 1, FD.TYPE_STRING), ("Payload", 2, FD.TYPE_BYTES), ("Salt", 3, FD.TYPE_BYTES),
    ],
    auth_pb2.VerifyTokenAuthorityResponse: [("Signed", 1, FD.TYPE_BYTES)],
    secrets_pb2.GetSecretRequest: [("ID", 1, FD.TYPE_STRING)],  # annotations (2) is a map
    secrets_pb2.GetSecretResponse: [("data", 1, FD.TYPE_BYTES)],
    control_pb2.StatusResponse: [
        ("vertexes", 1, FD.TYPE_MESSAGE, REPEATED, "moby.buildkit.v1.Vertex"),
        ("statuses", 2, FD.TYPE_MESSAGE, REPEATED, "moby.buildkit.v1.VertexStatus"),
        ("logs", 3, FD.TYPE_MESSAGE, REPEATED, "moby.buildkit.v1.VertexLog"),
    ],
    control_pb2.Vertex: [
        ("digest", 1, FD.TYPE_STRING), ("inputs", 2, FD.TYPE_STRING, REPEATED),
        ("name", 3, FD.TYPE_STRING), ("cached", 4, FD.TYPE_BOOL),
        ("started", 5, FD.TYPE_MESSAGE, TS), ("completed", 6, FD.TYPE_MESSAGE, TS),
        ("error", 7, FD.TYPE_STRING),
    ],
    control_pb2.VertexStatus: [
        ("ID", 1, FD.TYPE_STRING), ("vertex", 2, FD.TYPE_STRING), ("name", 3, FD.TYPE_STRING),
        ("current", 4, FD.TYPE_INT64), ("total", 5, FD.TYPE_INT64),
        ("timestamp", 6, FD.TYPE_MESSAGE, TS), ("started", 7, FD.TYPE_MESSAGE, TS),
        ("completed", 8, FD.TYPE_MESSAGE, TS),
    ],
    control_pb2.VertexLog: [
        ("vertex", 1, FD.TYPE_STRING), ("timestamp", 2, FD.TYPE_MESSAGE, TS),
        ("stream", 3, FD.TYPE_INT64), ("msg", 4, FD.TYPE_BYTES),
    ],
}

MAP_FIELDS = [
    # message, field, number, key type, value type
    (Stat, "xattrs", 10, FD.TYPE_STRING, FD.TYPE_BYTES),
    (secrets_pb2.GetSecretRequest, "annotations", 2, FD.TYPE_STRING, FD.TYPE_STRING),
]

# Method paths exactly as a session client advertises them in X-Docker-Expose-Session-Grpc-Method.
SERVICE_METHODS = [
    # module, path, request, response, client streaming, server streaming
    (filesync_pb2, "/moby.filesync.v1.FileSync/DiffCopy", "moby.filesync.v1.BytesMessage",
     "moby.filesync.v1.BytesMessage", True, True),
    (filesync_pb2, "/moby.filesync.v1.FileSync/TarStream", "moby.filesync.v1.BytesMessage",
     "moby.filesync.v1.BytesMessage", True, True),
    (filesync_pb2, "/moby.filesync.v1.FileSend/DiffCopy", "moby.filesync.v1.BytesMessage",
     "moby.filesync.v1.BytesMessage", True, True),
    (auth_pb2, "/moby.filesync.v1.Auth/Credentials", "moby.filesync.v1.CredentialsRequest",
     "moby.filesync.v1.CredentialsResponse", False, False),
    (auth_pb2, "/moby.filesync.v1.Auth/FetchToken", "moby.filesync.v1.FetchTokenRequest",
     "moby.filesync.v1.FetchTokenResponse", False, False),
    (auth_pb2, "/moby.filesync.v1.Auth/GetTokenAuthority", "moby.filesync.v1.GetTokenAuthorityRequest",
     "moby.filesync.v1.GetTokenAuthorityResponse", False, False),
    (auth_pb2, "/moby.filesync.v1.Auth/VerifyTokenAuthority",
     "moby.filesync.v1.VerifyTokenAuthorityRequest", "moby.filesync.v1.VerifyTokenAuthorityResponse",
     False, False),
    (secrets_pb2, "/moby.buildkit.secrets.v1.Secrets/GetSecret",
     "moby.buildkit.secrets.v1.GetSecretRequest", "moby.buildkit.secrets.v1.GetSecretResponse",
     False, False),
]


@pytest.mark.parametrize("message, full_name", FULL_NAMES, ids=[n for _, n in FULL_NAMES])
def test_full_message_names(message, full_name):
    assert message.DESCRIPTOR.full_name == full_name


@pytest.mark.parametrize("message", list(FIELD_TABLES), ids=lambda m: m.DESCRIPTOR.name)
def test_field_table_matches_upstream(message):
    expected = FIELD_TABLES[message]
    map_names = {f for m, f, *_ in MAP_FIELDS if m is message}
    fields = message.DESCRIPTOR.fields_by_name
    assert set(fields) - map_names == {row[0] for row in expected}
    for name, number, wire_type, *extra in expected:
        field = fields[name]
        assert (field.number, field.type) == (number, wire_type), name
        repeated = REPEATED in extra
        assert field.is_repeated == repeated, name
        type_names = [e for e in extra if e != REPEATED]
        if field.type == FD.TYPE_MESSAGE:
            assert [field.message_type.full_name] == type_names, name


def test_stat_field_numbers_table():
    numbers = {f.name: f.number for f in Stat.DESCRIPTOR.fields}
    assert numbers == {
        "path": 1, "mode": 2, "uid": 3, "gid": 4, "size": 5, "modTime": 6,
        "linkname": 7, "devmajor": 8, "devminor": 9, "xattrs": 10,
    }


@pytest.mark.parametrize("message, name, number, key_type, value_type", MAP_FIELDS,
                         ids=[f"{m.DESCRIPTOR.name}.{f}" for m, f, *_ in MAP_FIELDS])
def test_map_fields(message, name, number, key_type, value_type):
    field = message.DESCRIPTOR.fields_by_name[name]
    entry = field.message_type
    assert field.number == number
    assert entry.GetOptions().map_entry
    assert entry.fields_by_name["key"].type == key_type
    assert entry.fields_by_name["value"].type == value_type


def test_packet_type_enum_values():
    enum = Packet.DESCRIPTOR.enum_types_by_name["PacketType"]
    assert enum.full_name == "fsutil.types.Packet.PacketType"
    assert {v.name: v.number for v in enum.values} == {
        "PACKET_STAT": 0, "PACKET_REQ": 1, "PACKET_DATA": 2, "PACKET_FIN": 3, "PACKET_ERR": 4,
    }


@pytest.mark.parametrize("module, path, request_type, response_type, client_stream, server_stream",
                         SERVICE_METHODS, ids=[row[1] for row in SERVICE_METHODS])
def test_service_methods(module, path, request_type, response_type, client_stream, server_stream):
    _, service_name, method_name = path.split("/")
    package, _, short_service = service_name.rpartition(".")
    assert module.DESCRIPTOR.package == package
    method = module.DESCRIPTOR.services_by_name[short_service].methods_by_name[method_name]
    assert f"/{method.containing_service.full_name}/{method.name}" == path
    assert method.input_type.full_name == request_type
    assert method.output_type.full_name == response_type
    assert (method.client_streaming, method.server_streaming) == (client_stream, server_stream)


def test_services_have_no_extra_methods():
    advertised = {row[1] for row in SERVICE_METHODS}
    declared = {
        f"/{service.full_name}/{method.name}"
        for module in (filesync_pb2, auth_pb2, secrets_pb2, control_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert declared == advertised


# --- Packet wire vectors (fsutil diffcopy frames) ---

PACKET_VECTORS = [
    # name, packet, expected bytes
    ("stat-file", Packet(stat=Stat(path="foo", mode=0o644)),
     bytes.fromhex("1208" "0a03666f6f" "10a403")),
    ("stat-dir", Packet(stat=Stat(path="zzz", mode=GO_MODE_DIR | 0o755)),
     bytes.fromhex("120b" "0a037a7a7a" "10ed83808008")),
    ("end-of-listing", Packet(), b""),
    ("stat-present-but-empty", Packet(stat=Stat()), b"\x12\x00"),
    ("req-id-0", Packet(type=Packet.PACKET_REQ, ID=0), b"\x08\x01"),
    ("req-id-5", Packet(type=Packet.PACKET_REQ, ID=5), b"\x08\x01\x18\x05"),
    ("req-id-300", Packet(type=Packet.PACKET_REQ, ID=300), b"\x08\x01\x18\xac\x02"),
    ("data-chunk", Packet(type=Packet.PACKET_DATA, ID=3, data=b"hi"), b"\x08\x02\x18\x03\x22\x02hi"),
    ("data-eof-marker", Packet(type=Packet.PACKET_DATA, ID=3), b"\x08\x02\x18\x03"),
    ("data-eof-id-0", Packet(type=Packet.PACKET_DATA), b"\x08\x02"),
    ("fin", Packet(type=Packet.PACKET_FIN), b"\x08\x03"),
    ("err", Packet(type=Packet.PACKET_ERR, data=b"boom"), b"\x08\x04\x22\x04boom"),
]


@pytest.mark.parametrize("name, packet, expected", PACKET_VECTORS, ids=[v[0] for v in PACKET_VECTORS])
def test_packet_encoding(name, packet, expected):
    assert packet.SerializeToString() == expected
    decoded = Packet.FromString(expected)
    assert decoded == packet
    assert decoded.HasField("stat") == packet.HasField("stat")


def test_stat_packet_omits_type_and_uses_field_2():
    wire = Packet(type=Packet.PACKET_STAT, stat=Stat(path="a")).SerializeToString()
    assert wire == ldelim(2, ldelim(1, "a"))  # no field-1 (`type`) tag at all


def test_end_of_listing_has_no_stat():
    decoded = Packet.FromString(b"")
    assert not decoded.HasField("stat")
    assert decoded.type == Packet.PACKET_STAT
    assert decoded.ID == 0


def test_present_but_empty_stat_is_distinguishable():
    decoded = Packet.FromString(b"\x12\x00")
    assert decoded.HasField("stat")
    assert decoded.stat.path == ""


def test_negative_int64_uses_ten_byte_varint():
    # A pre-1970 mtime is a negative int64; Go encodes it as a 10-byte varint.
    wire = Stat(modTime=-1).SerializeToString()
    assert wire == b"\x30" + b"\xff" * 9 + b"\x01"
    assert Stat.FromString(wire).modTime == -1


def test_full_stat_matches_hand_encoding_and_round_trips():
    stat = Stat(
        path="dir/file.txt", mode=GO_MODE_SETUID | 0o755, uid=1000, gid=1001,
        size=1 << 40, modTime=1_700_000_000_123_456_789, linkname="dir/first",
        devmajor=8, devminor=1, xattrs={"user.note": b"\x00\xffbin"},
    )
    expected = (
        ldelim(1, "dir/file.txt") + vint(2, GO_MODE_SETUID | 0o755) + vint(3, 1000) + vint(4, 1001)
        + vint(5, 1 << 40) + vint(6, 1_700_000_000_123_456_789) + ldelim(7, "dir/first")
        + vint(8, 8) + vint(9, 1)
        + ldelim(10, ldelim(1, "user.note") + ldelim(2, b"\x00\xffbin"))
    )
    assert stat.SerializeToString() == expected
    assert Stat.FromString(expected) == stat

    packet = Packet(stat=stat)
    assert packet.SerializeToString() == ldelim(2, expected)
    assert Packet.FromString(packet.SerializeToString()) == packet


def test_stat_with_several_xattrs_round_trips():
    xattrs = {"user.a": b"1", "security.capability": b"\x01\x00\x00\x02", "user.empty": b""}
    stat = Stat(path="f", xattrs=xattrs)
    decoded = Stat.FromString(stat.SerializeToString())
    assert dict(decoded.xattrs) == xattrs


def test_unknown_fields_from_newer_peers_are_tolerated():
    # A later fsutil could add fields; an old-schema reader must keep going.
    wire = ldelim(2, ldelim(1, "a") + vint(99, 7)) + vint(3, 4)
    decoded = Packet.FromString(wire)
    assert decoded.stat.path == "a" and decoded.ID == 4


# --- session service messages ---

SESSION_VECTORS = [
    ("bytes-message", filesync_pb2.BytesMessage(data=b"ustar"), ldelim(1, b"ustar")),
    ("bytes-message-empty", filesync_pb2.BytesMessage(), b""),
    ("credentials-request", auth_pb2.CredentialsRequest(Host="registry-1.docker.io"),
     ldelim(1, "registry-1.docker.io")),
    ("credentials-response", auth_pb2.CredentialsResponse(Username="u", Secret="p"),
     ldelim(1, "u") + ldelim(2, "p")),
    ("fetch-token-request",
     auth_pb2.FetchTokenRequest(ClientID="buildkit-client", Host="h", Realm="https://auth/token",
                                Service="svc", Scopes=["repository:a:pull", "repository:b:pull,push"]),
     ldelim(1, "buildkit-client") + ldelim(2, "h") + ldelim(3, "https://auth/token") + ldelim(4, "svc")
     + ldelim(5, "repository:a:pull") + ldelim(5, "repository:b:pull,push")),
    ("fetch-token-response", auth_pb2.FetchTokenResponse(Token="t", ExpiresIn=300, IssuedAt=1_600_000_000),
     ldelim(1, "t") + vint(2, 300) + vint(3, 1_600_000_000)),
    ("get-token-authority-request", auth_pb2.GetTokenAuthorityRequest(Host="h", Salt=b"\x01\x02"),
     ldelim(1, "h") + ldelim(2, b"\x01\x02")),
    ("get-token-authority-response", auth_pb2.GetTokenAuthorityResponse(PublicKey=b"k" * 32),
     ldelim(1, b"k" * 32)),
    ("verify-token-authority-request",
     auth_pb2.VerifyTokenAuthorityRequest(Host="h", Payload=b"p", Salt=b"s"),
     ldelim(1, "h") + ldelim(2, b"p") + ldelim(3, b"s")),
    ("verify-token-authority-response", auth_pb2.VerifyTokenAuthorityResponse(Signed=b"sig"),
     ldelim(1, b"sig")),
    ("get-secret-request", secrets_pb2.GetSecretRequest(ID="mysecret", annotations={"k": "v"}),
     ldelim(1, "mysecret") + ldelim(2, ldelim(1, "k") + ldelim(2, "v"))),
    ("get-secret-response", secrets_pb2.GetSecretResponse(data=b"s3cr3t\n"), ldelim(1, b"s3cr3t\n")),
]


@pytest.mark.parametrize("name, message, expected", SESSION_VECTORS, ids=[v[0] for v in SESSION_VECTORS])
def test_session_message_encoding(name, message, expected):
    assert message.SerializeToString() == expected
    assert type(message).FromString(expected) == message


def test_first_byte_tells_tar_bytes_message_from_stat_packet():
    # FileSend/DiffCopy carries either BytesMessage (tar mode) or Packet (local mode).
    assert filesync_pb2.BytesMessage(data=b"x").SerializeToString()[0] == 0x0A
    assert Packet(stat=Stat(path="x")).SerializeToString()[0] == 0x12


# --- build progress (moby.buildkit.trace) ---

DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64


def status_response_wire() -> bytes:
    """A StatusResponse laid out as dockerd 20.10 marshals it (fields in number order)."""
    vertex_a = (ldelim(1, DIGEST_A) + ldelim(3, "[internal] load build definition from Dockerfile")
                + timestamp(5, 1_700_000_000, 5) + timestamp(6, 1_700_000_001, 0))
    vertex_b = (ldelim(1, DIGEST_B) + ldelim(2, DIGEST_A) + ldelim(3, "[2/2] COPY . /")
                + vint(4, 1) + ldelim(7, "failed to compute cache key"))
    status = (ldelim(1, "transferring context:") + ldelim(2, DIGEST_A) + ldelim(3, "transferring")
              + vint(4, 2048) + vint(5, 4096) + timestamp(6, 1_700_000_000, 999_999_999)
              + timestamp(7, 1_700_000_000, 0))
    log = ldelim(1, DIGEST_B) + timestamp(2, 1_700_000_002, 42) + vint(3, 2) + ldelim(4, b"oops\n")
    return ldelim(1, vertex_a) + ldelim(1, vertex_b) + ldelim(2, status) + ldelim(3, log)


def test_decode_status_response():
    response = control_pb2.StatusResponse.FromString(status_response_wire())

    assert [v.digest for v in response.vertexes] == [DIGEST_A, DIGEST_B]
    first, second = response.vertexes
    assert first.name == "[internal] load build definition from Dockerfile"
    assert not first.cached and list(first.inputs) == []
    assert first.started == Timestamp(seconds=1_700_000_000, nanos=5)
    assert first.completed == Timestamp(seconds=1_700_000_001)
    assert second.cached and list(second.inputs) == [DIGEST_A]
    assert not second.HasField("started")
    assert second.error == "failed to compute cache key"

    (status,) = response.statuses
    assert (status.ID, status.vertex, status.name) == ("transferring context:", DIGEST_A, "transferring")
    assert (status.current, status.total) == (2048, 4096)
    assert status.timestamp == Timestamp(seconds=1_700_000_000, nanos=999_999_999)
    assert status.HasField("started") and not status.HasField("completed")

    (log,) = response.logs
    assert (log.vertex, log.stream, log.msg) == (DIGEST_B, 2, b"oops\n")
    assert log.timestamp.ToNanoseconds() == 1_700_000_002 * 10**9 + 42

    assert response.SerializeToString() == status_response_wire()


def test_decode_trace_aux_payload():
    # The /build JSON stream carries {"id":"moby.buildkit.trace","aux":"<base64 of StatusResponse>"}.
    aux = base64.b64encode(status_response_wire()).decode()
    response = control_pb2.StatusResponse.FromString(base64.b64decode(aux))
    assert len(response.vertexes) == 2


def test_status_response_skips_fields_of_newer_buildkit():
    # Later BuildKit releases append fields (e.g. warnings as field 4); an eeb7b65 reader skips them.
    wire = ldelim(1, ldelim(1, DIGEST_A)) + ldelim(4, ldelim(1, DIGEST_A) + vint(2, 1))
    response = control_pb2.StatusResponse.FromString(wire)
    assert [v.digest for v in response.vertexes] == [DIGEST_A]


# --- generated code hygiene ---

def test_generated_modules_import_without_warnings_or_grpc():
    imports = "; ".join(f"import reference.pb.{m}_pb2" for m in GENERATED_MODULES)
    code = f"import sys; {imports}; assert 'grpc' not in sys.modules, 'grpc was imported'"
    result = subprocess.run([sys.executable, "-W", "error", "-c", code], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_health_messages_import_without_grpc():
    # The session server only needs the Health messages; importing them must not drag in grpc.
    code = ("import sys; import grpc_health.v1.health_pb2 as h; "
            "assert 'grpc' not in sys.modules; "
            "assert h.HealthCheckResponse(status=h.HealthCheckResponse.SERVING).SerializeToString() == b'\\x08\\x01'")
    result = subprocess.run([sys.executable, "-W", "error", "-c", code], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def _without_json_names(file_proto: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    def strip(messages):
        for message in messages:
            for field in message.field:
                field.ClearField("json_name")
            strip(message.nested_type)
    strip(file_proto.message_type)
    return file_proto


def test_generated_descriptors_match_proto_sources(tmp_path):
    # Cheap in-suite guard; .ci/check-proto does the byte-exact check with the pinned generator.
    pytest.importorskip("grpc_tools")
    proto_files = sorted(p.name for p in (REPO_ROOT / "proto").glob("*.proto"))
    assert proto_files == sorted(f"{m}.proto" for m in GENERATED_MODULES)
    descriptor_set = tmp_path / "set.pb"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-Iproto", f"--descriptor_set_out={descriptor_set}",
         *(f"proto/{name}" for name in proto_files)],
        cwd=REPO_ROOT, check=True, capture_output=True, timeout=60,
    )
    compiled = {f.name: _without_json_names(f)
                for f in descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes()).file}
    modules = {"fsutil_types": fsutil_types_pb2, "filesync": filesync_pb2, "auth": auth_pb2,
               "secrets": secrets_pb2, "control": control_pb2}
    for name, module in modules.items():
        embedded = descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)
        assert _without_json_names(embedded) == compiled[f"{name}.proto"], name
