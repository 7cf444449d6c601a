"""The client x daemon skew matrix: real builds of one awkward context, every client into every daemon.

    python -m interop.skew [--report-dir reports/interop/skew] [--timeout 180]

Clients: the docker CLI 20.10, the docker CLI 26.1 with buildx 0.13, the reference client n and n+1. Daemons:
dockerd 20.10 and 26.1 (private, conformance.realpeers), the reference daemon n and n+1. Each daemon sits behind a
recording proxy (conformance.wiretap), so the requests on the wire are counted for every pair, real ones included.

Each cell: ``FROM scratch`` + ``COPY . /`` of the context of interop/awkward.py with ``-o type=local``, then the
same build again, unchanged. A cell passes when

* the export holds exactly the names a correct build exports (our table, interop/awkward.py), as bytes;
* it equals the context itself in types, modes, sizes, contents, link targets, hardlink grouping and the mtimes of
  files and symlinks, with owner 0:0 (clients send the context as root's); directory mtimes only where the client
  and the daemon both keep them (``keeps_dir_mtimes`` in CLIENTS and DAEMONS, as measured);
* it equals, on the same terms, this client's export from the partner daemon: the other real daemon, or, for a
  reference daemon, the real daemon of its generation;
* the unchanged rebuild requests no file of the main context transfer (the Dockerfile and .dockerignore transfers
  are not judged: dockerd 26.1 re-requests them on every build by design) and exports the same tree;
* the proxy decoded every session and saw the main context transfer of both builds.

A cell of KNOWN_DEFECTS passes as "known defect" only when it fails exactly as documented (the defect's predicted
export and its wire evidence), and fails otherwise, the defect gone included. A cell that cannot work says why
(buildx into a daemon that does not serve ``/grpc``); that is probed, not assumed. buildx and the reference client
n+1 build over ``/grpc`` (BuildKit's Control API), the docker CLI 20.10 and the reference client n over ``/build``.

Writes DIR/skew.json (every cell, build, count and transfer) and DIR/skew.md (the grid); exit 1 when a cell
FAILs. interop/run.py runs it as the ``skew`` run and interop/matrix.py puts the grid into matrix.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace

from conformance import peers
from conformance.realpeers import PrivateDockerd, no_docker_reason
from conformance.targets import DaemonSpec, start_reference_daemon
from conformance.wiretap import CLIENT, Recording, WireTap

from . import awkward, exports

PASS, FAIL, KNOWN_DEFECT, CANNOT_WORK = "PASS", "FAIL", "KNOWN DEFECT", "CANNOT WORK"
DEFAULT_REPORT_DIR = os.path.join("reports", "interop", "skew")
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIENT_OWNER = (0, 0)  # every client sends the context as uid/gid 0 (the CLI's resetUIDAndGID)


@dataclass(frozen=True)
class ClientKind:
    name: str
    label: str
    peer: str | None = None  # a client of conformance.peers; None: the reference client
    generation: str = ""  # the reference client's --generation
    needs_grpc: bool = False  # builds over POST /grpc (BuildKit's Control API)
    keeps_dir_mtimes: bool = True  # its receiver gives exported directories the mtime the daemon sent

    def argv(self, context: str, dest: str) -> list[str]:
        output = ["-o", f"type=local,dest={dest}"]
        if self.peer:
            return [peers.binary(self.peer), "build", "--progress", "plain", *output, context]
        return [sys.executable, "-m", "reference.client", "build", "--progress", "plain",
                "--generation", self.generation, *output, context]


@dataclass(frozen=True)
class DaemonKind:
    name: str
    label: str
    peer: str | None = None  # a dockerd of conformance.peers; None: the reference daemon
    generation: str = ""
    partner: str = ""  # the daemon whose export of the same client this one's is compared with
    keeps_dir_mtimes: bool = True  # its COPY keeps the context's directory mtimes


# Who keeps directory mtimes is measured: dockerd 20.10's COPY gives directories the time of the copy, and the
# CLI 20.10's receiver leaves an exported directory at the time of its last write.
CLIENTS = (
    ClientKind("docker-cli-20.10", "docker CLI 20.10", peer="docker-cli-20.10", keeps_dir_mtimes=False),
    ClientKind("docker-cli-26.1", "docker CLI 26.1 + buildx 0.13", peer="docker-cli-26.1", needs_grpc=True),
    ClientKind("reference-n", "reference client n", generation="n"),
    ClientKind("reference-n+1", "reference client n+1", generation="n+1"),
)
DAEMONS = (
    DaemonKind("dockerd-20.10", "dockerd 20.10", peer="dockerd-20.10", partner="dockerd-26.1",
               keeps_dir_mtimes=False),
    DaemonKind("dockerd-26.1", "dockerd 26.1", peer="dockerd-26.1", partner="dockerd-20.10"),
    DaemonKind("reference-n", "reference daemon n", generation="n", partner="dockerd-20.10"),
    DaemonKind("reference-n+1", "reference daemon n+1", generation="n+1", partner="dockerd-26.1"),
)
CLIENT_KINDS = {c.name: c for c in CLIENTS}
DAEMON_KINDS = {d.name: d for d in DAEMONS}
# buildx needs BuildKit's Control API; every daemon of the matrix serves it (the reference daemons n and n+1 too,
# reference/daemon/grpcapi.py), so this is said only of a daemon whose probe finds no /grpc
NO_GRPC = "the daemon does not serve /grpc (BuildKit's Control API), which buildx builds through"


@dataclass(frozen=True)
class KnownDefect:
    key: str
    reason: str
    exported_names: frozenset[bytes]  # what the defective build exports instead
    encoded_key: str  # the metadata key whose percent-encoding the client ignores

    def wire_problems(self, build: "BuildRun") -> list[str]:
        """Whether the wire shows the defect's cause: the daemon encoded, the client sent the predicted names."""
        problems = []
        if not any(self.encoded_key in keys for keys in build.context_encoded_keys):
            problems.append(f"{self.key}: the daemon did not send {self.encoded_key}-encoded on the context "
                            "transfer; the defect's cause is absent")
        sent = {p.encode() for p in build.context_stats}
        if sent != self.exported_names:
            problems.append(f"{self.key}: the client sent other names than the defect predicts: "
                            f"missing {_names(self.exported_names - sent)}, extra {_names(sent - self.exported_names)}")
        return problems


