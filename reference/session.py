"""The session handshake (``POST /session`` upgraded to h2c), client side.

After the 101 the roles invert: the build client serves gRPC to the daemon
over the hijacked connection.  Method names go out one header line each: a
comma-joined single header is read by dockerd as one bogus method name.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import string
from dataclasses import dataclass, field

from .dockerhost import EngineError, HttpConnection, connect, error_message
from .errors import SessionError

HEADER_UUID = "X-Docker-Expose-Session-Uuid"
HEADER_NAME = "X-Docker-Expose-Session-Name"
HEADER_SHARED_KEY = "X-Docker-Expose-Session-Sharedkey"
HEADER_METHOD = "X-Docker-Expose-Session-Grpc-Method"

_ID_ALPHABET = string.digits + string.ascii_lowercase


_ID_SPACE = 36 ** 25
_ID_LIMIT = (1 << 136) // _ID_SPACE * _ID_SPACE  # below it, 17 random bytes map uniformly onto the IDs


def new_id() -> str:
    """25 base-36 characters, the shape BuildKit's identity.NewID produces: from one read of 17 random bytes
    (a choice per character read the system's random source 25 times)."""
    while True:
        n = int.from_bytes(secrets.token_bytes(17), "big")
        if n < _ID_LIMIT:
            break
    n %= _ID_SPACE
    out = []
    for _ in range(25):
        n, digit = divmod(n, 36)
        out.append(_ID_ALPHABET[digit])
    return "".join(out)


def new_session_id() -> str:
    """A session's ID (and a shared key): see new_id."""
    return new_id()


def docker_config_dir() -> str:
    return os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")


def build_node_id() -> str:
    """The node id the docker CLI keeps in ``<config>/.buildNodeID`` (created on first use)."""
    path = os.path.join(docker_config_dir(), ".buildNodeID")
    try:
        with open(path) as fh:
            value = fh.read().strip()
        if value:
            return value
    except FileNotFoundError:
        pass
    os.makedirs(os.path.dirname(path), exist_ok=True)
    value = secrets.token_hex(32)
    tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"  # unique per caller, threads included
    with open(tmp, "w") as fh:
        fh.write(value)
    try:
        os.link(tmp, path)  # the first writer wins; everyone then reads the same id
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    with open(path) as fh:
        return fh.read().strip()


def shared_key_for(context: str) -> str:
    """hex(sha256("<nodeID>:<context>")): a stable key per context lets the daemon
    reuse its copy as the diff base.  The docker CLI hashes the argument as typed,
    so ``.`` in two directories collides; callers pass the absolute path."""
    return hashlib.sha256(f"{build_node_id()}:{context}".encode("utf-8", "surrogateescape")).hexdigest()


def go_base(path: str) -> str:
    """Go's ``filepath.Base``: the last element, ``/`` for the root, ``.`` for the empty path."""
    if not path:
        return "."
    stripped = path.rstrip("/")
    return stripped.rsplit("/", 1)[-1] if stripped else "/"


def session_identity(context_dir: str, generation: str) -> tuple[str, str]:
    """The ``Name`` and ``Sharedkey`` headers of a build session of this generation, for the absolute
    context directory.  Both are opaque to the daemon (it only indexes its copies by the key).

    * ``n-1``, ``n``: as the docker CLI 20.10, the base name of the context and a hex SHA-256 key.
    * ``n+1``: as buildx 0.13 (BuildKit's client), the base name of the working directory, and a key
      of buildx's shape ``<base name of the context>:<16 hex digits>``.  buildx puts its node ID after
      the colon, so two contexts with the same base name (``/a/app``, ``/b/app``) share a key, a
      defect HANDSHAKE-3 names; here the digits are the start of sha256("<nodeID>:<context>"), which
      follows the directory.
    """
    if generation != "n+1":
        return go_base(context_dir), shared_key_for(context_dir)
    try:
        cwd = os.getcwd()
    except OSError:
        cwd = ""
    name = go_base(cwd) if cwd else "unknown"  # BuildKit's defaultSessionName
    return name, f"{go_base(context_dir)}:{shared_key_for(context_dir)[:16]}"


def _header_value(value: str) -> str | bytes:
    """Header values go out as the bytes of the string, as Go writes them: raw UTF-8 when a
    directory name is not ASCII (dockerd 20.10 and 26.1 accept that)."""
    return value if value.isascii() else value.encode("utf-8", "surrogateescape")


@dataclass
class SessionRequest:
    session_id: str
    name: str
    shared_key: str
    methods: list[str]
    extra_headers: list[tuple[str, str]] = field(default_factory=list)

    def headers(self) -> list[tuple[str, str | bytes]]:
        hdrs = [
            ("Upgrade", "h2c"),
            ("Connection", "Upgrade"),
            (HEADER_UUID, self.session_id),
            (HEADER_NAME, _header_value(self.name)),
            (HEADER_SHARED_KEY, _header_value(self.shared_key)),
        ]
        hdrs += [(HEADER_METHOD, m) for m in self.methods]
        return hdrs + self.extra_headers


def open_session(request: SessionRequest, host: str | None = None, path: str = "/session") -> tuple[socket.socket, bytes]:
    """Do the handshake; return the hijacked socket and bytes already read past the 101."""
    sock = connect(host, timeout=30.0)
    try:
        http = HttpConnection(sock)
        resp = http.request("POST", path, request.headers())
        if resp.status != 101:
            raise EngineError(resp.status, error_message(http.read_body()))
        upgrade = resp.header("upgrade", "")
        if upgrade.lower() != "h2c":
            raise SessionError(f"daemon switched to {upgrade!r}, expected h2c")
        leftover = http.switched_protocol_bytes()
    except BaseException:
        sock.close()
        raise
    sock.settimeout(None)
    return sock, leftover
