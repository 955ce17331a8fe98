"""The output's document state: which documents are answered, from which version of their file, under which spec.

Scheduled runs re-list a growing bucket every night; the state is what lets them process only what is new. It is
one row per document (doc_id) — its file's URI and ETag, the spec hash and model that answered it, its route,
whether it must be retried, and the part file holding its current row — written as a Parquet snapshot by every
run and named in that run's manifest. The manifest is written last, so the next run trusts only the newest
*committed* snapshot: a run that died never changes what counts as done. Reading one snapshot keeps the cost
O(documents), never O(runs).
"""

from __future__ import annotations

import json
import posixpath
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import IO, Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from docroute.schemas.documents import LISTING_SCHEMA
from docroute.schemas.layout import OutputLayout
from docroute.schemas.outcomes import RETRIED_OUTCOMES, legacy_outcome
from docroute.schemas.spec import JobSpec, OutputSpec
from docroute.tasks.store.spill import BUCKET_ROWS, BucketSpill, RowSpill, bucket_count, stream_files

_REPEATED = pa.dictionary(pa.int32(), pa.string())
"""Values shared by many documents (a part's URL, a run id, a spec hash) are stored once, in memory and on disk."""

STATE_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string()),
        pa.field("source_uri", pa.string()),
        pa.field("source_etag", pa.string()),
        pa.field("spec_hash", _REPEATED),
        pa.field("small_model", _REPEATED),
        pa.field("route", _REPEATED),
        pa.field("retry", pa.bool_()),
        pa.field("part_url", _REPEATED),
        pa.field("run_id", _REPEATED),
        pa.field("processed_at", pa.timestamp("us", tz="UTC")),
        # when a run first found the document's file gone from the source; null while it is listed. Its rows stay
        # in the history: readers of current answers exclude these, readers of history can.
        pa.field("deleted_at", pa.timestamp("us", tz="UTC")),
    ]
)


def conform_state(table: pa.Table) -> pa.Table:
    """A state snapshot in today's schema: snapshots written before a column existed get it as nulls."""
    for field_ in STATE_SCHEMA:
        if field_.name not in table.column_names:
            table = table.append_column(field_.name, pa.nulls(table.num_rows, field_.type))
    return table.select(STATE_SCHEMA.names).cast(STATE_SCHEMA)


def latest_manifest(output: OutputSpec) -> dict[str, Any] | None:
    """The newest committed run's manifest (names sort by commit time), or None before the first run."""
    fs, names = manifest_paths(output)
    for path in reversed(names):
        manifest = json.loads(fs.cat_file(path))
        if manifest.get("state"):
            return manifest
    return None


def manifest_paths(output: OutputSpec) -> tuple[Any, list[str]]:
    """The output's filesystem and its manifests, oldest first (names start with their commit time); fresh, not
    from a cached listing, since another run may have committed since this process last looked."""
    fs, root = url_to_fs(output.layout.manifests_dir(), **output.fsspec_options())
    fs.invalidate_cache(root)
    try:
        return fs, sorted(p for p in fs.ls(root, detail=False) if p.endswith(".json"))
    except FileNotFoundError:
        return fs, []


class ManifestKind(StrEnum):
    """What a manifest commits: a run's parts and state, or a compaction that rewrote committed parts."""

    RUN = "run"  # written by every run (manifests before `kind` existed are runs)
    COMPACTION = "compaction"  # `docroute compact`: new files, the parts they `replaces`, a state pointing at them


def manifest_kind(manifest: dict[str, Any]) -> ManifestKind:
    return ManifestKind.COMPACTION if manifest.get("kind") == ManifestKind.COMPACTION else ManifestKind.RUN


def committed_manifests(output: OutputSpec) -> list[tuple[str, dict[str, Any]]]:
    """Every manifest (path, content), oldest first."""
    fs, names = manifest_paths(output)
    return [(name, json.loads(fs.cat_file(name))) for name in names]


def live_parts(manifests: Iterable[dict[str, Any]]) -> list[str]:
    """The results parts that hold the committed history: every part a manifest names, less those a later
    compaction `replaces` (their rows are in the compaction's files; the old files stay on storage until the
    retention period ends, for readers that listed them before). The one place that rule lives: every reader of
    committed parts goes through here, so no row is ever counted twice."""
    named: list[str] = []
    replaced: set[str] = set()
    for manifest in manifests:
        named += [part["url"] for part in manifest.get("parts", [])]
        if manifest_kind(manifest) is ManifestKind.COMPACTION:
            replaced.update(manifest.get("replaces", []))
    return [url for url in dict.fromkeys(named) if url not in replaced]


