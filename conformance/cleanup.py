"""Leave a daemon under test as the run found it: a snapshot of its images and build cache, and the removal
of what the run added.

``Snapshot.take(host)`` lists the daemon's images (``GET /images/json?all=1``: ID and tags) and build-cache
records (``GET /system/df``, ``BuildCache[].ID``). ``remove_what_the_run_added(snapshot)`` then deletes

* every image whose ID is not in the snapshot (``DELETE /images/{id}?force=1&noprune=1``, children before
  parents: a daemon refuses to delete a parent that still has children, even forced). Not ``noprune=0``: that
  also deletes untagged parents, and a parent may be an image from before the run; the run's own parents
  are in the set anyway;
* tags the run added to an image from before the run (untagged only while the image keeps another tag:
  untagging its last tag would delete it), and a tag from before the run that the run moved to another
  image is put back;
* every build-cache record whose ID is not in the snapshot, one ``POST /build/prune?all=1`` per record with
  ``filters={"id": ["^ID$"]}``, repeated while records go (a record with children is only released once
  they are gone).

The id filter, as checked against the real daemons: dockerd 20.10 and 26.1 both honour it, with exactly one
value (two answer 400 "filters expect only one value"); it is a regular expression (``~=``: a prefix also
matches), hence the anchors. A daemon not known to honour it (the embedded reference daemon ignores it and
prunes everything) gets the closest safe method: an unfiltered prune only when the snapshot had no build
cache at all, else its new records are left and counted. A prune that deleted a record from before the run
stops the cache clean-up at once.

Which process cleans what (nothing is cleaned with ``--keep-artifacts``):

* an external daemon (``--daemon-under-test URL``) is shared by every xdist worker, so only the controller
  (or the single process of a run without xdist) takes the snapshot, at ``pytest_sessionstart`` before any
  worker starts, and cleans at ``pytest_sessionfinish``, after every worker has finished;
* a private peer (``peer:NAME``) and an embedded reference daemon are started by each process for itself
  (``conformance.plugin._daemon_pool``): that process snapshots the fresh daemon when it starts it and cleans
  it at session teardown, before stopping it. No other process uses that daemon. A worker sends what it
  removed to the controller (xdist's ``workeroutput``), which prints one line for the whole run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from reference.dockerhost import api_call, error_message

from .identify import family_of, identify_daemon

# Daemons seen to prune exactly the record an anchored {"id": [...]} filter names.
ID_FILTER_HONOURED_BY = ("dockerd 20.10", "dockerd 26.1", "reference-daemon")  # families, any version of the last
_NO_TAG = "<none>:<none>"
_MAX_PRUNE_ROUNDS = 64  # a chain of parents deeper than this is left for the next run


class CleanupError(RuntimeError):
    """The daemon did not answer a listing the clean-up needs."""


def _json_call(method: str, path: str, host: str, query: dict | None = None):
    resp, body = api_call(method, path, host=host, query=query)
    if resp.status >= 300:
        raise CleanupError(f"{method} {path}: {resp.status} {error_message(body)}")
    return json.loads(body) if body.strip() else None


def list_images(host: str) -> dict[str, set[str]]:
    """Image ID -> its tags (``<none>:<none>`` is no tag)."""
    return {image["Id"]: {t for t in image.get("RepoTags") or () if t != _NO_TAG}
            for image in _json_call("GET", "/images/json", host, {"all": "1"}) or ()}


def list_build_cache(host: str) -> dict[str, dict]:
    """Build-cache record ID -> its record (``/system/df``)."""
    return {record["ID"]: record for record in (_json_call("GET", "/system/df", host) or {}).get("BuildCache") or ()}


def _image_parents(host: str, image_ids) -> dict[str, str]:
    """ID -> parent ID of those images that have one (only the classic builder's images do)."""
    summaries = _json_call("GET", "/images/json", host, {"all": "1"}) or ()
    wanted = set(image_ids)
    return {s["Id"]: s["ParentId"] for s in summaries if s["Id"] in wanted and s.get("ParentId")}


@dataclass
class Snapshot:
    host: str
    implementation: str
    images: dict[str, set[str]]
    cache_records: set[str]

    @classmethod
    def take(cls, host: str, implementation: str | None = None) -> "Snapshot":
        if implementation is None:
            implementation = identify_daemon(host).implementation
        return cls(host, implementation, list_images(host), set(list_build_cache(host)))

    @property
    def honours_id_filter(self) -> bool:
        family = family_of(self.implementation) or ""
        return family.startswith(ID_FILTER_HONOURED_BY)


@dataclass
class Removed:
    host: str
    images: list[str] = field(default_factory=list)
    untagged: list[str] = field(default_factory=list)
    retagged: list[str] = field(default_factory=list)
    cache_records: list[str] = field(default_factory=list)
    cache_left: int = 0  # records the run added that could not be removed safely
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def remove_what_the_run_added(snapshot: Snapshot) -> Removed:
    """Delete the images, tags and build-cache records that are not in ``snapshot``; put back tags it had."""
    removed = Removed(snapshot.host)
    try:
        _remove_images(snapshot, removed)
    except (OSError, CleanupError) as exc:
        removed.problems.append(f"images: {exc}")
    try:
        _remove_build_cache(snapshot, removed)
    except (OSError, CleanupError) as exc:
        removed.problems.append(f"build cache: {exc}")
    return removed


def _remove_images(snapshot: Snapshot, removed: Removed) -> None:
    host = snapshot.host
    now = list_images(host)
    added = [image_id for image_id in now if image_id not in snapshot.images]
    parents = _image_parents(host, added)
    pending = set(added)
    while pending:
        # children first: an image that is nobody's parent among those still pending
        leaves = [i for i in pending if not any(parents.get(other) == i for other in pending)] or list(pending)
        progress = False
        for image_id in sorted(leaves):
            resp, body = api_call("DELETE", f"/images/{image_id}", host=host, query={"force": "1", "noprune": "1"})
            pending.discard(image_id)
            if resp.status < 300 or resp.status == 404:
                removed.images.append(image_id)
                progress = True
            else:
                removed.problems.append(f"image {image_id}: {resp.status} {error_message(body)}")
        if not progress:
            break
    # tags the run added to images from before it, and tags from before it that now name another image
    current = list_images(host)
    for image_id, tags in snapshot.images.items():
        if image_id not in current:
            continue
        extra = sorted(current[image_id] - tags)
        for tag in extra:
            if len(current[image_id]) <= 1:
                break  # untagging the last tag would delete an image from before the run
            resp, body = api_call("DELETE", f"/images/{tag}", host=host, query={"noprune": "1"})
            if resp.status < 300:
                removed.untagged.append(tag)
                current[image_id].discard(tag)
            else:
                removed.problems.append(f"untag {tag}: {resp.status} {error_message(body)}")
        for tag in sorted(tags - current[image_id]):
            repo, _, name = tag.rpartition(":")
            resp, body = api_call("POST", f"/images/{image_id}/tag", host=host, query={"repo": repo, "tag": name})
            if resp.status < 300:
                removed.retagged.append(tag)
            else:
                removed.problems.append(f"restore tag {tag}: {resp.status} {error_message(body)}")


def _prune(host: str, query: dict) -> list[str]:
    return (_json_call("POST", "/build/prune", host, query) or {}).get("CachesDeleted") or []


def _remove_build_cache(snapshot: Snapshot, removed: Removed) -> None:
    host = snapshot.host
    pending = set(list_build_cache(host)) - snapshot.cache_records
    if not pending:
        return
    if not snapshot.honours_id_filter:
        if snapshot.cache_records:
            removed.cache_left = len(pending)
            removed.problems.append(f"left {len(pending)} build-cache records: {snapshot.implementation} is not "
                                    f"known to honour /build/prune's id filter and had records before the run")
            return
        removed.cache_records.extend(_prune(host, {"all": "1"}))
        return
    for _ in range(_MAX_PRUNE_ROUNDS):
        released = False
        for record_id in sorted(pending):
            deleted = set(_prune(host, {"all": "1", "filters": json.dumps({"id": [f"^{record_id}$"]})}))
            foreign = deleted & snapshot.cache_records
            removed.cache_records.extend(sorted(deleted - snapshot.cache_records))
            pending -= deleted
            released = released or bool(deleted)
            if foreign:
                removed.problems.append(f"a prune for {record_id} also deleted records from before the run "
                                        f"({', '.join(sorted(foreign))}): stopped")
                removed.cache_left = len(pending)
                return
        if not pending or not released:
            break
        pending &= set(list_build_cache(host))  # a parent may have gone with its last child
    removed.cache_left = len(pending)  # in use, or held by something the run did not make


def summary_line(results: list[dict], *, kept: list[str] = ()) -> str | None:
    """One terminal line for the whole run (``results``: ``Removed.as_dict()`` of every cleaned daemon)."""
    if kept:
        return f"cleanup: --keep-artifacts: left what the run added in {', '.join(sorted(set(kept)))}"
    if not results:
        return None
    images = sum(len(r["images"]) for r in results)
    records = sum(len(r["cache_records"]) for r in results)
    hosts = ", ".join(sorted({r["host"] for r in results}))
    extra = []
    tags = sum(len(r["untagged"]) for r in results)
    if tags:
        extra.append(f"{tags} tag{'s' if tags != 1 else ''} untagged")
    restored = sum(len(r["retagged"]) for r in results)
    if restored:
        extra.append(f"{restored} moved tag{'s' if restored != 1 else ''} put back")
    left = sum(r["cache_left"] for r in results)
    if left:
        extra.append(f"{left} build-cache record{'s' if left != 1 else ''} left")
    problems = [p for r in results for p in r["problems"]]
    if problems:
        extra.append(f"problems: {'; '.join(problems)[:500]}")
    return (f"cleanup: removed {images} image{'s' if images != 1 else ''} and {records} build-cache "
            f"record{'s' if records != 1 else ''} the run added to {hosts}"
            + (f" ({'; '.join(extra)})" if extra else "") + "; --keep-artifacts keeps them")
