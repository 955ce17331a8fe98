"""A run's plan: its shards and their part files, written before any shard runs, so a crashed run can be resumed.

A run's parts are committed only by its manifest. When a run dies mid-way, its plan stays behind without a
manifest; the next run with the same spec adopts it: it keeps the plan's id (and with it every part file name),
reuses each part the dead run finished whose documents are unchanged, processes the rest, and commits them all
in its own manifest, which names the plan it commits. Parts no plan will use any more (from a plan for another
spec, or a shard whose documents left the source) are deleted after the commit, and only parts of plans no
manifest commits are ever deleted: a crash between the manifest and the clean-up leaves a plan file whose work is
committed, which the next run recognises from the manifest and merely removes. So a crash followed by a re-run
yields exactly one committed row per document: never a duplicate, never a gap, never a deleted committed file.
Runs over one output never overlap: each holds the output's lease (tasks/store/lease.py) from before it plans until
after it cleans up, so an open plan always belongs to a dead run.

A plan is a Parquet table (shard, uri, path, size, etag) with its id, date, spec hash and the runs that executed
it in the schema metadata: a few dozen bytes per document, so planning a million-file bucket stays cheap.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import IO

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs

from docroute.schemas.documents import LISTING_SCHEMA, Shard, refs_of
from docroute.schemas.spec import JobSpec, OutputSpec
from docroute.tasks.store.spill import stream_files
from docroute.tasks.store.state import committed_plan_ids, committed_run_ids
from docroute.tasks.store.write import (
    atomic_write,
    read_parquet,
)

PLAN_SCHEMA = pa.schema([pa.field("shard", pa.int64()), *LISTING_SCHEMA])


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
    executors: list[Executor] = field(default_factory=list)  # runs that worked on this plan, this one last
    dead_executors: list[Executor] = field(default_factory=list)  # runs of every plan found: uncommitted ledgers go

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


@dataclass(frozen=True)
class PlanFile:
    """A plan file found under the output, from its Parquet footer only."""

    url: str
    plan_id: str
    run_date: date
    spec_hash: str
    written_at: datetime
    executors: tuple[Executor, ...]


@dataclass(frozen=True)
class Executor:
    """A run that worked on a plan: its ledger files are named by its id and its own start date."""

    run_id: str
    run_date: date


def _plan_files(output: OutputSpec) -> list[PlanFile]:
    """Every plan file under the output, oldest first."""
    fs, root = url_to_fs(output.layout.plans_dir(), **output.fsspec_options())
    fs.invalidate_cache(root)
    try:
        paths = sorted(p for p in fs.ls(root, detail=False) if p.endswith(".parquet"))
    except FileNotFoundError:
        return []
    plans = []
    for path in paths:
        with fs.open(path, "rb") as handle:
            raw = pq.read_schema(handle).metadata or {}
        meta = {k.decode(): v.decode() for k, v in raw.items()}
        recorded = json.loads(meta.get("executors", "[]"))
        executors = [Executor(e["run_id"], date.fromisoformat(e["run_date"])) for e in recorded]
        if not executors and meta.get("run_id"):  # plans written before executors were recorded
            executors = [Executor(meta["run_id"], date.fromisoformat(meta["run_date"]))]
        plans.append(
            PlanFile(
                fs.unstrip_protocol(path),
                meta["plan_id"],
                date.fromisoformat(meta["run_date"]),
                meta["spec_hash"],
                datetime.fromisoformat(meta["written_at"]),
                tuple(executors),
            )
        )
    return sorted(plans, key=lambda plan: plan.written_at)


def make_plan(spec: JobSpec, todo_files: list[Path], todo_rows: int, run_id: str, run_date: date) -> RunPlan:
    """Cut this run's documents into shards, adopting a dead run's plan for the same spec when there is one.

    Must be called while holding the output's lease: every plan file without a manifest then belongs to a dead
    run. A plan some manifest commits (its run died between the manifest and the clean-up) is done: only its file
    goes. A new plan streams from the local to-do files; only adopting a dead run's plan reads the to-do list into
    memory, to match it with that plan.
    """
    found = _plan_files(spec.output)
    committed = committed_plan_ids(spec.output, {plan.plan_id: plan.written_at for plan in found})
    open_plans = [plan for plan in found if plan.plan_id not in committed]
    adopt = next((plan for plan in reversed(open_plans) if plan.spec_hash == spec.spec_hash()), None)
    obsolete_parts: list[str] = []
    obsolete_plans = [plan.plan_id for plan in found if plan.plan_id in committed]
    executors = [executor for plan in found for executor in plan.executors]
    for plan in open_plans:
        if adopt is not None and plan.url == adopt.url:
            continue
        obsolete_plans.append(plan.plan_id)
        shards = read_parquet(spec.output, plan.url).column("shard").unique().to_pylist()
        obsolete_parts += [u for s in shards for u in _shard_files(spec.output, plan.run_date, plan.plan_id, s)]
    if adopt is None:
        return RunPlan(
            run_id,
            run_date,
            spec.spec_hash(),
            spec.shard_size_for(todo_rows),
            todo_files=todo_files,
            todo_rows=todo_rows,
            obsolete_parts=obsolete_parts,
            obsolete_plans=obsolete_plans,
            executors=[Executor(run_id, run_date)],
            dead_executors=executors,
        )
    batches = list(stream_files(todo_files))
    todo = pa.Table.from_batches(batches, schema=LISTING_SCHEMA) if batches else LISTING_SCHEMA.empty_table()
    day = adopt.run_date
    planned = pl.from_arrow(read_parquet(spec.output, adopt.url))
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
    obsolete_parts += [u for s in dropped for u in _shard_files(spec.output, day, adopt.plan_id, int(s))]
    adopted = kept.sort("order").select(PLAN_SCHEMA.names)
    left = wanted.join(planned.select("uri"), on="uri", how="anti")
    first = int(planned["shard"].max()) + 1 if planned.height else 0  # type: ignore[arg-type]
    shard_size = spec.shard_size_for(todo.num_rows)
    assignments = pa.concat_tables([adopted.to_arrow().cast(PLAN_SCHEMA), _assign(left.to_arrow(), shard_size, first)])
    return RunPlan(
        adopt.plan_id,
        day,
        spec.spec_hash(),
        shard_size,
        assignments,
        resumable=resumable,
        resumed_from=adopt.plan_id,
        obsolete_parts=obsolete_parts,
        obsolete_plans=obsolete_plans,
        executors=[*adopt.executors, Executor(run_id, run_date)],
        dead_executors=executors,
    )


def _shard_files(output: OutputSpec, day: date, plan_id: str, shard: int) -> list[str]:
    """The files a shard of a plan writes that only its commit would make count (its labels are kept: they are
    the frontier's answers, paid for, and valid training data whatever happens to the run)."""
    return [output.layout.results_part(day, plan_id, shard), output.layout.errors_part(day, plan_id, shard)]


def write_plan(output: OutputSpec, plan: RunPlan, run_id: str) -> None:
    """Write the plan before any shard runs, streamed shard by shard into one Parquet file."""
    metadata = {
        "plan_id": plan.plan_id,
        "run_id": run_id,  # the flow run executing the plan now (a resumed plan keeps its first run's plan_id)
        "executors": json.dumps([{"run_id": e.run_id, "run_date": e.run_date.isoformat()} for e in plan.executors]),
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

    atomic_write(output, output.layout.plan(plan.plan_id), write)


def clean_up_after_commit(spec: JobSpec, plan: RunPlan, committed: Collection[str]) -> None:
    """Delete the committed plan, plans whose work is committed or abandoned, the parts no manifest will ever
    commit, and ledger files of dead runs that never committed; `committed` are the files this run's manifest
    names, which are never deleted whatever the lists say.

    Best effort: a leftover is harmless to readers that follow manifests, and the next commit tries again.
    """
    output = spec.output
    fs, _ = url_to_fs(output.url, **output.fsspec_options())
    runs = committed_run_ids(output)
    ledgers = [
        url
        for executor in plan.dead_executors
        if executor.run_id not in runs
        for url in (
            spec.output.layout.costs(executor.run_date, executor.run_id),
            spec.output.layout.run_record(executor.run_date, executor.run_id),
        )
    ]
    keep = set(committed)
    plans = [output.layout.plan(p) for p in dict.fromkeys([plan.plan_id, *plan.obsolete_plans])]
    for url in [*plan.obsolete_parts, *ledgers, *plans]:
        if url not in keep:
            _delete(fs, url_to_fs(url, **output.fsspec_options())[1])


def _delete(fs: AbstractFileSystem, path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path)
