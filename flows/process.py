"""The main flow: discover → select what changed → plan → one task per shard → state, ledger and manifest.

The flow only sequences. It keeps at most `runner.max_workers` shards in flight and spills per-document metadata
to local hash buckets, so memory stays bounded by the window, not the corpus; a shard that fails after its retries
still yields one error row per document; the manifest, written last, commits the run. The current table follows
the manifests: synced at the start of every run (a run that died after its manifest left it behind) and right
after the manifest (tasks/store/table.py).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import flow_run
from prefect.task_runners import TaskRunner
from prefect.utilities.annotations import quote

from docroute.engines.local.classify_choice import describe
from docroute.flows.run_liveness import mark_dead_runs_crashed
from docroute.flows.runners import shard_task_options, shard_task_runner
from docroute.schemas.documents import Shard
from docroute.schemas.evolution import AnswerSchema, Evolution, evolve
from docroute.schemas.load import load_job, with_output
from docroute.schemas.rows import rows_to_table
from docroute.schemas.spec import JobSpec
from docroute.schemas.summary import CommittedPart, LedgerEntry, RunSummary
from docroute.tasks.account.ledger import merge_entries, run_record
from docroute.tasks.account.report import start_progress, update_progress, write_ledger
from docroute.tasks.answer.budget import AllowanceBook, release_run_budget
from docroute.tasks.answer.frontier_batches import collect_frontier_batches, submit_frontier_batches
from docroute.tasks.answer.outcome import failed_shard_rows
from docroute.tasks.ingest.discover import discover_documents
from docroute.tasks.model.infer import require_concurrency_limit, settle_classifier_choice
from docroute.tasks.route.router import usable_router
from docroute.tasks.shard import RunContext, ShardResult, process_shard, shard_result, write_errors
from docroute.tasks.store.lease import OutputLease, acquire_lease
from docroute.tasks.store.plan import RunPlan, clean_up_after_commit, make_plan, write_plan
from docroute.tasks.store.schema_record import committed_answer_schema
from docroute.tasks.store.scratch import run_scratch, sweep_stale_scratch
from docroute.tasks.store.spill import BucketSpill
from docroute.tasks.store.state import (
    RunState,
    Todo,
    forget_handed_over,
    latest_manifest,
    open_run_state,
    select_todo,
    take_part_state,
    write_merged_state,
)
from docroute.tasks.store.table import TableSync, sync_current_table
from docroute.tasks.store.write import read_parquet, write_parquet


def _run_id() -> str:
    current = flow_run.get_id()
    return str(current) if current else uuid.uuid4().hex


def failed_shard_result(spec: JobSpec, shard: Shard, run: RunContext, reason: str) -> ShardResult:
    """Write one error row per file of a shard that failed for good, so its documents are not lost."""
    rows = failed_shard_rows(spec, shard.refs, run.run_id, reason)
    table = rows_to_table(rows, spec)
    url = run.part_url(spec, shard.index)
    write_parquet(spec.output, url, table)
    write_errors(spec, run, shard.index, table)
    return shard_result(spec, shard.index, url, table)


def run_job(spec: JobSpec, *, full_refresh: bool = False) -> RunSummary:
    """Process the job's new, changed and retryable documents; must run inside a Prefect flow (it submits tasks).

    `full_refresh` ignores the state and processes every listed document again. The run holds the output's lease
    from before it lists anything until its clean-up is done (tasks/store/lease.py), so runs of one output never
    overlap and a dead run's work is taken over without a person. Per-document metadata (listing, state, to-do
    list) lives in hash buckets on local disk for the run, so memory does not grow with the bucket.
    """
    logger = get_run_logger()
    run_id = _run_id()
    lease = acquire_lease(spec.output, run_id=run_id, flow_run_id=_flow_run_id(), ttl_s=spec.output.lease_ttl_s)
    if lease.takeover is not None:
        dead = lease.takeover.previous
        logger.warning(
            "%s was dead (%s) and never released the output: this run took over its lease%s and resumes its work",
            dead.describe(),
            lease.takeover.verdict.value,
            ", and marked its flow run Crashed" if lease.takeover.flow_run_marked_crashed else "",
        )
    if swept := sweep_stale_scratch():
        logger.info("removed %d scratch folder(s) that killed runs left behind", swept)
    if crashed := mark_dead_runs_crashed(current=flow_run.get_id()):
        logger.warning("marked %d flow run(s) Crashed whose process on this machine had died", crashed)
    with lease.released_after("committed", logger), run_scratch() as scratch:
        return _run_job(spec, scratch, run_id, lease, full_refresh=full_refresh)


def _flow_run_id() -> str | None:
    current = flow_run.get_id()
    return str(current) if current else None


def _settle_classifier_choice(spec: JobSpec, head_version: str | None, logger: Any) -> None:
    """Workers in other processes then read one stored choice instead of each measuring (tasks/model/infer.py)."""
    try:
        choice = settle_classifier_choice(spec, head_version)
    except Exception as exc:  # not fatal: each worker then measures for itself, as without this step
        logger.warning("could not measure the classifier's encoders before the shards (each worker will): %s", exc)
        return
    if choice is not None:
        logger.info("classification for every worker: %s", describe(choice))


def _run_job(spec: JobSpec, scratch: Path, run_id: str, lease: OutputLease, *, full_refresh: bool) -> RunSummary:
    """The README's data path, one step a line. Steps that add to the run's local state get its buckets by name
    (`spill=`), so nothing is written on the side of a call that seems only to return a value."""
    logger = get_run_logger()
    started = datetime.now(UTC)
    # the job's answer columns against the committed ones, before this run writes anything: a field added or
    # removed evolves the schema, a changed type or label set needs --full-refresh (schemas/evolution.py)
    evolution = _evolve_schema(spec, logger, full_refresh=full_refresh)
    # the current table up to the newest manifest, before this run changes anything (a run that died after its
    # manifest, or a deleted table)
    _log_table_sync(sync_current_table(spec), logger, when="start")
    run = _run_context(spec, run_id, started, logger)
    # discover: the source's listing, spilled to a local Arrow file
    listing_file = scratch / "listing.arrow"
    listed = discover_documents(spec, str(listing_file))
    # state and plan: what changed since the last commit, cut into shards whose part files are named before any work
    state = open_run_state(spec.output, listing_file, listed, scratch / "state", full_refresh=full_refresh)
    todo = select_todo(state, spec)
    plan = _plan(spec, run, todo, listed, logger)
    run = replace(run, plan_id=plan.plan_id, plan_date=plan.run_date)
    if spec.runner.distributed and plan.documents:
        _settle_classifier_choice(spec, run.head_version, logger)
    # shards: small model, route, frontier; each finished part's state rows are spilled into the run's state
    results = _collect_frontier_batches(spec, run, spill=state.by_document)
    results += _process_shards(spec, run, plan, spill=state.by_file, logger=logger)
    _submit_frontier_batches(spec, run, logger)
    results.sort(key=lambda r: r.shard_index)
    # commit: state snapshot, ledger, then the manifest that makes this run's files count; then the current table
    # and the clean-up
    committed = _commit(spec, run, plan, state, results, lease, started, evolution.schema)
    lease.check()
    _log_table_sync(sync_current_table(spec), logger, when="commit")  # after the manifest: never ahead of it
    clean_up_after_commit(spec, plan, committed=[part.url for part in committed.parts])
    return _summary(committed, results, listed=listed, todo=todo, plan=plan)


def _evolve_schema(spec: JobSpec, logger: Any, *, full_refresh: bool) -> Evolution:
    """The answer schema this run records in its manifest, one log line per column it changes; raises
    SchemaChangeError (exit 2) for a changed type, enum values or label set unless `full_refresh`."""
    evolution = evolve(committed_answer_schema(spec.output), spec, full_refresh=full_refresh)
    for change in evolution.changes:
        (logger.warning if change.refused else logger.info)("answer schema: %s", change.describe())
    return evolution


def _log_table_sync(sync: TableSync, logger: Any, *, when: Literal["start", "commit"]) -> None:
    """One line per sync that wrote something; a start-of-run repair is worth a warning (a run died after its
    manifest, or the table was deleted)."""
    if sync.wrote:
        log = logger.warning if when == "start" else logger.info
        log("current table (%s): %s", when, sync.describe())


def _run_context(spec: JobSpec, run_id: str, started: datetime, logger: Any) -> RunContext:
    """What every shard shares, fixed before listing: the router in force and the frontier's concurrency slots."""
    router, why = usable_router(spec)
    logger.info("routing: %s", why)
    _warn_if_output_is_temporary(spec, logger)
    if spec.frontier is not None and spec.frontier.concurrency_limit:
        slots = require_concurrency_limit(spec.frontier.concurrency_limit)
        logger.info("frontier calls hold slots of %r: at most %d in flight", spec.frontier.concurrency_limit, slots)
    return RunContext(
        run_id=run_id,
        run_date=started.date(),
        router_version=router.version if router else None,
        head_version=router.head_version if router else None,
        thresholds=router.thresholds() if router else None,
    )


