"""A small reference daemon for the Docker client-session protocol.

It speaks enough of the Engine API (h11, HTTP/1.1) for the docker CLI 20.10 to
run ``DOCKER_BUILDKIT=1 docker build`` against it unchanged: the ``/session``
hijack (the daemon becomes the gRPC client), file sync of the Dockerfile and
context into a persistent per-client cache, a tiny Dockerfile subset executed
into an on-disk image store, BuildKit progress traces, and local/tar export
over FileSend.  ``python -m reference.daemon --help`` runs it.
"""

from .config import DaemonConfig

__all__ = ["DaemonConfig"]
