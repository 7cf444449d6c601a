"""Merge several results.json files (one per pytest run) into an implementation x requirement-group matrix,
headed by the client x daemon skew grid when the run directory has one (skew/skew.json, interop/skew.py).

    python -m interop.matrix reports/interop [--out reports/interop]

Each run directory holds results.json written by the conformance plugin and, from interop/run.py, run.json
saying which implementation the run tested (``{"kind": "daemon"|"client"|"embedded"|"differential",
"implementation": "..."}``). A requirement group is a requirement ID without its number: DIFFCOPY-ORDER-1
belongs to DIFFCOPY-ORDER.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import defaultdict

COUNTED = ("PASS", "FAIL", "ERROR", "NON-STRICT", "UNSUPPORTED", "XFAIL", "SKIPPED")
_NUMBER_SUFFIX = re.compile(r"-\d+$")

# Names the embedded targets and clients have in results.json -> rows of the matrix.
_EMBEDDED_NAMES = {
    "reference-n-1": "our {role} n-1",
    "reference-n-grpcio": "our {role} n (grpcio)",
    "reference-n+1": "our {role} n+1",
}


def group_of(requirement_id: str) -> str:
    return _NUMBER_SUFFIX.sub("", requirement_id)


def _embedded_name(name: str, role: str) -> str:
    return _EMBEDDED_NAMES.get(name, f"our {role} {name}").format(role=role)


def implementations_of(record: dict, run: dict) -> list[str]:
    """Which rows a test record counts for: the implementation the run tested, or each embedded one."""
    targets = record.get("targets") or {}
    kind = run.get("kind", "embedded")
    if kind in ("daemon", "client", "differential"):
        # Only what this run is about; records without a target (self-checks, skipped other-role cases)
        # are counted once, in the embedded run.
        key = {"daemon": "target", "client": "client", "differential": "target"}[kind]
        return [run["implementation"]] if key in targets else []
    rows = []
    if "target" in targets:
        rows.append(_embedded_name(targets["target"], "daemon"))
    if "client" in targets:
        rows.append(_embedded_name(targets["client"], "client"))
    return rows or ["suite self-check"]


def _row_rank(row: str) -> tuple[int, str]:
    """Our clients, our daemons, the real daemon(s), the real CLI, differential rows, then the self-check."""
    order = ("our client", "our daemon", "dockerd", "docker CLI", "differential", "suite self-check")
    return next((i for i, prefix in enumerate(order) if row.startswith(prefix)), len(order)), row


def load_runs(root: str) -> list[tuple[str, dict, dict]]:
    """(run name, run.json, results.json) for every run directory under root, sorted by name."""
    runs = []
    for name in sorted(os.listdir(root)):
        results_path = os.path.join(root, name, "results.json")
        if not os.path.isfile(results_path):
            continue
        with open(results_path) as fh:
            results = json.load(fh)
        run_path = os.path.join(root, name, "run.json")
        run = {"kind": "embedded", "implementation": "embedded reference pairs"}
        if os.path.isfile(run_path):
            with open(run_path) as fh:
                run = json.load(fh)
        runs.append((name, run, results))
    return runs


def _gist(record: dict) -> str:
    """One line on why a test failed: expected/actual when graded, else the first `E` line of the traceback."""
    if record.get("expected") is not None:
        return f"expected {record['expected']}; actual {record.get('actual')}"[:300]
    lines = [line.strip() for line in (record.get("message") or "").splitlines() if line.strip()]
    errors = [line[1:].strip() for line in lines if line.startswith("E ")]
    return (errors or lines or [""])[0][:300]


def load_skew(root: str) -> tuple[dict, dict] | None:
    """(skew.json, run.json) of the skew run under root, if there is one."""
    path = os.path.join(root, "skew", "skew.json")
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        skew = json.load(fh)
    run = {"kind": "skew", "implementation": "client x daemon skew matrix"}
    run_path = os.path.join(root, "skew", "run.json")
    if os.path.isfile(run_path):
        with open(run_path) as fh:
            run = json.load(fh)
    return skew, run


# The grades a case's requirements can have, worst first; a group's cell counts the case once, by the worst grade
# among that group's requirements in the case (a case that failed in another group does not count as failing here).
_WORST_FIRST = ("ERROR", "FAIL", "NON-STRICT", "XFAIL", "UNSUPPORTED", "PASS")


def _group_outcomes(record: dict) -> dict[str, str]:
    """{requirement group: the case's outcome for it}; without per-requirement verdicts, the case's outcome."""
    requirements = record.get("requirements", [])
    verdicts = record.get("verdicts")
    if not requirements:
        return {"(no requirement)": record["outcome"]}
    if verdicts is None:
        return {group_of(r): record["outcome"] for r in requirements}
    grades: dict[str, set[str]] = defaultdict(set)
    for req_id in requirements:
        grades[group_of(req_id)].add(verdicts.get(req_id, record["outcome"]))
    # NOT REACHED and NOT APPLICABLE alone: the case graded nothing of the group (counted as not run)
    return {group: next((g for g in _WORST_FIRST if g in found), "SKIPPED") for group, found in grades.items()}


def build_matrix(runs: list[tuple[str, dict, dict]]) -> dict:
    cells: dict[str, dict[str, dict[str, int]]] = defaultdict(lambda: defaultdict(lambda: dict.fromkeys(COUNTED, 0)))
    failures = []
    row_order: list[str] = []
    for run_name, run, results in runs:
        for record in results.get("tests", []):
            outcome = record["outcome"]
            by_group = _group_outcomes(record)
            for row in implementations_of(record, run):
                if row not in row_order:
                    row_order.append(row)
                for group, group_outcome in by_group.items():
                    cells[row][group][group_outcome] = cells[row][group].get(group_outcome, 0) + 1
                if outcome in ("FAIL", "ERROR"):
                    failures.append({"run": run_name, "implementation": row, "nodeid": record["nodeid"],
                                     "outcome": outcome, "requirements": record.get("requirements", []),
                                     "message": _gist(record)})
    row_order.sort(key=_row_rank)
    groups = sorted({g for row in cells.values() for g in row})
    totals = {row: {k: sum(cell.get(k, 0) for cell in cells[row].values()) for k in COUNTED} for row in row_order}
    return {
        "implementations": row_order,
        "groups": groups,
        "cells": {row: {g: dict(cells[row][g]) for g in sorted(cells[row])} for row in row_order},
        "totals": totals,
        "failures": failures,
        "runs": {name: run for name, run, _ in runs},
    }


def _cell_text(counts: dict[str, int] | None) -> str:
    """pass/fail/non-strict/unsupported; errors count as failures; '-' when nothing ran."""
    if not counts or not any(counts.get(k) for k in COUNTED if k != "SKIPPED"):
        return "-"
    text = (f"{counts.get('PASS', 0)}/{counts.get('FAIL', 0) + counts.get('ERROR', 0)}/"
            f"{counts.get('NON-STRICT', 0)}/{counts.get('UNSUPPORTED', 0)}")
    if counts.get("XFAIL"):
        text += f" x{counts['XFAIL']}"
    if counts.get("FAIL") or counts.get("ERROR"):
        text = f"**{text}**"
    return text


def render_markdown(matrix: dict) -> str:
    rows, groups = matrix["implementations"], matrix["groups"]
    out = ["# Interop matrix", ""]
    if matrix.get("skew"):
        from .skew import render_grid  # the grid's only renderer

        out += ["## Client x daemon (real builds of one awkward context; interop/skew.py, skew/skew.md)", "",
                render_grid(matrix["skew"])]
        failed = [c for c in matrix["skew"]["cells"] if c["verdict"] == "FAIL"]
        for cell in failed:
            out.append(f"- FAIL `{cell['client']} -> {cell['daemon']}`: " + "; ".join(cell["problems"][:3])[:600])
        out += ["", "## Conformance suite", ""]
    out += ["Cells: pass/fail/non-strict/unsupported test counts per requirement group (errors count as "
           "failures; `xN`: N known deviations, expected failures; `-`: not exercised). A test checking "
           "several groups counts in each.", "",
           "## Totals", "",
           "| implementation | PASS | FAIL | ERROR | NON-STRICT | UNSUPPORTED | XFAIL | skipped |",
           "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        t = matrix["totals"][row]
        out.append(f"| {row} | " + " | ".join(str(t[k]) for k in COUNTED) + " |")
    out += ["", "## By requirement group", ""]
    # Groups as rows, implementations as columns: there are many more groups than implementations.
    out.append("| group | " + " | ".join(rows) + " |")
    out.append("|---|" + "---|" * len(rows))
    for group in groups:
        out.append(f"| {group} | " + " | ".join(_cell_text(matrix["cells"][row].get(group)) for row in rows) + " |")
    if matrix["failures"]:
        out += ["", "## Failures and errors", ""]
        for f in matrix["failures"]:
            out.append(f"- {f['outcome']} [{f['run']}] `{f['nodeid']}` ({', '.join(f['requirements']) or 'no requirement'})"
                       + (f": {f['message']}" if f["message"] else ""))
    out += ["", "## Runs", ""]
    for name, run in matrix["runs"].items():
        out.append(f"- `{name}`: {run.get('kind')} run, {run.get('implementation')}")
    return "\n".join(out) + "\n"


def write_matrix(root: str, out_dir: str | None = None) -> dict:
    matrix = build_matrix(load_runs(root))
    skew = load_skew(root)
    if skew is not None:
        matrix["skew"], matrix["runs"]["skew"] = skew
    out_dir = out_dir or root
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "matrix.json"), "w") as fh:
        json.dump(matrix, fh, indent=2, sort_keys=True)
    with open(os.path.join(out_dir, "matrix.md"), "w") as fh:
        fh.write(render_markdown(matrix))
    return matrix


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="directory holding one sub-directory per run")
    parser.add_argument("--out", help="where to write matrix.md and matrix.json (default: root)")
    args = parser.parse_args(argv)
    matrix = write_matrix(args.root, args.out)
    sys.stdout.write(render_markdown(matrix))
    skew_failed = any(c["verdict"] == "FAIL" for c in (matrix.get("skew") or {}).get("cells", []))
    return 1 if matrix["failures"] or skew_failed else 0


if __name__ == "__main__":
    sys.exit(main())
