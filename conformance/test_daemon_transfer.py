"""Daemon role: what it asks for (metadata, .dockerignore, incremental requests) and what it ends up with.

The suite plays a normal client (the reference sender) and records the
daemon's FileSync calls; incremental cases build twice with one shared key.
"""

from __future__ import annotations

import os
import tempfile
import shutil

import pytest

from reference.client.services import FILESYNC_DIFFCOPY
from reference.session import new_session_id
from reference.transport.base import RpcError, StatusCode

from .harness.daemon_probes import FileSyncRouter, rule_for, tree_of
from .harness.scripted_client import make_context, run_build
from .outcomes import expect
from .trees import diff_snapshots, snapshot

requirement = pytest.mark.requirement


def needs_n_plus_1(daemon) -> None:
    if daemon.generation == "n-1":
        pytest.skip("this case runs a BuildKit-style build with DiffCopy (generation n and later); the target is generation n-1")


def build_recorded(daemon, ctx, *, shared_key=None, output=None, query=None):
    router = FileSyncRouter(ctx)
    if output:
        # the build cache keys COPY by content only: a cached layer would carry another build's times
        query = {"nocache": "1", **(query or {})}
    obs = run_build(daemon.host, ctx, handler_overrides={FILESYNC_DIFFCOPY: router}, shared_key=shared_key,
                    output=("local", output) if output else None, query=query)
    return obs, router


def context_requests(router: FileSyncRouter) -> list[str]:
    """Paths the daemon requested on the main context transfer (not the Dockerfile's, not the .dockerignore
    probe's: dockerd 26.1 transfers those two without a diff base, INCREMENTAL-8)."""
    return sorted(p for c in router.calls if c.main_context for p in c.requested or [])


def export_equals_context(ctx: str, dest: str) -> list[str]:
    expected = snapshot(ctx, owner=(os.getuid(), os.getgid()), with_mtime_of_dirs=False, with_xattrs=False)
    actual = snapshot(dest, owner=(os.getuid(), os.getgid()), with_mtime_of_dirs=False, with_xattrs=False)
    return diff_snapshots(expected, actual)


# -- metadata and .dockerignore ---------------------------------------------------------------

@requirement("DOCKERIGNORE-1", "DOCKERIGNORE-3", "META-1", "META-ENCODE-1")
def test_dockerignore_is_read_first_and_parsed_into_excludes(daemon):
    needs_n_plus_1(daemon)
    meta_rule = rule_for(daemon, "filesync-metadata")
    ignore = "\ufeff*.tmp\n# a comment\n\n   *.log   \n!keep.log\n/build/\nsub/../other\n#!not-a-rule\n"
    ctx = make_context({".dockerignore": ignore, "a.txt": "a", "x.log": "x", "keep.log": "k"})
    obs, router = build_recorded(daemon, ctx)
    assert obs.ok, f"harness: the build should succeed: {obs.describe()}"
    calls = [(c.dir_name, c.metadata) for c in router.calls]
    for c in router.calls:
        expect(meta_rule, len(metadata_values_of(c, "dir-name")) == 1, "exactly one dir-name per call", c.metadata)
        expect(meta_rule, all(k == k.lower() for k, _ in c.metadata), "lower-case keys", c.metadata)
    probes = [i for i, c in enumerate(router.calls)
              if c.dir_name == "context" and metadata_values_of(c, "followpaths") == [".dockerignore"]]
    mains = [i for i, c in enumerate(router.calls)
             if c.dir_name == "context" and metadata_values_of(c, "followpaths") != [".dockerignore"]]
    expect("DOCKERIGNORE-1", probes and mains and probes[0] < mains[0],
           "a context transfer with followpaths .dockerignore before the context itself", calls)
    excludes = metadata_values_of(router.calls[mains[0]], "exclude-patterns")
    wanted = ["*.tmp", "*.log", "!keep.log", "build", "other"]
    expect("DOCKERIGNORE-3", excludes == wanted, f"exclude-patterns {wanted} (BOM, comments, blanks, spaces, "
           "leading / and lexical cleaning handled)", excludes, [str(c) for c in calls])


