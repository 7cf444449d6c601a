"""Smoke tests for ``python -m benchmarks``: each suite runs on a tiny tree and prints judged ratios.

No speed or memory target is asserted here (they live in benchmarks/ and are
only printed); these tests check that the suites measure and report.
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# benchmarks/ is not an installed package; pytest's pythonpath (pyproject) puts the project root first.
from benchmarks import client as client_suite
from benchmarks import contexts
from benchmarks import daemon as daemon_suite
from benchmarks.client import as_cli_prints, load_context_seconds
from benchmarks.clientprobe import LOAD_CONTEXT, VertexTimes
from benchmarks.daemon import NOT_IMPLEMENTED, reference_daemon_missing

PROJECT_ROOT = Path(__file__).resolve().parents[1]
from benchmarks.report import Row  # noqa: E402
from conformance import peers, realpeers  # noqa: E402

TINY = ["--files", "50", "--megabytes", "1", "--runs", "1"]


def run_benchmarks(suite: str, tmp_path: Path, timeout: float) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--suite", suite, *TINY, "--json", str(out)],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout)
    assert out.exists(), f"no JSON written\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc, json.loads(out.read_text())


def assert_prints_judged_ratios(proc: subprocess.CompletedProcess, data: dict, suite: str) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    [result] = data["suites"]
    assert result["name"] == suite
    assert not result["error"] and not result["skipped"], result
    judged = [row for row in result["rows"] if row["target"] is not None and not row["extra"]]
    assert judged, "no row carries a target"
    assert re.search(r"^metric\s+.*\bratio\s+target\s+result$", proc.stdout, re.M), proc.stdout
    for row in judged:
        assert row["verdict"] in ("PASS", "MISS"), row
        assert row["ours"] is not None and row["ours"] >= 0, row
        line = re.search(rf"^{re.escape(row['metric'])}\s.*\s(PASS|MISS)$", proc.stdout, re.M)
        assert line, f"row {row['metric']!r} not printed:\n{proc.stdout}"
        if row["target_kind"] == "ratio" and not row["resolution"]:
            assert row["peer"] > 0 and math.isclose(row["ratio"], row["ours"] / row["peer"]), row
            assert re.search(r"\s\d+\.\d\dx\s", line.group(0)), line.group(0)
    assert f"{suite}: " in proc.stdout.split("== summary ==")[1]


# -- the suites, tiny ---------------------------------------------------------------------------

def test_core_suite_prints_ratios_against_rsync(tmp_path):
    if not os.access("/usr/bin/rsync", os.X_OK):
        pytest.skip("rsync not installed")
    proc, data = run_benchmarks("core", tmp_path, timeout=120)
    assert_prints_judged_ratios(proc, data, "core")
    metrics = {row["metric"] for row in data["suites"][0]["rows"]}
    assert {"cold sync", "unchanged re-sync", "peak memory above baseline"} <= metrics


@pytest.mark.real_peer
@pytest.mark.slow
def test_client_suite_prints_ratios_against_the_docker_cli(tmp_path):
    realpeers.require_docker()
    proc, data = run_benchmarks("client", tmp_path, timeout=600)
    assert_prints_judged_ratios(proc, data, "client")
    metrics = {row["metric"] for row in data["suites"][0]["rows"]}
    for scenario in ("cold", "unchanged", "one file changed"):
        assert f"wall time, {scenario}" in metrics
        assert f"load build context, {scenario}" in metrics


@pytest.mark.real_peer
@pytest.mark.slow
def test_client_suite_prints_ratios_against_buildx_into_dockerd_26_1(tmp_path):
    realpeers.require_docker("dockerd-26.1", "docker-cli-26.1")
    proc, data = run_benchmarks("client-26.1", tmp_path, timeout=600)
    assert_prints_judged_ratios(proc, data, "client-26.1")
    [result] = data["suites"]
    assert "buildx" in result["peer"] and "dockerd 26.1" in result["title"], result["title"]
    metrics = {row["metric"] for row in result["rows"]}
    for scenario in ("cold", "unchanged", "one file changed"):
        assert f"wall time, {scenario}" in metrics
        assert f"load build context, {scenario}" in metrics


@pytest.mark.real_peer
@pytest.mark.slow
@pytest.mark.parametrize("suite, real_daemon", [("daemon", "dockerd-20.10"), ("daemon-26.1", "dockerd-26.1")])
def test_daemon_suite_prints_ratios_against_dockerd(tmp_path, suite, real_daemon):
    if reference_daemon_missing():
        pytest.skip(NOT_IMPLEMENTED)
    realpeers.require_docker(real_daemon, realpeers.DEFAULT_CLIENT)
    proc, data = run_benchmarks(suite, tmp_path, timeout=600)
    assert_prints_judged_ratios(proc, data, suite)
    assert data["suites"][0]["peer"] == f"dockerd {real_daemon.removeprefix('dockerd-')}"


@pytest.mark.parametrize("pairs", [client_suite.PAIRS, daemon_suite.PAIRS], ids=["client", "daemon"])
def test_each_pair_measures_our_implementation_of_the_peers_generation(pairs):
    assert set(pairs) == set(peers.VINTAGES)
    for vintage, pair in pairs.items():
        assert pair.generation == peers.VINTAGES[vintage].generation, (vintage, pair)
        assert peers.program(pair.daemon).vintage == vintage


# -- pieces (no subprocess) ---------------------------------------------------------------------

def test_generated_tree_is_deterministic_and_sized(tmp_path):
    def snapshot(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    first = contexts.generate_tree(str(tmp_path / "a"), 300, 3)
    second = contexts.generate_tree(str(tmp_path / "b"), 300, 3)
    other_seed = contexts.generate_tree(str(tmp_path / "c"), 300, 3, seed=7)
    a, b = snapshot(tmp_path / "a"), snapshot(tmp_path / "b")
    assert a == b
    assert snapshot(tmp_path / "c") != a
    assert len(a) == first.files == 300
    assert first.total_bytes == sum(map(len, a.values())) == second.total_bytes == other_seed.total_bytes
    assert abs(first.total_bytes - 3 * 1024 * 1024) < 3 * 1024 * 1024 * 0.01
    sizes = sorted(map(len, a.values()))
    assert sizes[len(sizes) // 2] < 16 * 1024, "most files should be small"
    assert sizes[-1] > 100 * 1024, "some files should be large"
    assert any(name.count("/") >= 2 for name in a), "some files should be nested"
    assert first.change_target in a


def test_rewrite_file_changes_contents_and_mtime_but_not_size(tmp_path):
    tree = contexts.generate_tree(str(tmp_path), 60, 0.5)
    path = tmp_path / tree.change_target
    before, st = path.read_bytes(), path.stat()
    contexts.rewrite_file(str(tmp_path), tree.change_target, 1)
    after = path.read_bytes()
    assert len(after) == len(before) and after != before
    assert path.stat().st_mtime_ns > st.st_mtime_ns


CLI_PLAIN_PROGRESS = """\
#1 [internal] load build definition from Dockerfile
#1 transferring dockerfile: 59B done
#1 DONE 0.0s

