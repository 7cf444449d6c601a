"""results.json (per requirement and per test) and summary.md (per target).

JUnit XML comes from pytest's own writer (``--report-dir`` points it at
``junit.xml``); each case carries its requirement IDs, graded outcome and
per-requirement verdicts (``verdict:REQ-ID``) as properties.

A requirement's grade is the worst of its verdicts in the cases that graded it
(a case's verdicts: conformance/outcomes.py), while the per-target counts stay
counts of cases.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict

from .catalogue import load_catalogue
from .outcomes import fold_transcript
from .outcomes import ERROR, FAIL, NON_STRICT, NOT_APPLICABLE, NOT_REACHED, PASS, UNSUPPORTED, XFAIL

# The worst verdict of a requirement's cases decides its grade. NOT REACHED says nothing about the
# requirement, so it ranks below every real verdict: any other case's PASS or FAIL wins over it. NOT
# APPLICABLE is a finding about the target, but a case that did grade the requirement outranks it.
_RANK = {ERROR: 8, FAIL: 7, NON_STRICT: 6, XFAIL: 5, UNSUPPORTED: 4, PASS: 3, NOT_APPLICABLE: 2, NOT_REACHED: 1,
         "SKIPPED": 0}


def _target_of(record: dict) -> str:
    t = record["targets"]
    parts = [f"daemon={t['target']}" if "target" in t else "", f"client={t['client']}" if "client" in t else ""]
    return " ".join(p for p in parts if p) or "core"


def verdicts_of(record: dict) -> dict[str, str]:
    """A case's per-requirement verdicts; a record written before there were any gives its outcome to all."""
    if "verdicts" in record:
        return record["verdicts"]
    return dict.fromkeys(record["requirements"], record["outcome"])


def summarise(results: list[dict]) -> dict:
    catalogue = load_catalogue()
    per_req: dict[str, dict] = {}
    for record in results:
        for req_id, verdict in verdicts_of(record).items():
            entry = per_req.setdefault(req_id, {"outcome": "SKIPPED", "tests": [], "targets": {}})
            entry["tests"].append(record["nodeid"])
            target = _target_of(record)
            old = entry["targets"].get(target, "SKIPPED")
            entry["targets"][target] = max(old, verdict, key=_RANK.__getitem__)
            entry["outcome"] = max(entry["outcome"], verdict, key=_RANK.__getitem__)
    for req_id, entry in per_req.items():
        req = catalogue.get(req_id)
        entry["level"] = req.level if req else "?"
        entry["title"] = req.title if req else "(not in catalogue)"
    untested = sorted(r.id for r in catalogue.values() if r.id not in per_req)
    per_target: dict[str, Counter] = defaultdict(Counter)
    for record in results:
        per_target[_target_of(record)][record["outcome"]] += 1
    implementations: dict[str, dict] = {}
    for record in results:
        target = _target_of(record)
        for role, name in (record.get("implementations") or {}).items():
            entry = implementations.setdefault(target, {})
            entry[role] = name
            entry[f"{role} identified by"] = (record.get("identified_by") or {}).get(role, "")
    return {"requirements": per_req, "untested": untested, "targets": {k: dict(v) for k, v in per_target.items()},
            "implementations": implementations}


def write_reports(report_dir: str, results: list[dict], config, preflight: list[str] = (),
                  run: dict | None = None) -> None:
    """``preflight``: what the pre-flight (conformance/preflight.py) kept from running, one line each;
    ``run``: when it started (UTC) and how many seconds it took."""
    summary = summarise(results)
    summary["preflight"] = list(preflight)
    summary["run"] = dict(run or {})
    options = {k: config.getoption(k) for k in ("daemon_under_test", "client_under_test", "daemon_generation",
                                               "client_generation", "known_deviations", "allow_destructive",
                                               "conformance_profile", "embedded_generations")}
    with open(os.path.join(report_dir, "results.json"), "w") as fh:
        json.dump({"options": options, **summary, "tests": results}, fh, indent=2, sort_keys=True)
    with open(os.path.join(report_dir, "summary.md"), "w") as fh:
        fh.write(render_markdown(summary, results, options))