def committed_run_ids(output: OutputSpec) -> set[str]:
    """Runs whose manifest exists: their parts are committed."""
    _, paths = manifest_paths(output)
    return {OutputLayout.manifest_run_id(p) for p in paths}


def commits_plan(manifest: dict[str, Any], plan_id: str) -> bool:
    """Whether a manifest commits the parts of a plan (manifests before `plan_id` was recorded name its parts)."""
    if manifest.get("plan_id") == plan_id:
        return True
    prefix = f"part-{plan_id}-"
    return any(posixpath.basename(part["url"]).startswith(prefix) for part in manifest.get("parts", []))


def committed_plan_ids(output: OutputSpec, plans: dict[str, datetime]) -> set[str]:
    """Those of `plans` (plan id → when its plan file was last written) that a manifest commits.

    A manifest that commits a plan is written by the run that last wrote the plan file, after writing it, so
    only manifests newer than the oldest of those files are read (none at all after an ordinary crash).
    """
    if not plans:
        return set()
    fs, paths = manifest_paths(output)
    committed = {OutputLayout.manifest_run_id(p) for p in paths} & set(plans)
    pending = {plan_id: at for plan_id, at in plans.items() if plan_id not in committed}
    if not pending:
        return committed
    oldest = min(pending.values()) - _CLOCK_SLACK
    for path in reversed(paths):
        written = OutputLayout.manifest_committed_at(path)
        if written is not None and written < oldest:
            break
        manifest = json.loads(fs.cat_file(path))
        committed |= {plan_id for plan_id in pending if commits_plan(manifest, plan_id)}
    return committed


_CLOCK_SLACK = timedelta(minutes=10)
"""Margin for a manifest stamped a little before its plan file (clock steps on one host)."""


def load_state(output: OutputSpec) -> pl.DataFrame | None:
    """The committed document state, or None when no run has committed one."""
    manifest = latest_manifest(output)
    if manifest is None:
        return None
    fs, path = url_to_fs(manifest["state"], **output.fsspec_options())
    with fs.open(path, "rb") as handle:
        table = pq.read_table(handle)
    return pl.from_arrow(conform_state(table))  # type: ignore[return-value]


STATE_SOURCE_COLUMNS = [
    "doc_id", "source_uri", "source_etag", "spec_hash", "small_model", "route", "route_outcome", "route_reason",
]  # fmt: skip


_HANDED_OVER: dict[tuple[str, str], pa.Table] = {}
_HANDED_OVER_LOCK = threading.Lock()


def hand_over_part_state(run_id: str, part_url: str, table: pa.Table) -> None:
    """Give the flow a just-written part's state rows directly, when the shard runs in the flow's own process.

    Only for the threads runner: the flow takes them right after the shard's task ends (`take_part_state`), so
    they live for moments, never for the run, and the part need not be read back from storage.
    """
    with _HANDED_OVER_LOCK:
        _HANDED_OVER[(run_id, part_url)] = state_of_part(table, part_url)


def take_part_state(output: OutputSpec, run_id: str, part_url: str, *, handed_over: bool = True) -> pa.Table:
    """The state rows of a written part: handed over in-process when there, else read back from the part.

    `handed_over=False` reads the part whatever was handed over (a shard that failed after handing its rows over
    has had its part replaced by error rows since).
    """
    with _HANDED_OVER_LOCK:
        handed = _HANDED_OVER.pop((run_id, part_url), None)
    return handed if handed is not None and handed_over else read_part_state(output, part_url)


def forget_handed_over(run_id: str) -> None:
    """Drop what a run's shards handed over and the flow never took (a run that failed part-way)."""
    with _HANDED_OVER_LOCK:
        for key in [key for key in _HANDED_OVER if key[0] == run_id]:
            del _HANDED_OVER[key]


def read_part_state(output: OutputSpec, part_url: str) -> pa.Table:
    """The state rows of a committed part, read back from the part (a few columns).

    Shard tasks return only tallies: Prefect keeps every task's return value for the flow run's lifetime, so a
    per-document payload there would make the run's memory grow with the corpus.
    """
    fs, path = url_to_fs(part_url, **output.fsspec_options())
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        present = set(parquet.schema_arrow.names)  # parts written before `route_outcome` existed lack it
        return state_of_part(parquet.read(columns=[c for c in STATE_SOURCE_COLUMNS if c in present]), part_url)


