"""``--ssh`` forwarding against a real ssh-agent, keys from ssh-keygen, over a real h2 session connection."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import socket
import struct
import subprocess
import sys
import time

import pytest

from reference import sshagent as sa
from reference.client.sshforward import (
    SSH_CHECK_AGENT,
    SSH_FORWARD_AGENT,
    SSH_ID_METADATA_KEY,
    AgentSource,
    SSHForwardProvider,
    SSHSpecError,
    parse_ssh_spec,
    parse_ssh_specs,
)
from reference.pb import sshforward_pb2
from reference.sshagent import frame, ssh_string
from reference.transport.base import RpcError, StatusCode, connect_h2, serve_h2

pytestmark = pytest.mark.skipif(not all(os.access(t, os.X_OK) for t in
                                        ("/usr/bin/ssh-agent", "/usr/bin/ssh-add", "/usr/bin/ssh-keygen")),
                                reason="openssh-client is not installed")


def make_key(directory, name: str) -> tuple[str, bytes]:
    path = os.path.join(directory, name)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", path], check=True)
    with open(path + ".pub") as fh:
        return path, base64.b64decode(fh.read().split()[1])


@pytest.fixture
def keys(tmp_path):
    return {name: make_key(tmp_path, name) for name in ("alpha", "beta")}


@pytest.fixture
def user_agent(tmp_path, keys):
    """The user's own agent holding both keys (as SSH_AUTH_SOCK would)."""
    sock = str(tmp_path / "user-agent.sock")
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", sock], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 5
        while not os.path.exists(sock):
            assert time.monotonic() < deadline, "ssh-agent did not start"
            time.sleep(0.01)
        for path, _ in keys.values():
            subprocess.run(["ssh-add", "-q", path], env={**os.environ, "SSH_AUTH_SOCK": sock}, check=True)
        yield sock
    finally:
        agent.terminate()
        agent.wait()


@contextlib.contextmanager
def session(provider: SSHForwardProvider):
    server_sock, client_sock = socket.socketpair()
    server = serve_h2(server_sock, provider.handlers())
    client = connect_h2(client_sock)
    try:
        yield client
    finally:
        client.close()
        server.close()
        server_sock.close()
        client_sock.close()


def agent_exchange(client, agent_id: str, requests: bytes, replies: int, chunk: int = 0) -> list[tuple[int, bytes]]:
    """Send raw agent requests over one ForwardAgent call (in ``chunk``-byte messages if set), read ``replies``."""
    stream = client.open_stream(SSH_FORWARD_AGENT, [(SSH_ID_METADATA_KEY, agent_id)])
    pieces = [requests[i:i + chunk] for i in range(0, len(requests), chunk)] if chunk else [requests]
    for piece in pieces:
        stream.send(sshforward_pb2.BytesMessage(data=piece).SerializeToString())
    stream.flush()
    buffer = b""
    messages: list[tuple[int, bytes]] = []
    while len(messages) < replies:
        raw = stream.recv(timeout=10)
        assert raw is not None, f"call ended after {messages}"
        buffer += sshforward_pb2.BytesMessage.FromString(raw).data
        while len(buffer) >= 4 and len(buffer) >= 4 + struct.unpack_from(">I", buffer)[0]:
            length = struct.unpack_from(">I", buffer)[0]
            messages.append((buffer[4], buffer[5:4 + length]))
            buffer = buffer[4 + length:]
    stream.close_send()
    while stream.recv(timeout=10) is not None:  # the call ends with OK
        pass
    assert buffer == b""
    return messages


def sign_request(blob: bytes, data: bytes) -> bytes:
    return frame(sa.SSH_AGENTC_SIGN_REQUEST, ssh_string(blob) + ssh_string(data) + struct.pack(">I", 0))


def sshsig_signed_data(namespace: bytes, message: bytes) -> bytes:
    """What an SSHSIG signature covers (OpenSSH PROTOCOL.sshsig), with SHA-512."""
    return (b"SSHSIG" + ssh_string(namespace) + ssh_string(b"") + ssh_string(b"sha512")
            + ssh_string(hashlib.sha512(message).digest()))


