"""SSH agent forwarding (``--ssh``): the ``moby.sshforward.v1.SSH`` session service.

Each ID names an agent source: an agent socket (``SSH_AUTH_SOCK`` by default)
or private key files, which are loaded into a private ``ssh-agent`` that lives
as long as this provider. Every ``ForwardAgent`` call opens its own connection
to the agent and pumps it through ``reference.sshagent.AgentFilter``, which
lets the build list keys and sign, nothing else.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import threading
import time
from dataclasses import dataclass

from ..pb import sshforward_pb2
from ..processes import stop_process
from ..socketdirs import socket_dir
from ..sshagent import AgentFilter, AgentProtocolError
from ..transport.base import RpcError, RpcStream, StatusCode

from .methods import SSH_CHECK_AGENT, SSH_FORWARD_AGENT  # noqa: E402  (the method names live with the others)
#: The call metadata key that names the agent of a ForwardAgent call.
SSH_ID_METADATA_KEY = "buildkit.ssh.id"
DEFAULT_ID = "default"
#: Key files are read up to this size, as BuildKit's provider does.
MAX_KEY_FILE_SIZE = 100 * 1024
SSH_AGENT = "/usr/bin/ssh-agent"
SSH_ADD = "/usr/bin/ssh-add"
AGENT_CONNECT_TIMEOUT = 2.0  # seconds, as BuildKit dials the agent socket
AGENT_START_TIMEOUT = 5.0
#: How often a ForwardAgent call looks up from the daemon's side to notice that the agent's side ended.
POLL_INTERVAL = 0.2
READ_SIZE = 32 * 1024


class SSHSpecError(ValueError):
    """An ``--ssh`` value that cannot be served."""


@dataclass(frozen=True)
class AgentSource:
    """Exactly one of ``socket`` (an agent's unix socket) or ``key_files``.

    ``allowed_keys`` restricts a socket source to these public key blobs (API
    only: the ``--ssh`` syntax cannot express it); None exposes all its keys.
    """

    socket: str | None = None
    key_files: tuple[str, ...] = ()
    allowed_keys: frozenset[bytes] | None = None


def parse_ssh_spec(spec: str, environ: dict[str, str] | None = None) -> tuple[str, AgentSource]:
    """One ``--ssh`` value as the docker CLI reads it: ``ID`` or ``ID=PATH[,PATH...]``.

    The ID is everything before the first ``=`` (empty: ``default``); the paths
    are split on ``,``. No path, or one empty path, means ``$SSH_AUTH_SOCK``.
    Each path is a socket or a key file; one socket at most, never both kinds.
    """
    environ = os.environ if environ is None else environ
    agent_id, sep, rest = spec.partition("=")
    agent_id = agent_id or DEFAULT_ID
    paths = rest.split(",") if sep else []
    if not paths or paths == [""]:
        paths = [environ.get("SSH_AUTH_SOCK", "")]
        if not paths[0]:
            raise SSHSpecError(f"ssh {agent_id!r}: invalid empty ssh agent socket: make sure SSH_AUTH_SOCK is set")
    sockets, keys = [], []
    for path in paths:
        try:
            mode = os.stat(path).st_mode
        except OSError as exc:
            raise SSHSpecError(f"ssh {agent_id!r}: {path}: {exc.strerror}") from None
        (sockets if stat.S_ISSOCK(mode) else keys).append(path)
    if len(sockets) > 1:
        raise SSHSpecError(f"ssh {agent_id!r}: only single socket allowed")
    if sockets and keys:
        raise SSHSpecError(f"ssh {agent_id!r}: invalid combination of keys and sockets")
    if sockets:
        return agent_id, AgentSource(socket=sockets[0])
    return agent_id, AgentSource(key_files=tuple(keys))


def parse_ssh_specs(specs: list[str], environ: dict[str, str] | None = None) -> dict[str, AgentSource]:
    """All ``--ssh`` values; an ID given twice is an error, as in the docker CLI's provider."""
    sources: dict[str, AgentSource] = {}
    for spec in specs:
        if not spec:
            continue
        agent_id, source = parse_ssh_spec(spec, environ)
        if agent_id in sources:
            raise SSHSpecError(f"duplicate agent ID {agent_id!r}")
        sources[agent_id] = source
    return sources


class PrivateAgent:
    """An ``ssh-agent`` of our own, in a private directory, holding only the given keys."""

    def __init__(self, key_files: tuple[str, ...]) -> None:
        for tool in (SSH_AGENT, SSH_ADD):
            if not os.access(tool, os.X_OK):
                raise SSHSpecError(f"{tool} is needed to forward key files (Debian: openssh-client)")
        self.dir = socket_dir("ssh-forward-")  # mode 0700
        self.socket = os.path.join(self.dir, "agent.sock")
        self.process: subprocess.Popen | None = None
        try:
            self.process = subprocess.Popen([SSH_AGENT, "-D", "-a", self.socket], stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            self._wait_ready()
            for path in key_files:
                self._add(path)
        except BaseException:
            self.close()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + AGENT_START_TIMEOUT
        while not os.path.exists(self.socket):
            if self.process.poll() is not None:
                raise SSHSpecError(f"ssh-agent exited: {self.process.stderr.read().decode(errors='replace')}")
            if time.monotonic() > deadline:
                raise SSHSpecError("ssh-agent did not create its socket")
            time.sleep(0.01)

    def _add(self, path: str) -> None:
        try:
            with open(path, "rb") as fh:
                key = fh.read(MAX_KEY_FILE_SIZE)
        except OSError as exc:
            raise SSHSpecError(f"failed to open {path}: {exc.strerror}") from None
        # From stdin: no permission check on the file and no certificate picked up beside it;
        # never prompt (an encrypted key is an error, as in BuildKit's provider).
        env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "SSH_ASKPASS")}
        env.update(SSH_AUTH_SOCK=self.socket, SSH_ASKPASS_REQUIRE="never")
        done = subprocess.run([SSH_ADD, "-q", "-"], input=key, env=env, capture_output=True, timeout=10,
                              start_new_session=True, check=False)
        if done.returncode != 0:
            reason = (done.stderr.decode(errors="replace").strip() or f"exit status {done.returncode}")
            raise SSHSpecError(f"failed to parse {path}: {reason}")

    def close(self) -> None:
        stop_process(self.process, 5)
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class SSHForwardProvider:
    """Serves CheckAgent and ForwardAgent for ``sources``; ``close()`` stops the private agents."""

    def __init__(self, sources: dict[str, AgentSource]) -> None:
        self.sources = dict(sources)
        self._sockets: dict[str, tuple[str, frozenset[bytes] | None]] = {}
        self._agents: list[PrivateAgent] = []
        self.forwarded: list[tuple[str, list[int]]] = []  # (ID, request types refused) per finished call
        self._lock = threading.Lock()
        try:
            for agent_id, source in self.sources.items():
                if source.socket is not None:
                    self._sockets[agent_id] = (source.socket, source.allowed_keys)
                else:
                    agent = PrivateAgent(source.key_files)
                    self._agents.append(agent)
                    self._sockets[agent_id] = (agent.socket, None)  # it holds exactly those keys
        except BaseException:
            self.close()
            raise

    def handlers(self) -> dict:
        return {SSH_CHECK_AGENT: self.check_agent, SSH_FORWARD_AGENT: self.forward_agent}

    def close(self) -> None:
        for agent in self._agents:
            agent.close()
        self._agents = []

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _lookup(self, agent_id: str) -> tuple[str, frozenset[bytes] | None]:
        found = self._sockets.get(agent_id or DEFAULT_ID)
        if found is None:  # a plain error in BuildKit, hence UNKNOWN
            raise RpcError(StatusCode.UNKNOWN, f"unset ssh forward key {agent_id or DEFAULT_ID}")
        return found

    def check_agent(self, stream: RpcStream) -> None:
        request = sshforward_pb2.CheckAgentRequest.FromString(stream.recv() or b"")
        self._lookup(request.ID)
        stream.send(sshforward_pb2.CheckAgentResponse().SerializeToString())

    def forward_agent(self, stream: RpcStream) -> None:
        ids = [v for k, v in stream.metadata if k == SSH_ID_METADATA_KEY]
        agent_id = ids[0] if ids and ids[0] else DEFAULT_ID
        path, allowed = self._lookup(agent_id)
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(AGENT_CONNECT_TIMEOUT)
        try:
            conn.connect(path)
        except OSError as exc:
            conn.close()
            raise RpcError(StatusCode.UNKNOWN, f"failed to dial agent {agent_id}: {exc}") from None
        conn.settimeout(None)
        pump = _AgentPump(stream, conn, AgentFilter(allowed))
        try:
            pump.run()
        finally:
            with self._lock:
                self.forwarded.append((agent_id, list(pump.filter.refused)))


