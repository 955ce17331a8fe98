"""Object storage, incremental runs, crash recovery and retries, against real S3 over HTTP (moto's server).

Every test reads the committed output the way a user would: the manifests, the state snapshot they name, and the
parts; nothing is read from the flow's return value alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from corpus import COOKING, SPORTS, WEATHER, topic_job_yaml
from oracle_server import OracleServer
from s3_server import KEY, SECRET, s3_access_yaml
from s3_server import make_bucket as _bucket

from docroute.flows.process import process_documents
from docroute.schemas.load import load_job
from docroute.tasks.store.current import committed_parts, current_rows
from docroute.tasks.store.write import read_parquet

pytestmark = pytest.mark.usefixtures("prefect_server")

TEXTS = [SPORTS, WEATHER, COOKING]


def _put_docs(fs, bucket: str, start: int, count: int) -> None:
    for i in range(start, start + count):
        fs.pipe(f"{bucket}/in/doc-{i:03d}.txt", f"{TEXTS[i % 3]} (item {i})\n".encode())


def _s3_job(tmp_path: Path, endpoint: str, bucket: str, *, extra: str = "", shard_size: int = 2) -> Path:
    access = s3_access_yaml(endpoint)
    text = topic_job_yaml(Path("/placeholder-in"), Path("/placeholder-out"), extra=extra, shard_size=shard_size)
    text = text.replace("  url: /placeholder-in\n", f"  url: s3://{bucket}/in\n{access}")
    text = text.replace("  url: /placeholder-out\n", f"  url: s3://{bucket}/out\n{access}")
    job = tmp_path / f"{bucket}.yaml"
    job.write_text(text, encoding="utf-8")
    return job


def _all_committed_rows(job: Path) -> pl.DataFrame:
    output = load_job(job).output
    tables = [read_parquet(output, url) for url in committed_parts(output)]
    return pl.concat([pl.from_arrow(t) for t in tables], how="diagonal_relaxed")  # type: ignore[misc]


def test_s3_source_and_output_incremental_runs_and_no_leaked_secret(tmp_path: Path, s3_endpoint: str) -> None:
    fs = _bucket(s3_endpoint, "incremental")
    _put_docs(fs, "incremental", 0, 5)
    job = _s3_job(tmp_path, s3_endpoint, "incremental")

    first = process_documents(str(job))
    assert first.documents == 5 and first.listed == 5 and first.up_to_date == 0
    fs.invalidate_cache()
    parts = [p for p in fs.find("incremental/out/results") if p.endswith(".parquet")]
    assert parts and fs.exists("incremental/out/manifests")

    second = process_documents(str(job))  # nothing changed in the bucket
    assert second.documents == 0 and second.up_to_date == 5 and second.parts == ()

    _put_docs(fs, "incremental", 5, 3)
    third = process_documents(str(job))
    assert third.documents == 3 and third.up_to_date == 5

    fs.pipe("incremental/in/doc-001.txt", f"{COOKING} (rewritten)\n".encode())  # a changed object: new ETag
    fourth = process_documents(str(job))
    assert fourth.documents == 1 and fourth.up_to_date == 7

    current = current_rows(load_job(job).output)
    assert current.height == 8 and current["doc_id"].n_unique() == 8
    rewritten = current.filter(pl.col("source_uri").str.ends_with("doc-001.txt"))
    assert rewritten["run_id"].item() == fourth.run_id  # the current row is the newest answer
    history = _all_committed_rows(job)
    assert history.height == 9  # the old answer to doc-001 stays in the history, superseded

    refreshed = process_documents(str(job), full_refresh=True)
    assert refreshed.documents == 8

    fs.invalidate_cache()
    for path in fs.find("incremental/out"):  # parquet, json manifests, plans, state: no credential anywhere
        data = fs.cat_file(path)
        assert SECRET.encode() not in data and KEY.encode() not in data, path
    assert SECRET not in repr(load_job(job)) and SECRET not in json.dumps(load_job(job).redacted())


def test_a_crash_after_k_shards_then_a_rerun_gives_exactly_one_row_per_document(
    tmp_path: Path, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = _bucket(s3_endpoint, "crash")
    _put_docs(fs, "crash", 0, 8)
    job = _s3_job(tmp_path, s3_endpoint, "crash", extra="runner: {max_workers: 1}\n", shard_size=2)

    import docroute.flows.process as process_module

    real_update = process_module.update_progress

    def crash_after_two_shards(artifact_id, done: int, total: int) -> None:
        real_update(artifact_id, done, total)
        if done == 2:
            raise RuntimeError("injected crash: the worker died after 2 shards")

    monkeypatch.setattr(process_module, "update_progress", crash_after_two_shards)
    with pytest.raises(RuntimeError, match="injected crash"):
        process_documents(str(job))
    monkeypatch.setattr(process_module, "update_progress", real_update)
    fs.invalidate_cache()
    written = [p for p in fs.find("crash/out/results") if p.endswith(".parquet")]
    assert len(written) == 2 and not fs.exists("crash/out/manifests")  # 2 parts, nothing committed

    _put_docs(fs, "crash", 8, 1)  # the bucket grows before the re-run
    rerun = process_documents(str(job))
    assert rerun.resumed_from is not None
    assert sum(p.reused for p in rerun.parts) == 2  # the finished shards are not recomputed
    assert rerun.documents == 9

    history = _all_committed_rows(job)
    assert history.height == 9 and history["doc_id"].n_unique() == 9
    fs.invalidate_cache()
    everything = [p for p in fs.find("crash/out/results") if p.endswith(".parquet")]
    assert len(everything) == len(rerun.parts)  # no orphan part left for a glob reader to double count
    assert not [p for p in fs.find("crash/out/state/plans")]  # the adopted plan is closed
    assert process_documents(str(job)).documents == 0


def test_frontier_outage_defers_then_the_next_run_retries_the_deferred_rows_first(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(4):
        (docs / f"d{i}.txt").write_text(f"{TEXTS[i % 3]} ({i})\n", encoding="utf-8")
    oracle = [(text, {"label": label}) for text, label in zip(TEXTS, ("sports", "weather", "cooking"), strict=True)]
    with OracleServer(oracle, faults=["500"] * 4) as server:  # down for the first run's 4 calls, then back
        frontier = f"""frontier:
  provider: openai_compatible
  model: oracle-1
  base_url: {server.base_url}
  api_key: sk-test
  price: {{input_per_million: 100.0, output_per_million: 400.0}}
  max_retries: 0
  timeout_s: 5
