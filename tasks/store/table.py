"""The current table: one row per document, a Delta Lake table under `<output>/tables/documents` that every run keeps
equal to what `current_rows()` returns, so warehouses and notebooks read current answers without the state join.

It is a *derived* copy of committed data, never a source of truth, and it is written only after the manifest:

- **Crash before the manifest**: the table is untouched; the run is not committed and nobody may see its rows.
- **Crash between the manifest and the table commit**: the run is committed but the table lags one run. Every run
  syncs the table at its start (under the output's lease), before it lists anything, so the next run brings it up
  to the newest manifest; so does a run whose table was deleted (it is rebuilt from the committed state).
- **Crash after the table commit**: the table already holds the run; the next run finds it in sync and writes
  nothing. A Delta commit is one create-if-absent write of its log entry, so the table is never half-written.

The table is therefore never *ahead* of the manifests: a reader can never see in it a row that the committed state
later disowns. Each Delta commit records which run it brings the table up to, as an app transaction
(`Transaction("docroute", version)`, where the version is the manifest's commit time in microseconds — manifest
names sort by it, so "the runs after the table's" is a comparison) and, for people, as commit metadata
(`docroute_run_id`). Re-applying a run is harmless anyway: a MERGE on `doc_id` replaces a row with itself.

What a sync applies, from committed data only: the state snapshot of the newest manifest names each document's
current part and the run that last wrote its state row. The rows to merge are those of documents whose state
`run_id` is one of the runs committed after the table's last one (their current part holds the new row), plus
those whose `deleted_at` differs from the table's (a file that left the source, or came back unchanged). When
every state row belongs to those runs (the first run, a `--full-refresh`, a table that was missing or was not
ours), the table is rewritten in one commit instead, which also drops documents the state no longer has. The
changed documents wait on local disk in buckets of their part (tasks/store/spill.py), and their rows stream one part
at a time into the Delta files written by tasks/store/delta_files.py, so a sync's memory does not grow with the
corpus (delta-rs's own MERGE does: see that module).

All of this is the same for every table format; a format (`CurrentTableFormat`) only says which run its table
holds and how it rewrites or merges in one commit: Delta Lake here (`DeltaCurrentTable`), Apache Iceberg through a
catalog in tasks/store/iceberg_table.py (`output.table.format`).
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from docroute.schemas.errors import InputError, StorageError
from docroute.schemas.evolution import AnswerSchema, answer_schema
from docroute.schemas.layout import OutputLayout
from docroute.schemas.rows import UTC_MICROS, result_schema
from docroute.schemas.spec import DeletedRows, JobSpec, OutputSpec
from docroute.tasks.store.delta_files import (
    ROW_GROUP_ROWS,
    DeltaFileWriter,
    files_with_documents,
    rows_without,
    target_file_bytes,
)
from docroute.tasks.store.schema_record import committed_answer_schema
from docroute.tasks.store.scratch import run_scratch
from docroute.tasks.store.spill import BucketSpill, bucket_count
from docroute.tasks.store.state import manifest_paths
from docroute.tasks.store.write import read_parquet

APP_ID = "docroute"
"""The Delta app-transaction id whose version says up to which committed run the table is synced."""

_STATE_COLUMNS = ["doc_id", "part_url", "run_id", "deleted_at"]


def delta_writer_properties() -> Any:
    """The writer settings of delta-rs's own rewrites of the table (compaction), matching the files this module
    writes (`ROW_GROUP_ROWS`)."""
    from deltalake import WriterProperties

    return WriterProperties(max_row_group_size=ROW_GROUP_ROWS)


class SyncAction(StrEnum):
    """What a sync did to the table."""

    OFF = "off"  # output.table.enabled is false
    NOTHING_COMMITTED = "nothing_committed"  # no manifest yet: nothing to show
    IN_SYNC = "in_sync"  # the table already holds the newest committed run
    MERGED = "merged"  # the changed documents merged on doc_id
    REWRITTEN = "rewritten"  # every current row written in one commit (first run, full refresh, missing table)


@dataclass(frozen=True, slots=True)
class TableSync:
    """The outcome of one sync: what was done, up to which run, how many rows went in, and how long it took."""

    action: SyncAction
    run_id: str | None = None
    rows: int = 0
    seconds: float = 0.0
    behind: int = 0  # committed runs the table was missing before this sync

    @property
    def wrote(self) -> bool:
        """Whether the sync made a Delta commit."""
        return self.action in (SyncAction.MERGED, SyncAction.REWRITTEN)

    def describe(self) -> str:
        if self.wrote:
            lag = f", {self.behind} committed run(s) behind" if self.behind > 1 else ""
            return f"{self.action.value} {self.rows} row(s) up to run {self.run_id} in {self.seconds:.2f} s{lag}"
        return self.action.value


@dataclass(frozen=True, slots=True)
class Commit:
    """A committed run, as its manifest's name gives it."""

    run_id: str
    version: int  # the manifest's commit time in microseconds since the epoch
    manifest: str


