"""Client role, property-based: a context directory changes between transfers.

A hypothesis state machine edits a real context directory (add, edit, touch,
chmod, delete, rename, file <-> directory, symlink retarget, hard links,
``.dockerignore`` with ``!`` rules).  After every step the scenario pulls the
context from the client under test into a persistent destination that is the
diff base of the next pull, as dockerd does with its cached copy.

Invariants after each pull: the received tree equals the source tree after
``.dockerignore`` filtering (owners mapped to 0/0), and the files requested are
exactly the new or changed regular files.

One client run serves one example: the steps of an example are pulls on the
same session (the sender keeps no state between calls, and one run per step
would make the fast profile too slow).
"""

from __future__ import annotations

import os
import queue
import shutil
import tempfile
import threading

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule, run_state_machine_as_test

from reference import filemode
from reference.metadata import needs_encoding
from reference.pathfilter import PathFilter
from reference.patterns import PatternMatcher, parse_dockerignore
from reference.walker import walk

from .harness.daemon_scripts import Script, ScriptDaemon, open_diffcopy
from .harness.instrumented_daemon import ScenarioResult
from .harness.recording import receive_tree
from .harness.scripted_client import make_context
from .outcomes import expect
from .trees import diff_snapshots, snapshot

requirement = pytest.mark.requirement

NAMES = ["a", "b", "c.log", "keep.log", "d1", "d2", "é"]
# non-ASCII lines make a generation n+1 daemon escape every pattern (the client must decode them)
IGNORE_LINES = ["*.log", "!keep.log", "d2", "!d2/a", "**/b", "d1/*", "# comment", "!d1/keep.log", "é/*", "!é/a"]


class SessionDriver:
    """Runs the client once in the background; each ``call(job)`` runs ``job(session)``
    inside the build's scenario and returns its result."""

    def __init__(self, client, context: str):
        self.jobs: queue.Queue = queue.Queue()
        self.replies: queue.Queue = queue.Queue()
        self.script = Script(self._scenario)
        self.daemon = ScriptDaemon(self.script, generation=client.generation).__enter__()
        self.run = None
        self.thread = threading.Thread(target=self._run_client, args=(client, context), daemon=True)
        self.thread.start()

    def _run_client(self, client, context):
        self.run = client.run(context, self.daemon.host, timeout=600)
        self.replies.put(RuntimeError(f"the client exited during the example: {self.run.output[-2000:]}"))

    def _scenario(self, build):
        while (job := self.jobs.get()) is not None:
            try:
                self.replies.put(job(build.session))
            except Exception as exc:  # reported to the step that asked
                self.replies.put(exc)
        return ScenarioResult()

    def call(self, job, timeout: float = 60.0):
        self.jobs.put(job)
        reply = self.replies.get(timeout=timeout)
        if isinstance(reply, Exception):
            raise reply
        return reply

    def close(self):
        self.jobs.put(None)
        self.thread.join(60)
        self.daemon.close()


def _unneeded_parents(expected: dict, excludes: list[str]) -> set[str]:
    """``missing: DIR`` differences both fsutil vintages allow: DIR is excluded, a later ``!`` pattern could
    re-include something below it, and nothing below it is included. fsutil 0834f99 (the docker CLI 20.10, the
    reference client) sends such a directory anyway; fsutil 91a3fc4 (buildx 0.13) sends a parent only once a child
    is included. Both leave out every excluded entry, which is what META-4 asks."""
    if not excludes:
        return set()
    matcher = PatternMatcher(excludes)
    unneeded: set[str] = set()
    for path in sorted(expected, key=lambda p: -p.count("/")):  # deepest first: nested ones count as nothing
        if filemode.is_dir(expected[path].mode) and matcher.matches(path) and \
                all(p in unneeded for p in expected if p.startswith(path + "/")):
            unneeded.add(path)
    return {f"missing: {path}" for path in unneeded}


@requirement("DIFFCOPY-LIST-1", "DIFFCOPY-ORDER-1", "DIFFCOPY-ORDER-2", "DIFFCOPY-DATA-1", "DIFFCOPY-FIN-2",
             "META-4", "META-DECODE-1", "STAT-OWNER-2", "STAT-SIZE-1", "STAT-LINK-2", "INCREMENTAL-2")
