"""The context cache and image store always load, whatever is on disk (issue 15, defect 1).

A damaged entry is dropped with a log line; a deletion left half done is
finished; a tree of any depth is deleted by prune and GC without recursion;
a tree that cannot be listed is emptied instead of failing every build with
its shared key.
"""

from __future__ import annotations

import json
import logging
import os
import time

import pytest

from reference.applier import remove_tree
from reference.daemon import cache as cache_module
from reference.daemon.cache import ContextCache
from reference.daemon.images import ImageStore

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def deep_chain(root: str, depth: int) -> None:
    os.makedirs(root, exist_ok=True)
    fd = os.open(root, _DIR_FLAGS)
    for _ in range(depth):
        os.mkdir("d", dir_fd=fd)
        inner = os.open("d", _DIR_FLAGS, dir_fd=fd)
        os.close(fd)
        fd = inner
    os.close(os.open("f", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
    os.close(fd)


def entry_on_disk(directory: str, entry_id: str, *, meta=None, complete=True, depth=0) -> str:
    base = os.path.join(directory, entry_id)
    os.makedirs(os.path.join(base, "tree"))
    now = time.time()
    meta = meta if meta is not None else {"id": entry_id, "shared_key": "k", "dir_name": "context",
                                          "purpose": "context", "created_at": now, "last_used_at": now,
                                          "usage_count": 1, "size": 0}
    with open(os.path.join(base, "meta.json"), "w") as fh:
        fh.write(meta if isinstance(meta, str) else json.dumps(meta))
    if complete:
        open(os.path.join(base, "complete"), "w").close()
    if depth:
        deep_chain(os.path.join(base, "tree"), depth)
    return base


@pytest.fixture
def directory(tmp_path):
    path = str(tmp_path / "cache")
    os.makedirs(path)
    yield path
    remove_tree(path)


def test_a_half_deleted_deep_entry_is_finished_at_start(directory, caplog):
    """Failed before: RecursionError loading the cache, so the daemon could not start."""
    deep_chain(os.path.join(directory, ".deleting-" + "x" * 25, "tree"), 3000)
    with caplog.at_level(logging.INFO, logger="reference.daemon.cache"):
        cache = ContextCache(directory, max_size=1 << 30, max_age=3600)
    assert cache.records() == [] and os.listdir(directory) == []
    assert "interrupted deletion" in caplog.text


@pytest.mark.parametrize("meta, reason", [
    ("{not json", "unreadable"),
    ("[" * 100_000 + "]" * 100_000, "unreadable"),  # the JSON decoder recurses
    ("[1, 2]", "not an object"),
    ({"id": "ID", "shared_key": 5}, "has fields"),
    ({"id": "ID", "shared_key": "k", "dir_name": "context", "purpose": "context", "created_at": "yesterday",
      "last_used_at": 1.0, "usage_count": 1, "size": 0}, "created_at"),
    ({"id": "ID", "shared_key": "k", "dir_name": "context", "purpose": "context", "created_at": 1.0,
      "last_used_at": 1.0, "usage_count": 1, "size": -5}, "size"),
    ({"id": "other", "shared_key": "k", "dir_name": "context", "purpose": "context", "created_at": 1.0,
      "last_used_at": 1.0, "usage_count": 1, "size": 0}, "does not match"),
], ids=["not-json", "deep-json", "a-list", "missing-fields", "wrong-type", "negative-size", "other-id"])
def test_a_damaged_entry_is_dropped_with_a_log_line(directory, caplog, meta, reason):
    """Failed before: TypeError/RecursionError stopped the cache from loading (the daemon from starting)."""
    entry_id = "i" * 25
    if isinstance(meta, dict) and meta.get("id") == "ID":
        meta["id"] = entry_id
    entry_on_disk(directory, entry_id, meta=meta)
    good = entry_on_disk(directory, "g" * 25)
    with caplog.at_level(logging.WARNING, logger="reference.daemon.cache"):
        cache = ContextCache(directory, max_size=1 << 30, max_age=3600)
    assert [r["ID"] for r in cache.records()] == ["g" * 25]
    assert os.listdir(directory) == [os.path.basename(good)]
    assert f"dropping cache entry {entry_id}" in caplog.text and reason in caplog.text


def test_a_partial_entry_stays_dangling_and_a_missing_tree_is_not_complete(directory):
    entry_on_disk(directory, "p" * 25, complete=False)
    base = entry_on_disk(directory, "m" * 25)
    os.rmdir(os.path.join(base, "tree"))
    cache = ContextCache(directory, max_size=1 << 30, max_age=3600)
    assert sorted(r["ID"] for r in cache.records()) == ["m" * 25, "p" * 25]
    assert not cache._entries["m" * 25].complete and os.path.isdir(os.path.join(base, "tree"))
    assert sorted(cache.prune(all=False)[0]) == ["m" * 25, "p" * 25]  # dangling: prunable without -a


def test_prune_and_gc_delete_deep_trees_and_never_raise(directory):
    """Failed before: prune answered 500 and left ``.deleting-*``; GC crashed the build's thread."""
    entry_on_disk(directory, "a" * 25, depth=3000)
    entry_on_disk(directory, "b" * 25, depth=3000)
    cache = ContextCache(directory, max_size=1 << 30, max_age=3600)
    assert sorted(cache.prune(all=True)[0]) == ["a" * 25, "b" * 25]
    assert os.listdir(directory) == []
    entry_on_disk(directory, "c" * 25, depth=3000)
    cache = ContextCache(directory, max_size=0, max_age=-1)  # everything is too old
    assert cache.gc()[0] == ["c" * 25]
    assert os.listdir(directory) == [] and cache.records() == []


def test_a_deletion_that_fails_is_logged_not_raised(directory, monkeypatch, caplog):
    entry_on_disk(directory, "a" * 25)
    cache = ContextCache(directory, max_size=1 << 30, max_age=3600)

    def failing(path, **kw):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(cache_module, "remove_tree", failing)
    with caplog.at_level(logging.WARNING, logger="reference.daemon.cache"):
        assert cache.prune(all=True) == (["a" * 25], 0)
    assert "cannot remove" in caplog.text


def test_a_tree_that_cannot_be_listed_is_emptied_not_a_failure_forever(directory, monkeypatch, caplog):
    """Failed before: every later build with the key failed with ``cannot list the cached context``."""
    entry_on_disk(directory, "a" * 25, depth=5)
    cache = ContextCache(directory, max_size=1 << 30, max_age=3600)
    lease = cache.acquire("k", "context", "context")
    real_of = cache_module.TreeListing.of

    def broken(root):
        raise RuntimeError("listing failed")

    monkeypatch.setattr(cache_module.TreeListing, "of", staticmethod(broken))
    with caplog.at_level(logging.WARNING, logger="reference.daemon.cache"):
        listing = lease.listing()
    assert listing.stats == [] and os.listdir(lease.tree) == [] and not lease.complete
    assert "cannot be listed, emptying it" in caplog.text
    monkeypatch.setattr(cache_module.TreeListing, "of", real_of)
    lease.release()


@pytest.mark.parametrize("name, content", [
    ("tags.json", "[1, 2]"), ("tags.json", '{"a": 5}'), ("steps.json", '{"k": {"diff_id": 3}}'),
    ("build-keys.json", "[" * 100_000), ("steps.json", "\xff\xfe garbage"),
], ids=["tags-list", "tags-types", "steps-types", "keys-deep", "steps-bytes"])
def test_the_image_store_starts_whatever_its_json_holds(tmp_path, caplog, name, content):
    """Failed before: ``dict([1, 2])`` raised TypeError, deep JSON RecursionError: no start."""
    directory = tmp_path / "images"
    directory.mkdir()
    (directory / name).write_text(content, errors="surrogateescape")
    with caplog.at_level(logging.WARNING, logger="reference.daemon.images"):
        store = ImageStore(str(directory))
    assert store.all_images() == [] and "ignoring" in caplog.text
    store.tag(store.add_image({"rootfs": {"type": "layers", "diff_ids": []}}), "x:latest")
    assert ImageStore(str(directory)).tags_of(store.resolve("x:latest")) == ["x:latest"]
