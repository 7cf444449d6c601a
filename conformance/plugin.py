"""pytest plugin: point the suite at an implementation, grade outcomes, write reports.

Options (each also as an environment variable):
  --daemon-under-test URL       SESSION_DAEMON_UNDER_TEST   the suite plays the client; peer:NAME starts a real
                                                            peer of `python -m conformance.peers list` for the run
  --client-under-test 'CMD'     SESSION_CLIENT_UNDER_TEST   the suite plays the daemon; CMD contains {context};
                                                            peer:NAME runs a real client peer's `docker build`
  --daemon-generation, --client-generation n|n+1|auto       auto (default): as identified, else n+1
  --known-deviations on|off     SESSION_KNOWN_DEVIATIONS    off: grade as if nothing were known of the target
  --requirement ID[,ID...]      SESSION_REQUIREMENT         only the cases that check these requirements
  --report-dir DIR              SESSION_REPORT_DIR          junit.xml, results.json, summary.md
  --allow-destructive           SESSION_ALLOW_DESTRUCTIVE   run cases that can damage a non-conforming daemon
  --keep-artifacts              SESSION_KEEP_ARTIFACTS      keep the images and build cache the run adds to a
                                                            daemon (by default removed at the end: cleanup.py)
  --conformance-profile fast|thorough                       hypothesis effort
Without a target option the suite runs against the embedded reference pairs.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from . import catalogue, cleanup, outcomes, preflight
from .identify import families_of
from . import scratch
from .targets import (
    DEFAULT_EMBEDDED_GENERATIONS, PEER_PREFIX, WARM_CLIENTS, ClientSpec, ClientTarget, DaemonSpec, attach_daemon,
    embedded_client_specs, embedded_daemon_specs, embedded_generations, identify_client, peer_client_spec,
    peer_daemon_spec, start_peer_daemon, start_reference_daemons,
)

_RESULTS_KEY = pytest.StashKey[list]()
_EMBEDDED_DAEMONS_KEY = pytest.StashKey[list]()  # the embedded daemons the selected cases use
_STARTED_KEY = pytest.StashKey[tuple]()  # (wall clock, monotonic) when the run started


def _embedded_generations_option(value: str) -> tuple[str, ...]:
    import argparse

    try:
        return embedded_generations(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("session-conformance", "Docker client session conformance")
    group.addoption("--daemon-under-test", default=os.environ.get("SESSION_DAEMON_UNDER_TEST"),
                    help="Engine API URL (unix:///path or tcp://host:port) of the daemon to test, or peer:NAME "
                         "for a private real daemon of `python -m conformance.peers list` (e.g. peer:dockerd-26.1)")
    group.addoption("--daemon-generation", default=os.environ.get("SESSION_DAEMON_GENERATION", "auto"),
                    choices=["n", "n+1", "auto"],
                    help="protocol generation the daemon under test claims (auto: as identified, else n+1)")
    group.addoption("--client-under-test", default=os.environ.get("SESSION_CLIENT_UNDER_TEST"),
                    help="command that runs one build against DOCKER_HOST; '{context}' marks the context "
                         "argument, e.g. 'docker build --progress plain {context}'; or peer:NAME for a real client "
                         "peer (e.g. peer:docker-cli-20.10)")
    group.addoption("--client-generation", default=os.environ.get("SESSION_CLIENT_GENERATION", "auto"),
                    choices=["n", "n+1", "auto"],
                    help="protocol generation the client under test claims (auto: as identified, else n+1)")
    group.addoption("--requirement", default=os.environ.get("SESSION_REQUIREMENT"), metavar="ID[,ID...]",
                    help="run only the cases that check one of these requirements (conformance/SPEC.md IDs)")
    group.addoption("--known-deviations", default=os.environ.get("SESSION_KNOWN_DEVIATIONS", "on"),
                    choices=["on", "off"],
                    help="on: a failure SPEC.md lists as a known deviation of the identified implementation is "
                         "an expected failure; off: it is a FAIL like any other")
    group.addoption("--report-dir", default=os.environ.get("SESSION_REPORT_DIR"),
                    help="write junit.xml, results.json and summary.md here (a run without conformance cases "
                         "writes nothing)")
    group.addoption("--allow-destructive", action="store_true",
                    default=os.environ.get("SESSION_ALLOW_DESTRUCTIVE", "") not in ("", "0", "false"),
                    help="run cases that can corrupt or crash a non-conforming daemon (use a disposable one)")
    group.addoption("--keep-artifacts", action="store_true",
                    default=os.environ.get("SESSION_KEEP_ARTIFACTS", "") not in ("", "0", "false"),
                    help="keep the images, tags and build-cache records the run adds to a daemon (by default "
                         "what was not there when the run attached is removed when it ends)")
    group.addoption("--conformance-profile", default=os.environ.get("SESSION_CONFORMANCE_PROFILE", "fast"),
                    choices=["fast", "thorough"])
    group.addoption("--embedded-generations", type=_embedded_generations_option,
                    default=os.environ.get("SESSION_EMBEDDED_GENERATIONS", DEFAULT_EMBEDDED_GENERATIONS),
                    metavar="GEN[,GEN...]|all",
                    help="the generations of the embedded reference pairs tested when no target is given "
                         f"(default {DEFAULT_EMBEDDED_GENERATIONS}, the two that real Docker has; all adds n-1, "
                         "the 2017 design)")


# Every marker of conformance/ and tests/ (pytest-timeout registers its own): registered here, so an installed
# suite, or a project that merely has the plugin installed, gets no PytestUnknownMarkWarning.
MARKERS = (
    "requirement(*ids): the requirement IDs (conformance/SPEC.md) a test checks",
    "destructive: may corrupt or crash a non-conforming daemon",
    "slow: a long case (the thorough profile or a real peer's timers)",
    "real_peer: needs a real peer (python -m conformance.peers list), started by the test",
    "preflight: a pre-flight case of conformance/preflight.py (runs first, is not overruled by the pre-flight)",
)


@pytest.hookimpl(tryfirst=True)  # before the tmp_path plugin reads --basetemp
def pytest_configure(config: pytest.Config) -> None:
    for marker in MARKERS:
        config.addinivalue_line("markers", marker)
    if _names_this_package(config):
        # there the controller of an xdist run, which runs no case, made its workers' base and left it behind
        scratch.tmp_path_in_run(config)
    config.stash[_RESULTS_KEY] = []
    config.stash[_STARTED_KEY] = (time.time(), time.monotonic())
    _CONFIG[0] = config
    # Nothing is written yet: --report-dir takes effect only in a run with conformance cases (see _is_case).
    try:
        from hypothesis import settings
    except ImportError:  # installed without the [suite] extra: the property cases cannot run anyway
        return
    settings.register_profile("conformance-fast", max_examples=15, deadline=None)
    settings.register_profile("conformance-thorough", max_examples=200, deadline=None)


# -- targets ---------------------------------------------------------------------

def daemon_specs(config: pytest.Config) -> list[DaemonSpec]:
    url = config.getoption("daemon_under_test")
    generation = config.getoption("daemon_generation")
    if url and url.startswith(PEER_PREFIX):
        return [peer_daemon_spec(url[len(PEER_PREFIX):], generation)]
    if url:
        return [DaemonSpec("under-test", url=url, generation=generation)]
    return embedded_daemon_specs(config.getoption("embedded_generations"))


def client_specs(config: pytest.Config, *, pair: bool) -> list[ClientSpec | None]:
    command = config.getoption("client_under_test")
    generation = config.getoption("client_generation")
    if command and command.startswith(PEER_PREFIX):
        return [peer_client_spec(command[len(PEER_PREFIX):], generation)]
    if command:
        return [ClientSpec("under-test", command, generation)]
    if config.getoption("daemon_under_test") and not pair:
        return [None]  # client-role tests have nothing to test when only a daemon is under test
    return embedded_client_specs(config.getoption("embedded_generations"))


def _owns_fixture(fixtureinfo, name: str) -> bool:
    """Whether a test's fixture `name` is this plugin's (a project may have a `client` fixture of its own, which
    the plugin must leave alone)."""
    definitions = getattr(fixtureinfo, "name2fixturedefs", {}).get(name) or ()
    return bool(definitions) and getattr(definitions[-1].func, "__module__", None) == __name__


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    fixtureinfo = metafunc.definition._fixtureinfo
    names = [name for name in ("daemon", "client") if _owns_fixture(fixtureinfo, name)]
    if not names:
        return
    config = metafunc.config
    pair = "daemon" in names and "client" in names
    if "daemon" in names:
        specs = daemon_specs(config)
        if config.getoption("client_under_test") and not pair:
            specs = [None]  # daemon-role tests are not what a client run is about
        metafunc.parametrize("daemon", specs, ids=[s.id if s else "daemon=none" for s in specs], indirect=True)
    if "client" in names:
        specs = client_specs(config, pair=pair)
        metafunc.parametrize("client", specs, ids=[s.id if s else "client=none" for s in specs], indirect=True)


_started: dict[DaemonSpec, object] = {}


_DEVIATIONS_KEY = pytest.StashKey[dict]()


def _apply_known_deviations(request: pytest.FixtureRequest, implementation: str) -> None:
    """Remember which of the test's requirements the target is known to break.

    Only a failure of exactly such a requirement becomes an expected failure
    (see pytest_runtest_makereport); any other failure of the test stays a FAIL.
    """
    from .catalogue import load_catalogue

    if request.config.getoption("known_deviations") == "off":
        return
    families = families_of(implementation)
    if not families:
        return
    catalogue = load_catalogue()
    known = request.node.stash.setdefault(_DEVIATIONS_KEY, {})
    for mark in request.node.iter_markers("requirement"):
        for req_id in mark.args:
            req = catalogue.get(req_id)
            text = (req.known_deviations or "") if req else ""
            if any(_names_family(text, family) for family in families):
                known[req_id] = f"known deviation of {implementation} from {req_id}: {text}"


_PREFLIGHT_KEY = pytest.StashKey[tuple]()


def _apply_generation_preflight(request: pytest.FixtureRequest, target) -> None:
    """When the daemon does not speak the generation it is graded by, a failure of a rule of that generation
    alone is the pre-flight's verdict (test_daemon_preflight), NOT REACHED here."""
    reqs = [r for m in request.node.iter_markers("requirement") for r in m.args]
    if not reqs:
        return
    check = preflight.generation_check(target)
    overruled = check.overruled(reqs)
    if overruled:
        request.node.stash[_PREFLIGHT_KEY] = (overruled, check.reason())


