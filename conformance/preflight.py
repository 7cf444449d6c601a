"""Pre-flight checks of a daemon under test: one verdict for a cause that would fail every case alike.

* ``session_endpoint``: a daemon without the session protocol at all (no ``/_ping``, or ``POST /session``
  answered 404) fails HANDSHAKE-8 once, with the HTTP status and body; the run deselects its other cases.
* ``generation_check``: a daemon graded by a generation it does not speak. One build with a non-ASCII
  ``.dockerignore`` tells ``n`` from ``n+1`` on the wire (SPEC "Protocol generations": ``n+1`` percent-encodes
  such a metadata value and adds ``<key>-encoded: 1``, ``n`` sends it raw). When the two disagree, the
  pre-flight case fails the probed rule once, and a failure of a rule that binds only the claimed generation
  elsewhere in the run is NOT REACHED with this reason instead of a FAIL of its own.

The probe build runs only when the generation the daemon is graded by is not the one it was identified as
(an unknown daemon, or an explicit ``--daemon-generation``); each process probes a target once.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field

from reference.dockerhost import api_call

# the rule each generation's probe checks: n+1 encodes the non-ASCII pattern (META-ENCODE-1), n sends it raw
PROBED_RULE = {"n+1": "META-ENCODE-1", "n": "META-1"}
_PATTERN = "日本/*"
_ENCODED = "%E6%97%A5%E6%9C%AC%2F%2A"


@dataclass
class SessionEndpoint:
    ok: bool
    evidence: str  # what the daemon answered, e.g. "POST /session without Upgrade: 404 page not found"


@dataclass
class GenerationCheck:
    claimed: str  # the generation the target is graded by
    seen: str | None  # the generation its wire behaviour showed; None: the probe could not tell
    evidence: list[str] = field(default_factory=list)

    @property
    def disagrees(self) -> bool:
        return self.seen is not None and self.seen != self.claimed

    def reason(self) -> str:
        return (f"pre-flight: graded as generation {self.claimed}, but the daemon behaves as generation {self.seen} "
                f"({'; '.join(self.evidence)}); pass --daemon-generation {self.seen}?")

    def overruled(self, req_ids) -> set[str]:
        """Of ``req_ids``, the rules that bind the claimed generation but not the one the daemon speaks."""
        from .catalogue import load_catalogue

        if not self.disagrees:
            return set()
        catalogue = load_catalogue()
        return {r for r in req_ids if r in catalogue and catalogue[r].applies_to(self.claimed)
                and not catalogue[r].applies_to(self.seen)}


def session_endpoint(host: str) -> SessionEndpoint:
    """Whether the daemon answers ``/_ping`` and has a ``POST /session`` route (any answer but 404 to a
    request without ``Upgrade``: dockerd refuses it with 400)."""
    try:
        resp, body = api_call("GET", "/_ping", host=host)
    except OSError as exc:
        return SessionEndpoint(False, f"GET /_ping: {exc}")
    if resp.status != 200:
        return SessionEndpoint(False, f"GET /_ping: {resp.status} {_text(body)}")
    try:
        resp, body = api_call("POST", "/session", host=host)
    except OSError as exc:
        return SessionEndpoint(False, f"POST /session: {exc}")
    evidence = f"POST /session without Upgrade: {resp.status} {_text(body)}"
    return SessionEndpoint(resp.status != 404, evidence)


def _text(body: bytes) -> str:
    return body.decode("utf-8", "replace").strip()[:300] or "(empty body)"


_generation_checks: dict[object, GenerationCheck] = {}


def generation_check(target) -> GenerationCheck:
    """The generation check of a DaemonTarget, probed at most once per process."""
    key = target.spec
    if key not in _generation_checks:
        _generation_checks[key] = _check_generation(target)
    return _generation_checks[key]


def _check_generation(target) -> GenerationCheck:
    claimed = target.generation
    identified = target.identity.generation if target.identity is not None else None
    if claimed not in PROBED_RULE:
        return GenerationCheck(claimed, None, [f"generation {claimed} is not probed"])
    if identified == claimed:
        return GenerationCheck(claimed, claimed, [f"identified as generation {claimed}: "
                                                  + "; ".join(target.identity.evidence)])
    return probe_generation(target.host, claimed)


def probe_generation(host: str, claimed: str) -> GenerationCheck:
    from .harness.daemon_probes import FileSyncRouter
    from .harness.scripted_client import make_context, run_build
    from reference.client.services import FILESYNC_DIFFCOPY

    ctx = make_context({".dockerignore": _PATTERN + "\n", "a": "a"})
    try:
        router = FileSyncRouter(ctx)
        obs = run_build(host, ctx, handler_overrides={FILESYNC_DIFFCOPY: router})
    finally:
        shutil.rmtree(ctx, ignore_errors=True)
    mains = [c for c in router.calls if c.main_context]
    if not router.calls:
        return GenerationCheck(claimed, None, [f"the daemon never called FileSync/DiffCopy: generation n-1, which "
                                               f"transfers with TarStream, or no session at all? ({obs.describe()})"])
    if not mains:
        return GenerationCheck(claimed, None, [f"no main context transfer among {[c.dir_name for c in router.calls]}"])
    metadata = mains[0].metadata
    patterns = [v for k, v in metadata if k == "exclude-patterns"]
    marker = [v for k, v in metadata if k == "exclude-patterns-encoded"]
    if patterns == [_ENCODED] and marker == ["1"]:
        seen, how = "n+1", f"it percent-encoded the .dockerignore pattern {_PATTERN!r} and sent exclude-patterns-encoded: 1"
    elif patterns == [_PATTERN] and not marker:
        seen, how = "n", (f"its FileSync/DiffCopy call sent the .dockerignore pattern {_PATTERN!r} raw, without "
                          "exclude-patterns-encoded (generation n+1 encodes it)")
    else:
        seen, how = None, f"exclude-patterns {patterns}, exclude-patterns-encoded {marker}: neither generation's form"
    return GenerationCheck(claimed, seen, [how])
