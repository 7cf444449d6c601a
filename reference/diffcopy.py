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

Names are bytes on the wire, as the Go peers keep them.  ``Stat`` (proto3
strings) holds the UTF-8 ones, which is nearly all; an entry whose path, link
target or xattr name is not UTF-8 is a :class:`NameStat` instead, with the
same attributes, encoded and decoded by the small codec below (the same wire
bytes; upb refuses such strings both ways).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from operator import attrgetter
from typing import Callable, Iterable, Iterator

from google.protobuf.message import DecodeError

from . import filemode
from .errors import PeerError, ProtocolError, ValidationError
from .paths import (  # noqa: F401  (the limits are part of this module's interface)
    DEFAULT_LIMITS, LimitExceeded, ListingValidator, ReceiveLimits, path_sort_key,
)
from .pb.fsutil_types_pb2 import Packet, Stat

PACKET_STAT = Packet.PACKET_STAT
PACKET_REQ = Packet.PACKET_REQ
PACKET_DATA = Packet.PACKET_DATA
PACKET_FIN = Packet.PACKET_FIN
PACKET_ERR = Packet.PACKET_ERR

#: Largest DATA chunk a Go sender produces (fsutil's 32 KiB copy buffer).
GO_CHUNK_SIZE = 32 * 1024

_MODE_DIR = filemode.MODE_DIR
_MODE_SYMLINK = filemode.MODE_SYMLINK
_MODE_TYPE = filemode.MODE_TYPE  # no type bit at all: a regular file (filemode.is_regular)


# ---------------------------------------------------------------------------
# Names that are not UTF-8

_ESCAPE = "surrogateescape"  # what os.fsdecode uses: os functions get the original bytes back
_STAT_FIELDS = ("path", "mode", "uid", "gid", "size", "modTime", "linkname", "devmajor", "devminor")


class NameStat:
    """A Stat whose path, link target or xattr names are not all UTF-8.

    upb refuses such a proto3 string both when parsing and when setting it;
    Go's fsutil never checks.  Same attributes as ``Stat``, names as ``str``
    with the undecodable bytes escaped, so code that reads Stats and the
    ``os`` functions it calls work unchanged.
    """

    __slots__ = (*_STAT_FIELDS, "xattrs")

    def __init__(self, path: str = "", mode: int = 0, uid: int = 0, gid: int = 0, size: int = 0,
                 modTime: int = 0, linkname: str = "", devmajor: int = 0, devminor: int = 0,  # noqa: N803
                 xattrs=None):
        self.path, self.mode, self.uid, self.gid, self.size = path, mode, uid, gid, size
        self.modTime, self.linkname, self.devmajor, self.devminor = modTime, linkname, devmajor, devminor
        self.xattrs = dict(xattrs or {})

    def SerializeToString(self, deterministic: bool = False) -> bytes:  # noqa: N802 (Stat's name)
        out = bytearray()
        _put_bytes(out, 1, self.path.encode("utf-8", _ESCAPE))
        for number, value, bits in ((2, self.mode, 32), (3, self.uid, 32), (4, self.gid, 32), (5, self.size, 64),
                                    (6, self.modTime, 64)):
            _put_varint_field(out, number, value, bits)
        _put_bytes(out, 7, self.linkname.encode("utf-8", _ESCAPE))
        _put_varint_field(out, 8, self.devmajor, 64)
        _put_varint_field(out, 9, self.devminor, 64)
        for key in sorted(self.xattrs):  # a map's deterministic order: by key
            entry = bytearray()  # (a map entry always carries both fields)
            _put_bytes(entry, 1, key.encode("utf-8", _ESCAPE), always=True)
            _put_bytes(entry, 2, bytes(self.xattrs[key]), always=True)
            _put_bytes(out, 10, bytes(entry), always=True)
        return bytes(out)

    def __eq__(self, other) -> bool:
        if not isinstance(other, (NameStat, Stat)):
            return NotImplemented
        return (all(getattr(self, f) == getattr(other, f) for f in _STAT_FIELDS)
                and dict(self.xattrs) == dict(other.xattrs))

    def __repr__(self) -> str:
        return f"NameStat(path={self.path!r}, mode={self.mode:#x}, size={self.size}, linkname={self.linkname!r})"