def _names_family(text: str, family: str) -> bool:
    """Whether a Known deviations text names ``family`` ('dockerd 20.10' in 'dockerd 20.10.24 ...'), and not a
    longer one: 'buildx 0.1' is not 'buildx 0.13.1', 'reference-daemon 0.1' not 'reference-daemon 0.1 via grpcio'."""
    import re

    return re.search(re.escape(family) + r"(?!\d)(?! via )", text) is not None


@pytest.fixture(scope="session")
def _daemon_pool(request: pytest.FixtureRequest):
    yield _started
    from concurrent.futures import ThreadPoolExecutor

    def finish(spec: DaemonSpec, target) -> None:
        try:
            _clean_daemon(request.config, spec, target)
        finally:
            target.stop()

    # side by side: stopping a daemon and removing its root are waits on the process and the disk
    with ThreadPoolExecutor(max_workers=max(1, len(_started))) as pool:
        for future in [pool.submit(finish, spec, target) for spec, target in _started.items()]:
            future.result()
    _started.clear()


# -- leaving a daemon as the run found it (conformance/cleanup.py says which process cleans what) -------------

_snapshots: dict[DaemonSpec, cleanup.Snapshot | str] = {}  # a snapshot, or why none could be taken
_CLEANUP_OUTPUT = "conformance-cleanup"  # the worker's results, in xdist's workeroutput
_cleanup_results: list[dict] = []
_kept_hosts: list[str] = []