class _AgentPump:
    """One ForwardAgent call: this thread reads the daemon, a second one reads the agent.

    The lock covers the filter and sends to the daemon, so answers leave in the
    filter's order; writes to the agent happen outside it, so a slow agent
    never blocks the replies it is producing.
    """

    def __init__(self, stream: RpcStream, conn: socket.socket, agent_filter: AgentFilter) -> None:
        self.stream = stream
        self.conn = conn
        self.filter = agent_filter
        self.lock = threading.Lock()
        self.agent_done = threading.Event()
        self.agent_error: BaseException | None = None

    def _send(self, data: bytes) -> None:
        if data:
            self.stream.send(sshforward_pb2.BytesMessage(data=data).SerializeToString())
            self.stream.flush()

    def _read_agent(self) -> None:
        try:
            while data := self.conn.recv(READ_SIZE):
                with self.lock:
                    self._send(self.filter.feed_agent(data))
        except OSError:
            pass  # the socket was shut down from the other thread
        except BaseException as exc:  # noqa: BLE001  (handed to the call's thread, re-raised there)
            self.agent_error = exc
        finally:
            self.agent_done.set()

    def run(self) -> None:
        reader = threading.Thread(target=self._read_agent, name="ssh-agent-reader", daemon=True)
        reader.start()
        try:
            self._read_daemon()
        finally:
            try:
                self.conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            reader.join()
            self.conn.close()
        if isinstance(self.agent_error, AgentProtocolError):
            raise RpcError(StatusCode.UNKNOWN, f"ssh agent: {self.agent_error}")
        if self.agent_error is not None:
            raise self.agent_error

    def _read_daemon(self) -> None:
        while not self.agent_done.is_set():
            try:
                raw = self.stream.recv(timeout=POLL_INTERVAL)
            except TimeoutError:
                continue
            if raw is None:  # the daemon half-closed: let the agent finish its replies
                try:
                    self.conn.shutdown(socket.SHUT_WR)
                except OSError:
                    return
                self.agent_done.wait()
                return
            data = sshforward_pb2.BytesMessage.FromString(raw).data
            try:
                with self.lock:
                    to_agent, to_daemon = self.filter.feed_daemon(data)
                    self._send(to_daemon)
            except AgentProtocolError as exc:
                raise RpcError(StatusCode.INVALID_ARGUMENT, f"ssh agent request: {exc}") from None
            if to_agent:
                try:
                    self.conn.sendall(to_agent)
                except OSError as exc:
                    raise RpcError(StatusCode.UNAVAILABLE, f"ssh agent connection: {exc}") from None
