"""Run the embedded reference clients from a warm interpreter.

A case against an embedded client runs ``python -m reference.client build ...`` once or more; a fresh
interpreter spends about 0.25 s of its 0.35-0.5 s importing the client, h2, protobuf and grpc, which over the
hundred-odd client runs of the main job is a third of its time. The launcher keeps one process that has
imported them and forks it for each run: the child is a process of its own as before (its own environment,
working directory, stdout and stderr, exit status; a timeout kills it) and runs the same ``__main__`` as
``python -m`` does. Only commands that are exactly ``<this python> -m reference.client ...`` are launched
this way; any other command, a ``--client-under-test`` among them, is started as it is.

The server is single-threaded and has created no gRPC object when it forks (grpc is only imported), so the
child starts clean. Protocol, one connection per run: the harness sends a JSON request (argv, env, cwd) with
the child's stdout and stderr descriptors; the server answers ``{"pid": N}`` when it has forked and
``{"status": S}`` (``waitpid`` form) when the child has ended. Closing the connection kills the child.
"""

from __future__ import annotations

import json
import locale
import os
import runpy
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from reference.processes import stop_process
from reference.socketdirs import socket_dir

CLIENT_MODULE = "reference.client"
# What the client imports lazily on its way through a build, by transport and feature: imported once in the
# server instead of in every child. Only a speed hint (tests/test_warm_client.py checks that each imports).
# (Not reference.client.__main__ itself: the child runs it as __main__, as python -m does.)
PRELOAD = ("argparse", "reference.client", "reference.client.services", "reference.client.auth",
           "reference.client.sshforward", "reference.client.grpcsolve", "reference.client.progress",
           "reference.client.display", "reference.patterns", "reference.transport.h2grpc",
           "reference.transport.grpcio_pump", "grpc")
_MAX_REQUEST = 1 << 20


@dataclass
class LaunchResult:
    returncode: int  # negative: killed by that signal, as subprocess reports it
    stdout: str
    stderr: str
    timed_out: bool = False


def _decode(data: bytes) -> str:
    # as subprocess.run(text=True): the locale's encoding, universal newlines
    text = data.decode(locale.getpreferredencoding(False), "replace")
    return text.replace("\r\n", "\n").replace("\r", "\n")


class WarmClientLauncher:
    """The harness side: starts the server on first use, runs commands through it, stops it on close()."""

    def __init__(self) -> None:
        self._dir: str | None = None
        self._server: subprocess.Popen | None = None
        self._lock = threading.Lock()

    @staticmethod
    def handles(argv: list[str]) -> bool:
        return argv[:3] == [sys.executable, "-m", CLIENT_MODULE]

    def start(self) -> None:
        """Start the server without waiting for it (run() waits); a no-op while one runs."""
        with self._lock:
            self._start_locked()

    def _start_locked(self) -> str:
        """The server's socket path, with a server starting or running behind it."""
        self._dir = self._dir or socket_dir("conf-warm-")
        address = os.path.join(self._dir, "launcher.sock")
        if self._server is None or self._server.poll() is not None:
            if os.path.exists(address):
                os.unlink(address)  # a dead server's
            # its output to a file, not the terminal: a child's stdio is then buffered as over a pipe
            with open(os.path.join(self._dir, "launcher.log"), "ab") as log:
                self._server = subprocess.Popen([sys.executable, "-m", __name__, address],
                                                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                                start_new_session=True)
        return address

    def _address(self) -> str:
        with self._lock:
            address = self._start_locked()
            deadline = time.monotonic() + 30
            while not os.path.exists(address):
                if self._server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the warm client launcher did not start (exit {self._server.poll()}): "
                                       + self._log_tail())
                time.sleep(0.01)
            return address

    def _log_tail(self) -> str:
        try:
            with open(os.path.join(self._dir, "launcher.log"), errors="replace") as fh:
                return fh.read()[-2000:]
        except OSError:
            return ""

    def run(self, argv: list[str], env: dict[str, str], timeout: float) -> LaunchResult:
        out = tempfile.TemporaryFile()
        err = tempfile.TemporaryFile()
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(self._address())
            request = json.dumps({"argv": argv, "env": env, "cwd": os.getcwd()}).encode() + b"\n"
            socket.send_fds(conn, [request], [out.fileno(), err.fileno()])
            reader = conn.makefile("rb")
            pid = json.loads(reader.readline())["pid"]
            conn.settimeout(timeout)
            timed_out = False
            try:
                line = reader.readline()
            except (TimeoutError, socket.timeout):
                timed_out = True
                _kill(pid)
                conn.settimeout(None)
                reader = conn.makefile("rb")
                line = reader.readline()
            status = json.loads(line)["status"]
        finally:
            conn.close()
        out.seek(0)
        err.seek(0)
        with out, err:
            return LaunchResult(os.waitstatus_to_exitcode(status), _decode(out.read()), _decode(err.read()),
                                timed_out)

    def close(self) -> None:
        with self._lock:
            stop_process(self._server, 5)
            self._server = None
            if self._dir:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# --- the server process ---

