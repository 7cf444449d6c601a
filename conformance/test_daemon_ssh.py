"""Daemon role: SSH agent forwarding for `RUN --mount=type=ssh` (SSH-7 to SSH-9).

The suite plays the client with a real ssh-agent (Debian's openssh-client) behind the reference SSH provider and
records what the daemon calls: `CheckAgent` with which ID, `ForwardAgent` with which metadata. The step runs
Debian's `ssh-add` in an image built on the daemon from the host's busybox and ssh-add (nothing is pulled), so the
bytes cross the daemon's socket for real. A daemon that runs no RUN steps (the reference daemon) is UNSUPPORTED.
Every step carries a token of its own, so that concurrent cases never share a step BuildKit could merge.
"""

from __future__ import annotations

import base64
import shutil
import tempfile
import uuid

import pytest

from reference.client.sshforward import SSH_ID_METADATA_KEY, AgentSource, SSHForwardProvider
from reference.pb import sshforward_pb2
from reference.transport.base import RpcError, StatusCode

from .harness.daemon_probes import ssh_tools_image
from .harness.scripted_client import make_context, run_build
from .harness.ssh_agent import CHECK_AGENT, FORWARD_AGENT, RealAgent, have_openssh, make_key
from .outcomes import expect

requirement = pytest.mark.requirement
pytestmark = pytest.mark.skipif(have_openssh() is not None, reason=str(have_openssh()))


def needs_ssh_generation(daemon) -> None:
    if daemon.generation == "n-1":
        pytest.skip("SSH forwarding is generation n and later; the target is generation n-1")


class _Recorder:
    """Wraps a provider's handlers to record what the daemon asked for."""

    def __init__(self, provider: SSHForwardProvider | None, check_answer: StatusCode | None = None) -> None:
        self.provider = provider
        self.check_answer = check_answer  # refuse every CheckAgent with this status
        self.checked: list[str] = []
        self.forwarded: list[list[tuple[str, str]]] = []

    def check_agent(self, stream) -> None:
        request = sshforward_pb2.CheckAgentRequest.FromString(stream.recv() or b"")
        self.checked.append(request.ID)
        if self.check_answer is not None:
            raise RpcError(self.check_answer, f"unset ssh forward key {request.ID or 'default'}")
        if (request.ID or "default") not in self.provider.sources:
            raise RpcError(StatusCode.UNKNOWN, f"unset ssh forward key {request.ID or 'default'}")
        stream.send(sshforward_pb2.CheckAgentResponse().SerializeToString())

    def forward_agent(self, stream) -> None:
        self.forwarded.append([(k, v) for k, v in stream.metadata if k == SSH_ID_METADATA_KEY])
        if self.provider is None:
            raise RpcError(StatusCode.UNKNOWN, "no agent")
        self.provider.forward_agent(stream)

    def overrides(self) -> dict:
        return {CHECK_AGENT: self.check_agent, FORWARD_AGENT: self.forward_agent}

    def describe(self) -> str:
        return f"CheckAgent IDs {self.checked}, ForwardAgent metadata {self.forwarded}"


@pytest.fixture
def agent():
    home = tempfile.mkdtemp(prefix="conf-ssh-")
    try:
        key = make_key(home, "conformance-forwarded")
        with RealAgent([key]) as real:
            yield real, key
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _step(daemon, mount: str, script: str) -> str:
    token = uuid.uuid4().hex[:12]  # no two cases share a mergeable step
    return (f"FROM {ssh_tools_image(daemon)}\n"
            f"RUN --mount=type=ssh{mount} sh -c 'echo conf-{token} >/dev/null; {script}'\n")


