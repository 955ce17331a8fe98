"""Compaction and retention of one output: fewer, larger results files, and what nobody needs any more deleted.

Every run writes one small Parquet part per shard, so a year of nightly runs leaves tens of thousands of files that
warehouse engines list and open one by one. `docroute compact` rewrites them, without changing what any reader
sees, in steps that each survive a SIGKILL (the flow, flows/compact.py, runs them under the output's lease, so no
run is in flight and every plan without a manifest is a dead run's, which the next run may adopt):

1. **plan**: the live committed parts (`state.live_parts`) smaller than half the target size, per `run_date`,
   except parts a pending frontier batch will read its rows back from; a run date needs two of them to gain.
   Parts of uncommitted plans are never live, so an adoptable run's work is never touched.
2. **rewrite**: each run date's small parts into new files (`compacted-<id>-<n>.parquet`, never a plan's part
   name), about `target_file_mb` each. The rows the newest state points at (each document's current row) go to
   files of their own and the superseded rows to others, so a file holds at most one current row per document
   (readers find a current row by doc_id inside its part). Then a state snapshot whose `part_url`s point at the
   new files; run ids are unchanged, so the current table has nothing to merge.
3. **commit**: the manifest (`kind: compaction`, `parts`, `replaces`, `state`), written last: until it exists the
   new files count nowhere and the old ones stay in force; from then on every reader skips the replaced parts.
4. **table**: the current table synced (it records the compaction's commit), then Delta optimize, vacuum after
   the retention period, checkpoint; or, for Iceberg (tasks/store/iceberg_table.py), its small data files
   rewritten in one snapshot that still records the synced run, snapshots that stopped being current before the
   retention period expired, and the table's files no remaining snapshot or recent metadata names deleted once
   older than it (never anything outside the table's folder, such as the SQLite catalog).
5. **retention**: delete the parts that compactions committed more than the retention period ago replaced, the
   results and errors files no manifest names and no plan file owns (a dead run's leftovers, a killed
   compaction's files), and state snapshots other than the newest two; each only once older than the retention
   period, so a reader that listed them before can still finish.

A compaction killed before its manifest leaves files that count nowhere (a later retention step removes them);
killed after it, it is committed and the next compaction or run carries on (the table sync is idempotent, the
deletions are repeated).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import posixpath
import re
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs

from docroute.schemas.errors import InputError, StateError
from docroute.schemas.layout import OutputLayout
from docroute.schemas.spec import JobSpec, OutputSpec
from docroute.schemas.summary import CommittedPart
from docroute.tasks.store.lease import acquire_lease
from docroute.tasks.store.scratch import run_scratch
from docroute.tasks.store.state import (
    STATE_SCHEMA,
    ManifestKind,
    committed_manifests,
    conform_state,
    latest_manifest,
    live_parts,
    manifest_kind,
)
from docroute.tasks.store.table import (
    APP_ID,
    SyncAction,
    delta_storage_options,
    delta_writer_properties,
    sync_current_table,
)
from docroute.tasks.store.write import atomic_write, read_parquet, write_json, write_parquet

log = logging.getLogger(__name__)

SMALL_FRACTION = 0.5
"""A part below this share of the target size is small: compacted files near the target are left alone."""


class CompactionAction(StrEnum):
    """What the rewrite did to the results history."""

    NOTHING_TO_DO = "nothing_to_do"  # no run date where a rewrite would cut the file count
    COMPACTED = "compacted"  # new files committed by a compaction manifest


class TableAction(StrEnum):
    """What the table step did to the current table."""

    OFF = "off"  # output.table.enabled is false
    NOTHING_COMMITTED = "nothing_committed"  # no manifest yet: no table
    OPTIMIZED = "optimized"  # Delta optimize, vacuum and checkpoint done
    REWRITTEN = "rewritten"  # Iceberg: small data files rewritten, old snapshots expired, unused files deleted


class Removed(StrEnum):
    """Why the retention step deleted a file."""

    REPLACED_PART = "replaced_part"  # its rows are in a compaction's files, committed longer ago than retention
    ORPHAN_FILE = "orphan_file"  # results/errors file no manifest names and no plan owns (dead run, killed compaction)
    OLD_SNAPSHOT = "old_snapshot"  # a state snapshot no newest manifest names


class CompactionStateError(StateError, RuntimeError):
    """The committed state and parts disagree (a document whose part lacks its row): nothing is committed."""


@dataclass(frozen=True)
class RunDateGroup:
    """The small parts of one run date to rewrite, and how many rows make a file of about the target size."""

    run_date: date
    parts: tuple[str, ...]
    target_rows: int


@dataclass(frozen=True)
class CompactionPlan:
    """What one compaction rewrites, decided from the committed manifests and the storage listing."""

    compaction_id: str
    groups: tuple[RunDateGroup, ...]
    live_parts: int  # committed parts readers read before the compaction
    results_files: int  # Parquet files under results/ before (committed or not)
    state: str | None  # the snapshot the new state is derived from

    @property
    def replaced(self) -> list[str]:
        return [url for group in self.groups for url in group.parts]


@dataclass(frozen=True)
class Rewritten:
    """The rewrite's new files (as a manifest lists parts), the parts they replace and the new state snapshot."""

    parts: tuple[CommittedPart, ...]
    replaces: tuple[str, ...]
    state: str
    rows: int
    current_rows: int  # of which current rows (the state points at them)


