"""Tests for schemas/rows.py: the Arrow schema a job's results get, and that Parquet readers see the declared types."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from docroute import __version__
from docroute.schemas.columns import PROVENANCE_COLUMNS
from docroute.schemas.outcomes import DocumentErrorCode, RouteOutcome
from docroute.schemas.rows import ResultRow, answer_json, arrow_type, result_schema, rows_to_table
from docroute.schemas.spec import FieldSpec, JobSpec

_FIELDS: list[dict[str, Any]] = [
    {"name": "total", "type": "decimal", "precision": 12, "scale": 2},
    {"name": "invoice_date", "type": "date"},
    {"name": "paid_at", "type": "datetime"},
    {"name": "tags", "type": "list[str]"},
    {"name": "currency", "type": "enum", "values": ["USD", "EUR"]},
    {"name": "paid", "type": "bool"},
    {"name": "lines", "type": "int"},
    {"name": "rate", "type": "float"},
    {"name": "vendor", "type": "str", "required": False},
]

_LEADING = [
    "doc_id",
    "source_uri",
    "record_key",
    "content_sha256",
    "source_etag",
    "doc_format",
    "run_id",
    "spec_hash",
    "processed_at",
    "route",
    "route_outcome",
    "route_reason",
]
_TRAILING = [
    "confidence",
    "small_model",
    "final_model",
    "small_answer",
    "input_tokens",
    "output_tokens",
    "small_input_tokens",
    "small_output_tokens",
    "frontier_input_tokens",
    "frontier_output_tokens",
    "small_cost_usd",
    "frontier_cost_usd",
    "cost_usd",
    "engine_seconds",
    "error",
    "error_code",
    "truncated",
    "audited",
    "audit_agrees",
    "input_chars",
    "pages",
    "ocr_pages",
    "ocr_confidence",
    "ocr_unread_pages",
    "router_version",
]
_FIELD_NAMES = [f["name"] for f in _FIELDS]


def _spec(classify: bool = True, extract: bool = True) -> JobSpec:
    task: dict[str, Any] = {}
    if classify:
        task["classify"] = {"labels": [{"name": "invoice"}, {"name": "receipt"}, {"name": "other"}]}
    if extract:
        task["extract"] = {"fields": _FIELDS}
    return JobSpec.model_validate(
        {"name": "rows-test", "source": {"url": "memory://in"}, "output": {"url": "memory://out"}, "task": task}
    )


_PROCESSED = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)


def _full_row(spec: JobSpec) -> ResultRow:
    return ResultRow(
        doc_id="d1",
        source_uri="s3://in/a.txt",
        run_id="run-1",
        spec_hash=spec.spec_hash(),
        processed_at=_PROCESSED,
        route="frontier",
        route_reason="low confidence: total 0.400 < 0.800",
        route_outcome=RouteOutcome.ANSWERED_BY_FRONTIER,
        record_key="7",
        content_sha256="ab" * 32,
        doc_format="txt",
        label="receipt",
        label_confidence=0.91,
        fields={
            "total": Decimal("1060.50"),
            "invoice_date": date(2023, 10, 17),
            "paid_at": datetime(2023, 10, 18, 9, 30, tzinfo=UTC),
            "tags": ["oak", "fitting"],
            "currency": "EUR",
            "paid": True,
            "lines": 3,
            "rate": 0.25,
            "vendor": "Alder & Finch",
        },
        field_confidences={"total": 0.4, "invoice_date": 0.95, "vendor": None},
        confidence=0.4,
        small_model="llamacpp:gemma",
        final_model="gpt-4o-mini",
        small_answer={"label": "receipt", "fields": {"total": "1060.50"}},
        small_input_tokens=100,
        small_output_tokens=10,
        frontier_input_tokens=400,
        frontier_output_tokens=40,
        small_cost_usd=0.25,
        frontier_cost_usd=0.5,
        engine_seconds=1.5,
        truncated=True,
        input_chars=1234,
        pages=3,
        ocr_pages=2,
        ocr_confidence=0.875,
        ocr_unread_pages=1,
        router_version="r1",
    )


def _error_row(spec: JobSpec) -> ResultRow:
    return ResultRow(
        doc_id="d2",
        source_uri="s3://in/b.pdf",
        run_id="run-1",
        spec_hash=spec.spec_hash(),
        processed_at=_PROCESSED,
        route="error",
        route_reason="parse failed",
        route_outcome=RouteOutcome.UNREADABLE,
        doc_format="pdf",
        error="pdf_encrypted: the PDF is encrypted",
        error_code=DocumentErrorCode.PDF_ENCRYPTED,
    )


# --------------------------------------------------------------------------------------------------------------------
# arrow_type and result_schema


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"type": "str"}, pa.string()),
        ({"type": "int"}, pa.int64()),
        ({"type": "float"}, pa.float64()),
        ({"type": "decimal"}, pa.decimal128(18, 2)),
        ({"type": "decimal", "precision": 12, "scale": 4}, pa.decimal128(12, 4)),
        ({"type": "date"}, pa.date32()),
        ({"type": "datetime"}, pa.timestamp("us", tz="UTC")),
        ({"type": "bool"}, pa.bool_()),
        ({"type": "enum", "values": ["a", "b"]}, pa.dictionary(pa.int32(), pa.string())),
        ({"type": "list[str]"}, pa.list_(pa.string())),
    ],
)
def test_arrow_type(options: dict[str, Any], expected: pa.DataType) -> None:
    assert arrow_type(FieldSpec(name="x", **options)) == expected


def test_schema_columns_and_order_for_classify_and_extract() -> None:
    schema = result_schema(_spec())
    expected = [
        *_LEADING,
        "label",
        "label_confidence",
        *_FIELD_NAMES,
        *[f"{n}_confidence" for n in _FIELD_NAMES],
        *_TRAILING,
    ]
    assert schema.names == expected


def test_schema_for_classify_only_and_extract_only() -> None:
    assert result_schema(_spec(extract=False)).names == [*_LEADING, "label", "label_confidence", *_TRAILING]
    extract_only = result_schema(_spec(classify=False))
    assert extract_only.names == [*_LEADING, *_FIELD_NAMES, *[f"{n}_confidence" for n in _FIELD_NAMES], *_TRAILING]
    assert "label" not in extract_only.names


def test_provenance_columns_are_exactly_the_non_field_columns() -> None:
    names = set(result_schema(_spec()).names)
    field_columns = set(_FIELD_NAMES) | {f"{n}_confidence" for n in _FIELD_NAMES}
    assert names - field_columns == set(PROVENANCE_COLUMNS)


def test_schema_types() -> None:
    schema = result_schema(_spec())
    category = pa.dictionary(pa.int32(), pa.string())
    small_category = pa.dictionary(pa.int8(), pa.string())
    utc = pa.timestamp("us", tz="UTC")
    expected = {
        "doc_id": pa.string(),
        "doc_format": small_category,
        "route": small_category,
        "processed_at": utc,
        "label": category,
        "label_confidence": pa.float64(),
        "total": pa.decimal128(12, 2),
        "invoice_date": pa.date32(),
        "paid_at": utc,
        "tags": pa.list_(pa.string()),
        "currency": category,
        "paid": pa.bool_(),
        "lines": pa.int64(),
        "rate": pa.float64(),
        "vendor": pa.string(),
        "total_confidence": pa.float64(),
        "vendor_confidence": pa.float64(),
        "confidence": pa.float64(),
        "input_tokens": pa.int64(),
        "cost_usd": pa.float64(),
        "truncated": pa.bool_(),
        "audited": pa.bool_(),
        "audit_agrees": pa.bool_(),
        "input_chars": pa.int64(),
        "small_answer": pa.string(),
    }
    for name, kind in expected.items():
        assert schema.field(name).type == kind, name
    assert all(field.nullable for field in schema)


def test_schema_metadata_and_descriptions() -> None:
    spec = _spec()
    schema = result_schema(spec)
    assert schema.metadata == {
        b"docroute.version": __version__.encode(),
        b"docroute.job": b"rows-test",
        b"docroute.spec_hash": spec.spec_hash().encode(),
    }
    assert schema.field("total_confidence").metadata == {b"description": b"small-model confidence of total"}
    assert schema.field("label").metadata == {b"description": b"the chosen label"}
    # a field without a description carries no metadata
    assert schema.field("total").metadata is None
    assert schema.field("small_input_tokens").metadata is None


def test_schema_is_stable() -> None:
    assert result_schema(_spec()).equals(result_schema(_spec()), check_metadata=True)


# --------------------------------------------------------------------------------------------------------------------
# ResultRow


def test_unknown_route_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown route 'maybe'"):
        ResultRow(
            doc_id="d",
            source_uri="u",
            run_id="r",
            spec_hash="h",
            processed_at=_PROCESSED,
            route="maybe",
            route_reason="",
            route_outcome=RouteOutcome.KEPT,
        )


def test_to_record_sums_tokens_and_cost_and_serialises_the_answer() -> None:
    spec = _spec()
    record = _full_row(spec).to_record(spec)
    assert set(record) == set(result_schema(spec).names)
    assert record["input_tokens"] == 500
    assert record["output_tokens"] == 50
    assert record["cost_usd"] == 0.75
    assert record["small_answer"] == '{"fields": {"total": "1060.50"}, "label": "receipt"}'
    assert record["total"] == Decimal("1060.50")
    assert record["total_confidence"] == 0.4
    assert record["tags_confidence"] is None  # no confidence given: null
    assert record["label"] == "receipt"


def test_to_record_leaves_task_columns_out_when_the_task_lacks_them() -> None:
    spec = _spec(classify=False)
    record = _full_row(spec).to_record(spec)
    assert "label" not in record
    assert "label_confidence" not in record
    assert record["vendor"] == "Alder & Finch"


def test_error_row_defaults() -> None:
    spec = _spec()
    record = _error_row(spec).to_record(spec)
    assert record["small_answer"] is None
    assert record["total"] is None
    assert record["tags"] is None
    assert record["input_tokens"] == 0
    assert record["cost_usd"] == 0.0
    assert record["truncated"] is False
    assert record["error"] == "pdf_encrypted: the PDF is encrypted"


def test_rows_to_table_types_and_empty_table() -> None:
    spec = _spec()
    table = rows_to_table([_full_row(spec), _error_row(spec)], spec)
    assert table.schema.equals(result_schema(spec), check_metadata=True)
    assert table.num_rows == 2
    assert table.column("total").to_pylist() == [Decimal("1060.50"), None]
    assert table.column("route").to_pylist() == ["frontier", "error"]
    empty = rows_to_table([], spec)
    assert empty.num_rows == 0
    assert empty.schema.equals(result_schema(spec), check_metadata=True)


def test_rows_to_table_rejects_a_value_of_the_wrong_type() -> None:
    spec = _spec()
    row = _full_row(spec)
    row.fields["lines"] = "three"
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)):
        rows_to_table([row], spec)


def test_answer_json() -> None:
    answer = answer_json(
        "invoice",
        0.9,
        {"total": Decimal("1.50"), "d": date(2024, 1, 2), "tags": ["a"], "n": 3, "missing": None},
        {"total": 0.8, "d": None},
    )
    assert answer == {
        "label": "invoice",
        "label_confidence": 0.9,
        "fields": {"total": "1.50", "d": "2024-01-02", "tags": ["a"], "n": 3, "missing": None},
        "field_confidences": {"total": 0.8, "d": None},
    }
    json.dumps(answer)  # plain JSON types only
    assert answer_json(None, None, {}, {}) == {}
    assert answer_json(None, None, {"t": datetime(2024, 1, 2, tzinfo=UTC)}, {"t": 0.5}) == {
        "fields": {"t": "2024-01-02T00:00:00+00:00"},
        "field_confidences": {"t": 0.5},
    }


# --------------------------------------------------------------------------------------------------------------------
# Parquet round trip: the types warehouses see


@pytest.fixture(scope="module")
def parquet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = _spec()
    path = tmp_path_factory.mktemp("rows") / "results.parquet"
    pq.write_table(rows_to_table([_full_row(spec), _error_row(spec)], spec), path, compression="zstd")
    return path


def test_polars_reads_declared_types(parquet_file: Path) -> None:
    schema = pl.read_parquet(parquet_file).schema
    assert schema["total"] == pl.Decimal(12, 2)
    assert schema["invoice_date"] == pl.Date
    assert schema["paid_at"] == pl.Datetime("us", "UTC")
    assert schema["processed_at"] == pl.Datetime("us", "UTC")
    assert schema["tags"] == pl.List(pl.String)
    assert schema["currency"] == pl.Categorical
    assert schema["label"] == pl.Categorical
    assert schema["route"] == pl.Categorical
    assert schema["paid"] == pl.Boolean
    assert schema["truncated"] == pl.Boolean
    assert schema["lines"] == pl.Int64
    assert schema["input_tokens"] == pl.Int64
    assert schema["rate"] == pl.Float64
    assert schema["total_confidence"] == pl.Float64
    assert schema["vendor"] == pl.String


def test_polars_round_trips_values(parquet_file: Path) -> None:
    frame = pl.read_parquet(parquet_file)
    first, second = frame.row(0, named=True), frame.row(1, named=True)
    assert first["total"] == Decimal("1060.50")
    assert first["invoice_date"] == date(2023, 10, 17)
    assert first["paid_at"] == datetime(2023, 10, 18, 9, 30, tzinfo=UTC)
    assert first["processed_at"] == _PROCESSED
    assert first["tags"] == ["oak", "fitting"]
    assert first["currency"] == "EUR"
    assert first["label"] == "receipt"
    assert first["paid"] is True
    assert first["lines"] == 3
    assert first["rate"] == 0.25
    assert first["vendor"] == "Alder & Finch"
    assert first["total_confidence"] == 0.4
    assert first["vendor_confidence"] is None
    assert first["cost_usd"] == 0.75
    assert json.loads(first["small_answer"]) == {"label": "receipt", "fields": {"total": "1060.50"}}
    assert second["route"] == "error"
    assert second["total"] is None
    assert second["tags"] is None
    assert second["label"] is None


def test_duckdb_reads_declared_types(parquet_file: Path) -> None:
    described = duckdb.sql(f"describe select * from read_parquet('{parquet_file}')").fetchall()
    types = {row[0]: row[1] for row in described}
    assert list(types) == result_schema(_spec()).names
    assert types["total"] == "DECIMAL(12,2)"
    assert types["invoice_date"] == "DATE"
    assert types["paid_at"] == "TIMESTAMP WITH TIME ZONE"
    assert types["processed_at"] == "TIMESTAMP WITH TIME ZONE"
    assert types["tags"] == "VARCHAR[]"
    assert types["currency"] == "VARCHAR"
    assert types["label"] == "VARCHAR"
    assert types["route"] == "VARCHAR"
    assert types["paid"] == "BOOLEAN"
    assert types["lines"] == "BIGINT"
    assert types["input_tokens"] == "BIGINT"
    assert types["rate"] == "DOUBLE"
    assert types["total_confidence"] == "DOUBLE"


def test_duckdb_round_trips_values(parquet_file: Path) -> None:
    connection = duckdb.connect()
    try:
        connection.execute("set TimeZone = 'UTC'")
        row = connection.execute(
            "select total, invoice_date, epoch_us(paid_at), tags, currency, label, paid, lines, rate, "
            f"total_confidence, cost_usd from read_parquet('{parquet_file}') where doc_id = 'd1'"
        ).fetchone()
        total_sum = connection.execute(
            f"select sum(total), count(total), count(*) from read_parquet('{parquet_file}')"
        ).fetchone()
    finally:
        connection.close()
    expected_paid_at = int(datetime(2023, 10, 18, 9, 30, tzinfo=UTC).timestamp() * 1_000_000)
    assert row == (
        Decimal("1060.50"),
        date(2023, 10, 17),
        expected_paid_at,
        ["oak", "fitting"],
        "EUR",
        "receipt",
        True,
        3,
        0.25,
        0.4,
        0.75,
    )
    assert total_sum == (Decimal("1060.50"), 1, 2)


@pytest.mark.parametrize("classify", [True, False])
def test_rows_to_table_equals_the_table_of_records(classify: bool) -> None:
    """The column-by-column build is the same table as one `to_record` dict per row."""
    spec = _spec(classify=classify)
    rows = [_full_row(spec), _error_row(spec), _full_row(spec)]
    expected = pa.Table.from_pylist([row.to_record(spec) for row in rows], schema=result_schema(spec))
    assert rows_to_table(rows, spec).equals(expected)
    assert rows_to_table([], spec).equals(result_schema(spec).empty_table())
