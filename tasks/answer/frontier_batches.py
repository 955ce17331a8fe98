"""Frontier batch mode: queue escalations during a run, submit one batch at its end, collect it on a later run.

State lives in the output, so any worker and any later run can resume:
    <output>/state/frontier_batches/staging/<run_id>/<shard>.jsonl   queued requests, written by shard tasks
    <output>/state/frontier_batches/<batch_id>.json                 a submitted batch: its requests and status
Rows wait as `deferred` (with the small model's answer) until the batch is collected; the collecting run writes
their new version to its own results, so the latest `processed_at` per `doc_id` is the current answer.
"""

from __future__ import annotations

import json
import posixpath
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from docroute.engines.base import Request
from docroute.schemas.rows import ResultRow, row_from_record, rows_to_table
from docroute.schemas.spec import JobSpec
from docroute.tasks.account.ledger import summarise_part
from docroute.tasks.answer.budget import FrontierBudget
from docroute.tasks.answer.escalate import DeferReason, Escalation, budget_exhausted_message
from docroute.tasks.answer.outcome import finish_escalated
from docroute.tasks.store.write import write_json, write_parquet

_BATCH_FRONTIERS: dict[str, Any] = {}


def batch_frontier(spec: JobSpec) -> Any:
    """This process's batch client for the job's frontier (OpenAI)."""
    from docroute.engines.remote.openai_batch import OpenAIBatchFrontier

    assert spec.frontier is not None
    key = spec.spec_hash() + spec.frontier.model_dump_json(exclude={"api_key"})
    if key not in _BATCH_FRONTIERS:
        _BATCH_FRONTIERS[key] = OpenAIBatchFrontier(spec.frontier, spec.task)
    return _BATCH_FRONTIERS[key]


QUEUED = "queued for the frontier batch API"


@dataclass(frozen=True, slots=True)
class StagedRequest:
    """One escalation waiting for submission: the batch input line and where its row was written."""

    doc_id: str
    part_url: str
    line: str
    text: str = ""  # the document as the model saw it: kept with the batch so its answer becomes a label


def queue_requests(
    spec: JobSpec, requests: Sequence[Request], budget: FrontierBudget, part_url: str
) -> tuple[dict[str, Escalation], list[StagedRequest]]:
    """Reserve each request's worst case at the batch price; queue what fits, defer the rest for the budget.

    The worst case is the request's one call (a batch answer is final: no repair round), its output bounded by the
    answer schema where it has a bound (the request body asks for no more). It counts as spent at once: the answer
    arrives in a later run.
    """
    assert spec.frontier is not None
    frontier = batch_frontier(spec)
    price = spec.frontier.unit_price
    outcomes: dict[str, Escalation] = {}
    queued: list[Request] = []
    for request in requests:
        bound = frontier.usage_bound(request)
        worst = price.worst_case_usd(bound.input_tokens, bound.output_tokens, batch=True)
        if budget.try_reserve(worst):
            budget.settle(worst, worst)  # the answer arrives in a later run: count the worst case as spent here
            queued.append(request)
            outcomes[request.id] = Escalation(None, 0.0, QUEUED, DeferReason.QUEUED)
        else:
            message = budget_exhausted_message(worst, budget, batch=True)
            outcomes[request.id] = Escalation(None, 0.0, message, DeferReason.BUDGET_EXHAUSTED)
    lines = frontier.lines(queued)
    staged = [StagedRequest(r.id, part_url, line, r.text) for r, line in zip(queued, lines, strict=True)]
    return outcomes, staged


def write_staging(spec: JobSpec, run_id: str, shard_index: int, staged: Sequence[StagedRequest]) -> None:
    """Persist a shard's queued requests (overwritten on a shard retry, so nothing is queued twice)."""
    if not staged:
        return
    payload = "\n".join(
        json.dumps({"doc_id": s.doc_id, "part": s.part_url, "line": s.line, "text": s.text}) for s in staged
    )
    url = spec.output.layout.frontier_batches("staging", run_id, f"{shard_index:05d}.jsonl")
    fs, path = url_to_fs(url, **spec.output.fsspec_options())
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as handle:
        handle.write(payload.encode("utf-8") + b"\n")


def _read_json_lines(fs: Any, path: str) -> list[dict[str, Any]]:
    with fs.open(path, "rb") as handle:
        return [json.loads(line) for line in handle.read().decode("utf-8").splitlines() if line.strip()]