def _outcomes(table: pa.Table, route: pa.Array) -> pa.Array:
    """Each row's `route_outcome`; parts written before the column existed get theirs from route and reason."""
    if "route_outcome" in table.column_names:
        outcome = pc.cast(table["route_outcome"], pa.string())
        if outcome.null_count == 0:
            return outcome
    reasons = pc.fill_null(pc.cast(table["route_reason"], pa.string()), "").to_pylist()
    stored = table["route_outcome"].to_pylist() if "route_outcome" in table.column_names else [None] * len(reasons)
    return pa.array(
        [
            value or legacy_outcome(r, reason).value
            for value, r, reason in zip(stored, route.to_pylist(), reasons, strict=True)
        ],
        type=pa.string(),
    )


def state_of_part(table: pa.Table, part_url: str) -> pa.Table:
    """The state rows for the documents of one written part (its rows are those documents' current answers).

    Arrow compute on the part's columns as they are: this runs once per shard, where a round trip through a
    DataFrame costs more than the work for a few hundred rows.
    """
    n = table.num_rows
    route = pc.cast(table["route"], pa.string())
    retry = pc.is_in(_outcomes(table, route), value_set=pa.array(sorted(RETRIED_OUTCOMES), type=pa.string()))
    repeated = _REPEATED
    return pa.table(
        [
            pc.cast(table["doc_id"], pa.string()),
            pc.cast(table["source_uri"], pa.string()),
            pc.cast(table["source_etag"], pa.string()),
            pc.cast(table["spec_hash"], repeated),
            pc.cast(table["small_model"], repeated),
            pc.cast(route, repeated),
            pc.fill_null(retry, False),
            pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, dtype=np.int32)), pa.array([part_url])),
            pa.nulls(n, repeated),
            pa.nulls(n, pa.timestamp("us", tz="UTC")),
            pa.nulls(n, pa.timestamp("us", tz="UTC")),
        ],
        schema=STATE_SCHEMA,
    )


@dataclass
class StateUpdate:
    """What one run changes in the state, in the order it happened."""

    by_document: list[pa.Table] = field(default_factory=list)  # collected frontier batches: these doc_ids only
    by_file: list[pa.Table] = field(default_factory=list)  # processed shards: every document of these files


def merge_state(
    previous: pl.DataFrame | None,
    update: StateUpdate,
    *,
    listed_uris: pa.Array | pa.ChunkedArray,
    run_id: str,
    processed_at: Any,
) -> pa.Table:
    """The state after a run: the previous one, with batch answers, then reprocessed files, replacing their rows.

    Files no longer listed in the source keep their row, marked `deleted_at` (the first run that missed them), so
    a current view can leave them out and a history query can too; a file that comes back is unmarked.
    """
    if (previous is None or previous.height == 0) and not update.by_document:
        return _stamped(update.by_file, run_id, processed_at)  # a first run: nothing to replace, no joins
    empty = pl.from_arrow(STATE_SCHEMA.empty_table())
    assert isinstance(empty, pl.DataFrame)
    state = previous if previous is not None else empty
    stamp = [
        pl.lit(run_id).cast(pl.Categorical).alias("run_id"),
        pl.lit(processed_at).cast(pl.Datetime("us", "UTC")).alias("processed_at"),
    ]
    if update.by_document:
        docs = _frame(update.by_document).with_columns(stamp)
        state = pl.concat([state.join(docs.select("doc_id"), on="doc_id", how="anti"), docs])
    if update.by_file:
        files = _frame(update.by_file).with_columns(stamp)
        if state.height:  # (joins copy every row: skip them when there is nothing to replace)
            files_uris = files.select("source_uri").unique()
            state = pl.concat([state.join(files_uris, on="source_uri", how="anti"), files])
        else:
            state = files
    if previous is not None and previous.height:  # only an earlier run's rows can name files gone from the source
        listed = pl.from_arrow(pa.table({"source_uri": listed_uris}))
        assert isinstance(listed, pl.DataFrame)
        listed = listed.unique().with_columns(pl.lit(True).alias("_listed"))
        gone = pl.col("_listed").is_null()
        state = (
            state.join(listed, on="source_uri", how="left")
            .with_columns(
                pl.when(gone)
                .then(pl.coalesce(pl.col("deleted_at"), pl.lit(processed_at).cast(pl.Datetime("us", "UTC"))))
                .otherwise(None)
                .alias("deleted_at")
            )
            .drop("_listed")
        )
    return state.to_arrow().cast(STATE_SCHEMA)


