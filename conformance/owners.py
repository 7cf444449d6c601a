"""Who owns a temporary resource (a private daemon's directory, a dind container, a run's scratch directory):
the owning process's pid and kernel start time, so a later run can tell a live owner from a dead one whose pid
was reused, and reclaim what the dead one left."""

from __future__ import annotations

import os


def process_start_time(pid: int) -> str | None:
    """Kernel start time of pid (field 22 of /proc/PID/stat), or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses; the fields after the last ")" are fixed.
    return stat[stat.rindex(b")") + 2:].split()[19].decode()


def owner_line(pid: int | None = None) -> str:
    """'<pid> <start time>' of pid (default: this process)."""
    pid = os.getpid() if pid is None else pid
    return f"{pid} {process_start_time(pid)}"


def owner_alive(line: str) -> bool:
    """Whether the process an owner_line() names still runs (False for a malformed line)."""
    try:
        pid, started = line.split()
        return process_start_time(int(pid)) == started
    except ValueError:
        return False