def _snapshot_of(config: pytest.Config, spec: DaemonSpec, host: str, implementation: str | None = None) -> None:
    if config.getoption("keep_artifacts"):
        _kept_hosts.append(host)
        _publish_cleanup(config)
        return
    try:
        _snapshots[spec] = cleanup.Snapshot.take(host, implementation)
    except (OSError, cleanup.CleanupError, ValueError) as exc:
        _snapshots[spec] = f"no snapshot of {host} ({exc}): nothing removed"


def _clean_daemon(config: pytest.Config, spec: DaemonSpec, target=None) -> None:
    snapshot = _snapshots.pop(spec, None)
    if isinstance(snapshot, str):
        result = cleanup.Removed(target.host if target is not None else spec.url, problems=[snapshot]).as_dict()
    elif snapshot is None or (target is not None and not target.alive()):
        return
    else:
        result = cleanup.remove_what_the_run_added(snapshot).as_dict()
    _cleanup_results.append(result)
    _publish_cleanup(config)


def _publish_cleanup(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):  # set at once: the worker may be on its way out
        config.workeroutput[_CLEANUP_OUTPUT] = json.dumps({"results": _cleanup_results, "kept": _kept_hosts})


def _is_external(spec: DaemonSpec | None) -> bool:
    return spec is not None and bool(spec.url) and not spec.peer


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    # before xdist starts its workers (its own hook runs last): an external daemon's state before the run
    config = session.config
    if hasattr(config, "workerinput"):
        return
    _start_junit(config)
    if not config.getoption("daemon_under_test"):
        return
    missing = session_preflight(config)
    for spec in daemon_specs(config):
        if _is_external(spec) and spec.id not in missing:  # no session protocol: no case builds on it
            _snapshot_of(config, spec, spec.url)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    output = getattr(node, "workeroutput", None) or {}
    if _CLEANUP_OUTPUT in output:
        data = json.loads(output[_CLEANUP_OUTPUT])
        _cleanup_results.extend(data["results"])
        _kept_hosts.extend(data["kept"])