#2 [internal] load .dockerignore
#2 transferring context: 2B done
#2 DONE 0.1s

#3 [internal] load build context
#3 transferring context: 12.52MB 0.7s
#3 transferring context: 209.75MB 2.6s done
#3 DONE 2.8s

#4 [1/1] COPY . /
#4 DONE 1.3s
"""


def test_load_context_seconds_reads_the_context_vertex_only():
    assert load_context_seconds(CLI_PLAIN_PROGRESS) == 2.8
    # BuildKit may complete the vertex twice (a short first phase): the CLI prints both, the last counts.
    twice = CLI_PLAIN_PROGRESS.replace("#3 [internal] load build context\n",
                                       "#3 [internal] load build context\n#3 DONE 0.0s\n\n"
                                       "#3 [internal] load build context\n")
    assert load_context_seconds(twice) == 2.8
    without_done = CLI_PLAIN_PROGRESS.replace("#3 DONE 2.8s\n", "")
    assert load_context_seconds(without_done) == 2.6
    assert load_context_seconds(CLI_PLAIN_PROGRESS.replace("load build context", "load something")) is None


BUILDX_PLAIN_PROGRESS = """\
#0 building with "default" instance using docker driver

#1 [internal] load build definition from Dockerfile
#1 transferring dockerfile: 59B done
#1 DONE 0.0s

#2 [internal] load .dockerignore
#2 transferring context: 2B done
#2 DONE 0.0s

#3 [internal] load build context
#3 transferring context: 3.00MB 0.0s done
#3 DONE 0.4s

#4 [1/1] COPY . /
#4 DONE 0.0s
"""


def test_load_context_seconds_reads_buildx_plain_progress():
    # buildx 0.13 (CLI 26.1) prints a '#0' line first and no '#N sha256:' lines; the vertex lines are the same.
    assert load_context_seconds(BUILDX_PLAIN_PROGRESS) == 0.4


def test_probe_keeps_the_final_timing_of_a_vertex_completed_twice():
    from google.protobuf.timestamp_pb2 import Timestamp
    from reference.pb.control_pb2 import StatusResponse

    def update(started=None, completed=None):
        status = StatusResponse()
        vertex = status.vertexes.add(digest="sha256:ctx", name=LOAD_CONTEXT)
        for field, value in (("started", started), ("completed", completed)):
            if value is not None:
                stamp = Timestamp()
                stamp.FromNanoseconds(int(value * 1e9))
                getattr(vertex, field).CopyFrom(stamp)
        return status

    from reference.client.progress import ProgressConverter

    times, converter = VertexTimes(), ProgressConverter()
    for started, completed in ((None, None), (100.0, 100.00004), (100.001, None), (100.001, 102.5), (None, None)):
        for event in converter.feed(update(started, completed)):
            times(event)
    final = times.by_name()[LOAD_CONTEXT]
    assert final["completed"] - final["started"] == pytest.approx(2.499)
    assert as_cli_prints(2.499) == 2.5 and as_cli_prints(0.04) == 0.0


@pytest.mark.parametrize("ours, peer, target, kind, resolution, verdict", [
    (1.4, 1.0, 1.5, "ratio", 0.0, "PASS"),
    (1.6, 1.0, 1.5, "ratio", 0.0, "MISS"),
    (0.1, 0.0, 1.0, "ratio", 0.1, "PASS"),  # one step of 0.1 s apart near zero: indistinguishable
    (0.3, 0.0, 1.0, "ratio", 0.1, "MISS"),
    (0.3, 0.2, 1.0, "ratio", 0.1, "MISS"),
    (65.0, None, 64.0, "absolute", 0.0, "MISS"),
    (63.0, None, 64.0, "absolute", 0.0, "PASS"),
    (None, 1.0, 1.0, "ratio", 0.0, "ERROR"),
])
def test_row_verdicts(ours, peer, target, kind, resolution, verdict):
    assert Row("m", ours, peer, target=target, target_kind=kind, resolution=resolution).verdict == verdict


def test_an_unjudged_row_has_no_verdict():
    assert Row("m", 2.0, 1.0).verdict == "-"
