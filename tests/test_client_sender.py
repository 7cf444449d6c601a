"""The reference client as fsutil sender: how it answers REQs on FileSync/DiffCopy.

fsutil's sender serves requested files with four workers, so the DATA of up to
four files interleave; the client does the same in one thread, one chunk of
each open file per round.
"""

from __future__ import annotations

import collections
import os

import pytest

from reference import diffcopy as dc
from reference.client.services import FILES_IN_FLIGHT, StreamStats, send_tree
from reference.pb.fsutil_types_pb2 import Packet
from reference.transport.base import RpcError, RpcStream

CHUNK = 1024


class ScriptedReceiver(RpcStream):
    """Plays the daemon's receiver: REQs every regular file once the listing ends, FIN after the last EOF."""

    method = "/moby.filesync.v1.FileSync/DiffCopy"
    metadata: list = []

    def __init__(self, fin_early: bool = False):
        self.sent: list[Packet] = []
        self.inbox: collections.deque[bytes] = collections.deque()
        self.ids: dict[int, str] = {}
        self.next_id = 0
        self.open_files: set[int] = set()
        self.max_open = 0
        self.fin_early = fin_early

    def send(self, message: bytes) -> None:
        packet = Packet.FromString(message)
        self.sent.append(packet)
        if packet.type == dc.PACKET_STAT:
            if packet.HasField("stat"):
                if not packet.stat.mode & 0xFFF00000 and not packet.stat.linkname:  # regular, not a hardlink
                    self.ids[self.next_id] = packet.stat.path
                self.next_id += 1
            else:  # end of the listing: ask for everything at once, as dockerd's diff does on a cold sync
                for file_id in self.ids:
                    self.inbox.append(Packet(type=dc.PACKET_REQ, ID=file_id).SerializeToString())
                if self.fin_early:
                    self.inbox.append(Packet(type=dc.PACKET_FIN).SerializeToString())
        elif packet.type == dc.PACKET_DATA:
            if packet.data:
                self.open_files.add(packet.ID)
                self.max_open = max(self.max_open, len(self.open_files))
            else:
                self.open_files.discard(packet.ID)

    def flush(self) -> None:
        pass

    def close_send(self) -> None:
        pass

    def cancel(self) -> None:
        pass

    def recv(self, timeout: float | None = None) -> bytes | None:
        if self.inbox:
            return self.inbox.popleft()
        if timeout is not None:
            raise TimeoutError("nothing queued")
        eofs = sum(1 for p in self.sent if p.type == dc.PACKET_DATA and not p.data)
        assert eofs == len(self.ids), "the sender waits for a packet while files are unfinished"
        return Packet(type=dc.PACKET_FIN).SerializeToString()


def _tree(tmp_path, sizes: dict[str, int]) -> str:
    root = tmp_path / "ctx"
    root.mkdir()
    for name, size in sizes.items():
        (root / name).write_bytes(bytes((i * 7 + len(name)) % 251 for i in range(size)))
    return str(root)


def test_data_of_several_files_interleave_bounded_like_fsutil(tmp_path):
    sizes = {f"f{i}": CHUNK * 5 + i for i in range(7)} | {"empty": 0}
    root = _tree(tmp_path, sizes)
    stream = ScriptedReceiver()
    record = StreamStats(stream.method)
    send_tree(stream, root, None, None, record, CHUNK)

    data = [p for p in stream.sent if p.type == dc.PACKET_DATA]
    spans = {}  # file id -> (first, last) index among DATA packets
    for i, p in enumerate(data):
        spans[p.ID] = (spans.get(p.ID, (i, i))[0], i)
    assert any(a[0] < b[0] < a[1] for a in spans.values() for b in spans.values()), \
        "DATA of different files should interleave"
    assert stream.max_open == FILES_IN_FLIGHT == 4
    received: dict[int, bytes] = collections.defaultdict(bytes)
    for p in data:
        received[p.ID] += p.data
    for file_id, path in stream.ids.items():
        with open(os.path.join(root, path), "rb") as fh:
            assert received[file_id] == fh.read(), path
    assert stream.sent[-1].type == dc.PACKET_FIN
    assert record.reqs_received == record.files_sent == len(sizes)
    assert record.bytes_sent == sum(sizes.values())


def test_fin_while_files_are_requested_is_answered_at_once(tmp_path):
    """fsutil's sender replies FIN and returns whatever is still queued."""
    root = _tree(tmp_path, {"a": CHUNK * 3, "b": CHUNK})
    stream = ScriptedReceiver(fin_early=True)
    send_tree(stream, root, None, None, StreamStats(stream.method), CHUNK)
    assert stream.sent[-1].type == dc.PACKET_FIN
    assert not [p for p in stream.sent if p.type == dc.PACKET_DATA]


def test_unreadable_requested_file_sends_err(tmp_path):
    root = _tree(tmp_path, {"a": 10, "b": 10})
    stream = ScriptedReceiver()
    original_send = stream.send

    def send(message: bytes) -> None:
        original_send(message)
        packet = Packet.FromString(message)
        if packet.type == dc.PACKET_STAT and not packet.HasField("stat"):
            os.unlink(os.path.join(root, "b"))  # vanishes between listing and REQ

    stream.send = send
    with pytest.raises(RpcError, match="cannot read 'b'"):
        send_tree(stream, root, None, None, StreamStats(stream.method), CHUNK)
    assert stream.sent[-1].type == dc.PACKET_ERR
