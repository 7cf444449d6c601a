"""File names are bytes, as the Go peers treat them (issue 15, defect 4).

upb refuses a proto3 string that is not UTF-8 both when parsing and when
setting it; fsutil's gogo types never check.  A name that is not UTF-8 is a
``NameStat`` in memory (undecodable bytes escaped as ``os.fsdecode`` does) and
crosses the wire byte for byte, in the listing's byte order.
"""

from __future__ import annotations

import io
import os
import tarfile

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from reference import diffcopy as dc
from reference.applier import TreeApplier
from reference.inmemory import sync_directories
from reference.paths import ListingValidator, path_sort_key
from reference.pb.fsutil_types_pb2 import Packet, Stat
from reference.tarstream import TarReceiver, tar_messages
from reference.walker import list_diff_base, walk

CAFE = b"caf\xe9.txt"  # Latin-1, as an old editor on a Linux box would write it


def names(root: str) -> set[bytes]:
    found = set()
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        rel = os.path.relpath(dirpath, os.fsencode(root))
        for name in dirnames + filenames:
            found.add(name if rel == b"." else rel + b"/" + name)
    return found


@pytest.fixture
def tree(tmp_path):
    root = os.fsencode(tmp_path / "src")
    os.mkdir(root)
    with open(os.path.join(root, CAFE), "wb") as fh:
        fh.write(b"caf\xc3\xa9\n")
    os.mkdir(os.path.join(root, b"dir\xff"))
    with open(os.path.join(root, b"dir\xff", b"in\x80side"), "wb") as fh:
        fh.write(b"x" * 70_000)
    os.symlink(b"target\xfe", os.path.join(root, b"link"))
    os.link(os.path.join(root, CAFE), os.path.join(root, b"z-hard"))
    with open(os.path.join(root, "ア".encode()), "wb") as fh:  # valid UTF-8 beside the invalid ones
        fh.write(b"a")
    return os.fsdecode(root)


# -- the wire ----------------------------------------------------------------------------------

def test_a_packet_with_a_latin1_path_decodes_instead_of_failing():
    """Failed before: ``invalid packet from the client: not a fsutil Packet``."""
    raw = Packet(stat=Stat(path="cafe.txt", mode=0o644, size=5)).SerializeToString().replace(b"cafe", b"caf\xe9")
    with pytest.raises(DecodeError):
        Packet.FromString(raw)  # what upb does
    packet = dc.decode_packet(raw)
    assert isinstance(packet, dc.NamePacket) and packet.HasField("stat")
    assert packet.stat.path == "caf\udce9.txt" and os.fsencode(packet.stat.path) == CAFE
    assert packet.SerializeToString() == raw
    assert dc.describe(packet).startswith("STAT 'caf\\udce9.txt'")


def test_garbage_is_still_not_a_packet():
    for raw in (b"\xff\xff", b"\x12\x05ab", b"\x0b"):
        with pytest.raises(DecodeError):
            dc.decode_packet(raw)


def test_utf8_names_keep_the_fast_messages():
    assert type(dc.new_stat(path="é/ア")) is Stat
    assert type(dc.new_stat(path="caf\udce9")) is dc.NameStat
    assert type(dc.decode_packet(Packet(stat=Stat(path="é")).SerializeToString())) is Packet


names_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=8)
scalars = dict(mode=st.integers(0, 2**32 - 1), uid=st.integers(0, 2**32 - 1), gid=st.integers(0, 2**32 - 1),
               size=st.integers(-2**63, 2**63 - 1), modTime=st.integers(-2**63, 2**63 - 1),
               devmajor=st.integers(-2**63, 2**63 - 1), devminor=st.integers(-2**63, 2**63 - 1))


@settings(max_examples=300, deadline=None)
@given(path=names_text, linkname=names_text, xattrs=st.dictionaries(names_text, st.binary(max_size=4), max_size=3),
       packet_type=st.sampled_from([0, 1, 2, 3, 4]), file_id=st.integers(0, 2**32 - 1), data=st.binary(max_size=8),
       **scalars)