# Only `build` is left unchanged by Go's url.QueryEscape; every other line (the `!` exceptions too) reaches the
# CLI 20.10 as a string that matches nothing, so `build` excludes build/keep.txt as well.
_UNDECODED_EXCLUDES = KnownDefect(
    "cli-20.10-undecoded-excludes",
    "the docker CLI 20.10 does not decode exclude-patterns that the daemon percent-encodes "
    "(exclude-patterns-encoded: 1, every line once one is non-ASCII, as dockerd 26.1 and the reference daemon n+1 "
    "do): it matches the escaped strings literally, so every .dockerignore line that escaping changes is lost, "
    "`!` exceptions included; only `build` still applies and takes build/keep.txt with it",
    awkward.expectation().all_names - {b"build", b"build/out.o", b"build/keep.txt"},
    "exclude-patterns",
)
KNOWN_DEFECTS: dict[tuple[str, str], KnownDefect] = {
    ("docker-cli-20.10", "dockerd-26.1"): _UNDECODED_EXCLUDES,
    ("docker-cli-20.10", "reference-n+1"): _UNDECODED_EXCLUDES,
}


@dataclass
class BuildRun:
    what: str  # cold | unchanged
    returncode: int
    seconds: float
    output_tail: str
    requests: dict[str, int] = field(default_factory=dict)  # REQs per transfer kind (export: the client's)
    context_transfers: int = 0
    context_requested: list[str] = field(default_factory=list)
    context_stats: list[str] = field(default_factory=list)  # what the client listed on the main transfer
    context_encoded_keys: list[list[str]] = field(default_factory=list)
    sessions: int = 0
    decode_errors: list[str] = field(default_factory=list)
    transfers: list[dict] = field(default_factory=list)
    tree: exports.Tree | None = None  # the export, when the build succeeded

    def as_dict(self) -> dict:
        return {"what": self.what, "returncode": self.returncode, "seconds": round(self.seconds, 3),
                "requests": self.requests, "context_transfers": self.context_transfers,
                "context_requested": self.context_requested[:50], "context_encoded_keys": self.context_encoded_keys,
                "sessions": self.sessions, "decode_errors": self.decode_errors, "transfers": self.transfers,
                "exported_entries": None if self.tree is None else len(self.tree),
                **({"output_tail": self.output_tail} if self.returncode else {})}


