"""``python -m reference.client build --progress plain`` prints what the docker CLI 20.10 prints for the same
build on the same dockerd 20.10, once times, digests, ids and byte counts are normalised."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from reference.client import progress as ev
from reference.client.display import PlainPrinter, StepTable, format_bytes, log_prefix

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def normalised_blocks(text: str) -> list[str]:
    """The step blocks of a plain progress text, step numbers and variable values replaced, sorted by their
    first line (the daemon may number concurrent steps in either order)."""
    text = re.sub(r"sha256:[0-9a-f]{64}", "sha256:<digest>", text)
    # How often a row shows before its last state depends on where the printer's 100 ms slots fall, in both
    # programs: only a row's last line is compared.
    text = re.sub(r"^(#\d+ transferring \w+:).*\n(?=\1)", "", text, flags=re.M)
    text = re.sub(r"(transferring \w+:) \S+", r"\1 <bytes>", text)
    text = re.sub(r"( \d+\.\d+s)? done$", " done", text, flags=re.M)  # a row's time shows only above 10 ms
    text = re.sub(r" DONE \d+\.\d+s$", " DONE <t>", text, flags=re.M)
    text = re.sub(r"^#\d+ \d+\.\d+ ", "# <t> ", text, flags=re.M)
    text = re.sub(r"^#\d+ ", "# ", text, flags=re.M)
    return sorted(block.strip("\n") for block in text.split("\n\n") if block.strip())


def run_both(dockerd, context: str, *args: str) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    env = {**dockerd.env("docker-cli-20.10"), "DOCKER_BUILDKIT": "1"}
    # Warm the daemon's cache first, so that both recorded builds find the same steps cached.
    dockerd.cli("build", "--progress", "plain", *args, context, env=env)
    theirs = dockerd.cli("build", "--progress", "plain", *args, context, env=env)
    ours = subprocess.run([sys.executable, "-m", "reference.client", "build", "--progress", "plain", "--generation",
                           "n", *args, context], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "DOCKER_HOST": dockerd.host, "PYTHONPATH": ROOT})
    return theirs, ours


def test_plain_progress_of_a_copy_build_matches_the_docker_cli(dockerd, tmp_path):
    (tmp_path / "a.txt").write_text("hello\n" * 100)
    (tmp_path / "Dockerfile").write_text("FROM scratch\nCOPY . /\n")
    theirs, ours = run_both(dockerd, str(tmp_path), "-t", "progress-copy:1")
    assert theirs.returncode == 0 and ours.returncode == 0, theirs.stderr + ours.stderr
    assert normalised_blocks(ours.stderr) == normalised_blocks(theirs.stderr)
    assert "writing image sha256:" in ours.stderr and "naming to docker.io/library/progress-copy:1" in ours.stderr


def test_plain_progress_of_a_failing_step_matches_the_docker_cli(dockerd, shell_image, tmp_path):
    (tmp_path / "Dockerfile").write_text(
        f"FROM {shell_image}\nRUN echo hello && sleep 0.2 && echo world >&2 && sleep 0.2 && echo three && exit 3\n")
    theirs, ours = run_both(dockerd, str(tmp_path), "--network=none")
    assert theirs.returncode == 1 and ours.returncode == 1, theirs.stderr + ours.stderr
    assert normalised_blocks(ours.stderr) == normalised_blocks(theirs.stderr)
    assert re.search(r"^#\d+ 0\.\d{3} hello$", ours.stderr, re.M), ours.stderr
    assert ours.stderr.rstrip().endswith("exit code: 3") and "------\n > [2/2] RUN" in ours.stderr


def test_plain_printer_formats_rows_logs_and_leaving_a_running_step():
    table, printer = StepTable(), PlainPrinter(StepTable())
    printer.table = table
    for event in (ev.StepStarted("sha256:a", "[1/2] RUN a", 10.0), ev.LogLine("sha256:a", 1, b"one\ntw", 10.5),
                  ev.StepStarted("sha256:b", "[internal] load build context", 11.0)):
        table.apply(event)
    first = printer.flush()
    assert first == "#1 [1/2] RUN a\n#1 sha256:a\n#1 0.500 one\n#1 0.500 tw"
    table.apply(ev.StatusRow("sha256:b", "transferring context:", "", 1234, 0, 11.5, 11.0, 11.5))
    table.apply(ev.StepDone("sha256:b", "[internal] load build context", 11.0, 11.5))
    assert printer.flush() == ("\n#1 ...\n\n#2 [internal] load build context\n#2 sha256:b\n"
                               "#2 transferring context: 1.23kB 0.5s done\n#2 DONE 0.5s\n"
                               # the running step is shown again, its unfinished line from its start
                               "\n#1 [1/2] RUN a\n#1 sha256:a\n#1 0.500 tw")
    assert format_bytes(999) == "999B" and format_bytes(4_560_000) == "4.56MB"
    assert log_prefix(1.23456) == "1.235" and log_prefix(12.345) == "12.35" and log_prefix(123.45) == "123.5"


def test_every_build_option_has_help_text():
    from reference.client.__main__ import build_parser

    parser = build_parser()
    build_command = parser._subparsers._group_actions[0].choices["build"]
    for action in build_command._actions:
        assert action.help and action.help.strip(), action.option_strings or action.dest
    options = {opt for action in build_command._actions for opt in action.option_strings}
    assert {"-t", "-f", "-o", "-q", "--secret", "--ssh", "--build-arg", "--progress"} <= options


def test_quiet_prints_only_the_image_id_as_docker_build_q(dockerd, tmp_path):
    (tmp_path / "Dockerfile").write_text("FROM scratch\nCOPY . /\n")
    env = {**dockerd.env("docker-cli-20.10"), "DOCKER_BUILDKIT": "1"}
    theirs = dockerd.cli("build", "-q", "-t", "progress-quiet:1", str(tmp_path), env=env)
    ours = subprocess.run([sys.executable, "-m", "reference.client", "build", "-q", "-t", "progress-quiet:1",
                           str(tmp_path)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "DOCKER_HOST": dockerd.host, "PYTHONPATH": ROOT})
    assert theirs.returncode == 0 and ours.returncode == 0, theirs.stderr + ours.stderr
    assert re.fullmatch(r"sha256:[0-9a-f]{64}\n", theirs.stdout), theirs.stdout
    assert ours.stdout == theirs.stdout and ours.stderr == theirs.stderr == ""


def run_in_pty(argv: list[str], env: dict, columns: int = 120, rows: int = 40) -> tuple[int, bytes]:
    """Run ``argv`` with a terminal of ``columns`` x ``rows`` as its stdin/stdout/stderr: (status, output)."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env={**env, "TERM": "xterm"})
    os.close(slave)
    output = b""
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                output += data
            elif proc.poll() is not None:
                break
        return proc.wait(timeout=120), output
    finally:
        os.close(master)


