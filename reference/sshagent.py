"""A sans-IO filter for the ssh-agent protocol forwarded into a build (``--ssh``).

The daemon's side (a process in a ``RUN --mount=type=ssh`` step) may only list
keys and ask for signatures; everything that changes the agent (adding,
removing, locking keys) or asks for an extension is answered with
SSH_AGENT_FAILURE here and never reaches the real agent. Extensions are refused
like BuildKit's own read-only agent does: OpenSSH's ``session-bind@openssh.com``
is optional for ``ssh`` (a failure is tolerated), and the others manage keys.

Replies must reach the daemon in request order, so an answer made here waits
behind the agent's replies to earlier forwarded requests.

Messages are ``uint32 length | byte type | body``; the length counts the type.
"""

from __future__ import annotations

import collections
import struct
from collections.abc import Iterable

SSH_AGENT_FAILURE = 5
SSH_AGENTC_REQUEST_IDENTITIES = 11
SSH_AGENT_IDENTITIES_ANSWER = 12
SSH_AGENTC_SIGN_REQUEST = 13
SSH_AGENT_SIGN_RESPONSE = 14
#: Key management and extensions, named for error messages and tests; any other type is refused as well.
REFUSED_REQUESTS = {
    17: "ADD_IDENTITY",
    18: "REMOVE_IDENTITY",
    19: "REMOVE_ALL_IDENTITIES",
    20: "ADD_SMARTCARD_KEY",
    21: "REMOVE_SMARTCARD_KEY",
    22: "LOCK",
    23: "UNLOCK",
    25: "ADD_ID_CONSTRAINED",
    26: "ADD_SMARTCARD_KEY_CONSTRAINED",
    27: "EXTENSION",
}

#: OpenSSH's agent refuses longer messages (AGENT_MAX_LEN); so do we, both ways.
MAX_MESSAGE_SIZE = 256 * 1024
#: Requests forwarded or answered but not yet delivered; a well-behaved client waits for each reply.
MAX_PENDING_REQUESTS = 1024
#: Sanity bound on a key list (OpenSSH's agent holds at most 2048 keys).
MAX_IDENTITIES = 4096

FAILURE_MESSAGE = struct.pack(">IB", 1, SSH_AGENT_FAILURE)


class AgentProtocolError(Exception):
    """A peer broke the agent protocol; the filter refuses all further input."""


def frame(message_type: int, body: bytes = b"") -> bytes:
    """One agent message on the wire."""
    return struct.pack(">IB", len(body) + 1, message_type) + body


