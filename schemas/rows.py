"""The result row and its Arrow schema, derived from the job spec: the one source of the output's columns.

Each extracted field gets a column of its own Arrow type (decimal128, date32, timestamp[us, UTC], bool,
list<string>, …) so warehouses read typed values without parsing JSON; labels and enums are dictionary-encoded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pyarrow as pa

from docroute import __version__
from docroute.schemas.columns import ROUTES, field_confidence_column
from docroute.schemas.outcomes import DocumentErrorCode, RouteOutcome, outcome_of_record
from docroute.schemas.spec import FieldSpec, JobSpec
from docroute.schemas.values import to_json_value

CATEGORY = pa.dictionary(pa.int32(), pa.string())
SMALL_CATEGORY = pa.dictionary(pa.int8(), pa.string())
UTC_MICROS = pa.timestamp("us", tz="UTC")


def arrow_type(spec: FieldSpec) -> pa.DataType:
    """The Arrow type of an extracted field's column."""
    match spec.type:
        case "str":
            return pa.string()
        case "int":
            return pa.int64()
        case "float":
            return pa.float64()
        case "decimal":
            return pa.decimal128(spec.precision, spec.scale)
        case "date":
            return pa.date32()
        case "datetime":
            return UTC_MICROS
        case "bool":
            return pa.bool_()
        case "enum":
            return CATEGORY
        case "list[str]":
            return pa.list_(pa.string())
    raise ValueError(f"no Arrow type for field type {spec.type!r}")  # pragma: no cover - spec validation


_LEADING: list[tuple[str, pa.DataType, str]] = [
    ("doc_id", pa.string(), "stable hash of source_uri (and record_key for json/jsonl records)"),
    ("source_uri", pa.string(), "where the document was read from"),
    ("record_key", pa.string(), "record id or index inside a json/jsonl file; null for whole files"),
    ("content_sha256", pa.string(), "SHA-256 of the document's bytes"),
    ("source_etag", pa.string(), "the source listing's ETag (or mtime and size) when the file was read"),
    ("doc_format", SMALL_CATEGORY, "parser used: txt, md, html, pdf, docx, eml, json, jsonl, image"),
    ("run_id", pa.string(), "the run that wrote this row"),
    ("spec_hash", pa.string(), "hash of the task and small model that produced the answer"),
    ("processed_at", UTC_MICROS, "when the row was produced"),
    ("route", SMALL_CATEGORY, "small | frontier | deferred | error"),
    ("route_outcome", SMALL_CATEGORY, "why, typed (schemas/outcomes.py RouteOutcome): what later runs decide on"),
    ("route_reason", pa.string(), "why the row took its route, for people"),
]

_TRAILING: list[tuple[str, pa.DataType, str]] = [
    (
        "confidence",
        pa.float64(),
        "the small model's confidence for the row (its least confident required part)",
    ),
    ("small_model", pa.string(), "engine and model that answered first"),
    ("final_model", pa.string(), "model whose answer the row holds; null for error rows"),
    ("small_answer", pa.string(), "the small model's answer as JSON, kept for audits and distillation"),
    ("input_tokens", pa.int64(), "all input tokens spent on the row"),
    ("output_tokens", pa.int64(), "all output tokens spent on the row"),
    ("small_input_tokens", pa.int64(), ""),
    ("small_output_tokens", pa.int64(), ""),
    ("frontier_input_tokens", pa.int64(), ""),
    ("frontier_output_tokens", pa.int64(), ""),
    ("small_cost_usd", pa.float64(), "self-hosted compute: engine seconds x small_model.usd_per_hour"),
    ("frontier_cost_usd", pa.float64(), "frontier tokens x the price table"),
    ("cost_usd", pa.float64(), "small_cost_usd + frontier_cost_usd"),
    ("engine_seconds", pa.float64(), "small-model compute time spent on the row"),
    ("error", pa.string(), "what went wrong, for error rows"),
    ("error_code", SMALL_CATEGORY, "why an unreadable document has no text, typed (schemas/outcomes.py)"),
    ("truncated", pa.bool_(), "the document was cut to the model's token budget"),
    ("audited", pa.bool_(), "a kept small-model answer was also sent to the frontier to check it"),
    ("audit_agrees", pa.bool_(), "for audited rows: whether the frontier gave the same answer"),
    ("input_chars", pa.int64(), "characters of parsed text"),
    ("pages", pa.int32(), "pdf and image documents: how many pages the file has; null for other formats"),
    ("ocr_pages", pa.int32(), "pdf and image documents: how many pages were read by OCR (0: all from a text layer)"),
    ("ocr_confidence", pa.float64(), "the mean confidence (0 to 1) of the OCR'd lines; null when nothing was OCR'd"),
    (
        "ocr_unread_pages",
        pa.int32(),
        "pages that needed OCR but were not read: source.max_ocr_seconds ran out (the answer is from the pages read)",
    ),
    ("router_version", pa.string(), "the calibrated router the thresholds came from, if any"),
]


_SCHEMAS: dict[tuple[str, str], pa.Schema] = {}


