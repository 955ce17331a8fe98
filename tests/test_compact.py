"""`docroute compact` (flows/compact.py, tasks/store/compact.py): after real runs (new, changed, deleted files) in
shards of one document, compaction keeps every current row, every history row and the current table's rows, cuts
the file count, and the next run still works; it refuses while a live run holds the output, leaves an adoptable
dead run's parts alone, deletes only what is old and unneeded; on a local folder and on S3 (moto: the Delta table,
and an Iceberg table whose data files are cut and snapshots expired); and a compaction SIGKILLed at each of its
steps leaves the output reading the same, the next one completing it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from corpus import COOKING, SPORTS, WEATHER, topic_job_yaml
from s3_server import make_bucket, s3_access_yaml
from test_current_table import assert_table_is_current, read_table
from typer.testing import CliRunner

from docroute.flows.cli import app
from docroute.flows.compact import compact_output
from docroute.flows.process import process_documents
from docroute.schemas.errors import InputError
from docroute.schemas.layout import OutputLayout
from docroute.schemas.load import load_job
from docroute.schemas.spec import OutputSpec
from docroute.tasks.account.views import open_views
from docroute.tasks.store.compact import (
    CompactionAction,
    Removed,
    TableAction,
    apply_retention,
    count_results_files,
    parse_retention_hours,
)
from docroute.tasks.store.current import committed_parts, current_rows
from docroute.tasks.store.lease import RunInProgressError, acquire_lease, newest_lease
from docroute.tasks.store.state import ManifestKind, committed_manifests, live_parts, manifest_kind
from docroute.tasks.store.table import APP_ID, delta_storage_options

TEXTS = [SPORTS, WEATHER, COOKING]
CHILD = Path(__file__).with_name("compact_child.py")
GEMMA = "small_model:\n  engine: llamacpp\n  classify_strategy: label_scoring\n"
WORDLLAMA = "small_model:\n  engine: llamacpp\n  encoder: wordllama\n  classify_strategy: similarity\n"
"""Classification by WordLlama similarity: the runs here need rows, not Gemma's answers (seconds per document)."""


def _job_text(source: str, output: str, access: str = "") -> str:
    text = topic_job_yaml(Path("/in"), Path("/out"), shard_size=1).replace(GEMMA, WORDLLAMA)
    assert WORDLLAMA in text
    text = text.replace("  url: /in\n", f"  url: {source}\n{access}")
    return text.replace("  url: /out\n", f"  url: {output}\n{access}")


@dataclass
class Local:
    job: Path
    docs: Path

    @property
    def output(self) -> OutputSpec:
        return load_job(self.job).output

    def put(self, index: int, note: str = "") -> None:
        (self.docs / f"doc-{index:03d}.txt").write_text(f"{TEXTS[index % 3]} (item {index}){note}\n", encoding="utf-8")


def _local(tmp_path: Path) -> Local:
    docs = tmp_path / "docs"
    docs.mkdir()
    job = tmp_path / "job.yaml"
    job.write_text(_job_text(str(docs), str(tmp_path / "out")), encoding="utf-8")
    return Local(job, docs)


def _history(job: Path) -> pl.DataFrame:
    """Every committed row, as the `results` view (what `docroute sql` queries) reads it, in a stable order."""
    con = open_views(load_job(job))
    frame = pl.from_arrow(con.sql("SELECT * FROM results").arrow())
    assert isinstance(frame, pl.DataFrame)
    frame = frame.with_columns(pl.col(pl.Categorical, pl.Enum).cast(pl.String))
    return frame.select(sorted(frame.columns)).sort(["doc_id", "run_id", "processed_at"])


def _current(job: Path) -> pl.DataFrame:
    rows = current_rows(load_job(job).output, include_deleted=True)
    return rows.with_columns(pl.col(pl.Categorical, pl.Enum).cast(pl.String)).sort("doc_id")


