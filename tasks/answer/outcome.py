"""Every way a row is finished: built from a document, filled from the small model, escalated, audited, or failed
with its shard.

One module decides a row's route, typed outcome (`schemas/outcomes.py`) and sentence, whichever task finishes it:
the shard task (`tasks/shard.py`), the run collecting a frontier batch (`tasks/answer/frontier_batches.py`) and the flow
writing the rows of a shard that failed for good (`flows/process.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from docroute.engines.base import Prediction
from docroute.schemas.documents import DocumentRef
from docroute.schemas.outcomes import RouteOutcome
from docroute.schemas.rows import ResultRow, answer_json
from docroute.schemas.spec import JobSpec
from docroute.tasks.answer.escalate import DeferReason, Escalation
from docroute.tasks.answer.score import answers_of, part_correct
from docroute.tasks.ingest.read import SourceDocument, document_id
from docroute.tasks.route.decide import in_audit_sample, required_parts


def base_row(
    doc: SourceDocument,
    *,
    spec_hash: str,
    run_id: str,
    router_version: str | None,
    route: str,
    reason: str,
    outcome: RouteOutcome,
) -> ResultRow:
    """A document's row before any model answer is applied: provenance, route and why."""
    return ResultRow(
        doc_id=doc.doc_id,
        source_uri=doc.uri,
        record_key=doc.record_key,
        content_sha256=doc.content_sha256,
        source_etag=doc.etag,
        doc_format=doc.format,
        run_id=run_id,
        spec_hash=spec_hash,
        processed_at=datetime.now(UTC),
        route=route,
        route_reason=reason,
        route_outcome=outcome,
        input_chars=len(doc.text) if doc.text is not None else None,
        pages=doc.pages,
        ocr_pages=doc.ocr_pages,
        ocr_confidence=doc.ocr_confidence,
        ocr_unread_pages=doc.ocr_unread_pages,
        router_version=router_version,
    )


def apply_small(row: ResultRow, small: Prediction, spec: JobSpec) -> None:
    """The small model's answer, usage and cost on its row (the route is decided apart)."""
    row.small_model = small.model
    row.label, row.label_confidence = small.label, small.label_confidence
    row.fields, row.field_confidences = dict(small.fields), dict(small.field_confidences)
    row.small_answer = answer_json(small.label, small.label_confidence, small.fields, small.field_confidences)
    row.small_input_tokens = small.usage.input_tokens
    row.small_output_tokens = small.usage.output_tokens
    row.engine_seconds = small.engine_seconds
    row.small_cost_usd = spec.small_cost_usd(small.engine_seconds, small.encoder_tokens)
    row.truncated = small.truncated


_DEFERRED_OUTCOMES = {
    DeferReason.BUDGET_EXHAUSTED: RouteOutcome.BUDGET_EXHAUSTED,
    DeferReason.SECOND_CALL_OVER_BUDGET: RouteOutcome.SECOND_CALL_OVER_BUDGET,
    DeferReason.QUEUED: RouteOutcome.QUEUED,
}


