"""The current table's Delta commits, written with bounded memory: Parquet files by pyarrow, one transaction by
delta-rs.

delta-rs's own `write_deltalake` and `MERGE` run through DataFusion, whose memory grows with the *table*, not with
what changed (measured with every column of a docroute table, fresh process per point: a MERGE of 10% of the rows
peaked +76 / +183 / +266 MiB at 10k / 100k / 300k documents, a streamed overwrite +110 / +284 / +419 MiB; capping
DataFusion's pool only made it fail). So the table's files are written here, a row group at a time
(`ROW_GROUP_ROWS`), rolled over at `target_bytes`, straight to the table's folder through the output's fsspec
filesystem, and delta-rs only commits them: `create_write_transaction` with the add and remove actions, which is
the same single put-if-absent of one log entry as its MERGE, with the same app transaction recording the run.

A merge reads only each existing file's `doc_id` column to find the files holding a changed document; those are
rewritten without the changed rows (one row group in memory at a time) and removed, the others are left alone,
and the changed documents' current rows are added as new files. Files written by a commit that never happened (a
crash before it) are in no log entry, so no reader sees them; Delta's vacuum removes them.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

ROW_GROUP_ROWS = 16_384
"""Rows per Parquet row group in the table's files. delta-rs (parquet-rs) defaults to 1,048,576, so a table of a
few hundred thousand documents was one row group (measured at 100k), which readers must decode whole. A bounded
group keeps the writer's buffer and every reader's flat, and is still large enough for warehouse scans."""

_STATS_TYPES = (pa.types.is_integer, pa.types.is_string, pa.types.is_large_string)
"""Columns whose min and max go into a file's Delta statistics; their JSON form is exact (timestamps, dates and
decimals would need Delta's own string forms, and a truncated maximum would wrongly skip files, so they get null
counts only)."""


@dataclass(frozen=True, slots=True)
class WrittenFile:
    """A Parquet file written into the table's folder: its path relative to the table, size and statistics."""

    path: str
    size: int
    rows: int
    stats: str  # Delta's per-file statistics JSON: numRecords, nullCount, minValues, maxValues

    def add_action(self) -> Any:
        from deltalake.transaction import AddAction

        return AddAction(self.path, self.size, {}, int(time.time() * 1000), True, self.stats)


class _Stats:
    """Delta statistics of one file, gathered batch by batch while it is written."""

    def __init__(self, schema: pa.Schema) -> None:
        self._flat = [f.name for f in schema if not pa.types.is_nested(f.type)]
        self._ranged = {f.name for f in schema if any(test(f.type) for test in _STATS_TYPES)}
        self.rows = 0
        self._nulls = dict.fromkeys(self._flat, 0)
        self._min: dict[str, Any] = {}
        self._max: dict[str, Any] = {}

    def add(self, batch: pa.RecordBatch) -> None:
        self.rows += batch.num_rows
        for name in self._flat:
            column = batch.column(name)
            self._nulls[name] += column.null_count
            if name in self._ranged and column.null_count < len(column):
                low, high = pc.min_max(column).values()
                low, high = low.as_py(), high.as_py()
                self._min[name] = low if name not in self._min else min(self._min[name], low)
                self._max[name] = high if name not in self._max else max(self._max[name], high)

    def json(self) -> str:
        return json.dumps(
            {"numRecords": self.rows, "minValues": self._min, "maxValues": self._max, "nullCount": self._nulls},
            separators=(",", ":"),
        )


