"""Units of the reference daemon without sockets: Dockerfile parsing and planning,
confined file operations, the context cache, the image store, negotiation."""

from __future__ import annotations

import json
import os
import tarfile
import time

import pytest

from reference.daemon import dockerfile as dfp
from reference.daemon.api import parse_duration
from reference.daemon.builder import BuildOptions, plan_build
from reference.daemon.cache import ContextCache
from reference.daemon.errors import BuildError, Redactor
from reference.daemon.filesync import negotiate
from reference.daemon.fsops import Copier, FsError, resolve_in_root, write_layer
from reference.daemon.images import ImageStore, InvalidReference, normalize_tag
from reference.daemon.sessions import Session


def options(**kw) -> BuildOptions:
    base = dict(version="2", session_id="s", remote="client-session", dockerfile_name="Dockerfile", tags=[],
                build_args={}, labels={}, output=None, target=None, build_id="b")
    base.update(kw)
    return BuildOptions(**base)


# -- Dockerfile ---------------------------------------------------------------------------


def test_plan_expands_args_env_and_workdir():
    text = (
        "# escape=`\n"
        "ARG BASE=scratch\n"
        "FROM ${BASE} AS final\n"
        "ARG DIR=/srv\n"
        "ENV A=1 B=\"two words\" `\n"
        "    C=${A}x\n"
        "ENV D four five\n"
        "WORKDIR $DIR\n"
        "WORKDIR sub\n"
        "LABEL \"k 1\"=v org.x=${B}\n"
        "COPY --chown=5:6 a b ./\n"
        "COPY [\"x y\", \"/z\"]\n"
    )
    plan = plan_build(text, options(build_args={"DIR": "/opt"}))
    # C sees the A from before this ENV line, like BuildKit
    assert plan.env == ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                        "A=1", "B=two words", "C=x", "D=four five"]
    assert plan.labels == {"k 1": "v", "org.x": "two words"}
    assert plan.workdir == "/opt/sub"
    kinds = [(s.kind, s.sources, s.dest, s.workdir, s.chown) for s in plan.steps]
    assert kinds == [
        ("WORKDIR", [], "/opt", "/", None),
        ("WORKDIR", [], "/opt/sub", "/", None),
        ("COPY", ["a", "b"], "./", "/opt/sub", (5, 6)),
        ("COPY", ["x y"], "/z", "/opt/sub", None),
    ]


@pytest.mark.parametrize("text, message", [
    ("FROM scratch\nRUN true\n", "line 2: unsupported instruction RUN"),
    ("FROM scratch\nADD x /\n", "line 2: unsupported instruction ADD"),
    ("FROM scratch\nCOPY --from=a x /\n", "unsupported instruction COPY --from"),
    ("FROM scratch\nFOO bar\n", "line 2: unknown instruction: FOO"),
    ("COPY . /\n", "COPY before the first FROM"),
    ("FROM scratch\nCOPY x\n", "COPY requires at least two arguments"),
    ("FROM scratch\nCOPY --chown=root x /\n", "use numeric uid:gid"),
])
def test_plan_rejects_what_it_cannot_build(text, message):
    with pytest.raises(dfp.DockerfileError) as info:
        plan_build(text, options())
    assert message in str(info.value)


def test_shell_words():
    lex = dfp.ShellLex()
    env = {"A": "1", "E": ""}
    assert lex.words("a 'b c' \"d $A\" e\\ f", env) == ["a", "b c", "d 1", "e f"]
    assert lex.word("${E:-dflt}/${A:+set}/${NOPE}/$", env) == "dflt/set//$"
    assert lex.word("'$A'", env) == "$A"


# -- confined file operations -------------------------------------------------------------


def test_resolve_in_root_never_leaves_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    os.symlink("/etc", root / "abs")
    os.symlink("../../..", root / "d" / "up")
    os.symlink("loop", root / "loop")
    assert resolve_in_root(str(root), "abs/passwd") == str(root / "etc" / "passwd")
    assert resolve_in_root(str(root), "d/up/x") == str(root / "x")
    assert resolve_in_root(str(root), "../../x") == str(root / "x")
    with pytest.raises(FsError):
        resolve_in_root(str(root), "loop/x")


