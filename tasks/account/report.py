"""Write the run's ledger files and publish its Prefect artifacts.

Artifacts use stable keys per job (`<job>-summary`, `<job>-costs`, `<job>-progress`, `<job>-output`), so the
Prefect UI's Artifacts page keeps each one's history across runs. The manifest is written last: a run whose
manifest exists has all its parts committed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import pyarrow as pa
from prefect import task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.exceptions import MissingContextError

from docroute.schemas.evolution import AnswerSchema
from docroute.schemas.spec import JobSpec
from docroute.schemas.summary import CommittedPart, LedgerEntry
from docroute.tasks.account.ledger import RUN_SCHEMA, cost_table
from docroute.tasks.account.progress import Bar, bar
from docroute.tasks.account.trend import read_run_records, version_trend
from docroute.tasks.store.state import prune_snapshots
from docroute.tasks.store.write import write_json, write_parquet


def _in_run() -> bool:
    return FlowRunContext.get() is not None


@dataclass
class Progress:
    """The run's progress: its Prefect artifact (updated at most every PROGRESS_EVERY_S, each update is an API
    call; None outside a flow run) and its terminal bar (silent unless the CLI shows one)."""

    artifact_id: UUID | None
    bar: Bar
    last_sent: float = field(default_factory=time.monotonic)


PROGRESS_EVERY_S = 2.0


def start_progress(spec: JobSpec, shards: int) -> Progress:
    """Create the progress artifact (none outside a flow run, e.g. from a plain script) and the terminal bar."""
    artifact_id = None
    if _in_run():
        try:
            artifact_id = create_progress_artifact(
                progress=0.0, key=f"{spec.name}-progress", description=f"{spec.name}: shards done out of {shards}"
            )
        except MissingContextError:  # pragma: no cover - guarded above
            artifact_id = None
    return Progress(artifact_id, bar(f"{spec.name}: shards", shards))


def update_progress(progress: Progress, done: int, total: int) -> None:
    """Report shards done: the bar at once, the artifact unless its last report is recent (except the last)."""
    progress.bar.advance()
    if done >= total:
        progress.bar.finish()
    if progress.artifact_id is None:
        return
    now = time.monotonic()
    if done < total and now - progress.last_sent < PROGRESS_EVERY_S:
        return
    from prefect.artifacts import update_progress_artifact

    update_progress_artifact(artifact_id=progress.artifact_id, progress=100.0 * done / max(total, 1))
    progress.last_sent = now


def output_link(url: str) -> str:
    """A link the UI can render: a local folder as a file:// URI, anything else (s3://, gs://…) as it is."""
    return url if "://" in url else Path(url).resolve().as_uri()


def _money(value: float | None) -> str:
    from docroute.schemas.pricing import format_usd

    return "—" if value is None else format_usd(value)


def summary_markdown(
    spec: JobSpec, record: dict[str, Any], entries: list[LedgerEntry], classification: str | None = None
) -> str:
    """The run summary shown in the Prefect UI; `classification` says how the small model classified and why."""
    lines = [
        f"# docroute · {spec.name}",
        "",
        f"Run `{record['run_id']}` on {record['run_date']}: **{record['documents']} documents** in "
        f"{record['wall_seconds']:.1f} s, written to `{spec.output.url}`.",
        "",
        "| route | documents |",
        "|---|---:|",
    ]
    lines += [f"| {route} | {record[route]} |" for route in ("small", "frontier", "deferred", "error")]
    lines += [
        "",
        "| spend | USD |",
        "|---|---:|",
        f"| small model | {_money(record['small_cost_usd'])} |",
        f"| frontier | {_money(record['frontier_cost_usd'])} |",
        f"| **total** | **{_money(record['cost_usd'])}** |",
        f"| all-frontier estimate | {_money(record['all_frontier_usd'])} |",
    ]
    if record["savings_pct"] is not None:
        lines.append(f"| savings | {record['savings_pct']:.1f}% |")
    if record["max_frontier_usd"] is not None:
        lines.append(f"| frontier cap | {_money(record['max_frontier_usd'])} |")
    if record["deferred"]:
        lines += [
            "",
            f"{record['deferred']} rows were deferred with the small model's answer; the next run retries them.",
        ]
    lines += [
        "",
        f"Small model: `{record['small_model']}` · frontier: `{record['frontier_model'] or 'none'}`.",
    ]
    if classification:
        lines += ["", f"Classification: {classification}."]
    return "\n".join(lines)