class NamePacket:
    """A Packet carrying a :class:`NameStat` (the other fields hold no names)."""

    __slots__ = ("type", "stat", "ID", "data", "_has_stat")

    def __init__(self, stat: NameStat | None = None, type: int = 0, ID: int = 0, data: bytes = b""):  # noqa: A002, N803
        self._has_stat = stat is not None
        self.stat = stat if stat is not None else NameStat()
        self.type, self.ID, self.data = type, ID, data

    def HasField(self, name: str) -> bool:  # noqa: N802 (Packet's name)
        if name != "stat":
            raise ValueError(f"NamePacket has no presence for field {name!r}")
        return self._has_stat

    def SerializeToString(self, deterministic: bool = False) -> bytes:  # noqa: N802
        out = bytearray()
        _put_varint_field(out, 1, self.type, 32)
        if self._has_stat:
            _put_bytes(out, 2, self.stat.SerializeToString(), always=True)
        _put_varint_field(out, 3, self.ID, 32)
        _put_bytes(out, 4, self.data)
        return bytes(out)


# Protobuf wire format, just what Packet and Stat use (proto3: zero values are not written).
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def _put_varint(out: bytearray, value: int) -> None:
    value &= (1 << 64) - 1  # negative int64: ten bytes of two's complement
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)


def _put_varint_field(out: bytearray, number: int, value: int, bits: int) -> None:
    value &= (1 << bits) - 1 if bits == 32 else (1 << 64) - 1
    if value:
        _put_varint(out, number << 3 | _VARINT)
        _put_varint(out, value)


def _put_bytes(out: bytearray, number: int, data: bytes, *, always: bool = False) -> None:
    if data or always:
        _put_varint(out, number << 3 | _LEN)
        _put_varint(out, len(data))
        out += data


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise DecodeError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result & ((1 << 64) - 1), pos
        shift += 7


def _wire_fields(data: bytes):
    """(field number, wire type, value) of one message; nested messages are read by the caller."""
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise DecodeError("field number 0")
        if wire == _VARINT:
            value, pos = _read_varint(data, pos)
        elif wire == _LEN:
            length, pos = _read_varint(data, pos)
            if length > end - pos:
                raise DecodeError("truncated length-delimited field")
            value, pos = data[pos:pos + length], pos + length
        elif wire in (_I64, _I32):
            pos += 8 if wire == _I64 else 4
            if pos > end:
                raise DecodeError("truncated fixed-size field")
            continue  # no such field in these messages: skipped, as an unknown field
        else:
            raise DecodeError(f"unsupported wire type {wire}")
        yield number, wire, value


def _signed(value: int, bits: int) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


_STAT_VARINTS = {2: ("mode", 32, False), 3: ("uid", 32, False), 4: ("gid", 32, False), 5: ("size", 64, True),
                 6: ("modTime", 64, True), 8: ("devmajor", 64, True), 9: ("devminor", 64, True)}


def _merge_stat(stat: NameStat, data: bytes) -> None:
    for number, wire, value in _wire_fields(data):
        if wire == _VARINT and number in _STAT_VARINTS:
            name, bits, signed = _STAT_VARINTS[number]
            setattr(stat, name, _signed(value, bits) if signed else value & ((1 << bits) - 1))
        elif wire == _LEN and number in (1, 7):
            setattr(stat, "path" if number == 1 else "linkname", bytes(value).decode("utf-8", _ESCAPE))
        elif wire == _LEN and number == 10:
            key, item = b"", b""
            for entry_number, entry_wire, entry_value in _wire_fields(value):
                if entry_wire == _LEN and entry_number == 1:
                    key = entry_value
                elif entry_wire == _LEN and entry_number == 2:
                    item = entry_value
            stat.xattrs[bytes(key).decode("utf-8", _ESCAPE)] = bytes(item)


def decode_name_packet(raw: bytes) -> NamePacket:
    """A Packet that ``Packet.FromString`` refused: names that are not UTF-8, or no Packet at all
    (then DecodeError again)."""
    packet = NamePacket()
    for number, wire, value in _wire_fields(raw):
        if wire == _VARINT and number == 1:
            packet.type = _signed(value, 32)
        elif wire == _VARINT and number == 3:
            packet.ID = value & 0xFFFFFFFF
        elif wire == _LEN and number == 2:
            packet._has_stat = True
            _merge_stat(packet.stat, value)  # (a repeated message field merges, as in protobuf)
        elif wire == _LEN and number == 4:
            packet.data = bytes(value)
    return packet


def decode_packet(raw: bytes) -> Packet | NamePacket:
    """One DiffCopy message; raises DecodeError when it is not a Packet."""
    try:
        return Packet.FromString(raw)
    except DecodeError:
        return decode_name_packet(raw)


def new_stat(**fields) -> Stat | NameStat:
    """A Stat, or a NameStat when a name in ``fields`` is not UTF-8."""
    try:
        return Stat(**fields)
    except (UnicodeEncodeError, ValueError):
        return NameStat(**fields)


