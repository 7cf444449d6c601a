"""Hostile and extreme input to the file-sync core and the transports (issue 15).

Depth: nothing recurses on a depth the peer controls (applier, walker,
listing, removal, COPY, pattern matching).  Length: a path longer than the
limit is refused before anything is written, and a tree below a root long
enough to push host paths past PATH_MAX still walks.  Size: a gRPC message
over the receive limit fails its call at its prefix.  Entries and bytes:
refused at the STAT that goes over.  Every limit error names the limit and
the path.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from reference import diffcopy as dc
from reference.applier import TreeApplier, disk_limits, remove_tree
from reference.daemon.fsops import Copier
from reference.daemon.listing import TreeListing
from reference.inmemory import sync_directories
from reference.paths import DEFAULT_LIMITS, PATH_MAX, LimitExceeded, ReceiveLimits
from reference.pb.fsutil_types_pb2 import Stat
from reference.transport.base import RpcError, StatusCode
from reference.walker import list_diff_base, open_chunks, open_long, walk

DIR = dc.filemode.MODE_DIR | 0o755
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def make_chain(root: str, depth: int, name: str = "a", leaf: bytes = b"bottom\n") -> str:
    """``depth`` nested directories ``name`` below ``root`` (made relative to directory fds, as
    the host path soon passes PATH_MAX) with a file ``f`` at the bottom; returns the file's path."""
    fd = os.open(root, _DIR_FLAGS)
    try:
        for _ in range(depth):
            os.mkdir(name, 0o755, dir_fd=fd)
            inner = os.open(name, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = inner
        file_fd = os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(file_fd, leaf)
        os.close(file_fd)
    finally:
        os.close(fd)
    return "/".join([name] * depth + ["f"])


@pytest.fixture
def scratch(tmp_path):
    """A directory removed with remove_tree afterwards (pytest's own cleanup recurses)."""
    path = str(tmp_path / "scratch")
    os.mkdir(path)
    yield path
    remove_tree(path)


def stats_of(root: str) -> list[tuple]:
    return [(s.path, s.mode, s.size, s.modTime, s.linkname) for s in walk(root, with_xattrs=False)]


# -- depth ------------------------------------------------------------------------------------

def test_a_2000_deep_tree_syncs_resyncs_lists_copies_and_is_removed(scratch):
    """Within the default limits (a 3,999-byte path) yet twice Python's recursion limit; the
    source's host paths are longer than PATH_MAX. Failed before: RecursionError in the applier,
    ``File name too long`` in the walker."""
    src, dst = os.path.join(scratch, "src"), os.path.join(scratch, "dst")
    os.mkdir(src)
    leaf = make_chain(src, 2000)
    result = sync_directories(src, dst)
    assert result.requested == [leaf]
    assert stats_of(dst) == stats_of(src) and len(stats_of(src)) == 2001
    assert b"".join(open_chunks(os.path.join(dst, leaf))) == b"bottom\n"
    assert sync_directories(src, dst).requested == []  # unchanged: diffed against a walk of the deep tree
    assert len(list_diff_base(dst)) == 2001 and len(TreeListing.of(dst).stats) == 2001
    rootfs = os.path.join(scratch, "rootfs")
    os.mkdir(rootfs)
    copier = Copier(dst, rootfs, None)
    try:
        copier.copy(["a"], "/a", "/")
    except OSError as exc:  # COPY works with host paths: beyond PATH_MAX it fails cleanly
        assert exc.errno == 36
    remove_tree(dst)
    remove_tree(src)
    assert not os.path.exists(dst) and not os.path.exists(src)


def test_remove_tree_takes_any_depth_with_two_descriptors(scratch):
    make_chain(scratch, 10_000, name="d")
    before = len(os.listdir("/proc/self/fd"))
    remove_tree(os.path.join(scratch, "d"))
    assert os.listdir(scratch) == [] and len(os.listdir("/proc/self/fd")) == before


def test_copy_of_a_deep_context_does_not_recurse(scratch):
    context, rootfs = os.path.join(scratch, "ctx"), os.path.join(scratch, "rootfs")
    os.mkdir(context)
    os.mkdir(rootfs)
    make_chain(context, 1500, name="c")  # host paths stay within PATH_MAX
    copier = Copier(context, rootfs, None)
    copier.copy(["."], "/", "/")
    assert stats_of(rootfs) == stats_of(context)


def chain_packets(depth: int, name: str = "a"):
    path = ""
    for _ in range(depth):
        path = f"{path}/{name}" if path else name
        yield dc.stat_packet(Stat(path=path, mode=DIR, modTime=1))


def test_a_listing_deeper_than_max_depth_fails_at_that_entry_naming_limit_and_path(scratch):
    """10,000 levels: refused at level 2,049, before anything of it is written.
    Failed before: accepted (and the applier then recursed)."""
    receiver = dc.DiffCopyReceiver()
    applier = TreeApplier(scratch)
    applied = 0
    started = time.monotonic()
    with pytest.raises(LimitExceeded) as raised:
        for packet in chain_packets(10_000):
            for action in receiver.receive(packet):
                applier.apply(action)
                applied += 1
    applier.abort()
    assert time.monotonic() - started < 10
    assert applied == DEFAULT_LIMITS.max_depth == 2048
    assert raised.value.limit == "max_depth" and raised.value.value == 2049
    assert "max_depth=2048" in str(raised.value) and "a/a/a" in str(raised.value)
    depth, fd = 0, os.open(scratch, _DIR_FLAGS)
    while True:
        try:
            inner = os.open("a", _DIR_FLAGS, dir_fd=fd)
        except FileNotFoundError:
            break
        os.close(fd)
        fd, depth = inner, depth + 1
    os.close(fd)
    assert depth == 2048


def test_configured_depth_limit(scratch):
    receiver = dc.DiffCopyReceiver(limits=ReceiveLimits(max_depth=3))
    packets = list(chain_packets(4))
    for packet in packets[:3]:
        receiver.receive(packet)
    with pytest.raises(LimitExceeded, match=r"'a/a/a/a' is over the receiver's limit max_depth=3 \(4\)"):
        receiver.receive(packets[3])


# -- length -----------------------------------------------------------------------------------

def test_a_path_longer_than_path_max_is_refused_before_writing(scratch):
    """An 8 KB path (32 components of 255 bytes). Failed before: written into the tree,
    which the walker then could not list."""
    parts = ["x" * 254 + str(i % 10) for i in range(32)]
    receiver = dc.DiffCopyReceiver()
    applier = TreeApplier(scratch)
    with pytest.raises(LimitExceeded) as raised:
        for depth in range(1, 33):
            for action in receiver.receive(dc.stat_packet(Stat(path="/".join(parts[:depth]), mode=DIR))):
                applier.apply(action)
    applier.abort()
    assert raised.value.limit == "max_path_length" and raised.value.maximum == PATH_MAX - 1
    assert raised.value.value == 16 * 256 - 1 + 256  # the first path over 4095 bytes: 17 components
    assert "max_path_length=4095" in str(raised.value) and "bytes]" in str(raised.value)
    assert len(stats_of(scratch)) == 16  # 16 * 256 - 1 = 4095 bytes fit; nothing of the 17th


def test_path_length_counts_bytes_not_characters():
    receiver = dc.DiffCopyReceiver(limits=ReceiveLimits(max_path_length=10))
    receiver.receive(dc.stat_packet(Stat(path="aaaaaaaaaa", mode=0o644)))  # 10 bytes
    with pytest.raises(LimitExceeded, match="max_path_length=10 \\(12\\)"):
        receiver.receive(dc.stat_packet(Stat(path="b\u00e9\u00e9\u00e9\u00e9\u00e9x", mode=0o644)))


def test_a_tree_below_a_long_root_walks_lists_and_reads(scratch):
    """Relative paths of 4,000 bytes (fine for the peer) under a root: host paths beyond PATH_MAX.
    Failed before: ``cannot list ... File name too long``."""
    name = "n" * 203
    rel = make_chain(scratch, 20, name=name, leaf=b"far down\n")  # 4,081 bytes: within max_path_length
    os.symlink("target-of-a-long-link", os.path.join(scratch, "short-link"))
    assert len(os.fsencode(os.path.join(scratch, rel))) >= PATH_MAX
    bottom = open_long(os.path.dirname(os.path.join(scratch, rel)), _DIR_FLAGS)
    os.symlink("deep-target", "l", dir_fd=bottom)  # read back by readlink through its parent
    os.close(bottom)
    listed = stats_of(scratch)
    assert [p for p, *_ in listed][-3:] == [rel, rel[:-1] + "l", "short-link"] and len(listed) == 23
    assert listed[-2][-1] == "deep-target"
    assert len(list_diff_base(scratch)) == 23
    assert b"".join(open_chunks(os.path.join(scratch, rel))) == b"far down\n"


# -- entries and bytes --------------------------------------------------------------------------

def test_entry_limit_names_the_limit_and_the_entry():
    receiver = dc.DiffCopyReceiver(limits=ReceiveLimits(max_entries=3))
    for name in ("a", "b", "c"):
        receiver.receive(dc.stat_packet(Stat(path=name, mode=0o644)))
    with pytest.raises(LimitExceeded, match=r"too many entries: 'd' is over the receiver's limit max_entries=3"):
        receiver.receive(dc.stat_packet(Stat(path="d", mode=0o644)))


def test_byte_limit_counts_declared_sizes_then_data_beyond_them():
    receiver = dc.DiffCopyReceiver(limits=ReceiveLimits(max_transfer_bytes=100))
    actions = receiver.receive(dc.stat_packet(Stat(path="a", mode=0o644, size=60)))
    assert any(isinstance(a, dc.SendPacket) for a in actions)
    with pytest.raises(LimitExceeded, match="transfer too large: 'b' .* max_transfer_bytes=100 \\(120\\)"):
        receiver.receive(dc.stat_packet(Stat(path="b", mode=0o644, size=60)))
    grown = dc.DiffCopyReceiver(limits=ReceiveLimits(max_transfer_bytes=100))
    grown.receive(dc.stat_packet(Stat(path="a", mode=0o644, size=10)))
    grown.receive(dc.end_of_listing())
    grown.receive(dc.data_packet(0, b"x" * 100))
    with pytest.raises(LimitExceeded, match="'a' .* max_transfer_bytes=100 \\(101\\)"):
        grown.receive(dc.data_packet(0, b"y"))  # a file that grew while it was sent


def test_disk_limits_take_the_free_space(tmp_path):
    fs = os.statvfs(tmp_path)
    free = fs.f_bavail * fs.f_frsize
    assert disk_limits(str(tmp_path), DEFAULT_LIMITS, 1 << 20).max_transfer_bytes == max(0, free - (1 << 20))
    assert disk_limits(str(tmp_path), ReceiveLimits(max_transfer_bytes=5), 0).max_transfer_bytes == 5


def test_tar_receiver_has_the_same_limits():
    import io
    import tarfile

    from reference.tarstream import TarReceiver

    def tar_of(*names):
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name in names:
                tar.addfile(tarfile.TarInfo(name), io.BytesIO(b""))
        return out.getvalue()

    with pytest.raises(LimitExceeded, match="max_path_length"):
        TarReceiver().feed(tar_of("x" * 5000))
    with pytest.raises(LimitExceeded, match="max_depth=2"):
        TarReceiver(ReceiveLimits(max_depth=2)).feed(tar_of("a/b/c"))
    with pytest.raises(LimitExceeded, match="max_entries=1"):
        TarReceiver(ReceiveLimits(max_entries=1)).feed(tar_of("a", "b"))


# -- pattern matching -------------------------------------------------------------------------

def test_deeply_nested_patterns_are_refused_like_go_not_by_recursion():
    """Go 1.19.2+ refuses a regexp nesting more than 1000 deep; one nesting 900 deep works.
    Failed before: RecursionError (Python's re, and our renderer)."""
    from reference.patterns import PatternError, PatternMatcher

    assert PatternMatcher(["(" * 900 + "a" + ")" * 900]).matches("a")
    with pytest.raises(PatternError, match="expression nests too deeply"):
        PatternMatcher(["(" * 5000 + "a" + ")" * 5000]).matches("a")


def test_include_filter_on_a_deep_path_does_not_recurse():
    from reference.pathfilter import PathFilter

    deep = "/".join(["d"] * 5000)
    decision = PathFilter(include_patterns=["d"]).decide(deep + "/f", False)
    assert decision.include


# -- message size -------------------------------------------------------------------------------

def _pair(server_kind: str, client_kind: str, handlers, **limits):
    from reference.transport import grpcio_pump, h2grpc

    a, b = socket.socketpair()
    serve = h2grpc.serve_h2 if server_kind == "h2" else grpcio_pump.serve_grpcio
    connect = h2grpc.connect_h2 if client_kind == "h2" else grpcio_pump.connect_grpcio
    server = serve(a, handlers, b"", **limits.get("server", {}))
    client = connect(b, b"", **limits.get("client", {}))
    return server, client


@pytest.mark.parametrize("server_kind, client_kind", [("h2", "h2"), ("h2", "grpcio"), ("grpcio", "h2")])
def test_a_message_over_4_mib_fails_the_call_as_resource_exhausted(server_kind, client_kind):
    """grpc-go's default on both sides. Failed before: 5 MiB, 256 MiB, 1 GiB all accepted."""
    seen: dict = {}

    def upload(stream):
        sizes = []
        try:
            while (message := stream.recv()) is not None:
                sizes.append(len(message))
        except RpcError as exc:
            seen["server"] = exc
        seen["sizes"] = sizes

    def download(stream):
        stream.recv()
        stream.send(b"d" * (4 << 20))  # exactly the limit: delivered
        stream.send(b"e" * ((4 << 20) + 1))

    server, client = _pair(server_kind, client_kind, {"/t/Up": upload, "/t/Down": download})
    try:
        stream = client.open_stream("/t/Up")
        stream.send(b"a" * 100)
        stream.send(b"b" * (4 << 20))
        sender_error = None
        try:
            stream.send_many([b"c" * (64 << 20)])  # refused at its prefix: the rest need not arrive
            stream.close_send()
        except RpcError as exc:
            sender_error = exc
        try:
            while stream.recv(10) is not None:
                pass
            status = None
        except RpcError as exc:
            status = exc
        deadline = time.monotonic() + 10
        while "sizes" not in seen and time.monotonic() < deadline:
            time.sleep(0.01)
        assert seen["sizes"] == [100, 4 << 20]
        ended = status or sender_error
        if server_kind == "h2":
            assert seen["server"].code == StatusCode.RESOURCE_EXHAUSTED
            assert "larger than max (67108864 vs. 4194304)" in seen["server"].details
        else:  # grpcio ends the handler's call (its recv ends or is cancelled) and tells the client
            assert seen.get("server") is None or seen["server"].code in (StatusCode.CANCELLED,
                                                                          StatusCode.RESOURCE_EXHAUSTED)
            assert ended.code == StatusCode.RESOURCE_EXHAUSTED and "larger than max" in ended.details
        assert ended.code in (StatusCode.RESOURCE_EXHAUSTED, StatusCode.CANCELLED)
        down = client.open_stream("/t/Down")
        down.send(b"go")
        down.close_send()
        assert len(down.recv(10)) == 4 << 20
        with pytest.raises(RpcError) as raised:
            down.recv(10)
        assert raised.value.code == StatusCode.RESOURCE_EXHAUSTED
        assert "4194305 vs. 4194304" in raised.value.details
    finally:
        client.close()
        server.close()


def test_the_receive_limit_is_configurable():
    got = threading.Event()

    def upload(stream):
        try:
            stream.recv()
        except RpcError as exc:
            got.exc = exc
        got.set()

    server, client = _pair("h2", "h2", {"/t/Up": upload}, server={"max_receive_message": 1000})
    try:
        stream = client.open_stream("/t/Up")
        stream.send(b"x" * 1001)
        stream.flush()
        assert got.wait(10) and got.exc.code == StatusCode.RESOURCE_EXHAUSTED
        assert "1001 vs. 1000" in got.exc.details
    finally:
        client.close()
        server.close()
