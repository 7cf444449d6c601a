"""conformance/cleanup.py and the plugin's --keep-artifacts: what a run adds to a daemon goes, what was there
before stays. Against an embedded reference daemon, and (real_peer) a private dockerd 26.1 and 20.10."""

from __future__ import annotations

import json
import textwrap

import pytest

from conformance import cleanup, realpeers
from conformance.harness.scripted_client import make_context, run_build
from conformance.targets import DaemonSpec, start_reference_daemon
from reference.dockerhost import api_call

pytest_plugins = ["pytester"]


@pytest.fixture
def reference_daemon():
    target = start_reference_daemon(DaemonSpec("cleanup-test", generation="n+1"))
    try:
        yield target
    finally:
        target.stop()


def _build(host: str, content: str, tag: str | None = None) -> None:
    observed = run_build(host, make_context({"f.txt": content}), query={"t": tag} if tag else {})
    assert observed.ok, observed.error


def _image_id(host: str, reference: str) -> str | None:
    resp, body = api_call("GET", f"/images/{reference}/json", host=host)
    return json.loads(body)["Id"] if resp.status == 200 else None


def test_reference_daemon_keeps_what_was_there_and_loses_what_the_run_added(reference_daemon):
    host = reference_daemon.host
    _build(host, "before", "before/image:1")
    before_id = _image_id(host, "before/image:1")
    snapshot = cleanup.Snapshot.take(host)
    assert before_id in snapshot.images and snapshot.cache_records
    assert snapshot.honours_id_filter  # one anchored id pattern per prune, as dockerd 20.10 and 26.1 take it

    _build(host, "run one", "run/image:1")
    _build(host, "run two")  # dangling
    added = set(cleanup.list_images(host)) - set(snapshot.images)
    new_records = set(cleanup.list_build_cache(host)) - snapshot.cache_records
    assert len(added) == 2 and new_records

    removed = cleanup.remove_what_the_run_added(snapshot)
    assert sorted(removed.images) == sorted(added)
    assert _image_id(host, "before/image:1") == before_id and _image_id(host, "run/image:1") is None
    assert set(cleanup.list_images(host)) == set(snapshot.images)
    # exactly the run's records go, the earlier ones survive
    assert set(removed.cache_records) == new_records and removed.cache_left == 0
    assert set(cleanup.list_build_cache(host)) == snapshot.cache_records
    line = cleanup.summary_line([removed.as_dict()])
    assert line.startswith(f"cleanup: removed 2 images and {len(new_records)} build-cache records the run added "
                           f"to {host}")


def test_without_cache_before_the_run_an_unfiltered_prune_is_safe(reference_daemon):
    host = reference_daemon.host
    snapshot = cleanup.Snapshot.take(host)
    assert not snapshot.images and not snapshot.cache_records
    _build(host, "run", "run/image:1")
    records = set(cleanup.list_build_cache(host))
    assert records
    removed = cleanup.remove_what_the_run_added(snapshot)
    assert set(removed.cache_records) == records and removed.cache_left == 0
    assert not cleanup.list_build_cache(host) and not cleanup.list_images(host)


SUITE = textwrap.dedent("""
    from conformance.harness.scripted_client import make_context, run_build

    def test_builds_an_image(daemon):
        obs = run_build(daemon.host, make_context({"x": "made by the run"}), query={"t": "made-by/run:1"})
        assert obs.ok, obs.error
""")


def _run_suite(pytester, host: str, *args: str):
    pytester.makepyfile(test_tiny=SUITE)
    return pytester.runpytest_subprocess("--daemon-under-test", host, "-p", "no:cacheprovider", *args)


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["one-process", "xdist"])
def test_a_run_removes_what_it_added_to_an_external_daemon(pytester, reference_daemon, workers):
    host = reference_daemon.host
    _build(host, "before", "before/image:1")
    result = _run_suite(pytester, host, *workers)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"cleanup: removed 1 image and * build-cache records the run added to {host}*"])
    assert _image_id(host, "made-by/run:1") is None
    assert _image_id(host, "before/image:1") is not None
    assert cleanup.list_build_cache(host)  # the records of the build before the run


