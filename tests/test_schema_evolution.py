"""Schema evolution (schemas/evolution.py, issue 17 item 4), through real runs of the public entry points.

A field added between runs is a new nullable column in the new parts and in the current table (null in rows written
before); a field removed keeps its column in the table (null in rows written from then on) while new parts lack it;
a changed type or label set is refused with exit code 2 naming the field, unless the run says --full-refresh. The
history of parts of different schema versions reads together with polars and with DuckDB's union_by_name, in the
declared types, as do `docroute sql`, `current_rows()` and the Delta table (deltalake, polars.read_delta).

The small model is an OpenAI-compatible server answering from a table (tests/oracle_server.py): real HTTP, real
engine, no model weights loaded.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pyarrow as pa
import pytest
from oracle_server import OracleServer
from s3_server import make_bucket, s3_access_yaml
from typer.testing import CliRunner

from docroute.flows.cli import app
from docroute.flows.process import process_documents
from docroute.schemas.errors import ExitCode, InputError
from docroute.schemas.evolution import (
    AnswerSchema,
    ChangeKind,
    SchemaChangeError,
    answer_schema,
    compare,
    evolve,
)
from docroute.schemas.load import load_job
from docroute.schemas.spec import JobSpec, OutputSpec
from docroute.tasks.account.views import committed_files, open_views, run_query
from docroute.tasks.store.current import current_rows
from docroute.tasks.store.schema_record import committed_answer_schema
from docroute.tasks.store.table import delta_storage_options, table_schema

runner = CliRunner()

A = "{name: a, type: str}"
B_INT = "{name: b, type: int, required: false}"
B_STR = "{name: b, type: str, required: false}"
C = "{name: c, type: decimal, precision: 12, scale: 2, required: false}"
LABELS = ("sports", "weather", "cooking")
ANSWER = {"label": "sports", "a": "alpha", "b": "7", "c": "12.50"}
"""What the small model answers for every document; keys the job does not declare are ignored."""


def job_text(
    source: str, output: str, base_url: str, fields: Sequence[str], *, labels: Sequence[str] = LABELS, s3: str = ""
) -> str:
    label_lines = "".join(f"      - {{name: {label}}}\n" for label in labels)
    field_lines = "".join(f"      - {field}\n" for field in fields)
    return f"""name: evolving
source:
  url: {source}
{s3}task:
  classify:
    labels:
{label_lines}  extract:
    fields:
{field_lines}small_model:
  engine: openai_compatible
  model: oracle-1
  base_url: {base_url}
  max_retries: 0
  timeout_s: 10
routing: {{threshold: 0.0}}
output:
  url: {output}
{s3}shard_size: 2
"""


class Job:
    """A job file rewritten between runs, as a person edits theirs."""

    def __init__(self, path: Path, source: str, output: str, base_url: str, s3: str = "") -> None:
        self.path, self.source, self.output, self.base_url, self.s3 = path, source, output, base_url, s3

    def declare(self, *fields: str, labels: Sequence[str] = LABELS) -> Path:
        self.path.write_text(
            job_text(self.source, self.output, self.base_url, fields, labels=labels, s3=self.s3), encoding="utf-8"
        )
        return self.path

    @property
    def spec(self) -> JobSpec:
        return load_job(self.path)


def read_table(output: OutputSpec) -> tuple[pa.Schema, pl.DataFrame]:
    """The Delta table's Arrow schema (deltalake) and its rows (polars.read_delta), sorted by source."""
    from deltalake import DeltaTable

    uri, options = output.layout.current_table(), delta_storage_options(output)
    schema = pa.schema(DeltaTable(uri, storage_options=options).schema().to_arrow())
    return schema, pl.read_delta(uri, storage_options=options).sort("source_uri")