def finish_escalated(row: ResultRow, outcome: Escalation | None, decision_reason: str, has_small: bool) -> None:
    """Fill a row the small model did not settle, from the frontier's outcome.

    A row without a small-model answer stays an error (retried: `SMALL_MODEL_FAILED`) unless the frontier answers
    it, except while it waits in a frontier batch: then it is deferred (`QUEUED`), so no later run queues it again
    before the batch's answer is collected.
    """
    if outcome is None:  # no frontier configured
        if has_small:
            row.route, row.route_reason = "deferred", f"{decision_reason}; no frontier configured"
            row.route_outcome = RouteOutcome.NO_FRONTIER
            row.final_model = row.small_model
        else:
            row.route, row.route_outcome = "error", RouteOutcome.SMALL_MODEL_FAILED
        return
    if outcome.deferred_reason is not None:
        waiting = has_small or outcome.queued
        row.route, row.route_reason = (
            ("deferred" if waiting else "error"),
            f"{decision_reason}; {outcome.deferred_reason}",
        )
        row.route_outcome = (
            _DEFERRED_OUTCOMES[outcome.reason] if outcome.reason is not None else RouteOutcome.BUDGET_EXHAUSTED
        )
        row.final_model = row.small_model if has_small else None
        if not waiting:
            row.error = row.route_reason
        return
    frontier = outcome.prediction
    assert frontier is not None
    row.frontier_input_tokens = frontier.usage.input_tokens
    row.frontier_output_tokens = frontier.usage.output_tokens
    row.frontier_cost_usd = outcome.cost_usd
    row.truncated = row.truncated or frontier.truncated
    if frontier.ok:
        row.route, row.route_reason = "frontier", f"{decision_reason}; answered by the frontier"
        row.route_outcome = RouteOutcome.ANSWERED_BY_FRONTIER
        row.final_model = frontier.model
        row.label = frontier.label
        row.fields = dict(frontier.fields)
        return
    if frontier.retryable and has_small:
        row.route = "deferred"
        row.route_reason = f"{decision_reason}; frontier call failed, will retry: {frontier.error}"
        row.route_outcome = RouteOutcome.FRONTIER_RETRYABLE
        row.final_model = row.small_model
        return
    row.route, row.error = "error", f"frontier failed: {frontier.error}"
    row.route_reason = f"{decision_reason}; {row.error}"
    # without a small answer the small model's failure is the cause, and it is retried; with one, the frontier's
    row.route_outcome = RouteOutcome.FRONTIER_FAILED if has_small else RouteOutcome.SMALL_MODEL_FAILED
    row.final_model = None
    row.label, row.fields = None, {}


def is_audited(spec: JobSpec, doc_id: str) -> bool:
    """Pick a stable `audit_fraction` of documents: the same ones on every run and in every shard."""
    if spec.frontier is None or spec.frontier.mode == "batch":
        return False
    return in_audit_sample(doc_id, spec.routing.audit_fraction)


def apply_audit(spec: JobSpec, row: ResultRow, outcome: Escalation | None, small: Prediction) -> None:
    """Record whether the frontier agrees with a kept answer; where it disagrees, the row takes its answer."""
    if outcome is None or outcome.prediction is None or not outcome.prediction.ok:
        return  # no budget, or the frontier failed: the kept answer stands, unaudited
    frontier = outcome.prediction
    row.audited = True
    row.frontier_input_tokens = frontier.usage.input_tokens
    row.frontier_output_tokens = frontier.usage.output_tokens
    row.frontier_cost_usd = outcome.cost_usd
    agrees = all(part_correct(spec, part, small, answers_of(frontier)) for part in required_parts(spec))
    row.audit_agrees = agrees
    if not agrees:
        row.route, row.final_model = "frontier", frontier.model
        row.route_reason = f"{row.route_reason}; audit: the frontier disagreed and its answer was taken"
        row.route_outcome = RouteOutcome.AUDIT_DISAGREED
        row.label, row.fields = frontier.label, dict(frontier.fields)
    else:
        row.route_reason = f"{row.route_reason}; audit: the frontier agreed"
        row.route_outcome = RouteOutcome.AUDIT_AGREED


def failed_shard_rows(spec: JobSpec, refs: Sequence[DocumentRef], run_id: str, reason: str) -> list[ResultRow]:
    """One error row per file of a shard that failed for good, so its documents are not lost (retried next run)."""
    now = datetime.now(UTC)
    return [
        ResultRow(
            doc_id=document_id(ref.uri),
            source_uri=ref.uri,
            source_etag=ref.etag,
            run_id=run_id,
            spec_hash=spec.spec_hash(),
            processed_at=now,
            route="error",
            route_reason=f"shard failed after retries: {reason}",
            route_outcome=RouteOutcome.SHARD_FAILED,
            error=f"shard failed after retries: {reason}",
        )
        for ref in refs
    ]
