"""What happened to a row, as a type: the value later runs decide on; `route_reason` is the sentence beside it.

Every result row carries `route` (small | frontier | deferred | error), `route_outcome` (one of `RouteOutcome`) and
`route_reason` (for people). Which rows a later run retries, and which wait for a frontier batch, is read from
`route_outcome` only, so rewording a message never changes what is retried.
"""

from __future__ import annotations

from enum import StrEnum


class RouteOutcome(StrEnum):
    """Why a row holds what it holds (its route says whose answer that is)."""

    KEPT = "kept"  # small: confident enough to keep
    AUDIT_AGREED = "audit_agreed"  # small: kept, and the frontier agreed when audited
    AUDIT_DISAGREED = "audit_disagreed"  # frontier: kept, audited, and the frontier's answer taken
    ANSWERED_BY_FRONTIER = "answered_by_frontier"  # frontier: escalated and answered
    NO_FRONTIER = "no_frontier"  # deferred: not confident enough and no frontier configured
    BUDGET_EXHAUSTED = "budget_exhausted"  # deferred (error without a small answer): the run's cap left too little
    SECOND_CALL_OVER_BUDGET = "second_call_over_budget"  # deferred: a repair or longer call would pass the cap
    QUEUED = "queued"  # deferred: waiting in a frontier batch; the run that collects the batch answers it
    FRONTIER_RETRYABLE = "frontier_retryable"  # deferred: the frontier failed in a way a later try may not
    FRONTIER_FAILED = "frontier_failed"  # error: the frontier failed for good on a row the small model answered
    SMALL_MODEL_FAILED = "small_model_failed"  # error: the small model failed and no frontier answer replaced it
    UNREADABLE = "unreadable"  # error: the document could not be read or parsed (the same bytes fail again)
    SHARD_FAILED = "shard_failed"  # error: the shard failed after its retries (storage, a crash in the engine)


RETRIED_OUTCOMES: frozenset[RouteOutcome] = frozenset(
    {
        RouteOutcome.NO_FRONTIER,  # retried once a frontier is configured (tasks/store/state.py select_todo)
        RouteOutcome.BUDGET_EXHAUSTED,
        RouteOutcome.SECOND_CALL_OVER_BUDGET,
        RouteOutcome.FRONTIER_RETRYABLE,
        RouteOutcome.SMALL_MODEL_FAILED,
        RouteOutcome.SHARD_FAILED,
    }
)
"""Outcomes a later run processes again although the file did not change. Not QUEUED: the batch that holds the
row answers it, and queueing it again would pay twice."""


LEGACY_TRANSIENT_PREFIXES = ("shard failed after retries", "small model failed")
LEGACY_QUEUED = "queued for the frontier batch API"


def legacy_outcome(route: str, reason: str) -> RouteOutcome:
    """The outcome of a row written before `route_outcome` existed, read from its sentence as those runs decided.

    Only for parts already on storage: new rows always carry their outcome. Deferred rows waiting in a batch said
    so in their reason; error rows were retried when their reason began with a transient cause.
    """
    if route == "small":
        return RouteOutcome.KEPT
    if route == "frontier":
        return RouteOutcome.ANSWERED_BY_FRONTIER
    if LEGACY_QUEUED in reason:
        return RouteOutcome.QUEUED
    if route == "deferred":
        return RouteOutcome.FRONTIER_RETRYABLE  # any deferred row was retried; the exact cause is in the reason
    if reason.startswith(LEGACY_TRANSIENT_PREFIXES[0]):
        return RouteOutcome.SHARD_FAILED
    if reason.startswith(LEGACY_TRANSIENT_PREFIXES[1]):
        return RouteOutcome.SMALL_MODEL_FAILED
    return RouteOutcome.FRONTIER_FAILED if "frontier failed" in reason else RouteOutcome.UNREADABLE


def outcome_of_record(record: dict[str, object]) -> RouteOutcome:
    """A stored row's outcome: its `route_outcome` column, or for older parts what its route and reason meant."""
    value = record.get("route_outcome")
    if value:
        return RouteOutcome(str(value))
    return legacy_outcome(str(record.get("route") or ""), str(record.get("route_reason") or ""))


class DocumentErrorCode(StrEnum):
    """Why a document has no text to answer: the `error_code` column of its row (tasks/ingest/parse.py ERROR_CODES says
    what each means; the `error` column holds the sentence)."""

    EMPTY = "empty"
    TOO_LARGE = "too_large"
    TOO_COMPLEX = "too_complex"
    BINARY = "binary"
    DECODE = "decode"
    UNSUPPORTED_FORMAT = "unsupported_format"
    HTML_NO_TEXT = "html_no_text"
    PDF_ENCRYPTED = "pdf_encrypted"
    PDF_CORRUPT = "pdf_corrupt"
    PDF_NO_TEXT = "pdf_no_text"
    DOCX_CORRUPT = "docx_corrupt"
    DOCX_TOO_LARGE = "docx_too_large"
    EML_CORRUPT = "eml_corrupt"
    JSON_CORRUPT = "json_corrupt"
    JSON_NOT_OBJECT = "json_not_object"
    JSON_MISSING_TEXT = "json_missing_text"
    JSON_BAD_TEXT = "json_bad_text"
    PARSE_FAILED = "parse_failed"
    MISSING = "missing"  # listed, then gone before it was read
    UNREADABLE = "unreadable"  # the storage refused it for good (permissions, a folder where a file was listed)
    IMAGE_CORRUPT = "image_corrupt"  # not an image Pillow can open, or a page that cannot be decoded
    IMAGE_TOO_LARGE = "image_too_large"  # a page's pixel count (read from its header) over the limit: a bomb
    TOO_MANY_PAGES = "too_many_pages"  # more pages to OCR than source.max_pages
    OCR_NO_TEXT = "ocr_no_text"  # OCR found no text on any page
    OCR_UNAVAILABLE = "ocr_unavailable"  # an image, and the [ocr] extra is not installed
    OCR_TIME_LIMIT = "ocr_time_limit"  # source.max_ocr_seconds spent before OCR read any text of the document