def render_markdown(summary: dict, results: list[dict], options: dict) -> str:
    # what was tested and how it was told, when and for how long, with which options: first
    out = ["# Session protocol conformance summary", "", "## Identified implementations", ""]
    for target, entry in sorted((summary.get("implementations") or {}).items()):
        for role in ("daemon", "client"):
            if role in entry:
                out.append(f"- `{target}`: {role} **{entry[role]}** (identified by: {entry.get(role + ' identified by') or '?'})")
    if not summary.get("implementations"):
        out.append("- none: no case of this run had a target")
    run = summary.get("run") or {}
    if run:
        out += ["", f"Run: started {run.get('started', '?')}, took {run.get('seconds', '?')} s"]
    chosen = [f"`{k}={','.join(v) if isinstance(v, (list, tuple)) else v}`" for k, v in options.items() if v]
    target_given = options.get("daemon_under_test") or options.get("client_under_test")
    out += ["", "Options: " + ", ".join(chosen) + ("" if target_given else " (embedded reference pairs)")]
    if summary.get("preflight"):
        out += ["", "## Pre-flight", ""] + [f"- {line}" for line in summary["preflight"]]
    out += ["", "## Per target", "", "| target | PASS | FAIL | NON-STRICT | UNSUPPORTED | XFAIL | ERROR | skipped |",
            "|---|---|---|---|---|---|---|---|"]
    for target, counts in sorted(summary["targets"].items()):
        out.append(f"| {target} | " + " | ".join(str(counts.get(k, 0)) for k in
                                                   (PASS, FAIL, NON_STRICT, UNSUPPORTED, XFAIL, ERROR, "SKIPPED")) + " |")
    bad = [r for r in results if r["outcome"] in (FAIL, ERROR, NON_STRICT, XFAIL)]
    if bad:
        out += ["", "## Failing, non-strict and known-deviation cases", ""]
        for r in bad:
            out.append(f"### {r['outcome']}: `{r['nodeid']}`")
            out.append("")
            verdicts = verdicts_of(r)
            out.append("Requirements: " + (", ".join(f"{req_id} {verdicts[req_id]}" for req_id in verdicts) or "none"))
            if r.get("rerun"):
                out += ["", f"Rerun: `{r['rerun']}`"]
            if r["expected"] is not None:
                out += ["", f"- Expected: {r['expected']}", f"- Actual: {r['actual']}"]
            if r.get("known_deviation"):
                out.append(f"- Known deviation (conformance/SPEC.md): {r['known_deviation']}")
            if r["seed"]:
                out.append(f"- Seed: `{r['seed']}`")
            if r["message"] and r["expected"] is None:
                out += ["", "```", r["message"][-2000:], "```"]
            if r["transcript"]:
                out += ["", "Transcript:", "", "```", *fold_transcript(r["transcript"])[:80], "```"]
            out.append("")
    out += ["", "## Per requirement", "", "| requirement | level | outcome | targets |", "|---|---|---|---|"]
    for req_id, entry in sorted(summary["requirements"].items()):
        targets = "; ".join(f"{t}: {o}" for t, o in sorted(entry["targets"].items()))
        out.append(f"| {req_id} | {entry['level']} | {entry['outcome']} | {targets} |")
    shown = {verdict for entry in summary["requirements"].values() for verdict in entry["targets"].values()}
    if NOT_REACHED in shown:
        out += ["", (f"{NOT_REACHED}: every case of the requirement on that target stopped at another requirement "
                     "before it finished grading this one.")]
    if NOT_APPLICABLE in shown:
        out += ["", (f"{NOT_APPLICABLE}: the requirement does not apply to that target (the case says why in "
                     "results.json, `not_applicable`).")]
    if summary["untested"]:
        out += ["", f"Requirements without a test in this run: {', '.join(summary['untested'])}"]
    return "\n".join(out) + "\n"