def metadata_values_of(call, key: str) -> list[str]:
    """The values of ``key`` as the daemon meant them (generation n+1's encoding undone)."""
    return call.values(key)


def raw_values_of(call, key: str) -> list[str]:
    return [v for k, v in call.metadata if k == key]


@requirement("META-1")
def test_non_ascii_patterns_are_sent_unchanged(daemon):
    needs_n_plus_1(daemon)
    if daemon.generation == "n+1":
        pytest.skip("generation n+1 percent-encodes non-ASCII values (META-ENCODE-1, "
                    "test_non_ascii_metadata_is_percent_encoded_per_key)")
    ctx = make_context({".dockerignore": "日本/*\né?\n", "日本/x": "x", "éa": "e", "a": "a"})
    obs, router = build_recorded(daemon, ctx)
    mains = [c for c in router.calls if c.main_context]
    excludes = raw_values_of(mains[0], "exclude-patterns") if mains else None
    expect("META-1", obs.ok and excludes == ["日本/*", "é?"], "non-ASCII patterns reach the client unchanged",
           (obs.describe(), excludes))


# what Go's url.QueryEscape makes of these: every byte but [A-Za-z0-9-_.~] as %XX, a space as '+'
ESCAPED = {"日本/*": "%E6%97%A5%E6%9C%AC%2F%2A", "x y": "x+y", "c+d": "c%2Bd", "e%41": "e%2541", "!k.log": "%21k.log"}


@requirement("META-ENCODE-1")
def test_non_ascii_metadata_is_percent_encoded_per_key(daemon):
    needs_n_plus_1(daemon)
    if daemon.generation != "n+1":
        pytest.skip("generation n sends metadata values raw (META-1, test_non_ascii_patterns_are_sent_unchanged)")
    transcript = []
    # a key with one non-ASCII value: every value of it escaped, and the marker
    mixed = ["日本/*", "x y", "c+d", "e%41", "!k.log"]
    ctx = make_context({".dockerignore": "".join(p + "\n" for p in mixed), "a": "a"})
    obs, router = build_recorded(daemon, ctx)
    mains = [c for c in router.calls if c.main_context]
    transcript += [f"{c.dir_name}: {c.metadata}" for c in router.calls]
    main = mains[0] if mains else None
    expect("META-ENCODE-1", obs.ok and main is not None, "the build succeeds", obs.describe(), transcript)
    expect("META-ENCODE-1", raw_values_of(main, "exclude-patterns") == [ESCAPED[p] for p in mixed],
           "every value of exclude-patterns escaped as Go's url.QueryEscape does (space as '+', '%' as %25)",
           raw_values_of(main, "exclude-patterns"), transcript)
    expect("META-ENCODE-1", raw_values_of(main, "exclude-patterns-encoded") == ["1"],
           "the marker exclude-patterns-encoded: 1", raw_values_of(main, "exclude-patterns-encoded"), transcript)
    expect("META-ENCODE-1", not raw_values_of(main, "dir-name-encoded") and raw_values_of(main, "dir-name") == ["context"],
           "an all-ASCII key (dir-name) raw and without a marker", main.metadata, transcript)
    # all-ASCII values go out raw, '%' and '+' included
    ascii_only = ["x y", "c+d", "e%41"]
    ctx = make_context({".dockerignore": "".join(p + "\n" for p in ascii_only), "a": "a"})
    obs, router = build_recorded(daemon, ctx)
    mains = [c for c in router.calls if c.main_context]
    transcript += [f"{c.dir_name}: {c.metadata}" for c in router.calls]
    expect("META-ENCODE-1", obs.ok and mains and raw_values_of(mains[0], "exclude-patterns") == ascii_only
           and not raw_values_of(mains[0], "exclude-patterns-encoded"),
           "all-ASCII patterns raw, without a marker", mains[0].metadata if mains else obs.describe(), transcript)
    # the MAY: a traceparent, one trace per build and a new span per call
    parents = [raw_values_of(c, "traceparent") for c in router.calls]
    if any(parents):
        import re

        well_formed = all(len(p) == 1 and re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}", p[0])
                          for p in parents)
        traces = {p[0].split("-")[1] for p in parents if p}
        spans = [p[0].split("-")[2] for p in parents if p]
        expect("META-ENCODE-1", well_formed and len(traces) == 1 and len(set(spans)) == len(spans),
               "a W3C traceparent on every FileSync call: one trace ID for the build, a new span ID per call",
               parents, transcript)