def test_the_byte_name_codec_is_wire_identical_to_upb(path, linkname, xattrs, packet_type, file_id, data, **fields):
    stat = Stat(path=path, linkname=linkname, **fields)
    stat.xattrs.update(xattrs)
    ours = dc.NameStat(path=path, linkname=linkname, xattrs=xattrs, **fields)
    encoded = ours.SerializeToString()
    assert Stat.FromString(encoded) == stat
    if len(xattrs) <= 1:  # (map entries may come in another order: upb sorts a key's prefix after it)
        assert encoded == stat.SerializeToString(deterministic=True)
    packet = Packet(type=packet_type, stat=stat, ID=file_id, data=data)
    raw = packet.SerializeToString()
    decoded = dc.decode_name_packet(raw)
    assert decoded.stat == stat and Packet.FromString(decoded.SerializeToString()) == packet
    assert (decoded.type, decoded.ID, decoded.data) == (packet_type, file_id, data)


# -- the sender's walk ---------------------------------------------------------------------------

def test_the_walk_sends_names_byte_for_byte_in_byte_order(tree):
    """Failed before: ``WalkError: file name is not valid UTF-8``."""
    stats = list(walk(tree))
    paths = [os.fsencode(s.path) for s in stats]
    assert paths == sorted(paths, key=lambda p: p.replace(b"/", b"\0"))  # fsutil's ComparePath on bytes
    assert paths == [CAFE, b"dir\xff", b"dir\xff/in\x80side", b"link", b"z-hard", "ア".encode()]
    by_path = {os.fsencode(s.path): s for s in stats}
    assert type(by_path[CAFE]) is dc.NameStat and type(by_path["ア".encode()]) is Stat
    assert os.fsencode(by_path[b"link"].linkname) == b"target\xfe"
    assert os.fsencode(by_path[b"z-hard"].linkname) == CAFE  # a hardlink naming a non-UTF-8 first name
    wire = b"".join(dc.stat_packet(s).SerializeToString() for s in stats)
    assert CAFE in wire and b"target\xfe" in wire
    # as packets too (the client's path), with the same order
    assert [os.fsencode(p) for _, p, _ in walk(tree, as_packets=True)] == paths


def test_the_receivers_validator_orders_by_bytes():
    """A lone byte 0x80 sorts before "ア" (E3 82 A2) for Go, after it by code point."""
    listing = ["a", "caf\udce9", "\udc80", "\u30a2"]
    assert sorted(reversed(listing), key=path_sort_key) == listing
    assert [os.fsencode(p) for p in listing] == sorted(os.fsencode(p) for p in listing)
    validator = ListingValidator()
    for path in listing:
        validator.check(path, False, False, "")
    backwards = ListingValidator()
    backwards.check("\u30a2", False, False, "")
    with pytest.raises(dc.ValidationError, match="out of order"):
        backwards.check("\udc80", False, False, "")


def test_a_tree_with_such_names_syncs_exactly_and_then_requests_nothing(tree, tmp_path):
    dst = str(tmp_path / "dst")
    first = sync_directories(tree, dst)
    assert names(dst) == names(tree)
    assert open(os.path.join(os.fsencode(dst), CAFE), "rb").read() == b"caf\xc3\xa9\n"
    assert os.readlink(os.path.join(os.fsencode(dst), b"link")) == b"target\xfe"
    assert os.stat(os.path.join(os.fsencode(dst), b"z-hard")).st_ino == os.stat(
        os.path.join(os.fsencode(dst), CAFE)).st_ino
    assert len(first.requested) == 3
    assert sync_directories(tree, dst).requested == []  # the diff base (our own walk) matches
    assert [e[1][0] for e in list_diff_base(dst)] == [s.path for s in walk(tree)]


def test_an_export_receiver_takes_such_names(tree, tmp_path):
    dst = str(tmp_path / "export")
    os.mkdir(dst)
    sync_directories(tree, dst, merge=True)
    assert names(dst) == names(tree)


def test_tarstream_carries_such_names_both_ways(tree, tmp_path):
    stats = list(walk(tree))
    data = b"".join(tar_messages(stats, lambda p: [open(os.path.join(tree, p), "rb").read()]))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:  # a reader that knows pax hdrcharset=BINARY
        assert {os.fsencode(m.name.rstrip("/")) for m in tar} == names(tree)
    dst = str(tmp_path / "untar")
    receiver, applier = TarReceiver(), TreeApplier(dst)
    for start in range(0, len(data), 32 << 10):
        for action in receiver.feed(data[start:start + (32 << 10)]):
            applier.apply(action)
    for action in receiver.end():
        applier.apply(action)
    applier.finish()
    assert names(dst) == names(tree)