@dataclass(frozen=True)
class Seen:
    """What every reader of the output sees: current rows, the history, the current table."""

    current: pl.DataFrame
    history: pl.DataFrame
    table: pl.DataFrame

    @staticmethod
    def of(job: Path) -> Seen:
        output = load_job(job).output
        table = read_table(output).sort("doc_id")
        return Seen(_current(job), _history(job), table.select(sorted(table.columns)))

    def assert_same(self, other: Seen) -> None:
        assert self.current.equals(other.current)
        assert self.history.height == other.history.height and self.history.equals(other.history)
        assert self.table.equals(other.table)


def _three_runs(local: Local) -> None:
    """New files, then a changed file and two new ones, then a deleted file: shards of one, many small parts."""
    for i in range(6):
        local.put(i)
    process_documents(str(local.job))
    time.sleep(0.01)
    local.put(0, " rewritten")
    local.put(6)
    local.put(7)
    assert process_documents(str(local.job)).documents == 3
    (local.docs / "doc-001.txt").unlink()
    process_documents(str(local.job))


@pytest.mark.usefixtures("prefect_server")
def test_compaction_keeps_every_row_cuts_the_files_and_the_next_run_works(tmp_path: Path) -> None:
    local = _local(tmp_path)
    _three_runs(local)
    output = local.output
    before = Seen.of(local.job)
    assert before.history.height == 9 and before.current.height == 8
    parts_before, files_before = len(committed_parts(output)), count_results_files(output)
    assert parts_before == files_before == 9

    report = compact_output(str(local.job), retention_hours=0)

    assert report.action is CompactionAction.COMPACTED and report.rows == 9
    Seen.of(local.job).assert_same(before)
    assert_table_is_current(local.job)
    # one file of current rows and one of superseded rows for the run date
    assert report.live_parts_before == 9 and report.live_parts_after == len(committed_parts(output)) == 2
    assert report.results_files_before == 9 and report.results_files_after == count_results_files(output) == 2
    assert report.retention.removed[Removed.REPLACED_PART] == 9
    newest = committed_manifests(output)[-1][1]
    assert manifest_kind(newest) is ManifestKind.COMPACTION and len(newest["replaces"]) == 9
    assert report.table.action is TableAction.OPTIMIZED and report.table.files_after <= report.table.files_before
    from deltalake import DeltaTable

    table = DeltaTable(output.layout.current_table(), storage_options=delta_storage_options(output))
    assert table.transaction_version(APP_ID) is not None
    assert all(str(r["run_id"]) != report.compaction_id for r in current_rows(output).iter_rows(named=True))

    # a run after the compaction: the changed file gets its new row, the table follows, the history grows by one
    local.put(2, " edited after compaction")
    after = process_documents(str(local.job))
    assert after.documents == 1
    assert_table_is_current(local.job)
    doc2 = current_rows(output).filter(pl.col("source_uri").str.ends_with("doc-002.txt"))
    assert doc2["run_id"].item() == after.run_id
    assert _history(local.job).height == 10
    again = compact_output(str(local.job), retention_hours=0)  # the new part and the compacted files, once more
    assert again.action is CompactionAction.COMPACTED and len(committed_parts(output)) == 2
    assert _history(local.job).height == 10 and _current(local.job).equals(_current(local.job))
    assert_table_is_current(local.job)
    nothing = compact_output(str(local.job), retention_hours=0)
    assert nothing.action is CompactionAction.NOTHING_TO_DO and nothing.live_parts_after == 2


