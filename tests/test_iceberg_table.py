"""The current table as Apache Iceberg (tasks/store/iceberg_table.py): after every run, the table the catalog names
holds exactly what `current_rows(include_deleted=True)` returns, with the declared types as pyiceberg and DuckDB
read them, on a local folder (the default SQLite catalog) and on S3 (moto; a SQL catalog on a local SQLite file, or
a Glue catalog on moto's Glue); a table one run behind (its catalog commit never happened, or a process killed
there) or missing is brought back by the next run. The jobs classify by similarity over WordLlama vectors: no
language model is loaded.
"""

from __future__ import annotations

import shutil
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pytest
from corpus import COOKING, SPORTS, WEATHER, topic_job_yaml
from oracle_server import OracleServer
from pydantic import ValidationError
from s3_server import KEY, SECRET, make_bucket, s3_access_yaml

from docroute.flows.compact import compact_output
from docroute.flows.process import process_documents
from docroute.schemas.load import load_job
from docroute.schemas.spec import JobSpec, OutputSpec
from docroute.tasks.account.views import open_views, overview
from docroute.tasks.store.compact import TableAction
from docroute.tasks.store.current import current_rows
from docroute.tasks.store.iceberg_table import (
    OPERATION_PROPERTY,
    VERSION_PROPERTY,
    IcebergCurrentTable,
    iceberg_identifier,
    iceberg_io_properties,
    load_iceberg_catalog,
    synced_version,
)
from docroute.tasks.store.table import committed_runs, newest_with_state, table_schema

TEXTS = [SPORTS, WEATHER, COOKING]
SIMILARITY = "  classify_strategy: similarity\n  encoder: wordllama\n"
ICEBERG = "{format: iceberg}"


def _job_text(docs: str, out: str, *, table: str = ICEBERG, extra: str = "", access: str = "") -> str:
    text = topic_job_yaml(Path("/in"), Path("/out"), shard_size=2, extra=extra)
    text = text.replace("  classify_strategy: label_scoring\n", SIMILARITY)
    text = text.replace("  url: /in\n", f"  url: {docs}\n{access}")
    return text.replace("  url: /out\n", f"  url: {out}\n{access}  table: {table}\n")


def _local_job(tmp_path: Path, *, table: str = ICEBERG, extra: str = "") -> tuple[Path, Path]:
    docs = tmp_path / "docs"
    docs.mkdir(exist_ok=True)
    job = tmp_path / "job.yaml"
    job.write_text(_job_text(str(docs), str(tmp_path / "out"), table=table, extra=extra), encoding="utf-8")
    return job, docs


def _put(docs: Path, index: int, note: str = "") -> None:
    (docs / f"doc-{index:03d}.txt").write_text(f"{TEXTS[index % 3]} (item {index}){note}\n", encoding="utf-8")


def _plain(data_type: pa.DataType) -> pa.DataType:
    """A type as a reader compares it: Arrow's large and small strings alike, a list's item field unnamed."""
    if pa.types.is_large_string(data_type):
        return pa.string()
    if pa.types.is_list(data_type) or pa.types.is_large_list(data_type):
        return pa.list_(_plain(data_type.value_type))
    return data_type


def _comparable(frame: pl.DataFrame, columns: list[str]) -> pl.DataFrame:
    """Values as a reader compares them: categories as their strings, UTC by one name (DuckDB says Etc/UTC)."""
    frame = frame.select(columns).sort("doc_id")
    strings = pl.col(pl.Categorical, pl.Enum).cast(pl.String)
    return frame.with_columns(strings, pl.col(pl.Datetime).dt.convert_time_zone("UTC"))


def _load(spec: JobSpec) -> Any:
    catalog = load_iceberg_catalog(spec.output)
    return catalog, catalog.load_table(iceberg_identifier(spec))


