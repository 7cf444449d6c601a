"""conformance.scratch: the per-run temporary directory and the reaping of killed runs' directories."""

import os
import subprocess
import sys
import tempfile

from conformance import scratch
from conformance.owners import owner_line


def test_open_redirects_tempfile_and_tmpdir_and_close_removes_everything(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("TMPDIR", raising=False)
    run = scratch.RunScratch()
    directory = run.open()
    assert os.path.dirname(directory) == str(tmp_path)
    made = tempfile.mkdtemp(prefix="conf-ctx-")
    assert made.startswith(directory + os.sep) and os.environ["TMPDIR"] == directory
    child = subprocess.run([sys.executable, "-c", "import tempfile; print(tempfile.gettempdir())"],
                           capture_output=True, text=True, check=True)
    assert child.stdout.strip() == directory, "processes the suite starts inherit it"
    run.close()
    assert not os.path.exists(directory) and tempfile.tempdir == str(tmp_path) and "TMPDIR" not in os.environ


def test_directories_of_dead_owners_are_reaped_and_live_ones_kept(tmp_path):
    dead = tmp_path / "conf-run-dead"
    dead.mkdir()
    (dead / "owner").write_text("999999999 1\n")
    alive = tmp_path / "conf-run-alive"
    alive.mkdir()
    (alive / "owner").write_text(owner_line() + "\n")
    assert scratch.reap_orphans(str(tmp_path)) == [str(dead)]
    assert alive.exists() and not dead.exists()
