"""Ending a child process: SIGTERM, a grace period for it to finish cleanly, then SIGKILL."""

from __future__ import annotations

import subprocess


def stop_process(proc: subprocess.Popen | None, grace: float) -> None:
    """Ask ``proc`` to stop and reap it; one that outlives ``grace`` seconds is killed."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
