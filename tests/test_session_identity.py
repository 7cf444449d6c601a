"""reference.session: the Name and Sharedkey headers of each generation, and how they go on the wire."""

import hashlib
import re

import pytest

from reference import session
from reference.session import SessionRequest, go_base, session_identity


@pytest.fixture
def node_id(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "config"))
    return session.build_node_id()


@pytest.mark.parametrize("path, base", [("/a/b", "b"), ("/a/b/", "b"), ("/", "/"), ("//", "/"), ("", "."),
                                        ("b", "b"), ("/a/日本", "日本")])
def test_go_base_is_filepath_base(path, base):
    assert go_base(path) == base


@pytest.mark.parametrize("generation", ["n-1", "n"])
def test_generation_n_is_the_docker_cli_20_10_style(node_id, generation):
    name, key = session_identity("/work/ctx", generation)
    assert name == "ctx"
    assert key == hashlib.sha256(f"{node_id}:/work/ctx".encode()).hexdigest()


def test_generation_n_plus_1_has_buildx_shape_but_follows_the_directory(node_id, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name, key = session_identity("/one/app", "n+1")
    assert name == tmp_path.name  # buildx (BuildKit's client) names the session after the working directory
    assert re.fullmatch(r"app:[0-9a-f]{16}", key)
    assert key == session_identity("/one/app", "n+1")[1]  # stable across runs
    # buildx would send "app:<node id>" for both: the same base name must not give the same key (HANDSHAKE-3)
    assert session_identity("/two/app", "n+1")[1] != key
    assert key.split(":")[1] == hashlib.sha256(f"{node_id}:/one/app".encode()).hexdigest()[:16]


def test_non_ascii_header_values_go_out_as_utf_8_bytes(node_id):
    name, key = session_identity("/work/日本", "n")
    headers = dict(SessionRequest("x" * 25, name, key, []).headers())
    assert headers[session.HEADER_NAME] == "日本".encode()
    assert headers[session.HEADER_SHARED_KEY] == key  # hex stays a str
