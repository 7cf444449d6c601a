"""The real peers the suite knows: which Debian packages make each vintage, and which programs it offers.

Data only (stdlib, no I/O), shared by the installer (``conformance.peers.install``), the process helpers
(``conformance.realpeers``) and the command line (``python -m conformance.peers``).

Two vintages, each extracted from Debian's own packages into its own directory of the peers prefix:

* ``20.10``: dockerd and docker CLI 20.10.24 (BuildKit 0.8) from Debian 12 (bookworm).
* ``26.1``: dockerd 26.1.5 (BuildKit 0.13), docker CLI 26.1.5 and buildx 0.13.1 from Debian 13 (trixie),
  with containerd 1.7. runc and tini come from Debian 12 for both: Debian 13's runc needs glibc 2.38,
  which Debian 12 lacks, and bookworm's runc 1.1.5 serves dockerd 26.1 (it is what the 26.1 issue measured).

Versions are pinned. Debian replaces a version in place when it publishes a rebuild or a point update
(``+deb12u2``), so an exact pin may vanish from the archive; the installer then takes the archive's version
of the same upstream release and says so (``Package.upstream``), and refuses a different upstream release.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "/opt/docker-session-peers"
PREFIX_ENV = "SESSION_PEERS_PREFIX"

# Debian suites by release; the host's own release decides nothing about which packages a vintage uses.
SUITES = {"12": "bookworm", "13": "trixie"}
SUPPORTED_HOSTS = tuple(SUITES)


@dataclass(frozen=True)
class Package:
    name: str
    version: str  # the exact Debian version pinned
    suite: str  # bookworm | trixie

    @property
    def upstream(self) -> str:
        """'20.10.24+dfsg1-1+deb12u1+b6' -> '20.10.24': the release a substitute version must match."""
        version = self.version.split(":", 1)[-1]
        for separator in ("+", "~", "-"):
            version = version.split(separator, 1)[0]
        return version


@dataclass(frozen=True)
class Vintage:
    name: str  # "20.10" | "26.1"
    generation: str  # the suite's protocol generation these peers speak
    packages: tuple[Package, ...]
    description: str


_RUNC = Package("runc", "1.1.5+ds1-1+deb12u1", "bookworm")
_TINI = Package("tini", "0.19.0-1+b3", "bookworm")  # /usr/bin/docker-init

VINTAGES: dict[str, Vintage] = {
    "20.10": Vintage(
        "20.10", "n",
        (
            Package("docker.io", "20.10.24+dfsg1-1+deb12u1+b6", "bookworm"),  # dockerd and the CLI
            Package("containerd", "1.6.20~ds1-1+deb12u3", "bookworm"),
            _RUNC,
            _TINI,
        ),
        "Debian 12's docker.io: dockerd 20.10.24 with BuildKit 0.8, docker CLI 20.10.24",
    ),
    "26.1": Vintage(
        "26.1", "n+1",
        (
            Package("docker.io", "26.1.5+dfsg1-9+deb13u1+b1", "trixie"),  # dockerd
            Package("docker-cli", "26.1.5+dfsg1-9+deb13u1+b1", "trixie"),
            Package("docker-buildx", "0.13.1+ds1-3", "trixie"),
            Package("containerd", "1.7.24~ds1-6+deb13u1", "trixie"),
            _RUNC,
            _TINI,
        ),
        "Debian 13's docker.io, docker-cli, docker-buildx and containerd: dockerd 26.1.5 with BuildKit 0.13, "
        "docker CLI 26.1.5 with buildx 0.13.1",
    ),
}


@dataclass(frozen=True)
class PeerProgram:
    """One program of a vintage that the suite can test or test against."""

    name: str  # dockerd-20.10, docker-cli-26.1, ...
    kind: str  # daemon | client
    vintage: str
    binary: str  # path inside the vintage's directory
    plugins: tuple[str, ...] = ()  # CLI plugins (paths inside the vintage's directory) the client needs
    summary: str = ""


PROGRAMS: dict[str, PeerProgram] = {
    program.name: program
    for program in (
        PeerProgram("dockerd-20.10", "daemon", "20.10", "usr/sbin/dockerd",
                    summary="dockerd 20.10.24, BuildKit 0.8 (POST /build and POST /session)"),
        PeerProgram("dockerd-26.1", "daemon", "26.1", "usr/sbin/dockerd",
                    summary="dockerd 26.1.5, BuildKit 0.13 (POST /build, /session and /grpc)"),
        PeerProgram("docker-cli-20.10", "client", "20.10", "usr/bin/docker",
                    summary="docker CLI 20.10.24; `docker build` with DOCKER_BUILDKIT=1 uses POST /build"),
        PeerProgram("docker-cli-26.1", "client", "26.1", "usr/bin/docker",
                    plugins=("usr/libexec/docker/cli-plugins/docker-buildx",),
                    summary="docker CLI 26.1.5 + buildx 0.13.1; `docker build` is buildx (POST /grpc)"),
    )
}
