"""reference/plain.py gives what dataclasses.asdict gives, for the project's records."""

import dataclasses

from reference.client.services import StreamStats
from reference.daemon.builder import BuildRecord
from reference.daemon.cache import EntryMeta
from reference.plain import plain


def test_plain_equals_asdict_for_the_records_it_serves():
    record = BuildRecord("b", "s", "2", protocol="diffcopy", streams=[{"a": [1, 2], "b": {"c": None}}],
                         export={"type": "local"}, image_id="sha256:x")
    meta = EntryMeta("id", "key", "context", "context", 1.5, 2.5, 3, 4)
    for value in (record, meta):
        assert plain(value) == dataclasses.asdict(value)
    fields = {f.name: None for f in dataclasses.fields(StreamStats)}
    stats = StreamStats(**{**fields, **{k: 0 for k, f in fields.items()}})
    assert plain(stats) == dataclasses.asdict(stats)


def test_plain_copies_containers_so_the_record_can_change_afterwards():
    record = BuildRecord("b", "s", "2", streams=[{"a": 1}])
    out = plain(record)
    record.streams[0]["a"] = 2
    assert out["streams"] == [{"a": 1}]
