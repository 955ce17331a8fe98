"""The compaction flow: plan → rewrite → commit → table → retention, one Prefect task per step, under the lease.

`docroute compact JOB` and the optional nightly step (deployments/prefect.yaml) run it. It takes the output's
lease like a run (tasks/store/lease.py): a live run holding it stops the compaction before it reads anything
(`RunInProgressError`, exit 3), a dead holder's lease is taken over, and an open plan is then a dead run's, which
the compaction leaves for the next run to adopt. The sequence and its steps are in tasks/store/compact.py; this
module only runs each step as a task, so the Prefect UI shows where a compaction spent its time or failed.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from docroute.schemas.load import load_job, with_output
from docroute.tasks.account.progress import Bar, bar
from docroute.tasks.store import compact as steps
from docroute.tasks.store.compact import CompactionReport

_STEPS: dict[Callable[..., Any], Any] = {
    steps.plan_compaction: task(name="compaction-plan", cache_policy=NO_CACHE)(steps.plan_compaction),
    steps.rewrite_parts: task(name="compaction-rewrite", cache_policy=NO_CACHE)(steps.rewrite_parts),
    steps.commit_compaction: task(name="compaction-commit", cache_policy=NO_CACHE)(steps.commit_compaction),
    # idempotent, so a transient storage error is retried
    steps.maintain_table: task(name="table-maintenance", retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE)(
        steps.maintain_table
    ),
    steps.apply_retention: task(name="retention", retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE)(
        steps.apply_retention
    ),
}


def _as_task(shown: Bar) -> Callable[..., Any]:
    """Each step as its Prefect task, moving the terminal bar (tasks/account/progress.py) as it ends."""

    def run_step(function: Callable[..., Any], *args: Any) -> Any:
        result = _STEPS[function](*args)
        shown.advance()
        return result

    return run_step


@flow(name="compact-output", log_prints=False)
def compact_output(
    job: str, output: str | None = None, retention_hours: float | None = None, target_file_mb: float | None = None
) -> CompactionReport:
    """Compact a job's output: coalesce small results parts per run date, optimize and vacuum the current table,
    delete what no reader or adoptable run needs once older than the retention period.

    `retention_hours` and `target_file_mb` override the job's `output.compaction` settings.
    """
    spec = with_output(load_job(Path(job)), output)
    if target_file_mb is not None:
        settings = spec.output.compaction.model_copy(update={"target_file_mb": target_file_mb})
        spec = spec.model_copy(update={"output": spec.output.model_copy(update={"compaction": settings})})
    current = flow_run.get_id()
    with bar(f"{spec.name}: compaction steps", len(_STEPS)) as shown:
        report = steps.compact(
            spec,
            compaction_id=str(current) if current else uuid.uuid4().hex,
            flow_run_id=str(current) if current else None,
            retention_hours=retention_hours,
            step=_as_task(shown),
            logger=get_run_logger(),
        )
        if report.manifest is None:  # nothing to rewrite: plan, table and retention were all the steps
            shown.set_total(len(_STEPS) - 2)
        return report
