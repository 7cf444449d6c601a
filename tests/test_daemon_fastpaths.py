"""The reference daemon's fast paths keep their results: the layer writer is
byte-identical to tarfile, COPY may hardlink from the synced context without
a later sync reaching the rootfs, the kept listing gives the same keys as a
fresh walk, and an unchanged rebuild (or a prune) behaves as before."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import stat as _st
import tarfile

import pytest

from reference import diffcopy as dc
from reference.applier import TreeApplier
from reference.daemon.cache import ContextCache
from reference.daemon.fsops import Copier, SourceLinks, source_digest, tar_header, write_layer
from reference.daemon.images import ImageStore
from reference.daemon.listing import TreeListing
from reference.paths import path_sort_key
from reference.walker import walk

from test_daemon import RefDaemon, make_context, needs_cli, run_docker


# -- tar headers and layers ------------------------------------------------------------------

_HEADER_CASES = [
    # (name, type, mode, uid, gid, size, mtime, linkname, uname)
    ("a", tarfile.REGTYPE, 0o644, 0, 0, 0, 0, "", ""),
    ("dir", tarfile.DIRTYPE, 0o755, 1000, 1000, 0, 1_700_000_000, "", ""),  # gets its "/"
    ("x" * 100, tarfile.REGTYPE, 0o4755, 0o7777777, 0o7777777, 8**11 - 1, 8**11 - 1, "", ""),
    ("x" * 101, tarfile.REGTYPE, 0o644, 0, 0, 1, 1, "", ""),  # long name: pax record
    ("caf\u00e9", tarfile.REGTYPE, 0o644, 0, 0, 1, 1, "", ""),  # non-ASCII: pax record
    ("big-uid", tarfile.REGTYPE, 0o644, 0o10000000, 0, 1, 1, "", ""),
    ("huge", tarfile.REGTYPE, 0o644, 0, 0, 8**11, 1, "", ""),
    ("late", tarfile.REGTYPE, 0o644, 0, 0, 0, 8**11, "", ""),
    ("l", tarfile.SYMTYPE, 0o777, 0, 0, 0, 5, "t" * 100, ""),
    ("l2", tarfile.SYMTYPE, 0o777, 0, 0, 0, 5, "/" + "t" * 100, ""),
    ("h", tarfile.LNKTYPE, 0o644, 0, 0, 0, 5, "a", ""),
    ("p", tarfile.FIFOTYPE, 0o600, 0, 0, 0, 5, "", ""),
    ("c", tarfile.CHRTYPE, 0o600, 0, 0, 0, 5, "", ""),
    ("named", tarfile.REGTYPE, 0o644, 0, 0, 3, 5, "", "root"),
    ("bad\udcff", tarfile.REGTYPE, 0o644, 0, 0, 3, 5, "", ""),
]


def _info(name, kind, mode, uid, gid, size, mtime, linkname, uname) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid, info.size, info.mtime = kind, mode, uid, gid, size, mtime
    info.linkname, info.uname, info.gname = linkname, uname, ""
    if kind == tarfile.CHRTYPE:
        info.devmajor, info.devminor = 1, 3
    return info


@pytest.mark.parametrize("case", _HEADER_CASES, ids=lambda c: repr(c[0])[:20])
def test_tar_header_is_tarfiles_pax_header(case):
    info = _info(*case)
    assert tar_header(info) == info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def test_tar_header_random_entries_match_tarfile():
    rng = random.Random(20101)
    names = ["a", "d/e", "n" * 99, "n" * 100, "n" * 101, "\u00fc", "sp ace", ""]
    for i in range(3000):
        case = (rng.choice(names) + str(i),
                rng.choice([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE]),
                rng.choice([0o644, 0o755, 0o7777, 0o1777]), rng.choice([0, 65534, 0o7777777, 0o10000000]),
                rng.choice([0, 7, 0o10000000]), rng.choice([0, 511, 512, 1 << 20]),
                rng.choice([0, 1_700_000_000, 8**11 - 1, 8**11]), rng.choice(["", "target", "t" * 101]), "")
        info = _info(*case)
        assert tar_header(info) == info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"), case


def _tarfile_layer(rootfs: str, changed: list[str]) -> bytes:
    """The layer as tarfile writes it: our own statement of the format write_layer must keep."""
    paths = set()
    for rel in changed:
        while rel:
            paths.add(rel)
            rel = os.path.dirname(rel)
    buf = io.BytesIO()
    first_name: dict[tuple[int, int], str] = {}
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel in sorted(paths, key=path_sort_key):
            host = os.path.join(rootfs, rel)
            st = os.lstat(host)
            info = tarfile.TarInfo(rel + ("/" if _st.S_ISDIR(st.st_mode) else ""))
            info.mode, info.uid, info.gid = _st.S_IMODE(st.st_mode), st.st_uid, st.st_gid
            info.uname = info.gname = ""
            info.mtime = st.st_mtime_ns // 1_000_000_000
            key = (st.st_dev, st.st_ino)
            if _st.S_ISDIR(st.st_mode):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif _st.S_ISLNK(st.st_mode):
                info.type, info.linkname = tarfile.SYMTYPE, os.readlink(host)
                tar.addfile(info)
            elif key in first_name:
                info.type, info.linkname = tarfile.LNKTYPE, first_name[key]
                tar.addfile(info)
            elif _st.S_ISREG(st.st_mode):
                first_name[key] = rel
                info.size = st.st_size
                with open(host, "rb") as fh:
                    tar.addfile(info, fh)
            elif _st.S_ISFIFO(st.st_mode):
                info.type = tarfile.FIFOTYPE
                tar.addfile(info)
    return buf.getvalue()


def _odd_context(root) -> str:
    root = str(root)
    os.makedirs(os.path.join(root, "d", "e"))
    sizes = {"empty": 0, "one": 1, "block": 512, "block-1": 511, "chunk": 1 << 20, "chunk+1": (1 << 20) + 1,
             "three-chunks": 3 * (1 << 20) + 7}
    rng = random.Random(7)
    for name, size in sizes.items():
        with open(os.path.join(root, name), "wb") as fh:
            fh.write(rng.randbytes(size))
    with open(os.path.join(root, "d", "n" * 120), "wb") as fh:  # pax path record
        fh.write(b"long")
    with open(os.path.join(root, "d", "caf\u00e9"), "wb") as fh:
        fh.write(b"utf-8")
    os.chmod(os.path.join(root, "one"), 0o4755)
    os.link(os.path.join(root, "block"), os.path.join(root, "d", "hard"))
    os.symlink("../one", os.path.join(root, "d", "sym"))
    os.mkfifo(os.path.join(root, "d", "e", "fifo"))
    os.utime(os.path.join(root, "d", "e"), ns=(0, 1_600_000_000_123_456_789))
    return root


@pytest.mark.parametrize("linked", [False, True], ids=["copied", "hardlinked"])
def test_write_layer_is_tarfile_byte_for_byte(tmp_path, linked):
    context = _odd_context(tmp_path / "ctx")
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    links = SourceLinks(TreeListing.of(context).multi_named()) if linked else None
    copier = Copier(context, str(rootfs), None, links)
    copier.copy(["."], "/app/", "/")
    out = tmp_path / "layer.tar"
    diff_id, size = write_layer(str(rootfs), copier.changed, str(out))
    expected = _tarfile_layer(str(rootfs), copier.changed)
    assert out.read_bytes() == expected
    assert (diff_id, size) == ("sha256:" + hashlib.sha256(expected).hexdigest(), len(expected))
    with tarfile.open(out) as tar:
        members = {m.name: m for m in tar}
    assert members["app/d/hard"].islnk() and members["app/d/hard"].linkname == "app/block"


def test_copy_to_a_subdirectory_is_deterministic(tmp_path):
    """The destination directory gets the source's metadata after its children are
    written, so its mtime is the source's and not the time of the copy."""
    context = _odd_context(tmp_path / "ctx")
    layers = []
    for run in range(2):
        rootfs = tmp_path / f"rootfs{run}"
        rootfs.mkdir()
        copier = Copier(context, str(rootfs), None)
        copier.copy(["."], "/app/", "/")
        assert os.stat(rootfs / "app").st_mtime_ns == os.stat(context).st_mtime_ns
        layers.append(write_layer(str(rootfs), copier.changed, str(tmp_path / f"l{run}.tar")))
        os.utime(rootfs / "app" / "d", ns=(0, 0))  # the next copy must not depend on this tree
    assert layers[0] == layers[1]


