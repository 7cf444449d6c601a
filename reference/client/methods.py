"""The gRPC methods a build client serves, by name, and which ones it advertises.

Kept apart from the services themselves so that the session can be opened and
the build requested before the serving stack (h2, protobuf, the file-sync
machines) is imported: the daemon prepares the build while we load.
"""

from __future__ import annotations

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
FILESYNC_DIFFCOPY = "/moby.filesync.v1.FileSync/DiffCopy"
FILESYNC_TARSTREAM = "/moby.filesync.v1.FileSync/TarStream"
FILESEND_DIFFCOPY = "/moby.filesync.v1.FileSend/DiffCopy"
SECRETS_GET = "/moby.buildkit.secrets.v1.Secrets/GetSecret"
AUTH_CREDENTIALS = "/moby.filesync.v1.Auth/Credentials"
AUTH_FETCH_TOKEN = "/moby.filesync.v1.Auth/FetchToken"
AUTH_GET_TOKEN_AUTHORITY = "/moby.filesync.v1.Auth/GetTokenAuthority"
AUTH_VERIFY_TOKEN_AUTHORITY = "/moby.filesync.v1.Auth/VerifyTokenAuthority"
SSH_CHECK_AGENT = "/moby.sshforward.v1.SSH/CheckAgent"
SSH_FORWARD_AGENT = "/moby.sshforward.v1.SSH/ForwardAgent"


def advertised_methods(filesync: tuple[str, ...], *, exporting: bool, secrets: bool,
                       auth: bool, token_authority: bool, ssh: bool = False) -> list[str]:
    """The method list of a session, sorted (one header line each).

    ``ClientServices.handlers()`` must serve exactly these; ``build()`` checks it.
    """
    methods = [HEALTH_CHECK, HEALTH_WATCH]
    if "diffcopy" in filesync:
        methods.append(FILESYNC_DIFFCOPY)
    if "tarstream" in filesync:
        methods.append(FILESYNC_TARSTREAM)
    if exporting:
        methods.append(FILESEND_DIFFCOPY)
    if secrets:
        methods.append(SECRETS_GET)
    if ssh:
        methods += [SSH_CHECK_AGENT, SSH_FORWARD_AGENT]
    if auth:
        methods.append(AUTH_CREDENTIALS)
        if token_authority:
            methods += [AUTH_FETCH_TOKEN, AUTH_GET_TOKEN_AUTHORITY, AUTH_VERIFY_TOKEN_AUTHORITY]
    return sorted(methods)