@pytest.fixture
def daemon(request: pytest.FixtureRequest, _daemon_pool):
    """The daemon under test (embedded reference daemons are started once per session)."""
    spec: DaemonSpec | None = request.param
    if spec is None:
        pytest.skip("testing a client only: daemon-role cases do not apply")
    target = _daemon_pool.get(spec)
    if target is None:
        if spec.peer:
            target = start_peer_daemon(spec)
        elif spec.url:
            target = attach_daemon(spec)
        else:  # the first embedded daemon a case needs: start every one the run's cases need, side by side
            wanted = [s for s in request.config.stash.get(_EMBEDDED_DAEMONS_KEY, []) if s not in _daemon_pool]
            for started in start_reference_daemons(wanted if spec in wanted else [spec]):
                _daemon_pool[started.spec] = started
            target = _daemon_pool[spec]
        _daemon_pool[spec] = target
        if not _is_external(spec) and target.root is None:  # a daemon this process started: its own to clean
            # (an embedded reference daemon needs no cleaning: its whole root goes when it stops)
            _snapshot_of(request.config, spec, target.host, target.implementation)
    if target.private_peer is not None and not target.alive():
        # A private real peer is disposable: a destructive case may have crashed it (dockerd 20.10.24 dies of a
        # bare ".."), and the cases after it deserve a daemon.
        died = target.logs()
        target.stop()
        target = _daemon_pool[spec] = start_peer_daemon(spec)
        target.restarted_after = died[-2000:]
        _snapshot_of(request.config, spec, target.host, target.implementation)
    is_preflight = request.node.get_closest_marker("preflight") is not None
    if not is_preflight and not target.alive(ping=False):
        pytest.fail(f"daemon {spec.name} is not answering (it died in an earlier case):\n{target.logs()}")
    if not is_preflight:
        _apply_generation_preflight(request, target)
    _apply_known_deviations(request, target.implementation)
    request.node.user_properties.append(("target", spec.name))
    request.node.user_properties.append(("daemon_implementation", target.implementation))
    if target.identity is not None:
        request.node.user_properties.append(("daemon_identified_by", "; ".join(target.identity.evidence)))
    yield target


@pytest.fixture
def client(request: pytest.FixtureRequest):
    """The client under test: a command run once per build, with DOCKER_HOST set."""
    spec: ClientSpec | None = request.param
    if spec is None:
        pytest.skip("testing a daemon only: client-role cases do not apply")
    identity = _identified_clients.get(spec)
    if identity is None:
        identity = _identified_clients[spec] = identify_client(spec)
    _apply_known_deviations(request, identity.implementation)
    request.node.user_properties.append(("client", spec.name))
    request.node.user_properties.append(("client_implementation", identity.implementation))
    request.node.user_properties.append(("client_identified_by", "; ".join(identity.evidence)))
    return ClientTarget(spec, identity.implementation, identity)


# One probe run per client and process: its identity does not change during the run.
_identified_clients: dict[ClientSpec, object] = {}


@pytest.fixture
def allow_destructive(request: pytest.FixtureRequest) -> bool:
    return request.config.getoption("allow_destructive")


def _wanted_requirements(config: pytest.Config) -> set[str] | None:
    """--requirement IDs, checked against the catalogue (a typo must not silently select nothing)."""
    raw = config.getoption("requirement")
    if not raw:
        return None
    from .catalogue import load_catalogue

    wanted = {part.strip() for part in raw.split(",") if part.strip()}
    unknown = sorted(wanted - set(load_catalogue()))
    if unknown:
        raise pytest.UsageError(f"--requirement: not in conformance/SPEC.md: {', '.join(unknown)}")
    return wanted


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _names_this_package(config: pytest.Config) -> bool:
    """Whether the command line asks for the suite's own modules (a path in the package, or --pyargs of it)."""
    for arg in config.args:
        target = arg.split("::")[0]
        if config.option.pyargs and (target == __package__ or target.startswith(__package__ + ".")):
            return True
        path = os.path.abspath(os.path.join(str(config.invocation_params.dir), target))
        if path == _PACKAGE_DIR or path.startswith(_PACKAGE_DIR + os.sep):
            return True
    return False


_CASE_KEY = pytest.StashKey[bool]()


