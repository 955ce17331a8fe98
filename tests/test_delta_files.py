"""The current table's Delta files as docroute writes them (tasks/store/delta_files.py): bounded row groups, exact
statistics, a merge that leaves files without a changed document alone, added columns, and what readers see."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable, Schema
from deltalake.transaction import create_table_with_add_actions
from fsspec.implementations.local import LocalFileSystem

from docroute.schemas.rows import UTC_MICROS
from docroute.schemas.spec import OutputSpec
from docroute.tasks.store.delta_files import ROW_GROUP_ROWS, DeltaFileWriter
from docroute.tasks.store.table import APP_ID, Commit, DeltaCurrentTable

SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string()),
        pa.field("label", pa.string()),
        pa.field("amount", pa.int64()),
        pa.field("deleted_at", UTC_MICROS),
    ]
)


def _rows(ids: range, label: str, schema: pa.Schema = SCHEMA) -> pa.RecordBatchReader:
    columns = {
        "doc_id": [f"doc-{i:06d}" for i in ids],
        "label": [label] * len(ids),
        "amount": [i if i % 7 else None for i in ids],
        "deleted_at": [None] * len(ids),
    }
    if "note" in schema.names:
        columns["note"] = ["added"] * len(ids)
    table = pa.table(columns, schema=schema)
    return pa.RecordBatchReader.from_batches(schema, table.to_batches(max_chunksize=500))


def _table_files(root: Path) -> set[str]:
    """The files the table's current version holds."""
    return set(pa.table(DeltaTable(str(root)).get_add_actions(flatten=True))["path"].to_pylist())


def test_files_have_bounded_row_groups_exact_statistics_and_roll_over(tmp_path: Path) -> None:
    root = tmp_path / "t"
    root.mkdir()
    written = DeltaFileWriter(LocalFileSystem(), str(root), SCHEMA, target_bytes=1).write(_rows(range(40_000), "a"))
    assert [f.rows for f in written] == [ROW_GROUP_ROWS, ROW_GROUP_ROWS, 40_000 - 2 * ROW_GROUP_ROWS]
    for file in written:
        parquet = pq.ParquetFile(root / file.path)
        assert parquet.metadata.num_row_groups == 1 and parquet.metadata.num_rows == file.rows
        assert file.size == (root / file.path).stat().st_size
    stats = json.loads(written[0].stats)
    assert stats["numRecords"] == ROW_GROUP_ROWS
    assert stats["minValues"]["doc_id"] == "doc-000000"
    assert stats["maxValues"]["doc_id"] == f"doc-{ROW_GROUP_ROWS - 1:06d}"
    assert stats["nullCount"]["amount"] == len(range(0, ROW_GROUP_ROWS, 7))
    assert stats["nullCount"]["deleted_at"] == ROW_GROUP_ROWS and "deleted_at" not in stats["minValues"]

    adds = [f.add_action() for f in written]
    create_table_with_add_actions(str(root), Schema.from_arrow(SCHEMA), adds, mode="error")
    table = DeltaTable(str(root))
    adds = pa.table(table.get_add_actions(flatten=True))
    assert adds["num_records"].to_pylist() == [f.rows for f in written]
    assert pl.read_delta(str(root)).height == 40_000  # polars reads the statistics and the files