def delta_storage_options(output: OutputSpec) -> dict[str, str]:
    """delta-rs (object_store) options for the output, mapped from the same settings its fsspec filesystem uses.

    S3: each Delta commit is a create-if-absent PUT of its log entry (`If-None-Match: *`, `aws_conditional_put`),
    which AWS S3, MinIO, R2 and moto honour; no locking provider and never `AWS_S3_ALLOW_UNSAFE_RENAME`. The output's
    lease already makes this run the only writer, so the conditional PUT is a second guard, not the first.
    """
    if not output.url.startswith(("s3://", "s3a://")):
        return {}
    fs = output.fsspec_options()
    client = fs.get("client_kwargs", {})
    options = {"aws_conditional_put": "etag"}
    endpoint = fs.get("endpoint_url") or client.get("endpoint_url")
    if endpoint:
        options["aws_endpoint_url"] = str(endpoint)
        if str(endpoint).startswith("http://"):
            options["aws_allow_http"] = "true"
    region = client.get("region_name") or fs.get("region")
    options["aws_region"] = str(region or "us-east-1")  # object_store needs one; S3 redirects to the bucket's own
    for ours, theirs in (("key", "aws_access_key_id"), ("secret", "aws_secret_access_key"), ("token", "aws_token")):
        if fs.get(ours):
            options[theirs] = str(fs[ours])
    if fs.get("profile"):
        options["aws_profile"] = str(fs["profile"])
    if fs.get("anon"):
        options["aws_skip_signature"] = "true"
    return options


def table_schema(spec: JobSpec, answers: AnswerSchema | None = None) -> pa.Schema:
    """The table's columns: the job's result columns with the same types, the retired ones, then `deleted_at`.

    `answers` is the answer schema the synced manifest records (schemas/evolution.py): its label and fields take
    the place of the job's, and the columns earlier runs retired follow the result columns (kept, null in rows
    written since); without a record (outputs older than it), the job's own answer columns. Delta has no
    dictionary encoding, so labels, enums and routes are plain strings there (Parquet still stores them
    dictionary-encoded); every other type (decimal, date, UTC timestamps, lists) is kept as declared.
    """
    answers = answers or answer_schema(spec)
    declared = answer_schema(spec).names()  # the job's answer columns: replaced by the record's
    result = list(result_schema(spec))
    first = next((i for i, f in enumerate(result) if f.name in declared), len(result))
    provenance = [f for f in result if f.name not in declared]
    columns = [*provenance[:first], *answers.answer_fields(), *provenance[first:], *answers.retired_fields()]
    fields = [
        pa.field(f.name, f.type.value_type if pa.types.is_dictionary(f.type) else f.type, nullable=True)
        for f in columns
    ]
    return pa.schema([*fields, pa.field("deleted_at", UTC_MICROS, nullable=True)])


