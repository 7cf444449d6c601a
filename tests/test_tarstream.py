"""The legacy tarstream: a tar of the tree in 32 KiB messages, extracted safely."""

import io
import os
import tarfile

import pytest

from conformance.trees import diff_snapshots, snapshot
from reference.applier import TreeApplier
from reference.errors import ProtocolError, ValidationError
from reference.tarstream import MESSAGE_SIZE, TarReceiver, tar_messages
from reference.walker import read_chunks, walk


def _roundtrip(src, dst, split=None):
    msgs = list(tar_messages(walk(src), lambda p: read_chunks(os.path.join(src, p))))
    assert all(len(m) <= MESSAGE_SIZE for m in msgs)
    receiver = TarReceiver()
    applier = TreeApplier(dst)
    data = b"".join(msgs)
    pieces = [data[i : i + split] for i in range(0, len(data), split)] if split else msgs
    for piece in pieces:
        applier.apply_all(a for a in receiver.feed(piece))
    receiver.end()
    applier.finish()
    return msgs


@pytest.mark.parametrize("split", [None, 1, 511, 513, 100_000])
def test_roundtrip(tmp_path, split):
    src = tmp_path / "src"
    (src / "d" / "日本").mkdir(parents=True)
    (src / "d" / "日本" / "é.txt").write_bytes(b"x" * 70_000)
    (src / "a.b").write_bytes(b"")
    (src / ("n" * 150)).write_text("long name")
    os.symlink("../escape", src / "d" / "l")
    os.link(src / "a.b", src / "hard")
    os.mkfifo(src / "fifo")
    for p in walk(str(src)):
        os.utime(src / p.path, ns=(10**18, 10**18), follow_symlinks=False)
    os.utime(src / "d", ns=(10**18, 10**18))
    os.utime(src / "d" / "日本", ns=(10**18, 10**18))
    msgs = _roundtrip(str(src), str(tmp_path / "dst"), split)
    assert tarfile.open(fileobj=io.BytesIO(b"".join(msgs))).getnames()  # a real tar
    assert not diff_snapshots(snapshot(str(src)), snapshot(str(tmp_path / "dst")))


def _tar(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("name", ["../evil", "/abs", "a/../../b", ".", "a//b"])
def test_rejects_escaping_members(tmp_path, name):
    with pytest.raises(ValidationError):
        TarReceiver().feed(_tar([(name, b"x")]))


def test_truncated_stream_is_an_error():
    data = _tar([("a", b"x" * 2000)])
    r = TarReceiver()
    r.feed(data[:1200])
    with pytest.raises(ProtocolError, match="ended before"):
        r.end()


def test_missing_parents_are_created(tmp_path):
    r = TarReceiver()
    applier = TreeApplier(str(tmp_path / "dst"))
    applier.apply_all(r.feed(_tar([("x/y/z", b"data")])))
    applier.finish()
    assert (tmp_path / "dst" / "x" / "y" / "z").read_bytes() == b"data"


@pytest.mark.parametrize("compress", ["gzip", "bz2", "xz"])
def test_compressed_streams_are_accepted(tmp_path, compress):
    import bz2
    import gzip
    import lzma

    data = _tar([("d/f", b"x" * 5000), ("g", b"")])
    packed = {"gzip": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}[compress](data)
    r = TarReceiver()
    applier = TreeApplier(str(tmp_path / "dst"))
    for i in range(0, len(packed), 7):  # split everywhere, the magic bytes included
        applier.apply_all(r.feed(packed[i : i + 7]))
    applier.apply_all(r.end())
    applier.finish()
    assert (tmp_path / "dst" / "d" / "f").read_bytes() == b"x" * 5000


def test_corrupt_compressed_stream_is_a_clear_error():
    with pytest.raises(ProtocolError, match="bad compressed"):
        TarReceiver().feed(b"\x1f\x8b\x08\x00garbage-garbage-garbage")