def assert_table_is_current(spec: JobSpec) -> pl.DataFrame:
    """The table has the declared columns (the committed answer schema, retired columns included) in the declared
    types, read by deltalake and polars, and holds exactly `current_rows(include_deleted=True)`."""
    output = spec.output
    schema, table = read_table(output)
    declared = table_schema(spec, committed_answer_schema(output))
    assert {f.name: f.type for f in schema} == {f.name: f.type for f in declared}
    as_declared = pl.from_arrow(declared.empty_table())
    assert isinstance(as_declared, pl.DataFrame) and table.select(declared.names).schema == as_declared.schema
    expected = current_rows(output, include_deleted=True)
    assert table.height == expected.height and table["doc_id"].n_unique() == table.height
    shared = [c for c in expected.columns if c in table.columns]
    as_read = table.select(shared).sort("doc_id").with_columns(pl.col(pl.Categorical).cast(pl.String))
    assert as_read.equals(expected.select(shared).sort("doc_id").with_columns(pl.col(pl.Categorical).cast(pl.String)))
    return table


def by_file(table: pl.DataFrame, name: str) -> dict[str, Any]:
    rows = table.filter(pl.col("source_uri").str.ends_with(name)).to_dicts()
    assert len(rows) == 1
    return rows[0]


def newest_manifest(output: OutputSpec) -> dict[str, Any]:
    files = sorted(Path(output.layout.manifests_dir()).glob("*.json"))
    return json.loads(files[-1].read_text())


def assert_history_reads_together(parts: list[str], read: Callable[[str], bytes] | None = None) -> None:
    """Parts of three schema versions ({a, b}, {a, b, c}, {a, c}) read by name in their declared types: 4 rows of
    run 1 without c, 3 of run 2 with both, 3 of run 3 without b."""
    if read is None:
        frames = [pl.read_parquet(p) for p in parts]
        relation = duckdb.sql(
            "SELECT * FROM read_parquet([" + ", ".join(f"'{p}'" for p in parts) + "], union_by_name = true)"
        )
        types = dict(zip(relation.columns, [str(t) for t in relation.types], strict=True))
        assert types["a"] == "VARCHAR" and types["b"] == "BIGINT" and types["c"] == "DECIMAL(12,2)"
        assert relation.aggregate("count(*), count(b), count(c)").fetchall() == [(10, 7, 6)]
    else:
        import io

        frames = [pl.read_parquet(io.BytesIO(read(p))) for p in parts]
    history = pl.concat(frames, how="diagonal_relaxed")
    assert history.schema["b"] == pl.Int64 and history.schema["c"] == pl.Decimal(12, 2)
    assert history.schema["a"] == pl.String and history.schema["b_confidence"] == pl.Float64
    assert history.height == 10 and history["b"].null_count() == 3 and history["c"].null_count() == 4
    assert history.filter(pl.col("c").is_not_null())["c"].unique().to_list() == [Decimal("12.50")]
    if read is None:  # the lazy scan reads them too, given the union's schema (missing columns inserted as nulls)
        scanned = pl.scan_parquet(parts, schema=history.schema, missing_columns="insert").collect()
        assert scanned.equals(history)


def run_add_then_remove(job: Job, put: Callable[[int], None], remove: Callable[[int], None]) -> None:
    """Run 1 with {a, b}; a file leaves the source; run 2 adds c; run 3 removes b. Checks the table after each."""
    for i in range(4):
        put(i)
    first = process_documents(str(job.declare(A, B_INT)))
    output = job.spec.output
    assert first.documents == 4 and first.error == 0
    table = assert_table_is_current(job.spec)
    assert "c" not in table.columns and table["b"].to_list() == [7] * 4
    remove(3)  # its row stays in the table (deleted_at), as run 1 wrote it

    second = process_documents(str(job.declare(A, B_INT, C)))
    assert second.documents == 3  # the task changed: every listed file again
    table = assert_table_is_current(job.spec)
    gone = by_file(table, "doc-003.txt")
    assert gone["deleted_at"] is not None and gone["c"] is None and gone["b"] == 7  # written before c existed
    live = table.filter(pl.col("deleted_at").is_null())
    assert live["c"].to_list() == [Decimal("12.50")] * 3 and live["b"].to_list() == [7] * 3

    third = process_documents(str(job.declare(A, C)))
    assert third.documents == 3
    table = assert_table_is_current(job.spec)
    live = table.filter(pl.col("deleted_at").is_null())
    assert live["b"].null_count() == 3 and live["b_confidence"].null_count() == 3  # null from then on
    assert by_file(table, "doc-003.txt")["b"] == 7  # a row no run rewrote keeps its answer
    assert live["c"].to_list() == [Decimal("12.50")] * 3
    recorded = committed_answer_schema(output)
    assert recorded is not None
    assert [c.name for c in recorded.columns] == ["label", "a", "c"] and [c.name for c in recorded.retired] == ["b"]
    assert table_schema(job.spec, recorded).field("b").type == pa.int64()


