"""conformance.scratch: the per-run temporary directory and the reaping of killed runs' directories."""

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from conformance import scratch
from conformance.owners import owner_line
from reference.socketdirs import SOCKET_BASE_MAX, socket_dir


def test_open_redirects_tempfile_and_tmpdir_and_close_removes_everything(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("TMPDIR", raising=False)
    run = scratch.RunScratch(str(tmp_path))
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


def _fake_mounts(tmp_path, fstype, options="rw,nosuid,nodev", *, over=""):
    mounts = tmp_path / "mounts"
    mounts.write_text(f"tmpfs {tmp_path / 'shm'} {fstype} {options} 0 0\n/dev/vda / ext4 rw 0 0\n{over}")
    return str(mounts)


def test_tmpfs_is_told_from_other_filesystems_by_the_mount_table(tmp_path):
    shm = str(tmp_path / "shm")
    assert scratch._is_tmpfs(shm, _fake_mounts(tmp_path, "tmpfs"))
    assert not scratch._is_tmpfs(shm, _fake_mounts(tmp_path, "ext4"))
    assert not scratch._is_tmpfs(shm, _fake_mounts(tmp_path, "tmpfs", "rw,nosuid,nodev,noexec")), "scripts run there"
    assert not scratch._is_tmpfs(shm, _fake_mounts(tmp_path, "tmpfs", over=f"/dev/vdb {shm} ext4 rw 0 0\n")), \
        "a later mount on the same point hides the tmpfs"
    assert not scratch._is_tmpfs("/", _fake_mounts(tmp_path, "tmpfs")), "the root here is ext4"
    assert not scratch._is_tmpfs(shm, str(tmp_path / "no-such-mount-table"))


def test_the_run_goes_to_a_roomy_tmpfs_unless_tmpdir_says_otherwise(tmp_path, monkeypatch):
    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.delenv("TMPDIR", raising=False)
    monkeypatch.setattr(scratch, "_is_tmpfs", lambda path: path == str(shm))
    monkeypatch.setattr(scratch, "_free_bytes", lambda path: 4 << 30)
    assert scratch.default_base(str(shm)) == str(shm)
    monkeypatch.setattr(scratch, "_free_bytes", lambda path: 64 << 20)  # a container's default /dev/shm
    assert scratch.default_base(str(shm)) == tempfile.gettempdir(), "too small: the usual directory"
    monkeypatch.setattr(scratch, "_free_bytes", lambda path: 4 << 30)
    with monkeypatch.context() as not_writable:  # by access(2), not by mode bits, which root passes anyway
        not_writable.setattr(scratch.os, "access", lambda path, mode: path != str(shm))
        assert scratch.default_base(str(shm)) == tempfile.gettempdir(), "not writable: the usual directory"
    assert scratch.default_base(str(tmp_path / "absent")) == tempfile.gettempdir()
    chosen = tmp_path / "chosen"
    chosen.mkdir()
    monkeypatch.setenv("TMPDIR", str(chosen))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() caches what it found
    assert scratch.default_base(str(shm)) == str(chosen), "an explicit $TMPDIR wins"


def test_orphans_are_reaped_in_the_usual_directory_too_when_the_run_goes_elsewhere(tmp_path, monkeypatch):
    usual, shm = tmp_path / "usual", tmp_path / "shm"
    usual.mkdir()
    shm.mkdir()
    dead = usual / "conf-run-dead"
    dead.mkdir()
    (dead / "owner").write_text("999999999 1\n")
    monkeypatch.setattr(tempfile, "tempdir", str(usual))
    monkeypatch.delenv("TMPDIR", raising=False)
    run = scratch.RunScratch(str(shm))
    try:
        assert os.path.dirname(run.open()) == str(shm)
        assert not dead.exists()
    finally:
        run.close()


def test_socket_directories_go_in_a_short_temporary_directory_and_under_tmp_otherwise(tmp_path, monkeypatch):
    short = tempfile.mkdtemp(prefix="s-", dir="/tmp")
    assert len(short) <= SOCKET_BASE_MAX
    try:
        monkeypatch.setattr(tempfile, "tempdir", short)
        made = socket_dir("conf-t-")
        assert os.path.dirname(made) == short
    finally:
        shutil.rmtree(short)
    deep = tmp_path / ("d" * 80)
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    made = socket_dir("conf-t-")
    try:
        assert os.path.dirname(made) == "/tmp" and len(os.path.join(made, "d.sock")) < 108
    finally:
        os.rmdir(made)


@pytest.mark.parametrize("how", ["path-serial", "path-xdist", "pyargs-xdist"])
def test_a_suite_run_leaves_nothing_in_the_temporary_directory(tmp_path, how):
    """Also with xdist, whose controller runs no case but makes pytest's base of tmp_path for its workers
    (it was left in pytest-of-USER)."""
    import conformance

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    package = os.path.dirname(conformance.__file__)
    target = (["--pyargs", "conformance.test_client_exports"] if how.startswith("pyargs")
              else [os.path.join(package, "test_client_exports.py")])
    workers = ["-n", "2"] if how.endswith("xdist") else []
    run = subprocess.run([sys.executable, "-m", "pytest", *target, "-k", "merge_mode", *workers, "-q",
                          "-p", "no:cacheprovider"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TMPDIR": str(tmp)})
    assert run.returncode == 0 and "2 passed" in run.stdout, run.stdout[:3000] + run.stderr[-2000:]
    assert sorted(p.name for p in tmp.iterdir()) == []