class DeltaFileWriter:
    """Writes record batches as the table's Parquet files: row groups of `ROW_GROUP_ROWS`, a new file once one
    passes `target_bytes`. Memory: one row group being assembled, plus what the filesystem buffers per file."""

    def __init__(self, fs: AbstractFileSystem, root: str, schema: pa.Schema, target_bytes: int) -> None:
        self._fs, self._root, self._schema, self._target = fs, root.rstrip("/"), schema, target_bytes
        self.files: list[WrittenFile] = []

    def write(self, batches: Iterable[pa.RecordBatch]) -> list[WrittenFile]:
        """Write every batch (in the writer's schema); returns the files written by this call."""
        first = len(self.files)
        pending: list[pa.RecordBatch] = []
        pending_rows = 0
        sink: _OpenFile | None = None
        try:
            for batch in batches:
                if batch.num_rows == 0:
                    continue
                pending.append(batch)
                pending_rows += batch.num_rows
                while pending_rows >= ROW_GROUP_ROWS:  # exactly one row group per write (slices are not copies)
                    rows = pa.Table.from_batches(pending, schema=self._schema)
                    sink = self._write_group(sink, rows.slice(0, ROW_GROUP_ROWS))
                    rest = rows.slice(ROW_GROUP_ROWS)
                    pending, pending_rows = rest.to_batches(), rest.num_rows
            if pending_rows:
                sink = self._write_group(sink, pa.Table.from_batches(pending, schema=self._schema))
            if sink is not None:
                self.files.append(sink.close())
                sink = None
        finally:
            if sink is not None:  # an error mid-file: close what is open; the file is in no commit
                sink.abort()
        return self.files[first:]

    def _write_group(self, sink: _OpenFile | None, rows: pa.Table) -> _OpenFile | None:
        """Write one row group, opening a file first when none is open; the file is closed once it reaches the
        target size (the next group opens a new one)."""
        if sink is None:
            sink = _OpenFile(self._fs, self._root, self._schema)
        sink.write(rows)
        if sink.bytes_written() >= self._target:
            self.files.append(sink.close())
            return None
        return sink


class _OpenFile:
    """One table file being written."""

    def __init__(self, fs: AbstractFileSystem, root: str, schema: pa.Schema) -> None:
        self.name = f"part-00000-{uuid.uuid4()}-c000.snappy.parquet"
        self._fs, self._path = fs, f"{root}/{self.name}"
        self._handle = fs.open(self._path, "wb")
        self._writer = pq.ParquetWriter(self._handle, schema, compression="snappy")
        self._stats = _Stats(schema)

    def write(self, table: pa.Table) -> None:
        for batch in table.to_batches():
            self._stats.add(batch)
        self._writer.write_table(table, row_group_size=ROW_GROUP_ROWS)

    def bytes_written(self) -> int:
        return int(self._handle.tell())

    def close(self) -> WrittenFile:
        self._writer.close()
        self._handle.close()
        return WrittenFile(self.name, int(self._fs.size(self._path)), self._stats.rows, self._stats.json())

    def abort(self) -> None:
        try:
            self._writer.close()
            self._handle.close()
        except Exception:  # the file is in no commit either way
            pass


def files_with_documents(fs: AbstractFileSystem, root: str, files: Iterable[str], doc_ids: pa.Array) -> Iterator[str]:
    """The table files (paths relative to `root`) holding any of `doc_ids`; only each file's `doc_id` column is
    read, one row group at a time."""
    for name in files:
        with fs.open(f"{root.rstrip('/')}/{name}", "rb") as handle:
            parquet = pq.ParquetFile(handle)
            for group in range(parquet.num_row_groups):
                column = parquet.read_row_group(group, columns=["doc_id"])["doc_id"]
                if pc.any(pc.is_in(pc.cast(column, pa.string()), value_set=doc_ids)).as_py():
                    yield name
                    break


def rows_without(
    fs: AbstractFileSystem, root: str, files: Iterable[str], doc_ids: pa.Array, schema: pa.Schema
) -> Iterator[pa.RecordBatch]:
    """The rows of table files less those of `doc_ids`, in `schema` (columns a file lacks, added to the table after
    it was written, as nulls), one row group at a time."""
    for name in files:
        with fs.open(f"{root.rstrip('/')}/{name}", "rb") as handle:
            parquet = pq.ParquetFile(handle)
            for group in range(parquet.num_row_groups):
                rows = parquet.read_row_group(group)
                rows = rows.filter(pc.invert(pc.is_in(pc.cast(rows["doc_id"], pa.string()), value_set=doc_ids)))
                columns = [
                    pc.cast(rows[f.name], f.type) if f.name in rows.column_names else pa.nulls(rows.num_rows, f.type)
                    for f in schema
                ]
                yield from pa.table(columns, schema=schema).to_batches()


def target_file_bytes(megabytes: float) -> int:
    """A target file size in bytes, at least one row group's worth of a small table (1 MiB)."""
    return max(2**20, math.ceil(megabytes * 2**20))