class CurrentTableFormat(Protocol):
    """One table format's side of a sync; everything else (which run is committed, which documents changed, their
    rows, in the schema `table_schema` declares) is the same for every format and lives in `sync_current_table`."""

    uri: str  # where the table is, for messages

    def synced_version(self) -> int | None:
        """The version of the committed run the table holds (`Commit.version`); None when there is no table or
        it is not ours (then it is rewritten)."""
        ...

    def deleted_doc_ids(self) -> pa.Array:
        """The doc_ids the table marks deleted (string)."""
        ...

    def rewrite(self, source: pa.RecordBatchReader, commit: Commit) -> None:
        """Replace every row with `source` in one commit recording `commit`."""
        ...

    def merge(self, source: pa.RecordBatchReader, changed: pa.Array, commit: Commit) -> None:
        """Replace the rows of the documents `changed` (doc_ids, string) with `source`, and insert the new ones, in
        one commit recording `commit` (made even when `changed` is empty)."""
        ...

    def error(self, exc: Exception) -> InputError | StorageError:
        """A library error as docroute's: the user's to settle, or the store's."""
        ...


def open_current_table(spec: JobSpec) -> CurrentTableFormat:
    """The job's current table in its format (`output.table.format`)."""
    if spec.output.table.format == "iceberg":
        from docroute.tasks.store.iceberg_table import IcebergCurrentTable

        return IcebergCurrentTable(spec)
    return DeltaCurrentTable(spec.output)


def sync_current_table(spec: JobSpec) -> TableSync:
    """Bring the current table up to the newest committed manifest (see the module docstring); a no-op when it is.

    Must run under the output's lease. Raises InputError when the job's columns cannot go into the existing table
    (a field whose type changed), StorageError when the table cannot be read or written.
    """
    output = spec.output
    if not output.table.enabled:
        return TableSync(SyncAction.OFF)
    started = time.perf_counter()
    commits = committed_runs(output)
    newest = newest_with_state(output, commits)
    if newest is None:
        return TableSync(SyncAction.NOTHING_COMMITTED)
    commit, snapshot = newest
    table = open_current_table(spec)
    try:
        synced = table.synced_version()
        if synced == commit.version:
            return TableSync(SyncAction.IN_SYNC, commit.run_id)
        behind = [c for c in commits if synced is None or c.version > synced]
        # the columns the synced run committed (schemas/evolution.py): a field added is a new column (the MERGE
        # evolves the schema), a retired one stays and its nulls are merged. A type changes only under
        # --full-refresh, whose state holds its own rows only, so that sync rewrites the table in the new type
        answers = committed_answer_schema(output, up_to=commit.manifest)
        rewrite = synced is None or synced > commit.version  # missing, not ours, or ahead
        deleted = None if rewrite else _deleted_as_synced(output, commits, synced, table)
        schema = table_schema(spec, answers)
        with run_scratch() as scratch:
            changed = changed_documents(
                output, snapshot, {c.run_id for c in behind}, deleted_in_table=deleted, scratch=scratch
            )
            source = pa.RecordBatchReader.from_batches(schema, current_batches(output, changed, schema))
            if rewrite or changed.every_row:
                table.rewrite(source, commit)
                action = SyncAction.REWRITTEN
            else:  # an empty `changed` still commits: the table must record that it holds this run
                table.merge(source, changed.doc_ids, commit)
                action = SyncAction.MERGED
    except (InputError, StorageError):
        raise
    except Exception as exc:
        raise table.error(exc) from exc
    return TableSync(action, commit.run_id, changed.rows, time.perf_counter() - started, len(behind))


