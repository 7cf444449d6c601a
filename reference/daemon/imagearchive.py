"""``docker save``: the daemon's images as a docker-archive tar, the layout ``docker load`` reads.

One directory per layer (``<v1 id>/layer.tar``, ``VERSION``, ``json``), each image's config as
``<config digest>.json``, ``manifest.json`` (config, tags and layer paths of every image) and
``repositories`` (name -> tag -> top layer's v1 id).  dockerd 20.10 writes the same layout; dockerd 25
and later add OCI files beside it, and both load this one.  The tar is written as a stream: layer
tars are copied from the store, never held in memory.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from typing import BinaryIO

from .images import Image, ImageStore

# a fixed mtime keeps the archive of one image byte-identical between saves
_EPOCH = 0


def _v1_ids(diff_ids: list[str]) -> list[str]:
    """A legacy layer id per layer: the digest of its chain (the parent's id and its own diff id), so a
    layer shared by two images in one archive gets one directory."""
    ids, parent = [], ""
    for diff_id in diff_ids:
        parent = hashlib.sha256(f"{parent}\n{diff_id}".encode()).hexdigest()
        ids.append(parent)
    return ids


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), _EPOCH, 0o644
    tar.addfile(info, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mtime, info.mode = tarfile.DIRTYPE, _EPOCH, 0o755
    tar.addfile(info)


def write_docker_archive(store: ImageStore, selection: list[tuple[Image, list[str]]], out: BinaryIO) -> None:
    """Write ``selection`` (each image with the tags to record for it; none when it was named by id)."""
    manifest: list[dict] = []
    repositories: dict[str, dict[str, str]] = {}
    written: set[str] = set()
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for image, tags in selection:
            diff_ids = image.config.get("rootfs", {}).get("diff_ids", [])
            layer_paths = []
            parent = ""
            for v1_id, diff_id in zip(_v1_ids(diff_ids), diff_ids):
                layer_paths.append(f"{v1_id}/layer.tar")
                if v1_id not in written:
                    written.add(v1_id)
                    _add_dir(tar, v1_id)
                    _add_bytes(tar, f"{v1_id}/VERSION", b"1.0")
                    legacy = {"id": v1_id, **({"parent": parent} if parent else {}),
                              "created": image.config.get("created", ""), "os": image.config.get("os", "linux")}
                    _add_bytes(tar, f"{v1_id}/json", json.dumps(legacy).encode())
                    path = store.layer_path(diff_id)
                    info = tar.gettarinfo(path, arcname=f"{v1_id}/layer.tar")
                    info.mtime, info.uid, info.gid, info.uname, info.gname = _EPOCH, 0, 0, "", ""
                    with open(path, "rb") as layer:
                        tar.addfile(info, layer)
                parent = v1_id
            config_name = image.id.split(":", 1)[1] + ".json"
            if config_name not in written:
                written.add(config_name)
                _add_bytes(tar, config_name, image.config_bytes)
            manifest.append({"Config": config_name, "RepoTags": tags or None, "Layers": layer_paths})
            for tag in tags:
                name, _, version = tag.rpartition(":")
                if parent:  # repositories names layers: an image without any has no entry
                    repositories.setdefault(name, {})[version] = parent
        _add_bytes(tar, "manifest.json", json.dumps(manifest).encode())
        if repositories:
            _add_bytes(tar, "repositories", json.dumps(repositories).encode())
