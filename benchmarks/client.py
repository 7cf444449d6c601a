"""Suites "client" and "client-26.1": our client against the real client of a vintage, into that vintage's
private dockerd: our client n against the docker CLI 20.10 into dockerd 20.10, our client n+1 against the docker
CLI 26.1 with buildx 0.13 into dockerd 26.1 (PAIRS).

Both build the same generated context (``FROM scratch`` + ``COPY . /``) in
three states: cold (after ``docker builder prune -af``), unchanged (right after
the same tool's cold build) and one file changed (right after that).

Cache fairness: each tool has its own ``DOCKER_CONFIG``, hence its own build
node id and its own shared key, so the daemon keeps one copy of the context per
tool; every tool's sequence starts with a prune, so "unchanged" and "changed"
are always against that tool's own warm copy, never the other tool's.

Two figures per state:
* whole wall time of the process, quiet output (``docker build -q`` and
  ``python -m reference.client build --progress quiet``);
* the daemon-reported duration of the ``[internal] load build context``
  vertex (its final ``completed - started``), from separate runs: the CLI with
  ``--progress plain`` (its last ``#N DONE 1.2s`` for that vertex), ours
  (buildx prints the same lines) through ``benchmarks.clientprobe``, which runs the same ``build()`` as
  ``python -m reference.client build`` with a progress handler that keeps the
  vertex's final timestamps as the CLI's display does.  Ours is rounded to
  0.1 s as the CLI prints it.  Our client's own context-stream seconds (from
  its stats) are kept in the JSON only: they time our handler, not what the
  daemon waited, so they have no CLI equivalent.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass

from conformance import peers, realpeers

from . import contexts
from .procs import MeasurementError, PROJECT_ROOT, Workspace, child_env, python_module, run_timed, settle
from .report import Row, SuiteResult, median

TARGET = 1.0
SCENARIOS = ("cold", "unchanged", "changed")
SCENARIO_LABELS = {"cold": "cold", "unchanged": "unchanged", "changed": "one file changed"}
CLI_RESOLUTION = 0.1  # BuildKit's plain progress prints durations to 0.1 s



@dataclass(frozen=True)
class Pair:
    """Who is measured against whom: our client of a generation, a real client, the daemon of their vintage."""

    suite: str
    daemon: str  # a dockerd of conformance.peers
    peer_client: str  # a client of conformance.peers
    peer_label: str
    generation: str  # our client's --generation
    with_grpcio: bool  # also our grpcio transport, as an extra row


PAIRS = {
    "20.10": Pair("client", "dockerd-20.10", "docker-cli-20.10", "docker CLI 20.10", "n", with_grpcio=True),
    "26.1": Pair("client-26.1", "dockerd-26.1", "docker-cli-26.1", "docker CLI 26.1 + buildx 0.13", "n+1",
                 with_grpcio=False),
}

_VERTEX_LINE = re.compile(r"^#(\d+) (.*)$")
_DONE_LINE = re.compile(r"^#(\d+) DONE (\d+(?:\.\d+)?)s\s*$")
_TRANSFER_LINE = re.compile(r"^#(\d+) transferring context: .* (\d+(?:\.\d+)?)s done\s*$")


def load_context_seconds(progress: str) -> float | None:
    """Daemon-reported duration of ``[internal] load build context`` in the CLI's plain progress.

    The last ``#N DONE`` of that vertex counts: BuildKit may complete it twice
    (a short first phase, then the transfer) and the CLI prints each.
    """
    number = None
    done = transfer = None
    for line in progress.splitlines():
        line = line.rstrip()
        m = _VERTEX_LINE.match(line)
        if not m:
            continue
        if m.group(2) == "[internal] load build context":
            number = m.group(1)
            continue
        if number is None or m.group(1) != number:
            continue
        d = _DONE_LINE.match(line)
        if d:
            done = float(d.group(2))
        t = _TRANSFER_LINE.match(line)
        if t:
            transfer = float(t.group(2))
    return done if done is not None else transfer


def as_cli_prints(seconds: float) -> float:
    """A duration as the CLI's ``%.1fs`` shows it, so that both tools share one resolution."""
    return float(f"{seconds:.1f}")