@requirement("DOCKERIGNORE-1", "META-1")
def test_no_dockerignore_means_no_exclude_patterns(daemon):
    needs_n_plus_1(daemon)
    ctx = make_context({"a.txt": "a"})
    obs, router = build_recorded(daemon, ctx)
    assert obs.ok, f"harness: the build should succeed: {obs.describe()}"
    mains = [c for c in router.calls if c.main_context]
    expect("DOCKERIGNORE-1", len(mains) == 1 and not metadata_values_of(mains[0], "exclude-patterns"),
           "one context transfer without exclude-patterns", [c.metadata for c in mains])
    ctx2 = make_context({"a.txt": "a", ".dockerignore": "# only a comment\n\n"})
    obs, router = build_recorded(daemon, ctx2)
    mains = [c for c in router.calls if c.main_context]
    expect("DOCKERIGNORE-1", obs.ok and len(mains) == 1 and not metadata_values_of(mains[0], "exclude-patterns"),
           "an ignore file without patterns gives no exclude-patterns", [c.metadata for c in mains])


@requirement("DOCKERIGNORE-2", "META-1")
@pytest.mark.parametrize("name", ["Dockerfile", "build.Dockerfile"])
def test_dockerfile_transfer_followpaths(daemon, name):
    needs_n_plus_1(daemon)
    ctx = make_context({"a.txt": "a", name: "FROM scratch\nCOPY a.txt /\n"})
    obs, router = build_recorded(daemon, ctx, query={"dockerfile": name})
    assert obs.ok, f"harness: the build should succeed: {obs.describe()}"
    calls = [c for c in router.calls if c.dir_name == "dockerfile"]
    wanted = [name, name + ".dockerignore"] + (["dockerfile"] if name == "Dockerfile" else [])
    expect("DOCKERIGNORE-2", len(calls) >= 1 and sorted(metadata_values_of(calls[0], "followpaths")) == sorted(wanted),
           f"dir-name dockerfile with followpaths {wanted}", [c.metadata for c in calls])


@requirement("DOCKERIGNORE-2")
def test_dockerfile_specific_ignore_file_wins(daemon):
    needs_n_plus_1(daemon)
    ctx = make_context({"a.txt": "a", "b.txt": "b", ".dockerignore": "b.txt\n",
                        "Dockerfile.dockerignore": "a.txt\n"})
    dest = tempfile.mkdtemp(prefix="conf-out-")
    obs, router = build_recorded(daemon, ctx, output=dest)
    mains = [c for c in router.calls if c.main_context]
    excludes = metadata_values_of(mains[0], "exclude-patterns") if mains else None
    expect("DOCKERIGNORE-2", obs.ok and excludes == ["a.txt"],
           "the context is sent with the patterns of Dockerfile.dockerignore", (obs.describe(), excludes))


@requirement("META-2", "ERROR-2")
def test_not_found_from_client_names_the_directory(daemon):
    needs_n_plus_1(daemon)
    ctx = make_context({"a.txt": "a"})

    def refuse(stream):
        raise RpcError(StatusCode.NOT_FOUND, "nope")

    router = FileSyncRouter(ctx, refuse)
    obs = run_build(daemon.host, ctx, handler_overrides={FILESYNC_DIFFCOPY: router})
    expect("META-2", not obs.ok and "context" in (obs.error or ""),
           "the build fails with an error naming the directory `context`", obs.describe())


# -- incremental --------------------------------------------------------------------------------

def _write(root, rel, data: bytes, mtime_ns: int | None = None):
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