class DeltaCurrentTable:
    """The Delta Lake current table at `<output>/tables/documents` (no catalog). Its files are written by
    tasks/store/delta_files.py with bounded memory and committed by delta-rs in one transaction each."""

    def __init__(self, output: OutputSpec) -> None:
        self._output = output
        self.uri = output.layout.current_table()
        self._options = delta_storage_options(output)
        self._table = _open(self.uri, self._options)
        self._fs, self._root = url_to_fs(self.uri, **output.fsspec_options())
        self._target = target_file_bytes(output.compaction.target_file_mb)

    def synced_version(self) -> int | None:
        return self._table.transaction_version(APP_ID) if self._table is not None else None

    def deleted_doc_ids(self) -> pa.Array:
        return _deleted_in_table(self._table)

    def rewrite(self, source: pa.RecordBatchReader, commit: Commit) -> None:
        from deltalake import Schema
        from deltalake.transaction import create_table_with_add_actions

        self._fs.makedirs(self._root, exist_ok=True)
        written = DeltaFileWriter(self._fs, self._root, source.schema, self._target).write(
            kept_rows(self._output, source)
        )
        adds = [file.add_action() for file in written]
        properties = _commit_properties(commit, "rewrite")
        if self._table is None:
            create_table_with_add_actions(
                self.uri,
                Schema.from_arrow(source.schema),
                adds,
                mode="overwrite",
                storage_options=self._options,
                commit_properties=properties,
            )
        else:  # every file of the table removed, the new schema set (a --full-refresh may change a type)
            self._table.create_write_transaction(
                adds, mode="overwrite", schema=source.schema, commit_properties=properties
            )

    def merge(self, source: pa.RecordBatchReader, changed: pa.Array, commit: Commit) -> None:
        from deltalake.transaction import RemoveAction

        assert self._table is not None
        self._add_new_columns(source.schema)
        table = self._table
        listed = pa.table(table.get_add_actions(flatten=True))
        sizes = dict(zip(listed["path"].to_pylist(), listed["size_bytes"].to_pylist(), strict=True))
        touched = list(files_with_documents(self._fs, self._root, sizes, changed)) if len(changed) else []
        # the touched files' other rows and the changed documents' current rows, packed into new files; a dropping
        # table inserts only the rows of listed files, so a deleted document's row goes with its old file
        remaining = rows_without(self._fs, self._root, touched, changed, source.schema)
        writer = DeltaFileWriter(self._fs, self._root, source.schema, self._target)
        written = writer.write(itertools.chain(remaining, kept_rows(self._output, source)))
        now = int(time.time() * 1000)
        removes = [RemoveAction(name, True, now, sizes[name], {}) for name in touched]
        table.create_write_transaction(
            [*removes, *(file.add_action() for file in written)],
            mode="append",
            schema=source.schema,
            commit_properties=_commit_properties(commit, "merge"),
        )

    def _add_new_columns(self, schema: pa.Schema) -> None:
        """Columns of fields added to the job since the table was written, added (null in older files) in their own
        commit: a write transaction keeps the table's schema. A crash after it leaves a table with one more empty
        column, which the next sync's merge finds already there."""
        from deltalake import Field

        assert self._table is not None
        present = set(pa.schema(self._table.schema().to_arrow()).names)
        added = [Field.from_arrow(field) for field in schema if field.name not in present]
        if added:
            self._table.alter.add_columns(added)
            self._table = _open(self.uri, self._options)

    def error(self, exc: Exception) -> InputError | StorageError:
        return _docroute_error(self.uri, exc)


def _docroute_error(uri: str, exc: Exception) -> InputError | StorageError:
    """A type the job changed is the user's to settle; anything else is the store's."""
    from deltalake.exceptions import SchemaMismatchError

    message = str(exc).splitlines()[0][:500] if str(exc) else type(exc).__name__
    if isinstance(exc, SchemaMismatchError | pa.ArrowInvalid | pa.ArrowNotImplementedError):
        return InputError(
            f"the current table {uri} cannot take this job's columns ({message}): a field changed its type; delete "
            "the table to have the next run rebuild it from the committed results, or set output.table.enabled: false"
        )
    return StorageError(f"the current table {uri} could not be updated ({type(exc).__name__}: {message})")


