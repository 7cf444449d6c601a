"""Where the real peers live on this machine, and how to run them.

    python -m conformance.peers list              # each real peer: name, version, binary, state
    python -m conformance.peers start dockerd-26.1  # a disposable private daemon; prints its DOCKER_HOST
    python -m conformance.peers install           # both vintages into the prefix (set-up does this)

The peers are Debian's own packages unpacked into a prefix the project owns (default
``/opt/docker-session-peers``, or ``$SESSION_PEERS_PREFIX``), one directory per vintage; see
``catalogue`` for what is pinned and ``install`` for how it gets there. Stdlib only.
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

from .catalogue import PROGRAMS, VINTAGES, PeerProgram
from .install import prefix_dir, read_manifest

__all__ = [
    "PROGRAMS", "VINTAGES", "PeerProgram", "PeerMissing", "binary", "client_env", "client_command",
    "daemon_search_path", "installed", "missing_reason", "program", "prefix_dir", "vintage_dir", "version",
]

# dockerd finds containerd, containerd-shim-runc-v2, runc and docker-init on PATH: the vintage's own
# directories first, then the system's (iptables, mount, ...), never /usr/local.
_SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


class PeerMissing(RuntimeError):
    """The named peer is not installed here."""


def program(name: str) -> PeerProgram:
    try:
        return PROGRAMS[name]
    except KeyError:
        raise KeyError(f"unknown peer {name!r} (known: {', '.join(PROGRAMS)})") from None


def vintage_dir(vintage: str) -> Path:
    return prefix_dir() / vintage


def binary(name: str) -> str:
    """Absolute path of the peer's program (whether or not it is installed)."""
    peer = program(name)
    return str(vintage_dir(peer.vintage) / peer.binary)


def missing_reason(name: str) -> str | None:
    """Why the peer cannot run here, or None when it can."""
    peer = program(name)
    directory = vintage_dir(peer.vintage)
    if read_manifest(directory) is None:
        return (f"{name} is not installed ({directory} has no manifest): run "
                f"`python3 -m conformance.peers install` (part of .ci/install-system-deps)")
    for relative in (peer.binary, *peer.plugins):
        if not os.access(directory / relative, os.X_OK):
            return f"{name}: {directory / relative} is missing or not executable; reinstall the peers"
    return None


def installed(name: str) -> bool:
    return missing_reason(name) is None


def require(name: str) -> PeerProgram:
    reason = missing_reason(name)
    if reason:
        raise PeerMissing(reason)
    return program(name)


def daemon_search_path(name: str) -> str:
    """PATH for a private daemon of this vintage."""
    directory = vintage_dir(program(name).vintage)
    return f"{directory / 'usr/bin'}:{directory / 'usr/sbin'}:{_SYSTEM_PATH}"


def client_env(name: str, config_dir: str) -> dict[str, str]:
    """Environment changes that make the peer's CLI find its plugins, given the DOCKER_CONFIG it will use.

    The docker CLI looks for plugins only in its config directory and in fixed system directories, so the
    vintage's plugins are linked into ``config_dir/cli-plugins`` (a directory the caller owns).
    """
    peer = program(name)
    os.makedirs(config_dir, exist_ok=True)
    if peer.plugins:
        plugins = Path(config_dir, "cli-plugins")
        plugins.mkdir(parents=True, exist_ok=True)
        for relative in peer.plugins:
            link = plugins / os.path.basename(relative)
            target = vintage_dir(peer.vintage) / relative
            if not (link.is_symlink() and os.readlink(link) == str(target)):
                link.unlink(missing_ok=True)
                link.symlink_to(target)
    return {"DOCKER_CONFIG": config_dir, "DOCKER_BUILDKIT": "1"}


def client_command(name: str, *args: str) -> str:
    """A ``--client-under-test`` template that runs the peer's ``docker build``."""
    extra = " ".join(args)
    return f"{binary(name)} build {extra + ' ' if extra else ''}{{context}}"


@functools.lru_cache(maxsize=None)
def version(name: str) -> str | None:
    """What the program says of its own version (first line), or None when it cannot run."""
    if missing_reason(name):
        return None
    peer = program(name)
    argv = [binary(name), "--version"]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                              env={"PATH": daemon_search_path(name), "HOME": "/nonexistent"})
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (proc.stdout or proc.stderr).strip().splitlines()
    if not text:
        return None
    if peer.plugins:  # e.g. "Docker version 26.1.5+dfsg1, build a72d7cd; buildx 0.13.1+ds1"
        plugin = str(vintage_dir(peer.vintage) / peer.plugins[0])
        try:
            plugin_proc = subprocess.run([plugin, "version"], capture_output=True, text=True, timeout=30)
            plugin_text = plugin_proc.stdout.split()
            if len(plugin_text) >= 2:
                return f"{text[0]}; {os.path.basename(plugin).removeprefix('docker-')} {plugin_text[1]}"
        except (OSError, subprocess.TimeoutExpired):
            pass
    return text[0]