@requirement("SSH-7")
@pytest.mark.parametrize("agent_id", [None, "conf-deploy"], ids=["default-id", "named-id"])
def test_forwarded_agent_reaches_the_step(daemon, agent, agent_id):
    needs_ssh_generation(daemon)
    real, key = agent
    wanted = agent_id or "default"
    public = base64.b64encode(key.blob).decode()
    mount = f",id={agent_id},required=true" if agent_id else ",required=true"
    # the step must find a socket, list exactly the forwarded key through it, and (second connection) list it again
    script = (f'test -S "$SSH_AUTH_SOCK" || exit 3; ssh-add -L | grep -q {public} || exit 4; '
              f'ssh-add -l >/dev/null || exit 5')
    ctx = make_context({}, dockerfile=_step(daemon, mount, script))
    with SSHForwardProvider({wanted: AgentSource(socket=real.socket)}) as provider:
        recorder = _Recorder(provider)
        obs = run_build(daemon.host, ctx, ssh=provider, handler_overrides=recorder.overrides(),
                        query={"networkmode": "none", "nocache": "1"}, hang_timeout=10)
    text = ((obs.error or "") + " " + " ".join(obs.vertex_errors))
    checked_as = {"", "default"} if agent_id is None else {agent_id}  # no id=: the empty ID, which means default
    expect("SSH-7", recorder.checked and set(recorder.checked) <= checked_as,
           f"CheckAgent with ID {' or '.join(map(repr, sorted(checked_as)))} before the step",
           recorder.describe() + "; " + obs.describe())
    expect("SSH-7", len(recorder.forwarded) >= 2 and all(md == [(SSH_ID_METADATA_KEY, wanted)]
                                                         for md in recorder.forwarded),
           f"one ForwardAgent per connection of the step (two), each with buildkit.ssh.id={wanted}",
           recorder.describe())
    expect("SSH-7", obs.ok, "the step lists the forwarded key through $SSH_AUTH_SOCK and succeeds",
           f"{text}; exit code 3: no socket, 4: key not listed, 5: second connection failed")


@requirement("SSH-8")
@pytest.mark.parametrize("answer", ["not-advertised", "UNIMPLEMENTED", "UNKNOWN"])
def test_required_mount_without_agent_fails_before_the_step(daemon, answer):
    needs_ssh_generation(daemon)
    ctx = make_context({}, dockerfile=_step(daemon, ",id=conf-absent,required=true", "exit 3"))
    overrides = {}
    recorder = _Recorder(None, None if answer == "not-advertised" else StatusCode[answer])
    if answer != "not-advertised":
        overrides = recorder.overrides()
    obs = run_build(daemon.host, ctx, handler_overrides=overrides, query={"networkmode": "none", "nocache": "1"},
                    hang_timeout=10)
    text = ((obs.error or "") + " " + " ".join(obs.vertex_errors)).lower()
    expect("SSH-8", not obs.ok and "conf-absent" in text and "exit code" not in text,
           "the build fails naming the SSH ID conf-absent, and the step does not run",
           f"{obs.describe()} vertex errors {obs.vertex_errors}; {recorder.describe()}")


@requirement("SSH-9")
@pytest.mark.parametrize("answer", ["not-advertised", "UNKNOWN"])
def test_optional_mount_without_agent_is_left_out(daemon, answer):
    needs_ssh_generation(daemon)
    # the frontend may still name the target in SSH_AUTH_SOCK (dockerd 20.10 and 26.1 do); nothing may be there
    ctx = make_context({}, dockerfile=_step(daemon, ",id=conf-absent,target=/run/conf-agent.sock",
                                            "test -e /run/conf-agent.sock && exit 3; true"))
    recorder = _Recorder(None, StatusCode.UNKNOWN)
    overrides = {} if answer == "not-advertised" else recorder.overrides()
    obs = run_build(daemon.host, ctx, handler_overrides=overrides, query={"networkmode": "none", "nocache": "1"},
                    hang_timeout=10)
    text = ((obs.error or "") + " " + " ".join(obs.vertex_errors))
    expect("SSH-9", obs.ok, "the step runs, with nothing at the mount's target",
           f"{text}; exit code 3: something is at the target; {recorder.describe()}")
    if answer != "not-advertised":
        expect("SSH-9", recorder.checked == ["conf-absent"], "CheckAgent asked for conf-absent",
               recorder.describe())
