"""Shared fixtures. Real peers: one private dockerd 20.10 per test session (per xdist worker)."""

import pytest

from conformance import realpeers, scratch

_REAL_PEER_FIXTURES = {"dockerd", "docker_cli", "shell_image"}


@pytest.hookimpl(tryfirst=True)  # before the tmp_path plugin reads --basetemp
def pytest_configure(config):
    # Temporary files of these tests, their daemons and clients go to one directory, removed when the run
    # ends (the conformance plugin closes it).
    scratch.tmp_path_in_run(config)


def pytest_collection_modifyitems(items):
    # Lets `-m "not real_peer"` deselect everything that would start a daemon.
    for item in items:
        if _REAL_PEER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.real_peer)


@pytest.fixture(scope="session")
def dockerd():
    """A private dockerd 20.10 (BuildKit, experimental) shared by the whole session."""
    realpeers.require_docker()
    with realpeers.PrivateDockerd() as daemon:
        yield daemon


@pytest.fixture(scope="session")
def docker_cli(dockerd):
    """Runs the docker CLI 20.10 peer against the session daemon: docker_cli("build", ...)."""
    return dockerd.cli


@pytest.fixture(scope="session")
def shell_image(dockerd):
    """Tag of a busybox image built from the host's busybox-static (nothing is pulled)."""
    return realpeers.build_shell_image(dockerd)
