"""The current table as Apache Iceberg (`output.table.format: iceberg`): the same derived copy of committed data as
the Delta table (tasks/store/table.py, whose module docstring is the protocol), kept through an Iceberg catalog
with pyiceberg, for warehouses that read Iceberg (Snowflake, BigQuery, Athena, Trino).

What differs from Delta is only how a commit is made and what it records:

- **The catalog is the commit.** Data files and a new metadata file are written first; the catalog's pointer to
  the table's metadata moves in one compare-and-swap at the end of a pyiceberg transaction (a SQL catalog's
  conditional UPDATE, a REST catalog's commit endpoint, Glue's versioned update). A run killed before that swap
  leaves the table as it was (files no snapshot names are orphans, never read); after it, the table holds the run.
- **The run a table holds** is in the summary of each snapshot docroute commits (`docroute_version`: the
  manifest's commit time in microseconds, as Delta's app transaction; `docroute_run_id`, `docroute_manifest` for
  people). The newest such snapshot among the current snapshot's ancestors counts, past data-preserving
  `replace` snapshots (compaction); a snapshot of any other writer makes the table "not ours": it is rewritten.
- **A merge is delete-then-append in one transaction**, not `Table.upsert`: upsert wants every changed row in
  memory at once as one Arrow table and compares each with the table's; here the changed documents' doc_ids
  (small) select the rows to delete (copy-on-write: each data file holding one is rewritten, one file in memory
  at a time), and their new rows are appended as a stream, part by part. Both land as one catalog commit.
- **Compaction** (`docroute compact`, tasks/store/compact.py) rewrites the current snapshot's small data files
  (every merge appends one, and its copy-on-write delete rewrites others) into files of about
  `output.compaction.target_file_mb`, in one `overwrite` snapshot that deletes them and adds the new files: the
  rows are the same. pyiceberg 0.12 has no data-file rewrite, so it is built from its own pieces (a scan of the
  chosen files, its Parquet writer, an overwrite producer), one output file in memory at a time. The snapshot
  carries the synced snapshot's `docroute_*` properties forward (and `docroute_operation: compact`), so the table
  still holds the same run and the next run merges only its changes. Snapshots that stopped being current longer
  ago than the retention period are then expired (`expire_snapshots`), and `files_in_use` says which files a
  remaining snapshot or recent metadata file still names; the compaction deletes the others once old enough.
- **A missing table** (never created, dropped from the catalog, or whose metadata file is gone) is created with
  its rows in one commit (`create_table_transaction`). A full rewrite whose columns the table cannot take (a field
  changed its type) drops the table and creates it anew: a kill in between leaves no table, which the next run
  rebuilds.

With no catalog configured, a local output gets a SQL catalog on SQLite at `<output>/tables/catalog.db` (the
table's files under `<output>/tables/iceberg/documents`); an object-store output must name one (schemas/spec.py
refuses it otherwise: a SQLite file cannot be shared through an object store).
"""

from __future__ import annotations

import warnings
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from docroute.schemas.errors import InputError, StateError, StorageError
from docroute.schemas.spec import IcebergCatalogSpec, JobSpec, OutputSpec
from docroute.tasks.store.table import ROW_GROUP_ROWS, Commit, kept_rows

if TYPE_CHECKING:
    from pyiceberg.catalog import Catalog
    from pyiceberg.table import Table

VERSION_PROPERTY = "docroute_version"
"""The snapshot summary property naming the committed run (its manifest's commit time, µs) the table holds."""

OPERATION_PROPERTY = "docroute_operation"
"""Set to `compact` on a compaction's snapshot: the rows are the run's it carries forward, in fewer files."""

_RUN_PROPERTIES = (VERSION_PROPERTY, "docroute_run_id", "docroute_manifest")
"""The summary properties that say which committed run a snapshot holds: a compaction carries them forward."""

TABLE_FILE_SUFFIXES = (".parquet", ".avro", ".metadata.json")
"""What the table's folder holds (data, manifests and manifest lists, metadata): nothing else is ever deleted."""

_TARGET_FILE_BYTES = 64 * 1024 * 1024
"""Data files of at most this much Arrow data: a merge's copy-on-write holds one of them in memory at a time."""


def default_catalog(output: OutputSpec) -> IcebergCatalogSpec:
    """The catalog a local output gets when it names none: SQLite beside the tables."""
    from pydantic import SecretStr

    return IcebergCatalogSpec(uri=SecretStr(f"sqlite:///{_catalog_db(output)}"))


def _catalog_db(output: OutputSpec) -> Path:
    """The default catalog's SQLite file (a local output's path, or its `file://` URL)."""
    return Path(output.layout.iceberg_catalog_db().removeprefix("file://"))


