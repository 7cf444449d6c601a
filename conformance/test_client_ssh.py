"""Client role: SSH agent forwarding (`--ssh`, SSH-1 to SSH-6).

The instrumented daemon calls `CheckAgent` and `ForwardAgent` as BuildKit does for `RUN --mount=type=ssh` and
speaks the ssh-agent protocol through the forwarded stream, as a step's `ssh` would: it lists identities, asks for
signatures (verified with the public key) and sends every key-management request an agent knows. The keys and the
agents are real (Debian's ssh-keygen and ssh-agent). A client that asks for no build when given `--ssh` does not
offer SSH forwarding: UNSUPPORTED, with what it said.
"""

from __future__ import annotations

import shutil
import tempfile

import pytest

from reference.sshagent import frame, parse_identities, ssh_string

from .catalogue import not_applicable_reason
from .harness.daemon_scripts import run_client
from .harness.entry_points import NoBuildRequested
from .harness.instrumented_daemon import ScenarioResult
from .harness.scripted_client import make_context
from .harness.ssh_agent import (
    CHECK_AGENT, FAILURE, FORWARD_AGENT, IDENTITIES_ANSWER, MESSAGE_NAMES, ForwardedAgent, RealAgent, check_agent,
    have_openssh, key_management_requests, make_key, refused, sign_request, signature_of,
)
from .outcomes import expect, unsupported

requirement = pytest.mark.requirement
pytestmark = pytest.mark.skipif(have_openssh() is not None, reason=str(have_openssh()))

DATA = b"conformance: data a step signs through the forwarded agent"


def needs_ssh_generation(client, req_id: str) -> None:
    reason = not_applicable_reason(req_id, client.generation)
    if reason:
        pytest.skip(reason)


@pytest.fixture
def keys():
    """Two keys: ``chosen`` is given to the client, ``other`` is held by the agent at SSH_AUTH_SOCK."""
    home = tempfile.mkdtemp(prefix="conf-ssh-")
    try:
        yield make_key(home, "conformance-chosen"), make_key(home, "conformance-other")
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _run(client, scenario, ssh_args: list[str], env: dict):
    """Run the client with ``--ssh`` values against a daemon running ``scenario``; the scenario's findings."""
    seen: dict = {"transcript": []}

    def script(build):
        try:
            seen["methods"] = list(build.session.methods)
            scenario(build.session, seen)
        except Exception as exc:  # a client that breaks the call mid-way: graded from what was seen
            seen["error"] = f"{type(exc).__name__}: {exc}"
            seen["transcript"].append(f"! {seen['error']}")
        return ScenarioResult()

    extra = [arg for value in ssh_args for arg in ("--ssh", value)]
    try:
        run_client(client, make_context({"a": "a"}), script, extra_args=extra, env=env)
    except NoBuildRequested as exc:
        unsupported(f"the client asked for no build when given {' '.join(extra)}: it does not offer SSH "
                    f"forwarding ({exc})")
    return seen


def _advertised(seen) -> bool:
    methods = {m.lower() for m in seen.get("methods", [])}
    return {CHECK_AGENT.lower(), FORWARD_AGENT.lower()} <= methods


@requirement("SSH-1", "SSH-2", "SSH-3", "SSH-4")
def test_key_files_are_forwarded_and_nothing_else(client, keys):
    needs_ssh_generation(client, "SSH-1")
    chosen, other = keys

    def scenario(session, seen):
        log = seen["transcript"]
        seen["check_known"] = check_agent(session, "conf-keys", log)
        seen["check_unknown"] = check_agent(session, "conf-unknown", log)
        agent = ForwardedAgent(session, "conf-keys", log)
        seen["identities"] = agent.request(frame(11))
        seen["sign_chosen"] = agent.request(sign_request(chosen.blob, DATA))
        seen["sign_other"] = agent.request(sign_request(other.blob, DATA))
        agent.close()
        chunked = ForwardedAgent(session, "conf-keys", log, chunk=3)  # a request split over several messages
        seen["chunked"] = chunked.request(frame(11))
        chunked.close()
        unknown = ForwardedAgent(session, "conf-unknown", log)
        try:
            seen["forward_unknown"] = unknown.request(frame(11), timeout=5)
        except Exception as exc:
            seen["forward_unknown"] = f"{type(exc).__name__}: {exc}"
        unknown.close()

    with RealAgent([other]) as user_agent:
        seen = _run(client, scenario, [f"conf-keys={chosen.path}"], {"SSH_AUTH_SOCK": user_agent.socket})
    log = seen["transcript"]
    expect("SSH-1", _advertised(seen), "SSH/CheckAgent and SSH/ForwardAgent advertised with --ssh",
           seen.get("methods"), log)
    expect("SSH-2", seen.get("check_known", (False,))[0], "CheckAgent(conf-keys) succeeds",
           seen.get("check_known", seen.get("error")), log)
    expect("SSH-2", seen.get("check_unknown", (True,))[0] is False, "CheckAgent(conf-unknown) fails",
           seen.get("check_unknown", seen.get("error")), log)
    def blobs(reply):
        if not isinstance(reply, tuple) or reply[0] != IDENTITIES_ANSWER:
            return None
        return [blob for blob, _ in parse_identities(reply[1])]

    listed = blobs(seen.get("identities"))
    expect("SSH-3", listed is not None, "IDENTITIES_ANSWER through ForwardAgent", seen.get("identities", seen.get("error")),
           log)
    signature = signature_of(seen["sign_chosen"]) if "sign_chosen" in seen else None
    expect("SSH-3", signature is not None and chosen.verifies(DATA, signature),
           "a signature with the chosen key that verifies", seen.get("sign_chosen", seen.get("error")), log)
    expect("SSH-3", blobs(seen.get("chunked")) == listed, "the same answer to a request split into 3-byte messages",
           seen.get("chunked", seen.get("error")), log)
    expect("SSH-3", not isinstance(seen.get("forward_unknown"), tuple),
           "ForwardAgent for an ID the client does not forward fails", seen.get("forward_unknown"), log)
    expect("SSH-4", listed == [chosen.blob], "exactly the chosen key listed (not the agent's at SSH_AUTH_SOCK)",
           f"{len(listed or [])} keys; chosen listed: {chosen.blob in (listed or [])}, "
           f"SSH_AUTH_SOCK's listed: {other.blob in (listed or [])}", log)
    expect("SSH-4", seen.get("sign_other", (None,))[0] == FAILURE, "FAILURE to a sign request with another key",
           MESSAGE_NAMES.get(seen.get("sign_other", (None,))[0], seen.get("sign_other")), log)