def _plan(spec: JobSpec, run: RunContext, todo: Todo, listed: int, logger: Any) -> RunPlan:
    """Cut the to-do list into shards and write the plan before any part, so a run killed mid-way is resumed."""
    plan = make_plan(spec, todo.files, todo.rows, run.run_id, run.run_date)
    write_plan(spec.output, plan, run.run_id)
    logger.info(
        "job %s: %d files listed; processing %d (%d new, %d changed, %d retried) in %d shards, %d up to date%s "
        "(run %s)",
        spec.name,
        listed,
        plan.documents,
        todo.new,
        todo.changed,
        todo.retry,
        plan.shard_count(),
        todo.up_to_date,
        f", resuming interrupted run {plan.resumed_from}" if plan.resumed_from else "",
        run.run_id,
    )
    return plan


def _collect_frontier_batches(spec: JobSpec, run: RunContext, *, spill: BucketSpill) -> list[ShardResult]:
    """Parts of the frontier batches answered since the last run, whose rows leave `deferred` (batch mode only).

    Their state rows go to `spill` (by document: a batch answers some documents of a file, not all of them).
    """
    if spec.frontier is None or spec.frontier.mode != "batch":
        return []
    results: list[ShardResult] = []
    for number, batch in enumerate(collect_frontier_batches(spec, run.run_id, run.run_date)):
        table = read_parquet(spec.output, batch.part_url)
        result = shard_result(spec, -1 - number, batch.part_url, table)
        _spill_part_state(spec, run.run_id, result.part_url, spill)
        results.append(result)
    return results