@dataclass(frozen=True)
class TableMaintenance:
    """The table step's outcome: data files in the table's newest version before and after, files deleted (Delta's
    vacuum, or Iceberg's unused data, manifest and metadata files) and Iceberg snapshots expired."""

    action: TableAction
    files_before: int = 0
    files_after: int = 0
    vacuumed: int = 0
    synced_run: str | None = None
    expired_snapshots: int = 0


@dataclass(frozen=True)
class RetentionReport:
    """Files the retention step deleted, by reason, and the Parquet files left under results/."""

    removed: dict[Removed, int] = field(default_factory=dict)
    results_files: int = 0


@dataclass(frozen=True)
class CompactionReport:
    """What `docroute compact` did, for the CLI, the benchmark and the tests."""

    compaction_id: str
    action: CompactionAction
    run_dates: tuple[date, ...]
    live_parts_before: int
    live_parts_after: int
    results_files_before: int
    results_files_after: int
    rows: int
    manifest: str | None
    table: TableMaintenance
    retention: RetentionReport
    seconds: float


# -- durations --------------------------------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_HOURS = {"s": 1 / 3600, "m": 1 / 60, "h": 1.0, "": 1.0, "d": 24.0}


def parse_retention_hours(text: str) -> float:
    """`--retention`: a number of hours, or with a unit: `90m`, `12h`, `7d`, `0` (delete at once)."""
    match = _DURATION.match(text)
    if match is None:
        raise InputError(f"--retention {text!r}: give hours, or a number with s, m, h or d (e.g. 7d, 12h, 0)")
    return float(match.group(1)) * _UNIT_HOURS[match.group(2)]


# -- listing helpers ----------------------------------------------------------------------------------------------


def _fs(output: OutputSpec) -> AbstractFileSystem:
    return url_to_fs(output.url, **output.fsspec_options())[0]


def _path(fs: AbstractFileSystem, url: str) -> str:
    return str(fs._strip_protocol(url))