def ssh_string(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


def read_string(data: bytes, offset: int) -> tuple[bytes, int]:
    """The SSH ``string`` at ``offset`` and the offset after it."""
    if offset + 4 > len(data):
        raise AgentProtocolError("truncated string length")
    (length,) = struct.unpack_from(">I", data, offset)
    end = offset + 4 + length
    if end > len(data):
        raise AgentProtocolError("truncated string")
    return data[offset + 4:end], end


def parse_identities(body: bytes) -> list[tuple[bytes, bytes]]:
    """(key blob, comment) pairs of an IDENTITIES_ANSWER body."""
    if len(body) < 4:
        raise AgentProtocolError("identities answer without a count")
    (count,) = struct.unpack_from(">I", body, 0)
    if count > MAX_IDENTITIES:
        raise AgentProtocolError(f"identities answer lists {count} keys")
    offset = 4
    identities = []
    for _ in range(count):
        blob, offset = read_string(body, offset)
        comment, offset = read_string(body, offset)
        identities.append((blob, comment))
    if offset != len(body):
        raise AgentProtocolError("trailing bytes after the identities")
    return identities


def identities_body(identities: Iterable[tuple[bytes, bytes]]) -> bytes:
    identities = list(identities)
    return struct.pack(">I", len(identities)) + b"".join(ssh_string(b) + ssh_string(c) for b, c in identities)


def sign_request_key(body: bytes) -> bytes | None:
    """The key blob of a well-formed SIGN_REQUEST body (string key, string data, uint32 flags), else None."""
    try:
        blob, offset = read_string(body, 0)
        _, offset = read_string(body, offset)
    except AgentProtocolError:
        return None
    return blob if offset + 4 == len(body) else None


class _Framer:
    """Cuts a byte stream into whole messages, however it was chunked."""

    def __init__(self, side: str) -> None:
        self.side = side
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self.buffer += data
        messages = []
        while len(self.buffer) >= 4:
            (length,) = struct.unpack_from(">I", self.buffer, 0)
            if length == 0:
                raise AgentProtocolError(f"empty message from the {self.side}")
            if length > MAX_MESSAGE_SIZE:
                raise AgentProtocolError(f"{length}-byte message from the {self.side} exceeds {MAX_MESSAGE_SIZE}")
            if len(self.buffer) < 4 + length:
                break
            messages.append((self.buffer[4], bytes(self.buffer[5:4 + length])))
            del self.buffer[:4 + length]
        return messages


class AgentFilter:
    """One forwarded agent connection.

    ``allowed_keys``: the public key blobs the daemon may see and use, or None
    for every key the agent holds (``--ssh default``, a private agent).
    """

    def __init__(self, allowed_keys: Iterable[bytes] | None = None) -> None:
        self.allowed_keys = None if allowed_keys is None else frozenset(allowed_keys)
        self._from_daemon = _Framer("daemon")
        self._from_agent = _Framer("agent")
        # One entry per request not yet delivered, in order: the type of a forwarded
        # request (its reply comes from the agent) or the bytes of an answer made here.
        self._pending: collections.deque[int | bytes] = collections.deque()
        self.error: str | None = None
        self.refused: list[int] = []  # request types answered with FAILURE here

    def _allowed(self, blob: bytes) -> bool:
        return self.allowed_keys is None or blob in self.allowed_keys

    def _check(self) -> None:
        if self.error is not None:
            raise AgentProtocolError(self.error)

    def _fail(self, exc: AgentProtocolError) -> None:
        self.error = str(exc)
        raise exc

    @property
    def awaiting_agent(self) -> int:
        """Forwarded requests the agent has not answered yet."""
        return sum(1 for entry in self._pending if isinstance(entry, int))

    def feed_daemon(self, data: bytes) -> tuple[bytes, bytes]:
        """Bytes from the daemon -> (bytes for the agent, bytes for the daemon now)."""
        self._check()
        try:
            messages = self._from_daemon.feed(data)
        except AgentProtocolError as exc:
            self._fail(exc)
        to_agent = bytearray()
        for message_type, body in messages:
            if len(self._pending) >= MAX_PENDING_REQUESTS:
                self._fail(AgentProtocolError(f"more than {MAX_PENDING_REQUESTS} requests without reading replies"))
            if self._forwardable(message_type, body):
                to_agent += frame(message_type, body)
                self._pending.append(message_type)
            else:
                self.refused.append(message_type)
                self._pending.append(FAILURE_MESSAGE)
        return bytes(to_agent), self._release()

    def _forwardable(self, message_type: int, body: bytes) -> bool:
        if message_type == SSH_AGENTC_REQUEST_IDENTITIES:
            return body == b""
        if message_type == SSH_AGENTC_SIGN_REQUEST:
            blob = sign_request_key(body)
            return blob is not None and self._allowed(blob)
        return False

    def feed_agent(self, data: bytes) -> bytes:
        """Bytes from the agent -> bytes for the daemon."""
        self._check()
        out = bytearray()
        try:
            for message_type, body in self._from_agent.feed(data):
                if not self._pending:
                    raise AgentProtocolError("the agent sent a reply nobody asked for")
                # The head is always a forwarded request (answers are released as soon as they lead);
                # its reply takes its place and leaves with the answers queued behind it.
                self._pending[0] = self._reply(self._pending[0], message_type, body)
                out += self._release()
        except AgentProtocolError as exc:
            self._fail(exc)
        return bytes(out)

    def _reply(self, request: int, message_type: int, body: bytes) -> bytes:
        if message_type == SSH_AGENT_FAILURE:
            return FAILURE_MESSAGE
        if request == SSH_AGENTC_REQUEST_IDENTITIES and message_type == SSH_AGENT_IDENTITIES_ANSWER:
            kept = [(blob, comment) for blob, comment in parse_identities(body) if self._allowed(blob)]
            return frame(SSH_AGENT_IDENTITIES_ANSWER, identities_body(kept))
        if request == SSH_AGENTC_SIGN_REQUEST and message_type == SSH_AGENT_SIGN_RESPONSE:
            return frame(message_type, body)
        raise AgentProtocolError(f"the agent answered request {request} with message type {message_type}")

    def _release(self) -> bytes:
        """Every answer whose turn has come: those not behind an unanswered forwarded request."""
        out = bytearray()
        while self._pending and isinstance(self._pending[0], bytes):
            out += self._pending.popleft()
        return bytes(out)
