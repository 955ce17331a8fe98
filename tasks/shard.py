"""The per-shard Prefect task: read → parse → small model → route → frontier → one Parquet part.

One task run per shard, never per document: a task run costs milliseconds of orchestration, a document a fraction
of that. Every document read becomes exactly one row — answered, deferred or error — with its reason.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import date
from functools import partial
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from docroute.engines.base import Request
from docroute.engines.local.classify_choice import describe
from docroute.schemas.documents import Shard
from docroute.schemas.outcomes import RouteOutcome
from docroute.schemas.rows import ResultRow, rows_to_table
from docroute.schemas.spec import JobSpec
from docroute.schemas.summary import LedgerEntry
from docroute.tasks.account.ledger import summarise_part
from docroute.tasks.answer.budget import FrontierBudget, release_run_budget, run_budget
from docroute.tasks.answer.escalate import Escalation, escalate
from docroute.tasks.answer.frontier_batches import StagedRequest, queue_requests, write_staging
from docroute.tasks.answer.outcome import apply_audit, apply_small, base_row, finish_escalated, is_audited
from docroute.tasks.ingest.page_images import page_images
from docroute.tasks.ingest.read import SourceDocument, read_documents
from docroute.tasks.learn.harvest import write_labels
from docroute.tasks.model.infer import engines_built_by_this_thread, frontier_engine, run_engine, small_engine
from docroute.tasks.route.decide import RouteDecision, decide, spec_thresholds
from docroute.tasks.store.state import hand_over_part_state
from docroute.tasks.store.write import part_exists, read_parquet, write_parquet


@dataclass(frozen=True, slots=True)
class RunContext:
    """What every shard of one run shares."""

    run_id: str
    run_date: date
    router_version: str | None = None
    head_version: str | None = None  # the trained classification head the router names, if any
    thresholds: dict[str, float | None] | None = None  # from a calibrated router; None: the job file's
    plan_id: str = ""  # names the part files; a run resuming an interrupted one keeps that run's id
    plan_date: date | None = None
    # distributed runners: this shard's share of the run's frontier cap (None: one budget shared in-process)
    shard_allowance_usd: float | None = None

    def frontier_budget(self, spec: JobSpec, shard_index: int) -> FrontierBudget:
        """The budget a shard spends from: the run's, shared by threads, or the shard's own allowance."""
        if self.shard_allowance_usd is None:
            return run_budget(self.run_id, spec.routing.max_frontier_usd)
        return run_budget(self._allowance_key(shard_index), self.shard_allowance_usd)

    def release_allowance(self, shard_index: int) -> None:
        if self.shard_allowance_usd is not None:
            release_run_budget(self._allowance_key(shard_index))

    def _allowance_key(self, shard_index: int) -> str:
        return f"{self.run_id}/shard-{shard_index}"  # kept across the task's retries, so a retry cannot respend it

    def part_url(self, spec: JobSpec, shard_index: int) -> str:
        return spec.output.layout.results_part(
            self.plan_date or self.run_date, self.plan_id or self.run_id, shard_index
        )

    def errors_url(self, spec: JobSpec, shard_index: int) -> str:
        return spec.output.layout.errors_part(self.plan_date or self.run_date, self.plan_id or self.run_id, shard_index)


@dataclass(frozen=True)
class ShardResult:
    """A shard's outcome, small enough to pass back to the flow."""

    shard_index: int
    part_url: str
    rows: int
    routes: dict[str, int]
    entries: list[LedgerEntry] = field(default_factory=list)
    seconds: float = 0.0
    audited: int = 0
    audit_agreed: int = 0
    escalated: int = 0  # rows the router sent to the frontier (answered, deferred or failed there)
    reused: bool = False
    worker: str = ""  # host:pid of the process that ran the shard
    engines_built: int = 0  # models this shard had to load (0 once its worker process has them)
    classification: dict[str, Any] | None = None  # how its small model classified, and why (classify_choice)

    @property
    def frontier_usd(self) -> float:
        """What the shard's rows cost at the frontier (escalations and audits)."""
        return sum(entry.cost_usd for entry in self.entries if entry.role == "frontier")