def end_of_listing() -> Packet:
    """The terminator: a Packet without a ``stat`` field (an empty message)."""
    return Packet()


def stat_packet(stat: Stat | NameStat) -> Packet | NamePacket:
    if type(stat) is NameStat:
        return NamePacket(stat)
    packet = Packet()  # type PACKET_STAT is 0, proto3's default
    packet.stat.CopyFrom(stat)  # cheaper than Packet(stat=stat), same message
    return packet


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


# Enum member lookups are slow (a fraction of a microsecond); the per-entry paths use these.
_SENDER_LISTING = SenderState.LISTING


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
        if self.state is not _SENDER_LISTING:
            raise ProtocolError(f"STAT {stat.path!r} after the end of the listing")
        if filemode.is_regular(stat.mode):
            self._requestable[self._next_id] = stat.path
        self._next_id += 1
        return stat_packet(stat)

    def listed(self, packet: Packet, path: str, mode: int) -> Packet:
        """:meth:`stat` for a STAT packet the caller built, whose Stat's path and
        mode it passes along (``walker.walk(as_packets=True)`` yields these):
        the Stat is neither copied nor read back."""
        if self.state is not _SENDER_LISTING:
            raise ProtocolError(f"STAT {path!r} after the end of the listing")
        if mode & _MODE_TYPE == 0:
            self._requestable[self._next_id] = path
        self._next_id += 1
        return packet

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


_RECEIVER_LISTING = ReceiverState.LISTING
_ADD, _MODIFY = Change.ADD, Change.MODIFY


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


#: A diff-base entry is ``(sort key, fields)``: fields = (path, mode, uid, gid,
#: size (0 for directories), modTime, devmajor, devminor, linkname), what
#: fsutil's sameFile compares (plus a directory's mtime, see the receiver).  An
#: incoming Stat is unchanged exactly when its fields tuple is equal; a tuple
#: compares far cheaper than a message.  ``walker.list_diff_base`` builds these
#: straight from lstat.
PreviousEntry = tuple[str, tuple]

#: Reads a Stat's fields tuple in one call.
stat_fields = attrgetter("path", "mode", "uid", "gid", "size", "modTime", "devmajor", "devminor", "linkname")