@dataclass
class Cell:
    client: str
    daemon: str
    verdict: str = ""
    reason: str = ""  # known defect or cannot work: why
    problems: list[str] = field(default_factory=list)
    builds: list[BuildRun] = field(default_factory=list)
    partner: str = ""

    @property
    def cold(self) -> BuildRun | None:
        return next((b for b in self.builds if b.what == "cold"), None)

    @property
    def rebuild(self) -> BuildRun | None:
        return next((b for b in self.builds if b.what == "unchanged"), None)

    def as_dict(self) -> dict:
        return {"client": self.client, "daemon": self.daemon, "verdict": self.verdict, "reason": self.reason,
                "problems": self.problems, "partner": self.partner, "builds": [b.as_dict() for b in self.builds]}


def _names(names) -> str:
    return "[" + ", ".join(exports.show(n) for n in sorted(names)) + "]"


# -- judging (pure) -----------------------------------------------------------------------------------

def restrict(tree: exports.Tree, names: frozenset[bytes]) -> exports.Tree:
    """The entries of `names`, their hardlink groups cut to `names` too."""
    out = {}
    for name, node in tree.items():
        if name in names:
            links = tuple(n for n in node.links if n in names)
            out[name] = replace(node, links=links if len(links) > 1 else ())
    return out


def expected_export(context: exports.Tree, names: frozenset[bytes]) -> exports.Tree:
    """What an export of these names of the context must look like: the context's entries, owned by 0:0."""
    return {name: replace(node, uid=CLIENT_OWNER[0], gid=CLIENT_OWNER[1])
            for name, node in restrict(context, names).items()}


def _comparable(tree: exports.Tree, dir_mtimes: bool) -> exports.Tree:
    return tree if dir_mtimes else exports.without_times(tree, kinds=("dir",))


def judge(cell: Cell, partner: Cell | None, expectation: awkward.Expectation, context: exports.Tree) -> None:
    """Set cell.verdict and cell.problems (see the module doc)."""
    if cell.verdict == CANNOT_WORK:
        return
    defect = KNOWN_DEFECTS.get((cell.client, cell.daemon))
    problems: list[str] = []
    cold, rebuild = cell.cold, cell.rebuild
    own_dir_mtimes = CLIENT_KINDS[cell.client].keeps_dir_mtimes and DAEMON_KINDS[cell.daemon].keeps_dir_mtimes
    if cold is None or cold.tree is None:
        problems.append("the build failed" + (f" (exit {cold.returncode}): {cold.output_tail}" if cold else ""))
    else:
        names = frozenset(cold.tree)
        wanted = defect.exported_names if defect else expectation.exported_names
        if defect is not None and names == expectation.exported_names:
            problems.append(f"known defect {defect.key} no longer reproduces: the export is correct "
                            "(take the cell out of KNOWN_DEFECTS)")
        elif names != wanted:
            problems.append(f"exported names: missing {_names(wanted - names)}, extra {_names(names - wanted)}")
        if defect is not None:
            problems += defect.wire_problems(cold)
        shared = names & wanted  # a wrong name is reported once, above
        against_context = exports.differences(_comparable(expected_export(context, shared), own_dir_mtimes),
                                              _comparable(restrict(cold.tree, shared), own_dir_mtimes))
        problems += [f"against the context: {line}" for line in against_context]
        problems += _against_partner(cell, partner, expectation, own_dir_mtimes)
    for build in cell.builds:
        if build.decode_errors:
            problems.append(f"{build.what} build: the proxy could not decode: {'; '.join(build.decode_errors)}")
        if build.returncode == 0 and build.context_transfers == 0:
            problems.append(f"{build.what} build: the proxy saw no main context transfer")
    if cold is not None and cold.tree is not None:
        if rebuild is None or rebuild.tree is None:
            problems.append("the unchanged rebuild failed" + (
                f" (exit {rebuild.returncode}): {rebuild.output_tail}" if rebuild else ""))
        else:
            if rebuild.requests.get("context", 0):
                problems.append(f"the unchanged rebuild requested {rebuild.requests['context']} file(s) of the main "
                                f"context transfer: {rebuild.context_requested[:20]}")
            problems += [f"rebuild export differs: {line}" for line in exports.differences(
                _comparable(cold.tree, own_dir_mtimes), _comparable(rebuild.tree, own_dir_mtimes))]
    cell.problems = problems
    if problems:
        cell.verdict = FAIL
    elif defect is not None:
        cell.verdict, cell.reason = KNOWN_DEFECT, defect.reason
    else:
        cell.verdict = PASS


