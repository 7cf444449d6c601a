"""The DiffCopy protocol (fsutil's send/receive) as two sans-IO state machines.

Roles are fsutil's, not gRPC's: the *sender* owns the files (the build client
for FileSync, the daemon for a local export over FileSend), the *receiver*
writes them.  Both machines take ``fsutil.types.Packet`` messages in and hand
back the packets to send and the actions to perform; they never touch a socket,
a thread or the filesystem.

Wire summary (protocol-notes section 4):
  sender   -> STAT* , end-of-listing (a Packet with no ``stat`` field)
  receiver -> REQ(id)    id = index of the STAT, counting every entry
  sender   -> DATA(id, chunk)* DATA(id, b"")     empty DATA ends the file
  receiver -> FIN   once every requested file has arrived
  sender   -> FIN   and the call ends
Either side may send ERR(text) instead.  DATA for different ids may interleave.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from . import filemode
from .errors import PeerError, ProtocolError, ValidationError
from .paths import ListingValidator, path_sort_key
from .pb.fsutil_types_pb2 import Packet, Stat

PACKET_STAT = Packet.PACKET_STAT
PACKET_REQ = Packet.PACKET_REQ
PACKET_DATA = Packet.PACKET_DATA
PACKET_FIN = Packet.PACKET_FIN
PACKET_ERR = Packet.PACKET_ERR

#: Largest DATA chunk a Go sender produces (fsutil's 32 KiB copy buffer).
GO_CHUNK_SIZE = 32 * 1024


def end_of_listing() -> Packet:
    """The terminator: a Packet without a ``stat`` field (an empty message)."""
    return Packet()


def stat_packet(stat: Stat) -> Packet:
    return Packet(type=PACKET_STAT, stat=stat)


def req_packet(file_id: int) -> Packet:
    return Packet(type=PACKET_REQ, ID=file_id)


def data_packet(file_id: int, chunk: bytes) -> Packet:
    return Packet(type=PACKET_DATA, ID=file_id, data=chunk)


def fin_packet() -> Packet:
    return Packet(type=PACKET_FIN)


def err_packet(message: str) -> Packet:
    return Packet(type=PACKET_ERR, data=message.encode("utf-8", "replace"))


def describe(packet: Packet) -> str:
    """One transcript line for a packet."""
    kind = packet.type
    if kind == PACKET_STAT:
        if not packet.HasField("stat"):
            return "STAT <end of listing>"
        s = packet.stat
        extra = f" -> {s.linkname}" if s.linkname else ""
        return f"STAT {s.path!r} mode={s.mode:#x} size={s.size} uid={s.uid} gid={s.gid}{extra}"
    if kind == PACKET_REQ:
        return f"REQ {packet.ID}"
    if kind == PACKET_DATA:
        return f"DATA {packet.ID} {len(packet.data)} bytes" if packet.data else f"DATA {packet.ID} <eof>"
    if kind == PACKET_FIN:
        return "FIN"
    if kind == PACKET_ERR:
        return f"ERR {packet.data.decode('utf-8', 'replace')!r}"
    return f"UNKNOWN type={kind}"


# ---------------------------------------------------------------------------
# Sender


@dataclass(slots=True)
class FileRequested:
    """The receiver asked for the contents of a listed regular file."""

    file_id: int
    path: str


@dataclass(slots=True)
class FinReceived:
    """The receiver is done; reply with :meth:`DiffCopySender.fin` and end the call.

    ``unfinished`` lists requested files whose data was not complete yet: a
    receiver that says FIN before that is broken (FIN too early).
    """

    unfinished: tuple[int, ...]


class SenderState(enum.Enum):
    LISTING = "listing"  # sending STATs
    SERVING = "serving"  # listing done, answering REQs
    DONE = "done"  # FIN exchanged, or failed


class DiffCopySender:
    """fsutil's sender: lists the tree, then serves REQs until the receiver's FIN."""

    def __init__(self) -> None:
        self.state = SenderState.LISTING
        self._next_id = 0
        self._requestable: dict[int, str] = {}  # listed regular files not yet requested
        self._in_flight: dict[int, str] = {}  # requested, EOF not yet sent

    @property
    def entries_listed(self) -> int:
        """STATs sent so far (the next entry's id)."""
        return self._next_id

    # -- outgoing ---------------------------------------------------------
    def stat(self, stat: Stat) -> Packet:
        if self.state is not SenderState.LISTING:
            raise ProtocolError(f"STAT {stat.path!r} after the end of the listing")
        if filemode.is_regular(stat.mode):
            self._requestable[self._next_id] = stat.path
        self._next_id += 1
        return stat_packet(stat)

    def end_listing(self) -> Packet:
        if self.state is not SenderState.LISTING:
            raise ProtocolError("end of listing sent twice")
        self.state = SenderState.SERVING
        return end_of_listing()

    def data(self, file_id: int, chunk: bytes) -> Packet:
        if file_id not in self._in_flight:
            raise ProtocolError(f"DATA for file {file_id}, which was not requested or is finished")
        if not chunk:
            raise ProtocolError("an empty DATA ends the file; use end_file()")
        return data_packet(file_id, chunk)

    def end_file(self, file_id: int) -> Packet:
        if self._in_flight.pop(file_id, None) is None:
            raise ProtocolError(f"end of file {file_id}, which was not requested or is finished")
        return data_packet(file_id, b"")

    def fin(self) -> Packet:
        self.state = SenderState.DONE
        return fin_packet()

    def error(self, message: str) -> Packet:
        self.state = SenderState.DONE
        return err_packet(message)

    # -- incoming ---------------------------------------------------------
    def receive(self, packet: Packet) -> FileRequested | FinReceived:
        kind = packet.type
        if self.state is SenderState.DONE:
            raise ProtocolError(f"{describe(packet)} after the transfer ended")
        if kind == PACKET_REQ:
            file_id = packet.ID
            path = self._requestable.pop(file_id, None)
            if path is None:
                if file_id in self._in_flight:
                    raise ProtocolError(f"duplicate REQ for file id {file_id}")
                if file_id >= self._next_id:
                    raise ProtocolError(f"REQ for file id {file_id}, which has not been listed")
                raise ProtocolError(f"REQ for file id {file_id}, which is not a regular file or was served already")
            self._in_flight[file_id] = path
            return FileRequested(file_id, path)
        if kind == PACKET_FIN:
            return FinReceived(tuple(self._in_flight))
        if kind == PACKET_ERR:
            self.state = SenderState.DONE
            raise PeerError("error from receiver: " + packet.data.decode("utf-8", "replace"))
        raise ProtocolError(f"unexpected packet from the receiver: {describe(packet)}")


# ---------------------------------------------------------------------------
# Receiver


class Change(enum.Enum):
    ADD = "add"
    MODIFY = "modify"


@dataclass(slots=True)
class PutEntry:
    """Create or replace ``path`` with the entry ``stat`` describes.

    For a regular file that needs data (``file_id`` is not None) the contents
    follow as :class:`FileData` and :class:`FileDone`; the applier must keep the
    previous version in place until then.
    """

    path: str
    stat: Stat
    change: Change
    file_id: int | None


@dataclass(slots=True)
class DeleteEntry:
    path: str


@dataclass(slots=True)
class FileData:
    file_id: int
    path: str
    chunk: bytes


@dataclass(slots=True)
class FileDone:
    file_id: int
    path: str


@dataclass(slots=True)
class ListingDone:
    """Every STAT has arrived and the diff is complete (all deletes were issued)."""


@dataclass(slots=True)
class SendPacket:
    packet: Packet


@dataclass(slots=True)
class TransferComplete:
    """FIN exchanged: the tree is complete once the applier has finished."""


ReceiverAction = PutEntry | DeleteEntry | FileData | FileDone | ListingDone | SendPacket | TransferComplete


class ReceiverState(enum.Enum):
    LISTING = "listing"
    RECEIVING = "receiving"  # listing done, files outstanding
    FIN_SENT = "fin-sent"
    DONE = "done"


def same_file(old: Stat, new: Stat) -> bool:
    """fsutil's sameFile: the fields whose change makes an entry 'modified'.

    Contents and xattrs are not compared; size and mtime count only for
    non-directories.
    """
    if not filemode.is_dir(new.mode) and (old.size != new.size or old.modTime != new.modTime):
        return False
    return (
        old.mode == new.mode
        and old.uid == new.uid
        and old.gid == new.gid
        and old.devmajor == new.devmajor
        and old.devminor == new.devminor
        and old.linkname == new.linkname
    )


def needs_data(stat: Stat) -> bool:
    """Only regular files that are not hardlinks carry contents."""
    return filemode.is_regular(stat.mode) and not stat.linkname


StatFilter = Callable[[Stat], Stat | None]

_KIND_BITS = (filemode.MODE_DIR, filemode.MODE_SYMLINK, filemode.MODE_NAMED_PIPE, filemode.MODE_DEVICE)
_NEVER_SENT = (0o7000 | 0o170000 | filemode.MODE_APPEND | filemode.MODE_EXCLUSIVE | filemode.MODE_TEMPORARY
               | filemode.MODE_IRREGULAR | filemode.MODE_SOCKET)


def check_mode(path: str, mode: int) -> None:
    """Reject a mode no Linux Go sender produces (Unix st_mode bits above all)."""
    if mode & _NEVER_SENT:
        raise ValidationError(f"mode {mode:#o} of {path!r} is not a Go os.FileMode a Linux sender sends "
                              f"(Unix st_mode bits?)")
    if mode & filemode.MODE_CHAR_DEVICE and not mode & filemode.MODE_DEVICE:
        raise ValidationError(f"mode {mode:#x} of {path!r}: ModeCharDevice without ModeDevice")
    if sum(1 for bit in _KIND_BITS if mode & bit) > 1:
        raise ValidationError(f"mode {mode:#x} of {path!r} names more than one file type")


class DiffCopyReceiver:
    """fsutil's receiver: validates the listing, diffs it, requests what changed.

    ``previous`` is the receiver's current tree as Stats in walk order (what a
    walk of the destination gives); it is the diff base.  With ``merge=True``
    (exports) there is no diff base: every entry is added, every regular file
    requested, nothing deleted.  ``stat_filter`` may rewrite an incoming Stat
    (for example the uid/gid of an export) before it is compared, or drop it by
    returning None.
    """

    def __init__(
        self,
        previous: Iterable[Stat] = (),
        *,
        merge: bool = False,
        stat_filter: StatFilter | None = None,
    ) -> None:
        self.state = ReceiverState.LISTING
        self.merge = merge
        self._filter = stat_filter
        self._validator = ListingValidator()
        # Taken whole now: a lazy walk of the destination would see the entries
        # this very transfer writes and diff them away.
        self._previous: Iterator[Stat] = iter(() if merge else list(previous))
        self._pending_old: Stat | None = next(self._previous, None)
        self._removed_dirs: list[str] = []  # old directories already deleted or replaced
        self._next_id = 0
        self._wanted: dict[int, str] = {}  # requested, data not complete
        self.requested: list[str] = []  # every path requested, in order (for reports)
        # every incoming directory: the applier restores the mtime of those
        # whose contents it changed even when the directory itself is unchanged
        self.directories: dict[str, Stat] = {}

    # -- incoming ---------------------------------------------------------
    def receive(self, packet: Packet) -> list[ReceiverAction]:
        kind = packet.type
        if kind == PACKET_STAT:
            return self._on_stat(packet)
        if kind == PACKET_DATA:
            return self._on_data(packet.ID, packet.data)
        if kind == PACKET_FIN:
            return self._on_fin()
        if kind == PACKET_ERR:
            self.state = ReceiverState.DONE
            raise PeerError("error from sender: " + packet.data.decode("utf-8", "replace"))
        raise ProtocolError(f"unexpected packet from the sender: {describe(packet)}")

    def peer_closed(self) -> list[ReceiverAction]:
        """The sender's stream ended (EOF or CANCELLED).

        After the FIN exchange that is success (the FileSend quirk of BuildKit
        0.8: the daemon never half-closes, the call is cancelled instead).
        Before the sender's FIN, even after ours, the transfer is truncated.
        """
        if self.state is ReceiverState.DONE:
            return []
        if self.state is ReceiverState.FIN_SENT:
            raise ProtocolError("the sender ended the call without answering our FIN")
        raise ProtocolError(f"the sender's stream ended early (state {self.state.value})")

    def error(self, message: str) -> Packet:
        self.state = ReceiverState.DONE
        return err_packet(message)

    # -- internals ----------------------------------------------------------
    def _on_stat(self, packet: Packet) -> list[ReceiverAction]:
        if self.state is not ReceiverState.LISTING:
            raise ProtocolError(f"{describe(packet)} after the end of the listing")
        if not packet.HasField("stat"):
            return self._on_end_of_listing()
        incoming = packet.stat
        file_id = self._next_id
        self._next_id += 1
        mode = incoming.mode
        check_mode(incoming.path, mode)
        self._validator.check(
            incoming.path, filemode.is_dir(mode), filemode.is_symlink(mode), incoming.linkname
        )
        if self._filter is not None:
            incoming = self._filter(incoming)
            if incoming is None:
                return []
        if filemode.is_dir(incoming.mode):
            self.directories[incoming.path] = incoming
        actions: list[ReceiverAction] = []
        key = path_sort_key(incoming.path)
        old = self._deletions_before(key, actions)
        if old is not None and old.path == incoming.path:
            self._pending_old = next(self._previous, None)
            if same_file(old, incoming) and not (
                filemode.is_dir(incoming.mode) and old.modTime != incoming.modTime
            ):
                # (a directory whose mtime moved gets its metadata rewritten,
                # which fsutil skips; it never costs a REQ)
                return actions
            change = Change.MODIFY
            if filemode.is_dir(old.mode) and not filemode.is_dir(incoming.mode):
                self._removed_dirs.append(old.path + "/")
        else:
            change = Change.ADD
        wanted = needs_data(incoming)
        if wanted:
            self._wanted[file_id] = incoming.path
            self.requested.append(incoming.path)
        actions.append(PutEntry(incoming.path, incoming, change, file_id if wanted else None))
        if wanted:
            actions.append(SendPacket(req_packet(file_id)))
        return actions

    def _deletions_before(self, key: str, actions: list[ReceiverAction]) -> Stat | None:
        """Delete old entries that sort before ``key``; return the next old entry."""
        old = self._pending_old
        while old is not None and path_sort_key(old.path) < key:
            self._delete(old, actions)
            old = self._pending_old = next(self._previous, None)
        return old

    def _delete(self, old: Stat, actions: list[ReceiverAction]) -> None:
        path = old.path
        removed = self._removed_dirs
        while removed and not path.startswith(removed[-1]):
            removed.pop()
        if removed:
            return  # its directory is gone already
        actions.append(DeleteEntry(path))
        if filemode.is_dir(old.mode):
            removed.append(path + "/")

    def _on_end_of_listing(self) -> list[ReceiverAction]:
        actions: list[ReceiverAction] = []
        old = self._pending_old
        while old is not None:
            self._delete(old, actions)
            old = next(self._previous, None)
        self._pending_old = None
        actions.append(ListingDone())
        self.state = ReceiverState.RECEIVING
        return actions + self._maybe_fin()

    def _on_data(self, file_id: int, chunk: bytes) -> list[ReceiverAction]:
        path = self._wanted.get(file_id)
        if path is None:
            raise ProtocolError(f"DATA for file id {file_id}, which was not requested or is complete")
        if chunk:
            return [FileData(file_id, path, chunk)]
        del self._wanted[file_id]
        return [FileDone(file_id, path), *self._maybe_fin()]

    def _maybe_fin(self) -> list[ReceiverAction]:
        if self.state is ReceiverState.RECEIVING and not self._wanted:
            self.state = ReceiverState.FIN_SENT
            return [SendPacket(fin_packet())]
        return []

    def _on_fin(self) -> list[ReceiverAction]:
        if self.state is ReceiverState.FIN_SENT:
            self.state = ReceiverState.DONE
            return [TransferComplete()]
        raise ProtocolError(
            f"FIN from the sender before the transfer was complete (state {self.state.value}, "
            f"{len(self._wanted)} requested files outstanding)"
        )


def transfer_in_memory(
    stats: Iterable[Stat],
    read_file: Callable[[str], Iterable[bytes]],
    receiver: DiffCopyReceiver,
    apply: Callable[[ReceiverAction], None],
    *,
    encode: bool = True,
    transcript: list[str] | None = None,
) -> None:
    """Run a sender and a receiver against each other in one thread.

    Packets go through real protobuf encoding when ``encode`` is true, so the
    pair exercises exactly what crosses the wire.  A requested file's data is
    produced lazily and handed to the receiver chunk by chunk, so memory stays
    at one chunk however large the tree.  Pass a list as ``transcript`` to get
    one line per packet ("> " towards the receiver, "< " towards the sender).
    """
    from collections import deque

    sender = DiffCopySender()
    to_sender: deque[Packet] = deque()
    done = False

    def deliver(packet: Packet) -> None:
        nonlocal done
        if encode:
            packet = Packet.FromString(packet.SerializeToString())
        if transcript is not None:
            transcript.append("> " + describe(packet))
        for action in receiver.receive(packet):
            if isinstance(action, SendPacket):
                to_sender.append(action.packet)
            elif isinstance(action, TransferComplete):
                done = True
            else:
                apply(action)

    def serve(packet: Packet) -> None:
        if encode:
            packet = Packet.FromString(packet.SerializeToString())
        if transcript is not None:
            transcript.append("< " + describe(packet))
        event = sender.receive(packet)
        if isinstance(event, FileRequested):
            for chunk in read_file(event.path):
                deliver(sender.data(event.file_id, chunk))
            deliver(sender.end_file(event.file_id))
        else:
            deliver(sender.fin())

    for stat in stats:
        deliver(sender.stat(stat))
        while to_sender:  # answer REQs as they come, like fsutil's concurrent sender
            serve(to_sender.popleft())
    deliver(sender.end_listing())
    while not done:
        if not to_sender:
            raise ProtocolError("transfer stalled: nothing left to send on either side")
        serve(to_sender.popleft())
