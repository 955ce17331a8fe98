"""The current table (tasks/store/table.py): after every run, the Delta table at `<output>/tables/documents` holds
exactly what `current_rows()` returns, read back with deltalake and with polars, on a local folder and on S3 (moto);
it keeps its history for time travel, and a table that fell behind or was deleted is brought back by the next run.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from corpus import COOKING, SPORTS, WEATHER, topic_job_yaml
from oracle_server import OracleServer
from s3_server import make_bucket, s3_access_yaml

from docroute.flows.process import process_documents
from docroute.schemas.errors import InputError
from docroute.schemas.load import load_job
from docroute.schemas.spec import OutputSpec
from docroute.tasks.store.current import current_rows
from docroute.tasks.store.table import APP_ID, delta_storage_options, table_schema

TEXTS = [SPORTS, WEATHER, COOKING]


def _comparable(frame: pl.DataFrame, columns: list[str]) -> pl.DataFrame:
    """Values as a reader compares them: categories as their strings (Delta stores them as plain strings)."""
    frame = frame.select(columns).sort("doc_id")
    return frame.with_columns(pl.col(pl.Categorical, pl.Enum).cast(pl.String))


def read_table(output: OutputSpec, version: int | None = None) -> pl.DataFrame:
    from deltalake import DeltaTable

    table = DeltaTable(output.layout.current_table(), version=version, storage_options=delta_storage_options(output))
    frame = pl.from_arrow(table.to_pyarrow_table())
    assert isinstance(frame, pl.DataFrame)
    return frame


def assert_table_is_current(job: Path) -> None:
    """The table equals `current_rows(include_deleted=True)`: same doc_ids, same values, declared types, read by
    deltalake and by polars; and it records the newest manifest's run."""
    from deltalake import DeltaTable

    spec = load_job(job)
    output = spec.output
    uri, options = output.layout.current_table(), delta_storage_options(output)
    expected = current_rows(output, include_deleted=True)
    table = DeltaTable(uri, storage_options=options)
    arrow = table.to_pyarrow_table()
    declared = table_schema(spec)
    assert [(f.name, f.type) for f in arrow.schema] == [(f.name, f.type) for f in declared]
    by_polars = pl.read_delta(uri, storage_options=options)
    assert by_polars.schema["processed_at"] == pl.Datetime("us", "UTC") and by_polars.schema["label"] == pl.String
    by_deltalake = pl.from_arrow(arrow)
    assert isinstance(by_deltalake, pl.DataFrame)
    for frame in (by_deltalake, by_polars):
        assert frame.height == expected.height and frame["doc_id"].n_unique() == frame.height
        assert _comparable(frame, expected.columns).equals(_comparable(expected, expected.columns))
    live = by_polars.filter(pl.col("deleted_at").is_null())
    assert sorted(live["doc_id"].to_list()) == sorted(current_rows(output)["doc_id"].to_list())
    assert table.transaction_version(APP_ID) is not None


def _local_job(tmp_path: Path, *, extra: str = "", table: str = "") -> tuple[Path, Path]:
    docs = tmp_path / "docs"
    docs.mkdir(exist_ok=True)
    out = tmp_path / "out"
    text = topic_job_yaml(docs, out, shard_size=2, extra=extra)
    if table:
        text = text.replace(f"  url: {out}\n", f"  url: {out}\n  table: {table}\n")
    job = tmp_path / "job.yaml"
    job.write_text(text, encoding="utf-8")
    return job, docs