def _modified(info: dict[str, Any]) -> datetime | None:
    """A listing entry's modification time (local disks say `mtime`, S3 `LastModified`); None when unknown."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if isinstance(value, datetime):
            return value if value.tzinfo else value.replace(tzinfo=UTC)
        if isinstance(value, int | float):
            return datetime.fromtimestamp(value, UTC)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                parsed = datetime.fromisoformat(value)
                return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def _parquet_files(fs: AbstractFileSystem, folder_url: str) -> dict[str, dict[str, Any]]:
    """Every finished Parquet file under a folder (path → listing entry); temporary names end in `.tmp`."""
    root = _path(fs, folder_url)
    fs.invalidate_cache(root)
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        return {}
    return {path: info for path, info in found.items() if path.endswith(".parquet")}


def pinned_parts(output: OutputSpec) -> set[str]:
    """Parts a frontier batch not yet collected will read its rows back from (tasks/answer/frontier_batches.py
    records each queued document's part): those stay exactly where they are."""
    fs, root = url_to_fs(output.layout.frontier_batches(), **output.fsspec_options())
    fs.invalidate_cache(root)
    try:
        paths = fs.find(root)
    except FileNotFoundError:
        return set()
    pinned: set[str] = set()
    for path in paths:
        text = fs.cat_file(path).decode("utf-8")
        if path.endswith(".jsonl"):  # staged, not yet submitted
            pinned |= {json.loads(line)["part"] for line in text.splitlines() if line.strip()}
        elif path.endswith(".json"):
            record = json.loads(text)
            if record.get("status") != "collected":
                pinned |= set(record.get("requests", {}).values())
    return pinned


# -- 1. plan ------------------------------------------------------------------------------------------------------


def plan_compaction(spec: JobSpec, compaction_id: str) -> CompactionPlan:
    """Choose, per run date, the small live parts to rewrite (see the module docstring)."""
    output = spec.output
    fs = _fs(output)
    manifests = [manifest for _, manifest in committed_manifests(output)]
    live = live_parts(manifests)
    rows_of = {part["url"]: part.get("rows") for manifest in manifests for part in manifest.get("parts", [])}
    files = _parquet_files(fs, output.layout.results_dir())
    pinned = pinned_parts(output)
    target = int(output.compaction.target_file_mb * 2**20)
    small: dict[date, list[tuple[str, int, int]]] = defaultdict(list)
    for url in live:
        day, info = OutputLayout.part_run_date(url), files.get(_path(fs, url))
        if day is None or info is None or url in pinned or int(info["size"]) >= target * SMALL_FRACTION:
            continue
        rows = rows_of.get(url)
        if not isinstance(rows, int):  # manifests name each part's rows; read the footer otherwise
            with fs.open(_path(fs, url), "rb") as handle:
                rows = pq.ParquetFile(handle).metadata.num_rows
        small[day].append((url, int(info["size"]), rows))
    newest = latest_manifest(output)
    state = newest.get("state") if newest else None
    current = _current_rows_by_part(output, state)
    groups = []
    for day, parts in sorted(small.items()):
        size, rows = sum(p[1] for p in parts), sum(p[2] for p in parts)
        target_rows = max(1, math.floor(target / max(size / max(rows, 1), 1.0)))
        pointed = sum(current.get(p[0], 0) for p in parts)  # current rows get files of their own
        files_after = math.ceil(pointed / target_rows) + math.ceil((rows - pointed) / target_rows)
        if len(parts) > files_after:  # only a rewrite that cuts the file count (a second compaction does nothing)
            groups.append(RunDateGroup(day, tuple(p[0] for p in parts), target_rows))
    return CompactionPlan(compaction_id, tuple(groups), len(live), len(files), state)


def _current_rows_by_part(output: OutputSpec, state: str | None) -> dict[str, int]:
    """How many current rows the state snapshot places in each part (one column read)."""
    if state is None:
        return {}
    fs, path = url_to_fs(state, **output.fsspec_options())
    with fs.open(path, "rb") as handle:
        column = pq.read_table(handle, columns=["part_url"])["part_url"]
    counts = pc.value_counts(pc.cast(column, pa.string()).combine_chunks())
    return {str(entry["values"]): int(entry["counts"]) for entry in counts.to_pylist()}


# -- 2. rewrite ---------------------------------------------------------------------------------------------------


class _Bin:
    """Rows on their way to one new file, streamed into a local Parquet file (one part in memory at a time) and
    uploaded when it reaches the target row count, or when a part's columns differ (parts written under another
    job spec keep their own columns and types: nothing is cast)."""

    def __init__(
        self,
        output: OutputSpec,
        plan: CompactionPlan,
        day: date,
        target_rows: int,
        numbers: Iterator[int],
        *,
        scratch: Path,
        track: bool,
    ) -> None:
        self.output, self.plan, self.day, self.target_rows, self.numbers = output, plan, day, target_rows, numbers
        self.scratch = scratch
        self.track = track  # record where each row went (the current rows: the new state points at them)
        self.writer: pq.ParquetWriter | None = None
        self.schema: pa.Schema | None = None
        self.local: Path | None = None
        self.rows = 0
        self.ids: list[pa.Array] = []
        self.written: list[CommittedPart] = []
        self.moved: list[pa.Table] = []  # (doc_id, new_part) of the rows written, for the current bin

    def add(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        if self.schema is not None and not table.schema.equals(self.schema, check_metadata=False):
            self.flush()
        if self.writer is None:
            self.schema = table.schema
            self.local = self.scratch / f"bin-{id(self)}-{len(self.written)}.parquet"
            compression = None if self.output.compression == "none" else self.output.compression
            self.writer = pq.ParquetWriter(self.local, table.schema, compression=compression)
        self.writer.write_table(table)
        self.rows += table.num_rows
        if self.track:
            self.ids.append(pc.cast(table["doc_id"], pa.string()).combine_chunks())
        if self.rows >= self.target_rows:
            self.flush()

    def flush(self) -> None:
        if self.writer is None or self.local is None:
            return
        self.writer.close()
        number = next(self.numbers)
        url = self.output.layout.compacted_part(self.day, self.plan.compaction_id, number)
        local = self.local
        with local.open("rb") as source:
            atomic_write(self.output, url, lambda handle: shutil.copyfileobj(source, handle, 8 << 20))
        local.unlink()
        self.written.append(CommittedPart(url=url, rows=self.rows, shard=number, reused=False))
        if self.track:
            ids = pa.concat_arrays(self.ids) if self.ids else pa.array([], pa.string())
            self.moved.append(pa.table({"doc_id": ids, "new_part": pa.array([url] * len(ids), pa.string())}))
        self.writer, self.schema, self.local, self.rows, self.ids = None, None, None, 0, []


def rewrite_parts(spec: JobSpec, plan: CompactionPlan) -> Rewritten:
    """Write each run date's small parts into new files, then the state snapshot pointing at them.

    Raises CompactionStateError, before anything counts, if a document's current row would not be found in
    the new files (a state that names a part without the document: never expected, never committed).
    """
    output = spec.output
    if plan.state is None:
        raise CompactionStateError(f"{output.url} has parts but no committed state snapshot to compact with")
    fs, path = url_to_fs(plan.state, **output.fsspec_options())
    with fs.open(path, "rb") as handle:
        state = pl.from_arrow(conform_state(pq.read_table(handle)))
    assert isinstance(state, pl.DataFrame)
    replaced = plan.replaced
    pointed = state.select(pl.col("doc_id"), pl.col("part_url").cast(pl.String)).filter(
        pl.col("part_url").is_in(replaced)
    )
    current_of = {
        str(part): docs["doc_id"].to_arrow().cast(pa.string())
        for (part,), docs in pointed.group_by(["part_url"], maintain_order=True)
    }
    numbers = iter(range(10**5))
    parts: list[CommittedPart] = []
    moved: list[pa.Table] = []
    rows = 0
    with run_scratch() as scratch:
        for group in plan.groups:
            current = _Bin(output, plan, group.run_date, group.target_rows, numbers, scratch=scratch, track=True)
            history = _Bin(output, plan, group.run_date, group.target_rows, numbers, scratch=scratch, track=False)
            for url in group.parts:
                table = read_parquet(output, url)
                rows += table.num_rows
                wanted = current_of.get(url, pa.array([], pa.string()))
                is_current = pc.fill_null(pc.is_in(pc.cast(table["doc_id"], pa.string()), value_set=wanted), False)
                current.add(table.filter(is_current))
                history.add(table.filter(pc.invert(is_current)))
            current.flush()
            history.flush()
            parts += current.written + history.written
            moved += current.moved
    moved_frame = pl.from_arrow(pa.concat_tables(moved)) if moved else pl.DataFrame(schema={"doc_id": pl.String})
    assert isinstance(moved_frame, pl.DataFrame)
    lost = pointed.join(moved_frame.select("doc_id"), on="doc_id", how="anti")
    if lost.height:
        raise CompactionStateError(
            f"{lost.height} document(s) of {output.url} point at parts without their row (e.g. {lost.row(0)}): "
            "nothing was committed"
        )
    snapshot = output.layout.state_snapshot(plan.compaction_id)
    _write_state(output, snapshot, _repointed(state, moved_frame))
    return Rewritten(tuple(parts), tuple(replaced), snapshot, rows, pointed.height)


def _repointed(state: pl.DataFrame, moved: pl.DataFrame) -> pa.Table:
    """The state with each moved document's `part_url` set to its new file; every other column unchanged."""
    if not moved.height:
        return state.to_arrow().cast(STATE_SCHEMA)
    joined = state.join(moved, on="doc_id", how="left").with_columns(
        pl.coalesce(pl.col("new_part"), pl.col("part_url").cast(pl.String)).alias("part_url")
    )
    return joined.select(STATE_SCHEMA.names).to_arrow().cast(STATE_SCHEMA)


def _write_state(output: OutputSpec, url: str, table: pa.Table) -> None:
    repeated = [f.name for f in STATE_SCHEMA if pa.types.is_dictionary(f.type)]
    write_parquet(output, url, table, dictionary=repeated)


# -- 3. commit ----------------------------------------------------------------------------------------------------


def commit_compaction(spec: JobSpec, plan: CompactionPlan, rewritten: Rewritten, committed_at: datetime) -> str:
    """Write the compaction's manifest (the commit point); returns its URL. The caller checks its lease first."""
    manifest = spec.output.layout.manifest(plan.compaction_id, committed_at)
    write_json(
        spec.output,
        manifest,
        {
            "kind": ManifestKind.COMPACTION.value,
            "compaction_id": plan.compaction_id,
            "parts": [part.model_dump() for part in rewritten.parts],
            "replaces": list(rewritten.replaces),
            "state": rewritten.state,
            "previous_state": plan.state,
            "rows": rewritten.rows,
        },
    )
    return manifest


# -- 4. the current table -----------------------------------------------------------------------------------------


def maintain_table(spec: JobSpec, retention_hours: float) -> TableMaintenance:
    """Sync the current table to the newest manifest (recording the compaction), then optimize, vacuum what no
    version within the retention period reads, and checkpoint, keeping the app transaction the sync relies on
    (Delta); or rewrite small files, expire snapshots and delete unused files, keeping the run the sync reads
    (Iceberg, `_maintain_iceberg`)."""
    output = spec.output
    if not output.table.enabled:
        return TableMaintenance(TableAction.OFF)
    sync = sync_current_table(spec)
    if sync.action is SyncAction.NOTHING_COMMITTED:
        return TableMaintenance(TableAction.NOTHING_COMMITTED)
    if output.table.format == "iceberg":
        return _maintain_iceberg(spec, retention_hours, sync.run_id)
    from deltalake import CommitProperties, DeltaTable

    uri, options = output.layout.current_table(), delta_storage_options(output)
    table = DeltaTable(uri, storage_options=options)
    synced = table.transaction_version(APP_ID)
    before = len(table.file_uris())
    table.optimize.compact(
        target_size=int(output.compaction.target_file_mb * 2**20),
        writer_properties=delta_writer_properties(),
        commit_properties=CommitProperties(custom_metadata={"docroute_operation": "compact"}),
    )
    vacuumed = table.vacuum(retention_hours=math.ceil(retention_hours), enforce_retention_duration=False, dry_run=False)
    table.create_checkpoint()
    after = DeltaTable(uri, storage_options=options)
    if after.transaction_version(APP_ID) != synced:  # pragma: no cover - delta-rs keeps app transactions
        raise StateError(f"optimizing {uri} lost the record of the run it holds; the next run rebuilds it")
    return TableMaintenance(TableAction.OPTIMIZED, before, len(after.file_uris()), len(vacuumed), sync.run_id)


def _maintain_iceberg(spec: JobSpec, retention_hours: float, synced_run: str | None) -> TableMaintenance:
    """The Iceberg table's compaction and retention (module docstring, step 4), after its sync."""
    from docroute.tasks.store.iceberg_table import TABLE_FILE_SUFFIXES, IcebergCurrentTable

    output = spec.output
    table = IcebergCurrentTable(spec)
    try:
        before, after = table.compact(int(output.compaction.target_file_mb * 2**20), SMALL_FRACTION)
        # counted from after the rewrite, as Delta's vacuum after optimize: with retention 0, its files go too
        cutoff = datetime.now(UTC) - timedelta(hours=retention_hours)
        expired = table.expire_snapshots(cutoff)
        location, in_use = table.files_in_use(cutoff)
    finally:
        table.close()
    fs = _fs(output)
    root, base = _path(fs, output.url).rstrip("/"), _path(fs, location).rstrip("/")
    deleted = 0
    if base.startswith(root + "/"):  # a catalog's own warehouse elsewhere is the catalog's to clean
        keep = {_path(fs, url) for url in in_use}
        for folder in (posixpath.join(base, "data"), posixpath.join(base, "metadata")):
            fs.invalidate_cache(folder)
            try:
                found = fs.find(folder, detail=True)
            except FileNotFoundError:
                continue
            for path, info in found.items():
                if path in keep or not path.endswith(TABLE_FILE_SUFFIXES):
                    continue
                modified = _modified(info)
                if modified is not None and modified <= cutoff and _delete(fs, path):
                    deleted += 1
    else:
        log.info("the Iceberg table %s lies outside %s: its unused files are left to its catalog", location, output.url)
    return TableMaintenance(TableAction.REWRITTEN, before, after, deleted, synced_run, expired)


# -- 5. retention -------------------------------------------------------------------------------------------------


def apply_retention(spec: JobSpec, retention_hours: float, now: datetime | None = None) -> RetentionReport:
    """Delete what no reader needs and no run can adopt, once older than the retention period (module docstring)."""
    output = spec.output
    fs = _fs(output)
    now = now or datetime.now(UTC)
    cutoff = now - timedelta(hours=retention_hours)
    manifests = committed_manifests(output)
    contents = [manifest for _, manifest in manifests]
    live = {_path(fs, url) for url in live_parts(contents)}
    named = {_path(fs, part["url"]) for manifest in contents for part in manifest.get("parts", [])}
    removed: dict[Removed, int] = defaultdict(int)
    # parts compactions replaced long enough ago
    for name, manifest in manifests:
        at = OutputLayout.manifest_committed_at(name)
        if manifest_kind(manifest) is not ManifestKind.COMPACTION or at is None or at > cutoff:
            continue
        for url in manifest.get("replaces", []):
            if _path(fs, url) not in live and _delete(fs, _path(fs, url)):
                removed[Removed.REPLACED_PART] += 1
    # files no manifest names and no plan owns
    owned = _plan_prefixes(output, fs)
    pinned = {_path(fs, url) for url in pinned_parts(output)}
    results_root = _path(fs, output.layout.results_dir())
    errors_root = _path(fs, output.layout.errors_dir())
    for root in (results_root, errors_root):
        for path, info in _parquet_files(fs, root).items():
            name = posixpath.basename(path)
            if path in named or path in pinned or name.startswith(owned):
                continue
            if root == errors_root:  # a committed part's error rows are kept for triage with it
                sibling = results_root + path[len(errors_root) :]
                if posixpath.join(posixpath.dirname(sibling), "part-" + name.removeprefix("errors-")) in named:
                    continue
            modified = _modified(info)
            if modified is not None and modified <= cutoff and _delete(fs, path):
                removed[Removed.ORPHAN_FILE] += 1
    # state snapshots the newest two manifests do not name
    keep = {_path(fs, m["state"]) for m in [m for m in contents if m.get("state")][-2:]}
    for path, info in _parquet_files(fs, output.layout.state_documents_dir()).items():
        modified = _modified(info)
        if path not in keep and modified is not None and modified <= cutoff and _delete(fs, path):
            removed[Removed.OLD_SNAPSHOT] += 1
    return RetentionReport(dict(removed), len(_parquet_files(fs, output.layout.results_dir())))


def _plan_prefixes(output: OutputSpec, fs: AbstractFileSystem) -> tuple[str, ...]:
    """File-name prefixes of every plan file present: a dead run's parts the next run may adopt."""
    root = _path(fs, output.layout.plans_dir())
    fs.invalidate_cache(root)
    try:
        plans = [posixpath.basename(p)[: -len(".parquet")] for p in fs.ls(root, detail=False) if p.endswith(".parquet")]
    except FileNotFoundError:
        return ()
    return tuple(prefix for plan in plans for prefix in (f"part-{plan}-", f"errors-{plan}-"))


def _delete(fs: AbstractFileSystem, path: str) -> bool:
    """Delete one file; False when it was already gone (a repeated clean-up)."""
    try:
        fs.rm(path)
    except FileNotFoundError:
        return False
    return True


def count_results_files(output: OutputSpec) -> int:
    """Parquet files under results/, committed or not: what a glob reader opens."""
    return len(_parquet_files(_fs(output), output.layout.results_dir()))


# -- the sequence ---------------------------------------------------------------------------------------------------

StepRunner = Callable[..., Any]
"""How a step is run: `step(function, *args)`; the flow runs each as a Prefect task, a plain call runs it here."""


def _direct(function: Callable[..., Any], *args: Any) -> Any:
    return function(*args)


def compact(
    spec: JobSpec,
    *,
    compaction_id: str,
    flow_run_id: str | None = None,
    retention_hours: float | None = None,
    step: StepRunner = _direct,
    logger: logging.Logger | logging.LoggerAdapter[Any] = log,
) -> CompactionReport:
    """Compact `spec.output`: the five steps of the module docstring, under the output's lease.

    Raises RunInProgressError (exit 3) before reading anything while a live run holds the lease; a dead holder's
    lease is taken over. The lease is checked right before the manifest, so a compaction that lost the output to a
    run never commits.
    """
    started = time.perf_counter()
    retention = spec.output.compaction.retention_hours if retention_hours is None else retention_hours
    lease = acquire_lease(spec.output, run_id=compaction_id, flow_run_id=flow_run_id, ttl_s=spec.output.lease_ttl_s)
    if lease.takeover is not None:
        logger.warning("%s was dead: this compaction took over its lease", lease.takeover.previous.describe())
    with lease.released_after("compacted", logger):
        plan: CompactionPlan = step(plan_compaction, spec, compaction_id)
        manifest, rewritten = None, None
        if plan.groups:
            rewritten = step(rewrite_parts, spec, plan)
            lease.check()
            manifest = step(commit_compaction, spec, plan, rewritten, datetime.now(UTC))
        table: TableMaintenance = step(maintain_table, spec, retention)
        retained: RetentionReport = step(apply_retention, spec, retention)
    new_files = len(rewritten.parts) if rewritten else 0
    report = CompactionReport(
        compaction_id=compaction_id,
        action=CompactionAction.COMPACTED if rewritten else CompactionAction.NOTHING_TO_DO,
        run_dates=tuple(group.run_date for group in plan.groups),
        live_parts_before=plan.live_parts,
        live_parts_after=plan.live_parts - len(plan.replaced) + new_files,
        results_files_before=plan.results_files,
        results_files_after=retained.results_files,
        rows=rewritten.rows if rewritten else 0,
        manifest=manifest,
        table=table,
        retention=retained,
        seconds=time.perf_counter() - started,
    )
    for line in describe(report):
        logger.info("%s", line)
    return report


def describe(report: CompactionReport) -> Iterable[str]:
    """The lines `docroute compact` prints."""
    if report.action is CompactionAction.COMPACTED:
        days = ", ".join(d.isoformat() for d in report.run_dates)
        yield (
            f"compacted {report.rows} rows of {len(report.run_dates)} run date(s) ({days}): committed parts "
            f"{report.live_parts_before} -> {report.live_parts_after}"
        )
    else:
        yield f"nothing to compact: {report.live_parts_before} committed part(s), none worth rewriting"
    yield f"results files on storage: {report.results_files_before} -> {report.results_files_after}"
    table = report.table
    if table.action is TableAction.OPTIMIZED:
        yield f"current table: {table.files_before} -> {table.files_after} file(s), {table.vacuumed} vacuumed"
    elif table.action is TableAction.REWRITTEN:
        yield (
            f"current table: {table.files_before} -> {table.files_after} data file(s), "
            f"{table.expired_snapshots} snapshot(s) expired, {table.vacuumed} file(s) deleted"
        )
    else:
        yield f"current table: {table.action.value}"
    if report.retention.removed:
        yield "deleted: " + ", ".join(f"{count} {why.value}" for why, count in sorted(report.retention.removed.items()))
    yield f"done in {report.seconds:.2f} s" + (f"; manifest {report.manifest}" if report.manifest else "")