# -- COPY by hardlink ----------------------------------------------------------------------------


def test_copy_links_only_what_a_copy_would_share(tmp_path):
    context = _odd_context(tmp_path / "ctx")
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    links = SourceLinks(TreeListing.of(context).multi_named())
    assert links.multi_named == {"block", "d/hard"}
    first = Copier(context, str(rootfs), None, links)
    first.copy(["."], "/app/", "/")
    ino = lambda *p: os.lstat(os.path.join(*p)).st_ino  # noqa: E731
    assert ino(rootfs, "app", "chunk") == ino(context, "chunk")  # linked, not copied
    assert ino(rootfs, "app", "d", "hard") == ino(rootfs, "app", "block") == ino(context, "block")
    assert ino(rootfs, "app", "d", "sym") != ino(context, "d", "sym")  # symlinks are made anew
    # a later step copying the same file gets its own inode (as a copy would)
    second = Copier(context, str(rootfs), None, links)
    second.copy(["chunk", "d"], "/again/", "/")
    assert ino(rootfs, "again", "chunk") != ino(context, "chunk")
    assert ino(rootfs, "again", "hard") != ino(context, "block")
    # the same source twice in one COPY: two files, as copies would be
    third = Copier(context, str(rootfs), None, links)
    third.copy(["d", "."], "/twice/", "/")
    assert ino(rootfs, "twice", "caf\u00e9") != ino(rootfs, "twice", "d", "caf\u00e9")
    # --chown to another owner never links: the owner must not change in the context
    before = os.lstat(os.path.join(context, "one"))
    owned = Copier(context, str(rootfs), (before.st_uid + 7, before.st_gid + 8), SourceLinks(links.multi_named))
    owned.copy(["one"], "/owned/", "/")
    assert ino(rootfs, "owned", "one") != before.st_ino
    after = os.lstat(os.path.join(context, "one"))
    assert (after.st_uid, after.st_gid, after.st_mode, after.st_mtime_ns) == (
        before.st_uid, before.st_gid, before.st_mode, before.st_mtime_ns)