def _open(uri: str, options: dict[str, str]) -> Any:
    """The Delta table at `uri`, or None when there is none (never created, or deleted)."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:  # (not DeltaTable.is_deltatable: it holds the GIL through its requests, stalling the lease's renewals)
        return DeltaTable(uri, storage_options=options)
    except TableNotFoundError:
        return None


def _commit_properties(commit: Commit, operation: str) -> Any:
    """The commit's record of the run it holds (the app transaction readers of `synced_version` use) and, for
    people reading the table's history, the run and what docroute did (`merge` shows as a WRITE in Delta's log)."""
    from deltalake import CommitProperties, Transaction

    return CommitProperties(
        custom_metadata={
            "docroute_run_id": commit.run_id,
            "docroute_manifest": commit.manifest,
            "docroute_operation": operation,
        },
        app_transactions=[Transaction(APP_ID, commit.version)],
    )


def _deleted_as_synced(
    output: OutputSpec, commits: list[Commit], synced: int | None, table: CurrentTableFormat
) -> pa.Array | None:
    """The doc_ids that were deleted as far as the table knows, to find documents deleted or back since.

    A marking table carries them (`deleted_at`). A dropping table has no row to read them from, so they come from
    the state snapshot of the run the table is synced to; when that snapshot has been pruned, None: the table is
    rewritten, which is always correct."""
    if output.table.deleted is DeletedRows.MARK:
        return table.deleted_doc_ids()
    at_sync = next((c for c in commits if c.version == synced), None)
    if at_sync is None:
        return None
    fs, _ = url_to_fs(output.layout.manifests_dir(), **output.fsspec_options())
    state = json.loads(fs.cat_file(at_sync.manifest)).get("state")
    if not state or not fs.exists(state):
        return None
    rows = read_parquet(output, state).select(["doc_id", "deleted_at"])
    return pc.cast(rows.filter(pc.is_valid(rows["deleted_at"]))["doc_id"], pa.string()).combine_chunks()


def kept_rows(output: OutputSpec, source: pa.RecordBatchReader) -> pa.RecordBatchReader:
    """The rows a table writes: all of them, or, when it drops deleted documents, those whose file is listed."""
    if output.table.deleted is DeletedRows.MARK:
        return source

    def listed() -> Iterator[pa.RecordBatch]:
        for batch in source:
            yield batch.filter(pc.is_null(batch.column("deleted_at")))

    return pa.RecordBatchReader.from_batches(source.schema, listed())


def committed_runs(output: OutputSpec) -> list[Commit]:
    """Every committed run, oldest first (manifest names start with their commit time)."""
    _, names = manifest_paths(output)
    commits = []
    for name in names:
        at = OutputLayout.manifest_committed_at(name)
        if at is not None:
            micros = (at - datetime(1970, 1, 1, tzinfo=UTC)) // _MICROSECOND
            commits.append(Commit(OutputLayout.manifest_run_id(name), micros, name))
    return commits


_MICROSECOND = datetime(1970, 1, 1, 0, 0, 0, 1, tzinfo=UTC) - datetime(1970, 1, 1, tzinfo=UTC)


def newest_with_state(output: OutputSpec, commits: list[Commit]) -> tuple[Commit, str] | None:
    """The newest committed run whose manifest names a state snapshot, and that snapshot's URL."""
    fs, _ = url_to_fs(output.layout.manifests_dir(), **output.fsspec_options())
    for commit in reversed(commits):
        state = json.loads(fs.cat_file(commit.manifest)).get("state")
        if state:
            return commit, state
    return None


_CHANGED_SCHEMA = pa.schema([("doc_id", pa.string()), ("part_url", pa.string()), ("deleted_at", UTC_MICROS)])


@dataclass(frozen=True, slots=True)
class ChangedDocuments:
    """The documents a sync writes: on local disk in buckets of their part (so each part is read once, and memory
    holds one bucket whatever the corpus), their doc_ids when the table is merged, and whether every state row was
    written by the runs the table lacks (then the table is rewritten instead)."""

    by_part: BucketSpill  # doc_id, part_url, deleted_at
    doc_ids: pa.Array  # empty when the table is rewritten (not needed, and it would be every document)
    every_row: bool
    rows: int