def _put(docs: Path, index: int, note: str = "") -> None:
    (docs / f"doc-{index:03d}.txt").write_text(f"{TEXTS[index % 3]} (item {index}){note}\n", encoding="utf-8")


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
def test_after_every_kind_of_run_the_local_table_equals_the_current_rows(tmp_path: Path) -> None:
    oracle = [(text, {"label": label}) for text, label in zip(TEXTS, ("sports", "weather", "cooking"), strict=True)]
    with OracleServer(oracle, faults=["500"] * 4) as server:  # down for the first run's 4 calls, then back
        job, docs = _local_job(tmp_path, extra=_frontier(server.base_url))
        output = load_job(job).output
        for i in range(4):
            _put(docs, i)
        first = process_documents(str(job))  # new files, all deferred (the frontier is down)
        assert first.deferred == 4
        assert_table_is_current(job)
        retried = process_documents(str(job))  # the deferred rows retried: answered by the frontier now
        assert retried.retried == 4 and retried.frontier == 4
        assert_table_is_current(job)
        before_change = read_table(output)
        for i in (4, 5):
            _put(docs, i)
        time.sleep(0.01)
        _put(docs, 0, " rewritten")  # a changed file
        changed = process_documents(str(job))
        assert changed.documents == 3
        assert_table_is_current(job)
        (docs / "doc-001.txt").unlink()  # a deleted file: kept, marked deleted_at
        process_documents(str(job))
        assert_table_is_current(job)
        table = read_table(output)
        gone = table.filter(pl.col("source_uri").str.ends_with("doc-001.txt"))
        assert gone.height == 1 and gone["deleted_at"].item() is not None
        assert table.filter(pl.col("deleted_at").is_null()).height == 5
        _put(docs, 1)  # it comes back
        process_documents(str(job))
        assert_table_is_current(job)
        assert read_table(output)["deleted_at"].null_count() == 6

    # time travel: the version before the change run holds doc-000's previous answer
    from deltalake import DeltaTable

    uri = output.layout.current_table()
    versions = DeltaTable(uri).history()
    change_version = next(v["version"] for v in versions if v.get("docroute_run_id") == changed.run_id)
    previous = read_table(output, version=change_version - 1)
    doc0 = pl.col("source_uri").str.ends_with("doc-000.txt")
    old_row, new_row = previous.filter(doc0), read_table(output).filter(doc0)
    assert old_row["content_sha256"].item() == before_change.filter(doc0)["content_sha256"].item()
    assert old_row["content_sha256"].item() != new_row["content_sha256"].item()
    assert old_row["run_id"].item() == retried.run_id and new_row["run_id"].item() == changed.run_id


@pytest.mark.usefixtures("prefect_server")
def test_a_deleted_or_lagging_table_is_brought_back_by_the_next_run(tmp_path: Path) -> None:
    job, docs = _local_job(tmp_path)
    output = load_job(job).output
    for i in range(4):
        _put(docs, i)
    process_documents(str(job))
    assert_table_is_current(job)

    shutil.rmtree(output.layout.current_table())  # deleted: rebuilt from the committed state
    _put(docs, 4)
    process_documents(str(job))
    assert_table_is_current(job)

    log = Path(output.layout.current_table()) / "_delta_log"  # one run behind: its last commit never happened
    _put(docs, 5)
    process_documents(str(job))
    newest = sorted(log.glob("*.json"))[-1]
    newest.unlink()
    assert read_table(output).height == 5
    process_documents(str(job))  # nothing new in the source: the table catches up at the start of the run
    assert_table_is_current(job)

    disabled, _ = _local_job(tmp_path, table="{enabled: false}")  # runs that keep no table...
    _put(docs, 6)
    _put(docs, 0, " rewritten")
    process_documents(str(disabled))
    assert read_table(output).height == 6
    enabled, _ = _local_job(tmp_path)  # ...then one that does: every run it missed is applied
    process_documents(str(enabled))
    assert_table_is_current(enabled)


@pytest.mark.usefixtures("prefect_server")
def test_after_every_run_the_s3_table_equals_the_current_rows(tmp_path: Path, s3_endpoint: str) -> None:
    fs = make_bucket(s3_endpoint, "current-table")
    access = s3_access_yaml(s3_endpoint)
    text = topic_job_yaml(Path("/in"), Path("/out"), shard_size=2)
    text = text.replace("  url: /in\n", f"  url: s3://current-table/in\n{access}")
    text = text.replace("  url: /out\n", f"  url: s3://current-table/out\n{access}")
    job = tmp_path / "job.yaml"
    job.write_text(text, encoding="utf-8")

    def put(index: int, note: str = "") -> None:
        fs.pipe(f"current-table/in/doc-{index:03d}.txt", f"{TEXTS[index % 3]} (item {index}){note}\n".encode())

    for i in range(4):
        put(i)
    process_documents(str(job))
    assert_table_is_current(job)
    put(4)
    put(0, " rewritten")
    assert process_documents(str(job)).documents == 2
    assert_table_is_current(job)
    fs.rm("current-table/in/doc-002.txt")
    process_documents(str(job))
    assert_table_is_current(job)
    fs.rm("current-table/out/tables/documents", recursive=True)
    process_documents(str(job))
    assert_table_is_current(job)
    fs.invalidate_cache()
    assert fs.exists("current-table/out/tables/documents/_delta_log/00000000000000000000.json")