def test_copy_through_a_symlink_in_rootfs_stays_inside(tmp_path):
    context, rootfs, outside = tmp_path / "ctx", tmp_path / "rootfs", tmp_path / "outside"
    for d in (context, rootfs, outside):
        d.mkdir()
    (context / "f").write_text("data")
    os.symlink(str(outside), rootfs / "escape")  # as if an earlier COPY brought it
    copier = Copier(str(context), str(rootfs), None)
    copier.copy(["f"], "/escape/", "/")
    assert os.listdir(outside) == []
    assert (rootfs / str(outside).lstrip("/") / "f").read_text() == "data"


def test_copy_semantics_and_layer(tmp_path):
    context, rootfs = tmp_path / "ctx", tmp_path / "rootfs"
    (context / "dir" / "sub").mkdir(parents=True)
    rootfs.mkdir()
    (context / "dir" / "sub" / "x").write_text("x")
    (context / "a.txt").write_text("a")
    (context / "b.txt").write_text("b")
    os.link(context / "a.txt", context / "hard")
    copier = Copier(str(context), str(rootfs), (3, 4))
    copier.copy(["dir"], "/dst", "/")  # a directory's contents
    copier.copy(["*.txt", "hard"], "files/", "/w")  # wildcard, relative to WORKDIR
    copier.copy(["a.txt"], "/renamed", "/")  # a file to a new name
    assert (rootfs / "dst" / "sub" / "x").read_text() == "x"
    assert sorted(os.listdir(rootfs / "w" / "files")) == ["a.txt", "b.txt", "hard"]
    assert os.stat(rootfs / "w" / "files" / "a.txt").st_ino == os.stat(rootfs / "w" / "files" / "hard").st_ino
    assert (rootfs / "renamed").read_text() == "a"
    st = os.stat(rootfs / "dst" / "sub" / "x")
    assert (st.st_uid, st.st_gid) == (3, 4)
    with pytest.raises(FsError, match="must be a directory and end with a /"):
        copier.copy(["a.txt", "b.txt"], "/nodir", "/")
    with pytest.raises(FsError, match='"/missing" not found'):
        copier.copy(["missing"], "/", "/")
    layer = tmp_path / "layer.tar"
    write_layer(str(rootfs), copier.changed, str(layer))
    with tarfile.open(layer) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert {"dst", "dst/sub", "dst/sub/x", "w", "w/files", "w/files/a.txt", "renamed"} <= set(members)
    assert members["w/files"].isdir() and members["dst/sub/x"].isfile()
    assert members["w/files/hard"].islnk() or members["w/files/a.txt"].islnk()
    again = tmp_path / "again.tar"
    write_layer(str(rootfs), list(reversed(copier.changed)), str(again))
    assert layer.read_bytes() == again.read_bytes()  # deterministic: same tree, same digest


# -- context cache ------------------------------------------------------------------------


def _fill(lease, size: int) -> None:
    lease.begin_sync()
    with open(os.path.join(lease.tree, "f"), "wb") as fh:
        fh.write(b"x" * size)
    lease.sync_complete()


def test_cache_entries_are_exclusive_and_survive_restart(tmp_path):
    cache = ContextCache(str(tmp_path / "cache"), max_size=1 << 30, max_age=3600)
    first = cache.acquire("key", "context", "context")
    second = cache.acquire("key", "context", "context")  # concurrent build: its own entry
    assert first.id != second.id
    _fill(first, 10)
    second.begin_sync()  # never completed: stays dangling
    first.release()
    second.release()
    cache.save_usage()  # as the daemon does when it stops
    again = ContextCache(str(tmp_path / "cache"), max_size=1 << 30, max_age=3600)
    records = {r["ID"]: r for r in again.records()}
    assert records[first.id]["Size"] == 10 and records[first.id]["Type"] == "source.local"
    reused = again.acquire("key", "context", "context")
    assert reused.id == first.id and os.path.exists(os.path.join(reused.tree, "f"))
    # prune without --all drops only the dangling entry; the leased one is never touched
    deleted, _ = again.prune(all=False)
    assert deleted == [second.id]
    assert again.prune(all=True) == ([], 0)
    reused.release()
    assert again.prune(all=True) == ([first.id], 10)


