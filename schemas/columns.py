"""Names of the provenance columns every result row carries.

Kept apart from the schema builder so the job-spec validator can refuse field names that would collide with them
without importing pyarrow.
"""

from __future__ import annotations

PROVENANCE_COLUMNS: tuple[str, ...] = (
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
    "label",
    "confidence",
    "label_confidence",
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
)

CONFIDENCE_SUFFIX = "_confidence"

ROUTES: tuple[str, ...] = ("small", "frontier", "deferred", "error")


def field_confidence_column(field_name: str) -> str:
    """Name the column holding the small model's confidence for one extracted field."""
    return f"{field_name}{CONFIDENCE_SUFFIX}"
