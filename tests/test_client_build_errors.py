"""``reference.client.build`` failures: the BuildError names the step that failed and carries its last output
lines, on the reference daemon and on dockerd 20.10, through POST /build and through /grpc."""

from __future__ import annotations

import pytest

from conformance.trees import write_file
from reference.client import BuildError, build
from reference.client.build import FAILED_STEP_LOG_LINES

from test_daemon import RefDaemon  # noqa: E402  (same tests directory)


@pytest.fixture(scope="module")
def refd(tmp_path_factory):
    d = RefDaemon(str(tmp_path_factory.mktemp("refd") / "root"))
    yield d
    d.close()


@pytest.mark.parametrize("generation", ["n", "n+1"])
def test_reference_daemon_names_the_failed_copy(refd, tmp_path, generation):
    write_file(str(tmp_path), "Dockerfile", b"FROM scratch\nCOPY a /a\nCOPY missing /b\n")
    write_file(str(tmp_path), "a", b"a\n")
    with pytest.raises(BuildError) as info:
        build(str(tmp_path), host=refd.host, generation=generation)
    error = info.value
    assert error.step == "[2/2] COPY missing /b"
    assert '"/missing" not found' in error.message and str(error) == error.message
    assert error.logs == []


@pytest.mark.parametrize("api", ["build", "grpc"])
def test_dockerd_names_the_failed_run_and_its_last_lines(dockerd, shell_image, tmp_path, api):
    lines = [f"line {i}" for i in range(FAILED_STEP_LOG_LINES + 5)]
    # stdout only: BuildKit reads stdout and stderr through separate pipes, their relative order is a race
    script = "; ".join(f"echo '{line}'" for line in lines) + "; exit 3"
    write_file(str(tmp_path), "Dockerfile", f"FROM {shell_image}\nRUN echo ok\nRUN {script}\n".encode())
    with pytest.raises(BuildError) as info:
        build(str(tmp_path), host=dockerd.host, network="none", api=api, no_cache=True)
    error = info.value
    assert error.step == f"[3/3] RUN {script}"
    assert "exit code: 3" in error.message
    # the step's output, its last lines only
    assert error.logs == lines[-FAILED_STEP_LOG_LINES:], error.logs


def test_a_build_error_without_a_step_has_none(tmp_path):
    error = BuildError("the build did not finish within 5 s")
    assert (error.message, error.step, error.logs, str(error)) == \
        ("the build did not finish within 5 s", None, [], "the build did not finish within 5 s")