def assert_iceberg_is_current(job: Path) -> None:
    """The Iceberg table equals `current_rows(include_deleted=True)`: same doc_ids, same values, declared types, read
    by pyiceberg and by DuckDB (pyiceberg's scan handed over as Arrow); it records the newest manifest's run, and
    `docroute sql`'s `documents` view reads it."""
    spec = load_job(job)
    output = spec.output
    expected = current_rows(output, include_deleted=True)
    catalog, table = _load(spec)
    try:
        arrow = table.scan().to_arrow()
        declared = table_schema(spec)
        assert [f.name for f in arrow.schema] == declared.names
        assert [_plain(f.type) for f in arrow.schema] == [f.type for f in declared]
        assert arrow.schema.field("processed_at").type == pa.timestamp("us", tz="UTC")
        con = table.scan().to_duckdb("documents_table")
        types = dict(con.execute("SELECT column_name, column_type FROM (DESCRIBE documents_table)").fetchall())
        assert types["processed_at"] == types["deleted_at"] == "TIMESTAMP WITH TIME ZONE"
        assert types["doc_id"] == types["label"] == "VARCHAR"
        by_duckdb = con.sql("SELECT * FROM documents_table").pl()
        newest = newest_with_state(output, committed_runs(output))
        assert newest is not None and synced_version(table) == newest[0].version
    finally:
        catalog.close()
    by_pyiceberg = pl.from_arrow(arrow)
    assert isinstance(by_pyiceberg, pl.DataFrame)
    for frame in (by_pyiceberg, by_duckdb):
        assert frame.height == expected.height and frame["doc_id"].n_unique() == frame.height
        got, want = _comparable(frame, expected.columns), _comparable(expected, expected.columns)
        differs = {c: (got[c].dtype, want[c].dtype) for c in want.columns if not got[c].equals(want[c])}
        assert not differs, differs
    live = sorted(current_rows(output)["doc_id"].to_list())
    assert sorted(by_pyiceberg.filter(pl.col("deleted_at").is_null())["doc_id"].to_list()) == live
    with open_views(spec) as views:  # docroute sql / show: the documents view, read from this table
        assert sorted(r[0] for r in views.execute("SELECT doc_id FROM documents").fetchall()) == live
        assert overview(views).documents == len(live)


def _frontier(url: str) -> str:
    return f"""frontier:
  provider: openai_compatible
  model: oracle-1
  base_url: {url}
  api_key: sk-test
  price: {{input_per_million: 100.0, output_per_million: 400.0}}
  max_retries: 0
  timeout_s: 5
routing:
  threshold: 1.0
"""


@pytest.mark.usefixtures("prefect_server")
def test_after_every_kind_of_run_the_local_iceberg_table_equals_the_current_rows(tmp_path: Path) -> None:
    oracle = [(text, {"label": label}) for text, label in zip(TEXTS, ("sports", "weather", "cooking"), strict=True)]
    with OracleServer(oracle, faults=["500"] * 4) as server:  # down for the first run's 4 calls, then back
        job, docs = _local_job(tmp_path, extra=_frontier(server.base_url))
        spec = load_job(job)
        for i in range(4):
            _put(docs, i)
        first = process_documents(str(job))  # new files, all deferred (the frontier is down)
        assert first.deferred == 4
        assert_iceberg_is_current(job)
        assert (tmp_path / "out" / "tables" / "catalog.db").is_file()  # the default catalog: SQLite beside it
        retried = process_documents(str(job))  # the deferred rows retried: answered by the frontier now
        assert retried.retried == 4 and retried.frontier == 4
        assert_iceberg_is_current(job)
        for i in (4, 5):
            _put(docs, i)
        time.sleep(0.01)
        _put(docs, 0, " rewritten")  # a changed file
        changed = process_documents(str(job))
        assert changed.documents == 3
        assert_iceberg_is_current(job)
        (docs / "doc-001.txt").unlink()  # a deleted file: kept, marked deleted_at
        process_documents(str(job))
        assert_iceberg_is_current(job)
        _put(docs, 1)  # it comes back
        process_documents(str(job))
        assert_iceberg_is_current(job)

    # every commit names its run; the snapshot before the change run holds doc-000's previous answer
    catalog, table = _load(spec)
    try:
        snapshots = [s for s in table.snapshots() if s.summary and s.summary.get(VERSION_PROPERTY)]
        change = next(s for s in snapshots if s.summary.get("docroute_run_id") == changed.run_id)
        before = pl.from_arrow(table.scan(snapshot_id=change.parent_snapshot_id).to_arrow())
        after = pl.from_arrow(table.scan().to_arrow())
    finally:
        catalog.close()
    assert isinstance(before, pl.DataFrame) and isinstance(after, pl.DataFrame)
    doc0 = pl.col("source_uri").str.ends_with("doc-000.txt")
    assert before.filter(doc0)["run_id"].item() == retried.run_id
    assert after.filter(doc0)["run_id"].item() == changed.run_id


