"""Scripted partial clients for tests/test_partial_implementations.py, run as the client under test:

    python tests/partial_clients.py body-upload [--same-credentials] CONTEXT

``body-upload``: sends ``POST /build?version=2&session=ID`` with the context as a tar body (the body-upload
profile of conformance/SPEC.md) and opens a session that serves ``Auth/Credentials`` only: no Health, no
FileSync. Credentials come from DOCKER_CONFIG per host, or with ``--same-credentials`` the same user and secret
for every host (the defect the Auth rule about per-host credentials catches). Exits 0 when the build succeeds.
"""

from __future__ import annotations

import argparse
import io
import os
import secrets
import sys
import tarfile

from reference.client.auth import AuthProvider, DockerConfigCredentials
from reference.client import BuildError, post_build
from reference.dockerhost import EngineError, docker_host
from reference.errors import SessionError
from reference.session import SessionRequest, new_session_id, open_session
from reference.transport.h2grpc import serve_h2


class SameForEveryHost:
    """A defective credential source: one user and secret whatever registry asks."""

    config_dir = None

    def lookup(self, host: str) -> tuple[str, str]:
        return "everyone", "one-secret-for-all-hosts"


def context_tar(context: str) -> bytes:
    """The context as a GNU tar archive with whole-second times (dockerd 20.10 took an archive that opens with
    Python's default PAX header, written for sub-second times, for a Dockerfile)."""
    def whole_seconds(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime = int(info.mtime)
        return info

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name in sorted(os.listdir(context)):
            tar.add(os.path.join(context, name), arcname=name, filter=whole_seconds)
    return buffer.getvalue()


def body_upload(context: str, same_credentials: bool) -> int:
    host = docker_host()
    source = SameForEveryHost() if same_credentials else DockerConfigCredentials()
    auth = AuthProvider(source)
    handlers = auth.handlers()
    request = SessionRequest(new_session_id(), os.path.basename(context), new_session_id(), sorted(handlers))
    try:
        sock, leftover = open_session(request, host)
    except (SessionError, EngineError, OSError) as exc:
        print(f"session: {exc}", file=sys.stderr)
        return 1
    server = serve_h2(sock, handlers, leftover)
    query = {"version": "2", "session": request.session_id, "dockerfile": "Dockerfile",
             "buildid": secrets.token_hex(8), "rm": "1"}
    try:
        image_id, _ = post_build(query, host, lambda event: None, 60.0, 5.0, body=context_tar(context))
    except (BuildError, EngineError, SessionError, OSError) as exc:
        print(f"build failed: {exc}", file=sys.stderr)
        return 1
    finally:
        server.close()
        sock.close()
    print(image_id or "")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["body-upload"])
    parser.add_argument("--same-credentials", action="store_true")
    parser.add_argument("context")
    # the options a case adds (-o, --secret, --ssh, -f, ...): this client offers none and refuses them (exit 2)
    args = parser.parse_args(argv)
    return body_upload(args.context, args.same_credentials)


if __name__ == "__main__":
    sys.exit(main())