def final_screen(output: bytes, columns: int = 120, rows: int = 40) -> list[str]:
    pyte = pytest.importorskip("pyte", reason="pyte (a dev dependency) models the terminal")
    screen = pyte.Screen(columns, rows)
    pyte.ByteStream(screen).feed(output)
    lines = [line.rstrip() for line in screen.display if line.strip()]
    lines = [re.sub(r"\d+\.\d+s", "<t>", line) for line in lines]
    lines = [re.sub(r"^#\d+ \d+\.\d+ ", "# <t> ", line) for line in lines]
    lines = [re.sub(r"(transferring \w+:) \S+", r"\1 <bytes>", line) for line in lines]
    return [re.sub(r" {2,}", "  ", line) for line in lines]  # the padding to the timer column varies with sizes


def test_tty_progress_ends_on_the_screen_the_docker_cli_leaves(dockerd, shell_image, tmp_path):
    (tmp_path / "Dockerfile").write_text(
        f"FROM {shell_image}\nRUN echo hello && sleep 1 && echo world && sleep 0.5 && exit 3\n")
    env = {**dockerd.env("docker-cli-20.10"), "DOCKER_BUILDKIT": "1"}
    from conformance import peers

    cli = [peers.binary("docker-cli-20.10"), "build", "--network=none", str(tmp_path)]
    run_in_pty(cli, env)  # warm the cache: both recorded builds find the same steps cached
    their_status, theirs = run_in_pty(cli, env)
    our_status, ours = run_in_pty([sys.executable, "-m", "reference.client", "build", "--network=none",
                                   str(tmp_path)], {**os.environ, "DOCKER_HOST": dockerd.host, "PYTHONPATH": ROOT})
    assert their_status == our_status == 1
    their_screen, our_screen = final_screen(theirs), final_screen(ours)
    assert our_screen == their_screen
    assert their_screen[0] == "[+] Building <t> (5/5) FINISHED", their_screen
    assert "# <t> world" in their_screen and len(our_screen) > 8, their_screen
    # Redrawn in place: far less than a copy of the screen per 150 ms tick, and no more than the CLI writes.
    screen_bytes = sum(len(line) for line in their_screen)
    assert screen_bytes < len(ours) <= len(theirs), (len(ours), len(theirs))