def _roll_back_catalog(db: Path) -> None:
    """Exactly what a run killed before its catalog commit leaves: the catalog still points at the previous
    metadata file (the new data and metadata files are written, but nothing names them)."""
    with sqlite3.connect(db) as con:
        con.execute("UPDATE iceberg_tables SET metadata_location = previous_metadata_location")


@pytest.mark.usefixtures("prefect_server")
def test_a_lagging_or_missing_iceberg_table_is_brought_back_by_the_next_run(tmp_path: Path) -> None:
    job, docs = _local_job(tmp_path)
    spec = load_job(job)
    db = tmp_path / "out" / "tables" / "catalog.db"
    for i in range(4):
        _put(docs, i)
    process_documents(str(job))
    _put(docs, 4)
    _put(docs, 0, " rewritten")
    process_documents(str(job))
    assert_iceberg_is_current(job)

    _roll_back_catalog(db)  # one run behind: its catalog commit never happened
    catalog, table = _load(spec)
    assert table.scan().to_arrow().num_rows == 4
    catalog.close()
    with open_views(spec) as views:  # the documents view does not show the lagging table
        assert views.execute("SELECT count(*) FROM documents").fetchone() == (5,)
    process_documents(str(job))  # nothing new in the source: the table catches up at the start of the run
    assert_iceberg_is_current(job)

    catalog, _ = _load(spec)  # dropped from the catalog: rebuilt from the committed state
    catalog.drop_table(iceberg_identifier(spec))
    catalog.close()
    _put(docs, 5)
    process_documents(str(job))
    assert_iceberg_is_current(job)

    shutil.rmtree(tmp_path / "out" / "tables" / "iceberg")  # its files deleted, the catalog still naming them
    process_documents(str(job))
    assert_iceberg_is_current(job)

    disabled, _ = _local_job(tmp_path, table="{enabled: false}")  # runs that keep no table...
    _put(docs, 6)
    (docs / "doc-002.txt").unlink()
    process_documents(str(disabled))
    enabled, _ = _local_job(tmp_path)  # ...then one that does: every run it missed is applied
    process_documents(str(enabled))
    assert_iceberg_is_current(enabled)


@pytest.mark.usefixtures("prefect_server")
def test_after_every_run_the_s3_iceberg_table_equals_the_current_rows(tmp_path: Path, s3_endpoint: str) -> None:
    fs = make_bucket(s3_endpoint, "iceberg-table")
    catalog = f"{{format: iceberg, catalog: {{type: sql, uri: 'sqlite:///{tmp_path}/catalog.db'}}}}"
    text = _job_text(
        "s3://iceberg-table/in", "s3://iceberg-table/out", table=catalog, access=s3_access_yaml(s3_endpoint)
    )
    job = tmp_path / "job.yaml"
    job.write_text(text, encoding="utf-8")

    def put(index: int, note: str = "") -> None:
        fs.pipe(f"iceberg-table/in/doc-{index:03d}.txt", f"{TEXTS[index % 3]} (item {index}){note}\n".encode())

    for i in range(4):
        put(i)
    process_documents(str(job))
    assert_iceberg_is_current(job)
    put(4)
    put(0, " rewritten")
    assert process_documents(str(job)).documents == 2
    assert_iceberg_is_current(job)
    fs.rm("iceberg-table/in/doc-002.txt")
    process_documents(str(job))
    assert_iceberg_is_current(job)
    fs.invalidate_cache()
    assert fs.find("iceberg-table/out/tables/iceberg/documents/metadata")  # the table's files are on S3
    _roll_back_catalog(tmp_path / "catalog.db")
    process_documents(str(job))
    assert_iceberg_is_current(job)


