"""One temporary directory per suite run: whatever the suite, its daemons and its clients put in temporary
files goes there, and it is removed when the run ends, also after a failure or Ctrl-C.

Set up only when the run collects conformance cases, so the plugin changes nothing for other projects. A run
that was killed (no chance to clean up) leaves its directory; the next run removes those of dead owners.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile

from .owners import owner_alive, owner_line

_PREFIX = "conf-run-"
_OWNER = "owner"


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

    def __init__(self) -> None:
        self.base = tempfile.gettempdir()
        self.dir: str | None = None
        self._saved: tuple[str | None, str | None] = (None, None)

    def open(self) -> str:
        if self.dir is None:
            reap_orphans(self.base)
            # Short, under the usual temporary directory: unix socket paths of daemons live below it.
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


# The one directory of this process's run (the plugin opens it for conformance cases, the project's own
# tests/conftest.py for its tests).
RUN = RunScratch()
