"""Dataclasses as plain values (dicts, lists, scalars) for JSON: what ``dataclasses.asdict`` gives, without
its deep copy of every leaf, which cost a daemon about a millisecond a build record and most of each
cache-entry write. The records are the project's own, a few levels deep; their leaves are scalars, lists,
tuples and dicts."""

from __future__ import annotations

import dataclasses


def plain(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value