def test_a_merge_replaces_changed_rows_inserts_new_ones_and_records_the_run(tmp_path: Path) -> None:
    output = OutputSpec(url=str(tmp_path / "out"))
    root = Path(output.layout.current_table())
    DeltaCurrentTable(output).rewrite(_rows(range(3_000), "old"), Commit("r1", 1, "m1"))
    files = _table_files(root)
    changed = ["doc-000005", "doc-002999", "doc-900000"]  # two changed, one new
    source = pa.table(
        {"doc_id": changed, "label": ["new"] * 3, "amount": [1, 2, 3], "deleted_at": pa.array([None] * 3, UTC_MICROS)},
        schema=SCHEMA,
    )
    DeltaCurrentTable(output).merge(
        pa.RecordBatchReader.from_batches(SCHEMA, source.to_batches()), pa.array(changed), Commit("r2", 2, "m2")
    )
    after = DeltaTable(str(root))
    assert after.transaction_version(APP_ID) == 2
    rows = pl.read_delta(str(root)).sort("doc_id")
    assert rows.height == 3_001 and rows["doc_id"].n_unique() == 3_001
    assert rows.filter(pl.col("label") == "new")["doc_id"].to_list() == changed
    assert _table_files(root).isdisjoint(files)  # the one file held changed documents: replaced
    assert after.history(1)[0]["docroute_operation"] == "merge"
    assert (
        pl.read_delta(str(root), version=after.version() - 1).filter(pl.col("doc_id") == "doc-000005")["label"].item()
        == "old"
    )  # time travel: the answer before the run


def test_untouched_files_stay_and_an_added_field_is_a_null_column(tmp_path: Path) -> None:
    output = OutputSpec(url=str(tmp_path / "out"))
    root = Path(output.layout.current_table())
    DeltaCurrentTable(output).rewrite(_rows(range(100), "a"), Commit("r1", 1, "m1"))
    DeltaCurrentTable(output).merge(_rows(range(100, 200), "b"), pa.array([], pa.string()), Commit("r2", 2, "m2"))
    kept = _table_files(root)
    assert len(kept) == 2  # new documents only: the first file is not rewritten

    wider = SCHEMA.append(pa.field("note", pa.string()))
    changed = pa.array([f"doc-{i:06d}" for i in range(150, 160)])
    DeltaCurrentTable(output).merge(_rows(range(150, 160), "c", wider), changed, Commit("r3", 3, "m3"))
    table = DeltaTable(str(root))
    assert "note" in pa.schema(table.schema().to_arrow()).names and table.transaction_version(APP_ID) == 3
    assert len(kept & _table_files(root)) == 1  # the file of documents 0-99 was left alone
    rows = pl.read_delta(str(root)).sort("doc_id")
    assert rows.height == 200
    assert rows.filter(pl.col("note").is_not_null())["doc_id"].to_list() == [f"doc-{i:06d}" for i in range(150, 160)]
    assert rows.filter(pl.col("doc_id") == "doc-000003")["label"].item() == "a"


def test_an_empty_merge_still_records_the_run(tmp_path: Path) -> None:
    output = OutputSpec(url=str(tmp_path / "out"))
    root = Path(output.layout.current_table())
    DeltaCurrentTable(output).rewrite(_rows(range(10), "a"), Commit("r1", 1, "m1"))
    DeltaCurrentTable(output).merge(_rows(range(0), "a"), pa.array([], pa.string()), Commit("r2", 2, "m2"))
    assert DeltaTable(str(root)).transaction_version(APP_ID) == 2
    assert pl.read_delta(str(root)).height == 10


@pytest.mark.parametrize("empty", [True, False])
def test_a_rewrite_replaces_every_row_and_can_change_a_type(tmp_path: Path, empty: bool) -> None:
    output = OutputSpec(url=str(tmp_path / "out"))
    root = Path(output.layout.current_table())
    DeltaCurrentTable(output).rewrite(_rows(range(50), "a"), Commit("r1", 1, "m1"))
    retyped = pa.schema([pa.field("doc_id", pa.string()), pa.field("amount", pa.string())])
    rows = pa.table({"doc_id": [] if empty else ["x"], "amount": [] if empty else ["12.50"]}, schema=retyped)
    source = pa.RecordBatchReader.from_batches(retyped, rows.to_batches())
    DeltaCurrentTable(output).rewrite(source, Commit("r2", 2, "m2"))
    table = DeltaTable(str(root))
    assert table.transaction_version(APP_ID) == 2
    assert pa.schema(table.schema().to_arrow()).field("amount").type in (pa.string(), pa.large_string())
    assert pl.read_delta(str(root)).height == (0 if empty else 1)