def result_schema(spec: JobSpec) -> pa.Schema:
    """The Arrow schema of the job's result rows; field order is stable, metadata names the spec.

    Every shard needs it and building it (dozens of fields with metadata) cost about a millisecond, so schemas are
    kept per process under what they are made of: the job's name and its spec hash (the task and small model).
    """
    key = (spec.name, spec.spec_hash())
    schema = _SCHEMAS.get(key)
    if schema is None:
        schema = _SCHEMAS.setdefault(key, _build_result_schema(spec))  # pa.Schema is immutable: safe to share
    return schema


def _build_result_schema(spec: JobSpec) -> pa.Schema:
    columns = list(_LEADING)
    if spec.task.classify is not None:
        columns.append(("label", CATEGORY, "the chosen label"))
        columns.append(("label_confidence", pa.float64(), "the small model's calibrated probability of its label"))
    if spec.task.extract is not None:
        for item in spec.task.extract.fields:
            columns.append((item.name, arrow_type(item), item.description))
        for item in spec.task.extract.fields:
            columns.append((field_confidence_column(item.name), pa.float64(), f"small-model confidence of {item.name}"))
    columns += _TRAILING
    fields = [
        pa.field(name, kind, nullable=True, metadata={"description": doc} if doc else None)
        for name, kind, doc in columns
    ]
    metadata = {
        "docroute.version": __version__,
        "docroute.job": spec.name,
        "docroute.spec_hash": spec.spec_hash(),
    }
    return pa.schema(fields, metadata=metadata)


@dataclass
class ResultRow:
    """One document's outcome; `to_record` flattens it into the schema's columns."""

    doc_id: str
    source_uri: str
    run_id: str
    spec_hash: str
    processed_at: datetime
    route: str
    route_reason: str
    route_outcome: RouteOutcome
    record_key: str | None = None
    content_sha256: str | None = None
    source_etag: str | None = None
    doc_format: str | None = None
    label: str | None = None
    label_confidence: float | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    field_confidences: dict[str, float | None] = field(default_factory=dict)
    confidence: float | None = None
    small_model: str | None = None
    final_model: str | None = None
    small_answer: dict[str, Any] | None = None
    small_input_tokens: int = 0
    small_output_tokens: int = 0
    frontier_input_tokens: int = 0
    frontier_output_tokens: int = 0
    small_cost_usd: float = 0.0
    frontier_cost_usd: float = 0.0
    engine_seconds: float = 0.0
    error: str | None = None
    error_code: DocumentErrorCode | None = None
    truncated: bool = False
    audited: bool = False
    audit_agrees: bool | None = None
    input_chars: int | None = None
    pages: int | None = None
    ocr_pages: int | None = None
    ocr_confidence: float | None = None
    ocr_unread_pages: int | None = None
    router_version: str | None = None

    def __post_init__(self) -> None:
        if self.route not in ROUTES:
            raise ValueError(f"unknown route {self.route!r}")

    def to_record(self, spec: JobSpec) -> dict[str, Any]:
        record: dict[str, Any] = {
            "doc_id": self.doc_id,
            "source_uri": self.source_uri,
            "record_key": self.record_key,
            "content_sha256": self.content_sha256,
            "source_etag": self.source_etag,
            "doc_format": self.doc_format,
            "run_id": self.run_id,
            "spec_hash": self.spec_hash,
            "processed_at": self.processed_at,
            "route": self.route,
            "route_outcome": self.route_outcome.value,
            "route_reason": self.route_reason,
            "confidence": self.confidence,
            "small_model": self.small_model,
            "final_model": self.final_model,
            "small_answer": None if self.small_answer is None else json.dumps(self.small_answer, sort_keys=True),
            "input_tokens": self.small_input_tokens + self.frontier_input_tokens,
            "output_tokens": self.small_output_tokens + self.frontier_output_tokens,
            "small_input_tokens": self.small_input_tokens,
            "small_output_tokens": self.small_output_tokens,
            "frontier_input_tokens": self.frontier_input_tokens,
            "frontier_output_tokens": self.frontier_output_tokens,
            "small_cost_usd": self.small_cost_usd,
            "frontier_cost_usd": self.frontier_cost_usd,
            "cost_usd": self.small_cost_usd + self.frontier_cost_usd,
            "engine_seconds": self.engine_seconds,
            "error": self.error,
            "error_code": None if self.error_code is None else self.error_code.value,
            "truncated": self.truncated,
            "audited": self.audited,
            "audit_agrees": self.audit_agrees,
            "input_chars": self.input_chars,
            "pages": self.pages,
            "ocr_pages": self.ocr_pages,
            "ocr_confidence": self.ocr_confidence,
            "ocr_unread_pages": self.ocr_unread_pages,
            "router_version": self.router_version,
        }
        if spec.task.classify is not None:
            record["label"] = self.label
            record["label_confidence"] = self.label_confidence
        if spec.task.extract is not None:
            for item in spec.task.extract.fields:
                record[item.name] = self.fields.get(item.name)
                record[field_confidence_column(item.name)] = self.field_confidences.get(item.name)
        return record