def test_context_changes_between_transfers(client, request):
    if client.generation == "n-1":
        pytest.skip("incremental transfer needs DiffCopy (generation n and later); this client is generation n-1")
    profile = settings.get_profile("conformance-" + request.config.getoption("conformance_profile"))
    thorough = request.config.getoption("conformance_profile") == "thorough"
    effort = settings(profile, max_examples=profile.max_examples if thorough else max(3, profile.max_examples // 3),
                      stateful_step_count=25 if thorough else 8, deadline=None, database=None, print_blob=True,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

    class ContextMachine(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            self.ctx = make_context({"a": "first", "d1/b": "second", "d1/keep.log": "kept"})
            self.dest = tempfile.mkdtemp(prefix="conf-prop-dest-")
            self.clock = 1_700_000_000_000_000_000
            self.driver = SessionDriver(client, self.ctx)
            self.pulls = 0

        def teardown(self):
            self.driver.close()
            shutil.rmtree(self.ctx, ignore_errors=True)
            shutil.rmtree(self.dest, ignore_errors=True)

        # -- helpers ------------------------------------------------------------------
        def _p(self, rel: str) -> str:
            return os.path.join(self.ctx, rel)

        def _tick(self) -> int:
            self.clock += 1_000_003
            return self.clock

        def _clear(self, rel: str) -> None:
            path = self._p(rel)
            if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
                os.unlink(path)
            elif os.path.isdir(path):
                shutil.rmtree(path)

        def _ensure_parent(self, rel: str) -> None:
            parts = rel.split("/")[:-1]
            for i in range(len(parts)):
                sub = "/".join(parts[: i + 1])
                if os.path.islink(self._p(sub)) or (os.path.lexists(self._p(sub)) and not os.path.isdir(self._p(sub))):
                    os.unlink(self._p(sub))
                if not os.path.isdir(self._p(sub)):
                    os.mkdir(self._p(sub))

        def _entries(self, kind: str) -> list[str]:
            out = []
            for dirpath, dirnames, filenames in os.walk(self.ctx):
                for name in dirnames + filenames:
                    rel = os.path.relpath(os.path.join(dirpath, name), self.ctx)
                    if rel == "Dockerfile":
                        continue
                    path = os.path.join(dirpath, name)
                    if kind == "file" and os.path.isfile(path) and not os.path.islink(path):
                        out.append(rel)
                    elif kind == "any":
                        out.append(rel)
            return sorted(out)

        # -- the pull and its invariants ------------------------------------------------
        def pull(self) -> None:
            ignore = self._p(".dockerignore")
            excludes = []
            if os.path.isfile(ignore) and not os.path.islink(ignore):
                with open(ignore, "rb") as fh:
                    excludes = parse_dockerignore(fh.read())
            previous = list(walk(self.dest, owner=(0, 0), with_xattrs=False))
            before = {s.path: s for s in previous}
            expected = snapshot(self.ctx, excludes=excludes, owner=(0, 0), with_mtime_of_dirs=False, with_xattrs=False)
            dest = self.dest

            def job(session):
                stream = open_diffcopy(session, "context", exclude_patterns=excludes)
                return receive_tree(stream, dest=dest, previous=previous, timeout=20)

            result = self.driver.call(job)
            self.pulls += 1
            where = f"pull {self.pulls}, excludes {excludes}"
            expect("DIFFCOPY-FIN-2", result.error is None and result.status == "complete",
                   "a complete transfer", f"{result.error or result.status} ({where})", result.transcript)
            got = snapshot(dest, owner=(0, 0), with_mtime_of_dirs=False, with_xattrs=False)
            differences = [d for d in diff_snapshots(expected, got)
                           if d not in _unneeded_parents(expected, excludes)]
            # a generation n+1 session escapes non-ASCII patterns: then a wrong tree is a decoding failure
            escaped = client.generation == "n+1" and needs_encoding(excludes)
            expect("META-DECODE-1" if escaped else "META-4", not differences,
                   "the filtered source tree, entry for entry", f"{differences[:10]} ({where})", result.transcript)
            changed = set()
            for s in walk(self.ctx, entry_filter=PathFilter([], excludes, []) if excludes else None, owner=(0, 0),
                          with_xattrs=False):
                if not filemode.is_regular(s.mode) or s.linkname:
                    continue
                old = before.get(s.path)
                if old is None or (old.mode, old.size, old.modTime, old.linkname, old.uid, old.gid) != \
                        (s.mode, s.size, s.modTime, s.linkname, s.uid, s.gid):
                    changed.add(s.path)
            expect("INCREMENTAL-2", set(result.requested) == changed and
                   len(result.requested) == len(set(result.requested)),
                   f"REQs for exactly the new or changed files {sorted(changed)}",
                   f"{sorted(result.requested)} ({where})", result.transcript)

        @initialize()
        def first_pull(self):
            self.pull()

        # -- mutations ----------------------------------------------------------------------
        @rule(parent=st.sampled_from(["", "d1/", "d2/", "é/"]), name=st.sampled_from(NAMES),
              data=st.binary(max_size=300))
        def write_file(self, parent, name, data):
            rel = parent + name
            self._ensure_parent(rel)
            if os.path.isdir(self._p(rel)) and not os.path.islink(self._p(rel)):
                shutil.rmtree(self._p(rel))
            elif os.path.islink(self._p(rel)):
                os.unlink(self._p(rel))
            with open(self._p(rel), "wb") as fh:  # an existing name keeps its inode (hard links see it)
                fh.write(data)
            t = self._tick()
            os.utime(self._p(rel), ns=(t, t))
            self.pull()

        @rule(data=st.data())
        def touch(self, data):
            files = self._entries("file")
            if files:
                t = self._tick()
                os.utime(self._p(data.draw(st.sampled_from(files))), ns=(t, t))
            self.pull()

        @rule(data=st.data(), mode=st.sampled_from([0o600, 0o644, 0o755, 0o4755]))
        def chmod(self, data, mode):
            files = self._entries("file")
            if files:
                os.chmod(self._p(data.draw(st.sampled_from(files))), mode)
            self.pull()

        @rule(data=st.data())
        def delete(self, data):
            entries = self._entries("any")
            if entries:
                self._clear(data.draw(st.sampled_from(entries)))
            self.pull()

        @rule(data=st.data(), parent=st.sampled_from(["", "d1/", "d2/"]), name=st.sampled_from(NAMES))
        def rename(self, data, parent, name):
            entries = self._entries("any")
            target = parent + name
            if entries:
                source = data.draw(st.sampled_from(entries))
                if not (target + "/").startswith(source + "/") and not (source + "/").startswith(target + "/"):
                    self._clear(target)
                    self._ensure_parent(target)
                    if os.path.lexists(self._p(source)):
                        os.rename(self._p(source), self._p(target))
            self.pull()

        @rule(data=st.data())
        def switch_type(self, data):
            entries = self._entries("any")
            if entries:
                rel = data.draw(st.sampled_from(entries))
                was_dir = os.path.isdir(self._p(rel)) and not os.path.islink(self._p(rel))
                self._clear(rel)
                if was_dir:
                    with open(self._p(rel), "wb") as fh:
                        fh.write(b"now a file")
                    t = self._tick()
                    os.utime(self._p(rel), ns=(t, t))
                else:
                    os.mkdir(self._p(rel))
                    with open(self._p(rel + "/inner"), "wb") as fh:
                        fh.write(b"inside a new directory")
            self.pull()

        @rule(name=st.sampled_from(["l1", "d1/l2"]), link_target=st.sampled_from(["a", "../d1", "/etc", "d1/b", "nope"]))
        def symlink(self, name, link_target):
            self._clear(name)
            self._ensure_parent(name)
            os.symlink(link_target, self._p(name))
            self.pull()

        @rule(data=st.data(), name=st.sampled_from(["h1", "d1/h2", "d2/h3"]))
        def hardlink(self, data, name):
            # not the link's own name, nor a file in the way of its parent directory (which _ensure_parent
            # replaces with a directory: linking that would be a hard link to a directory)
            files = [f for f in self._entries("file") if f != name and not (name + "/").startswith(f + "/")]
            if files:
                source = data.draw(st.sampled_from(files))
                if os.path.lexists(self._p(name)):
                    self._clear(name)
                self._ensure_parent(name)
                if os.path.isfile(self._p(source)) and not os.path.islink(self._p(source)):
                    os.link(self._p(source), self._p(name))
            self.pull()

        @rule(lines=st.lists(st.sampled_from(IGNORE_LINES), max_size=5))
        def dockerignore(self, lines):
            path = self._p(".dockerignore")
            self._clear(".dockerignore")
            with open(path, "w") as fh:
                fh.write("\n".join(lines) + "\n")
            t = self._tick()
            os.utime(path, ns=(t, t))
            self.pull()

    run_state_machine_as_test(ContextMachine, settings=effort)
