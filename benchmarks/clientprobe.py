"""``python -m benchmarks.clientprobe --transport T [--generation G] --out FILE CONTEXT``: our client, timing a
daemon vertex.

Runs the same ``reference.client.build.build()`` that ``python -m
reference.client build`` runs, with a progress handler that keeps each
vertex's *latest* state from the typed progress events (reference.client.progress).  BuildKit may report a vertex as started and
completed more than once (a short first phase, then the real work); the final
``completed - started`` is what the CLI prints as ``#N DONE x.xs``.

Writes JSON: the image id, and per vertex name its final started/completed
(seconds, daemon clock) plus every update seen for ``[internal] load build context``.
"""

from __future__ import annotations

import argparse
import json
import sys

LOAD_CONTEXT = "[internal] load build context"


class VertexTimes:
    def __init__(self) -> None:
        self.latest: dict[str, dict] = {}  # digest -> {"name", "started", "completed"}
        self.context_updates: list[tuple[float | None, float | None]] = []

    def __call__(self, event) -> None:
        from reference.client.progress import StepCached, StepDone, StepFailed, StepStarted

        if isinstance(event, StepStarted):
            update = {"name": event.name, "started": event.started, "completed": None, "cached": False}
        elif isinstance(event, (StepDone, StepCached, StepFailed)):
            update = {"name": event.name, "started": event.started, "completed": event.completed,
                      "cached": isinstance(event, StepCached)}
        else:
            return
        self.latest[event.digest] = update
        if event.name == LOAD_CONTEXT:
            self.context_updates.append((update["started"], update["completed"]))

    def by_name(self) -> dict[str, dict]:
        return {entry["name"]: entry for entry in self.latest.values()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.clientprobe")
    parser.add_argument("context")
    parser.add_argument("--transport", choices=["h2", "grpcio"], default="h2")
    parser.add_argument("--generation", choices=["n-1", "n", "n+1"], default="n+1")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    from reference.client.build import build

    times = VertexTimes()
    result = build(args.context, transport=args.transport, generation=args.generation, progress=times)
    vertexes = times.by_name()
    context = vertexes.get(LOAD_CONTEXT)
    seconds = None
    if context and context["started"] is not None and context["completed"] is not None:
        seconds = context["completed"] - context["started"]
    with open(args.out, "w") as fh:
        json.dump({"image_id": result.image_id, "load_context_seconds": seconds, "vertexes": vertexes,
                   "context_updates": times.context_updates, "client": result.stats_json()}, fh, indent=1)
    if result.image_id is None:
        print("error: the build produced no image id", file=sys.stderr)
        return 1
    print(result.image_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