routing:
  threshold: 1.0
"""
        job = tmp_path / "job.yaml"
        job.write_text(topic_job_yaml(docs, tmp_path / "out", extra=frontier), encoding="utf-8")
        first = process_documents(str(job))
        assert first.deferred == 4 and first.frontier == 0
        second = process_documents(str(job))
    assert second.retried == 4 and second.documents == 4 and second.frontier == 4
    current = current_rows(load_job(job).output)
    assert current.height == 4 and (current["route"] == "frontier").all()
    last = process_documents(str(job))
    assert last.documents == 0  # nothing left to retry

    import duckdb  # the README's warehouse query gives the same current rows

    out = load_job(job).output.url
    query = (
        f"SELECT r.doc_id, r.route FROM read_parquet('{out}/results/**/*.parquet', filename = true) r "
        f"JOIN read_parquet('{last.state}') s ON r.doc_id = s.doc_id AND r.filename = s.part_url"
    )
    found = duckdb.sql(query).fetchall()
    assert len(found) == 4 and {route for _, route in found} == {"frontier"}
    assert len(duckdb.sql(f"SELECT * FROM read_parquet('{out}/results/**/*.parquet')").fetchall()) == 8  # history


def _flaky_filesystem(failures: int) -> type:
    from fsspec.implementations.memory import MemoryFileSystem

    class Flaky(MemoryFileSystem):
        """An in-memory store whose batched reads fail `failures` times, as an object store does under load."""

        protocol = "flakymem"
        remaining = failures
        reads = 0

        @classmethod
        def _strip_protocol(cls, path: str) -> str:
            return super()._strip_protocol(path.replace("flakymem://", "memory://", 1))

        def cat_ranges(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            type(self).reads += 1
            if type(self).remaining > 0:
                type(self).remaining -= 1
                raise ConnectionError("injected: connection reset by peer")
            return super().cat_ranges(*args, **kwargs)

    return Flaky


def test_transient_storage_errors_are_retried_by_prefect_and_lose_nothing(tmp_path: Path) -> None:
    import fsspec

    flaky = _flaky_filesystem(failures=1)
    fsspec.register_implementation("flakymem", flaky, clobber=True)
    store = flaky()
    for i in range(3):
        store.pipe(f"/flaky-corpus/doc-{i}.txt", f"{TEXTS[i]}\n".encode())
    job = tmp_path / "job.yaml"
    text = topic_job_yaml(Path("/placeholder-in"), tmp_path / "out", shard_size=8)
    job.write_text(text.replace("  url: /placeholder-in\n", "  url: flakymem:///flaky-corpus\n"), encoding="utf-8")
    summary = process_documents(str(job))
    assert flaky.reads == 2  # the shard failed once and its retry succeeded
    assert summary.documents == 3 and summary.error == 0
    rows = current_rows(load_job(job).output)
    assert rows.height == 3 and rows["error"].is_null().all()


def test_a_second_run_over_the_same_output_refuses_while_the_first_is_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import docroute.flows.process as process_module
    from docroute.tasks.store.lease import RunInProgressError

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(2):
        (docs / f"d{i}.txt").write_text(f"{TEXTS[i]}\n", encoding="utf-8")
    job = tmp_path / "job.yaml"
    job.write_text(topic_job_yaml(docs, tmp_path / "out", shard_size=1), encoding="utf-8")
    real_update = process_module.update_progress
    refusals: list[str] = []

    def start_another_run_mid_way(artifact_id, done: int, total: int) -> None:
        real_update(artifact_id, done, total)
        if done == 1 and not refusals:
            try:
                process_documents(str(job))  # the same output while this run is still going
            except RunInProgressError as exc:
                refusals.append(str(exc))

    monkeypatch.setattr(process_module, "update_progress", start_another_run_mid_way)
    summary = process_documents(str(job))
    assert len(refusals) == 1 and "never overlap" in refusals[0] and summary.run_id in refusals[0]
    rows = current_rows(load_job(job).output)
    assert rows.height == 2 and rows["doc_id"].n_unique() == 2  # the first run was not disturbed


def test_s3_reads_send_one_get_per_document_and_no_head(
    tmp_path: Path, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listing gave every size, so s3fs is not left to HEAD each object before its GET."""
    import s3fs

    from docroute.tasks.ingest.discover import list_documents
    from docroute.tasks.ingest.read import read_documents

    fs = _bucket(s3_endpoint, "reads")
    _put_docs(fs, "reads", 0, 6)
    source = load_job(_s3_job(tmp_path, s3_endpoint, "reads")).source
    refs = list_documents(source)
    calls: list[str] = []
    real_info, real_call = s3fs.S3FileSystem._info, s3fs.S3FileSystem._call_s3

    async def counted_info(self, path, **kwargs):
        calls.append(f"info {path}")
        return await real_info(self, path, **kwargs)

    async def counted_call(self, method, *args, **kwargs):
        calls.append(method)
        return await real_call(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_info", counted_info)
    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counted_call)
    documents = read_documents(source, refs)
    assert [d.text.split(" (item")[0] for d in documents] == [TEXTS[i % 3].strip() for i in range(6)]
    assert calls == ["get_object"] * 6
