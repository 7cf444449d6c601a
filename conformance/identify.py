"""Which implementation a target is, from what it reports and does, never from a binary's path.

A daemon is asked what a client would ask (``/_ping``, ``/version``) and probed for the two upgrade
endpoints (``POST /session`` and ``POST /grpc`` without an ``Upgrade`` header: a daemon that has the route
refuses the request, one that does not answers 404). A client is run once against a recording daemon, and
named by the ``User-Agent`` of its requests and by the endpoints it used.

The result names the implementation (``dockerd 26.1.5+dfsg1``), its family (``dockerd 26.1``, the key of
SPEC.md's known deviations), the protocol generation it was detected as, and the evidence.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from reference.dockerhost import api_call

# dockerd releases jumped from 20.10 to 23.0; 23.0 and later embed a BuildKit whose session (health
# policy, metadata encoding, exporter metadata) is the one generation n+1 describes (observed on 26.1).
_FIRST_N_PLUS_1_ENGINE = (23, 0)
_VERSION = re.compile(r"v?(\d+)\.(\d+)")


@dataclass
class Identity:
    implementation: str  # "dockerd 26.1.5+dfsg1", "docker CLI 20.10.24+dfsg1", "reference-daemon 0.1.0 (n+1)"
    family: str | None  # "dockerd 26.1": what SPEC.md's "Known deviations" lines name
    generation: str | None  # "n" | "n+1" when detected
    evidence: list[str] = field(default_factory=list)
    endpoints: dict[str, bool] = field(default_factory=dict)  # daemon: {"/session": True, "/grpc": False}

    def describe(self) -> str:
        generation = f", generation {self.generation}" if self.generation else ""
        return f"{self.implementation}{generation} (identified by: {'; '.join(self.evidence) or 'nothing'})"


def family_of(implementation: str) -> str | None:
    """'dockerd 20.10.24' -> 'dockerd 20.10'; 'reference-daemon 0.1.0 (n+1) via grpcio' ->
    'reference-daemon 0.1 via grpcio'."""
    match = re.match(r"(.*?)\s+v?(\d+)\.(\d+)", implementation)
    if not match or implementation.startswith("Docker-compatible"):  # known deviations name no imitation
        return None
    via = re.search(r" via (\S+)$", implementation)
    return f"{match.group(1)} {match.group(2)}.{match.group(3)}" + (via.group(0) if via else "")


def families_of(implementation: str) -> list[str]:
    """Every family a Known deviations line may name the implementation by: a docker CLI with buildx is
    also 'buildx 0.13' (the plugin runs the build)."""
    families = [family for family in (family_of(implementation),) if family]
    plugin = re.search(r"\+ buildx v?(\d+)\.(\d+)", implementation)
    if plugin:
        families.insert(0, f"buildx {plugin.group(1)}.{plugin.group(2)}")
    return families


def engine_generation(version: str) -> str | None:
    """The generation of a dockerd or docker CLI release: '20.10.24' -> 'n', '26.1.5' -> 'n+1'."""
    match = _VERSION.match(version)
    if not match:
        return None
    return "n+1" if (int(match.group(1)), int(match.group(2))) >= _FIRST_N_PLUS_1_ENGINE else "n"


def _probe_upgrade_route(host: str, path: str) -> tuple[bool, str]:
    """Whether the daemon has an upgrade route at path: it refuses a request without Upgrade (400/500)
    instead of answering 404. Returns (present, evidence)."""
    try:
        resp, body = api_call("POST", path, host=host)
    except OSError as exc:
        return False, f"POST {path}: {exc}"
    text = body.decode("utf-8", "replace").strip()[:120]
    return resp.status != 404, f"POST {path} without Upgrade: {resp.status} {text}"


def identify_daemon(host: str) -> Identity:
    evidence: list[str] = []
    try:
        resp, _ = api_call("GET", "/_ping", host=host)
        server = resp.header("Server") or ""
        api_version = resp.header("Api-Version") or ""
        evidence.append(f"/_ping {resp.status}, Server {server or '(none)'}, API {api_version or '?'}")
        resp, body = api_call("GET", "/version", host=host)
        info = json.loads(body) if resp.status == 200 else {}
    except (OSError, ValueError) as exc:
        return Identity(f"unknown ({exc})", None, None, [f"no answer: {exc}"])
    components = {c.get("Name"): c for c in info.get("Components") or [] if isinstance(c, dict)}
    endpoints = {}
    for path in ("/session", "/grpc"):
        endpoints[path], probe = _probe_upgrade_route(host, path)
        evidence.append(probe)
    version = str(info.get("Version", "?"))
    if "reference-daemon" in components:
        component = components["reference-daemon"]
        details = component.get("Details") or {}
        implementation = f"reference-daemon {component.get('Version', version)}"
        generation = details.get("Generation")
        evidence.append(f"/version component reference-daemon {component.get('Version')}")
    elif "Engine" in components and server.startswith("Docker/") and endpoints["/session"]:
        # dockerd: an "Engine" component, the Server header its API router writes, and the /session route
        # every dockerd since API 1.39 serves (HANDSHAKE-8).
        engine = str(components["Engine"].get("Version", version))
        implementation = f"dockerd {engine}"
        generation = engine_generation(engine)
        evidence.append(f"/version component Engine {engine}, Server header {server}")
    elif "Engine" in components or server.startswith("Docker/"):
        # it imitates dockerd's answers but not dockerd's routes: naming it dockerd would apply dockerd's
        # known deviations and generation to it
        engine = str((components.get("Engine") or {}).get("Version", version))
        implementation = f"Docker-compatible daemon (Engine {engine})"
        generation = None
        evidence.append(f"/version component Engine {engine}, Server header {server or '(none)'}, but no "
                        "POST /session route: not dockerd")
    else:
        platform = (info.get("Platform") or {}).get("Name") or next(iter(components), None) or "daemon"
        implementation = f"{platform} {version}"
        generation = None
        evidence.append(f"/version names {platform} {version}")
    return Identity(implementation, family_of(implementation), generation, evidence, endpoints)


_DOCKER_CLIENT_AGENT = re.compile(r"^Docker-Client/(\S+)")
_REFERENCE_AGENT = re.compile(r"^docker-session-reference/(\S+)")


def identify_client_from_requests(requests: list[tuple[str, str, str]]) -> Identity:
    """Name a client from the (method, path, User-Agent) of the requests it made to a recording daemon."""
    agents = sorted({agent for _, _, agent in requests if agent})
    paths = [path for _, path, _ in requests]
    entry = "/grpc" if any(p.endswith("/grpc") for p in paths) else "/build" if any(
        p.endswith("/build") for p in paths) else None
    evidence = [f"User-Agent {', '.join(agents) or '(none)'}", f"requests {', '.join(dict.fromkeys(paths)) or '(none)'}"]
    for agent in agents:
        match = _DOCKER_CLIENT_AGENT.match(agent)
        if match and entry == "/grpc":
            # buildx (the docker CLI's build plugin since 23.0) dials /grpc; Debian's build reports
            # "Docker-Client/unknown-version" there, so only the entry point dates it.
            version = match.group(1)
            named = f"buildx (Docker-Client/{version})"
            return Identity(named, family_of(named), "n+1", evidence)
        if match:
            version = match.group(1)
            return Identity(f"docker CLI {version}", family_of(f"docker CLI {version}"),
                            engine_generation(version), evidence)
        match = _REFERENCE_AGENT.match(agent)
        if match:
            return Identity(f"reference-client {match.group(1)}", family_of(f"reference-client {match.group(1)}"),
                            None, evidence)
    if agents:
        return Identity(agents[0], family_of(agents[0].replace("/", " ")), None, evidence)
    return Identity("unknown client", None, None, evidence)


_CLI_VERSION = re.compile(r"^Docker version (\S+?),")


def identify_client_from_version(report: str, generation: str | None) -> Identity:
    """Name a docker CLI from what `docker --version` (and `docker-buildx version`) print, e.g.
    'Docker version 26.1.5+dfsg1, build a72d7cd; buildx 0.13.1+ds1'."""
    match = _CLI_VERSION.match(report)
    if not match:
        return Identity(report.strip() or "unknown client", None, generation, [f"--version: {report!r}"])
    implementation = f"docker CLI {match.group(1)}"
    plugin = re.search(r"; (buildx \S+)$", report)
    if plugin:
        implementation += f" + {plugin.group(1)}"
    return Identity(implementation, family_of(f"docker CLI {match.group(1)}"),
                    generation or engine_generation(match.group(1)), [f"its own version report: {report}"])