def test_s3_settings_reach_delta_rs_and_stores_it_cannot_write_keep_no_table() -> None:
    spec: dict[str, Any] = {
        "url": "s3://bucket/out",
        "s3": {"endpoint_url": "http://127.0.0.1:9000", "region": "eu-west-1", "key": "AK", "secret": "SK"},
    }
    options = delta_storage_options(OutputSpec.model_validate(spec))
    assert options == {
        "aws_conditional_put": "etag",
        "aws_endpoint_url": "http://127.0.0.1:9000",
        "aws_allow_http": "true",
        "aws_region": "eu-west-1",
        "aws_access_key_id": "AK",
        "aws_secret_access_key": "SK",
    }
    assert "AWS_S3_ALLOW_UNSAFE_RENAME" not in {k.upper() for k in options}
    assert OutputSpec.model_validate({"url": "s3://bucket/out"}).table.enabled
    assert not OutputSpec.model_validate({"url": "memory://out"}).table.enabled  # the default: off where it cannot
    with pytest.raises(ValueError, match=r"output\.table needs a store delta-rs writes"):
        OutputSpec.model_validate({"url": "memory://out", "table": {"enabled": True}})


def test_a_type_the_job_changed_is_an_input_error_naming_the_table(tmp_path: Path) -> None:
    from deltalake.exceptions import SchemaMismatchError

    from docroute.tasks.store.table import _docroute_error

    error = _docroute_error("/out/tables/documents", SchemaMismatchError("Cannot cast amount from Decimal to Utf8"))
    assert isinstance(error, InputError) and "delete the table" in str(error) and "/out/tables/documents" in str(error)


def _table_rows(job: Path) -> pl.DataFrame:
    """The current table's rows, read by its own library (deltalake, or pyiceberg through the job's catalog)."""
    spec = load_job(job)
    if spec.output.table.format == "iceberg":
        from docroute.tasks.store.iceberg_table import read_iceberg_table

        found = read_iceberg_table(spec)
        assert found is not None
        frame = pl.from_arrow(found[0])
        assert isinstance(frame, pl.DataFrame)
        return frame
    return read_table(spec.output)


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.parametrize("table_format", ["delta", "iceberg"])
def test_a_table_that_drops_deleted_documents_removes_their_rows_and_takes_them_back(
    tmp_path: Path, table_format: str
) -> None:
    job, docs = _local_job(tmp_path, table=f"{{format: {table_format}, deleted: drop}}")
    job.write_text(
        job.read_text().replace(
            "  classify_strategy: label_scoring\n", "  encoder: wordllama\n  classify_strategy: similarity\n"
        )
    )
    output = load_job(job).output

    def assert_table_holds_the_listed_documents(count: int) -> None:
        expected = current_rows(output)  # without the deleted documents
        table = _table_rows(job)
        assert table.height == expected.height == count and table["deleted_at"].null_count() == count
        assert _comparable(table, expected.columns).equals(_comparable(expected, expected.columns))

    for i in range(4):
        _put(docs, i)
    process_documents(str(job))
    assert_table_holds_the_listed_documents(4)
    kept_aside = tmp_path / "doc-001.txt"
    shutil.move(docs / "doc-001.txt", kept_aside)  # its row leaves the table; the history and the state keep it
    process_documents(str(job))
    assert_table_holds_the_listed_documents(3)
    assert current_rows(output, include_deleted=True).height == 4
    process_documents(str(job))  # nothing changed: nothing comes back, nothing else goes
    assert_table_holds_the_listed_documents(3)
    shutil.move(kept_aside, docs / "doc-001.txt")  # back, unchanged: its row returns without being answered again
    assert process_documents(str(job)).documents == 0
    assert_table_holds_the_listed_documents(4)
