"""One temporary directory per suite run: whatever the suite, its daemons and its clients put in temporary
files goes there, and it is removed when the run ends, also after a failure or Ctrl-C.

Set up only when the run collects conformance cases, so the plugin changes nothing for other projects. A run
that was killed (no chance to clean up) leaves its directory; the next run removes those of dead owners.

Where it goes: under ``$TMPDIR`` when that is set; otherwise on ``/dev/shm`` when that is a writable tmpfs
with room to spare, else under the usual temporary directory. A run creates and deletes tens of thousands of
small files (build contexts, the trees the embedded daemons receive); on ext4 every create scans the inode
bitmap for recently deleted inodes, which perf put at about a tenth of all CPU samples of the main job. On tmpfs
that cost is gone: the main job's system time halved (14-18 s to 7 s on 2 cores) and its wall time fell by
about 10 s. The main job's directory peaks at about 200 MB (the 64 MiB transfer cases, sent and received);
at least 1 GiB must be free there.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile

from .owners import owner_alive, owner_line

_PREFIX = "conf-run-"
_OWNER = "owner"
_SHM = "/dev/shm"
_SHM_MIN_FREE = 1 << 30  # a container's 64 MB /dev/shm, say, is too small: the usual directory then


def _is_tmpfs(path: str, mounts: str = "/proc/self/mounts") -> bool:
    """A tmpfs mounted at path, and not noexec: the suite runs scripts it writes to its temporary directory
    (nosuid and nodev, Debian's options for /dev/shm, do no harm: device nodes are made, never opened)."""
    try:
        with open(mounts) as fh:
            entries = [line.split() for line in fh]
    except OSError:
        return False
    found = [e for e in entries if len(e) > 3 and e[1] == path]
    return bool(found) and found[-1][2] == "tmpfs" and "noexec" not in found[-1][3].split(",")  # last mount wins


def default_base(shm: str = _SHM) -> str:
    """The directory a run's directory goes under (see the module doc)."""
    if os.environ.get("TMPDIR"):
        return tempfile.gettempdir()
    try:
        roomy = os.access(shm, os.W_OK | os.X_OK) and _free_bytes(shm) >= _SHM_MIN_FREE and _is_tmpfs(shm)
    except OSError:
        roomy = False
    return shm if roomy else tempfile.gettempdir()


def _free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def reap_orphans(base: str) -> list[str]:
    """Remove run directories under base whose owning process is gone."""
    removed = []
    for owner_file in glob.glob(os.path.join(base, f"{_PREFIX}*", _OWNER)):
        try:
            with open(owner_file) as fh:
                line = fh.read()
        except OSError:
            continue
        if not owner_alive(line):
            shutil.rmtree(os.path.dirname(owner_file), ignore_errors=True)
            removed.append(os.path.dirname(owner_file))
    return removed


class RunScratch:
    """``tempfile`` and ``$TMPDIR`` point into a fresh directory until ``close()``."""

    def __init__(self, base: str | None = None) -> None:
        self.base = base
        self.dir: str | None = None
        self._saved: tuple[str | None, str | None] = (None, None)

    def open(self) -> str:
        if self.dir is None:
            self.base = self.base or default_base()
            for base in dict.fromkeys((self.base, tempfile.gettempdir())):  # also where an older run may be
                reap_orphans(base)
            # Short: the unix sockets of the embedded daemons live below it (reference.socketdirs).
            self.dir = tempfile.mkdtemp(prefix=_PREFIX, dir=self.base)
            with open(os.path.join(self.dir, _OWNER), "w") as fh:
                fh.write(owner_line() + "\n")
            self._saved = (tempfile.tempdir, os.environ.get("TMPDIR"))
            tempfile.tempdir = self.dir
            os.environ["TMPDIR"] = self.dir  # for the daemons and clients the suite starts
        return self.dir

    def close(self) -> None:
        if self.dir is None:
            return
        tempfile.tempdir, tmpdir = self._saved
        if tmpdir is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = tmpdir
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None


def tmp_path_in_run(config) -> None:
    """Opens the run's directory and, unless ``--basetemp`` was given, puts pytest's tmp_path base in it
    instead of pytest-of-USER/pytest-N, which pytest keeps: removed with the run, and short for the unix
    sockets that tests make in tmp_path. Call from pytest_configure before the tmp_path plugin's
    (tryfirst); xdist workers get the controller's base."""
    run_dir = RUN.open()
    if config.option.basetemp is None and not hasattr(config, "workerinput"):
        config.option.basetemp = os.path.join(run_dir, "t")


# The one directory of this process's run (the plugin opens it for conformance cases, the project's own
# tests/conftest.py for its tests).
RUN = RunScratch()