def _stamped(tables: Sequence[pa.Table], run_id: str, processed_at: Any) -> pa.Table:
    """This run's state rows with its id and time, built in Arrow without copying the other columns."""
    if not tables:
        return STATE_SCHEMA.empty_table()
    table = pa.concat_tables([t.cast(STATE_SCHEMA) for t in tables])
    n = table.num_rows
    run = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, dtype=np.int32)), pa.array([run_id], pa.string()))
    at = pa.array(np.full(n, pa.scalar(processed_at, pa.timestamp("us", tz="UTC")).value, dtype=np.int64))
    table = table.set_column(table.schema.get_field_index("run_id"), STATE_SCHEMA.field("run_id"), run)
    index = table.schema.get_field_index("processed_at")
    return table.set_column(index, STATE_SCHEMA.field("processed_at"), at.cast(STATE_SCHEMA.field("processed_at").type))


def _frame(tables: Sequence[pa.Table]) -> pl.DataFrame:
    frame = pl.from_arrow(pa.concat_tables([t.cast(STATE_SCHEMA) for t in tables]))
    assert isinstance(frame, pl.DataFrame)
    return frame


@dataclass(frozen=True)
class Selection:
    """Which listed files this run processes, and why the others are skipped."""

    todo: pa.Table  # LISTING_SCHEMA rows: retries first, then new and changed files, each group in listing order
    retry: int
    new: int
    changed: int
    up_to_date: int


def select_documents(listing: pa.Table, state: pl.DataFrame | None, spec: JobSpec) -> Selection:
    """Keep the files that are new, changed (ETag), answered under another spec, or waiting for a retry.

    Deferred rows are retried only when a frontier is configured (adding one to a job retries them all). A file
    without an ETag (a filesystem that reports neither ETag nor mtime) is always processed: nothing could prove it
    unchanged. Vectorised joins, so a listing of millions of files costs bytes per file, not Python objects.
    """
    files = pl.from_arrow(listing)
    assert isinstance(files, pl.DataFrame)
    if state is None or state.height == 0:
        return Selection(listing, 0, listing.num_rows, 0, 0)
    known = state.group_by("source_uri").agg(
        pl.col("source_etag").first().alias("known_etag"),
        (pl.col("spec_hash") == spec.spec_hash()).all().alias("same_spec"),
        # a deferred row waits for a frontier: without one configured, retrying it would give the same answer
        (pl.col("retry") & ((pl.col("route") != "deferred") | pl.lit(spec.frontier is not None))).any().alias("retry"),
    )
    joined = files.with_row_index("order").join(known, left_on="uri", right_on="source_uri", how="left")
    is_new = pl.col("same_spec").is_null()
    is_changed = ~is_new & (pl.col("etag").is_null() | (pl.col("etag") != pl.col("known_etag")) | ~pl.col("same_spec"))
    is_retry = ~is_new & ~is_changed & pl.col("retry")
    joined = joined.with_columns(
        pl.when(is_new).then(pl.lit("new")).when(is_changed).then(pl.lit("changed"))
        .when(is_retry).then(pl.lit("retry")).otherwise(pl.lit("up_to_date")).alias("why")
    )  # fmt: skip
    counts = dict(joined.group_by("why").len().iter_rows())
    todo = (
        joined.filter(pl.col("why") != "up_to_date")
        .sort([pl.col("why") != "retry", pl.col("order")])
        .select(LISTING_SCHEMA.names)
    )
    return Selection(
        todo.to_arrow().cast(LISTING_SCHEMA),
        counts.get("retry", 0),
        counts.get("new", 0),
        counts.get("changed", 0),
        counts.get("up_to_date", 0),
    )


def prune_snapshots(output: OutputSpec, keep: Sequence[str]) -> None:
    """Delete state snapshots other than `keep` (the one just committed, and the one before for readers mid-way)."""
    fs, root = url_to_fs(output.layout.state_documents_dir(), **output.fsspec_options())
    kept = {url_to_fs(u, **output.fsspec_options())[1] for u in keep}
    fs.invalidate_cache(root)
    try:
        paths = fs.ls(root, detail=False)
    except FileNotFoundError:
        return
    for path in paths:
        if path.endswith(".parquet") and path not in kept:
            fs.rm(path)