def _process_shards(
    spec: JobSpec, run: RunContext, plan: RunPlan, *, spill: BucketSpill, logger: Any
) -> list[ShardResult]:
    """One Prefect task per shard, at most `runner.max_workers` in flight; a shard that fails for good still yields
    one error row per document. Each finished part's state rows go to `spill` (by file) as it arrives."""
    shard_count = plan.shard_count()
    progress = start_progress(spec, shard_count)
    pending = plan.shards()  # built one at a time: only shards in flight hold their refs
    cap = spec.routing.max_frontier_usd
    allowances = AllowanceBook(cap, spec.runner.max_workers) if spec.runner.distributed and cap is not None else None
    results: list[ShardResult] = []
    running: dict[PrefectFuture[ShardResult], Shard] = {}
    try:
        with shard_task_runner(spec.runner) as runner, shard_task_options(spec.runner):
            while True:
                while len(running) < spec.runner.max_workers and (shard := next(pending, None)) is not None:
                    running[_submit_shard(runner, spec, run, shard, allowances)] = shard
                if not running:
                    break
                finished = next(iter(as_completed(list(running))))
                shard = running.pop(finished)
                spent: float | None = None  # unknown for a shard that failed: its whole allowance counts
                try:
                    result = finished.result()
                    spent = result.frontier_usd
                except Exception as exc:  # a shard that failed for good still yields its rows
                    logger.error("shard %d failed after retries: %s", shard.index, exc)
                    result = failed_shard_result(spec, shard, run, f"{type(exc).__name__}: {exc}")
                if allowances is not None:
                    allowances.settle(shard.index, spent)
                _spill_part_state(spec, run.run_id, result.part_url, spill, handed_over=spent is not None)
                results.append(result)
                update_progress(progress, len(results), shard_count)
    finally:
        release_run_budget(run.run_id)
        forget_handed_over(run.run_id)
    return results


def _submit_shard(
    runner: TaskRunner[Any], spec: JobSpec, run: RunContext, shard: Shard, allowances: AllowanceBook | None
) -> PrefectFuture[ShardResult]:
    if allowances is not None:
        run = replace(run, shard_allowance_usd=allowances.grant(shard.index))
    parameters: dict[str, Any] = {"spec": spec, "shard": shard, "run": run}
    if not spec.runner.distributed:  # prefect-dask/ray rebuild `quote` as a plain tuple
        # quoted, Prefect does not walk every field of every ref looking for futures (~20% of a run's time with an
        # instant engine)
        parameters = {name: quote(value) for name, value in parameters.items()}
    return runner.submit(process_shard, parameters=parameters)


def _submit_frontier_batches(spec: JobSpec, run: RunContext, logger: Any) -> None:
    """Send the escalations the shards queued to the batch API (batch mode only)."""
    if spec.frontier is None or spec.frontier.mode != "batch":
        return
    try:
        submit_frontier_batches(spec, run.run_id)
    except Exception as exc:  # the queued requests stay staged; the next run submits them
        logger.warning("could not submit the frontier batch, the next run will: %s", exc)


@dataclass(frozen=True, slots=True)
class _Committed:
    """What the commit wrote: the ledger's run row, the files that commit it, its entries and the parts it counts."""

    record: dict[str, Any]
    files: dict[str, str]
    entries: list[LedgerEntry]
    parts: list[CommittedPart]