@pytest.mark.usefixtures("prefect_server")
def test_a_field_added_then_one_removed_evolves_the_parts_the_table_and_every_reader(tmp_path: Path) -> None:
    docs, out = tmp_path / "docs", tmp_path / "out"
    docs.mkdir()

    def put(i: int) -> None:
        (docs / f"doc-{i:03d}.txt").write_text(f"{LABELS[i % 3]} news, item {i}\n", encoding="utf-8")

    with OracleServer(default=ANSWER) as server:
        job = Job(tmp_path / "job.yaml", str(docs), str(out), server.base_url)
        run_add_then_remove(job, put, lambda i: (docs / f"doc-{i:03d}.txt").unlink())
    spec = job.spec

    manifest = newest_manifest(spec.output)
    schema = manifest["schema"]
    assert [c["name"] for c in schema["retired"]] == ["b"] and schema["retired"][0]["arrow"] == "int64"
    assert {c["name"]: c["arrow"] for c in schema["columns"]}["c"] == "decimal128(12, 2)"
    parts = committed_files(spec.output).parts
    newest_parts = [p["url"] for p in manifest["parts"]]
    assert newest_parts and all("b" not in pl.read_parquet_schema(p) for p in newest_parts)
    assert all("c" in pl.read_parquet_schema(p) for p in newest_parts)
    assert_history_reads_together(parts)

    con = open_views(spec)  # docroute sql's views: the history by name, the current rows
    assert run_query(con, "SELECT count(*), count(b), count(c) FROM results").rows == [(10, 7, 6)]
    described = dict(run_query(con, "SELECT column_name, column_type FROM (DESCRIBE results)").rows)
    assert described["b"] == "BIGINT" and described["c"] == "DECIMAL(12,2)"
    assert run_query(con, "SELECT count(*), count(c) FROM documents").rows == [(3, 3)]
    result = runner.invoke(app, ["sql", str(job.path), "SELECT count(b) AS with_b FROM results"])
    assert result.exit_code == 0, result.output
    assert "7" in result.output

    current = current_rows(spec.output)  # live documents: all written by run 3, so no b at all
    assert current.height == 3 and "b" not in current.columns and current.schema["c"] == pl.Decimal(12, 2)