def _base_context() -> str:
    ctx = make_context({})
    t = 1_600_000_000_000_000_000
    for i, rel in enumerate(["a.txt", "b.txt", "sub/c.txt", "sub/deep/d.txt", "empty"]):
        _write(ctx, rel, b"" if rel == "empty" else f"content of {rel}\n".encode(), t + i)
    os.link(os.path.join(ctx, "a.txt"), os.path.join(ctx, "hard-a"))
    os.symlink("sub/c.txt", os.path.join(ctx, "link"))
    os.utime(os.path.join(ctx, "Dockerfile"), ns=(t, t))
    return ctx


CHANGES = {
    "unchanged": (lambda ctx: None, []),
    "edited-same-size": (lambda ctx: _write(ctx, "b.txt", b"CONTENT OF b.txt\n", 1_700_000_000_000_000_000),
                         ["b.txt"]),
    "edited-other-size": (lambda ctx: _write(ctx, "sub/c.txt", b"longer content now\n"), ["sub/c.txt"]),
    "touched": (lambda ctx: os.utime(os.path.join(ctx, "sub/deep/d.txt"), ns=(1, 1_700_000_000_000_000_001)),
                ["sub/deep/d.txt"]),
    "added": (lambda ctx: _write(ctx, "sub/new.txt", b"new"), ["sub/new.txt"]),
    "added-empty": (lambda ctx: _write(ctx, "new-empty", b""), ["new-empty"]),
    "deleted": (lambda ctx: os.unlink(os.path.join(ctx, "b.txt")), []),
    "chmod-hardlinked": (lambda ctx: os.chmod(os.path.join(ctx, "a.txt"), 0o600), ["a.txt"]),
    "file-to-dir": (lambda ctx: (os.unlink(os.path.join(ctx, "b.txt")), _write(ctx, "b.txt/inner", b"i")),
                    ["b.txt/inner"]),
    "dir-to-file": (lambda ctx: (shutil.rmtree(os.path.join(ctx, "sub")), _write(ctx, "sub", b"now a file")),
                    ["sub"]),
    "file-to-symlink": (lambda ctx: (os.unlink(os.path.join(ctx, "b.txt")), os.symlink("a.txt", os.path.join(ctx, "b.txt"))),
                        []),
    "symlink-to-dir": (lambda ctx: (os.unlink(os.path.join(ctx, "link")), _write(ctx, "link/x", b"x")),
                       ["link/x"]),
}


SLOW_CHANGES = {"edited-other-size", "added-empty", "dir-to-file", "file-to-symlink", "symlink-to-dir"}


@requirement("INCREMENTAL-2", "INCREMENTAL-3", "INCREMENTAL-4", "INCREMENTAL-5", "DIFFCOPY-REQ-2")
@pytest.mark.parametrize("change", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CHANGES else c
                                    for c in CHANGES])
def test_second_build_requests_only_what_changed(daemon, change):
    needs_n_plus_1(daemon)
    ctx = _base_context()
    key = "conf-incr-" + new_session_id()
    first, _ = build_recorded(daemon, ctx, shared_key=key)
    assert first.ok, f"harness: the first build should succeed: {first.describe()}"
    mutate, wanted = CHANGES[change]
    mutate(ctx)
    dest = tempfile.mkdtemp(prefix="conf-out-")
    second, router = build_recorded(daemon, ctx, shared_key=key, output=dest)
    expect("INCREMENTAL-2", second.ok, "the second build succeeds", second.describe())
    requested = context_requests(router)
    expect("INCREMENTAL-2", requested == sorted(wanted), f"the daemon requests exactly {wanted}", requested)
    expect("DIFFCOPY-REQ-2", "hard-a" not in requested, "hardlinks never requested", requested)
    diff = export_equals_context(ctx, dest)
    req = {"deleted": "INCREMENTAL-3", "file-to-dir": "INCREMENTAL-4", "dir-to-file": "INCREMENTAL-4",
           "file-to-symlink": "INCREMENTAL-4", "symlink-to-dir": "INCREMENTAL-4"}.get(change, "INCREMENTAL-5")
    expect(req, not diff, "the build's copy is exactly the current context", diff)