def row_from_record(record: dict[str, Any], spec: JobSpec) -> ResultRow:
    """Rebuild a row from its written record (a frontier batch's answer updates rows written by an earlier run)."""
    extract = spec.task.extract.fields if spec.task.extract else []
    small_answer = record.get("small_answer")
    return ResultRow(
        doc_id=record["doc_id"],
        source_uri=record["source_uri"],
        run_id=record["run_id"],
        spec_hash=record["spec_hash"],
        processed_at=record["processed_at"],
        route=record["route"],
        route_reason=record["route_reason"] or "",
        route_outcome=outcome_of_record(record),
        record_key=record.get("record_key"),
        content_sha256=record.get("content_sha256"),
        source_etag=record.get("source_etag"),
        doc_format=record.get("doc_format"),
        label=record.get("label"),
        label_confidence=record.get("label_confidence"),
        fields={item.name: record.get(item.name) for item in extract},
        field_confidences={item.name: record.get(field_confidence_column(item.name)) for item in extract},
        confidence=record.get("confidence"),
        small_model=record.get("small_model"),
        final_model=record.get("final_model"),
        small_answer=json.loads(small_answer) if small_answer else None,
        small_input_tokens=record.get("small_input_tokens") or 0,
        small_output_tokens=record.get("small_output_tokens") or 0,
        frontier_input_tokens=record.get("frontier_input_tokens") or 0,
        frontier_output_tokens=record.get("frontier_output_tokens") or 0,
        small_cost_usd=record.get("small_cost_usd") or 0.0,
        frontier_cost_usd=record.get("frontier_cost_usd") or 0.0,
        engine_seconds=record.get("engine_seconds") or 0.0,
        error=record.get("error"),
        error_code=DocumentErrorCode(record["error_code"]) if record.get("error_code") else None,
        truncated=bool(record.get("truncated")),
        audited=bool(record.get("audited")),
        audit_agrees=record.get("audit_agrees"),
        input_chars=record.get("input_chars"),
        pages=record.get("pages"),
        ocr_pages=record.get("ocr_pages"),
        ocr_confidence=record.get("ocr_confidence"),
        ocr_unread_pages=record.get("ocr_unread_pages"),
        router_version=record.get("router_version"),
    )


_COPIED = (
    "doc_id", "source_uri", "record_key", "content_sha256", "source_etag", "doc_format", "run_id", "spec_hash",
    "processed_at", "route", "route_outcome", "route_reason", "confidence", "small_model", "final_model",
    "small_input_tokens", "small_output_tokens", "frontier_input_tokens", "frontier_output_tokens", "small_cost_usd",
    "frontier_cost_usd", "engine_seconds", "error", "error_code", "truncated", "audited", "audit_agrees", "input_chars",
    "pages", "ocr_pages", "ocr_confidence", "ocr_unread_pages", "router_version",
)  # fmt: skip
"""Columns that are a row attribute as it is (the rest are derived: `to_record` is the reference)."""


def rows_to_table(rows: list[ResultRow], spec: JobSpec, schema: pa.Schema | None = None) -> pa.Table:
    """Convert rows to an Arrow table of the job's schema (an empty table keeps the schema).

    Column by column rather than through one dict per row (`to_record`): the same table, a fraction of the
    per-document Python work. tests/test_rows.py checks both give equal tables.
    """
    schema = schema or result_schema(spec)
    columns: dict[str, list[Any]] = {name: [getattr(row, name) for row in rows] for name in _COPIED}
    columns["small_answer"] = [
        None if row.small_answer is None else json.dumps(row.small_answer, sort_keys=True) for row in rows
    ]
    columns["input_tokens"] = [row.small_input_tokens + row.frontier_input_tokens for row in rows]
    columns["output_tokens"] = [row.small_output_tokens + row.frontier_output_tokens for row in rows]
    columns["cost_usd"] = [row.small_cost_usd + row.frontier_cost_usd for row in rows]
    if spec.task.classify is not None:
        columns["label"] = [row.label for row in rows]
        columns["label_confidence"] = [row.label_confidence for row in rows]
    if spec.task.extract is not None:
        for item in spec.task.extract.fields:
            confidence = field_confidence_column(item.name)
            columns[item.name] = [row.fields.get(item.name) for row in rows]
            columns[confidence] = [row.field_confidences.get(item.name) for row in rows]
    arrays = [
        pa.array(columns[f.name], type=f.type) if f.name in columns else pa.nulls(len(rows), f.type) for f in schema
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


def answer_json(
    label: str | None,
    label_confidence: float | None,
    fields: dict[str, Any],
    field_confidences: dict[str, float | None],
) -> dict[str, Any]:
    """The small model's answer in plain JSON types, for the small_answer column."""
    answer: dict[str, Any] = {}
    if label is not None or label_confidence is not None:
        answer["label"] = label
        answer["label_confidence"] = label_confidence
    if fields:
        answer["fields"] = {k: _json_safe(v) for k, v in fields.items()}
        answer["field_confidences"] = dict(field_confidences)
    return answer


def _json_safe(value: Any) -> Any:
    if isinstance(value, list):
        return [to_json_value(v) for v in value]
    return to_json_value(value)
