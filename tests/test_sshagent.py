"""The sans-IO ssh-agent filter of ``--ssh`` forwarding (reference/sshagent.py)."""

from __future__ import annotations

import struct

import pytest

from reference import sshagent as sa
from reference.sshagent import AgentFilter, AgentProtocolError, frame, ssh_string

KEY_A = ssh_string(b"ssh-ed25519") + ssh_string(b"A" * 32)
KEY_B = ssh_string(b"ssh-ed25519") + ssh_string(b"B" * 32)
FAILURE = bytes([0, 0, 0, 1, 5])
LIST = frame(sa.SSH_AGENTC_REQUEST_IDENTITIES)


def sign_request(blob: bytes, data: bytes = b"to sign", flags: int = 0) -> bytes:
    return frame(sa.SSH_AGENTC_SIGN_REQUEST, ssh_string(blob) + ssh_string(data) + struct.pack(">I", flags))


def identities_answer(*keys: tuple[bytes, bytes]) -> bytes:
    return frame(sa.SSH_AGENT_IDENTITIES_ANSWER, sa.identities_body(keys))


SIGNATURE = frame(sa.SSH_AGENT_SIGN_RESPONSE, ssh_string(ssh_string(b"ssh-ed25519") + ssh_string(b"s" * 64)))


def test_frame_layout():
    assert frame(11) == b"\x00\x00\x00\x01\x0b"
    assert frame(5, b"xy") == b"\x00\x00\x00\x03\x05xy"


def test_list_is_forwarded_and_answer_filtered_to_allowed_keys():
    f = AgentFilter([KEY_A])
    assert f.feed_daemon(LIST) == (LIST, b"")
    reply = f.feed_agent(identities_answer((KEY_B, b"b"), (KEY_A, b"a")))
    assert reply == identities_answer((KEY_A, b"a"))
    assert sa.parse_identities(reply[5:]) == [(KEY_A, b"a")]


def test_all_keys_mode_passes_every_identity():
    f = AgentFilter(None)
    f.feed_daemon(LIST)
    answer = identities_answer((KEY_A, b"a"), (KEY_B, b"b"))
    assert f.feed_agent(answer) == answer


def test_sign_with_allowed_key_is_forwarded_and_response_passed():
    f = AgentFilter([KEY_A])
    request = sign_request(KEY_A)
    assert f.feed_daemon(request) == (request, b"")
    assert f.feed_agent(SIGNATURE) == SIGNATURE


def test_sign_with_other_key_fails_locally():
    f = AgentFilter([KEY_A])
    assert f.feed_daemon(sign_request(KEY_B)) == (b"", FAILURE)
    assert f.refused == [sa.SSH_AGENTC_SIGN_REQUEST]


def test_malformed_sign_request_fails_locally():
    f = AgentFilter(None)
    body = ssh_string(KEY_A) + ssh_string(b"data")  # no flags
    assert f.feed_daemon(frame(sa.SSH_AGENTC_SIGN_REQUEST, body)) == (b"", FAILURE)
    assert f.feed_daemon(frame(sa.SSH_AGENTC_REQUEST_IDENTITIES, b"x")) == (b"", FAILURE)


@pytest.mark.parametrize("message_type", sorted(sa.REFUSED_REQUESTS) + [1, 9, 99, 255])
def test_key_management_and_unknown_requests_are_refused(message_type):
    f = AgentFilter(None)  # refused even when every key is allowed
    assert f.feed_daemon(frame(message_type, b"\x00\x00\x00\x00payload")) == (b"", FAILURE)
    assert f.refused == [message_type]


def test_split_input_byte_by_byte():
    f = AgentFilter([KEY_A])
    request = sign_request(KEY_A, b"x" * 300)
    forwarded = b""
    for i in range(len(request)):
        to_agent, to_daemon = f.feed_daemon(request[i:i + 1])
        assert to_daemon == b""
        forwarded += to_agent
    assert forwarded == request
    answer = b""
    for i in range(len(SIGNATURE)):
        answer += f.feed_agent(SIGNATURE[i:i + 1])
    assert answer == SIGNATURE


