"""Private directories for unix sockets, where the socket's path fits.

A unix socket's path is at most 107 bytes (sun_path), and ``$TMPDIR`` can be long (a test runner's nested
temporary directories, say): a socket made under it then fails to bind with "AF_UNIX path too long". So a
socket directory goes under the temporary directory only while that leaves room for a name, else under /tmp.
"""

from __future__ import annotations

import tempfile

# room for "/<prefix>XXXXXXXX/<name>.sock" after the base
SOCKET_BASE_MAX = 64


def socket_dir(prefix: str) -> str:
    """A new directory (mode 0700) for a unix socket and whatever goes with it; the caller removes it."""
    base = tempfile.gettempdir()
    return tempfile.mkdtemp(prefix=prefix, dir=base if len(base) <= SOCKET_BASE_MAX else "/tmp")
