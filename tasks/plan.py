"""A run's plan: its shards and their part files, written before any shard runs, so a crashed run can be resumed.

A run's parts are committed only by its manifest. When a run dies mid-way, its plan stays behind without a
manifest; the next run with the same spec adopts it: it keeps the plan's id (and with it every part file name),
reuses each part the dead run finished whose documents are unchanged, processes the rest, and commits them all
in its own manifest. Parts no plan will use any more (from a plan for another spec, or a shard whose documents
left the source) are deleted at commit. So a crash followed by a re-run yields exactly one committed row per
document: never a duplicate, never a gap. Runs over one output must not overlap (deployments set
`concurrency_limit: 1`): a live run's plan looks like a dead one's.

A plan is a Parquet table (shard, uri, path, size, etag) with its id, date and spec hash in the schema metadata:
a few dozen bytes per document, so planning a million-file bucket stays cheap.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import IO

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from docroute.schemas.spec import JobSpec, OutputSpec
from docroute.tasks.discover import LISTING_SCHEMA, Shard, refs_of
from docroute.tasks.spill import stream_files
from docroute.tasks.state import committed_run_ids
from docroute.tasks.write import atomic_write, read_parquet, results_part_url

PLAN_SCHEMA = pa.schema([pa.field("shard", pa.int64()), *LISTING_SCHEMA])


def plans_dir(output: OutputSpec) -> str:
    return f"{output.url}/state/plans"


def plan_url(output: OutputSpec, plan_id: str) -> str:
    return f"{plans_dir(output)}/{plan_id}.parquet"


@dataclass
class RunPlan:
    """The shards of one run, where their parts go, and what the commit must clean up."""

    plan_id: str  # names the part files; a resumed plan keeps the dead run's id
    run_date: date
    spec_hash: str
    shard_size: int
    assignments: pa.Table | None = None  # PLAN_SCHEMA sorted by shard, for an adopted plan; else streamed from:
    todo_files: list[Path] = field(default_factory=list)  # local Arrow files of LISTING rows, in processing order
    todo_rows: int = 0
    resumable: frozenset[int] = frozenset()  # shards the dead run may have finished with exactly these files
    resumed_from: str | None = None
    obsolete_parts: list[str] = field(default_factory=list)  # parts of abandoned plans or dropped shards
    obsolete_plans: list[str] = field(default_factory=list)  # plan ids to delete once committed

    @property
    def documents(self) -> int:
        return self.assignments.num_rows if self.assignments is not None else self.todo_rows

    def shard_count(self) -> int:
        if self.assignments is None:
            return math.ceil(self.todo_rows / self.shard_size)
        return len(self._bounds(self.assignments))

    @staticmethod
    def _bounds(assignments: pa.Table) -> list[tuple[int, int, int]]:
        """(shard index, first row, row count) for each shard, in order."""
        frame = pl.from_arrow(assignments.select(["shard"]))
        assert isinstance(frame, pl.DataFrame)
        counts = frame.group_by("shard", maintain_order=True).len()
        bounds, offset = [], 0
        for index, count in counts.iter_rows():
            bounds.append((int(index), offset, int(count)))
            offset += int(count)
        return bounds

    def assigned(self) -> Iterator[tuple[int, pa.Table]]:
        """(shard index, its LISTING rows), one shard in memory at a time."""
        if self.assignments is not None:
            listing = self.assignments.select(LISTING_SCHEMA.names)
            for index, offset, count in self._bounds(self.assignments):
                yield index, listing.slice(offset, count)
            return
        pending: list[pa.RecordBatch] = []
        held, index = 0, 0
        for batch in stream_files(self.todo_files):
            rest = batch
            while rest.num_rows:
                take = min(self.shard_size - held, rest.num_rows)
                pending.append(rest.slice(0, take))
                held += take
                rest = rest.slice(take)
                if held == self.shard_size:
                    yield index, pa.Table.from_batches(pending).combine_chunks()
                    pending, held, index = [], 0, index + 1
        if held:
            yield index, pa.Table.from_batches(pending).combine_chunks()

    def shards(self) -> Iterator[Shard]:
        """The shards, built one at a time as the flow submits them (only shards in flight hold Python refs)."""
        for index, rows in self.assigned():
            yield Shard(index, refs_of(rows), resume=index in self.resumable)


def _assign(todo: pa.Table, shard_size: int, first_index: int = 0) -> pa.Table:
    shard = pa.array([first_index + i // shard_size for i in range(todo.num_rows)], pa.int64())
    return todo.select(LISTING_SCHEMA.names).add_column(0, "shard", shard).cast(PLAN_SCHEMA)


def _open_plans(output: OutputSpec) -> list[tuple[str, dict[str, str]]]:
    """(url, metadata) of every plan file, read from the Parquet footers only."""
    fs, root = url_to_fs(plans_dir(output), **output.fsspec_options())
    fs.invalidate_cache(root)
    try:
        paths = sorted(p for p in fs.ls(root, detail=False) if p.endswith(".parquet"))
    except FileNotFoundError:
        return []
    plans = []
    for path in paths:
        with fs.open(path, "rb") as handle:
            metadata = pq.read_schema(handle).metadata or {}
        plans.append((fs.unstrip_protocol(path), {k.decode(): v.decode() for k, v in metadata.items()}))
    return plans


class RunInProgressError(RuntimeError):
    """Another run is writing to the same output right now; two runs would delete each other's parts."""


def _still_running(flow_run_id: str | None) -> bool:
    """Whether Prefect says the flow run that wrote a plan has not ended (unknown runs count as ended)."""
    if not flow_run_id:
        return False
    from uuid import UUID

    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(UUID(flow_run_id)).state
    except Exception:  # not a flow run id, or another Prefect server's: nothing says it is alive
        return False
    return state is not None and not state.is_final()