class Tool:
    """One way of building: the docker CLI, or our client over one transport."""

    def __init__(self, name: str, label: str, extra: bool, config_dir: str, context: str, base_env: dict,
                 transport: str | None = None, peer: str | None = None, generation: str = "n+1"):
        self.name, self.label, self.extra, self.transport = name, label, extra, transport
        self.peer, self.generation = peer, generation
        self.context = context
        os.makedirs(config_dir, exist_ok=True)
        self.env = child_env(dict(base_env, DOCKER_CONFIG=config_dir))
        if peer is not None:
            self.env.update(peers.client_env(peer, config_dir))  # the vintage's plugins (buildx) in its config
        self.error = ""
        self.stats_files: list[str] = []

    def argv(self, plain: bool, probe_json: str | None) -> list[str]:
        if self.transport is None:
            progress = ["--progress", "plain"] if plain else ["-q"]
            return [peers.binary(self.peer), "build", *progress, self.context]
        if plain:
            # Same build() as the CLI entry point, with a progress handler that keeps the vertex's final
            # timing (reference.client's own plain printer reports the first completion only).
            return python_module("benchmarks.clientprobe", "--transport", self.transport, "--generation",
                                 self.generation, "--out", probe_json, self.context)
        return python_module("reference.client", "build", "--progress", "quiet", "--transport", self.transport,
                             "--generation", self.generation, self.context)


def _probe_figures(probe_path: str) -> tuple[float | None, float | None]:
    """(daemon's load-build-context seconds, our context streams' own seconds) from a probe's JSON."""
    with open(probe_path) as fh:
        probe = json.load(fh)
    streams = [s for s in probe.get("client", {}).get("streams", []) if s.get("dir_name") == "context"]
    own = sum(s.get("seconds", 0.0) for s in streams) if streams else None
    return probe.get("load_context_seconds"), own