def sshsig_armor(public_blob: bytes, namespace: bytes, signature: bytes) -> str:
    blob = (b"SSHSIG" + struct.pack(">I", 1) + ssh_string(public_blob) + ssh_string(namespace) + ssh_string(b"")
            + ssh_string(b"sha512") + ssh_string(signature))
    text = base64.b64encode(blob).decode()
    lines = [text[i:i + 70] for i in range(0, len(text), 70)]
    return "-----BEGIN SSH SIGNATURE-----\n" + "\n".join(lines) + "\n-----END SSH SIGNATURE-----\n"


def test_lists_only_the_allowed_key_and_signs_verifiably(tmp_path, keys, user_agent):
    _, alpha = keys["alpha"]
    _, beta = keys["beta"]
    namespace, message = b"file", b"forwarded into a build\n"
    with SSHForwardProvider({"default": AgentSource(socket=user_agent, allowed_keys=frozenset([alpha]))}) as p, \
            session(p) as client:
        requests = (frame(sa.SSH_AGENTC_REQUEST_IDENTITIES) + sign_request(beta, b"nope")
                    + sign_request(alpha, sshsig_signed_data(namespace, message)))
        (t1, listing), (t2, _), (t3, signed) = agent_exchange(client, "", requests, 3, chunk=7)
    assert t1 == sa.SSH_AGENT_IDENTITIES_ANSWER
    assert sa.parse_identities(listing) == [(alpha, b"alpha")]
    assert t2 == sa.SSH_AGENT_FAILURE  # beta is in the agent but not allowed
    assert t3 == sa.SSH_AGENT_SIGN_RESPONSE
    signature, _ = sa.read_string(signed, 0)
    sig_file = tmp_path / "message.sig"
    sig_file.write_text(sshsig_armor(alpha, namespace, signature))
    check = subprocess.run(["ssh-keygen", "-Y", "check-novalidate", "-n", namespace.decode(), "-s", str(sig_file)],
                           input=message, capture_output=True, check=False)
    assert check.returncode == 0, check.stderr
    tampered = subprocess.run(["ssh-keygen", "-Y", "check-novalidate", "-n", namespace.decode(), "-s",
                               str(sig_file)], input=message + b"!", capture_output=True, check=False)
    assert tampered.returncode != 0
    assert p.forwarded == [("default", [sa.SSH_AGENTC_SIGN_REQUEST])]


def test_key_management_is_refused_and_the_agent_unchanged(keys, user_agent):
    _, alpha = keys["alpha"]
    with SSHForwardProvider({"default": AgentSource(socket=user_agent)}) as p, session(p) as client:
        requests = (frame(19) + frame(18, ssh_string(alpha)) + frame(22, ssh_string(b"pw"))
                    + frame(27, ssh_string(b"session-bind@openssh.com")) + frame(sa.SSH_AGENTC_REQUEST_IDENTITIES))
        replies = agent_exchange(client, "default", requests, 5)
    assert [t for t, _ in replies[:4]] == [sa.SSH_AGENT_FAILURE] * 4
    assert replies[4][0] == sa.SSH_AGENT_IDENTITIES_ANSWER
    assert sorted(c for _, c in sa.parse_identities(replies[4][1])) == [b"alpha", b"beta"]  # all keys mode
    listed = subprocess.run(["ssh-add", "-l"], env={**os.environ, "SSH_AUTH_SOCK": user_agent}, capture_output=True,
                            check=True)
    assert listed.stdout.count(b"ED25519") == 2


def test_key_files_use_a_private_agent_removed_at_close(keys):
    beta_path, beta = keys["beta"]
    os.chmod(beta_path, 0o644)  # read from stdin: ssh-add's permission check does not apply
    provider = SSHForwardProvider({"deploy": AgentSource(key_files=(beta_path,))})
    (agent,) = provider._agents
    try:
        with session(provider) as client:
            (kind, listing), = agent_exchange(client, "deploy", frame(sa.SSH_AGENTC_REQUEST_IDENTITIES), 1)
            (signed_kind, _), = agent_exchange(client, "deploy", sign_request(beta, b"data"), 1)
    finally:
        provider.close()
    assert kind == sa.SSH_AGENT_IDENTITIES_ANSWER and [b for b, _ in sa.parse_identities(listing)] == [beta]
    assert signed_kind == sa.SSH_AGENT_SIGN_RESPONSE
    assert agent.process.poll() is not None and not os.path.exists(agent.dir)


