"""conformance.identify: implementations named from what they report, and the families that select
SPEC.md's known deviations."""

import pytest

from conformance.identify import (
    families_of, family_of, identify_client_from_requests, identify_client_from_version,
)


@pytest.mark.parametrize("implementation, families", [
    ("dockerd 20.10.24+dfsg1", ["dockerd 20.10"]),
    ("dockerd 26.1.5+dfsg1", ["dockerd 26.1"]),
    ("docker CLI 26.1.5+dfsg1 + buildx 0.13.1+ds1", ["buildx 0.13", "docker CLI 26.1"]),
    ("reference-daemon 0.1.0 (n+1) via grpcio", ["reference-daemon 0.1 via grpcio"]),
    ("unknown client", []),
])
def test_families(implementation, families):
    assert families_of(implementation) == families
    assert family_of(implementation) == (families[-1] if families else None)


def test_clients_named_by_their_requests():
    cli = identify_client_from_requests([("HEAD", "/_ping", "Docker-Client/20.10.24+dfsg1 (linux)"),
                                         ("POST", "/v1.41/build", "Docker-Client/20.10.24+dfsg1 (linux)"),
                                         ("POST", "/session", "Docker-Client/20.10.24+dfsg1 (linux)")])
    assert (cli.implementation, cli.family, cli.generation) == ("docker CLI 20.10.24+dfsg1", "docker CLI 20.10", "n")
    # buildx reports no version of its own (Debian's build) and dials /grpc: only the entry point dates it.
    buildx = identify_client_from_requests([("HEAD", "/_ping", "Docker-Client/26.1.5+dfsg1 (linux)"),
                                            ("HEAD", "/_ping", "Go-http-client/1.1"),
                                            ("POST", "/grpc", "Docker-Client/unknown-version (linux)")])
    assert buildx.generation == "n+1" and buildx.implementation.startswith("buildx")
    ours = identify_client_from_requests([("POST", "/session", "docker-session-reference/0.1")])
    assert ours.implementation == "reference-client 0.1"
    assert identify_client_from_requests([]).implementation == "unknown client"


def test_clients_named_by_their_version_report():
    both = identify_client_from_version("Docker version 26.1.5+dfsg1, build a72d7cd; buildx 0.13.1+ds1", "n+1")
    assert both.implementation == "docker CLI 26.1.5+dfsg1 + buildx 0.13.1+ds1" and both.generation == "n+1"
    old = identify_client_from_version("Docker version 20.10.24+dfsg1, build 297e128", None)
    assert (old.implementation, old.generation) == ("docker CLI 20.10.24+dfsg1", "n")


def test_a_known_deviation_applies_to_the_family_it_names_and_not_to_a_longer_one():
    from conformance.plugin import _names_family

    assert _names_family("dockerd 20.10.24 (by source reading) accepts the request", "dockerd 20.10")
    assert _names_family("reference-daemon 0.1 via grpcio cannot send", "reference-daemon 0.1 via grpcio")
    assert not _names_family("reference-daemon 0.1 via grpcio cannot send", "reference-daemon 0.1")
    assert not _names_family("buildx 0.13.1 reports only", "buildx 0.1")
