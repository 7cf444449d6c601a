"""On which real peers each requirement was observed, from interop results, into SPEC.md's ``Real peers:`` lines.

    python -m conformance.observed reports/interop            # print what the runs show, per requirement
    python -m conformance.observed reports/interop --write    # and rewrite the Real peers: lines of SPEC.md
    python -m conformance.observed DIR --write --requirement SSH-1,SSH-2   # only these rules' lines

Reads every ``<run>/results.json`` under the report root (``tox -e interop`` writes one per run). A requirement
was observed on a real peer when a case naming it ran against that peer, and it is graded per peer:

* ``conforms``: a case naming it passed (or failed on another requirement after this one held);
* ``known deviation``: the case failed on exactly this requirement, as SPEC.md's Known deviations predicts;
* ``non-strict`` (a SHOULD not met) or ``fails`` (a MUST not met, unexpected);
* a requirement without any case against a peer says ``not checked against a real peer``.

Reference implementations are not real peers and never appear here. Generation ``n-1`` has no real peer.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
from collections import defaultdict

from .catalogue import load_catalogue
from .identify import engine_generation

TRAILER = "Real peers"
_GRADE_ORDER = ("fails", "known deviation", "non-strict", "conforms")
_REAL = re.compile(r"^(dockerd|docker CLI) (\d+\.\d+\.\d+)")
_BUILDX = re.compile(r"\+ buildx (\d+\.\d+\.\d+)")


def real_peer_name(implementation: str) -> str | None:
    """'dockerd 26.1.5+dfsg1' -> 'dockerd 26.1.5'; 'docker CLI 26.1.5+dfsg1 + buildx 0.13.1+ds1' ->
    'buildx 0.13.1'; a reference implementation or an unknown one -> None."""
    buildx = _BUILDX.search(implementation)
    if buildx:
        return f"buildx {buildx.group(1)}"
    match = _REAL.match(implementation)
    return f"{match.group(1)} {match.group(2)}" if match else None


def generation_of(peer: str) -> str | None:
    """The generation a real peer speaks: buildx is n+1, dockerd and the docker CLI by their release."""
    kind, version = peer.rsplit(" ", 1)
    return "n+1" if kind == "buildx" else engine_generation(version)


_VERDICT_GRADES = {"PASS": "conforms", "XFAIL": "known deviation", "NON-STRICT": "non-strict", "FAIL": "fails"}


def _grade(record: dict, req_id: str) -> str | None:
    """How the case graded this requirement; None when it did not (not reached, not applicable, skipped)."""
    verdicts = record.get("verdicts")
    if verdicts is not None:
        return _VERDICT_GRADES.get(verdicts.get(req_id))
    # a record without per-requirement verdicts: only a pass, or the requirement the case failed on, says anything
    outcome, failed = record.get("outcome"), record.get("failed_requirement")
    if outcome == "PASS":
        return "conforms"
    if failed != req_id:
        return None
    return _VERDICT_GRADES.get(outcome)


def observe(report_root: str) -> dict[str, dict[str, str]]:
    """{requirement ID: {real peer: grade}} over every results.json below report_root."""
    catalogue = load_catalogue()
    seen: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for path in sorted(glob.glob(os.path.join(report_root, "*", "results.json"))):
        with open(path) as fh:
            records = json.load(fh).get("tests", [])
        for record in records:
            peers = {real_peer_name(name) for name in (record.get("implementations") or {}).values()}
            peers.discard(None)
            for req_id in record.get("requirements", []):
                grade = _grade(record, req_id)
                requirement = catalogue.get(req_id)
                if not grade or requirement is None:
                    continue
                for peer in peers:
                    # A case names the rules of every generation it knows; a peer is graded by its own.
                    generation = generation_of(peer)
                    if generation is None or requirement.applies_to(generation):
                        seen[req_id][peer].add(grade)
    # The worst grade of a peer's cases is its grade.
    return {req_id: {peer: next(g for g in _GRADE_ORDER if g in grades) for peer, grades in by_peer.items()}
            for req_id, by_peer in seen.items()}


def _peer_order(peer: str) -> tuple:
    kind, version = peer.rsplit(" ", 1)
    return (kind, tuple(int(part) for part in version.split(".")))


def trailer_text(req_id: str, observed: dict[str, dict[str, str]]) -> str:
    requirement = load_catalogue()[req_id]
    by_peer = observed.get(req_id, {})
    if by_peer:
        return "; ".join(f"{peer} {by_peer[peer]}" for peer in sorted(by_peer, key=_peer_order)) + "."
    if requirement.generations == ("n-1",):
        return "none (generation n-1 has no real peer)."
    return "not checked against a real peer."


def rewrite_spec(spec_path: str, observed: dict[str, dict[str, str]], only: set[str] | None = None) -> int:
    """Replace (or add, as the rule's last trailer) every rule's Real peers: line, or only those of the rules in
    ``only`` (runs of some cases leave the other rules as the last full run found them). Returns the rules
    changed."""
    with open(spec_path, encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    catalogue = load_catalogue()
    out: list[str] = []
    changed = 0
    current: str | None = None

    def close_rule() -> None:
        nonlocal changed
        if current is None or (only is not None and current not in only):
            return
        # The rule's block ends at the last non-empty line written for it.
        while out and not out[-1].strip():
            blank = out.pop()
            pending_blanks.append(blank)
        new = f"{TRAILER}: {trailer_text(current, observed)}"
        if out and out[-1].startswith(f"{TRAILER}:"):
            if out[-1] != new:
                changed += 1
            out[-1] = new
        else:
            out.append(new)
            changed += 1
        out.extend(pending_blanks)
        pending_blanks.clear()

    pending_blanks: list[str] = []
    in_fence = False
    for line in lines:
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        if line.startswith("#") and not in_fence:
            close_rule()
            current = None
            heading = re.match(r"^#### (\S+) \(", line)
            if heading and heading.group(1) in catalogue:
                current = heading.group(1)
        out.append(line)
    close_rule()
    with open(spec_path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(out))
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance.observed", description=__doc__.splitlines()[0])
    parser.add_argument("report_root", help="a tox -e interop report root, e.g. reports/interop")
    parser.add_argument("--write", action="store_true", help="rewrite the Real peers: lines of SPEC.md")
    parser.add_argument("--requirement", metavar="ID[,ID...]",
                        help="only these rules (for reports of a run of some cases)")
    args = parser.parse_args(argv)
    only = None
    if args.requirement:
        only = {part.strip() for part in args.requirement.split(",") if part.strip()}
        unknown = sorted(only - set(load_catalogue()))
        if unknown:
            parser.error(f"unknown requirement IDs: {', '.join(unknown)}")
    observed = observe(args.report_root)
    if not observed:
        print(f"no results.json with real peers under {args.report_root}", file=sys.stderr)
        return 1
    for req_id in load_catalogue():
        if only is None or req_id in only:
            print(f"{req_id}: {trailer_text(req_id, observed)}")
    if args.write:
        spec = os.path.join(os.path.dirname(os.path.abspath(__file__)), "SPEC.md")
        print(f"{rewrite_spec(spec, observed, only)} rules changed in {spec}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