def answer_documents(
    spec: JobSpec, run: RunContext, documents: Sequence[SourceDocument], part_url: str = "", shard_index: int = 0
) -> tuple[list[ResultRow], list[StagedRequest]]:
    """Turn parsed documents into result rows, one per document, in document order.

    Also returns the escalations queued for a frontier batch (batch mode), which the caller persists.
    """
    rows: dict[str, ResultRow] = {}
    # hashing the spec is a JSON dump: once per shard, not per row
    new_row = partial(base_row, spec_hash=spec.spec_hash(), run_id=run.run_id, router_version=run.router_version)
    readable = [d for d in documents if d.ok]
    for doc in documents:
        if not doc.ok:
            row = new_row(
                doc,
                route="error",
                reason=doc.error or "unreadable",
                outcome=RouteOutcome.UNREADABLE,
            )
            row.error, row.error_code = doc.error, doc.error_code
            rows[doc.doc_id] = row
    requests = [
        Request(id=d.doc_id, text=d.text or "", geometry=d.lines, page_images=page_images(spec, d)) for d in readable
    ]
    small = {p.id: p for p in run_engine(small_engine(spec, run.head_version), requests)}
    escalated: list[tuple[SourceDocument, RouteDecision]] = []
    for doc in readable:
        prediction = small[doc.doc_id]
        if not prediction.ok:
            reason = f"small model failed: {prediction.error}"
            row = new_row(
                doc,
                route="error",
                reason=reason,
                outcome=RouteOutcome.SMALL_MODEL_FAILED,
            )
            row.small_model, row.error = prediction.model, f"small model failed: {prediction.error}"
            rows[doc.doc_id] = row
            escalated.append((doc, RouteDecision(True, None, row.route_reason)))
            continue
        decision = decide(prediction, run.thresholds or spec_thresholds(spec))
        row = new_row(
            doc,
            route="small",
            reason=decision.reason,
            outcome=RouteOutcome.KEPT,
        )
        apply_small(row, prediction, spec)
        row.confidence = decision.confidence
        rows[doc.doc_id] = row
        if decision.escalate:
            escalated.append((doc, decision))
        else:
            row.final_model = prediction.model
    escalated_ids = {d.doc_id for d, _ in escalated}  # an escalated row is answered anyway: never audited as well
    audits = [
        d
        for d in readable
        if d.doc_id not in escalated_ids and rows[d.doc_id].route == "small" and is_audited(spec, d.doc_id)
    ]
    staged: list[StagedRequest] = []
    if escalated or audits:
        outcomes: dict[str, Escalation] = {}
        # escalations come first: when the budget runs short it goes to rows that need an answer, not to audits
        requests = [Request(d.doc_id, d.text or "", d.lines) for d, _ in escalated]
        audit_requests = [Request(d.doc_id, d.text or "", d.lines) for d in audits]
        has_frontier = spec.frontier is not None
        if spec.frontier is not None:
            budget = run.frontier_budget(spec, shard_index)
            if spec.frontier.mode == "batch":
                outcomes, staged = queue_requests(spec, requests, budget, part_url)
            else:
                engine = frontier_engine(spec)
                assert engine is not None
                outcomes = escalate(engine, requests + audit_requests, budget, spec.frontier.unit_price)
        for doc in audits:
            apply_audit(spec, rows[doc.doc_id], outcomes.get(doc.doc_id), small[doc.doc_id])
        for doc, decision in escalated:
            row = rows[doc.doc_id]
            has_small = row.small_answer is not None
            if not has_small and not has_frontier:
                continue  # an error row already says what went wrong
            if not has_small:
                row.error = None
            finish_escalated(row, outcomes.get(doc.doc_id), decision.reason, has_small)
    return [rows[d.doc_id] for d in documents], staged


def _classification(spec: JobSpec, run: RunContext) -> dict[str, Any] | None:
    """What the shard's small engine decided about classification (this process's cached engine, not a new one)."""
    if spec.task.classify is None:
        return None
    choice = getattr(small_engine(spec, run.head_version), "classifier_choice", None)
    return None if choice is None else {**choice.to_json(), "summary": describe(choice)}


