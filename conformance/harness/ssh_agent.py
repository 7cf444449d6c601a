"""The suite's side of SSH forwarding: real keys and agents (Debian's openssh-client), and the ssh-agent protocol
spoken through a session's ``ForwardAgent`` call, as a process in a ``RUN --mount=type=ssh`` step would.

Keys are Ed25519 so that a signature is checked here with ``cryptography`` alone. Every exchange is written to a
transcript (``<`` what the suite sent, ``>`` what came back) for the failure report.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from reference.client.sshforward import SSH_ID_METADATA_KEY, PrivateAgent
from reference.pb import sshforward_pb2
from reference.sshagent import AgentProtocolError, frame, parse_identities, read_string, ssh_string
from reference.transport.base import RpcError

SSH_KEYGEN = "/usr/bin/ssh-keygen"
CHECK_AGENT = "/moby.sshforward.v1.SSH/CheckAgent"
FORWARD_AGENT = "/moby.sshforward.v1.SSH/ForwardAgent"

FAILURE, SUCCESS = 5, 6
REQUEST_IDENTITIES, IDENTITIES_ANSWER, SIGN_REQUEST, SIGN_RESPONSE = 11, 12, 13, 14
MESSAGE_NAMES = {
    5: "FAILURE", 6: "SUCCESS", 11: "REQUEST_IDENTITIES", 12: "IDENTITIES_ANSWER", 13: "SIGN_REQUEST",
    14: "SIGN_RESPONSE", 17: "ADD_IDENTITY", 18: "REMOVE_IDENTITY", 19: "REMOVE_ALL_IDENTITIES",
    20: "ADD_SMARTCARD_KEY", 21: "REMOVE_SMARTCARD_KEY", 22: "LOCK", 23: "UNLOCK", 25: "ADD_ID_CONSTRAINED",
    27: "EXTENSION", 28: "EXTENSION_FAILURE",
}
MAX_REPLY = 256 * 1024  # as OpenSSH's AGENT_MAX_LEN


def have_openssh() -> str | None:
    """Why SSH cases cannot run here (None: they can)."""
    for tool in (SSH_KEYGEN, "/usr/bin/ssh-agent", "/usr/bin/ssh-add"):
        if not os.access(tool, os.X_OK):
            return f"{tool} is missing (Debian: openssh-client, installed by .ci/install-system-deps)"
    return None


@dataclass(frozen=True)
class Key:
    path: str  # the private key file (OpenSSH format, no passphrase)
    blob: bytes  # the public key blob as the agent protocol carries it
    comment: str

    def verifies(self, data: bytes, signature_blob: bytes) -> bool:
        """Whether ``signature_blob`` (string "ssh-ed25519", string sig) signs ``data`` with this key."""
        try:
            kind, offset = read_string(signature_blob, 0)
            signature, end = read_string(signature_blob, offset)
            key_kind, offset = read_string(self.blob, 0)
            public, _ = read_string(self.blob, offset)
        except AgentProtocolError:
            return False
        if kind != b"ssh-ed25519" or key_kind != b"ssh-ed25519" or end != len(signature_blob):
            return False
        try:
            Ed25519PublicKey.from_public_bytes(public).verify(signature, data)
            return True
        except Exception:
            return False


def make_key(directory: str, name: str) -> Key:
    """A new Ed25519 key pair made by ssh-keygen in ``directory``."""
    path = os.path.join(directory, name)
    subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", path], check=True,
                   capture_output=True, timeout=30)
    import base64

    with open(path + ".pub") as fh:
        return Key(path, base64.b64decode(fh.read().split()[1]), name)


class RealAgent:
    """A real ``ssh-agent`` holding ``keys``, in a private directory removed by ``close()``."""

    def __init__(self, keys: list[Key]) -> None:
        self._agent = PrivateAgent(tuple(key.path for key in keys))
        self.socket = self._agent.socket

    def identities(self) -> list[bytes]:
        """The key blobs the agent itself holds now (asked directly, not through any build)."""
        kind, body = self._ask(frame(REQUEST_IDENTITIES))
        if kind != IDENTITIES_ANSWER:
            raise AgentProtocolError(f"the agent answered {MESSAGE_NAMES.get(kind, kind)} to an identities request")
        return [blob for blob, _ in parse_identities(body)]

    def _ask(self, message: bytes) -> tuple[int, bytes]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(5)
            conn.connect(self.socket)
            conn.sendall(message)
            return _read_message(lambda: conn.recv(65536))

    def lock(self, passphrase: str) -> bool:
        return self._ask(frame(22, ssh_string(passphrase.encode())))[0] == SUCCESS

    def unlock(self, passphrase: str) -> bool:
        return self._ask(frame(23, ssh_string(passphrase.encode())))[0] == SUCCESS

    def close(self) -> None:
        self._agent.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _read_message(read) -> tuple[int, bytes]:
    buffer = b""
    while len(buffer) < 4 or len(buffer) < 4 + struct.unpack(">I", buffer[:4])[0]:
        if len(buffer) >= 4 and struct.unpack(">I", buffer[:4])[0] > MAX_REPLY:
            raise AgentProtocolError("reply longer than an agent may send")
        chunk = read()
        if not chunk:
            raise AgentProtocolError(f"the connection ended after {len(buffer)} bytes of a reply")
        buffer += chunk
    length = struct.unpack(">I", buffer[:4])[0]
    if length == 0:
        raise AgentProtocolError("empty reply")
    return buffer[4], buffer[5:4 + length]


# -- the requests a step could send ---------------------------------------------------------------

def sign_request(key_blob: bytes, data: bytes) -> bytes:
    return frame(SIGN_REQUEST, ssh_string(key_blob) + ssh_string(data) + struct.pack(">I", 0))


def add_identity_body(comment: bytes = b"added-by-the-daemon") -> bytes:
    """An Ed25519 key in ADD_IDENTITY form (a key nobody holds, made here)."""
    from cryptography.hazmat.primitives import serialization

    private = Ed25519PrivateKey.generate()
    seed = private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
    public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return ssh_string(b"ssh-ed25519") + ssh_string(public) + ssh_string(seed + public) + ssh_string(comment)


def refused(request_name: str, reply_name: str) -> bool:
    """Whether ``reply_name`` refuses the request: FAILURE, or for an extension also EXTENSION_FAILURE (what
    golang.org/x/crypto's agent server sends when the agent's Extension fails, as BuildKit's read-only agent does)."""
    return reply_name == "FAILURE" or (request_name == "EXTENSION" and reply_name == "EXTENSION_FAILURE")


def key_management_requests(forwarded: Key) -> list[tuple[str, bytes]]:
    """Every request that changes an agent, and an extension, named; the lock is undone by the unlock after it."""
    return [
        ("ADD_IDENTITY", frame(17, add_identity_body())),
        ("ADD_ID_CONSTRAINED", frame(25, add_identity_body() + bytes([1]) + struct.pack(">I", 60))),
        ("REMOVE_IDENTITY", frame(18, ssh_string(forwarded.blob))),
        ("ADD_SMARTCARD_KEY", frame(20, ssh_string(b"/nonexistent/pkcs11.so") + ssh_string(b""))),
        ("REMOVE_SMARTCARD_KEY", frame(21, ssh_string(b"/nonexistent/pkcs11.so") + ssh_string(b""))),
        ("LOCK", frame(22, ssh_string(b"conformance-lock"))),
        ("UNLOCK", frame(23, ssh_string(b"conformance-lock"))),
        ("EXTENSION", frame(27, ssh_string(b"conformance@example.org"))),
        ("REMOVE_ALL_IDENTITIES", frame(19)),
    ]


# -- through a session ----------------------------------------------------------------------------

@dataclass
class ForwardedAgent:
    """One ``ForwardAgent`` call of a session: send a request, read one reply."""

    session: object  # a SessionRecord of the instrumented daemon
    agent_id: str | None  # None: no buildkit.ssh.id metadata at all
    transcript: list[str] = field(default_factory=list)
    chunk: int = 0  # >0: send each request in pieces of this many bytes, one BytesMessage each

    def __post_init__(self) -> None:
        metadata = [] if self.agent_id is None else [(SSH_ID_METADATA_KEY, self.agent_id)]
        self.transcript.append(f"< open ForwardAgent {metadata}")
        self.stream = self.session.conn.open_stream(FORWARD_AGENT, metadata)
        self._buffer = b""

    def request(self, message: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
        """Send one agent message; the reply's (type, body). Raises RpcError if the call ends, TimeoutError."""
        name = MESSAGE_NAMES.get(message[4], str(message[4]))
        self.transcript.append(f"< {name} ({len(message)} bytes)")
        pieces = [message] if self.chunk <= 0 else [message[i:i + self.chunk]
                                                     for i in range(0, len(message), self.chunk)]
        for piece in pieces:
            self.stream.send(sshforward_pb2.BytesMessage(data=piece).SerializeToString())
        self.stream.flush()
        deadline = time.monotonic() + timeout

        def read() -> bytes:
            if self._buffer:
                data, self._buffer = self._buffer, b""
                return data
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply to {name} after {timeout} s")
            raw = self.stream.recv(timeout=left)
            if raw is None:
                self.transcript.append("> call ended OK before a reply")
                raise AgentProtocolError(f"the call ended before a reply to {name}")
            return sshforward_pb2.BytesMessage.FromString(raw).data

        try:
            kind, body = _read_message(read)
        except RpcError as exc:
            self.transcript.append(f"> call ended {exc.code.name}: {exc.details}")
            raise
        self.transcript.append(f"> {MESSAGE_NAMES.get(kind, str(kind))} ({len(body) + 5} bytes)")
        return kind, body

    def identities(self) -> list[bytes]:
        kind, body = self.request(frame(REQUEST_IDENTITIES))
        if kind != IDENTITIES_ANSWER:
            return []
        return [blob for blob, _ in parse_identities(body)]

    def close(self) -> None:
        try:
            self.stream.close_send()
            self.stream.cancel()
        except Exception:
            pass


def signature_of(reply: tuple[int, bytes]) -> bytes | None:
    """The signature blob of a SIGN_RESPONSE, else None."""
    kind, body = reply
    if kind != SIGN_RESPONSE:
        return None
    try:
        blob, end = read_string(body, 0)
    except AgentProtocolError:
        return None
    return blob if end == len(body) else None


def check_agent(session, agent_id: str, transcript: list[str]) -> tuple[bool, str]:
    """CheckAgent(ID): (succeeded, how it ended)."""
    from .daemon_scripts import unary

    transcript.append(f"< CheckAgent ID={agent_id!r}")
    outcome = unary(session, CHECK_AGENT, sshforward_pb2.CheckAgentRequest(ID=agent_id).SerializeToString())
    ended = "OK" if outcome.ok else (outcome.code.name if outcome.code else "no answer") + f": {outcome.details}"
    transcript.append(f"> {ended}")
    return outcome.ok, ended