@pytest.mark.usefixtures("prefect_server")
def test_a_changed_type_or_label_set_is_refused_naming_it_unless_full_refresh(tmp_path: Path) -> None:
    docs, out = tmp_path / "docs", tmp_path / "out"
    docs.mkdir()
    for i in range(3):
        (docs / f"doc-{i:03d}.txt").write_text(f"{LABELS[i]} news, item {i}\n", encoding="utf-8")
    with OracleServer(default=ANSWER) as server:
        job = Job(tmp_path / "job.yaml", str(docs), str(out), server.base_url)
        assert process_documents(str(job.declare(A, B_INT))).documents == 3
        output = job.spec.output
        manifests = sorted(Path(output.layout.manifests_dir()).glob("*.json"))

        retyped = runner.invoke(app, ["run", str(job.declare(A, B_STR))])
        assert retyped.exit_code == ExitCode.INPUT == 2, retyped.output
        message = " ".join(retyped.output.split())
        assert "field `b` changed type from int (int64) to str (string)" in message
        assert "--full-refresh" in message and "Traceback" not in retyped.output

        relabeled = runner.invoke(app, ["run", str(job.declare(A, B_INT, labels=("sports", "weather", "finance")))])
        assert relabeled.exit_code == 2, relabeled.output
        message = " ".join(relabeled.output.split())
        assert "the label set of `label` changed from [sports, weather, cooking] to [sports, weather, finance]" in (
            message
        )
        assert sorted(Path(output.layout.manifests_dir()).glob("*.json")) == manifests  # nothing committed

        both = job.declare(A, B_STR, labels=("sports", "weather", "finance"))
        refreshed = runner.invoke(app, ["run", str(both), "--full-refresh"])
        assert refreshed.exit_code == 0, refreshed.output
        again = runner.invoke(app, ["run", str(both)])  # the new schema is the committed one now
        assert again.exit_code == 0, again.output

    recorded = committed_answer_schema(output)
    assert recorded is not None
    retyped, relabeled = recorded.column("b"), recorded.column("label")
    assert retyped is not None and retyped.arrow_type == pa.string()
    assert relabeled is not None and relabeled.values == ("sports", "weather", "finance")
    assert not recorded.retired
    table = assert_table_is_current(job.spec)  # rewritten in the new type
    assert read_table(output)[0].field("b").type == pa.string()
    assert table["b"].to_list() == ["7"] * 3 and table["label"].to_list() == ["sports"] * 3
    parts = committed_files(output).parts  # the history keeps run 1's parts, in their type
    assert {str(pl.read_parquet_schema(p)["b"]) for p in parts} == {"Int64", "String"}


@pytest.mark.usefixtures("prefect_server")
def test_an_output_whose_manifests_record_no_schema_is_compatible_once(tmp_path: Path) -> None:
    """Manifests written before the record: the next run has nothing to compare with, so it runs and records."""
    docs, out = tmp_path / "docs", tmp_path / "out"
    docs.mkdir()
    (docs / "doc-000.txt").write_text("sports news\n", encoding="utf-8")
    with OracleServer(default=ANSWER) as server:
        job = Job(tmp_path / "job.yaml", str(docs), str(out), server.base_url)
        process_documents(str(job.declare(A, B_INT)))
        output = job.spec.output
        for manifest in Path(output.layout.manifests_dir()).glob("*.json"):  # as an older docroute wrote them
            manifest.write_text(
                json.dumps({k: v for k, v in json.loads(manifest.read_text()).items() if k != "schema"})
            )
        assert committed_answer_schema(output) is None
        assert process_documents(str(job.declare(A, B_INT, C))).documents == 1
        recorded = committed_answer_schema(output)
        assert recorded is not None and [c.name for c in recorded.columns] == ["label", "a", "b", "c"]
        assert_table_is_current(job.spec)
        refused = runner.invoke(app, ["run", str(job.declare(A, B_STR, C))])
        assert refused.exit_code == 2 and "field `b` changed type" in " ".join(refused.output.split())


@pytest.mark.usefixtures("prefect_server")
def test_a_field_added_then_one_removed_on_s3(tmp_path: Path, s3_endpoint: str) -> None:
    fs = make_bucket(s3_endpoint, "schema-evolution")
    access = s3_access_yaml(s3_endpoint)

    def put(i: int) -> None:
        fs.pipe(f"schema-evolution/in/doc-{i:03d}.txt", f"{LABELS[i % 3]} news, item {i}\n".encode())

    with OracleServer(default=ANSWER) as server:
        job = Job(
            tmp_path / "job.yaml", "s3://schema-evolution/in", "s3://schema-evolution/out", server.base_url, access
        )
        run_add_then_remove(job, put, lambda i: fs.rm(f"schema-evolution/in/doc-{i:03d}.txt"))
    spec = job.spec
    parts = committed_files(spec.output).parts
    assert len(parts) == 6 and all(p.startswith("s3://") for p in parts)
    assert_history_reads_together(parts, read=fs.cat_file)
    con = open_views(spec)
    assert run_query(con, "SELECT count(*), count(b), count(c) FROM results").rows == [(10, 7, 6)]