def _is_case(item: pytest.Item) -> bool:
    """Whether the plugin grades and reports this test: a test of the suite's own modules, one that names
    requirements, or one that takes the daemon or client under test. Any other test (an unrelated project's, in
    an environment where the plugin is installed) is left alone."""
    case = item.stash.get(_CASE_KEY, None)
    if case is None:
        fixtureinfo = getattr(item, "_fixtureinfo", None)
        case = item.stash[_CASE_KEY] = (
            str(item.path).startswith(_PACKAGE_DIR + os.sep)
            or item.get_closest_marker("requirement") is not None
            or any(_owns_fixture(fixtureinfo, name) for name in ("daemon", "client")))
    return case

# {daemon spec id: what the daemon answered} of the external daemons without the session protocol
_no_session_protocol: dict[str, str] = {}
_deselected_for: dict[str, int] = {}
_session_probed = [False]


def session_preflight(config: pytest.Config) -> dict[str, str]:
    """Probe each external daemon under test once per process for the session protocol (preflight.py)."""
    if config.getoption("daemon_under_test") and not _session_probed[0]:
        _session_probed[0] = True
        for spec in daemon_specs(config):
            if _is_external(spec):
                endpoint = preflight.session_endpoint(spec.url)
                if not endpoint.ok:
                    _no_session_protocol[spec.id] = endpoint.evidence
    return _no_session_protocol


def _preflight_lines(config: pytest.Config) -> list[str]:
    lines = []
    for target_id, evidence in session_preflight(config).items():
        count = _deselected_for.get(target_id)  # known where the collection ran (not in an xdist controller)
        lines.append(f"{target_id} has no session protocol ({evidence}): HANDSHAKE-8 is its one verdict, "
                     f"{f'its {count} other cases were' if count else 'its other cases were'} deselected")
    return lines


