"""The plan and commit rules on their own: fast, no model, no Prefect server.

Regression tests for what issue 14 found on main: a resumed run that died between its manifest and its clean-up
left a plan that the next run "resumed" with nothing to do, deleting the committed parts; a retried commit wrote a
second manifest for the same run. The end-to-end versions, with real process kills, are in test_crash_recovery.py.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pyarrow as pa
from corpus import topic_job_yaml

from docroute.schemas.documents import LISTING_SCHEMA
from docroute.schemas.load import load_job
from docroute.schemas.spec import JobSpec
from docroute.schemas.summary import RunSummary
from docroute.tasks.account.ledger import RUN_SCHEMA, run_record
from docroute.tasks.account.report import write_ledger
from docroute.tasks.store.plan import Executor, RunPlan, clean_up_after_commit, make_plan, write_plan
from docroute.tasks.store.write import write_json, write_parquet

DAY = date(2026, 11, 30)


def _spec(tmp_path: Path) -> JobSpec:
    (tmp_path / "docs").mkdir(exist_ok=True)
    job = tmp_path / "job.yaml"
    job.write_text(topic_job_yaml(tmp_path / "docs", tmp_path / "out", shard_size=2), encoding="utf-8")
    return load_job(job)


def _listing(count: int) -> pa.Table:
    uris = [f"file:///docs/d{i}.txt" for i in range(count)]
    return pa.table({"uri": uris, "path": uris, "size": [10] * count, "etag": ["e"] * count}, schema=LISTING_SCHEMA)


def _write_open_plan(spec: JobSpec, plan_id: str, executor: str, listing: pa.Table) -> RunPlan:
    shards = pa.array([i // spec.shard_size for i in range(listing.num_rows)], pa.int64())
    plan = RunPlan(
        plan_id,
        DAY,
        spec.spec_hash(),
        spec.shard_size,
        listing.add_column(0, "shard", shards),
        executors=[Executor(executor, DAY)],
    )
    write_plan(spec.output, plan, executor)
    for shard in {int(s) for s in shards.to_pylist()}:
        write_parquet(spec.output, spec.output.layout.results_part(DAY, plan_id, shard), pa.table({"doc_id": ["x"]}))
    return plan


def _commit(spec: JobSpec, run_id: str, plan_id: str, shards: int, *, name_the_plan: bool) -> list[str]:
    parts = [spec.output.layout.results_part(DAY, plan_id, s) for s in range(shards)]
    manifest: dict[str, object] = {"run": {"run_id": run_id}, "parts": [{"url": u} for u in parts], "state": None}
    if name_the_plan:
        manifest["plan_id"] = plan_id
    write_json(spec.output, spec.output.layout.manifest(run_id, datetime.now(UTC) + timedelta(seconds=1)), manifest)
    return parts


def test_a_plan_whose_work_a_resumed_run_committed_is_closed_not_resumed(tmp_path: Path) -> None:
    """The dead run's plan id differs from the id of the run that committed it: only the manifest can tell."""
    spec = _spec(tmp_path)
    for name_the_plan in (True, False):  # manifests written before they named their plan: found by part names
        plan_id = f"dead-{name_the_plan}"
        _write_open_plan(spec, plan_id, executor=f"resumer-{name_the_plan}", listing=_listing(4))
        committed = _commit(spec, f"resumer-{name_the_plan}", plan_id, shards=2, name_the_plan=name_the_plan)
        # the next run has nothing to do (every document is up to date)
        plan = make_plan(spec, [], 0, "next-run", DAY)
        assert plan.resumed_from is None and plan.plan_id == "next-run"
        assert plan_id in plan.obsolete_plans and not plan.obsolete_parts
        clean_up_after_commit(spec, plan, committed=[])
        assert all(Path(url).exists() for url in committed)  # committed parts stay
        assert not Path(spec.output.layout.plan(plan_id)).exists()  # the stale plan file goes


def test_an_open_plan_is_adopted_and_only_its_uncommitted_parts_can_go(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    listing = _listing(4)
    _write_open_plan(spec, "crashed", executor="crashed", listing=listing)
    # the files of shard 1 left the source; shard 0 is still to do
    todo_file = tmp_path / "todo.arrow"
    with pa.OSFile(str(todo_file), "wb") as sink, pa.ipc.new_file(sink, LISTING_SCHEMA) as writer:
        writer.write_table(listing.slice(0, 2))
    plan = make_plan(spec, [todo_file], 2, "rescuer", DAY)
    assert plan.resumed_from == "crashed" and plan.plan_id == "crashed" and plan.resumable == frozenset({0})
    dropped = spec.output.layout.results_part(DAY, "crashed", 1)
    assert dropped in plan.obsolete_parts
    assert [e.run_id for e in plan.executors] == ["crashed", "rescuer"]
    clean_up_after_commit(spec, plan, committed=[spec.output.layout.results_part(DAY, "crashed", 0)])
    assert not Path(dropped).exists() and Path(spec.output.layout.results_part(DAY, "crashed", 0)).exists()


def test_a_retried_commit_rewrites_its_manifest_instead_of_adding_one(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    now = datetime.now(UTC)
    record = run_record(spec, [], run_id="r1", run_date=DAY, started_at=now, finished_at=now, parts=0)
    manifest = spec.output.layout.manifest("r1", now)
    for _ in range(3):  # Prefect retries the task after a failure that came after the manifest
        write_ledger.fn(spec, record, [], [], manifest=manifest, plan_id="r1")
    manifests = list((Path(spec.output.url) / "manifests").glob("*.json"))
    assert len(manifests) == 1 and json.loads(manifests[0].read_text())["plan_id"] == "r1"


def test_the_run_summary_carries_every_figure_of_the_run_row(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    now = datetime.now(UTC)
    record = run_record(spec, [], run_id="r1", run_date=DAY, started_at=now, finished_at=now, parts=0)
    # the row counts its parts; the summary lists them (CommittedPart), under the same name
    assert set(record) == set(RUN_SCHEMA.names)
    assert set(RUN_SCHEMA.names) - {"parts"} <= set(RunSummary.model_fields)
