"""Files replaced whole: written beside their name, then renamed over it, so that a reader, or the daemon
after a crash, sees the old content or the new, never part of it (with ``--no-fsync``: or no file).

Durable (fsync of the file before the rename and of its directory after) unless the daemon was started with
``--no-fsync``: for a root thrown away when the daemon stops, as the conformance suite's embedded daemons'
are, where the syncs cost about a millisecond each, several per build, and protect nothing.
"""

from __future__ import annotations

import os
import secrets


class AtomicFiles:
    def __init__(self, *, durable: bool = True):
        self.durable = durable

    def write(self, path: str, data: bytes, *, durable: bool | None = None) -> None:
        """Replace ``path`` with ``data``; ``durable=False`` skips the syncs for this write (content that may
        be lost, such as usage times), ``None`` does as the daemon was told."""
        durable = self.durable if durable is None else durable and self.durable
        tmp = f"{path}.{secrets.token_hex(4)}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        if not self.durable:
            # ext4 flushes a file renamed over another (auto_da_alloc), about 0.3 ms a write; over no file it
            # does not. Between the two steps the file is missing: the daemon reads these files only when it
            # starts, and without --no-fsync's promise a crash may lose them anyway.
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        os.replace(tmp, path)
        if durable:
            self.sync_directory(os.path.dirname(path))

    def sync_directory(self, path: str) -> None:
        """Make the entries added to or removed from ``path`` durable (a rename, an unlink)."""
        if not self.durable:
            return
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
