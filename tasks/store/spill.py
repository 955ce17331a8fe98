"""Per-document metadata spilled to local disk in hash buckets, so a run's memory does not grow with the bucket.

An incremental run compares the whole listing with the whole state and rewrites the state: work proportional to
the number of documents, but not memory. Rows are appended to Arrow IPC files on local disk, one per hash bucket
of their source URI, and each later step reads one bucket at a time. With buckets of about `BUCKET_ROWS` rows the
peak is a bucket's worth whatever the corpus size (up to `MAX_BUCKETS` buckets: beyond ~4M documents buckets grow).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
from pyarrow import ipc

BUCKET_ROWS = 8_192
MAX_BUCKETS = 512
_SEED = 0x5EED


def bucket_count(rows: int) -> int:
    """Buckets for a run over this many documents (at least one)."""
    return max(1, min(MAX_BUCKETS, math.ceil(rows / BUCKET_ROWS)))


def _plain(schema: pa.Schema) -> pa.Schema:
    """The schema as spilled: Arrow IPC files allow one dictionary per column, so dictionaries are decoded."""
    return pa.schema(
        [pa.field(f.name, f.type.value_type if pa.types.is_dictionary(f.type) else f.type) for f in schema]
    )


def _buckets_of(uris: pa.ChunkedArray | pa.Array, buckets: int) -> pa.Array:
    series = pl.from_arrow(uris)
    assert isinstance(series, pl.Series)
    return (series.hash(_SEED) % buckets).cast(pl.Int32).to_arrow()


class BucketSpill:
    """Arrow IPC files on local disk, one per bucket of `key` (a source URI column); append, then read by bucket."""

    def __init__(self, directory: Path, name: str, schema: pa.Schema, buckets: int, key: str) -> None:
        self.directory, self.name, self.schema, self.buckets, self.key = directory, name, schema, buckets, key
        self._disk = _plain(schema)
        self._writers: dict[int, ipc.RecordBatchFileWriter] = {}
        self.rows = 0
        directory.mkdir(parents=True, exist_ok=True)

    def _path(self, bucket: int) -> Path:
        return self.directory / f"{self.name}-{bucket:04d}.arrow"

    def add(self, table: pa.Table) -> None:
        """Append rows, each to its bucket's file."""
        if table.num_rows == 0:
            return
        table = table.cast(self._disk)
        which = _buckets_of(table[self.key], self.buckets)
        for bucket in pc.unique(which).to_pylist():
            part = table.filter(pc.equal(which, bucket))
            writer = self._writers.get(bucket)
            if writer is None:
                writer = self._writers[bucket] = ipc.new_file(str(self._path(bucket)), self._disk)
            writer.write_table(part)
        self.rows += table.num_rows

    def add_batches(self, batches: Iterable[pa.RecordBatch]) -> None:
        for batch in batches:
            self.add(pa.Table.from_batches([batch]))

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()

    def read(self, bucket: int) -> pa.Table:
        """One bucket's rows (empty when none were added); close() first."""
        path = self._path(bucket)
        if not path.exists():
            return self.schema.empty_table()
        with ipc.open_file(str(path)) as reader:
            return reader.read_all().cast(self.schema)


def stream_files(paths: Iterable[Path]) -> Iterator[pa.RecordBatch]:
    """The record batches of Arrow IPC files, in order, one batch in memory at a time."""
    for path in paths:
        if not path.exists():
            continue
        with ipc.open_file(str(path)) as reader:
            for index in range(reader.num_record_batches):
                yield reader.get_batch(index)


class RowSpill:
    """One Arrow IPC file of rows in arrival order (a run's to-do list)."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path, self.schema, self.rows = path, _plain(schema), 0
        self._writer: ipc.RecordBatchFileWriter | None = None

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        if self._writer is None:
            self._writer = ipc.new_file(str(self.path), self.schema)
        self._writer.write_table(table.cast(self.schema))
        self.rows += table.num_rows

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