@pytest.mark.usefixtures("prefect_server")
def test_compaction_waits_for_a_live_run_and_leaves_an_adoptable_plan_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = _local(tmp_path)
    for i in range(4):
        local.put(i)
    process_documents(str(local.job))
    output = local.output

    lease = acquire_lease(output, run_id="a-live-run", flow_run_id=None, ttl_s=60)
    try:
        with pytest.raises(RunInProgressError):
            compact_output(str(local.job))
        result = CliRunner().invoke(app, ["compact", str(local.job)])
        assert result.exit_code == 3, result.output
    finally:
        lease.release("test")

    # a run that dies before its manifest: its plan and parts wait for the next run to adopt them
    from docroute.flows import process

    def die(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("killed before the manifest")

    for i in range(4, 7):
        local.put(i)
    monkeypatch.setattr(process, "write_ledger", die)
    with pytest.raises(RuntimeError, match="killed before the manifest"):
        process_documents(str(local.job))
    monkeypatch.undo()
    plans = list((Path(output.url) / "state" / "plans").glob("*.parquet"))
    assert len(plans) == 1
    plan_id = plans[0].stem
    open_parts = sorted(Path(output.url).glob(f"results/*/part-{plan_id}-*.parquet"))
    assert len(open_parts) == 3
    stamps = {p: p.stat().st_mtime_ns for p in open_parts}

    # a frontier batch still out reads its rows back from the part that queued them: that part stays put
    pinned = committed_parts(output)[0]
    batches = Path(output.layout.frontier_batches())
    batches.mkdir(parents=True, exist_ok=True)
    record = {"batch_id": "b1", "status": "submitted", "requests": {"some-doc": pinned}}
    (batches / "b1.json").write_text(json.dumps(record), encoding="utf-8")

    report = compact_output(str(local.job), retention_hours=0)
    assert report.action is CompactionAction.COMPACTED  # the committed run's other 3 parts, into one file
    assert {p: p.stat().st_mtime_ns for p in open_parts} == stamps  # untouched, not deleted
    assert pinned in committed_parts(output) and Path(pinned).exists() and len(committed_parts(output)) == 2
    (batches / "b1.json").unlink()
    resumed = process_documents(str(local.job))
    assert resumed.resumed_from == plan_id and sum(part.reused for part in resumed.parts) == 3
    assert current_rows(output).height == 7
    assert_table_is_current(local.job)


@pytest.mark.usefixtures("prefect_server")
def test_retention_deletes_only_what_is_old_and_unneeded(tmp_path: Path) -> None:
    local = _local(tmp_path)
    _three_runs(local)
    output = local.output
    out = Path(output.url)
    day = next((out / "results").iterdir())
    orphan = day / "part-0123456789abcdef-00000.parquet"  # a dead run's leftover no plan names any more
    shutil.copy(next(day.glob("part-*.parquet")), orphan)
    before = Seen.of(local.job)

    report = compact_output(str(local.job))  # the default retention: 7 days
    assert report.action is CompactionAction.COMPACTED and not report.retention.removed
    Seen.of(local.job).assert_same(before)
    assert count_results_files(output) == 10 + 2  # replaced parts and the orphan stay for readers part-way
    assert parse_retention_hours("7d") == output.compaction.retention_hours == 168

    soon = apply_retention(load_job(local.job), retention_hours=168, now=datetime.now(UTC) + timedelta(days=6))
    assert not soon.removed and soon.results_files == 12
    later = apply_retention(load_job(local.job), retention_hours=168, now=datetime.now(UTC) + timedelta(days=8))
    assert later.removed[Removed.REPLACED_PART] == 9 and later.removed[Removed.ORPHAN_FILE] == 1
    assert later.removed.get(Removed.OLD_SNAPSHOT, 0) <= 1  # runs keep two snapshots already
    assert later.results_files == 2 and not orphan.exists()
    Seen.of(local.job).assert_same(before)
    snapshots = list((out / "state" / "documents").glob("*.parquet"))
    states = [m["state"] for _, m in committed_manifests(output) if m.get("state")][-2:]
    assert sorted(str(p) for p in snapshots) == sorted(states)


@pytest.mark.usefixtures("prefect_server")
def test_compaction_on_s3_keeps_every_row_and_cuts_the_files(tmp_path: Path, s3_endpoint: str) -> None:
    fs = make_bucket(s3_endpoint, "compaction")
    access = s3_access_yaml(s3_endpoint)
    job = tmp_path / "job.yaml"
    job.write_text(_job_text("s3://compaction/in", "s3://compaction/out", access), encoding="utf-8")

    def put(index: int, note: str = "") -> None:
        fs.pipe(f"compaction/in/doc-{index:03d}.txt", f"{TEXTS[index % 3]} (item {index}){note}\n".encode())

    for i in range(4):
        put(i)
    process_documents(str(job))
    put(0, " rewritten")
    put(4)
    process_documents(str(job))
    output = load_job(job).output
    before = Seen.of(job)
    assert count_results_files(output) == len(committed_parts(output)) == 6

    # through the CLI, with a target of about three rows a file: 5 current rows make 2 files, 1 superseded row 1
    fs.invalidate_cache()
    sizes = [fs.info(url)["size"] for url in committed_parts(output)]
    target_mb = 3.5 * sum(sizes) / len(sizes) / 2**20  # three rows of these sizes fit, four do not
    result = CliRunner().invoke(app, ["compact", str(job), "--retention", "0", "--target-mb", f"{target_mb:.6f}"])
    assert result.exit_code == 0, result.output
    assert "committed parts 6 -> 3" in result.output and "results files on storage: 6 -> 3" in result.output
    Seen.of(job).assert_same(before)
    assert count_results_files(output) == len(committed_parts(output)) == 3
    assert_table_is_current(job)
    put(1, " edited")
    assert process_documents(str(job)).documents == 1
    assert_table_is_current(job)
    assert _history(job).height == 7
    assert compact_output(str(job), retention_hours=0).action is CompactionAction.COMPACTED  # the job's target
    assert len(committed_parts(output)) == 2 and _history(job).height == 7  # 5 current rows, 2 superseded ones
    assert_table_is_current(job)


# -- SIGKILL at each step -----------------------------------------------------------------------------------------

KILL_POINTS = [
    "docroute.tasks.store.compact:atomic_write@1+after",  # a new file written; no state, no manifest
    "docroute.tasks.store.compact:write_parquet+after",  # every new file and the state snapshot; no manifest
    "docroute.tasks.store.compact:write_json+after",  # the manifest written; table not told, nothing deleted
    "docroute.tasks.store.compact:_delete@1+after",  # part-way through the deletions
]


def _compact_in_child(job: Path, kill_at: str) -> tuple[int, str]:
    log = job.parent / f"compact-{kill_at.rsplit(':', 1)[-1]}.log"
    with log.open("w") as sink:
        child = subprocess.Popen(
            [sys.executable, str(CHILD), str(job), kill_at],
            env={**os.environ, "DO_NOT_TRACK": "1"},
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            child.wait(timeout=240)
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGKILL)  # anything the killed process left running
    return child.returncode, log.read_text()[-3000:]


@pytest.mark.usefixtures("prefect_server")
def test_a_compaction_killed_at_each_step_leaves_the_output_readable_and_the_next_one_finishes(
    tmp_path: Path,
) -> None:
    local = _local(tmp_path)
    _three_runs(local)
    before = Seen.of(local.job)
    for point in KILL_POINTS:
        code, log = _compact_in_child(local.job, point)
        assert code == -signal.SIGKILL, log
        assert "crash_child: SIGKILL" in log, log
        Seen.of(local.job).assert_same(before)
        parts = committed_parts(local.output)
        assert all(Path(url).exists() for url in parts)  # no committed file lost, whatever was deleted
        assert _history(local.job).height == 9
    report = compact_output(str(local.job), retention_hours=0)  # takes over the dead compaction's lease
    lease = newest_lease(local.output)
    assert lease is not None and lease.took_over is not None and lease.released_by == "compacted"
    assert report.action is CompactionAction.NOTHING_TO_DO  # the last killed one had committed: its deletions end
    # the first killed one's file, the second one's files (its snapshot goes as an old snapshot)
    assert report.retention.removed[Removed.ORPHAN_FILE] == 3
    Seen.of(local.job).assert_same(before)
    assert count_results_files(local.output) == len(committed_parts(local.output)) == 2
    assert_table_is_current(local.job)
    local.put(3, " edited")
    assert process_documents(str(local.job)).documents == 1
    assert_table_is_current(local.job)
    manifests = committed_manifests(local.output)
    assert len({json.dumps(sorted(m.get("replaces", []))) for _, m in manifests if m.get("replaces")}) == len(
        [m for _, m in manifests if m.get("replaces")]
    )  # no compaction committed twice


def test_live_parts_skip_what_a_compaction_replaced_and_its_paths_parse() -> None:
    manifests = [
        {"parts": [{"url": "a"}, {"url": "b"}]},
        {"kind": "compaction", "parts": [{"url": "c"}], "replaces": ["a", "b"]},
        {"parts": [{"url": "d"}]},
    ]
    assert live_parts(manifests) == ["c", "d"]
    assert [manifest_kind(m) for m in manifests] == [ManifestKind.RUN, ManifestKind.COMPACTION, ManifestKind.RUN]
    url = OutputSpec(url="s3://bucket/out").layout.compacted_part(date(2026, 12, 1), "abc", 3)
    assert url == "s3://bucket/out/results/run_date=2026-12-01/compacted-abc-00003.parquet"
    assert OutputLayout.part_run_date(url) == date(2026, 12, 1)
    assert OutputLayout.part_run_date("s3://bucket/out/results/x.parquet") is None
    assert parse_retention_hours("90m") == 1.5 and parse_retention_hours("0") == 0 and parse_retention_hours("12") == 12
    with pytest.raises(InputError):
        parse_retention_hours("a week")


def test_the_nightly_compaction_is_a_paused_deployment_of_the_compaction_flow() -> None:
    import yaml

    root = Path(__file__).resolve().parent.parent
    deployments = yaml.safe_load((root / "deployments" / "prefect.yaml").read_text(encoding="utf-8"))["deployments"]
    nightly = next(d for d in deployments if d["name"] == "nightly-compact")
    assert nightly["entrypoint"] == "flows/compact.py:compact_output" and nightly["concurrency_limit"] == 1
    assert [s["active"] for s in nightly["schedules"]] == [False]  # optional: a person turns it on
    assert compact_output.name == "compact-output"


@pytest.mark.usefixtures("prefect_server")
def test_a_run_asked_to_compact_commits_then_compacts_as_its_last_step(tmp_path: Path) -> None:
    local = _local(tmp_path)
    for i in range(4):
        local.put(i)
    process_documents(str(local.job))
    assert len(committed_parts(local.output)) == 4  # shards of one: a part per document
    current_before = _current(local.job)
    local.put(4)
    summary = process_documents(str(local.job), compact=True)
    assert summary.documents == 1  # the run itself is unchanged: only the new file
    assert len(committed_parts(local.output)) == 1  # then its five parts became one file of the same rows
    current_after = _current(local.job)
    assert current_after.height == 5
    unchanged = current_after.filter(pl.col("doc_id").is_in(current_before["doc_id"].to_list()))
    assert unchanged.select(current_before.columns).equals(current_before)  # the same rows, now in one file
    assert_table_is_current(local.job)


def _iceberg_seen(job: Path) -> Seen:
    """What every reader sees of an output whose current table is Iceberg (read through its catalog)."""
    from docroute.tasks.store.iceberg_table import read_iceberg_table

    found = read_iceberg_table(load_job(job))
    assert found is not None
    table = pl.from_arrow(found[0])
    assert isinstance(table, pl.DataFrame)
    table = table.with_columns(pl.col(pl.Categorical, pl.Enum).cast(pl.String)).sort("doc_id")
    return Seen(_current(job), _history(job), table.select(sorted(table.columns)))


@pytest.mark.usefixtures("prefect_server")
def test_compaction_of_an_iceberg_table_on_s3_keeps_every_row_cuts_the_files_and_expires_snapshots(
    tmp_path: Path, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three runs in shards of one on moto S3, the current table Iceberg in a SQL catalog (a local SQLite file):
    `docroute compact --retention 0` keeps every current and history row and the table's rows, cuts the results
    parts and the table's data files to one each, expires every snapshot but the current one and deletes the
    table's unused files from the bucket; the next run merges only its change, and a second compaction works."""
    from test_iceberg_table import assert_iceberg_is_current

    from docroute.tasks.store.iceberg_table import (
        OPERATION_PROPERTY,
        IcebergCurrentTable,
        iceberg_identifier,
        load_iceberg_catalog,
    )

    fs = make_bucket(s3_endpoint, "iceberg-compaction")
    access = s3_access_yaml(s3_endpoint)
    out = "s3://iceberg-compaction/out"
    table_yaml = f"  table: {{format: iceberg, catalog: {{type: sql, uri: 'sqlite:///{tmp_path}/catalog.db'}}}}\n"
    text = _job_text("s3://iceberg-compaction/in", out, access)
    text = text.replace(f"  url: {out}\n{access}", f"  url: {out}\n{access}{table_yaml}")
    assert table_yaml in text
    job = tmp_path / "job.yaml"
    job.write_text(text, encoding="utf-8")
    spec = load_job(job)
    output = spec.output
    folder = "iceberg-compaction/out/tables/iceberg/documents"

    def put(index: int, note: str = "") -> None:
        fs.pipe(f"iceberg-compaction/in/doc-{index:03d}.txt", f"{TEXTS[index % 3]} (item {index}){note}\n".encode())

    def table_state() -> tuple[list[int], int | None, set[str], str | None]:
        """Snapshot ids, the current one, the data files it reads (bucket paths) and its docroute operation."""
        catalog = load_iceberg_catalog(output)
        try:
            table = catalog.load_table(iceberg_identifier(spec))
            current = table.current_snapshot()
            named = {task.file.file_path.removeprefix("s3://") for task in table.scan().plan_files()}
            summary = current.summary if current is not None else None
            operation = summary.get(OPERATION_PROPERTY) if summary is not None else None
            return [s.snapshot_id for s in table.snapshots()], current and current.snapshot_id, named, operation
        finally:
            catalog.close()

    def on_bucket(sub: str, suffix: str) -> set[str]:
        fs.invalidate_cache()
        return {p for p in fs.find(f"{folder}/{sub}") if p.endswith(suffix)}

    for i in range(6):  # new files, then a changed file and two new ones, then a deleted file
        put(i)
    process_documents(str(job))
    time.sleep(0.01)
    put(0, " rewritten")
    put(6)
    put(7)
    assert process_documents(str(job)).documents == 3
    fs.rm("iceberg-compaction/in/doc-001.txt")
    process_documents(str(job))
    assert_iceberg_is_current(job)
    before = _iceberg_seen(job)
    assert before.history.height == 9 and before.current.height == before.table.height == 8
    snapshots, _, named, _ = table_state()
    assert len(snapshots) >= 3 and len(named) >= 3 and on_bucket("data", ".parquet") > named

    report = compact_output(str(job), retention_hours=0)

    assert report.action is CompactionAction.COMPACTED and report.rows == 9
    _iceberg_seen(job).assert_same(before)  # every current row, every history row, the table's rows
    assert_iceberg_is_current(job)
    assert report.live_parts_before == 9 and report.live_parts_after == len(committed_parts(output)) == 2
    assert report.results_files_after == count_results_files(output) == 2
    assert report.table.action is TableAction.REWRITTEN
    assert (report.table.files_before, report.table.files_after) == (len(named), 1)
    assert report.table.expired_snapshots >= len(snapshots) and report.table.vacuumed > 0
    snapshots, current, named, operation = table_state()
    assert snapshots == [current] and len(named) == 1 and operation == "compact"
    assert on_bucket("data", ".parquet") == named  # every other data file deleted from the bucket
    # the current metadata file and the one the expiry superseded (current until after the cutoff)
    assert len(on_bucket("metadata", ".metadata.json")) == 2

    def rewrite(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the whole table was rewritten")

    monkeypatch.setattr(IcebergCurrentTable, "rewrite", rewrite)  # the next run merges its change only
    put(2, " edited after compaction")
    after = process_documents(str(job))
    assert after.documents == 1
    assert_iceberg_is_current(job)
    monkeypatch.undo()
    doc2 = current_rows(output).filter(pl.col("source_uri").str.ends_with("doc-002.txt"))
    assert doc2["run_id"].item() == after.run_id
    assert _history(job).height == 10

    again = compact_output(str(job), retention_hours=0)  # the new part and the table's new file, once more
    assert again.action is CompactionAction.COMPACTED and len(committed_parts(output)) == 2
    assert again.table.action is TableAction.REWRITTEN and again.table.files_after == 1
    assert _history(job).height == 10
    assert_iceberg_is_current(job)
    snapshots, current, named, _ = table_state()
    assert snapshots == [current] and on_bucket("data", ".parquet") == named