def make_plan(spec: JobSpec, todo_files: list[Path], todo_rows: int, run_id: str, run_date: date) -> RunPlan:
    """Cut this run's documents into shards, adopting a dead run's plan for the same spec when there is one.

    A new plan streams from the local to-do files; only adopting a dead run's plan (after a crash) reads the
    to-do list into memory, to match it with that plan. Raises RunInProgressError when a plan without a manifest
    belongs to a flow run Prefect still shows as running.
    """
    committed = committed_run_ids(spec.output)
    open_plans = [(url, meta) for url, meta in _open_plans(spec.output) if meta["plan_id"] not in committed]
    for _, meta in open_plans:
        executor = meta.get("run_id")
        if executor != run_id and _still_running(executor):
            raise RunInProgressError(
                f"flow run {executor} is still writing to {spec.output.url} (its plan {meta['plan_id']} is open); "
                "runs of one output must not overlap. If that run is dead, cancel it "
                f"(`prefect flow-run cancel {executor}`) and run again: this run will resume its work."
            )
    open_plans.sort(key=lambda plan: plan[1]["written_at"])
    adopt = next((plan for plan in reversed(open_plans) if plan[1]["spec_hash"] == spec.spec_hash()), None)
    obsolete_parts: list[str] = []
    obsolete_plans: list[str] = []
    for url, meta in open_plans:
        if adopt is not None and url == adopt[0]:
            continue
        obsolete_plans.append(meta["plan_id"])
        day = date.fromisoformat(meta["run_date"])
        shards = read_parquet(spec.output, url).column("shard").unique().to_pylist()
        obsolete_parts += [results_part_url(spec.output, day, meta["plan_id"], s) for s in shards]
    if adopt is None:
        return RunPlan(
            run_id,
            run_date,
            spec.spec_hash(),
            spec.shard_size,
            todo_files=todo_files,
            todo_rows=todo_rows,
            obsolete_parts=obsolete_parts,
            obsolete_plans=obsolete_plans,
        )
    batches = list(stream_files(todo_files))
    todo = pa.Table.from_batches(batches, schema=LISTING_SCHEMA) if batches else LISTING_SCHEMA.empty_table()
    url, meta = adopt
    day = date.fromisoformat(meta["run_date"])
    planned = pl.from_arrow(read_parquet(spec.output, url))
    wanted = pl.from_arrow(todo)
    assert isinstance(planned, pl.DataFrame) and isinstance(wanted, pl.DataFrame)
    planned = planned.with_row_index("order")
    # keep each planned file still to do, with what the listing says of it now
    kept = planned.select("order", "shard", "uri", pl.col("etag").alias("planned_etag")).join(
        wanted, on="uri", how="inner"
    )
    per_shard = planned.group_by("shard").len().rename({"len": "planned"})
    still = kept.group_by("shard").agg(
        pl.len().alias("kept"), (pl.col("etag").eq_missing(pl.col("planned_etag"))).all().alias("same")
    )
    status = per_shard.join(still, on="shard", how="left")
    # same files, same ETags: the dead run's part for that shard can be reused
    resumable = frozenset(status.filter((pl.col("kept") == pl.col("planned")) & pl.col("same"))["shard"].to_list())
    dropped = status.filter(pl.col("kept").is_null())["shard"].to_list()
    obsolete_parts += [results_part_url(spec.output, day, meta["plan_id"], int(s)) for s in dropped]
    adopted = kept.sort("order").select(PLAN_SCHEMA.names)
    left = wanted.join(planned.select("uri"), on="uri", how="anti")
    first = int(planned["shard"].max()) + 1 if planned.height else 0  # type: ignore[arg-type]
    assignments = pa.concat_tables(
        [adopted.to_arrow().cast(PLAN_SCHEMA), _assign(left.to_arrow(), spec.shard_size, first)]
    )
    return RunPlan(
        meta["plan_id"],
        day,
        spec.spec_hash(),
        spec.shard_size,
        assignments,
        resumable=resumable,
        resumed_from=meta["plan_id"],
        obsolete_parts=obsolete_parts,
        obsolete_plans=obsolete_plans,
    )


def write_plan(output: OutputSpec, plan: RunPlan, run_id: str) -> None:
    """Write the plan before any shard runs, streamed shard by shard into one Parquet file."""
    metadata = {
        "plan_id": plan.plan_id,
        "run_id": run_id,  # the flow run executing the plan now (a resumed plan keeps its first run's plan_id)
        "run_date": plan.run_date.isoformat(),
        "spec_hash": plan.spec_hash,
        "written_at": datetime.now(UTC).isoformat(),
    }
    schema = PLAN_SCHEMA.with_metadata(metadata)

    def write(handle: IO[bytes]) -> None:
        with pq.ParquetWriter(handle, schema, use_dictionary=["shard"]) as writer:
            for index, rows in plan.assigned():
                shard = pa.array([index] * rows.num_rows, pa.int64())
                writer.write_table(rows.select(LISTING_SCHEMA.names).add_column(0, "shard", shard).cast(schema))

    atomic_write(output, plan_url(output, plan.plan_id), write)


def clean_up_after_commit(output: OutputSpec, plan: RunPlan) -> None:
    """Delete the committed plan, abandoned plans and parts nothing will commit (best effort: a leftover is harmless
    to readers that follow manifests, and the next commit tries again)."""
    fs, _ = url_to_fs(output.url, **output.fsspec_options())
    urls = [*plan.obsolete_parts, *(plan_url(output, p) for p in [plan.plan_id, *plan.obsolete_plans])]
    for url in urls:
        _, path = url_to_fs(url, **output.fsspec_options())
        if fs.exists(path):
            fs.rm(path)