def previous_entry(stat: Stat) -> PreviousEntry:
    """The diff-base entry for a Stat of the receiver's current tree."""
    fields = stat_fields(stat)
    if fields[1] & filemode.MODE_DIR and fields[4]:
        fields = (*fields[:4], 0, *fields[5:])
    return (path_sort_key(fields[0]), fields)


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

    ``previous`` is the receiver's current tree in walk order, as Stats (what a
    walk of the destination gives) or as :func:`previous_entry` tuples (what
    ``walker.list_diff_base`` gives, far cheaper); it is the diff base.  With
    ``merge=True`` (exports) there is no diff base: every entry is added, every regular file
    requested, nothing deleted.  ``stat_filter`` may rewrite an incoming Stat
    (for example the uid/gid of an export) before it is compared, or drop it by
    returning None.  ``limits`` bound the listing; a STAT beyond one raises
    :class:`LimitExceeded` before any action for it is returned.
    """

    def __init__(
        self,
        previous: Iterable[Stat | PreviousEntry] = (),
        *,
        merge: bool = False,
        stat_filter: StatFilter | None = None,
        limits: ReceiveLimits = DEFAULT_LIMITS,
    ) -> None:
        self.state = ReceiverState.LISTING
        self.merge = merge
        self._filter = stat_filter
        self.limits = limits
        self._validator = ListingValidator(limits)
        self._max_entries = limits.max_entries
        # declared sizes of the requested files, then the DATA beyond them (a file that grew)
        self._max_bytes = limits.max_transfer_bytes
        self.bytes_expected = 0
        self.bytes_received = 0
        self._valid_modes: set[int] = set()  # modes check_mode accepted already
        # Taken whole now: a lazy walk of the destination would see the entries
        # this very transfer writes and diff them away.
        self._previous: Iterator[PreviousEntry] = iter(() if merge else [
            entry if type(entry) is tuple else previous_entry(entry) for entry in previous
        ])
        self._pending_old: PreviousEntry | None = next(self._previous, None)
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
        if self.state is not _RECEIVER_LISTING:
            raise ProtocolError(f"{describe(packet)} after the end of the listing")
        incoming = packet.stat
        fields = stat_fields(incoming)
        path = fields[0]
        if not path and not packet.HasField("stat"):  # (a path proves the field is there)
            return self._on_end_of_listing()
        file_id = self._next_id
        self._next_id += 1
        if file_id >= self._max_entries:
            raise LimitExceeded("max_entries", file_id + 1, self._max_entries, path, "too many entries")
        mode = fields[1]
        if mode not in self._valid_modes:
            check_mode(path, mode)
            self._valid_modes.add(mode)
        is_dir = mode & _MODE_DIR != 0
        linkname = fields[8]
        self._validator.check(path, is_dir, mode & _MODE_SYMLINK != 0, linkname)
        if self._filter is not None:
            incoming = self._filter(incoming)
            if incoming is None:
                return []
            fields = stat_fields(incoming)
            path, mode, linkname = fields[0], fields[1], fields[8]
            is_dir = mode & _MODE_DIR != 0
        if is_dir:
            self.directories[path] = incoming
            if fields[4]:
                fields = (*fields[:4], 0, *fields[5:])  # a directory's size does not count
        actions: list[ReceiverAction] = []
        old = self._pending_old
        if old is None or old[1][0] != path:
            key = path_sort_key(path)
            if old is not None and old[0] < key:
                old = self._deletions_before(key, actions)
            if old is not None and old[1][0] != path:
                old = None  # it sorts after: this entry is new
        if old is not None:
            self._pending_old = next(self._previous, None)
            if fields == old[1]:
                # (a directory whose mtime moved gets its metadata rewritten,
                # which fsutil skips; it never costs a REQ)
                return actions
            change = _MODIFY
            if old[1][1] & _MODE_DIR and not is_dir:
                self._removed_dirs.append(path + "/")
        else:
            change = _ADD
        wanted = mode & _MODE_TYPE == 0 and not linkname  # needs_data
        if wanted:
            if self._max_bytes is not None:
                self.bytes_expected += max(fields[4], 0)
                if self.bytes_expected > self._max_bytes:
                    raise LimitExceeded("max_transfer_bytes", self.bytes_expected, self._max_bytes, path,
                                        "transfer too large")
            self._wanted[file_id] = path
            self.requested.append(path)
            actions.append(PutEntry(path, incoming, change, file_id))
            actions.append(SendPacket(req_packet(file_id)))
        else:
            actions.append(PutEntry(path, incoming, change, None))
        return actions

    def _deletions_before(self, key: str, actions: list[ReceiverAction]) -> PreviousEntry | None:
        """Delete old entries that sort before ``key``; return the next old entry."""
        old = self._pending_old
        while old is not None and old[0] < key:
            self._delete(old, actions)
            old = self._pending_old = next(self._previous, None)
        return old

    def _delete(self, old: PreviousEntry, actions: list[ReceiverAction]) -> None:
        path, mode = old[1][0], old[1][1]
        removed = self._removed_dirs
        while removed and not path.startswith(removed[-1]):
            removed.pop()
        if removed:
            return  # its directory is gone already
        actions.append(DeleteEntry(path))
        if mode & _MODE_DIR:
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
            if self._max_bytes is not None:
                self.bytes_received += len(chunk)
                if self.bytes_received > self._max_bytes:
                    raise LimitExceeded("max_transfer_bytes", self.bytes_received, self._max_bytes, path,
                                        "transfer too large")
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
    stats: Iterable[Stat] | Iterable[tuple[Packet, str, int]],
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
    at one chunk however large the tree.  ``stats`` are Stats, or the
    ``(packet, path, mode)`` of :meth:`DiffCopySender.listed`.  Pass a list as
    ``transcript`` to get one line per packet ("> " towards the receiver, "< "
    towards the sender).
    """
    from collections import deque

    sender = DiffCopySender()
    to_sender: deque[Packet] = deque()
    done = False
    receive = receiver.receive
    decode = Packet.FromString
    decode_names = decode_name_packet

    def handle(actions: list[ReceiverAction]) -> None:
        nonlocal done
        for action in actions:
            if isinstance(action, SendPacket):
                to_sender.append(action.packet)
            elif isinstance(action, TransferComplete):
                done = True
            else:
                apply(action)

    def deliver(packet: Packet) -> None:
        if encode:
            raw = packet.SerializeToString()
            try:
                packet = decode(raw)
            except DecodeError:  # names that are not UTF-8
                packet = decode_names(raw)
        if transcript is not None:
            transcript.append("> " + describe(packet))
        actions = receive(packet)
        if actions:
            handle(actions)

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

    listed, send_stat = sender.listed, sender.stat
    for stat in stats:
        deliver(listed(*stat) if type(stat) is tuple else send_stat(stat))
        while to_sender:  # answer REQs as they come, like fsutil's concurrent sender
            serve(to_sender.popleft())
    deliver(sender.end_listing())
    while not done:
        if not to_sender:
            raise ProtocolError("transfer stalled: nothing left to send on either side")
        serve(to_sender.popleft())
