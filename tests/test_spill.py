"""Local spill files: bucketing keeps every row exactly once, and a streamed plan cuts exact shards."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pyarrow as pa

from docroute.schemas.documents import LISTING_SCHEMA
from docroute.tasks.store.plan import RunPlan
from docroute.tasks.store.spill import BUCKET_ROWS, MAX_BUCKETS, BucketSpill, RowSpill, bucket_count
from docroute.tasks.store.state import STATE_SCHEMA


def _listing(start: int, count: int) -> pa.Table:
    return pa.table(
        {
            "uri": [f"s3://b/doc-{i:06d}.txt" for i in range(start, start + count)],
            "path": [f"b/doc-{i:06d}.txt" for i in range(start, start + count)],
            "size": list(range(start, start + count)),
            "etag": [f"etag-{i}" for i in range(start, start + count)],
        },
        schema=LISTING_SCHEMA,
    )


def test_bucket_count_grows_with_documents_up_to_a_cap() -> None:
    assert bucket_count(0) == 1 and bucket_count(BUCKET_ROWS) == 1 and bucket_count(BUCKET_ROWS + 1) == 2
    assert bucket_count(10**9) == MAX_BUCKETS


def test_every_row_lands_in_exactly_one_bucket_and_the_same_uri_always_in_the_same(tmp_path: Path) -> None:
    spill = BucketSpill(tmp_path, "listed", LISTING_SCHEMA, 7, "uri")
    spill.add(_listing(0, 500))
    spill.add(_listing(500, 300))
    spill.close()
    buckets = [spill.read(b) for b in range(7)]
    uris = [u for t in buckets for u in t["uri"].to_pylist()]
    assert sorted(uris) == sorted(_listing(0, 800)["uri"].to_pylist()) and spill.rows == 800
    again = BucketSpill(tmp_path / "again", "listed", LISTING_SCHEMA, 7, "uri")
    again.add(_listing(0, 800))
    again.close()
    assert [again.read(b)["uri"].to_pylist() for b in range(7)] == [t["uri"].to_pylist() for t in buckets]


def test_dictionary_columns_survive_the_spill(tmp_path: Path) -> None:
    table = pa.table(
        {f.name: pa.array([None, None], pa.string()) for f in STATE_SCHEMA if f.name not in ("retry", "processed_at")}
        | {"retry": pa.array([True, False]), "processed_at": pa.array([None, None], pa.timestamp("us", tz="UTC"))}
    )
    table = table.set_column(table.schema.get_field_index("source_uri"), "source_uri", pa.array(["a", "b"]))
    table = table.set_column(table.schema.get_field_index("part_url"), "part_url", pa.array(["p1", "p2"]))
    spill = BucketSpill(tmp_path, "state", STATE_SCHEMA, 2, "source_uri")
    spill.add(table.select(STATE_SCHEMA.names).cast(STATE_SCHEMA))
    spill.add(table.select(STATE_SCHEMA.names).cast(STATE_SCHEMA))  # a second batch with its own dictionaries
    spill.close()
    back = pa.concat_tables([spill.read(0), spill.read(1)])
    assert back.schema == STATE_SCHEMA and sorted(back["part_url"].to_pylist()) == ["p1", "p1", "p2", "p2"]


def test_a_streamed_plan_cuts_exact_shards_across_files_and_batches(tmp_path: Path) -> None:
    files = []
    for name, start, count in (("retry", 0, 5), ("fresh", 5, 23)):
        spill = RowSpill(tmp_path / f"{name}.arrow", LISTING_SCHEMA)
        spill.add(_listing(start, count - 3))
        spill.add(_listing(start + count - 3, 3))
        spill.close()
        files.append(spill.path)
    plan = RunPlan("p", date(2026, 1, 1), "h", 4, todo_files=files, todo_rows=28)
    shards = list(plan.shards())
    assert plan.shard_count() == len(shards) == 7
    assert [s.index for s in shards] == list(range(7)) and [s.size for s in shards] == [4] * 7
    assert [r.uri for s in shards for r in s.refs] == _listing(0, 28)["uri"].to_pylist()
