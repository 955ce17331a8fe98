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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from docroute.schemas.errors import InputError, StorageError
from docroute.schemas.spec import IcebergCatalogSpec, JobSpec, OutputSpec
from docroute.tasks.store.table import Commit

if TYPE_CHECKING:
    from pyiceberg.catalog import Catalog
    from pyiceberg.table import Table

VERSION_PROPERTY = "docroute_version"
"""The snapshot summary property naming the committed run (its manifest's commit time, µs) the table holds."""

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
    from pyiceberg.table.snapshots import Operation, ancestors_of

    for snapshot in ancestors_of(table.current_snapshot(), table.metadata):
        summary = snapshot.summary
        version = summary.get(VERSION_PROPERTY) if summary is not None else None
        if version is not None:
            return int(version)
        if summary is None or summary.operation != Operation.REPLACE:
            return None
    return None


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
            properties={"format-version": "2", "write.target-file-size-bytes": str(_TARGET_FILE_BYTES)},
        )
        with created as tx:
            tx.append(source, snapshot_properties=_properties(commit))

    def merge(self, source: pa.RecordBatchReader, changed: pa.Table, commit: Commit) -> None:
        from pyiceberg.expressions import In

        assert self._table is not None
        properties = _properties(commit)
        with self._table.transaction() as tx:
            with tx.update_schema() as update:
                update.union_by_name(source.schema)  # a field added to the job becomes a new nullable column
            ids = changed["doc_id"].combine_chunks().cast(pa.string()).to_pylist()
            if ids:
                with warnings.catch_warnings():  # "did not match any records": only new documents changed
                    warnings.simplefilter("ignore", UserWarning)
                    tx.delete(In("doc_id", ids), snapshot_properties=properties)
            tx.append(source, snapshot_properties=properties)  # an empty one still records the run

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