def changed_documents(
    output: OutputSpec, snapshot: str, runs: set[str], *, deleted_in_table: pa.Array | None, scratch: Path
) -> ChangedDocuments:
    """The documents to write, read from the snapshot batch by batch into buckets by part under `scratch`.
    `deleted_in_table`: the doc_ids the table marks deleted; None when it is to be rewritten (then every document
    is written)."""
    rewrite = deleted_in_table is None
    if deleted_in_table is None:
        deleted_in_table = pa.array([], pa.string())
    wanted = pa.array(sorted(runs), pa.string())
    ids: list[pa.Array] = []
    every_row, rows_kept = True, 0
    fs, path = url_to_fs(snapshot, **output.fsspec_options())
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        by_part = BucketSpill(
            scratch / "table-sync", "changed", _CHANGED_SCHEMA, bucket_count(parquet.metadata.num_rows), key="part_url"
        )
        present = [c for c in _STATE_COLUMNS if c in parquet.schema_arrow.names]
        for batch in parquet.iter_batches(batch_size=65_536, columns=present):
            rows = pa.Table.from_batches([batch])
            run_ids = pc.cast(rows["run_id"], pa.string()) if "run_id" in present else pa.nulls(len(rows), pa.string())
            by_run = pc.fill_null(pc.is_in(run_ids, value_set=wanted), False)
            every_row = every_row and bool(pc.all(by_run).as_py())
            deleted = rows["deleted_at"] if "deleted_at" in present else pa.nulls(len(rows), UTC_MICROS)
            if rewrite:
                keep = pc.is_valid(rows["doc_id"])
            else:  # written by a run the table lacks, or deleted (or back) since the table last saw it
                was_marked = pc.is_in(pc.cast(rows["doc_id"], pa.string()), value_set=deleted_in_table)
                keep = pc.or_(by_run, pc.xor(pc.is_valid(deleted), was_marked))
            rows = rows.filter(keep)
            if rows.num_rows:
                doc_ids = pc.cast(rows["doc_id"], pa.string())
                by_part.add(
                    pa.table(
                        {
                            "doc_id": doc_ids,
                            "part_url": pc.cast(rows["part_url"], pa.string()),
                            "deleted_at": pc.cast(deleted.filter(keep), UTC_MICROS),
                        }
                    )
                )
                rows_kept += rows.num_rows
                if not rewrite:
                    ids.append(doc_ids.combine_chunks())
    by_part.close()
    doc_ids = pa.concat_arrays(ids) if ids else pa.array([], pa.string())
    return ChangedDocuments(by_part, doc_ids, every_row, rows_kept)


def _deleted_in_table(table: Any) -> pa.Array:
    """The doc_ids the table marks deleted (one column, filtered while scanning)."""
    if "deleted_at" not in pa.schema(table.schema().to_arrow()).names:
        return pa.array([], pa.string())
    found = table.to_pyarrow_dataset().to_table(columns=["doc_id"], filter=pc.field("deleted_at").is_valid())
    return pc.cast(found["doc_id"].combine_chunks(), pa.string())


def current_batches(output: OutputSpec, changed: ChangedDocuments, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    """The changed documents' current rows, one part at a time, in the table's schema with their `deleted_at`;
    one bucket of changed documents in memory at a time."""
    for bucket in range(changed.by_part.buckets):
        documents = changed.by_part.read(bucket)
        if not documents.num_rows:
            continue
        frame = pl.from_arrow(documents)
        assert isinstance(frame, pl.DataFrame)
        for (part,), docs in frame.group_by(["part_url"], maintain_order=True):
            ids = docs["doc_id"].to_arrow().cast(pa.string())
            table = read_parquet(output, str(part))
            position = pc.index_in(pc.cast(table["doc_id"], pa.string()), value_set=ids)
            found = pc.is_valid(position)
            table, position = table.filter(found), position.filter(found)
            deleted = docs["deleted_at"].to_arrow().cast(UTC_MICROS).take(position)
            yield from _conform(table, schema, deleted).to_batches()


def _conform(table: pa.Table, schema: pa.Schema, deleted: pa.Array) -> pa.Table:
    """A part's rows in the table's schema: dictionaries decoded, missing columns (older parts, a field added
    since; newer parts, a field retired since) as nulls."""
    columns = []
    for field in schema:
        if field.name == "deleted_at":
            columns.append(deleted)
        elif field.name in table.column_names:
            columns.append(pc.cast(table[field.name], field.type))
        else:
            columns.append(pa.nulls(table.num_rows, field.type))
    return pa.table(columns, schema=schema)