@pytest.mark.usefixtures("prefect_server")
def test_compaction_rewrites_the_small_iceberg_files_keeps_rows_and_run_and_respects_retention(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three runs leave several small data files (an appended one per merge, copy-on-write rewrites). `docroute
    compact` puts them into one file in a snapshot still recording the synced run, so the next run merges only its
    change; what is younger than the retention period stays, and with none, old snapshots and files go."""
    job, docs = _local_job(tmp_path)
    spec = load_job(job)
    for i in range(4):
        _put(docs, i)
    process_documents(str(job))
    _put(docs, 4)
    time.sleep(0.01)
    _put(docs, 0, " rewritten")
    process_documents(str(job))
    (docs / "doc-001.txt").unlink()
    process_documents(str(job))
    catalog, table = _load(spec)
    rows = pl.from_arrow(table.scan().to_arrow()).sort("doc_id")
    files, previous = len(list(table.scan().plan_files())), table.current_snapshot()
    catalog.close()
    assert files >= 3 and previous is not None

    kept = compact_output(str(job))  # the default retention, 7 days: nothing is old enough to go
    assert kept.table.action is TableAction.REWRITTEN
    assert (kept.table.files_before, kept.table.files_after) == (files, 1)
    assert kept.table.expired_snapshots == 0 and kept.table.vacuumed == 0
    assert_iceberg_is_current(job)  # the same rows, recording the compaction's commit
    catalog, table = _load(spec)
    try:
        assert pl.from_arrow(table.scan().to_arrow()).sort("doc_id").equals(rows)
        current = table.current_snapshot()
        assert current is not None and current.summary is not None
        assert current.summary.get(OPERATION_PROPERTY) == "compact"
        assert table.scan(snapshot_id=previous.snapshot_id).to_arrow().num_rows == rows.height  # time travel
    finally:
        catalog.close()

    def rewrite(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the whole table was rewritten")

    monkeypatch.setattr(IcebergCurrentTable, "rewrite", rewrite)  # the next run merges its change only
    _put(docs, 2, " edited")
    assert process_documents(str(job)).documents == 1
    assert_iceberg_is_current(job)
    monkeypatch.undo()

    now = compact_output(str(job), retention_hours=0)
    assert now.table.files_after == 1 and now.table.expired_snapshots > 0 and now.table.vacuumed > 0
    assert_iceberg_is_current(job)
    catalog, table = _load(spec)
    try:
        assert [s.snapshot_id for s in table.snapshots()] == [table.current_snapshot().snapshot_id]
        named = {Path(task.file.file_path.removeprefix("file://")) for task in table.scan().plan_files()}
    finally:
        catalog.close()
    folder = tmp_path / "out" / "tables" / "iceberg" / "documents"
    assert set((folder / "data").glob("*.parquet")) == named  # every other data file deleted
    # the current metadata file and the one the expiry superseded (current until after the cutoff)
    assert len(list((folder / "metadata").glob("*.metadata.json"))) == 2
    assert (tmp_path / "out" / "tables" / "catalog.db").is_file()


def test_catalog_settings_keep_their_secrets_and_object_stores_must_name_a_catalog() -> None:
    with pytest.raises(ValidationError, match=r"needs output\.table\.catalog.*SQLite"):
        OutputSpec.model_validate({"url": "s3://bucket/out", "table": {"format": "iceberg"}})
    with pytest.raises(ValidationError, match="format: iceberg only"):
        OutputSpec.model_validate({"url": "/out", "table": {"catalog": {"type": "glue"}}})
    with pytest.raises(ValidationError, match="rest catalog needs a uri"):
        OutputSpec.model_validate({"url": "/out", "table": {"format": "iceberg", "catalog": {"type": "rest"}}})
    rest = {"type": "rest", "uri": "https://catalog.example/api", "properties_env": {"credential": "ICEBERG_CRED"}}
    output = OutputSpec.model_validate(
        {
            "url": "s3://bucket/out",
            "s3": {"endpoint_url": "http://127.0.0.1:9000", "region": "eu-west-1", "key": "AK", "secret": "SK"},
            "table": {"format": "iceberg", "catalog": {**rest, "properties": {"token": "t0ken"}}},
        },
        context={"env": {"ICEBERG_CRED": "client:s3cret"}},
    )
    assert output.table.catalog is not None
    assert output.table.catalog.pyiceberg_properties() == {
        "type": "rest",
        "uri": "https://catalog.example/api",
        "token": "t0ken",
        "credential": "client:s3cret",
    }
    shown = repr(output) + str(output.model_dump(mode="json"))
    assert "s3cret" not in shown and "t0ken" not in shown
    assert iceberg_io_properties(output) == {
        "s3.endpoint": "http://127.0.0.1:9000",
        "s3.region": "eu-west-1",
        "s3.access-key-id": "AK",
        "s3.secret-access-key": "SK",
    }


@pytest.mark.slow
def test_a_run_killed_at_its_iceberg_catalog_commit_is_repaired_by_the_next(tmp_path: Path) -> None:
    """A real SIGKILL (tests/crash_child.py) as the merge commits to the catalog: its data and metadata files are
    written, the catalog never moved. The table is one run behind, never ahead, and the next run repairs it. (A
    kill between the manifest and the table leaves the table untouched: the state the lagging-table test builds.)"""
    from test_crash_recovery import _local_harness

    harness = _local_harness(tmp_path)
    text = harness.job.read_text(encoding="utf-8").replace("  classify_strategy: label_scoring\n", SIMILARITY)
    harness.job.write_text(text.replace("shard_size:", f"  table: {ICEBERG}\nshard_size:"), encoding="utf-8")
    spec = load_job(harness.job)
    harness.add_documents(4)
    assert harness.run() == 0, harness.log[-1]
    harness.add_documents(2)
    assert harness.run("pyiceberg.catalog.sql:SqlCatalog.commit_table") == -signal.SIGKILL, harness.log[-1]
    catalog, table = _load(spec)
    commits = committed_runs(spec.output)
    assert len(commits) == 2 and synced_version(table) == commits[0].version  # one run behind, never ahead
    catalog.close()
    assert harness.run() == 0, harness.log[-1]
    assert_iceberg_is_current(harness.job)


def test_a_retyped_column_recreates_the_table_on_rewrite_and_is_refused_by_a_merge(tmp_path: Path) -> None:
    """Below the sync, with hand-made rows: a merge adds a new column and replaces rows by doc_id; a rewrite whose
    column changed type makes a new table (a merge cannot retype: an InputError, naming the table)."""
    from docroute.schemas.errors import InputError
    from docroute.tasks.store.iceberg_table import IcebergCurrentTable
    from docroute.tasks.store.table import Commit

    job, _ = _local_job(tmp_path)
    spec = load_job(job)

    def rows(ids: list[str], amount: pa.DataType, *, extra: bool = False) -> pa.RecordBatchReader:
        columns: dict[str, pa.Array] = {
            "doc_id": pa.array(ids, pa.string()),
            "amount": pa.array([str(len(i)) for i in ids]).cast(amount),
        }
        if extra:
            columns["note"] = pa.array(["new"] * len(ids), pa.string())
        table = pa.table(columns).cast(pa.schema([pa.field(n, c.type, nullable=True) for n, c in columns.items()]))
        return pa.RecordBatchReader.from_batches(table.schema, table.to_batches())

    def current() -> Any:
        catalog, table = _load(spec)
        try:
            return table.scan().to_arrow().sort_by("doc_id"), synced_version(table)
        finally:
            catalog.close()

    IcebergCurrentTable(spec).rewrite(rows(["a", "bb"], pa.string()), Commit("r1", 1, "m1"))
    changed = pa.array(["bb", "ccc"])
    IcebergCurrentTable(spec).merge(rows(["bb", "ccc"], pa.string(), extra=True), changed, Commit("r2", 2, "m2"))
    table, version = current()
    assert version == 2 and table["doc_id"].to_pylist() == ["a", "bb", "ccc"]
    assert table["note"].to_pylist() == [None, "new", "new"]
    with pytest.raises(InputError, match=r"docroute\.topics"):
        try:
            IcebergCurrentTable(spec).merge(rows(["a"], pa.int64()), pa.array(["a"]), Commit("r3", 3, "m3"))
        except Exception as exc:
            raise IcebergCurrentTable(spec).error(exc) from exc
    IcebergCurrentTable(spec).rewrite(rows(["a", "dddd"], pa.int64()), Commit("r3", 3, "m3"))
    table, version = current()
    assert version == 3 and table["amount"].type == pa.int64() and table["amount"].to_pylist() == [1, 4]


GLUE_KEY, GLUE_SECRET = "AKIAGLUETESTKEY", "glue-secret-that-must-never-leak"
"""The Glue client's own credentials (moto accepts any): distinct from the S3 ones, so a leak of either shows."""


@pytest.mark.usefixtures("prefect_server")
def test_after_every_run_an_s3_iceberg_table_in_a_glue_catalog_equals_the_current_rows(
    tmp_path: Path, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """`catalog: {type: glue}` with pyiceberg's GlueCatalog talking to moto's Glue (the same server as its S3):
    the database and table are created in Glue, every later commit is Glue's update_table naming the table version
    it read. moto does not check that VersionId (its update_table ignores it), so Glue's compare-and-swap itself is
    not exercised here; what is: the catalog settings reach pyiceberg, the Glue table names the newest metadata
    file, and the table equals the current rows after each run. No credential lands in the bucket, Glue or a log."""
    import boto3

    fs = make_bucket(s3_endpoint, "iceberg-glue")
    monkeypatch.setenv("DOCROUTE_GLUE_SECRET", GLUE_SECRET)  # one property from the environment, the rest inline
    catalog = (
        "{format: iceberg, catalog: {type: glue, namespace: docroute_glue, table: documents, properties: "
        f"{{glue.endpoint: '{s3_endpoint}', glue.region: us-east-1, glue.access-key-id: {GLUE_KEY}}}, "
        "properties_env: {glue.secret-access-key: DOCROUTE_GLUE_SECRET}}}"
    )
    text = _job_text("s3://iceberg-glue/in", "s3://iceberg-glue/out", table=catalog, access=s3_access_yaml(s3_endpoint))
    job = tmp_path / "job.yaml"
    job.write_text(text, encoding="utf-8")
    spec = load_job(job)
    assert spec.output.table.catalog is not None and spec.output.table.catalog.type == "glue"
    glue = boto3.client(
        "glue",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id=GLUE_KEY,
        aws_secret_access_key=GLUE_SECRET,
    )

    def put(index: int, note: str = "") -> None:
        fs.pipe(f"iceberg-glue/in/doc-{index:03d}.txt", f"{TEXTS[index % 3]} (item {index}){note}\n".encode())

    def glue_table() -> dict[str, Any]:
        return glue.get_table(DatabaseName="docroute_glue", Name="documents")["Table"]

    for i in range(4):
        put(i)
    first = process_documents(str(job))  # new files: the Glue database and table are created
    assert first.documents == 4
    assert_iceberg_is_current(job)
    created = glue_table()
    assert created["Parameters"]["table_type"].lower() == "iceberg"
    assert created["Parameters"]["metadata_location"].startswith("s3://iceberg-glue/out/tables/iceberg/documents/")

    time.sleep(0.01)
    put(0, " rewritten")  # a changed file
    put(4)  # a new one
    fs.rm("iceberg-glue/in/doc-002.txt")  # a deleted one: kept, marked deleted_at
    second = process_documents(str(job))
    assert second.documents == 2
    assert_iceberg_is_current(job)
    updated = glue_table()
    assert int(updated["VersionId"]) > int(created["VersionId"])  # the merge was a Glue update_table
    assert updated["Parameters"]["previous_metadata_location"] == created["Parameters"]["metadata_location"]
    catalog_, table = _load(spec)
    try:
        assert table.metadata_location == updated["Parameters"]["metadata_location"]
        rows = pl.from_arrow(table.scan().to_arrow())
    finally:
        catalog_.close()
    assert isinstance(rows, pl.DataFrame) and rows.height == 5
    assert rows.filter(pl.col("source_uri").str.ends_with("doc-002.txt"))["deleted_at"].is_not_null().all()

    secrets = (GLUE_SECRET, GLUE_KEY, SECRET, KEY)
    fs.invalidate_cache()
    files = fs.find("iceberg-glue/out")
    assert any(path.endswith(".metadata.json") for path in files)
    for path in files:  # Parquet, Iceberg metadata and manifests, run manifests, state: no credential anywhere
        data = fs.cat_file(path)
        assert not [s for s in secrets if s.encode() in data], path
    versions = glue.get_table_versions(DatabaseName="docroute_glue", TableName="documents")["TableVersions"]
    assert not [s for s in secrets if s in repr(versions) + repr(glue.get_database(Name="docroute_glue"))]
    logged = capfd.readouterr()
    assert not [s for s in secrets if s in logged.out + logged.err]
    assert GLUE_SECRET not in repr(spec) and GLUE_SECRET not in str(spec.redacted())
