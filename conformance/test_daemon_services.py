"""Daemon role towards the client's optional services: secrets.

A `RUN` step needs a root filesystem: a busybox image is built first on the
daemon under test through the scripted client (nothing is pulled). A required
secret the client cannot give must fail the build naming the secret; an
optional one must be left out (the step sees no file). Registry auth needs a
registry (no network here) and is not covered.
"""

from __future__ import annotations

import uuid

import pytest

from reference.client.services import SECRETS_GET
from reference.transport.base import RpcError, StatusCode

from .harness.daemon_probes import shell_image
from .harness.scripted_client import make_context, run_build
from .outcomes import expect

requirement = pytest.mark.requirement


def needs_n_plus_1(daemon) -> None:
    if daemon.generation == "n-1":
        pytest.skip("secrets are generation n and later; the target is generation n-1")


def _dockerfile(daemon, required: bool) -> str:
    flag = ",required=true" if required else ""
    # a token of its own: BuildKit merges identical steps of concurrent builds, and the merged step would ask
    # whichever of their sessions for the secret (a false verdict under pytest -n)
    return (f"FROM {shell_image(daemon)}\n"
            f"RUN --mount=type=secret,id=token{flag} : conf-{uuid.uuid4().hex[:12]}; "
            f"test \"$(cat /run/secrets/token 2>&1)\" = s3cr3t "
            "|| { echo SECRET-STATE-$(ls /run/secrets/ 2>&1 | tr -c a-z0-9 _); exit 3; }\n")


@requirement("SECRETS-3")
@pytest.mark.parametrize("answer", ["NOT_FOUND", "UNIMPLEMENTED", "not-advertised"])
def test_missing_required_secret_fails_the_build(daemon, answer):
    needs_n_plus_1(daemon)
    ctx = make_context({}, dockerfile=_dockerfile(daemon, required=True))
    overrides, secrets = {}, None
    if answer != "not-advertised":
        code = StatusCode[answer]

        def refuse(stream):
            stream.recv()
            raise RpcError(code, "nothing here")

        overrides = {SECRETS_GET: refuse}
    obs = run_build(daemon.host, ctx, handler_overrides=overrides, secrets=secrets,
                    query={"networkmode": "none", "nocache": "1"}, hang_timeout=10)
    text = ((obs.error or "") + " " + " ".join(obs.vertex_errors)).lower()
    expect("SECRETS-3", not obs.ok and "token" in text and "secret" in text and "exit code" not in text,
           "the build fails because the required secret `token` is missing", obs.describe())


@requirement("SECRETS-3")
@pytest.mark.parametrize("answer", ["NOT_FOUND", "UNIMPLEMENTED"])
def test_missing_optional_secret_is_left_out(daemon, answer):
    needs_n_plus_1(daemon)
    ctx = make_context({}, dockerfile=_dockerfile(daemon, required=False))
    code = StatusCode[answer]
    calls = []

    def refuse(stream):
        calls.append(stream.recv())
        raise RpcError(code, "nothing here")

    obs = run_build(daemon.host, ctx, handler_overrides={SECRETS_GET: refuse}, query={"networkmode": "none", "nocache": "1"},
                    hang_timeout=10)
    text = ((obs.error or "") + " " + " ".join(obs.vertex_errors)).lower()
    # the step runs without the mount: it finds no secret and exits 3
    expect("SECRETS-3", calls and not obs.ok and "exit code: 3" in text,
           "an optional missing secret is left out: the step runs and sees no secret", obs.describe())


@requirement("SECRETS-3")
def test_present_secret_is_fetched(daemon, tmp_path):
    needs_n_plus_1(daemon)
    ctx = make_context({}, dockerfile=_dockerfile(daemon, required=True))
    secret = tmp_path / "token"
    secret.write_bytes(b"s3cr3t")
    obs = run_build(daemon.host, ctx, secrets={"token": str(secret)}, query={"networkmode": "none", "nocache": "1"},
                    hang_timeout=10)
    expect("SECRETS-3", SECRETS_GET in obs.calls and obs.ok,
           "the daemon fetches the secret and the step reads it", obs.describe())
