"""Suite "core": the in-memory DiffCopy pair against ``rsync -a``, same trees, same run.

Each sync of ours runs in a fresh child (``python -m benchmarks.core --child
SRC DST``) that imports everything, records its baseline RSS, then calls
``reference.inmemory.sync_directories`` and reports the call's duration and its
peak RSS (``ru_maxrss``).  The ratio is that call's time against the whole
``rsync`` process; the whole-process time of our child (interpreter start and
imports included) is an extra, unjudged row.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

from . import contexts
from .procs import MeasurementError, PROJECT_ROOT, Workspace, child_env, python_module, run_timed, settle
from .report import Row, SuiteResult, median

RSYNC = "/usr/bin/rsync"  # Debian's rsync

TARGET_COLD = 1.5
TARGET_UNCHANGED = 1.0
TARGET_PEAK_MB = 64.0


def _clear(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _ours(src: str, dst: str, scratch: str, profile: bool = False) -> dict:
    argv = python_module("benchmarks.core", "--child", src, dst) + (["--profile"] if profile else [])
    timed = run_timed(argv, env=child_env(), cwd=PROJECT_ROOT, scratch=scratch).check("the in-memory sync child")
    report = json.loads(timed.stdout.strip().splitlines()[-1])
    report["process_seconds"] = timed.seconds
    report["profile"] = timed.stderr if profile else ""
    return report


def _rsync(src: str, dst: str, scratch: str, options: str = "-a") -> dict:
    timed = run_timed([RSYNC, options, src.rstrip("/") + "/", dst.rstrip("/") + "/"], scratch=scratch).check("rsync")
    return {"seconds": timed.seconds, "maxrss_kb": timed.maxrss_kb, "cpu_seconds": timed.cpu_seconds}


def _tree_listing(root: str) -> dict[str, tuple]:
    listing = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            size = st.st_size if not os.path.isdir(path) else 0
            listing[rel] = (st.st_mode, size, st.st_mtime_ns if not os.path.isdir(path) else 0, st.st_uid)
    return listing


def _check_same_tree(src: str, dst: str, what: str) -> None:
    """Cheap correctness guard: a fast but wrong sync must not pass as a benchmark result."""
    expected, got = _tree_listing(src), _tree_listing(dst)
    if expected != got:
        missing = sorted(set(expected) - set(got))[:5]
        extra = sorted(set(got) - set(expected))[:5]
        differing = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])[:5]
        raise MeasurementError(f"{what} left a different tree: missing {missing}, extra {extra}, differing {differing}")


def run(opts) -> SuiteResult:
    result = SuiteResult("core", "core: in-memory DiffCopy pair vs rsync -a", peer_name="rsync -a",
                         ours_name="in-memory pair")
    if not os.access(RSYNC, os.X_OK):
        result.error = f"{RSYNC} not found (apt-get install rsync)"
        return result
    samples: dict[str, list] = {"ours_cold": [], "rsync_cold": [], "ours_unchanged": [], "rsync_unchanged": [],
                                "rsync_xattrs_unchanged": []}
    result.details["samples"] = samples
    with Workspace("core") as ws:
        src, ours_dst, rsync_dst = ws.sub("src"), ws.sub("ours"), ws.sub("rsync")
        tree = contexts.generate_tree(src, opts.files, opts.megabytes, seed=opts.seed)
        contexts.preread(src)
        result.details["tree"] = tree.describe()
        print(f"  core: tree {tree.describe()}; {opts.runs} interleaved runs", flush=True)
        for run_index in range(opts.runs):
            # Cold: empty destinations.  Order within a run: ours, rsync, ours, rsync; the next
            # run starts with rsync, so that neither side always re-syncs right after the
            # other's cold copy (whose writes are still being flushed).
            _clear(ours_dst)
            _clear(rsync_dst)
            sides = {"ours": lambda: _ours(src, ours_dst, ws.path), "rsync": lambda: _rsync(src, rsync_dst, ws.path)}
            order = ("ours", "rsync") if run_index % 2 == 0 else ("rsync", "ours")
            for side in order:
                settle()
                samples[f"{side}_cold"].append(sides[side]())
            if run_index == 0:
                _check_same_tree(src, ours_dst, "the in-memory pair")
                _check_same_tree(src, rsync_dst, "rsync")
            for side in order:
                settle()
                samples[f"{side}_unchanged"].append(sides[side]())
            settle()
            samples["rsync_xattrs_unchanged"].append(_rsync(src, rsync_dst, ws.path, "-aX"))
            print(f"  core: run {run_index + 1}/{opts.runs}: cold {samples['ours_cold'][-1]['seconds']:.3f} s vs "
                  f"{samples['rsync_cold'][-1]['seconds']:.3f} s, unchanged "
                  f"{samples['ours_unchanged'][-1]['seconds']:.3f} s vs "
                  f"{samples['rsync_unchanged'][-1]['seconds']:.3f} s", flush=True)
        re_requested = max(s["requested"] for s in samples["ours_unchanged"])
        if getattr(opts, "profile", False):
            _clear(ours_dst)
            cold = _ours(src, ours_dst, ws.path, profile=True)
            unchanged = _ours(src, ours_dst, ws.path, profile=True)
            result.appendix = ("-- cProfile, one cold sync (top functions by own time) --\n" + cold["profile"]
                               + "\n-- cProfile, one unchanged re-sync --\n" + unchanged["profile"])

    def seconds(key):
        return [s["seconds"] for s in samples[key]]

    for label, kind, target in (("cold sync", "cold", TARGET_COLD), ("unchanged re-sync", "unchanged", TARGET_UNCHANGED)):
        ours, peer = seconds(f"ours_{kind}"), seconds(f"rsync_{kind}")
        result.rows.append(Row(label, median(ours), median(peer), target=target,
                               ours_samples=ours, peer_samples=peer))
    for label, kind in (("cold, whole process", "cold"), ("unchanged, whole process", "unchanged")):
        ours = [s["process_seconds"] for s in samples[f"ours_{kind}"]]
        peer = seconds(f"rsync_{kind}")
        result.rows.append(Row(label, median(ours), median(peer), extra=True, ours_samples=ours, peer_samples=peer,
                               note="" if kind == "unchanged" else
                               "includes interpreter start and imports; not judged"))
    # Context for the unchanged row: what each side spends in CPU (rsync's three processes
    # together), and rsync when it reads xattrs too, as every Stat of the protocol must.
    ours_cpu = [s["cpu_seconds"] for s in samples["ours_unchanged"]]
    rsync_cpu = [s["cpu_seconds"] for s in samples["rsync_unchanged"]]
    result.rows.append(Row("unchanged re-sync, CPU time", median(ours_cpu), median(rsync_cpu), extra=True,
                           ours_samples=ours_cpu, peer_samples=rsync_cpu,
                           note="ours: the sync's process time in one thread; rsync: user + system time of "
                                "its sender, generator and receiver processes together"))
    ours_unchanged, xattr_peer = seconds("ours_unchanged"), seconds("rsync_xattrs_unchanged")
    result.rows.append(Row("unchanged re-sync vs rsync -aX", median(ours_unchanged), median(xattr_peer), extra=True,
                           ours_samples=ours_unchanged, peer_samples=xattr_peer,
                           note="rsync -aX also reads every entry's xattrs, as the Stat stream must (llistxattr "
                                "per entry, as fsutil does); rsync -a skips them"))
    peaks = [(s["maxrss_kb"] - s["baseline_kb"]) / 1024 for s in samples["ours_cold"] + samples["ours_unchanged"]]
    rsync_peaks = [s["maxrss_kb"] / 1024 for s in samples["rsync_cold"] + samples["rsync_unchanged"]]
    result.rows.append(Row("peak memory above baseline", max(peaks), max(rsync_peaks), unit="MB",
                           target=TARGET_PEAK_MB, target_kind="absolute", ours_samples=peaks,
                           peer_samples=rsync_peaks,
                           note="ours: child's peak RSS during the sync (VmHWM reset after imports) minus its RSS after imports, worst run; "
                                "rsync: whole-process peak RSS, for context only"))
    result.notes.append(f"tree: {result.details['tree']}; median of {opts.runs} interleaved runs"
                        + (" (fewer than 3: indicative only)" if opts.runs < 3 else ""))
    result.notes.append("ours = duration of sync_directories() in a fresh child; rsync = whole rsync process; "
                        "source pre-read once; dirty pages flushed (sync) before every run")
    if re_requested:
        result.notes.append(f"WARNING: the unchanged re-sync requested {re_requested} files (expected none)")
    return result


# -- the measured child -------------------------------------------------------------------------

def _rss_kb(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Start VmHWM afresh (Linux clear_refs 5), so the peak is the sync's alone."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def child_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.core")
    parser.add_argument("--child", nargs=2, metavar=("SRC", "DST"), required=True)
    parser.add_argument("--profile", action="store_true", help="cProfile the sync; report on stderr")
    args = parser.parse_args(argv)
    import gc
    import resource
    import time

    from reference.inmemory import sync_directories  # imports the whole pair before the baseline

    src, dst = args.child
    gc.collect()
    baseline_kb = _rss_kb()
    maxrss_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_reset = _reset_peak_rss()
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    started, cpu_started = time.perf_counter(), time.process_time()
    outcome = sync_directories(src, dst)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    if profiler is not None:
        import pstats

        profiler.disable()
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(15)
    # with the peak reset, VmHWM is the highest RSS since the baseline; the kernel
    # updates it lazily, so it is never taken below the current RSS
    maxrss_kb = (max(_rss_kb("VmHWM"), _rss_kb()) if peak_reset
                 else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    print(json.dumps({
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "baseline_kb": baseline_kb,
        "maxrss_before_kb": maxrss_before_kb,
        "maxrss_kb": maxrss_kb,
        "requested": len(outcome.requested),
        "files_written": outcome.files_written,
        "bytes_written": outcome.bytes_written,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