@dataclass
class RunState:
    """A run's view of its listing, the previous state and its own updates, bucketed on local disk."""

    directory: Path
    buckets: int
    listed: BucketSpill
    previous: BucketSpill
    by_file: BucketSpill  # processed shards: every document of these files
    by_document: BucketSpill  # collected frontier batches: these documents only

    def close_inputs(self) -> None:
        self.listed.close()
        self.previous.close()

    def close_updates(self) -> None:
        self.by_file.close()
        self.by_document.close()


def open_run_state(
    output: OutputSpec, listing_file: Path, listed_rows: int, directory: Path, *, full_refresh: bool
) -> RunState:
    """Bucket the listing and the newest committed state snapshot (skipped on a full refresh) on local disk."""
    manifest = None if full_refresh else latest_manifest(output)
    snapshot = manifest.get("state") if manifest else None
    previous_rows = 0
    if snapshot:
        fs, path = url_to_fs(snapshot, **output.fsspec_options())
        with fs.open(path, "rb") as handle:
            previous_rows = pq.ParquetFile(handle).metadata.num_rows
    buckets = bucket_count(max(listed_rows, previous_rows))
    state = RunState(
        directory,
        buckets,
        BucketSpill(directory, "listed", LISTING_SCHEMA, buckets, "uri"),
        BucketSpill(directory, "previous", STATE_SCHEMA, buckets, "source_uri"),
        BucketSpill(directory, "by-file", STATE_SCHEMA, buckets, "source_uri"),
        BucketSpill(directory, "by-document", STATE_SCHEMA, buckets, "source_uri"),
    )
    state.listed.add_batches(stream_files([listing_file]))
    if snapshot:
        fs, path = url_to_fs(snapshot, **output.fsspec_options())
        with fs.open(path, "rb") as handle:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=BUCKET_ROWS):
                state.previous.add(conform_state(pa.Table.from_batches([batch])))
    state.close_inputs()
    return state


@dataclass(frozen=True)
class Todo:
    """What this run processes: local Arrow files of listing rows, retries first, and why."""

    files: list[Path]
    rows: int
    retry: int
    new: int
    changed: int
    up_to_date: int


def select_todo(state: RunState, spec: JobSpec) -> Todo:
    """Run `select_documents` bucket by bucket; retries go to one file, the rest to another, read in that order."""
    retries = RowSpill(state.directory / "todo-retry.arrow", LISTING_SCHEMA)
    fresh = RowSpill(state.directory / "todo-fresh.arrow", LISTING_SCHEMA)
    counts = {"retry": 0, "new": 0, "changed": 0, "up_to_date": 0}
    for bucket in range(state.buckets):
        previous = state.previous.read(bucket)
        frame = pl.from_arrow(previous) if previous.num_rows else None
        chosen = select_documents(state.listed.read(bucket), frame, spec)  # type: ignore[arg-type]
        retries.add(chosen.todo.slice(0, chosen.retry))
        fresh.add(chosen.todo.slice(chosen.retry))
        for key in counts:
            counts[key] += getattr(chosen, key)
    retries.close()
    fresh.close()
    return Todo([retries.path, fresh.path], retries.rows + fresh.rows, **counts)


def write_merged_state(output: OutputSpec, url: str, state: RunState, *, run_id: str, processed_at: Any) -> int:
    """Merge bucket by bucket and stream the new snapshot into one Parquet file; returns its row count."""
    from docroute.tasks.store.write import atomic_write

    state.close_updates()
    written = 0

    def write(handle: IO[bytes]) -> None:
        nonlocal written
        repeated = [f.name for f in STATE_SCHEMA if pa.types.is_dictionary(f.type)]
        with pq.ParquetWriter(handle, STATE_SCHEMA, use_dictionary=repeated) as writer:
            for bucket in range(state.buckets):
                previous = state.previous.read(bucket)
                frame = pl.from_arrow(previous) if previous.num_rows else None
                update = StateUpdate(
                    by_document=[t for t in [state.by_document.read(bucket)] if t.num_rows],
                    by_file=[t for t in [state.by_file.read(bucket)] if t.num_rows],
                )
                merged = merge_state(
                    frame,  # type: ignore[arg-type]
                    update,
                    listed_uris=state.listed.read(bucket)["uri"],
                    run_id=run_id,
                    processed_at=processed_at,
                )
                if merged.num_rows:
                    writer.write_table(merged)
                    written += merged.num_rows

    atomic_write(output, url, write)
    return written
