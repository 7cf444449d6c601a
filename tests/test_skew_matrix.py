"""The client x daemon skew matrix (interop/skew.py): its context, how a cell is judged, the grid and its runs.

Judging is tested on exports made from the context itself (no daemon needed); the real builds run in
`tox -e interop` (the `skew` run).
"""

import json
import os
import socket
import tempfile
import threading
from dataclasses import replace
from urllib.parse import quote_plus

import pytest

from interop import awkward, exports, matrix, skew
from interop import run as interop_run
from interop.skew import CANNOT_WORK, FAIL, KNOWN_DEFECT, PASS, BuildRun, Cell

DEFECT = skew.KNOWN_DEFECTS[("docker-cli-20.10", "dockerd-26.1")]


@pytest.fixture(scope="module")
def context(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("awkward") / "context")
    expectation = awkward.write(root)
    return expectation, exports.snapshot(root)


# -- the context -------------------------------------------------------------------------------------

def test_the_context_holds_what_its_table_says(context):
    expectation, tree = context
    assert set(tree) == expectation.all_names
    nfc, nfd = f"unicode/{awkward.NFC_CAFE}".encode(), f"unicode/{awkward.NFD_CAFE}".encode()
    assert nfc != nfd and {nfc, nfd} <= set(tree), "one word in two normal forms: two names"
    assert tree[b"hard/first"].links == (b"hard/first", b"hard/second", b"hard/sub/third")
    assert tree[b"hard/kept"].links == (b"hard/excluded.log", b"hard/kept")
    assert (tree[b"modes/setuid"].mode, tree[b"modes/sticky"].mode, tree[b"modes/no-permissions"].mode) == \
        (0o4755, 0o1644, 0o000)
    assert (tree[b"modes/dir-0555"].kind, tree[b"modes/dir-0555"].mode, tree[b"modes/dir-1777"].mode) == \
        ("dir", 0o555, 0o1777)
    assert tree[b"links/absolute"].target == b"/etc/passwd" and tree[b"links/dangling"].kind == "symlink"
    assert (tree[b"empty-file"].size, tree[b"empty-dir"].kind) == (0, "dir")
    assert {node.mtime_ns for node in tree.values()} == {awkward.CONTEXT_MTIME_NS}
    if os.geteuid() == 0:
        assert (tree[b"owned"].uid, tree[b"owned"].gid) == awkward.OWNED[1:]


def test_the_exclusions_are_entries_of_the_context_and_the_dockerignore_has_a_non_ascii_line(context):
    expectation, _ = context
    assert expectation.excluded_names == {p.encode() for p in awkward.EXCLUDED}
    assert expectation.excluded_names < expectation.all_names
    lines = awkward.DOCKERIGNORE.decode().splitlines()
    assert awkward.NON_ASCII_PATTERN in lines and not awkward.NON_ASCII_PATTERN.isascii()


def test_the_cli_20_10_defect_prediction_follows_from_query_escaping(context):
    expectation, _ = context
    patterns = [line for line in awkward.DOCKERIGNORE.decode().splitlines() if line and not line.startswith("#")]
    # Python's quote_plus(safe="") escapes what Go's url.QueryEscape escapes (all but [A-Za-z0-9-_.~]).
    assert [p for p in patterns if quote_plus(p, safe="") == p] == ["build"]
    under_build = {n for n in expectation.all_names if n == b"build" or n.startswith(b"build/")}
    assert DEFECT.exported_names == expectation.all_names - under_build
    assert skew.KNOWN_DEFECTS[("docker-cli-20.10", "reference-n+1")] is DEFECT


