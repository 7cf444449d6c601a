"""The reference daemon stops on SIGTERM whichever of its threads the kernel delivers the signal to.

A process-directed signal may land on any thread (grpcio's own threads among them); Python runs the handler
only in the main thread, once that thread is woken. A main thread blocked in accept() was not: the daemon
ignored about one SIGTERM in ten with the grpcio transport. tgkill() aims the signal at a thread other than
the main one, which made that case certain."""

import ctypes
import os
import signal
import subprocess
import sys
import time

import pytest

libc = ctypes.CDLL(None, use_errno=True)


def _other_thread(pid: int) -> int:
    tids = [int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid]
    assert tids, "the daemon runs no thread besides its main one"
    return tids[0]


@pytest.mark.parametrize("transport", ["h2", "grpcio"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_delivered_to_another_thread_stops_the_daemon(tmp_path, transport, signum):
    if not hasattr(libc, "tgkill"):
        pytest.skip("this C library has no tgkill() to aim a signal at one thread")
    sock = tmp_path / "d.sock"
    proc = subprocess.Popen([sys.executable, "-m", "reference.daemon", "--host", f"unix://{sock}", "--root",
                             str(tmp_path / "root"), "--transport", transport, "--no-fsync"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
            time.sleep(0.02)
        time.sleep(0.2)  # the accept loop is waiting
        assert libc.tgkill(proc.pid, _other_thread(proc.pid), signum) == 0, os.strerror(ctypes.get_errno())
        try:
            code = proc.wait(5)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the daemon ignored {signum.name} delivered to a thread other than its main one")
        assert code == 0
        assert not sock.exists()  # it stopped as on any SIGTERM: the socket went with it
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