def _spec(tmp_path: Path, fields: Sequence[str], labels: Sequence[str] = LABELS) -> JobSpec:
    path = tmp_path / "job.yaml"
    path.write_text(job_text("docs", "out", "http://127.0.0.1:9/v1", fields, labels=labels), encoding="utf-8")
    return load_job(path)


def test_changes_are_typed_and_only_a_type_or_a_value_set_is_refused(tmp_path: Path) -> None:
    first = answer_schema(_spec(tmp_path, [A, B_INT]))
    assert AnswerSchema.from_json(json.loads(json.dumps(first.to_json()))) == first

    kinds = {c.name: c.kind for c in compare(first, answer_schema(_spec(tmp_path, [A, C])))}
    assert kinds == {"c": ChangeKind.ADDED, "b": ChangeKind.RETIRED}
    removed = evolve(first, _spec(tmp_path, [A, C]), full_refresh=False).schema
    assert [c.name for c in removed.retired] == ["b"]
    back = evolve(removed, _spec(tmp_path, [A, B_INT, C]), full_refresh=False)
    assert [(c.name, c.kind) for c in back.changes] == [("b", ChangeKind.RESTORED)] and not back.schema.retired

    with pytest.raises(SchemaChangeError) as refused:  # a retired field comes back only with its old type
        evolve(removed, _spec(tmp_path, [A, B_STR, C]), full_refresh=False)
    assert isinstance(refused.value, InputError) and refused.value.exit_code == ExitCode.INPUT
    assert [(c.name, c.kind) for c in refused.value.changes] == [("b", ChangeKind.TYPE_CHANGED)]

    enum = "{name: a, type: enum, values: [x, y]}"
    wider = "{name: a, type: enum, values: [x, y, z]}"
    with pytest.raises(SchemaChangeError, match=r"the values of enum field `a` changed from \[x, y\] to \[x, y, z\]"):
        evolve(answer_schema(_spec(tmp_path, [enum])), _spec(tmp_path, [wider]), full_refresh=False)
    same = "{name: a, type: enum, values: [y, x]}"  # the order of a value set is no change
    assert not evolve(answer_schema(_spec(tmp_path, [enum])), _spec(tmp_path, [same]), full_refresh=False).changes
    precise = "{name: c, type: decimal, precision: 14, scale: 2}"
    with pytest.raises(SchemaChangeError, match=r"decimal\(12, 2\) \(decimal128\(12, 2\)\) to decimal\(14, 2\)"):
        evolve(answer_schema(_spec(tmp_path, [C])), _spec(tmp_path, [precise]), full_refresh=False)
    refreshed = evolve(answer_schema(_spec(tmp_path, [C])), _spec(tmp_path, [precise]), full_refresh=True)
    assert refreshed.schema == AnswerSchema(answer_schema(_spec(tmp_path, [precise])).columns)
    assert evolve(None, _spec(tmp_path, [A]), full_refresh=False).schema == answer_schema(_spec(tmp_path, [A]))

    with pytest.raises(InputError, match="upgrade docroute"):
        AnswerSchema.from_json({"format": 99, "columns": []})


def test_the_table_schema_keeps_retired_columns_after_the_result_columns(tmp_path: Path) -> None:
    spec = _spec(tmp_path, [A, C])
    recorded = evolve(answer_schema(_spec(tmp_path, [A, B_INT])), spec, full_refresh=False).schema
    names = table_schema(spec, recorded).names
    assert table_schema(spec).names == [n for n in names if n not in ("b", "b_confidence")]
    assert names[-3:] == ["b", "b_confidence", "deleted_at"]
    assert table_schema(spec, recorded).field("c").type == pa.decimal128(12, 2)
