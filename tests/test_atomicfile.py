"""reference/daemon/atomicfile.py: whole-file replacement, durable unless the daemon runs with --no-fsync."""

import os

import pytest

from reference.daemon.atomicfile import AtomicFiles


@pytest.fixture
def syncs(monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    return calls


def test_a_durable_write_syncs_the_file_and_its_directory(tmp_path, syncs):
    AtomicFiles().write(str(tmp_path / "f"), b"new")
    assert (tmp_path / "f").read_bytes() == b"new"
    assert len(syncs) == 2
    assert os.listdir(tmp_path) == ["f"]  # no temporary file left beside it


@pytest.mark.parametrize("files, per_write", [(AtomicFiles(durable=False), None), (AtomicFiles(), False)])
def test_no_fsync_and_a_write_marked_not_durable_sync_nothing(tmp_path, syncs, files, per_write):
    (tmp_path / "f").write_bytes(b"old")
    files.write(str(tmp_path / "f"), b"new", durable=per_write)
    files.write(str(tmp_path / "f"), b"newer", durable=per_write)
    if per_write is None:
        files.sync_directory(str(tmp_path))
    assert (tmp_path / "f").read_bytes() == b"newer" and syncs == []


def test_the_daemon_option_reaches_the_cache_and_the_image_store(tmp_path):
    from reference.daemon.config import DaemonConfig
    from reference.daemon.service import Daemon

    daemon = Daemon(DaemonConfig(root=str(tmp_path / "root"), fsync=False), f"unix://{tmp_path}/d.sock")
    try:
        assert daemon.cache.files.durable is False and daemon.images._files.durable is False
    finally:
        daemon.close()