def test_a_snapshot_tells_apart_what_a_listing_by_name_would_not(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_bytes(b"1")
    os.link(tmp_path / "a" / "x", tmp_path / "y")
    os.symlink("a/x", tmp_path / "s")
    before = exports.snapshot(tmp_path)
    (tmp_path / "y").unlink()
    (tmp_path / "y").write_bytes(b"1")  # same name, contents, mode: no longer the same inode
    os.unlink(tmp_path / "s")
    os.symlink("a//x", tmp_path / "s")
    after = exports.snapshot(tmp_path)
    lines = exports.differences(before, after)
    assert any(line.startswith("differs: 'y': ") and "links" in line for line in lines)
    assert any(line.startswith("differs: 's': ") and "target 'a/x' != 'a//x'" in line for line in lines)


# -- judging -----------------------------------------------------------------------------------------

def _export(context_tree, names, *, dir_mtime=None):
    tree = skew.expected_export(context_tree, frozenset(names))
    if dir_mtime is not None:
        tree = {n: replace(v, mtime_ns=dir_mtime) if v.kind == "dir" else v for n, v in tree.items()}
    return tree


def _cell(client, daemon, tree, *, rebuild_tree=None, rebuild_requests=0, stats=None, encoded=(), seen=1):
    stats = [n.decode() for n in sorted(tree)] if stats is None else stats
    cold = BuildRun("cold", 0, 0.1, "", requests={"context": len(tree)}, context_transfers=seen,
                    context_stats=stats, context_encoded_keys=[list(encoded)], sessions=1, tree=tree)
    rebuild = BuildRun("unchanged", 0, 0.1, "", requests={"context": rebuild_requests}, context_transfers=seen,
                       context_requested=["a.b"] * rebuild_requests, sessions=1,
                       tree=tree if rebuild_tree is None else rebuild_tree)
    return Cell(client, daemon, builds=[cold, rebuild])


def _judged(cell, partner, context):
    expectation, context_tree = context
    skew.judge(cell, partner, expectation, context_tree)
    return cell


@pytest.fixture(scope="module")
def correct(context):
    expectation, context_tree = context
    return _export(context_tree, expectation.exported_names)


def test_a_correct_cell_passes(context, correct):
    partner = _cell("reference-n+1", "dockerd-20.10", correct)
    cell = _judged(_cell("reference-n+1", "dockerd-26.1", correct), partner, context)
    assert (cell.verdict, cell.problems, cell.partner) == (PASS, [], "dockerd-20.10")


def test_an_unchanged_rebuild_that_requests_context_files_fails(context, correct):
    cell = _judged(_cell("reference-n", "reference-n", correct, rebuild_requests=2),
                   _cell("reference-n", "dockerd-20.10", correct), context)
    assert cell.verdict == FAIL
    assert any("unchanged rebuild requested 2 file(s) of the main context transfer" in p for p in cell.problems)


@pytest.mark.parametrize("name, change, field", [
    (b"modes/setuid", {"mode": 0o755}, "mode"),
    (b"links/absolute", {"target": b"etc/passwd"}, "target"),
    (b"hard/second", {"links": ()}, "links"),
    (b"a.b", {"digest": "0" * 64}, "digest"),
    (b"unicode/\xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e.txt", {"mtime_ns": 1}, "mtime_ns"),
])
def test_an_export_that_differs_in_one_attribute_fails_against_context_and_partner(context, correct, name, change,
                                                                                  field):
    broken = dict(correct)
    broken[name] = replace(correct[name], **change)
    cell = _judged(_cell("docker-cli-26.1", "dockerd-26.1", broken), _cell("docker-cli-26.1", "dockerd-20.10", correct),
                   context)
    assert cell.verdict == FAIL
    shown = exports.show(name)
    assert any(p.startswith("against the context: differs: " + shown) and field in p for p in cell.problems)
    assert any(p.startswith("against the export from dockerd-20.10: differs: " + shown) for p in cell.problems)


def test_names_are_compared_as_bytes(context, correct):
    nfd = f"unicode/{awkward.NFD_CAFE}".encode()
    without = {n: v for n, v in correct.items() if n != nfd}
    cell = _judged(_cell("reference-n", "dockerd-20.10", without), _cell("reference-n", "dockerd-26.1", correct),
                   context)
    assert cell.verdict == FAIL and any(p.startswith("exported names: missing [" + exports.show(nfd)) for p in
                                        cell.problems)


def test_directory_mtimes_count_only_where_client_and_daemons_keep_them(context, correct):
    expectation, context_tree = context
    touched = _export(context_tree, expectation.exported_names, dir_mtime=1_700_000_000_000_000_000)
    # The CLI 20.10's receiver does not keep them: no difference.
    cell = _judged(_cell("docker-cli-20.10", "dockerd-20.10", touched, rebuild_tree=correct),
                   _cell("docker-cli-20.10", "dockerd-26.1", correct), context)
    assert cell.verdict == PASS, cell.problems
    # buildx into dockerd 26.1 keeps them: a difference.
    cell = _judged(_cell("docker-cli-26.1", "dockerd-26.1", touched),
                   _cell("docker-cli-26.1", "dockerd-20.10", correct), context)
    assert cell.verdict == FAIL and any("against the context: differs: 'a': mtime_ns" in p for p in cell.problems)
    # dockerd 20.10's COPY does not keep them: buildx's export from it may carry other times.
    cell = _judged(_cell("docker-cli-26.1", "dockerd-20.10", touched),
                   _cell("docker-cli-26.1", "dockerd-26.1", correct), context)
    assert cell.verdict == PASS, cell.problems


def _defect_cell(context, tree=None, **kwargs):
    _, context_tree = context
    tree = _export(context_tree, DEFECT.exported_names) if tree is None else tree
    kwargs.setdefault("stats", [n.decode() for n in sorted(DEFECT.exported_names)])
    kwargs.setdefault("encoded", ["exclude-patterns"])
    return _cell("docker-cli-20.10", "dockerd-26.1", tree, **kwargs)


def test_the_documented_defect_shows_as_known_defect_and_its_partner_passes(context, correct):
    defective = _defect_cell(context)
    partner = _cell("docker-cli-20.10", "dockerd-20.10", correct)
    _judged(defective, partner, context)
    _judged(partner, defective, context)
    assert (defective.verdict, defective.reason, defective.problems) == (KNOWN_DEFECT, DEFECT.reason, [])
    assert (partner.verdict, partner.problems) == (PASS, [])


def test_a_known_defect_that_no_longer_reproduces_fails(context, correct):
    cell = _judged(_defect_cell(context, correct, stats=[n.decode() for n in correct]),
                   _cell("docker-cli-20.10", "dockerd-20.10", correct), context)
    assert cell.verdict == FAIL and any("no longer reproduces" in p for p in cell.problems)


def test_a_known_defect_without_its_cause_on_the_wire_fails(context, correct):
    cell = _judged(_defect_cell(context, encoded=[]), _cell("docker-cli-20.10", "dockerd-20.10", correct), context)
    assert cell.verdict == FAIL and any("did not send exclude-patterns-encoded" in p for p in cell.problems)
    cell = _judged(_defect_cell(context, stats=["Dockerfile"]), _cell("docker-cli-20.10", "dockerd-20.10", correct),
                   context)
    assert cell.verdict == FAIL and any("client sent other names than the defect predicts" in p for p in cell.problems)


def test_a_known_defect_with_another_difference_fails(context, correct):
    _, context_tree = context
    tree = _export(context_tree, DEFECT.exported_names)
    tree[b"modes/setgid"] = replace(tree[b"modes/setgid"], mode=0o755)
    cell = _judged(_defect_cell(context, tree), _cell("docker-cli-20.10", "dockerd-20.10", correct), context)
    assert cell.verdict == FAIL and any("modes/setgid" in p for p in cell.problems)


def test_a_cell_is_not_judged_without_what_it_needs(context, correct):
    unseen = _judged(_cell("reference-n", "dockerd-20.10", correct, seen=0), None, context)
    assert unseen.verdict == FAIL and any("saw no main context transfer" in p for p in unseen.problems)
    failed = Cell("reference-n", "dockerd-26.1", builds=[BuildRun("cold", 1, 0.1, "error: boom")])
    _judged(failed, None, context)
    assert failed.verdict == FAIL and failed.problems[0] == "the build failed (exit 1): error: boom"
    cannot = Cell("docker-cli-26.1", "reference-n", verdict=CANNOT_WORK, reason=skew.NO_GRPC)
    assert _judged(cannot, None, context).verdict == CANNOT_WORK


# -- probing /grpc -----------------------------------------------------------------------------------

@pytest.mark.parametrize("answer, expected", [
    (b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n", True),
    (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", False),
    (b"", False),
])
def test_serves_grpc_asks_for_the_upgrade(answer, expected):
    with tempfile.TemporaryDirectory(prefix="dsc-tg-", dir="/tmp") as directory:
        path = os.path.join(directory, "d.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)
        seen = []

        def serve():
            conn, _ = listener.accept()
            with conn:
                seen.append(conn.recv(4096))
                conn.sendall(answer)

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            assert skew.serves_grpc(path) is expected
        finally:
            thread.join(5)
            listener.close()
    assert seen[0].startswith(b"POST /grpc HTTP/1.1\r\n") and b"Upgrade: h2c" in seen[0]
    assert skew.serves_grpc("/nonexistent/d.sock") is False


# -- reports and runs --------------------------------------------------------------------------------

def _skew_data(context, correct, report_dir):
    cells = []
    for client in skew.CLIENTS:
        for daemon in skew.DAEMONS:
            if client.needs_grpc and daemon.peer is None:
                cells.append(Cell(client.name, daemon.name, verdict=CANNOT_WORK, reason=skew.NO_GRPC))
            elif (client.name, daemon.name) in skew.KNOWN_DEFECTS:
                cells.append(Cell(client.name, daemon.name, verdict=KNOWN_DEFECT, reason=DEFECT.reason,
                                  builds=_defect_cell(context).builds))
            else:
                cells.append(Cell(client.name, daemon.name, verdict=PASS, builds=_cell("x", "y", correct).builds))
    cells[-1].verdict, cells[-1].problems = FAIL, ["exported names: missing ['x']"]
    return skew.write_reports(str(report_dir), cells, {"context": {"entries": 70, "exported": 64}}, 1.0)


def test_the_grid_shows_every_pair_with_its_requests_and_reasons(context, correct, tmp_path):
    data = _skew_data(context, correct, tmp_path / "skew")
    grid = skew.render_grid(data).splitlines()
    assert grid[0] == "| client \\ daemon | dockerd 20.10 | dockerd 26.1 | reference daemon n | reference daemon n+1 |"
    rows = {line.split(" | ")[0].lstrip("| "): line for line in grid[2:6]}
    assert set(rows) == {c.label for c in skew.CLIENTS}
    assert f"known defect [1] (REQ {len(DEFECT.exported_names)} / 0)" in rows["docker CLI 20.10"]
    assert rows["docker CLI 26.1 + buildx 0.13"].count("cannot work [2]") == 2
    assert rows["reference client n+1"].endswith(f"**FAIL** (REQ {len(correct)} / 0) |")
    assert f"[1] {DEFECT.reason}" in grid and f"[2] {skew.NO_GRPC}" in grid
    assert json.loads((tmp_path / "skew" / "skew.json").read_text())["cells"][0]["verdict"] == PASS
    assert "## Failures" in (tmp_path / "skew" / "skew.md").read_text()


def test_the_interop_matrix_leads_with_the_grid_and_fails_with_a_failed_cell(context, correct, tmp_path):
    _skew_data(context, correct, tmp_path / "skew")
    merged = matrix.write_matrix(str(tmp_path))
    text = (tmp_path / "matrix.md").read_text()
    assert text.index("| client \\ daemon |") < text.index("## Totals")
    assert "- FAIL `reference-n+1 -> reference-n+1`: exported names: missing ['x']" in text
    assert merged["skew"]["cells"] and "skew" in merged["runs"]
    assert matrix.main([str(tmp_path)]) == 1


def test_the_interop_run_plans_and_judges_the_skew_matrix(context, correct, tmp_path):
    runs = interop_run.plan_runs([], str(tmp_path), with_cli=False, with_skew=True)
    [run] = [r for r in runs if r.kind == "skew"]
    assert run.argv[1:4] == ["-m", "interop.skew", "--report-dir"] and run.argv[4] == run.report_dir
    assert "--ignore=conformance/test_selfcheck.py" not in run.argv
    assert interop_run._command(run, ["-x"]) == run.argv, "pytest arguments are not its"
    _skew_data(context, correct, run.report_dir)
    run.returncode = 1
    interop_run._judge(run)
    assert run.problems == ["1 skew cell(s) FAIL: reference-n+1 -> reference-n+1"]