@task(name="process-shard", retries=2, retry_delay_seconds=[2, 15], retry_jitter_factor=0.5, cache_policy=NO_CACHE)
def process_shard(spec: JobSpec, shard: Shard, run: RunContext) -> ShardResult:
    """Process one shard end to end and write its Parquet part; retried as a whole on storage errors.

    A shard of a resumed plan whose part the interrupted run already wrote is read back instead of recomputed.
    """
    started = time.perf_counter()
    built_before = engines_built_by_this_thread()
    url = run.part_url(spec, shard.index)
    table = _reusable_part(spec, shard, url) if shard.resume else None
    reused = table is not None
    classification: dict[str, Any] | None = None
    if table is None:
        documents = read_documents(spec.source, shard.refs)
        rows, staged = answer_documents(spec, run, documents, url, shard.index)
        classification = _classification(spec, run)
        table = rows_to_table(rows, spec)
        write_staging(spec, run.run_id, shard.index, staged)  # before the part: a committed row is never orphaned
        if spec.frontier is not None:  # every frontier answer is labeled data (issue 8); before the part, like
            # the staging above, so a part that a resumed run reuses never lacks its labels
            labels_url = spec.output.layout.labels_part(
                run.plan_date or run.run_date, run.plan_id or run.run_id, shard.index
            )
            texts = {d.doc_id: d.text for d in documents if d.text is not None}
            write_labels(spec, labels_url, table, f"{spec.frontier.provider}:{spec.frontier.model}", texts)
        write_parquet(spec.output, url, table)
        write_errors(spec, run, shard.index, table)
    if not spec.runner.distributed:  # same process as the flow: spare it reading the part back
        hand_over_part_state(run.run_id, url, table)
    run.release_allowance(shard.index)
    result = replace(
        shard_result(spec, shard.index, url, table, time.perf_counter() - started, reused=reused),
        worker=f"{socket.gethostname()}:{os.getpid()}",
        engines_built=engines_built_by_this_thread() - built_before,
        classification=classification,
    )
    if classification is not None and result.engines_built:
        get_run_logger().info("classification: %s", classification["summary"])
    get_run_logger().info(
        "shard %d: %d files → %d rows %s in %.1f s%s",
        shard.index,
        shard.size,
        result.rows,
        " ".join(f"{route}={count}" for route, count in sorted(result.routes.items())),
        result.seconds,
        " (part reused from the interrupted run)" if reused else "",
    )
    return result


def shard_result(
    spec: JobSpec, index: int, url: str, table: pa.Table, seconds: float = 0.0, *, reused: bool = False
) -> ShardResult:
    """Everything the flow needs from a written part, computed from the part itself so the ledger equals the rows."""
    return ShardResult(
        shard_index=index,
        part_url=url,
        rows=table.num_rows,
        routes=_route_counts(table),
        entries=summarise_part(table, spec),
        seconds=seconds,
        audited=int(pc.sum(table["audited"]).as_py() or 0),
        audit_agreed=int(pc.sum(pc.fill_null(table["audit_agrees"], False)).as_py() or 0),
        escalated=escalated_rows(table),
        reused=reused,
    )


def _reusable_part(spec: JobSpec, shard: Shard, url: str) -> pa.Table | None:
    """The interrupted run's part for this shard, if it was written whole for exactly these files and this spec."""
    if not part_exists(spec.output, url):
        return None
    try:
        table = read_parquet(spec.output, url)
    except Exception:  # a torn or unreadable part is recomputed
        return None
    if table.num_rows == 0 or set(table["source_uri"].to_pylist()) != {r.uri for r in shard.refs}:
        return None
    if set(table["spec_hash"].to_pylist()) != {spec.spec_hash()}:
        return None
    return table


def write_errors(spec: JobSpec, run: RunContext, shard_index: int, table: pa.Table) -> None:
    """Copy the shard's error rows to <output>/errors/ for triage (same name per shard: a retry overwrites)."""
    errors = table.filter(pc.equal(pc.cast(table["route"], pa.string()), "error"))
    if errors.num_rows:
        write_parquet(spec.output, run.errors_url(spec, shard_index), errors)


def escalated_rows(table: pa.Table) -> int:
    """Rows the router escalated: not kept, answered by the small model (or failed there), and not an audit.

    An unreadable document never reached the router, and an audited row the frontier corrected was kept first.
    """
    if table.num_rows == 0:
        return 0
    not_kept = pc.not_equal(pc.cast(table["route"], pa.string()), "small")
    routed = pc.and_(not_kept, pc.is_valid(table["small_model"]))
    escalated = pc.and_(routed, pc.invert(pc.fill_null(table["audited"], False)))
    return int(pc.sum(escalated).as_py() or 0)


def _route_counts(table: pa.Table) -> dict[str, int]:
    counts = table.group_by("route").aggregate([("doc_id", "count")])
    return {
        str(route): int(count)
        for route, count in zip(counts["route"].to_pylist(), counts["doc_id_count"].to_pylist(), strict=True)
    }