def _child(request: dict, stdout_fd: int, stderr_fd: int) -> None:
    """In the forked child: become ``python -m reference.client ...`` and never return."""
    code = 1
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.dup2(stdout_fd, 1)
        os.dup2(stderr_fd, 2)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # the server's sockets and the request's descriptors
        os.environ.clear()
        os.environ.update(request["env"])
        tempfile.tempdir = None  # as a new process would, from this environment's TMPDIR
        os.chdir(request["cwd"])
        sys.argv = [CLIENT_MODULE, *request["argv"][3:]]
        try:
            runpy.run_module(CLIENT_MODULE, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if not isinstance(exc.code, (int, type(None))):
                print(exc.code, file=sys.stderr)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
    finally:
        os._exit(code)


def serve(address: str) -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address + ".tmp")
    listener.listen(64)
    os.rename(address + ".tmp", address)  # the harness waits for the name: it appears when the server listens
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "accept")
    running: dict[int, tuple[socket.socket, int]] = {}  # pidfd -> (connection, pid)
    watched: set[socket.socket] = set()  # the connections of running children whose closing is watched
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            for key, _ in selector.select():
                if key.data == "accept":
                    conn, _ = listener.accept()
                    with conn:
                        conn.settimeout(10)  # only the harness connects; a request comes at once
                        data, fds, _, _ = socket.recv_fds(conn, _MAX_REQUEST, 2)
                        while data and not data.endswith(b"\n") and len(data) < _MAX_REQUEST:
                            more = conn.recv(65536)  # a request may arrive in more than one piece
                            if not more:
                                break
                            data += more
                        if len(fds) != 2 or not data.endswith(b"\n"):
                            for fd in fds:
                                os.close(fd)
                            continue
                        conn.settimeout(None)
                        pid = os.fork()
                        if pid == 0:
                            selector.close()
                            _child(json.loads(data), fds[0], fds[1])
                        for fd in fds:
                            os.close(fd)
                        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
                        pidfd = os.pidfd_open(pid)
                        running[pidfd] = (conn.dup(), pid)
                        selector.register(pidfd, selectors.EVENT_READ, "child")
                        # a connection closed by the harness before the child ends: kill the child
                        selector.register(running[pidfd][0], selectors.EVENT_READ, ("peer", pidfd))
                        watched.add(running[pidfd][0])
                elif key.data == "child":
                    pidfd = key.fd
                    conn, pid = running.pop(pidfd)
                    _, status = os.waitpid(pid, 0)
                    selector.unregister(pidfd)
                    if conn in watched:
                        watched.discard(conn)
                        selector.unregister(conn)
                    os.close(pidfd)
                    try:
                        conn.sendall(json.dumps({"status": status}).encode() + b"\n")
                    except OSError:
                        pass
                    conn.close()
                else:  # the harness's end of a running child's connection became readable: it went away
                    pidfd = key.data[1]
                    conn, pid = running[pidfd]
                    watched.discard(conn)
                    selector.unregister(conn)
                    if not conn.recv(1, socket.MSG_PEEK):
                        _kill(pid)
    finally:
        for conn, pid in running.values():
            _kill(pid)
        for conn, pid in running.values():
            os.waitpid(pid, 0)


if __name__ == "__main__":
    serve(sys.argv[1])