def run(opts, vintage: str = "20.10") -> SuiteResult:
    pair = PAIRS[vintage]
    result = SuiteResult(pair.suite, f"{pair.suite}: our client {pair.generation} vs {pair.peer_label}, "
                                     f"into dockerd {vintage}", ours_name="ours (h2)", peer_name=pair.peer_label)
    reason = realpeers.no_docker_reason(pair.daemon, pair.peer_client)
    if reason:
        result.error = f"real peers unavailable: {reason}"
        return result
    samples: dict[str, dict[str, dict[str, list]]] = {}
    result.details["samples"] = samples
    with Workspace("cli") as ws:
        context = ws.sub("ctx")
        tree = contexts.generate_tree(context, opts.files, opts.megabytes, seed=opts.seed, dockerfile=True)
        contexts.preread(context)
        result.details["tree"] = tree.describe()
        print(f"  {pair.suite}: context {tree.describe()}; {opts.runs} interleaved runs", flush=True)
        floor = [run_timed([sys.executable, "-c", "pass"], env=child_env(), scratch=ws.path).seconds
                 for _ in range(5)]
        result.details["interpreter_start"] = floor
        with realpeers.PrivateDockerd(pair.daemon) as dockerd:
            base_env = dockerd.env(pair.peer_client)
            tools = [
                Tool("cli", pair.peer_label, False, ws.sub("cfg-cli"), context, base_env, peer=pair.peer_client),
                Tool("h2", "ours (h2)", False, ws.sub("cfg-h2"), context, base_env, transport="h2",
                     generation=pair.generation),
            ]
            if pair.with_grpcio:
                tools.append(Tool("grpcio", "ours (grpcio)", True, ws.sub("cfg-grpcio"), context, base_env,
                                  transport="grpcio", generation=pair.generation))
            for tool in tools:
                samples[tool.name] = {figure: {s: [] for s in SCENARIOS}
                                      for figure in ("wall", "context", "context_exact", "stream")}
            edits = 0
            for run_index in range(opts.runs):
                for plain in (False, True):
                    for tool in tools:
                        if tool.error:
                            continue
                        try:
                            prune = dockerd.cli("builder", "prune", "-af", timeout=300)
                            if prune.returncode != 0:
                                raise MeasurementError(f"docker builder prune failed: {prune.stderr.strip()}")
                            for scenario in SCENARIOS:
                                if scenario == "changed":
                                    edits += 1
                                    contexts.rewrite_file(context, tree.change_target, edits)
                                probe_path = ws.sub(f"probe-{tool.name}.json") if plain and tool.transport else None
                                settle()
                                timed = run_timed(tool.argv(plain, probe_path), env=tool.env, cwd=PROJECT_ROOT,
                                                  scratch=ws.path, timeout=900)
                                timed.check(f"{tool.label} ({scenario}, {'plain' if plain else 'quiet'})")
                                bucket = samples[tool.name]
                                if not plain:
                                    bucket["wall"][scenario].append(timed.seconds)
                                    continue
                                if probe_path:
                                    exact, own = _probe_figures(probe_path)
                                    seconds = None if exact is None else as_cli_prints(exact)
                                    if exact is not None:
                                        bucket["context_exact"][scenario].append(exact)
                                    if own is not None:
                                        bucket["stream"][scenario].append(own)
                                else:
                                    seconds = load_context_seconds(timed.stderr)
                                if seconds is None:
                                    raise MeasurementError(f"{tool.label}: no 'load build context' duration "
                                                           f"reported:\n{timed.stderr[-1500:]}")
                                bucket["context"][scenario].append(seconds)
                        except MeasurementError as exc:
                            tool.error = str(exc)
                            print(f"  {pair.suite}: {tool.label} failed, left out from now on: "
                                  f"{str(exc).splitlines()[0]}", flush=True)
                print(f"  {pair.suite}: run {run_index + 1}/{opts.runs}: " + ", ".join(
                    f"{t.label} wall {'/'.join(f'{v[-1]:.2f}' for v in samples[t.name]['wall'].values() if v) or '-'}"
                    for t in tools), flush=True)

    cli = tools[0]
    for tool in tools[1:]:
        suffix = "" if tool.name == "h2" else f" [{tool.name}]"
        for figure, what in (("wall", "wall time"), ("context", "load build context")):
            for scenario in SCENARIOS:
                ours = samples[tool.name][figure][scenario]
                peer = samples["cli"][figure][scenario]
                error = tool.error or cli.error
                row = Row(f"{what}, {SCENARIO_LABELS[scenario]}{suffix}", median(ours), median(peer),
                          target=TARGET, extra=tool.extra, ours_samples=ours, peer_samples=peer,
                          resolution=CLI_RESOLUTION if figure == "context" else 0.0,
                          error=error.splitlines()[0] if error and not (ours and peer) else "")
                result.rows.append(row)
    for tool in tools:
        if tool.error:
            result.notes.append(f"{tool.label} failed: {tool.error}")
            if not tool.extra:
                result.error = result.error or f"{tool.label} could not be measured"
    result.notes.append(f"context: {tree.describe()}, Dockerfile 'FROM scratch' + 'COPY . /'; "
                        f"median of {opts.runs} interleaved runs" + (" (fewer than 3: indicative only)"
                                                                        if opts.runs < 3 else ""))
    result.notes.append(f"ours: python -m reference.client build --generation {pair.generation}; peer: "
                        f"{peers.version(pair.peer_client) or pair.peer_client}; daemon: "
                        f"{peers.version(pair.daemon) or pair.daemon} (private)")
    result.notes.append("wall time: whole process, quiet output (docker build -q / --progress quiet)")
    result.notes.append("load build context: the daemon's own duration of the '[internal] load build context' "
                        "vertex (final completed - started), from separate runs: the CLI with --progress plain "
                        "(last '#N DONE x.xs'), ours through benchmarks.clientprobe (the same build() with a "
                        "handler that keeps the vertex's final timestamps), rounded to 0.1 s as the CLI prints")
    result.notes.append("each tool has its own DOCKER_CONFIG (node id, shared key) and starts with "
                        "'docker builder prune -af': unchanged/changed are against the tool's own warm copy")
    result.notes.append(f"for scale: starting this Python with nothing to do ('python -c pass', site-packages "
                        f"included) takes {median(floor):.3f} s here; the docker CLI is a compiled Go binary")
    h2_stream = samples.get("h2", {}).get("stream", {})
    if any(h2_stream.values()):
        result.notes.append("our client's own context-stream time (its stream stats; no CLI equivalent, not judged): "
                            + ", ".join(f"{s} {median(v):.3f} s" for s, v in h2_stream.items() if v))
    return result


if __name__ == "__main__":  # pragma: no cover - convenience: parse a saved plain progress log
    print(load_context_seconds(sys.stdin.read()))
