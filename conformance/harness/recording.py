"""A DiffCopy receiver or sender, driven from the suite, that records every packet."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field

from reference import diffcopy as dc
from reference.applier import TreeApplier
from reference.errors import SessionError
from reference.transport.base import RpcError, RpcStream


@dataclass
class ReceiveResult:
    """What a peer's sender did in one DiffCopy, seen from the receiving end."""

    stats: list = field(default_factory=list)  # Stat messages in arrival order
    raw_stat_payloads: list[bytes] = field(default_factory=list)
    saw_end_of_listing: bool = False
    end_marker_bytes: bytes | None = None
    requested: list[str] = field(default_factory=list)
    data_packet_sizes: list[int] = field(default_factory=list)
    fin_reply: bool = False
    error: str | None = None  # our receiver's verdict, or the peer's ERR
    status: str | None = None  # how the call ended
    transcript: list[str] = field(default_factory=list)
    dest: str | None = None


def receive_tree(stream: RpcStream, *, dest: str | None = None, previous=(), timeout: float = 30.0,
                 merge: bool = False) -> ReceiveResult:
    """Act as the fsutil receiver on ``stream`` and record the sender's behaviour.

    The stream is opened by the caller (daemon role: FileSync/DiffCopy with
    metadata).  Validation failures are recorded, not raised.
    """
    result = ReceiveResult(dest=dest or tempfile.mkdtemp(prefix="conf-recv-"))
    receiver = dc.DiffCopyReceiver(previous, merge=merge)
    applier = TreeApplier(result.dest, chown=None)
    try:
        while True:
            raw = stream.recv(timeout=timeout)
            if raw is None:
                result.status = "ended"
                if receiver.state is not dc.ReceiverState.FIN_SENT and receiver.state is not dc.ReceiverState.DONE:
                    result.error = result.error or "the sender ended the call before the transfer was complete"
                break
            packet = dc.decode_packet(raw)
            result.transcript.append("> " + dc.describe(packet))
            if packet.type == dc.PACKET_STAT:
                if packet.HasField("stat"):
                    result.stats.append(packet.stat)
                    result.raw_stat_payloads.append(raw)
                else:
                    result.saw_end_of_listing = True
                    result.end_marker_bytes = raw
            elif packet.type == dc.PACKET_DATA and packet.data:
                result.data_packet_sizes.append(len(packet.data))
            elif packet.type == dc.PACKET_FIN:
                result.fin_reply = True
            actions = receiver.receive(packet)
            done = False
            for action in actions:
                if isinstance(action, dc.SendPacket):
                    result.transcript.append("< " + dc.describe(action.packet))
                    stream.send(action.packet.SerializeToString())
                elif isinstance(action, dc.TransferComplete):
                    done = True
                else:
                    applier.apply(action)
            stream.flush()
            if done:
                applier.finish(receiver.directories)
                result.status = "complete"
                # the sender ends its call after its FIN: read until the end
                try:
                    while stream.recv(timeout=timeout) is not None:
                        pass
                except RpcError as exc:
                    result.status = f"complete, then {exc.code.name}"
                break
    except (SessionError, RpcError, TimeoutError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        try:
            stream.cancel()
        except Exception:
            pass
        applier.abort()
    result.requested = list(receiver.requested)
    return result