def test_cache_gc_by_size_and_age(tmp_path):
    cache = ContextCache(str(tmp_path / "cache"), max_size=250, max_age=3600)
    ids = []
    for n in range(3):
        lease = cache.acquire(f"key{n}", "context", "context")
        _fill(lease, 100)
        lease.release()
        ids.append(lease.id)
        time.sleep(0.01)
    deleted, reclaimed = cache.gc()
    assert deleted == [ids[0]] and reclaimed == 100  # least recently used first
    cache.max_age = 0
    held = cache.acquire("key2", "context", "context")
    deleted, _ = cache.gc()
    assert deleted == [ids[1]]  # the leased entry is kept whatever its age
    held.release()


# -- images, negotiation, misc ---------------------------------------------------------------


def test_image_store_tags_and_ids(tmp_path):
    store = ImageStore(str(tmp_path / "images"))
    config = {"architecture": "amd64", "os": "linux", "config": {}, "rootfs": {"type": "layers", "diff_ids": []}}
    image_id = store.add_image(config, build_key="k")
    assert image_id == store.add_image({**config, "created": "later"}, build_key="k")
    store.tag(image_id, "docker.io/library/foo")
    assert store.resolve("foo:latest") == image_id == store.resolve(image_id.split(":")[1][:12])
    assert store.summary(store.get("foo"))["RepoTags"] == ["foo:latest"]
    assert normalize_tag("registry:5000/a/b:v1") == "registry:5000/a/b:v1"
    with pytest.raises(InvalidReference):
        normalize_tag("Bad:Tag:x")


def test_negotiation():
    both = Session("s", "n", "k", ["/moby.filesync.v1.FileSync/DiffCopy", "/moby.filesync.v1.FileSync/TarStream"])
    tar_only = Session("s", "n", "k", ["/moby.filesync.v1.filesync/tarstream"])  # case-insensitive
    assert negotiate(both, ("diffcopy", "tarstream")) == "diffcopy"
    assert negotiate(both, ("tarstream",)) == "tarstream"
    assert negotiate(both, ("diffcopy", "tarstream"), forced="TarStream") == "tarstream"
    assert negotiate(tar_only, ("diffcopy", "tarstream")) == "tarstream"
    with pytest.raises(BuildError, match=r"daemon offers \[diffcopy\], client advertises \[tarstream\]"):
        negotiate(tar_only, ("diffcopy", "tarstream"), forced="diffcopy")


def test_redactor_and_durations():
    redact = Redactor("/var/lib/ref")
    assert redact("open /var/lib/ref/cache/x: denied; /var/lib/ref") == "open cache/x: denied; <root>"
    assert parse_duration("1h30m") == 5400 and parse_duration("10s") == 10
    assert parse_duration("soon") is None
    assert json.dumps(parse_duration("0")) is not None


def test_extract_layer_rebuilds_a_tree_and_refuses_escapes(tmp_path):
    import io

    from reference.daemon.fsops import extract_layer

    context, rootfs = tmp_path / "ctx", tmp_path / "rootfs"
    (context / "d").mkdir(parents=True)
    (context / "d" / "f").write_bytes(b"data")
    os.chmod(context / "d" / "f", 0o4755)
    os.symlink("f", context / "d" / "l")
    os.link(context / "d" / "f", context / "d" / "h")
    rootfs.mkdir()
    copier = Copier(str(context), str(rootfs), None)
    copier.copy(["d"], "/app/", "/")
    layer = tmp_path / "layer.tar"
    write_layer(str(rootfs), copier.changed, str(layer))
    rebuilt = tmp_path / "rebuilt"
    rebuilt.mkdir()
    extract_layer(str(layer), str(rebuilt))
    assert (rebuilt / "app" / "f").read_bytes() == b"data"
    assert os.stat(rebuilt / "app" / "f").st_mode & 0o7777 == 0o4755
    assert os.readlink(rebuilt / "app" / "l") == "f"
    assert os.stat(rebuilt / "app" / "h").st_ino == os.stat(rebuilt / "app" / "f").st_ino

    outside = tmp_path / "outside"
    outside.mkdir()
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        link = tarfile.TarInfo("a")
        link.type, link.linkname = tarfile.SYMTYPE, str(outside)
        tar.addfile(link)
        data = tarfile.TarInfo("a/x")
        data.size = 3
        tar.addfile(data, io.BytesIO(b"bad"))
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises(FsError):
        extract_layer(str(evil), str(target))
    assert os.listdir(outside) == []