def iceberg_io_properties(output: OutputSpec) -> dict[str, str]:
    """pyiceberg FileIO properties for the output, mapped from the same settings its fsspec filesystem uses."""
    if not output.url.startswith(("s3://", "s3a://")):
        return {}
    fs = output.fsspec_options()
    client = fs.get("client_kwargs", {})
    properties = {}
    endpoint = fs.get("endpoint_url") or client.get("endpoint_url")
    if endpoint:
        properties["s3.endpoint"] = str(endpoint)
    properties["s3.region"] = str(client.get("region_name") or fs.get("region") or "us-east-1")
    for ours, theirs in (
        ("key", "s3.access-key-id"),
        ("secret", "s3.secret-access-key"),
        ("token", "s3.session-token"),
    ):
        if fs.get(ours):
            properties[theirs] = str(fs[ours])
    if fs.get("profile"):
        properties["s3.profile-name"] = str(fs["profile"])
    if fs.get("anon"):
        properties["s3.anonymous"] = "true"
    return properties


def iceberg_location(output: OutputSpec) -> str:
    """The table's location as a URI (a local path as `file://`, which every Iceberg reader takes)."""
    location = output.layout.iceberg_table()
    return location if "://" in location else Path(location).as_uri()


def iceberg_identifier(spec: JobSpec) -> tuple[str, str]:
    """(namespace, table): `docroute.<job name>` unless the catalog settings name them."""
    catalog = spec.output.table.catalog or default_catalog(spec.output)
    return catalog.namespace, catalog.table or spec.name.replace("-", "_")


def load_iceberg_catalog(output: OutputSpec) -> Catalog:
    """The output's Iceberg catalog, with the output's storage settings as its FileIO properties."""
    from pyiceberg.catalog import load_catalog

    catalog = output.table.catalog
    if catalog is None:
        catalog = default_catalog(output)
        _catalog_db(output).parent.mkdir(parents=True, exist_ok=True)
    properties = {**iceberg_io_properties(output), **catalog.pyiceberg_properties()}
    if catalog.type == "sql" and "warehouse" not in properties:
        properties["warehouse"] = iceberg_location(output).rsplit("/", 2)[0]
    return load_catalog(catalog.name, **properties)


def load_iceberg_table(spec: JobSpec, catalog: Catalog) -> Table | None:
    """The job's Iceberg table, or None when the catalog has none or its metadata file is gone."""
    from pyiceberg.exceptions import NoSuchTableError

    try:
        return catalog.load_table(iceberg_identifier(spec))
    except (NoSuchTableError, FileNotFoundError):
        return None


def read_iceberg_table(spec: JobSpec) -> tuple[pa.Table, int | None] | None:
    """The table's rows as Arrow and the committed run it holds; None when there is no table."""
    catalog = load_iceberg_catalog(spec.output)
    try:
        table = load_iceberg_table(spec, catalog)
        return None if table is None else (table.scan().to_arrow(), synced_version(table))
    finally:
        catalog.close()


def synced_version(table: Table) -> int | None:
    """The committed run the table holds (see the module docstring); None when no snapshot says, or one not ours
    changed its data since."""
    found = _synced_snapshot(table)
    return None if found is None else int(found[1][VERSION_PROPERTY])


def _synced_snapshot(table: Table) -> tuple[int, dict[str, str]] | None:
    """The snapshot that records the run the table holds (newest ancestor with `docroute_version`, past `replace`
    snapshots) and its `docroute_*` run properties; None when a writer not ours changed the data since."""
    from pyiceberg.table.snapshots import Operation, ancestors_of

    for snapshot in ancestors_of(table.current_snapshot(), table.metadata):
        summary = snapshot.summary
        if summary is not None and summary.get(VERSION_PROPERTY) is not None:
            return snapshot.snapshot_id, {k: str(summary[k]) for k in _RUN_PROPERTIES if summary.get(k) is not None}
        if summary is None or summary.operation != Operation.REPLACE:
            return None
    return None


def _bins(tasks: list[Any], target_bytes: int) -> list[list[Any]]:
    """Whole small files grouped, in order, into groups of at most about `target_bytes` on storage (each group
    becomes one new file; a group holds at least one file)."""
    groups: list[list[Any]] = []
    size = 0
    for task in tasks:
        file_size = int(task.file.file_size_in_bytes)
        if not groups or size + file_size > target_bytes:
            groups.append([])
            size = 0
        groups[-1].append(task)
        size += file_size
    return groups


