"""Temporary workspaces and timed child processes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

#: The project root (parent of this package): children run from here so that
#: ``python -m benchmarks.core`` and ``python -m reference...`` resolve to this checkout.
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class MeasurementError(RuntimeError):
    """A command that had to succeed for a measurement did not."""


class Workspace:
    """A short directory under /tmp, removed on exit (also after errors and Ctrl-C)."""

    def __init__(self, tag: str):
        self.tag = tag
        self.path = ""

    def __enter__(self) -> "Workspace":
        self.path = tempfile.mkdtemp(prefix=f"dsb-{self.tag}-", dir="/tmp")
        return self

    def __exit__(self, *exc_info) -> None:
        if self.path:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = ""

    def sub(self, name: str) -> str:
        return os.path.join(self.path, name)


def compile_bytecode() -> str:
    """Write ``__pycache__`` for the project's packages before anything is timed.

    An installed package has its bytecode compiled by pip; a checkout run with
    ``PYTHONDONTWRITEBYTECODE=1`` (set on some CI machines) would otherwise
    compile every module from source in every child, about 50 ms per start of
    our client, which no user pays.  Returns a note for the report.
    """
    import compileall

    for package in ("reference", "benchmarks"):
        compileall.compile_dir(os.path.join(PROJECT_ROOT, package), quiet=1)
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        return "bytecode compiled before measuring (PYTHONDONTWRITEBYTECODE is set here)"
    return "bytecode compiled before measuring"


def child_env(base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = PROJECT_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


@dataclass
class Timed:
    seconds: float
    returncode: int
    stdout: str
    stderr: str
    maxrss_kb: int  # the child's peak resident set (wait4's ru_maxrss)
    cpu_seconds: float = 0.0  # user + system time of the child and the descendants it reaped

    def check(self, what: str) -> "Timed":
        if self.returncode != 0:
            tail = "\n".join((self.stderr or self.stdout).strip().splitlines()[-15:])
            raise MeasurementError(f"{what} exited with status {self.returncode}:\n{tail}")
        return self


def run_timed(argv: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
              timeout: float = 900.0, scratch: str = "/tmp") -> Timed:
    """Run argv to completion; wall time from just before fork to reaping.

    Output goes to files (not pipes) so that reading it costs nothing during
    the run, and so that the child can be reaped with wait4 for its rusage.
    """
    fd_out, out_path = tempfile.mkstemp(prefix="out-", dir=scratch)
    fd_err, err_path = tempfile.mkstemp(prefix="err-", dir=scratch)
    proc = None
    try:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fd_out, stderr=fd_err, env=env, cwd=cwd)
        # A blocking wait4 measures precisely and costs nothing; a timer enforces the timeout.
        timed_out = threading.Event()

        def kill_late() -> None:
            timed_out.set()
            proc.kill()

        timer = threading.Timer(timeout, kill_late)
        timer.daemon = True
        timer.start()
        try:
            _pid, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
        if timed_out.is_set():
            raise MeasurementError(f"{argv[0]} did not finish within {timeout:.0f} s")
        with open(out_path, errors="replace") as fh:
            out = fh.read()
        with open(err_path, errors="replace") as fh:
            err = fh.read()
        return Timed(seconds, proc.returncode, out, err, usage.ru_maxrss, usage.ru_utime + usage.ru_stime)
    except BaseException:
        if proc is not None and proc.returncode is None:
            proc.kill()
            try:
                os.wait4(proc.pid, 0)
            except ChildProcessError:
                pass
            proc.returncode = -signal.SIGKILL
        raise
    finally:
        os.close(fd_out)
        os.close(fd_err)
        os.unlink(out_path)
        os.unlink(err_path)


def settle() -> None:
    """Write back dirty pages left by the previous run, so that no run pays for another's writes."""
    os.sync()


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]