def test_an_interrupted_run_cleans_too(pytester, reference_daemon):
    host = reference_daemon.host
    pytester.makepyfile(test_tiny=SUITE + "\n    raise KeyboardInterrupt\n")
    result = pytester.runpytest_subprocess("--daemon-under-test", host, "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    # nothing was there before: the run's own records go with an unfiltered prune
    result.stdout.fnmatch_lines([f"cleanup: removed 1 image and * build-cache records the run added to {host}*"])
    assert not cleanup.list_build_cache(host)
    assert _image_id(host, "made-by/run:1") is None


def test_keep_artifacts_keeps_them(pytester, reference_daemon, monkeypatch):
    host = reference_daemon.host
    result = _run_suite(pytester, host, "--keep-artifacts")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"cleanup: --keep-artifacts: left what the run added in {host}"])
    assert _image_id(host, "made-by/run:1") is not None
    monkeypatch.setenv("SESSION_KEEP_ARTIFACTS", "1")
    assert _run_suite(pytester, host).ret == 0
    assert _image_id(host, "made-by/run:1") is not None


# -- real daemons ----------------------------------------------------------------------------------------

def _cli_build(daemon, dockerfile: str, *tags: str) -> None:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="dsc-clean-") as context:
        realpeers._write_busybox_rootfs(Path(context) / "rootfs")
        (Path(context) / "Dockerfile").write_text(dockerfile)
        args = ["build", "--progress=plain", "--network=none", *(a for t in tags for a in ("-t", t)), context]
        result = daemon.cli(*args)
    assert result.returncode == 0, result.stderr


@pytest.mark.real_peer
@pytest.mark.timeout(300)
@pytest.mark.parametrize("peer", ["dockerd-26.1", "dockerd-20.10"])
def test_real_daemon_prunes_only_the_records_of_the_run(peer):
    realpeers.require_docker(peer)
    with realpeers.PrivateDockerd(peer) as daemon:
        host = daemon.host
        _cli_build(daemon, "FROM scratch\nCOPY rootfs/ /\nENV PATH=/bin\n", "before/busybox:1", "before/moved:1")
        _cli_build(daemon, "FROM before/busybox:1\nRUN echo before > /before\n", "before/run:1")
        snapshot = cleanup.Snapshot.take(host)
        assert snapshot.honours_id_filter and len(snapshot.images) == 2 and snapshot.cache_records

        # what a run does: RUN steps (new records, children of earlier ones), a dangling image, a tag added to
        # an image from before, a tag from before moved to a new image
        _cli_build(daemon, "FROM before/busybox:1\nRUN echo run > /run\nRUN echo two > /two\n", "run/made:1")
        _cli_build(daemon, "FROM before/busybox:1\nRUN echo dangling > /d\n")
        _cli_build(daemon, "FROM before/run:1\nRUN echo moved > /m\n", "before/moved:1")
        assert daemon.cli("tag", "before/run:1", "run/extra:1").returncode == 0
        added_records = set(cleanup.list_build_cache(host)) - snapshot.cache_records
        assert len(added_records) >= 4

        removed = cleanup.remove_what_the_run_added(snapshot)
        assert not removed.problems, removed.problems
        assert len(removed.images) == 3 and removed.untagged == ["run/extra:1"]
        assert removed.retagged == ["before/moved:1"]
        assert cleanup.list_images(host) == snapshot.images
        assert set(removed.cache_records) == added_records and removed.cache_left == 0
        assert set(cleanup.list_build_cache(host)) == snapshot.cache_records


@pytest.mark.real_peer
@pytest.mark.timeout(300)
def test_a_suite_run_against_dockerd_26_cleans_unless_told_to_keep(pytester):
    realpeers.require_docker("dockerd-26.1")
    with realpeers.PrivateDockerd("dockerd-26.1") as daemon:
        host = daemon.host
        _cli_build(daemon, "FROM scratch\nCOPY rootfs/ /\n", "before/busybox:1")
        before = cleanup.Snapshot.take(host)
        kept = _run_suite(pytester, host, "--keep-artifacts")
        kept.assert_outcomes(passed=1)
        assert _image_id(host, "made-by/run:1") is not None
        assert set(cleanup.list_build_cache(host)) > before.cache_records
        api_call("DELETE", "/images/made-by/run:1", host=host)

        result = _run_suite(pytester, host, "-n", "2")
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines([f"cleanup: removed 1 image and * build-cache records the run added to {host}*"])
        assert cleanup.list_images(host) == before.images
        # the --keep-artifacts run's records were there when this run started: they stay
        assert before.cache_records < set(cleanup.list_build_cache(host))