class IcebergCurrentTable:
    """The Iceberg current table of one job (tasks/store/table.py `CurrentTableFormat`)."""

    def __init__(self, spec: JobSpec) -> None:
        self._spec = spec
        self._identifier = iceberg_identifier(spec)
        self.uri = f"{'.'.join(self._identifier)} ({iceberg_location(spec.output)})"
        try:
            self._catalog = load_iceberg_catalog(spec.output)
            self._table = load_iceberg_table(spec, self._catalog)
        except Exception as exc:  # a catalog that cannot be reached or is misconfigured
            message = str(exc).splitlines()[0][:500] if str(exc) else type(exc).__name__
            raise StorageError(
                f"the Iceberg catalog of {self.uri} cannot be opened ({type(exc).__name__}: {message})"
            ) from exc

    def synced_version(self) -> int | None:
        return synced_version(self._table) if self._table is not None else None

    def deleted_doc_ids(self) -> pa.Array:
        from pyiceberg.expressions import NotNull

        assert self._table is not None
        if "deleted_at" not in self._table.schema().column_names:
            return pa.array([], pa.string())
        found = self._table.scan(row_filter=NotNull("deleted_at"), selected_fields=("doc_id",)).to_arrow()
        return found["doc_id"].combine_chunks().cast(pa.string())

    def rewrite(self, source: pa.RecordBatchReader, commit: Commit) -> None:
        from pyiceberg.exceptions import NoSuchTableError, ValidationError

        source = kept_rows(self._spec.output, source)

        try:
            if self._table is not None:
                tx = self._table.transaction()
                try:
                    with tx.update_schema() as update:  # staged in the transaction, committed with the rows
                        update.union_by_name(source.schema)
                except ValidationError:  # a column whose type changed: only a new table takes it
                    pass
                else:
                    tx.overwrite(source, snapshot_properties=_properties(commit))
                    tx.commit_transaction()
                    return
            if self._table is not None or self._catalog.table_exists(self._identifier):
                self._catalog.drop_table(self._identifier)  # not the files: older snapshots' readers keep them
        except (NoSuchTableError, FileNotFoundError):  # in the catalog, its metadata file gone
            self._catalog.drop_table(self._identifier)
        self._catalog.create_namespace_if_not_exists(self._identifier[0])
        created = self._catalog.create_table_transaction(
            self._identifier,
            schema=source.schema,  # table_schema(): the job's columns, the retired ones, deleted_at
            location=iceberg_location(self._spec.output),
            properties={
                "format-version": "2",
                "write.target-file-size-bytes": str(_TARGET_FILE_BYTES),
                "write.parquet.row-group-limit": str(ROW_GROUP_ROWS),  # pyiceberg's default is 1,048,576 rows
            },
        )
        with created as tx:
            tx.append(source, snapshot_properties=_properties(commit))

    def merge(self, source: pa.RecordBatchReader, changed: pa.Array, commit: Commit) -> None:
        from pyiceberg.expressions import In

        assert self._table is not None
        properties = _properties(commit)
        with self._table.transaction() as tx:
            with tx.update_schema() as update:
                update.union_by_name(source.schema)  # a field added to the job becomes a new nullable column
            ids = changed.cast(pa.string()).to_pylist()
            if ids:
                with warnings.catch_warnings():  # "did not match any records": only new documents changed
                    warnings.simplefilter("ignore", UserWarning)
                    tx.delete(In("doc_id", ids), snapshot_properties=properties)
            # an empty append still records the run; a dropping table appends only the rows of listed files
            tx.append(kept_rows(self._spec.output, source), snapshot_properties=properties)

    def close(self) -> None:
        """Release the catalog's connections (a SQLite catalog holds a file handle)."""
        self._catalog.close()

    def data_files(self) -> int:
        """The data files a reader of the current snapshot opens (what compaction cuts)."""
        return 0 if self._table is None else sum(1 for _ in self._table.scan().plan_files())

    def compact(self, target_bytes: int, small_fraction: float) -> tuple[int, int]:
        """Rewrite the current snapshot's data files smaller than `small_fraction * target_bytes` into files of
        about `target_bytes`, in one `overwrite` snapshot carrying the synced run's properties forward (module
        docstring); nothing when that would not cut the file count. Returns the data files before and after.

        Call right after a sync: a table that records no run of ours is left alone (the next sync rewrites it).
        Raises StateError, before the catalog commit, if the rows written differ in number from the rows read.
        """
        from pyiceberg.expressions import AlwaysTrue
        from pyiceberg.io.pyarrow import ArrowScan, pyarrow_to_schema, write_file
        from pyiceberg.table import WriteTask

        table = self._table
        if table is None or table.current_snapshot() is None:
            return 0, 0
        tasks = list(table.scan().plan_files())
        synced = _synced_snapshot(table)
        # a file with delete files would need them applied and dropped too: docroute's merges never write any
        small = [t for t in tasks if not t.delete_files and t.file.file_size_in_bytes < small_fraction * target_bytes]
        groups = _bins(small, target_bytes)
        if synced is None or len(groups) >= len(small):
            return len(tasks), len(tasks)
        metadata, schema = table.metadata, table.metadata.schema()
        properties = {**synced[1], OPERATION_PROPERTY: "compact"}
        with table.transaction() as tx, tx.update_snapshot(snapshot_properties=properties).overwrite() as rewrite:
            for number, group in enumerate(groups):
                # one new file's rows in memory at a time (pyiceberg's own streaming write maps every bin at once)
                batches = list(ArrowScan(metadata, table.io, schema, AlwaysTrue()).to_record_batches(group))
                rows = sum(batch.num_rows for batch in batches)
                expected = sum(int(task.file.record_count) for task in group)
                if rows != expected:
                    raise StateError(f"compacting {self.uri} read {rows} rows from files holding {expected}")
                if rows:
                    written = WriteTask(
                        write_uuid=rewrite.commit_uuid,
                        task_id=number,
                        schema=pyarrow_to_schema(
                            batches[0].schema,
                            name_mapping=schema.name_mapping,
                            format_version=metadata.format_version,
                        ),
                        record_batches=batches,
                    )
                    for data_file in write_file(table.io, metadata, iter([written])):
                        rewrite.append_data_file(data_file)
                for task in group:
                    rewrite.delete_data_file(task.file)
        return len(tasks), self.data_files()

    def expire_snapshots(self, cutoff: datetime) -> int:
        """Expire the snapshots that stopped being current before `cutoff` (their first child was committed
        then; one never current, at its own commit), never the current one, a branch or tag head, or the one
        recording the synced run. Returns how many were expired.

        By when a snapshot stopped being current, not when it was made: a reader that planned a scan on it
        within the retention period can still read its files (as Delta's vacuum counts from a file's removal).
        """
        table = self._table
        if table is None:
            return 0
        metadata = table.metadata
        cutoff_ms = int(cutoff.timestamp() * 1000)
        ended: dict[int, int] = {}
        for snapshot in metadata.snapshots:
            parent = snapshot.parent_snapshot_id
            if parent is not None:
                ended[parent] = min(ended.get(parent, snapshot.timestamp_ms), snapshot.timestamp_ms)
        kept = {ref.snapshot_id for ref in metadata.refs.values()}
        synced = _synced_snapshot(table)
        if synced is not None:
            kept.add(synced[0])
        expired = [
            s.snapshot_id
            for s in metadata.snapshots
            if s.snapshot_id not in kept and ended.get(s.snapshot_id, s.timestamp_ms) <= cutoff_ms
        ]
        if expired:
            table.maintenance.expire_snapshots().by_ids(expired).commit()
        return len(expired)

    def files_in_use(self, cutoff: datetime) -> tuple[str, set[str]]:
        """The table's location and every file a reader may still open: the current metadata file, those
        superseded after `cutoff`, and each remaining snapshot's manifest list, manifests and live data files."""
        table = self._table
        if table is None:
            return iceberg_location(self._spec.output), set()
        metadata, io = table.metadata, table.io
        used = {table.metadata_location}
        cutoff_ms = int(cutoff.timestamp() * 1000)
        log = sorted(metadata.metadata_log, key=lambda entry: entry.timestamp_ms)
        ends = [entry.timestamp_ms for entry in log[1:]] + [metadata.last_updated_ms]
        used |= {entry.metadata_file for entry, end in zip(log, ends, strict=True) if end > cutoff_ms}
        manifests: set[str] = set()
        for snapshot in metadata.snapshots:
            used.add(snapshot.manifest_list)
            for manifest in snapshot.manifests(io):
                if manifest.manifest_path in manifests:
                    continue
                manifests.add(manifest.manifest_path)
                used |= {e.data_file.file_path for e in manifest.fetch_manifest_entry(io, discard_deleted=True)}
        return metadata.location, used | manifests

    def error(self, exc: Exception) -> InputError | StorageError:
        from pyiceberg.exceptions import ValidationError

        message = str(exc).splitlines()[0][:500] if str(exc) else type(exc).__name__
        if isinstance(exc, ValidationError | ValueError | pa.ArrowInvalid | pa.ArrowNotImplementedError):
            return InputError(
                f"the current table {self.uri} cannot take this job's columns ({message}): a field changed its "
                "type; run with --full-refresh to rewrite it, or set output.table.enabled: false"
            )
        return StorageError(f"the current table {self.uri} could not be updated ({type(exc).__name__}: {message})")


def _properties(commit: Commit) -> dict[str, Any]:
    return {
        VERSION_PROPERTY: str(commit.version),
        "docroute_run_id": commit.run_id,
        "docroute_manifest": commit.manifest,
    }