def _key_management(session, seen, agent_id, forwarded_key):
    """Every key-management request on one connection, the listing after each, and one on a fresh connection."""
    log = seen["transcript"]
    agent = ForwardedAgent(session, agent_id, log)
    seen["replies"] = []
    for name, request in key_management_requests(forwarded_key):
        kind, _ = agent.request(request)
        seen["replies"].append((name, MESSAGE_NAMES.get(kind, str(kind)), agent.identities()))
    agent.close()
    fresh = ForwardedAgent(session, agent_id, log)
    seen["fresh"] = fresh.identities()
    fresh.close()


@requirement("SSH-6")
def test_key_management_is_refused_for_key_files(client, keys):
    needs_ssh_generation(client, "SSH-6")
    chosen, _ = keys
    seen = _run(client, lambda session, seen: _key_management(session, seen, "conf-keys", chosen),
                [f"conf-keys={chosen.path}"], {})
    log = seen["transcript"]
    replies = seen.get("replies", [])
    accepted = [f"{name}: {reply}" for name, reply, _ in replies if not refused(name, reply)]
    changed = [name for name, _, listed in replies if listed != [chosen.blob]]
    expect("SSH-6", len(replies) == len(key_management_requests(chosen)) and not accepted,
           "FAILURE to every key-management request and extension",
           f"accepted: {accepted}; {seen.get('error', '')}", log)
    expect("SSH-6", not changed and seen.get("fresh") == [chosen.blob],
           "the chosen key, and only it, listed after each request and on a new connection",
           f"listing changed after {changed}; new connection lists {len(seen.get('fresh') or [])} keys", log)


@requirement("SSH-2", "SSH-3", "SSH-5")
def test_agent_socket_is_forwarded_read_only(client, keys):
    needs_ssh_generation(client, "SSH-5")
    chosen, _ = keys

    def scenario(session, seen):
        log = seen["transcript"]
        seen["check_default"] = check_agent(session, "", log)
        agent = ForwardedAgent(session, None, log)  # no metadata: the default ID
        seen["identities"] = agent.identities()
        agent.close()
        _key_management(session, seen, "default", chosen)
        # an unlock must not reach the agent either: lock it behind the client's back, then ask through the session
        seen["locked_directly"] = user_agent.lock("conformance-lock")
        agent = ForwardedAgent(session, "default", log)
        seen["unlock"] = MESSAGE_NAMES.get(agent.request(frame(23, ssh_string(b"conformance-lock")))[0])
        agent.close()
        seen["still_locked"] = user_agent.identities() == []
        user_agent.unlock("conformance-lock")

    with RealAgent([chosen]) as user_agent:
        seen = _run(client, scenario, ["default"], {"SSH_AUTH_SOCK": user_agent.socket})
        left = user_agent.identities()
    log = seen["transcript"]
    expect("SSH-2", seen.get("check_default", (False,))[0], "CheckAgent with the empty ID (default) succeeds",
           seen.get("check_default", seen.get("error")), log)
    expect("SSH-3", seen.get("identities") == [chosen.blob], "the agent's key through ForwardAgent without metadata",
           f"{len(seen.get('identities') or [])} keys; {seen.get('error', '')}", log)
    replies = seen.get("replies", [])
    accepted = [f"{name}: {reply}" for name, reply, _ in replies if not refused(name, reply)]
    expect("SSH-5", replies and not accepted, "FAILURE to every key-management request and extension",
           f"accepted: {accepted}; {seen.get('error', '')}", log)
    expect("SSH-5", left == [chosen.blob] and seen.get("fresh") == [chosen.blob], "the agent keeps exactly its key",
           f"the agent holds {len(left)} keys after the build", log)
    expect("SSH-5", seen.get("locked_directly") and seen.get("unlock") == "FAILURE" and seen.get("still_locked"),
           "FAILURE to an unlock, and the agent still locked",
           f"unlock answered {seen.get('unlock')}; agent still locked: {seen.get('still_locked')}", log)