def _commit(
    spec: JobSpec,
    run: RunContext,
    plan: RunPlan,
    state: RunState,
    results: list[ShardResult],
    lease: OutputLease,
    started: datetime,
    answers: AnswerSchema,
) -> _Committed:
    """The state snapshot, then the ledger and the manifest, written last: until it exists none of this counts.

    The lease is checked before each write, so a run that lost the output to another never commits over its work.
    The manifest records `answers`, the answer schema the next run compares its job with.
    """
    previous = latest_manifest(spec.output)
    snapshot = spec.output.layout.state_snapshot(run.run_id)
    lease.check()
    write_merged_state(spec.output, snapshot, state, run_id=run.run_id, processed_at=started)
    entries = merge_entries([e for r in results for e in r.entries])
    record = run_record(
        spec,
        entries,
        run_id=run.run_id,
        run_date=run.run_date,
        started_at=started,
        finished_at=datetime.now(UTC),
        parts=len(results),
        router_version=run.router_version,
        head_version=run.head_version,
        audited=sum(r.audited for r in results),
        audit_agreed=sum(r.audit_agreed for r in results),
        escalated=sum(r.escalated for r in results),
    )
    parts = [CommittedPart(url=r.part_url, rows=r.rows, shard=r.shard_index, reused=r.reused) for r in results]
    lease.check()
    files = write_ledger(
        spec,
        record,
        entries,
        parts,
        manifest=spec.output.layout.manifest(run.run_id, datetime.now(UTC)),
        plan_id=plan.plan_id,
        snapshot=snapshot,
        previous_snapshot=previous.get("state") if previous else None,
        classification=next((r.classification["summary"] for r in results if r.classification), None),
        answer_schema=answers,
    )
    return _Committed(record, files, entries, parts)


def _summary(
    committed: _Committed, results: list[ShardResult], *, listed: int, todo: Todo, plan: RunPlan
) -> RunSummary:
    # the run row counts its parts; the summary lists them
    record = {key: value for key, value in committed.record.items() if key != "parts"}
    return RunSummary(
        **record,
        **committed.files,
        entries=tuple(committed.entries),
        parts=tuple(committed.parts),
        listed=listed,
        up_to_date=todo.up_to_date,
        retried=todo.retry,
        resumed_from=plan.resumed_from,
        worker_processes=len({r.worker for r in results if r.worker}),
        engines_built=sum(r.engines_built for r in results),
        classification=next((r.classification for r in results if r.classification), None),
    )


def _warn_if_output_is_temporary(spec: JobSpec, logger: Any) -> None:
    """A deployment run works in the repository clone its pull steps made, which a worker may delete afterwards:
    a local output resolved inside it would vanish with it, and the next run would redo everything."""
    url = spec.output.url
    context = FlowRunContext.get()
    if context is None or context.flow_run is None or context.flow_run.deployment_id is None or "://" in url:
        return
    here = Path.cwd().resolve()
    if Path(url).resolve().is_relative_to(here):
        logger.warning(
            "output %s is inside this run's working directory %s, which the worker may delete after the run: "
            "give the job an absolute output path outside it, or object storage (s3://…)",
            url,
            here,
        )


def _spill_part_state(
    spec: JobSpec, run_id: str, part_url: str, spill: BucketSpill, *, handed_over: bool = True
) -> None:
    """Add a written part's state rows (handed over in-process, or read back from it) to the run's local buckets."""
    spill.add(take_part_state(spec.output, run_id, part_url, handed_over=handed_over))


@flow(name="process-documents", log_prints=False)
def process_documents(
    job: str, output: str | None = None, full_refresh: bool = False, compact: bool = False
) -> RunSummary:
    """Classify and/or extract the new and changed documents of a job file; returns the run summary.

    `job` is the path of the job's YAML file; `output`, when given, replaces the job's output URL;
    `full_refresh` reprocesses every document instead of only what changed since the last committed run;
    `compact` runs `docroute compact` after the run has committed (the nightly deployment's optional last step).
    """
    spec = with_output(load_job(Path(job)), output)
    summary = run_job(spec, full_refresh=full_refresh)
    if compact:
        _compact_after_run(job, output)
    return summary


def _compact_after_run(job: str, output: str | None) -> None:
    """Housekeeping after a committed run: a compaction that fails is its own Failed flow run in the UI and a
    logged error here, never a failed run (the run's rows are committed whatever happens to the compaction)."""
    from docroute.flows.compact import compact_output

    try:
        compact_output(job, output=output)
    except Exception as exc:
        get_run_logger().error("the compaction after this run failed: %s", exc)