def _deselect_for_missing_session_protocol(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A daemon without the session protocol gets its pre-flight verdict (HANDSHAKE-8) and nothing else."""
    missing = session_preflight(config)
    if not missing:
        return
    keep, drop = [], []
    for item in items:
        spec = getattr(item, "callspec", None) and item.callspec.params.get("daemon")
        if (spec is not None and getattr(spec, "id", None) in missing
                and item.originalname != "test_daemon_serves_the_session_endpoint"):
            drop.append(item)
            _deselected_for[spec.id] = _deselected_for.get(spec.id, 0) + 1
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    wanted = _wanted_requirements(config)
    if wanted is not None:
        keep = [item for item in items if wanted & {r for m in item.iter_markers("requirement") for r in m.args}]
        if len(keep) != len(items):
            config.hook.pytest_deselected(items=[item for item in items if item not in keep])
            items[:] = keep
    _deselect_for_missing_session_protocol(config, items)
    items.sort(key=lambda item: item.get_closest_marker("preflight") is None)  # stable: the pre-flight first
    if any(str(item.path).startswith(_PACKAGE_DIR + os.sep) for item in items):
        scratch.RUN.open()  # the run's temporary files, removed at pytest_unconfigure
    params = [getattr(item, "callspec", None) and item.callspec.params.get("daemon") for item in items]
    config.stash[_EMBEDDED_DAEMONS_KEY] = list(dict.fromkeys(
        p for p in params if isinstance(p, DaemonSpec) and not p.peer and not p.url))
    if not config.option.collectonly and any(
            isinstance(getattr(item, "callspec", None) and item.callspec.params.get("client"), ClientSpec)
            and item.callspec.params["client"].warm for item in items):
        WARM_CLIENTS.start()  # it imports the client meanwhile: ready by the first client case
    for item in items:
        if item.get_closest_marker("destructive") and not config.getoption("allow_destructive"):
            daemon_param = getattr(item, "callspec", None) and item.callspec.params.get("daemon")
            if daemon_param is not None and getattr(daemon_param, "url", None):
                item.add_marker(pytest.mark.skip(
                    reason="destructive against an external daemon: pass --allow-destructive for a disposable one"))
            elif daemon_param is not None and getattr(daemon_param, "peer", None):
                # A private peer runs on this host as root: a daemon that follows a bare ".." writes anywhere.
                item.add_marker(pytest.mark.skip(
                    reason="destructive against a real daemon on this host: run it in Docker in Docker "
                           "(tox -e interop) or pass --allow-destructive"))


# -- outcomes and reports ------------------------------------------------------------

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    # a wrapper runs before every plain setup hook (a skip mark's too): the tally is this test's from here on
    outcomes.reset_checks()
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    excinfo = call.excinfo
    known = item.stash.get(_DEVIATIONS_KEY, {})
    failed_req = getattr(excinfo.value, "req_id", None) if excinfo is not None else None
    # An UNSUPPORTED case or a known deviation is graded from the exception alone: pytest's traceback of it
    # (each frame's module parsed for its statement) is never shown, and cost a second or two a run.
    brief = excinfo is not None and call.when == "call" and (
        isinstance(excinfo.value, outcomes.Unsupported) or failed_req in known)
    if brief:
        item.repr_failure = lambda excinfo, style=None: str(excinfo.value)
    try:
        outcome = yield
    finally:
        if brief:
            del item.repr_failure
    report: pytest.TestReport = outcome.get_result()
    if excinfo is not None and report.when == "call":
        overruled, why = item.stash.get(_PREFLIGHT_KEY, (set(), ""))
        if failed_req in overruled and isinstance(excinfo.value, (AssertionError, outcomes.NonStrict)):
            report.outcome = "skipped"
            report.preflight = f"{failed_req} not graded: {why}"
            report.longrepr = (str(item.path), item.location[1] or 0, f"NOT REACHED: {report.preflight}")
        elif failed_req in known and not hasattr(report, "wasxfail"):
            report.outcome = "skipped"
            report.wasxfail = known[failed_req]
        elif isinstance(excinfo.value, outcomes.NonStrict) and not hasattr(report, "wasxfail"):
            report.outcome = "passed"
            report.sections.append(("NON-STRICT", str(excinfo.value)))
            report.non_strict = str(excinfo.value)
        elif isinstance(excinfo.value, outcomes.Unsupported):
            report.outcome = "skipped"
            report.longrepr = (str(item.path), item.location[1] or 0, f"UNSUPPORTED: {excinfo.value}")
    if _is_case(item) and (report.when == "call" or (report.when == "setup" and not report.passed)):
        grade = (outcomes.NON_STRICT if getattr(report, "non_strict", None) else
                 outcomes.NOT_REACHED if getattr(report, "preflight", None) else outcomes.classify(report, excinfo))
        reqs = [r for m in item.iter_markers("requirement") for r in m.args]
        exc = excinfo.value if excinfo is not None else None
        checks, not_applicable = outcomes.checks_made(), outcomes.declared_not_applicable()
        # A test without a requirement marker is no conformance case (a unit test of the harness, say): its
        # checks are kept but grade nothing.
        verdicts = outcomes.case_verdicts(reqs, grade, getattr(exc, "req_id", None), checks,
                                          not_applicable) if reqs else {}
        profiles = outcomes.declared_profiles()
        if outcomes.BODY_UPLOAD in profiles and verdicts:
            verdicts, grade, outside = outcomes.grade_by_profile(
                verdicts, grade, getattr(exc, "req_id", None),
                lambda req_id: catalogue.in_profile(outcomes.BODY_UPLOAD, req_id),
                missing_service=grade == outcomes.ERROR and "UNIMPLEMENTED" in str(exc))
            why = (f"not in the body-upload profile (conformance/SPEC.md): the client sent its context as the "
                   f"/build body ({profiles[outcomes.BODY_UPLOAD]})")
            not_applicable = {**not_applicable, **{r: why for r in outside}}
            if grade == outcomes.UNSUPPORTED and report.outcome != "skipped":
                report.outcome = "skipped"
                report.longrepr = (str(item.path), item.location[1] or 0, f"UNSUPPORTED: {why}")
            elif grade == outcomes.PASS and report.outcome != "passed":
                report.outcome, report.longrepr = "passed", None
        record = {
            "nodeid": item.nodeid,
            "name": item.name,
            "requirements": reqs,
            "outcome": grade,
            "verdicts": verdicts,  # each requirement's own grade in this case (see conformance/outcomes.py)
            "checks": checks,
            "not_applicable": {r: why for r, why in not_applicable.items() if r in verdicts},  # the reasons
            "unnamed_checks": sorted(set(verdicts) - set(reqs)),  # a harness bug: the marker should name them
            "duration": round(report.duration, 3),
            "targets": {k: v for k, v in item.user_properties if k in ("target", "client")},
            "implementations": {k.split("_", 1)[0]: v for k, v in item.user_properties
                                if k in ("daemon_implementation", "client_implementation")},
            "identified_by": {k.split("_", 1)[0]: v for k, v in item.user_properties
                              if k in ("daemon_identified_by", "client_identified_by")},
            "failed_requirement": getattr(exc, "req_id", None),
            "message": _short_message(report, exc),
            "expected": _text(getattr(exc, "expected", None)),
            "actual": _text(getattr(exc, "actual", None)),
            "transcript": list(getattr(exc, "transcript", []) or []),
            "seed": getattr(exc, "seed", None),
            "rerun": rerun_command(item, getattr(exc, "seed", None)),
            "preflight": getattr(report, "preflight", None),  # why the pre-flight's verdict stands for this case
            # an XFAIL's known deviation: SPEC.md's text of it, with its evidence
            "known_deviation": getattr(report, "wasxfail", None) if grade == outcomes.XFAIL else None,
        }
        if grade in (outcomes.FAIL, outcomes.ERROR, outcomes.NON_STRICT, outcomes.XFAIL):
            report.sections.append(("rerun this case", record["rerun"]))
        # travels with the report, so under xdist the controller collects every worker's records
        report.user_properties.append((_RECORD_PROPERTY, json.dumps(record)))
        for req in reqs:
            item.user_properties.append(("requirement", req))
        item.user_properties.append(("outcome", grade))
        for req, verdict in verdicts.items():
            item.user_properties.append((f"verdict:{req}", verdict))


_RECORD_PROPERTY = "conformance-record"

# Options that decide what a case runs against and how it is graded: a rerun repeats them.
_RERUN_OPTIONS = (("daemon_under_test", "--daemon-under-test", None), ("client_under_test", "--client-under-test", None),
                  ("daemon_generation", "--daemon-generation", "auto"),
                  ("client_generation", "--client-generation", "auto"),
                  ("known_deviations", "--known-deviations", "on"), ("conformance_profile", "--conformance-profile", "fast"),
                  ("embedded_generations", "--embedded-generations", embedded_generations(DEFAULT_EMBEDDED_GENERATIONS)))


def rerun_command(item: pytest.Item, seed: str | None = None) -> str:
    """A command that reruns exactly this case: a case of the suite pasted anywhere, in a clone or wherever
    the suite is installed (``--pyargs`` finds the module either way); another test at the root of its clone."""
    import shlex

    module = getattr(getattr(item, "module", None), "__name__", None)
    case = item.nodeid.split("::", 1)[1] if "::" in item.nodeid else item.name
    if module and str(item.path).startswith(_PACKAGE_DIR + os.sep):
        # a case of the suite: --pyargs finds the package installed or in a clone, from any directory
        argv = ["python", "-m", "pytest", "--pyargs", f"{module}::{case}", "-p", "no:cacheprovider"]
    else:
        # a test of a clone (tests/...) is no importable module: its node id, pasted at the clone's root
        argv = ["python", "-m", "pytest", item.nodeid, "-p", "no:cacheprovider"]
    config = item.config
    for name, flag, default in _RERUN_OPTIONS:
        value = config.getoption(name)
        if value not in (None, default):
            argv += [flag, ",".join(value) if isinstance(value, tuple) else str(value)]
    if config.getoption("allow_destructive"):
        argv.append("--allow-destructive")
    seed = seed or config.getoption("hypothesis_seed", None)
    if seed:
        argv.append(f"--hypothesis-seed={seed}")
    return " ".join(shlex.quote(part) for part in argv)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    config = _CONFIG[0]
    for name, value in report.user_properties:
        if name == _RECORD_PROPERTY:
            config.stash[_RESULTS_KEY].append(json.loads(value))
    junit = config.stash.get(_JUNIT_KEY, None)
    if junit is not None:
        junit.pytest_runtest_logreport(report)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    junit = _CONFIG[0].stash.get(_JUNIT_KEY, None)
    if junit is not None:
        junit.pytest_collectreport(report)


_JUNIT_KEY = pytest.StashKey[object]()


def _start_junit(config: pytest.Config) -> None:
    """pytest's own junit writer for --report-dir, set up as `--junitxml DIR/junit.xml` would but not registered:
    the plugin feeds it every report and has it write only at the end of a run with conformance cases, so a run
    that has none (an unrelated project's, with SESSION_REPORT_DIR set) writes nothing."""
    report_dir = config.getoption("report_dir")
    if not report_dir or getattr(config.option, "xmlpath", None):
        return  # no report directory, or the user's own --junitxml, which pytest writes as always
    from _pytest.junitxml import LogXML

    junit = LogXML(os.path.join(report_dir, "junit.xml"), config.option.junitprefix,
                   config.getini("junit_suite_name"), config.getini("junit_logging"),
                   config.getini("junit_duration_report"), config.getini("junit_family"),
                   config.getini("junit_log_passing_tests"))
    junit.pytest_sessionstart()
    config.stash[_JUNIT_KEY] = junit


_CONFIG: list = [None]


def _text(value) -> str | None:
    return None if value is None else str(value)


def _short_message(report: pytest.TestReport, exc: BaseException | None = None) -> str:
    if report.passed and not getattr(report, "non_strict", None):
        return ""
    if getattr(report, "non_strict", None):
        return report.non_strict
    if exc is not None and not isinstance(exc, (AssertionError, outcomes.Unsupported)) and not report.skipped:
        # an ERROR: what broke, in its own words (a precondition says what the peer did), not the test's source
        return f"{type(exc).__name__}: {exc}"[-4000:]
    if isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])
    text = str(report.longrepr or "")
    return text[-4000:]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    if hasattr(config, "workerinput"):
        return  # an xdist worker: the controller writes the reports
    for spec in [spec for spec in _snapshots if _is_external(spec)]:
        _clean_daemon(config, spec)  # every worker has finished
    results = config.stash.get(_RESULTS_KEY, [])
    report_dir = config.getoption("report_dir")
    if report_dir and results:  # a run without conformance cases writes no report
        from .report import write_reports

        os.makedirs(report_dir, exist_ok=True)
        started, clock = config.stash.get(_STARTED_KEY, (time.time(), time.monotonic()))
        write_reports(report_dir, results, config, _preflight_lines(config),
                      run={"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                           "seconds": round(time.monotonic() - clock, 1)})
        junit = config.stash.get(_JUNIT_KEY, None)
        if junit is not None:
            junit.pytest_sessionfinish()


def pytest_unconfigure(config: pytest.Config) -> None:
    WARM_CLIENTS.close()
    scratch.RUN.close()


_VERDICT_ORDER = (outcomes.ERROR, outcomes.FAIL, outcomes.NON_STRICT, outcomes.XFAIL, outcomes.UNSUPPORTED)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """One line per requirement that did not PASS on a target, the counts in the grading's own words, and
    where the report is."""
    if hasattr(config, "workerinput"):
        return
    cleaned = cleanup.summary_line(_cleanup_results, kept=_kept_hosts)
    if cleaned:
        terminalreporter.write_line(cleaned)
    results = [r for r in config.stash.get(_RESULTS_KEY, []) if r["requirements"]]
    for line in _preflight_lines(config):
        terminalreporter.write_line(f"pre-flight: {line}")
    if not results:
        return
    from .report import _target_of, summarise

    summary = summarise(results)
    lines = []
    not_reached: dict[str, list[str]] = {}
    for req_id, entry in sorted(summary["requirements"].items()):
        for target, verdict in sorted(entry["targets"].items()):
            if verdict in _VERDICT_ORDER:
                lines.append((_VERDICT_ORDER.index(verdict), f"{verdict:<11} {req_id} ({entry['level']}) on "
                                                              f"{target}: {entry['title']}"))
            elif verdict == outcomes.NOT_REACHED:  # no case of this target graded it otherwise
                not_reached.setdefault(target, []).append(req_id)
    write = terminalreporter.write_line
    terminalreporter.section("conformance verdicts")
    for _, line in sorted(lines):
        write(line)
    overruled: dict[tuple[str, str], set[str]] = {}
    for record in results:
        if record.get("preflight"):
            _, _, why = record["preflight"].partition(" not graded: ")
            overruled.setdefault((_target_of(record), why), set()).update(record["verdicts"])
    for (target, why), req_ids in sorted(overruled.items()):
        write(f"not reached: {len(req_ids)} requirement{'s' if len(req_ids) != 1 else ''} on {target}, their "
              f"cases failed a rule the pre-flight "
              f"already graded: {', '.join(sorted(req_ids))}; {why}")
        not_reached[target] = [r for r in not_reached.get(target, []) if r not in req_ids]
    for target, req_ids in sorted(not_reached.items()):
        if not req_ids:
            continue
        write(f"not reached: {len(req_ids)} requirement{'s' if len(req_ids) != 1 else ''} on {target}, their cases "
              f"stopped at another requirement first: {', '.join(req_ids)}")
    for record in results:
        for req_id in record.get("unnamed_checks", []):
            write(f"harness warning: {record['nodeid']} checks {req_id}, which its requirement marker does not name")
    counts = {}
    for record in results:
        counts[record["outcome"]] = counts.get(record["outcome"], 0) + 1
    order = (outcomes.PASS, outcomes.FAIL, outcomes.NON_STRICT, outcomes.UNSUPPORTED, outcomes.XFAIL, outcomes.ERROR)
    write("cases: " + ", ".join(f"{counts.get(k, 0)} {k}" for k in order)
          + (f", {counts['SKIPPED']} not applicable" if counts.get("SKIPPED") else ""))
    report_dir = config.getoption("report_dir")
    write(f"report: {os.path.abspath(report_dir)}/summary.md (results.json, junit.xml)" if report_dir
          else "report: pass --report-dir DIR for summary.md, results.json and junit.xml")
