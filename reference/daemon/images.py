"""The image store: layer tars, config JSON, tags; content addressed, under ``<root>/images``.

An image id is ``sha256:`` of its config bytes; the config's
``rootfs.diff_ids`` are the sha256 digests of the uncompressed layer tars.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass

from .atomicfile import AtomicFiles

# name[:tag], the subset of distribution's reference grammar that local tags use
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*"
_DOMAIN = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?/)?"
_REFERENCE = re.compile(rf"^({_DOMAIN}{_COMPONENT}(?:/{_COMPONENT})*)(?::([\w][\w.-]{{0,127}}))?$")
_HEX_ID = re.compile(r"^(?:sha256:)?([0-9a-f]{1,64})$")


log = logging.getLogger("reference.daemon.images")


def _string_map(value) -> bool:
    return all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


def _step_map(value) -> bool:
    return all(isinstance(k, str) and isinstance(v, dict) and set(v) == {"diff_id", "size"}
               and (v["diff_id"] is None or isinstance(v["diff_id"], str) and _HEX_ID.match(v["diff_id"]))
               and isinstance(v["size"], int) and not isinstance(v["size"], bool) for k, v in value.items())


class ImageNotFound(Exception):
    pass


class InvalidReference(ValueError):
    pass


def normalize_tag(reference: str) -> str:
    """``foo`` -> ``foo:latest``; ``docker.io/library/foo:1`` -> ``foo:1``."""
    match = _REFERENCE.match(reference)
    if not match or len(match.group(1)) > 255:
        raise InvalidReference(f"invalid reference format: {reference!r}")
    name, tag = match.group(1), match.group(2) or "latest"
    for prefix in ("docker.io/library/", "index.docker.io/library/", "docker.io/"):
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    return f"{name}:{tag}"


@dataclass
class Image:
    id: str
    config: dict
    config_bytes: bytes
    size: int
    created_unix: int


class ImageStore:
    def __init__(self, directory: str, *, durable: bool = True):
        self.directory = directory
        self._files = AtomicFiles(durable=durable)
        self.layers = os.path.join(directory, "layers")
        self.configs = os.path.join(directory, "configs")
        self._tags_path = os.path.join(directory, "tags.json")
        self._keys_path = os.path.join(directory, "build-keys.json")
        for path in (self.layers, self.configs):
            os.makedirs(path, mode=0o700, exist_ok=True)
        self._lock = threading.Lock()
        self._tags: dict[str, str] = self._read_json(self._tags_path, _string_map)
        self._build_keys: dict[str, str] = self._read_json(self._keys_path, _string_map)
        self._steps_path = os.path.join(directory, "steps.json")
        self._steps: dict[str, dict] = self._read_json(self._steps_path, _step_map)

    @staticmethod
    def _read_json(path: str, valid=lambda value: True) -> dict:
        """A JSON object saved by us; anything damaged counts as empty (logged), never as a
        reason not to start."""
        try:
            with open(path) as fh:
                value = json.load(fh)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, RecursionError) as exc:
            log.warning("ignoring unreadable %s: %s", path, exc)
            return {}
        if not isinstance(value, dict) or not valid(value):
            log.warning("ignoring %s: not what this daemon writes", path)
            return {}
        return value

    # -- writing ------------------------------------------------------------
    def add_layer(self, tar_path: str, diff_id: str) -> None:
        """Move a finished layer tar (whose digest the writer computed) into the store."""
        target = self.layer_path(diff_id)
        if os.path.exists(target):
            os.unlink(tar_path)
        else:
            os.replace(tar_path, target)

    def layer_path(self, diff_id: str) -> str:
        return os.path.join(self.layers, diff_id.split(":", 1)[1] + ".tar")

    # -- step cache: a build step's key -> the layer it produced ------------------
    def cached_step(self, key: str) -> dict | None:
        with self._lock:
            entry = self._steps.get(key)
        if entry is None:
            return None
        if entry["diff_id"] is not None and not os.path.exists(self.layer_path(entry["diff_id"])):
            return None
        return dict(entry)

    def remember_step(self, key: str, diff_id: str | None, size: int) -> None:
        with self._lock:
            self._steps[key] = {"diff_id": diff_id, "size": size}
            self._files.write(self._steps_path, json.dumps(self._steps).encode())

    def forget_steps(self) -> int:
        """Drop the whole step cache (``docker builder prune -a``); layers stay with their images."""
        with self._lock:
            count = len(self._steps)
            self._steps = {}
            self._files.write(self._steps_path, b"{}")
        return count

    def add_image(self, config: dict, build_key: str | None = None) -> str:
        """Store the config; with ``build_key`` an identical earlier build keeps its
        id (and creation time), as BuildKit's cache gives the same image."""
        with self._lock:
            if build_key is not None:
                earlier = self._build_keys.get(build_key)
                if earlier and os.path.exists(self._config_path(earlier)):
                    return earlier
            data = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
            image_id = "sha256:" + hashlib.sha256(data).hexdigest()
            path = self._config_path(image_id)
            if not os.path.exists(path):
                self._files.write(path, data)
            if build_key is not None:
                self._build_keys[build_key] = image_id
                self._files.write(self._keys_path, json.dumps(self._build_keys).encode())
            return image_id

    def tag(self, image_id: str, reference: str) -> None:
        with self._lock:
            self._tags[normalize_tag(reference)] = image_id
            self._files.write(self._tags_path, json.dumps(self._tags, sort_keys=True).encode())

    # -- reading ------------------------------------------------------------
    def _config_path(self, image_id: str) -> str:
        return os.path.join(self.configs, image_id.split(":", 1)[-1] + ".json")

    def resolve(self, reference: str) -> str:
        """An image id for a tag, a full id, or a unique id prefix."""
        with self._lock:
            try:
                tag = normalize_tag(reference)
            except InvalidReference:
                tag = None
            if tag is not None and tag in self._tags:
                return self._tags[tag]
        match = _HEX_ID.match(reference)
        if match:
            prefix = match.group(1)
            found = [name[:-5] for name in os.listdir(self.configs)
                     if name.endswith(".json") and name.startswith(prefix)]
            if len(found) == 1:
                return "sha256:" + found[0]
        raise ImageNotFound(f"No such image: {reference}")

    def get(self, reference: str) -> Image:
        image_id = self.resolve(reference)
        try:
            with open(self._config_path(image_id), "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            raise ImageNotFound(f"No such image: {reference}") from None
        config = json.loads(data)
        size = 0
        for diff_id in config.get("rootfs", {}).get("diff_ids", []):
            try:
                size += os.path.getsize(self.layer_path(diff_id))
            except OSError:
                pass
        return Image(image_id, config, data, size, _unix_time(config.get("created", "")))

    def tags_of(self, image_id: str) -> list[str]:
        with self._lock:
            return sorted(t for t, i in self._tags.items() if i == image_id)

    def all_images(self) -> list[Image]:
        images = []
        for name in sorted(os.listdir(self.configs)):
            if name.endswith(".json"):
                try:
                    images.append(self.get("sha256:" + name[:-5]))
                except (ImageNotFound, ValueError):
                    continue
        return images

    def remove(self, reference: str) -> list[dict]:
        """``docker rmi``: untag, and delete the image once no tag is left."""
        image_id = self.resolve(reference)
        deleted: list[dict] = []
        with self._lock:
            try:
                tag = normalize_tag(reference)
            except InvalidReference:
                tag = None
            if tag in self._tags:
                del self._tags[tag]
                deleted.append({"Untagged": tag})
            else:
                for t in [t for t, i in self._tags.items() if i == image_id]:
                    del self._tags[t]
                    deleted.append({"Untagged": t})
            self._files.write(self._tags_path, json.dumps(self._tags, sort_keys=True).encode())
            if image_id not in self._tags.values():
                try:
                    os.unlink(self._config_path(image_id))
                except FileNotFoundError:
                    pass
                self._build_keys = {k: v for k, v in self._build_keys.items() if v != image_id}
                self._files.write(self._keys_path, json.dumps(self._build_keys).encode())
                deleted.append({"Deleted": image_id})
        return deleted

    # -- API shapes ------------------------------------------------------------
    def summary(self, image: Image) -> dict:
        tags = self.tags_of(image.id)
        return {
            "Containers": 0,
            "Created": image.created_unix,
            "Id": image.id,
            "Labels": image.config.get("config", {}).get("Labels") or None,
            "ParentId": "",
            "RepoDigests": None if tags else ["<none>@<none>"],
            "RepoTags": tags or ["<none>:<none>"],
            "SharedSize": -1,
            "Size": image.size,
            "VirtualSize": image.size,
        }

    def inspect(self, image: Image) -> dict:
        config = image.config
        return {
            "Id": image.id,
            "RepoTags": self.tags_of(image.id),
            "RepoDigests": [],
            "Parent": "",
            "Comment": "buildkit.dockerfile.v0",
            "Created": config.get("created", ""),
            "Container": "",
            "ContainerConfig": {},
            "DockerVersion": "",
            "Author": "",
            "Config": config.get("config", {}),
            "Architecture": config.get("architecture", ""),
            "Os": config.get("os", ""),
            "Size": image.size,
            "VirtualSize": image.size,
            "GraphDriver": {"Name": "reference", "Data": None},
            "RootFS": {"Type": "layers", "Layers": config.get("rootfs", {}).get("diff_ids", [])},
            "Metadata": {"LastTagTime": "0001-01-01T00:00:00Z"},
        }

    def history(self, image: Image) -> list[dict]:
        """``GET /images/{name}/history``: newest entry first, as dockerd lists it; only the top entry
        names an image (the image has no parent images here, so the others are "<missing>")."""
        diff_ids = iter(image.config.get("rootfs", {}).get("diff_ids", []))
        entries = []
        for item in image.config.get("history") or []:
            size = 0
            if not item.get("empty_layer"):
                diff_id = next(diff_ids, None)
                if diff_id is not None:
                    try:
                        size = os.path.getsize(self.layer_path(diff_id))
                    except OSError:
                        pass
            entries.append({"Id": "<missing>", "Created": _unix_time(item.get("created", "")),
                            "CreatedBy": item.get("created_by", ""), "Tags": None, "Size": size,
                            "Comment": item.get("comment", "")})
        entries.reverse()
        if entries:
            entries[0]["Id"] = image.id
            entries[0]["Tags"] = self.tags_of(image.id) or None
        return entries

    def layers_size(self) -> int:
        return sum(os.path.getsize(os.path.join(self.layers, n)) for n in os.listdir(self.layers))


def rfc3339_now() -> str:
    ns = time.time_ns()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 1_000_000_000)) + f".{ns % 1_000_000_000:09d}Z"


def _unix_time(text: str) -> int:
    try:
        return calendar.timegm(time.strptime(text[:19], "%Y-%m-%dT%H:%M:%S"))
    except (ValueError, TypeError):
        return 0
