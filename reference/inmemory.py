"""An in-memory DiffCopy pair: a directory synced to another in one process.

The sender and receiver machines talk through real protobuf encoding, so this
exercises exactly the packets that cross the wire, without a transport.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .applier import TreeApplier
from .diffcopy import DEFAULT_LIMITS, DiffCopyReceiver, ReceiveLimits, transfer_in_memory
from .walker import EntryFilter, list_diff_base, read_chunks, walk


@dataclass
class SyncResult:
    requested: list[str]
    files_written: int
    bytes_written: int
    transcript: list[str] = field(repr=False)


def sync_directories(
    source: str,
    destination: str,
    *,
    owner: tuple[int, int] | None = None,
    entry_filter: EntryFilter | None = None,
    merge: bool = False,
    chown: bool | None = None,
    keep_transcript: bool = False,
    limits: ReceiveLimits = DEFAULT_LIMITS,
) -> SyncResult:
    """Make ``destination`` equal to ``source`` (or merge into it), sending only changes."""
    stats = walk(source, entry_filter=entry_filter, owner=owner, as_packets=True)
    # the diff ignores xattrs (fsutil's sameFile), so the old tree is walked without them,
    # into the receiver's compact diff-base entries rather than Stat messages
    previous = list_diff_base(destination) if (not merge and os.path.isdir(destination)) else ()
    receiver = DiffCopyReceiver(previous, merge=merge, limits=limits)
    applier = TreeApplier(destination, chown=chown)
    transcript: list[str] | None = [] if keep_transcript else None
    try:
        transfer_in_memory(
            stats, lambda path: read_chunks(os.path.join(source, path)), receiver, applier.apply,
            transcript=transcript,
        )
    except BaseException:
        applier.abort()
        raise
    applier.finish(receiver.directories)
    return SyncResult(receiver.requested, applier.files_written, applier.bytes_written, transcript or [])