@requirement("INCREMENTAL-1")
def test_content_is_not_compared_only_size_and_mtime(daemon):
    needs_n_plus_1(daemon)
    ctx = _base_context()
    key = "conf-incr-" + new_session_id()
    first, _ = build_recorded(daemon, ctx, shared_key=key)
    assert first.ok, f"harness: the first build should succeed: {first.describe()}"
    before = os.lstat(os.path.join(ctx, "b.txt"))
    _write(ctx, "b.txt", b"CONTENT OF B.TXT\n", before.st_mtime_ns)  # same size, same mtime
    dest = tempfile.mkdtemp(prefix="conf-out-")
    second, router = build_recorded(daemon, ctx, shared_key=key, output=dest)
    requested = context_requests(router)
    expect("INCREMENTAL-1", second.ok and requested == [],
           "an entry with equal size, mtime, mode, owner and link is unchanged: not requested",
           (second.describe(), requested))
    expect("INCREMENTAL-1", tree_of(dest).get("b.txt", (None,))[-1] == b"content of b.txt\n",
           "the daemon keeps its earlier copy of that file", tree_of(dest).get("b.txt"))


@requirement("INCREMENTAL-2", "INCREMENTAL-8")
def test_dockerfile_and_dockerignore_transfers_on_an_unchanged_rebuild(daemon):
    """The two small transfers before the context: dockerd 20.10 diffs them like the context (nothing
    requested the second time), dockerd 26.1 transfers them without a diff base (every file again)."""
    needs_n_plus_1(daemon)
    ctx = _base_context()
    # (no Dockerfile.dockerignore: with one, dockerd 26.1 skips the context's .dockerignore transfer)
    _write(ctx, ".dockerignore", b"*.tmp\n", 1_600_000_000_000_000_000)
    key = "conf-incr-" + new_session_id()
    first, _ = build_recorded(daemon, ctx, shared_key=key)
    assert first.ok, f"harness: the first build should succeed: {first.describe()}"
    second, router = build_recorded(daemon, ctx, shared_key=key)
    assert second.ok, f"harness: the second build should succeed: {second.describe()}"
    calls = {("dockerfile" if c.dir_name == "dockerfile" else "probe" if not c.main_context else "context"):
             sorted(c.requested or []) for c in router.calls}
    transcript = [f"{c.dir_name} {c.values('followpaths')}: requested {c.requested}" for c in router.calls]
    expect("INCREMENTAL-2", calls.get("context") == [], "the main context transfer requests nothing",
           calls, transcript)
    listed = {"dockerfile": ["Dockerfile"], "probe": [".dockerignore"]}
    for name, files in listed.items():
        got = calls.get(name)
        if daemon.generation == "n+1":
            expect("INCREMENTAL-8", got in ([], files),
                   f"the {name} transfer requests nothing (a diff base) or every listed file {files} (none)",
                   got, transcript)
        else:
            expect("INCREMENTAL-2", got == [], f"the {name} transfer requests nothing", got, transcript)


@requirement("INCREMENTAL-7", "INCREMENTAL-3")
def test_base_from_another_context_does_not_leak(daemon):
    needs_n_plus_1(daemon)
    key = "conf-incr-" + new_session_id()
    ctx_a = make_context({"only-in-a.txt": "a", "shared.txt": "from a", "dir/x": "x"})
    first, _ = build_recorded(daemon, ctx_a, shared_key=key)
    assert first.ok, f"harness: the first build should succeed: {first.describe()}"
    ctx_b = make_context({"shared.txt": "from b!", "other/y": "y"})
    dest = tempfile.mkdtemp(prefix="conf-out-")
    second, _ = build_recorded(daemon, ctx_b, shared_key=key, output=dest)
    diff = export_equals_context(ctx_b, dest)
    expect("INCREMENTAL-7", second.ok and not diff, "the result is exactly context B", diff or second.describe())