def test_pipelined_requests_answered_in_order():
    f = AgentFilter([KEY_A])
    chunk = LIST + sign_request(KEY_B) + frame(17, b"key") + sign_request(KEY_A) + frame(19)
    to_agent, to_daemon = f.feed_daemon(chunk)
    assert to_agent == LIST + sign_request(KEY_A)
    assert to_daemon == b""  # the local failures wait behind the agent's reply to LIST
    assert f.awaiting_agent == 2
    listing = identities_answer((KEY_A, b"a"), (KEY_B, b"b"))
    # both agent replies in one chunk, the second split off halfway
    replies = listing + SIGNATURE
    first = f.feed_agent(replies[:len(listing) + 3])
    assert first == identities_answer((KEY_A, b"a")) + FAILURE + FAILURE
    assert f.feed_agent(replies[len(listing) + 3:]) == SIGNATURE + FAILURE
    assert f.awaiting_agent == 0


def test_agent_replies_in_one_chunk_with_local_answers_between():
    f = AgentFilter([KEY_A])
    to_agent, _ = f.feed_daemon(LIST + sign_request(KEY_B) + sign_request(KEY_A) + frame(22))
    assert to_agent == LIST + sign_request(KEY_A)
    listing = identities_answer((KEY_A, b"a"))
    assert f.feed_agent(listing + SIGNATURE) == listing + FAILURE + SIGNATURE + FAILURE


def test_local_answer_released_at_once_when_nothing_is_pending():
    f = AgentFilter(None)
    f.feed_daemon(LIST)
    f.feed_agent(identities_answer())
    assert f.feed_daemon(frame(22, ssh_string(b"pw"))) == (b"", FAILURE)


def test_agent_failure_reply_passes():
    f = AgentFilter(None)
    f.feed_daemon(sign_request(KEY_A))
    assert f.feed_agent(FAILURE) == FAILURE


@pytest.mark.parametrize("data", [
    b"\x00\x00\x00\x00",  # no type byte
    struct.pack(">I", sa.MAX_MESSAGE_SIZE + 1) + b"\x0b",
])
def test_malformed_or_oversize_frame_from_daemon_is_an_error_state(data):
    f = AgentFilter(None)
    with pytest.raises(AgentProtocolError):
        f.feed_daemon(data)
    with pytest.raises(AgentProtocolError):  # and it stays one
        f.feed_daemon(LIST)
    with pytest.raises(AgentProtocolError):
        f.feed_agent(FAILURE)


def test_message_of_the_maximum_size_is_accepted():
    f = AgentFilter(None)
    body = ssh_string(KEY_A) + ssh_string(b"d" * (sa.MAX_MESSAGE_SIZE - 1 - 4 - len(KEY_A) - 4 - 4)) + b"\0" * 4
    request = frame(sa.SSH_AGENTC_SIGN_REQUEST, body)
    assert len(request) == 4 + sa.MAX_MESSAGE_SIZE
    assert f.feed_daemon(request) == (request, b"")


def test_oversize_announced_before_the_body_arrives():
    f = AgentFilter(None)
    with pytest.raises(AgentProtocolError, match="exceeds"):
        f.feed_daemon(struct.pack(">I", 1 << 30))


@pytest.mark.parametrize("reply", [
    FAILURE,  # nothing was asked
])
def test_unsolicited_agent_reply_is_an_error(reply):
    with pytest.raises(AgentProtocolError, match="nobody asked"):
        AgentFilter(None).feed_agent(reply)


@pytest.mark.parametrize("body", [
    b"",  # no count
    b"\x00\x00\x00\x02" + ssh_string(KEY_A) + ssh_string(b"a"),  # one key short
    b"\x00\x00\x00\x01" + ssh_string(KEY_A) + ssh_string(b"a") + b"!",  # trailing byte
    b"\x00\x00\x00\x01\x00\x00\x01\x00abc",  # truncated blob
    struct.pack(">I", sa.MAX_IDENTITIES + 1),
])
def test_malformed_identities_answer_is_an_error(body):
    f = AgentFilter(None)
    f.feed_daemon(LIST)
    with pytest.raises(AgentProtocolError):
        f.feed_agent(frame(sa.SSH_AGENT_IDENTITIES_ANSWER, body))


def test_reply_of_the_wrong_kind_is_an_error():
    f = AgentFilter(None)
    f.feed_daemon(LIST)
    with pytest.raises(AgentProtocolError, match="answered request 11"):
        f.feed_agent(SIGNATURE)


def test_too_many_unanswered_requests():
    f = AgentFilter(None)
    f.feed_daemon(LIST * sa.MAX_PENDING_REQUESTS)
    with pytest.raises(AgentProtocolError, match="without reading replies"):
        f.feed_daemon(LIST)