@task(name="submit-frontier-batches", retries=3, retry_delay_seconds=[2, 10, 30], cache_policy=NO_CACHE)
def submit_frontier_batches(spec: JobSpec, run_id: str) -> list[str]:
    """Submit every staged request (this run's, and any an interrupted run left) as batches; return their ids."""
    from docroute.engines.remote.openai_batch import split_lines

    fs, root = url_to_fs(spec.output.layout.frontier_batches("staging"), **spec.output.fsspec_options())
    if not fs.exists(root):
        return []
    staged_files = sorted(p for p in fs.find(root) if p.endswith(".jsonl"))
    records = [record for path in staged_files for record in _read_json_lines(fs, path)]
    if not records:
        return []
    frontier = batch_frontier(spec)
    by_line = {record["line"]: record for record in records}
    submitted: list[str] = []
    for chunk in split_lines([record["line"] for record in records]):
        batch_id = frontier.submit(chunk, metadata={"docroute_job": spec.name, "docroute_run": run_id})
        requests = {by_line[line]["doc_id"]: by_line[line]["part"] for line in chunk}
        texts = {by_line[line]["doc_id"]: by_line[line].get("text", "") for line in chunk}
        write_json(
            spec.output,
            spec.output.layout.frontier_batches(f"{batch_id}.json"),
            {
                "batch_id": batch_id,
                "job": spec.name,
                "run_id": run_id,
                "model": frontier.name,
                "submitted_at": datetime.now(UTC).isoformat(),
                "status": "submitted",
                "requests": requests,
                "texts": texts,
            },
        )
        submitted.append(batch_id)
    for path in staged_files:  # only once every batch is recorded: a failure before this re-submits, never loses
        fs.rm(path)
    get_run_logger().info("submitted %d frontier batch(es) with %d requests", len(submitted), len(records))
    return submitted


def _rows_of(spec: JobSpec, part_url: str, doc_ids: Sequence[str]) -> list[ResultRow]:
    fs, path = url_to_fs(part_url, **spec.output.fsspec_options())
    with fs.open(path, "rb") as handle:
        table = pq.read_table(handle)
    table = table.filter(pc.is_in(table["doc_id"], value_set=pa.array(list(doc_ids))))
    return [row_from_record(record, spec) for record in table.to_pylist()]


@dataclass(frozen=True)
class CollectedBatch:
    batch_id: str
    part_url: str
    rows: int
    routes: dict[str, int]
    entries: list[Any]


@task(name="collect-frontier-batches", retries=3, retry_delay_seconds=[2, 10, 30], cache_policy=NO_CACHE)
def collect_frontier_batches(spec: JobSpec, run_id: str, run_date: Any) -> list[CollectedBatch]:
    """Collect every finished batch: rewrite its rows with the frontier's answers into this run's results."""
    from docroute.tasks.learn.harvest import write_labels

    fs, root = url_to_fs(spec.output.layout.frontier_batches(), **spec.output.fsspec_options())
    if not fs.exists(root):
        return []
    logger = get_run_logger()
    frontier = batch_frontier(spec)
    assert spec.frontier is not None
    price = spec.frontier.unit_price
    collected: list[CollectedBatch] = []
    for path in sorted(p for p in fs.ls(root, detail=False) if p.endswith(".json")):
        with fs.open(path, "rb") as handle:
            state = json.loads(handle.read())
        if state.get("status") != "submitted":
            continue
        status = frontier.status(state["batch_id"])
        if not status.finished:
            logger.info("frontier batch %s is %s; its rows stay deferred", status.batch_id, status.status)
            continue
        predictions = frontier.collect(status, list(state["requests"]))
        by_part: dict[str, list[str]] = defaultdict(list)
        for doc_id, part in state["requests"].items():
            by_part[part].append(doc_id)
        rows: list[ResultRow] = []
        for part, doc_ids in sorted(by_part.items()):
            for row in _rows_of(spec, part, doc_ids):
                prediction = predictions[row.doc_id]
                cost = price.cost_of(prediction.usage, batch=True)
                reason = row.route_reason.split("; " + QUEUED)[0]
                row.run_id, row.processed_at = run_id, datetime.now(UTC)
                finish_escalated(
                    row,
                    Escalation(prediction, cost),
                    f"{reason}; frontier batch {status.batch_id}",
                    row.small_answer is not None,
                )
                rows.append(row)
        url = spec.output.layout.batch_part(run_date, run_id, status.batch_id)
        table = rows_to_table(rows, spec)
        texts = {doc_id: text for doc_id, text in state.get("texts", {}).items() if text}
        labels_url = spec.output.layout.batch_labels_part(run_date, run_id, status.batch_id)
        write_labels(spec, labels_url, table, f"{spec.frontier.provider}:{spec.frontier.model}", texts)
        write_parquet(spec.output, url, table)
        state.update(
            status="collected",
            batch_status=status.status,
            collected_by=run_id,
            collected_at=datetime.now(UTC).isoformat(),
        )
        write_json(spec.output, spec.output.layout.frontier_batches(posixpath.basename(path)), state)
        routes: dict[str, int] = defaultdict(int)
        for row in rows:
            routes[row.route] += 1
        collected.append(CollectedBatch(status.batch_id, url, len(rows), dict(routes), summarise_part(table, spec)))
        logger.info(
            "collected frontier batch %s (%s): %d rows %s", status.batch_id, status.status, len(rows), dict(routes)
        )
    return collected