@task(name="write-ledger", retries=3, retry_delay_seconds=[1, 5, 20], cache_policy=NO_CACHE)
def write_ledger(
    spec: JobSpec,
    record: dict[str, Any],
    entries: list[LedgerEntry],
    parts: Sequence[CommittedPart],
    *,
    manifest: str,
    plan_id: str,
    snapshot: str | None = None,
    previous_snapshot: str | None = None,
    classification: str | None = None,
    answer_schema: AnswerSchema | None = None,
) -> dict[str, str]:
    """Write the cost table and run row, then the manifest that commits them, the plan's parts and the state
    `snapshot` (already written); publish the artifacts. The manifest also records `answer_schema`, the answer
    columns the run wrote and those retired before it (schemas/evolution.py), which the next run compares with.

    Until the manifest exists none of this run's files count: the next run reads the previous committed state.
    The flow fixes the manifest's name before the first try, so a retry after the manifest was written rewrites
    the same file instead of committing the run twice.
    """
    run_id, run_date = record["run_id"], record["run_date"]
    costs = spec.output.layout.costs(run_date, run_id)
    runs = spec.output.layout.run_record(run_date, run_id)
    write_parquet(spec.output, costs, cost_table(entries, spec, run_id=run_id, run_date=run_date))
    write_parquet(spec.output, runs, pa.Table.from_pylist([record], schema=RUN_SCHEMA))
    write_json(
        spec.output,
        manifest,
        {
            "run": record,
            "plan_id": plan_id,
            "parts": [part.model_dump() for part in parts],
            "costs": costs,
            "runs": runs,
            "state": snapshot,
            **({"schema": answer_schema.to_json()} if answer_schema is not None else {}),
        },
    )
    if snapshot is not None:  # readers part-way through the previous snapshot keep it; older ones go
        prune_snapshots(spec.output, [snapshot, *([previous_snapshot] if previous_snapshot else [])])
    if _in_run():
        create_markdown_artifact(
            markdown=summary_markdown(spec, record, entries, classification),
            key=f"{spec.name}-summary",
            description=f"docroute run summary for {spec.name}",
        )
        create_table_artifact(
            table=[
                {
                    "route": e.route,
                    "role": e.role,
                    "model": e.model or "—",
                    "documents": e.documents,
                    "input_tokens": e.input_tokens,
                    "output_tokens": e.output_tokens,
                    "cost_usd": round(e.cost_usd, 6),
                    "engine_seconds": round(e.engine_seconds, 2),
                }
                for e in entries
            ],
            key=f"{spec.name}-costs",
            description=f"docroute cost ledger for {spec.name} (run {run_id})",
        )
        create_link_artifact(
            link=output_link(spec.output.url),
            link_text=f"{spec.name} results: {spec.output.url}",
            key=f"{spec.name}-output",
            description=f"where run {run_id} wrote its Parquet; its manifest is {manifest}",
        )
        trend = version_trend(read_run_records(spec))
        if trend:
            create_table_artifact(
                table=trend,
                key=f"{spec.name}-versions",
                description=f"escalation rate and cost per 1,000 documents by router/head version (run {run_id})",
            )
        agreement = record.get("audit_agreement")
        if agreement is not None and agreement < spec.routing.target_accuracy:
            create_markdown_artifact(
                markdown=(
                    f"# Audit warning · {spec.name}\n\nRun `{run_id}`: the frontier agreed with "
                    f"{agreement:.1%} of {record['audited']} audited answers the small model kept, below the target "
                    f"accuracy of {spec.routing.target_accuracy:.1%}. The documents may have drifted from the "
                    "calibration set: run `docroute calibrate` again."
                ),
                key=f"{spec.name}-audit-warning",
                description="audit agreement below target",
            )
    return {"manifest": manifest, "costs": costs, "runs": runs, "state": snapshot or ""}