def test_check_agent(user_agent):
    with SSHForwardProvider({"default": AgentSource(socket=user_agent)}) as p, session(p) as client:
        ok = client.unary(SSH_CHECK_AGENT, sshforward_pb2.CheckAgentRequest(ID="").SerializeToString(), timeout=10)
        assert sshforward_pb2.CheckAgentResponse.FromString(ok) == sshforward_pb2.CheckAgentResponse()
        with pytest.raises(RpcError) as raised:
            client.unary(SSH_CHECK_AGENT, sshforward_pb2.CheckAgentRequest(ID="other").SerializeToString(), timeout=10)
        assert raised.value.code == StatusCode.UNKNOWN and raised.value.details == "unset ssh forward key other"
        stream = client.open_stream(SSH_FORWARD_AGENT, [(SSH_ID_METADATA_KEY, "other")])
        stream.close_send()
        with pytest.raises(RpcError, match="unset ssh forward key other"):
            stream.recv(timeout=10)


def test_malformed_frame_ends_the_call(user_agent):
    with SSHForwardProvider({"default": AgentSource(socket=user_agent)}) as p, session(p) as client:
        stream = client.open_stream(SSH_FORWARD_AGENT, [(SSH_ID_METADATA_KEY, "default")])
        stream.send(sshforward_pb2.BytesMessage(data=struct.pack(">I", 1 << 20)).SerializeToString())
        stream.flush()
        with pytest.raises(RpcError) as raised:
            stream.recv(timeout=10)
        assert raised.value.code == StatusCode.INVALID_ARGUMENT


def test_encrypted_key_file_is_refused(tmp_path):
    path = str(tmp_path / "locked")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret", "-f", path], check=True)
    with pytest.raises(SSHSpecError, match="failed to parse"):
        SSHForwardProvider({"x": AgentSource(key_files=(path,))})


def test_parse_ssh_spec(tmp_path, keys, user_agent):
    alpha_path, _ = keys["alpha"]
    beta_path, _ = keys["beta"]
    env = {"SSH_AUTH_SOCK": user_agent}
    assert parse_ssh_spec("default", env) == ("default", AgentSource(socket=user_agent))
    assert parse_ssh_spec("", env) == ("default", AgentSource(socket=user_agent))
    assert parse_ssh_spec("gh=", env) == ("gh", AgentSource(socket=user_agent))
    assert parse_ssh_spec(f"gh={user_agent}", {}) == ("gh", AgentSource(socket=user_agent))
    assert parse_ssh_spec(f"={alpha_path}", {}) == ("default", AgentSource(key_files=(alpha_path,)))
    assert parse_ssh_spec(f"k={alpha_path},{beta_path}", {}) == ("k", AgentSource(key_files=(alpha_path, beta_path)))
    with pytest.raises(SSHSpecError, match="SSH_AUTH_SOCK"):
        parse_ssh_spec("default", {})
    with pytest.raises(SSHSpecError, match="invalid combination"):
        parse_ssh_spec(f"k={alpha_path},{user_agent}", {})
    with pytest.raises(SSHSpecError, match="only single socket"):
        parse_ssh_spec(f"k={user_agent},{user_agent}", {})
    with pytest.raises(SSHSpecError, match="missing"):
        parse_ssh_spec(f"k={tmp_path}/missing", {})
    with pytest.raises(SSHSpecError, match="duplicate agent ID"):
        parse_ssh_specs(["default", f"default={alpha_path}"], env)
    assert list(parse_ssh_specs(["a", "", f"b={alpha_path}"], env)) == ["a", "b"]


def test_a_missing_key_fails_before_the_daemon_is_dialled(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "reference.client", "build", "--ssh", f"k={tmp_path}/nope",
                           str(tmp_path)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-daemon.sock"})
    assert proc.returncode != 0 and "nope" in proc.stderr and "no-daemon" not in proc.stderr, proc.stderr
