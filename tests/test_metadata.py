"""reference.metadata: the per-key escaping of file-sync metadata, with vectors seen on the wire from
dockerd 26.1.5 (values as the daemon sent them for a .dockerignore, a -f name and COPY sources)."""

import pytest

from reference import metadata

# (values as written, values dockerd 26.1 sent for that key when one of them was non-ASCII)
WIRE = [
    (["日本/*", "x y", "c+d", "e%41"], ["%E6%97%A5%E6%9C%AC%2F%2A", "x+y", "c%2Bd", "e%2541"]),
    (["*.log", "!keep.log", "日本/*", "!日本/keep.txt"],
     ["%2A.log", "%21keep.log", "%E6%97%A5%E6%9C%AC%2F%2A", "%21%E6%97%A5%E6%9C%AC%2Fkeep.txt"]),
    (["日本.Dockerfile", "日本.Dockerfile.dockerignore"],
     ["%E6%97%A5%E6%9C%AC.Dockerfile", "%E6%97%A5%E6%9C%AC.Dockerfile.dockerignore"]),
    (["b c", "日本"], ["b+c", "%E6%97%A5%E6%9C%AC"]),
    (["a.txt", "ünïcødé.txt"], ["a.txt", "%C3%BCn%C3%AFc%C3%B8d%C3%A9.txt"]),
]


@pytest.mark.parametrize("written, sent", WIRE)
def test_encode_matches_dockerd_26(written, sent):
    assert metadata.encode({"exclude-patterns": written}) == {"exclude-patterns": sent,
                                                              "exclude-patterns-encoded": ["1"]}


@pytest.mark.parametrize("written, sent", WIRE)
def test_decode_restores_what_was_written(written, sent):
    assert metadata.decode_values({"k": sent, "k-encoded": ["1"]}, "k") == written


def test_ascii_values_go_out_raw_even_with_escape_characters():
    values = ["a b", "c+d", "e%41", "f&g=h"]
    assert metadata.encode({"exclude-patterns": values}) == {"exclude-patterns": values}
    assert metadata.decode_values({"exclude-patterns": values}, "exclude-patterns") == values


def test_keys_are_encoded_independently():
    out = metadata.encode({"followpaths": ["日本"], "exclude-patterns": ["*.log"]})
    assert out == {"followpaths": ["%E6%97%A5%E6%9C%AC"], "followpaths-encoded": ["1"], "exclude-patterns": ["*.log"]}


@pytest.mark.parametrize("marker, decoded", [("1", True), ("true", True), ("T", True), ("0", False),
                                             ("false", False), ("yes", False), ("", False)])
def test_the_marker_is_a_go_bool(marker, decoded):
    values = metadata.decode_values({"k": ["%2A"], "k-encoded": [marker]}, "k")
    assert values == (["*"] if decoded else ["%2A"])


def test_a_malformed_escape_decodes_to_empty_as_buildkit_does():
    assert metadata.decode_values({"k": ["%zz", "%4", "ok%21"], "k-encoded": ["1"]}, "k") == ["", "", "ok!"]