def _against_partner(cell: Cell, partner: Cell | None, expectation: awkward.Expectation,
                     own_dir_mtimes: bool) -> list[str]:
    if partner is None:
        return []
    cell.partner = partner.daemon
    if partner.cold is None or partner.cold.tree is None:
        return [f"no export from {partner.daemon} to compare with (that cell failed)"]
    # Where a side has a documented defect, both are compared on the names that a correct and the defective
    # build export alike (the defect's own names are judged by its cell).
    comparable = expectation.exported_names
    for c in (cell, partner):
        defect = KNOWN_DEFECTS.get((c.client, c.daemon))
        if defect is not None:
            comparable &= defect.exported_names
    dir_mtimes = own_dir_mtimes and DAEMON_KINDS[partner.daemon].keeps_dir_mtimes
    lines = exports.differences(_comparable(restrict(partner.cold.tree, comparable), dir_mtimes),
                                _comparable(restrict(cell.cold.tree, comparable), dir_mtimes))
    return [f"against the export from {partner.daemon}: {line}" for line in lines]


# -- running ------------------------------------------------------------------------------------------

def serves_grpc(socket_path: str, timeout: float = 5.0) -> bool:
    """Whether the daemon upgrades ``POST /grpc`` (buildx's route to BuildKit's Control API)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(socket_path)
            sock.sendall(b"POST /grpc HTTP/1.1\r\nHost: \r\nContent-Length: 0\r\n"
                         b"Connection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
            head = b""
            while b"\r\n" not in head and len(head) < 4096:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                head += chunk
        except OSError:
            return False
    status = head.split(b"\r\n", 1)[0].split()
    return len(status) > 1 and status[1] == b"101"


def _client_env(client: ClientKind, host: str, config_dir: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DOCKER_", "BUILDKIT_", "BUILDX_")) and k != "SESSION_DAEMON_UNDER_TEST"}
    env.update(DOCKER_HOST=host, DOCKER_CONFIG=config_dir, DOCKER_BUILDKIT="1")
    os.makedirs(config_dir, exist_ok=True)
    if client.peer:
        env.update(peers.client_env(client.peer, config_dir))
    return env


def _run(argv: list[str], env: dict[str, str], timeout: float) -> tuple[int, str, float]:
    """(exit status, combined output, seconds); on timeout the whole process group is killed."""
    started = time.monotonic()
    process = subprocess.Popen(argv, env=env, cwd=PROJECT_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        output += f"\n<killed after {timeout:.0f} s>".encode()
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise
    return process.returncode, output.decode("utf-8", "replace"), time.monotonic() - started


def _build(client: ClientKind, what: str, context: str, dest: str, env: dict[str, str], tap: WireTap,
           timeout: float) -> BuildRun:
    tap.take(wait=10.0)  # nothing of an earlier build counts
    returncode, output, seconds = _run(client.argv(context, dest), env, timeout)
    recording: Recording = tap.take(wait=10.0)
    main = recording.of_kind("context")
    build = BuildRun(what, returncode, seconds, "\n".join(output.strip().splitlines()[-12:]),
                     requests=recording.request_counts(), context_transfers=len(main),
                     context_requested=recording.requested_paths("context"),
                     context_stats=[p for t in main for p in t.stat_paths[CLIENT]],
                     context_encoded_keys=[t.encoded_keys for t in main],
                     sessions=len(recording.sessions), decode_errors=recording.decode_errors(),
                     transfers=[t.as_dict(paths=20) for t in recording.transfers])
    if returncode == 0 and os.path.isdir(dest):
        build.tree = exports.snapshot(dest)
    shutil.rmtree(dest, ignore_errors=True)
    return build


class _Daemon:
    """A daemon of the matrix, started for its column and stopped after it."""

    def __init__(self, kind: DaemonKind):
        self.kind = kind
        self.private: PrivateDockerd | None = None
        self.reference = None

    def __enter__(self) -> str:
        if self.kind.peer:
            self.private = PrivateDockerd(self.kind.peer).start()
            return self.private.socket_path
        self.reference = start_reference_daemon(DaemonSpec(self.kind.name, generation=self.kind.generation))
        return self.reference.host[len("unix://"):]

    def __exit__(self, *exc_info) -> None:
        if self.private is not None:
            self.private.stop()
        if self.reference is not None:
            self.reference.stop()


def run_matrix(workdir: str, timeout: float, log=print) -> tuple[list[Cell], dict]:
    context = os.path.join(workdir, "context")
    expectation = awkward.write(context)
    context_tree = exports.snapshot(context)
    cells: dict[tuple[str, str], Cell] = {}
    facts: dict = {"daemons": {}}
    for daemon in DAEMONS:
        column = [Cell(c.name, daemon.name) for c in CLIENTS]
        for cell in column:
            cells[(cell.client, cell.daemon)] = cell
        started = time.monotonic()
        try:
            with _Daemon(daemon) as socket_path, WireTap(socket_path) as tap:
                grpc = daemon.peer is not None or serves_grpc(socket_path)
                facts["daemons"][daemon.name] = {"serves_grpc": grpc,
                                                 "start_seconds": round(time.monotonic() - started, 2)}
                for client, cell in zip(CLIENTS, column):
                    if client.needs_grpc and not grpc:
                        cell.verdict, cell.reason = CANNOT_WORK, NO_GRPC
                        continue
                    env = _client_env(client, tap.url, os.path.join(workdir, f"config-{client.name}-{daemon.name}"))
                    for what in ("cold", "unchanged"):
                        dest = os.path.join(workdir, f"export-{client.name}-{daemon.name}-{what}")
                        build = _build(client, what, context, dest, env, tap, timeout)
                        cell.builds.append(build)
                        log(f"skew: {client.label} -> {daemon.label}, {what}: exit {build.returncode} in "
                            f"{build.seconds:.1f} s, REQ {build.requests}")
                        if build.returncode != 0:
                            break
        except Exception as exc:  # a daemon that cannot start fails its column, not the whole matrix
            for cell in column:
                if not cell.verdict:
                    cell.verdict, cell.problems = FAIL, [f"{daemon.label}: {type(exc).__name__}: {exc}"]
            log(f"skew: {daemon.label} failed: {exc}")
    for cell in cells.values():
        if cell.verdict == FAIL and not cell.builds:
            continue
        partner = cells.get((cell.client, DAEMON_KINDS[cell.daemon].partner))
        judge(cell, partner, expectation, context_tree)
    facts["context"] = {"entries": len(expectation.all_names), "exported": len(expectation.exported_names),
                        "dockerignore": awkward.DOCKERIGNORE.decode()}
    return list(cells.values()), facts


# -- reports ------------------------------------------------------------------------------------------

def _labels(data: dict, role: str):
    names = data.get("labels", {}).get(role, {})
    return lambda name: names.get(name, name)


def render_grid(data: dict) -> str:
    """The 4 x 4 grid with numbered reasons; data as written to skew.json."""
    cells = {(c["client"], c["daemon"]): c for c in data["cells"]}
    client_label, daemon_label = _labels(data, "clients"), _labels(data, "daemons")
    reasons: list[str] = []
    lines = ["| client \\ daemon | " + " | ".join(daemon_label(d) for d in data["daemons"]) + " |",
             "|---|" + "---|" * len(data["daemons"])]
    for client in data["clients"]:
        row = []
        for daemon in data["daemons"]:
            cell = cells.get((client, daemon))
            if cell is None:
                row.append("-")
                continue
            text = cell["verdict"].lower() if cell["verdict"] != FAIL else "**FAIL**"
            if cell["reason"]:
                if cell["reason"] not in reasons:
                    reasons.append(cell["reason"])
                text += f" [{reasons.index(cell['reason']) + 1}]"
            counts = [str(b["requests"].get("context", 0)) for b in cell["builds"]]
            if counts:
                text += f" (REQ {' / '.join(counts)})"
            row.append(text)
        lines.append(f"| {client_label(client)} | " + " | ".join(row) + " |")
    lines.append("")
    lines.append("REQ a / b: files the daemon requested on the main context transfer, cold build / unchanged rebuild "
                 "(counted on the wire by conformance.wiretap).")
    lines += [f"[{i}] {reason}" for i, reason in enumerate(reasons, 1)]
    return "\n".join(lines) + "\n"


def render_markdown(data: dict) -> str:
    client_label, daemon_label = _labels(data, "clients"), _labels(data, "daemons")
    out = ["# Client x daemon skew matrix", "",
           f"One awkward context ({data['context']['entries']} entries, {data['context']['exported']} exported by a "
           "correct build; interop/awkward.py), `FROM scratch` + `COPY . /`, `-o type=local`, then an unchanged "
           "rebuild. See interop/skew.py for what a cell checks.", "", render_grid(data),
           "## Requests per build", "",
           "| client | daemon | build | dockerfile | .dockerignore | context | export (client's REQs) | sessions | s |",
           "|---|---|---|---|---|---|---|---|---|"]
    for cell in data["cells"]:
        for b in cell["builds"]:
            r = b["requests"]
            out.append(f"| {client_label(cell['client'])} | {daemon_label(cell['daemon'])} | {b['what']} "
                       f"| {r.get('dockerfile', '-')} | {r.get('dockerignore', '-')} | {r.get('context', '-')} "
                       f"| {r.get('export', '-')} | {b['sessions']} | {b['seconds']:.1f} |")
    failing = [c for c in data["cells"] if c["problems"]]
    if failing:
        out += ["", "## Failures", ""]
        for cell in failing:
            out.append(f"- {client_label(cell['client'])} -> {daemon_label(cell['daemon'])}:")
            out += [f"  - {p}" for p in cell["problems"][:30]]
    return "\n".join(out) + "\n"


def write_reports(report_dir: str, cells: list[Cell], facts: dict, seconds: float) -> dict:
    data = {"clients": [c.name for c in CLIENTS], "daemons": [d.name for d in DAEMONS],
            "labels": {"clients": {c.name: c.label for c in CLIENTS}, "daemons": {d.name: d.label for d in DAEMONS}},
            "cells": [c.as_dict() for c in cells], "seconds": round(seconds, 1), **facts,
            "known_defects": {f"{c} -> {d}": k.key for (c, d), k in KNOWN_DEFECTS.items()}}
    os.makedirs(report_dir, exist_ok=True)
    with open(os.path.join(report_dir, "skew.json"), "w") as fh:
        json.dump(data, fh, indent=2, ensure_ascii=False)
    with open(os.path.join(report_dir, "skew.md"), "w") as fh:
        fh.write(render_markdown(data))
    return data


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")  # so every daemon, proxy and directory is cleaned up


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m interop.skew", description=__doc__.splitlines()[0])
    parser.add_argument("--report-dir", default=DEFAULT_REPORT_DIR)
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds one build may take")
    args = parser.parse_args(argv)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    reason = no_docker_reason("dockerd-20.10", "dockerd-26.1", "docker-cli-20.10", "docker-cli-26.1")
    if reason:
        print(f"skew: cannot run: {reason}", file=sys.stderr)
        return 1
    started = time.monotonic()
    log = lambda message: print(message, flush=True)  # noqa: E731
    workdir = tempfile.mkdtemp(prefix="dsc-skew-", dir="/tmp")
    try:
        cells, facts = run_matrix(workdir, args.timeout, log=log)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    data = write_reports(os.path.abspath(args.report_dir), cells, facts, time.monotonic() - started)
    print("\n" + render_grid(data))
    failed = [c for c in cells if c.verdict == FAIL]
    for cell in failed:
        print(f"FAIL {CLIENT_KINDS[cell.client].label} -> {DAEMON_KINDS[cell.daemon].label}:", file=sys.stderr)
        for problem in cell.problems[:10]:
            print(f"  - {problem}", file=sys.stderr)
    counts = {v: sum(c.verdict == v for c in cells) for v in (PASS, KNOWN_DEFECT, CANNOT_WORK, FAIL)}
    print("skew: " + ", ".join(f"{n} {v.lower()}" for v, n in counts.items())
          + f" in {time.monotonic() - started:.1f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
