"""`docroute sql` and `docroute show`: DuckDB views over real runs' committed output, local and on S3 (moto)."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import prefect.main  # noqa: F401 - Prefect configures its logging here, before any CliRunner captures a stream
import pyarrow as pa
import pytest
from corpus import COOKING, SPORTS, WEATHER, build_topic_corpus, topic_job_yaml
from s3_server import make_bucket, s3_access_yaml
from typer.testing import CliRunner

from docroute.flows.cli import app
from docroute.flows.process import process_documents
from docroute.schemas.load import load_job
from docroute.schemas.summary import RunSummary
from docroute.tasks.account.views import open_views
from docroute.tasks.store.current import current_rows
from docroute.tasks.store.write import write_json, write_parquet

runner = CliRunner()


@dataclass(frozen=True)
class TwoRuns:
    """A local job run twice: everything, then the one file that changed."""

    job: Path
    first: RunSummary
    second: RunSummary


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory, prefect_server: None) -> TwoRuns:
    tmp_path = tmp_path_factory.mktemp("show-sql")
    source = tmp_path / "docs"
    build_topic_corpus(source)
    job = tmp_path / "job.yaml"
    job.write_text(topic_job_yaml(source, tmp_path / "out"), encoding="utf-8")
    first = process_documents(str(job))
    (source / "a.txt").write_text(f"{SPORTS} The replay was shown twice on television.\n", encoding="utf-8")
    second = process_documents(str(job))
    assert first.documents == 14 and second.documents == 1
    return TwoRuns(job, first, second)


def _sql(job: Path, query: str, *args: str) -> list[dict[str, str]]:
    result = runner.invoke(app, ["sql", str(job), query, "--format", "csv", *args])
    assert result.exit_code == 0, result.output
    return list(csv.DictReader(io.StringIO(result.stdout)))


def test_documents_holds_one_current_row_per_document(two_runs: TwoRuns) -> None:
    current = current_rows(load_job(two_runs.job).output)
    assert _sql(two_runs.job, "select count(*) as n from documents") == [{"n": str(current.height)}]
    assert current.height == 14
    newest = _sql(two_runs.job, "select run_id from documents where source_uri like '%/a.txt'")
    assert newest == [{"run_id": two_runs.second.run_id}]  # the changed file's row from the second run


def test_results_holds_the_whole_history_of_committed_parts(two_runs: TwoRuns) -> None:
    rows = _sql(two_runs.job, "select run_id, count(*) as n from results group by run_id order by n desc")
    assert rows == [{"run_id": two_runs.first.run_id, "n": "14"}, {"run_id": two_runs.second.run_id, "n": "1"}]
    history = _sql(two_runs.job, "select count(*) as n from results where source_uri like '%/a.txt'")
    assert history == [{"n": "2"}]


def test_costs_and_runs_are_the_committed_ledger(two_runs: TwoRuns) -> None:
    runs = _sql(two_runs.job, "select run_id, documents from runs order by started_at")
    assert runs == [
        {"run_id": two_runs.first.run_id, "documents": "14"},
        {"run_id": two_runs.second.run_id, "documents": "1"},
    ]
    costs = _sql(two_runs.job, "select distinct run_id from costs order by run_id")
    assert {row["run_id"] for row in costs} == {two_runs.first.run_id, two_runs.second.run_id}


def test_json_and_table_formats(two_runs: TwoRuns) -> None:
    result = runner.invoke(
        app, ["sql", str(two_runs.job), "select route, count(*) n from documents group by 1", "--format", "json"]
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert sum(line["n"] for line in lines) == 14 and {"route", "n"} == set(lines[0])
    table = runner.invoke(app, ["sql", str(two_runs.job), "select count(*) as n from runs", "--format", "table"])
    assert table.exit_code == 0, table.output
    assert "┃ n ┃" in table.stdout and "│ 2 │" in table.stdout, table.stdout


def test_bad_sql_exits_2_with_one_line(two_runs: TwoRuns) -> None:
    for query in ("selec * from documents", "select * from no_such_view", "select no_such_column from results"):
        result = runner.invoke(app, ["sql", str(two_runs.job), query])
        assert result.exit_code == 2, result.output
        assert result.output.startswith("docroute: SQL error: ") and result.output.count("\n") == 1, result.output
        assert "Traceback" not in result.output


def test_show_prints_routes_spend_runs_and_least_confident_rows(two_runs: TwoRuns) -> None:
    result = runner.invoke(app, ["show", str(two_runs.job), "--least-confident", "3"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "topics: 14 current documents, 2 committed runs" in out
    assert "documents by route" in out and "error" in out and "unreadable" in out
    assert "no all-frontier estimate" in out  # the job has no frontier
    assert two_runs.first.run_id in out and two_runs.second.run_id in out
    assert "least confident answers kept from the small model (by confidence)" in out
    with open_views(load_job(two_runs.job)) as con:
        lowest = con.execute(
            "select source_uri from documents where route in ('small', 'deferred') "
            "order by confidence, source_uri, record_key limit 1"
        ).fetchone()
    assert lowest is not None and Path(lowest[0]).name in out


def test_results_reads_parts_of_two_job_schemas_by_name(tmp_path: Path) -> None:
    """A part written before a field was added and one written after read as one table, the old rows null there."""
    job = tmp_path / "job.yaml"
    job.write_text(topic_job_yaml(tmp_path / "docs", tmp_path / "out"), encoding="utf-8")
    spec = load_job(job)
    layout = spec.output.layout
    old = pa.table({"doc_id": ["d1", "d2"], "route": ["small", "error"], "label": ["sports", None]})
    new = pa.table(
        {
            "doc_id": ["d3"],
            "route": ["small"],
            "label": pa.array(["cooking"]).dictionary_encode(),
            "amount": pa.array([Decimal("12.50")], pa.decimal128(12, 2)),
        }
    )
    for index, (run_id, table) in enumerate((("run-old", old), ("run-new", new))):
        part = layout.results_part(datetime.now(UTC).date(), run_id, 0)
        write_parquet(spec.output, part, table)
        committed = datetime(2026, 1, 1 + index, tzinfo=UTC)
        manifest = {"run": {"run_id": run_id}, "plan_id": run_id, "parts": [{"url": part}], "state": None}
        write_json(spec.output, layout.manifest(run_id, committed), manifest)
    rows = _sql(job, "select doc_id, label, amount from results order by doc_id")
    assert rows == [
        {"doc_id": "d1", "label": "sports", "amount": ""},
        {"doc_id": "d2", "label": "", "amount": ""},
        {"doc_id": "d3", "label": "cooking", "amount": "12.50"},
    ]
    assert _sql(job, "select count(*) as n from documents") == [{"n": "0"}]  # no state snapshot committed


@pytest.mark.usefixtures("prefect_server")
def test_views_on_s3_without_any_extension(tmp_path: Path, s3_endpoint: str) -> None:
    fs = make_bucket(s3_endpoint, "show-sql")
    for i, text in enumerate((SPORTS, WEATHER, COOKING)):
        fs.pipe(f"show-sql/in/doc-{i}.txt", f"{text}\n".encode())
    access = s3_access_yaml(s3_endpoint)
    text = topic_job_yaml(Path("/placeholder-in"), Path("/placeholder-out"))
    text = text.replace("  url: /placeholder-in\n", f"  url: s3://show-sql/in\n{access}")
    text = text.replace("  url: /placeholder-out\n", f"  url: s3://show-sql/out\n{access}")
    job = tmp_path / "s3.yaml"
    job.write_text(text, encoding="utf-8")
    summary = process_documents(str(job))

    assert _sql(job, "select count(*) as n from documents") == [{"n": "3"}]
    assert _sql(job, "select count(*) as n from results") == [{"n": "3"}]
    assert _sql(job, "select run_id from runs") == [{"run_id": summary.run_id}]
    assert _sql(job, "select count(distinct run_id) as n from costs") == [{"n": "1"}]
    with open_views(load_job(job)) as con:
        loaded = {
            name for (name,) in con.execute("select extension_name from duckdb_extensions() where loaded").fetchall()
        }
        assert "httpfs" not in loaded and not any("delta" in name for name in loaded)
        assert con.execute("select current_setting('autoinstall_known_extensions')").fetchone() == (False,)
    shown = runner.invoke(app, ["show", str(job)])
    assert shown.exit_code == 0 and "3 current documents, 1 committed runs" in shown.stdout, shown.output