def test_linked_and_copied_layers_are_identical(tmp_path):
    context = _odd_context(tmp_path / "ctx")
    results = []
    for linked in (False, True):
        rootfs = tmp_path / f"rootfs-{linked}"
        rootfs.mkdir()
        links = SourceLinks(TreeListing.of(context).multi_named()) if linked else None
        copier = Copier(context, str(rootfs), None, links)
        copier.copy(["d", "one", "block"], "/x/", "/")
        copier.copy(["."], "/", "/")
        # the directory the COPY created takes the time of the copy (as in BuildKit): pin it,
        # or the two layers differ whenever the iterations straddle a second
        os.utime(rootfs / "x", ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
        results.append(write_layer(str(rootfs), copier.changed, str(tmp_path / f"{linked}.tar")))
    assert results[0] == results[1]


def test_a_later_sync_never_reaches_a_linked_rootfs(tmp_path):
    """The applier replaces files by rename: a rootfs linked to the cache keeps the old
    content and metadata whatever the next sync changes (content, size, mode, deletion)."""
    client = _odd_context(tmp_path / "client")
    cache = tmp_path / "cache"

    def sync() -> None:
        receiver = dc.DiffCopyReceiver(list(walk(str(cache))) if cache.exists() else [])
        applier = TreeApplier(str(cache), chown=None)

        def read_file(path):
            with open(os.path.join(client, path), "rb") as fh:
                data = fh.read()
            if data:
                yield data

        dc.transfer_in_memory(walk(client), read_file, receiver, applier.apply)
        applier.finish(receiver.directories)

    sync()
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    copier = Copier(str(cache), str(rootfs), None, SourceLinks(TreeListing.of(str(cache)).multi_named()))
    copier.copy(["."], "/", "/")
    before = {rel: (open(rootfs / rel, "rb").read(), os.lstat(rootfs / rel)) for rel in ("one", "block", "chunk")}
    assert os.lstat(rootfs / "one").st_ino == os.lstat(cache / "one").st_ino

    with open(os.path.join(client, "one"), "wb") as fh:  # new content and size
        fh.write(b"changed!")
    os.chmod(os.path.join(client, "block"), 0o600)  # metadata only
    os.utime(os.path.join(client, "chunk"), ns=(1, 1))
    os.unlink(os.path.join(client, "d", "hard"))
    sync()
    assert (cache / "one").read_bytes() == b"changed!" and os.lstat(cache / "block").st_mode & 0o777 == 0o600
    for rel, (data, st) in before.items():
        now = os.lstat(rootfs / rel)
        assert (rootfs / rel).read_bytes() == data
        assert (now.st_ino, now.st_mode, now.st_mtime_ns, now.st_size) == (st.st_ino, st.st_mode, st.st_mtime_ns,
                                                                            st.st_size)


# -- kept listings and keys ------------------------------------------------------------------------


def test_listing_is_kept_until_the_tree_changes(tmp_path):
    cache = ContextCache(str(tmp_path / "cache"), max_size=1 << 30, max_age=3600)
    lease = cache.acquire("key", "context", "context")
    lease.begin_sync()
    _odd_context(lease.tree + "/sub")
    lease.sync_complete()
    listing = lease.listing()
    assert lease.complete and lease.listing() is listing  # no second walk
    assert [s.path for s in listing.stats] == [s.path for s in walk(lease.tree, with_xattrs=False)]
    on_disk = [os.lstat(os.path.join(lease.tree, s.path)) for s in listing.stats]
    assert listing.size() == sum(st.st_size for st in on_disk if not _st.S_ISDIR(st.st_mode)) > 4 << 20
    lease.release()
    again = cache.acquire("key", "context", "context")
    assert again.listing() is listing  # the next build's diff base costs nothing
    again.begin_sync()  # about to change: the listing is dropped, the marker too
    assert not again.complete and again.entry.listing is None
    assert not os.path.exists(again.entry.marker)
    again.sync_complete()
    assert again.complete and again.listing() is not listing and again.entry.meta.size == listing.size()
    again.release()


def test_diff_base_is_prepared_when_the_tree_changes(tmp_path, monkeypatch):
    cache = ContextCache(str(tmp_path / "cache"), max_size=1 << 30, max_age=3600)
    lease = cache.acquire("key", "context", "context")
    lease.begin_sync()
    _odd_context(lease.tree + "/sub")
    lease.sync_complete()
    expected = [dc.previous_entry(stat) for stat in walk(lease.tree, with_xattrs=False)]
    lease.release()

    def converted_again(stat):
        raise AssertionError("the next build converted the listing itself")

    monkeypatch.setattr(dc, "previous_entry", converted_again)
    again = cache.acquire("key", "context", "context")
    assert again.listing().diff_base() == expected
    again.release()


def _held_usage_writes(monkeypatch):
    """Make meta.json writes wait: returns (a write has started, let writes go on)."""
    import threading

    from reference.daemon import cache as cache_module

    writing, may_write = threading.Event(), threading.Event()
    save_meta = cache_module.CacheEntry.save_meta

    def slow_save_meta(entry, *, durable=True):
        writing.set()
        assert may_write.wait(10)
        save_meta(entry, durable=durable)

    monkeypatch.setattr(cache_module.CacheEntry, "save_meta", slow_save_meta)
    return writing, may_write


def test_usage_is_saved_off_the_releasing_thread(tmp_path, monkeypatch):
    directory = str(tmp_path / "cache")
    cache = ContextCache(directory, max_size=1 << 30, max_age=3600)
    lease = cache.acquire("key", "context", "context")
    entry_id = lease.id
    writing, may_write = _held_usage_writes(monkeypatch)
    lease.release()  # returns while the write waits
    assert writing.wait(10)
    again = cache.acquire("key", "context", "context")  # the cache is not locked by the write
    assert again.id == entry_id and again.entry.meta.usage_count == 2
    may_write.set()
    again.release()
    cache.save_usage()  # what a clean shutdown does
    with open(os.path.join(directory, entry_id, "meta.json")) as fh:
        assert json.load(fh)["usage_count"] == 2
    reloaded = ContextCache(directory, max_size=1 << 30, max_age=3600)
    assert [(r["ID"], r["UsageCount"]) for r in reloaded.records()] == [(entry_id, 2)]


def test_prune_waits_for_a_usage_write_under_way(tmp_path, monkeypatch):
    """A usage write must not land in an entry's directory while prune moves it away
    (it would leave a stray directory behind until the next start)."""
    import threading

    directory = str(tmp_path / "cache")
    cache = ContextCache(directory, max_size=1 << 30, max_age=3600)
    lease = cache.acquire("key", "context", "context")
    writing, may_write = _held_usage_writes(monkeypatch)
    lease.release()
    assert writing.wait(10)
    pruned: list = []
    pruner = threading.Thread(target=lambda: pruned.append(cache.prune(all=True)))
    pruner.start()
    pruner.join(0.3)
    assert pruner.is_alive(), "prune moved the entry away during its usage write"
    may_write.set()
    pruner.join(10)
    assert pruned and pruned[0][0] == [lease.id]
    cache.save_usage()
    assert os.listdir(directory) == []


def test_kept_listings_are_bounded(tmp_path, monkeypatch):
    from reference.daemon import cache as cache_module

    monkeypatch.setattr(cache_module, "KEPT_LISTING_PATHS", 25)
    cache = ContextCache(str(tmp_path / "cache"), max_size=1 << 30, max_age=3600)
    leases = []
    for n in range(3):
        lease = cache.acquire(f"key{n}", "context", "context")
        lease.begin_sync()
        for i in range(10):
            open(os.path.join(lease.tree, f"f{i}"), "w").close()
        lease.sync_complete()
        lease.release()
        leases.append(lease)
    # the two most recently used keep theirs (20 paths), the oldest is walked again when needed
    assert [lease.entry.listing is not None for lease in leases] == [False, True, True]
    again = cache.acquire("key0", "context", "context")
    assert len(again.listing().stats) == 10
    again.release()


def test_source_digest_from_the_kept_listing_equals_a_fresh_walk(tmp_path):
    context = _odd_context(tmp_path / "ctx")
    listing = TreeListing.of(context)
    for sources in (["."], ["d"], ["d/e"], ["one", "d/sym"], ["d/hard"], ["*"]):
        assert source_digest(context, sources, listing) == source_digest(context, sources), sources
    whole, sub = source_digest(context, ["."], listing), source_digest(context, ["d"], listing)
    os.chmod(os.path.join(context, "one"), 0o600)  # outside d/
    changed = TreeListing.of(context)
    assert source_digest(context, ["."], changed) != whole
    assert source_digest(context, ["d"], changed) == sub
    os.utime(os.path.join(context, "d", "caf\u00e9"), ns=(5, 5))
    assert source_digest(context, ["d"], TreeListing.of(context)) != sub


def test_prune_all_forgets_the_step_cache(tmp_path):
    store = ImageStore(str(tmp_path / "images"))
    store.remember_step("k", None, 0)
    assert store.cached_step("k") is not None
    assert store.forget_steps() == 1
    assert store.cached_step("k") is None
    assert ImageStore(str(tmp_path / "images")).cached_step("k") is None  # persisted


# -- through the docker CLI -------------------------------------------------------------------------


@needs_cli
def test_cli_unchanged_rebuild_and_cold_after_prune(tmp_path):
    context = make_context(tmp_path / "ctx")
    config = str(tmp_path / "cfg")
    os.makedirs(config)
    d = RefDaemon(str(tmp_path / "root"))
    try:
        def build():
            proc = run_docker(d, config, "build", "--progress", "plain", context)
            assert proc.returncode == 0, proc.stderr + d.logs()
            record = d.builds()[-1]
            image = json.loads(d.get(f"/images/{record['image_id']}/json")[2])
            return proc.stderr, record, image["RootFS"]["Layers"]

        first_log, first, first_layers = build()
        assert "CACHED" not in first_log
        entry = next(e for e in json.loads(d.get("/system/df")[2])["BuildCache"]
                     if e["Description"] == "local source for context" and e["Size"] > 400_000)
        marker = os.path.join(d.root, "cache", entry["ID"], "complete")
        marker_mtime = os.stat(marker).st_mtime_ns

        again_log, again, again_layers = build()
        assert again_log.count("CACHED") == 1 and again["image_id"] == first["image_id"]
        context_stream = again["streams"][-1]
        assert context_stream["requested"] == [] and context_stream["changed"] is False
        assert os.stat(marker).st_mtime_ns == marker_mtime  # nothing rewritten for an unchanged sync

        assert run_docker(d, config, "builder", "prune", "-af").returncode == 0
        cold_log, cold, cold_layers = build()
        assert "CACHED" not in cold_log, "a prune -a must leave no cached COPY behind"
        assert cold_layers == first_layers and cold["image_id"] == first["image_id"]
        layer = os.path.join(d.root, "images", "layers", cold_layers[0].split(":")[1] + ".tar")
        with open(layer, "rb") as fh:
            assert "sha256:" + hashlib.sha256(fh.read()).hexdigest() == cold_layers[0]
    finally:
        d.close()


@pytest.mark.parametrize("size", [0, 1, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, 6 * (1 << 20) + 12345])
def test_layer_sink_writes_and_digests_every_byte_in_order(tmp_path, size):
    """One chunk is digested in place, more go through the digest thread with at most 4 chunks in flight."""
    from reference.daemon.fsops import _DigestingSink

    data = random.Random(size).randbytes(size)
    with open(tmp_path / "layer", "wb") as fh:
        sink = _DigestingSink(fh.fileno())
        for start in range(0, size, 300_001):  # writes that straddle the chunks
            sink.write(data[start:start + 300_001])
        digest = sink.finish()
    assert digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert (tmp_path / "layer").read_bytes() == data and sink.size == size
    assert sink._allocated <= 4
