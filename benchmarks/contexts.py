"""Deterministic benchmark trees: many small files, a few large ones, some nesting.

The same (files, megabytes, seed) always gives the same paths, sizes, modes and
contents (not mtimes).  Contents are random bytes, so nothing downstream gains
from compression or deduplication.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass

DOCKERFILE = "FROM scratch\nCOPY . /\n"
DEFAULT_SEED = 20101

_SMALL_MEDIAN = 2048  # bytes; source trees are mostly files of a few KiB
_SMALL_MAX = 64 * 1024
_SMALL_EXTENSIONS = (".py", ".go", ".txt", ".json", ".md", ".yaml", ".c", ".h")
_LARGE_EXTENSIONS = (".bin", ".tar", ".so", ".pack")


@dataclass
class TreeInfo:
    root: str
    files: int
    total_bytes: int
    directories: int
    large_files: int
    change_target: str  # relative path of a mid-sized file, rewritten for "one file changed"

    def describe(self) -> str:
        return (f"{self.files} files in {self.directories} directories, {self.total_bytes / 1e6:.1f} MB "
                f"({self.large_files} large files)")


def _plan(files: int, total_bytes: int, rng: random.Random) -> tuple[list[int], int]:
    """File sizes: ~2% large files carry most bytes, the rest log-normal around 2 KiB."""
    if files <= 0:
        return [], 0
    large = max(1, files // 50) if files > 1 else 1
    small = files - large
    small_sizes = []
    for i in range(small):
        if i % 100 == 7:
            small_sizes.append(0)  # a few empty files, as real trees have
        else:
            size = int(rng.lognormvariate(math.log(_SMALL_MEDIAN), 1.3))
            small_sizes.append(min(size, _SMALL_MAX))
    budget_small = total_bytes // 2
    if sum(small_sizes) > budget_small:
        scale = budget_small / sum(small_sizes)
        small_sizes = [int(s * scale) for s in small_sizes]
    remaining = max(total_bytes - sum(small_sizes), 0)
    weights = [min(rng.paretovariate(1.5), 20.0) for _ in range(large)]
    large_sizes = [int(remaining * w / sum(weights)) for w in weights]
    large_sizes[0] += remaining - sum(large_sizes)
    sizes = small_sizes + large_sizes
    order = list(range(files))
    rng.shuffle(order)
    return [sizes[i] for i in order], large


def _directories(count: int, rng: random.Random) -> list[str]:
    """Relative directory paths, nested up to 4 deep."""
    dirs: list[str] = []
    for i in range(count):
        candidates = [d for d in dirs if d.count("/") < 3]
        if candidates and rng.random() < 0.6:
            dirs.append(f"{rng.choice(candidates)}/d{i:03d}")
        else:
            dirs.append(f"d{i:03d}")
    return dirs


def generate_tree(root: str, files: int, megabytes: float, *, seed: int = DEFAULT_SEED,
                  dockerfile: bool = False) -> TreeInfo:
    """Write the tree under ``root`` (created; must not exist or be empty)."""
    rng = random.Random(f"{seed}:{files}:{megabytes}")
    total_bytes = int(megabytes * 1024 * 1024)
    sizes, large_count = _plan(files, total_bytes, rng)
    dirs = _directories(max(3, files // 100), rng)
    os.makedirs(root, exist_ok=True)
    for d in dirs:
        os.makedirs(os.path.join(root, d), exist_ok=True)
    large_threshold = sorted(sizes, reverse=True)[large_count - 1] if sizes else 0
    change_target = ""
    written = 0
    for i, size in enumerate(sizes):
        directory = "" if rng.random() < 0.05 else rng.choice(dirs)
        is_large = size >= large_threshold and size > _SMALL_MAX
        ext = rng.choice(_LARGE_EXTENSIONS if is_large else _SMALL_EXTENSIONS)
        rel = f"{directory}/f{i:05d}{ext}" if directory else f"f{i:05d}{ext}"
        path = os.path.join(root, rel)
        with open(path, "wb") as fh:
            fh.write(rng.randbytes(size))
        os.chmod(path, 0o755 if rng.random() < 0.05 else 0o644)
        written += size
        if not change_target and 4096 <= size <= _SMALL_MAX:
            change_target = rel
    if not change_target and sizes:
        change_target = rel
    if dockerfile:
        with open(os.path.join(root, "Dockerfile"), "w") as fh:
            fh.write(DOCKERFILE)
    return TreeInfo(root, files, written, len(dirs), large_count, change_target)


def preread(root: str) -> int:
    """Read every file once, so that every measured run finds the source in the page cache."""
    total = 0
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            with open(path, "rb", buffering=0) as fh:
                while chunk := fh.read(1 << 20):
                    total += len(chunk)
    return total


def rewrite_file(root: str, rel: str, generation: int) -> None:
    """New contents of the same size and a later mtime: a "one file changed" edit."""
    path = os.path.join(root, rel)
    size = os.path.getsize(path)
    old_mtime = os.stat(path).st_mtime_ns
    with open(path, "r+b") as fh:
        fh.write(random.Random(f"edit:{generation}").randbytes(size))
    new_mtime = max(time.time_ns(), old_mtime + 1_000_000)
    os.utime(path, ns=(new_mtime, new_mtime))
