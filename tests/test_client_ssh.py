"""The reference client's --ssh end to end through a session: the suite's instrumented daemon calls CheckAgent and
ForwardAgent as BuildKit does, with a real ssh-agent and keys behind the client (reference/client/sshforward.py)."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys

import pytest

from conformance.harness.instrumented_daemon import InstrumentedDaemon, ScenarioResult
from conformance.harness.scripted_client import make_context
from reference.client import build
from reference.client.methods import SSH_CHECK_AGENT, SSH_FORWARD_AGENT
from reference.client.sshforward import SSH_ID_METADATA_KEY
from reference.pb import sshforward_pb2
from reference.transport.base import RpcError

pytestmark = pytest.mark.skipif(not shutil.which("ssh-keygen", path="/usr/bin"),
                                reason="Debian's openssh-client is not installed")

REQUEST_IDENTITIES, IDENTITIES_ANSWER, REMOVE_ALL, FAILURE = 11, 12, 19, 5


def _frame(kind: int, body: bytes = b"") -> bytes:
    return struct.pack(">IB", len(body) + 1, kind) + body


def _agent_exchange(session, agent_id: str, request: bytes) -> bytes:
    stream = session.conn.open_stream(SSH_FORWARD_AGENT, [(SSH_ID_METADATA_KEY, agent_id)])
    stream.send(sshforward_pb2.BytesMessage(data=request).SerializeToString())
    reply = b""
    while len(reply) < 4 or len(reply) < 4 + struct.unpack(">I", reply[:4])[0]:
        reply += sshforward_pb2.BytesMessage.FromString(stream.recv(10)).data
    stream.cancel()
    return reply


@pytest.mark.parametrize("generation", ["n", "n+1"])
def test_build_forwards_the_chosen_keys_and_nothing_else(generation, tmp_path):
    key = tmp_path / "id_ed25519"
    subprocess.run(["/usr/bin/ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "chosen", "-f", str(key)], check=True)
    seen = {}

    def scenario(build):
        session = build.session
        seen["methods"] = session.methods
        session.conn.unary(SSH_CHECK_AGENT, sshforward_pb2.CheckAgentRequest(ID="mykey").SerializeToString())
        try:
            session.conn.unary(SSH_CHECK_AGENT, sshforward_pb2.CheckAgentRequest(ID="other").SerializeToString())
        except RpcError as exc:
            seen["unknown"] = exc.details
        seen["identities"] = _agent_exchange(session, "mykey", _frame(REQUEST_IDENTITIES))
        seen["remove_all"] = _agent_exchange(session, "mykey", _frame(REMOVE_ALL))
        return ScenarioResult()

    with InstrumentedDaemon(scenario, generation=generation) as daemon:
        build(make_context({"a": "a"}), host=daemon.host, generation=generation, ssh=[f"mykey={key}"], timeout=60)
    assert "/moby.sshforward.v1.SSH/ForwardAgent" in seen["methods"]
    assert "unset ssh forward key other" in seen["unknown"]
    identities = seen["identities"]
    assert identities[4] == IDENTITIES_ANSWER and struct.unpack(">I", identities[5:9])[0] == 1  # one key
    public_blob = (tmp_path / "id_ed25519.pub").read_text().split()[1]
    import base64

    assert base64.b64decode(public_blob) in identities
    assert seen["remove_all"] == _frame(FAILURE)  # key management refused


def test_a_missing_key_fails_before_anything_is_sent(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "reference.client", "build", "--ssh", f"k={tmp_path}/nope",
                           str(tmp_path)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-daemon.sock"})
    assert proc.returncode != 0 and "nope" in proc.stderr and "no-daemon" not in proc.stderr, proc.stderr
