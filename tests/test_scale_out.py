"""Scale-out: shards on a local Dask cluster (two worker processes), the frontier budget split among processes, and
frontier calls capped across all workers by a Prefect global concurrency limit — against the session's real API.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import polars as pl
import pytest
from corpus import COOKING, SPORTS, WEATHER, build_topic_corpus, topic_job_yaml
from oracle_server import OracleServer
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from pydantic import ValidationError

from docroute.flows.process import process_documents
from docroute.schemas.spec import RunnerSpec
from docroute.schemas.summary import RunSummary
from docroute.tasks.answer.budget import AllowanceBook
from docroute.tasks.model.infer import ConcurrencyLimitMissingError

pytestmark = pytest.mark.usefixtures("prefect_server")

ORACLE = [(SPORTS, {"label": "sports"}), (WEATHER, {"label": "weather"}), (COOKING, {"label": "cooking"})]
DASK = "runner: {kind: dask, max_workers: 2, dask: {n_workers: 2, threads_per_worker: 1}}\n"
COMPARED = ["source_uri", "record_key", "route", "label", "error"]


def _run(tmp_path: Path, name: str, extra: str, *, shard_size: int = 4) -> pl.DataFrame:
    return _run_with_summary(tmp_path, name, extra, shard_size=shard_size)[0]


def _run_with_summary(tmp_path: Path, name: str, extra: str, *, shard_size: int = 4) -> tuple[pl.DataFrame, RunSummary]:
    source = tmp_path / "docs"
    if not source.exists():
        build_topic_corpus(source)
    job = tmp_path / f"{name}.yaml"
    yaml = topic_job_yaml(source, tmp_path / f"out-{name}", extra=extra, name=name, shard_size=shard_size)
    job.write_text(yaml, encoding="utf-8")
    summary = process_documents(str(job))
    rows = pl.read_parquet(f"{tmp_path}/out-{name}/results/**/*.parquet").sort("source_uri", "record_key")
    return rows, summary


def _frontier(server: OracleServer, *, cap: float | None = None, limit: str | None = None, in_flight: int = 8) -> str:
    return f"""frontier:
  provider: openai_compatible
  model: oracle-1
  base_url: {server.base_url}
  api_key: sk-test
  price: {{input_per_million: 100.0, output_per_million: 400.0}}
  max_concurrency: {in_flight}
  concurrency_limit: {limit or "null"}
  max_retries: 0
  timeout_s: 10
routing:
  threshold: 1.0
  max_frontier_usd: {"null" if cap is None else cap}
"""


def _worst_call_usd(tmp_path: Path, frontier: str) -> float:
    """What the budget reserves for one call of the topic corpus (the worst case of its longest snippet's answer)."""
    from docroute.engines.base import Request
    from docroute.schemas.load import load_job
    from docroute.tasks.model.infer import frontier_engine

    job = tmp_path / "probe.yaml"
    job.write_text(topic_job_yaml(tmp_path, tmp_path / "probe", extra=frontier), encoding="utf-8")
    spec = load_job(job)
    bound = frontier_engine(spec).answer_bound(Request("x", max(SPORTS, WEATHER, COOKING, key=len)))
    return spec.frontier.unit_price.cost_usd(bound.input_tokens, bound.output_tokens)


def test_a_local_dask_cluster_writes_the_same_rows_as_threads(tmp_path: Path) -> None:
    threads = _run(tmp_path, "threads", "runner: {kind: threads, max_workers: 2}\n")
    dask, summary = _run_with_summary(tmp_path, "dask", DASK, shard_size=2)
    assert len(summary.parts) >= 5 and 1 <= summary.worker_processes <= 2
    assert summary.engines_built == summary.worker_processes  # the model loaded once per worker process
    assert dask.height == threads.height >= 10
    assert dask.select(COMPARED).equals(threads.select(COMPARED))
    both = threads.select("source_uri", "record_key", "label_confidence").join(
        dask.select("source_uri", "record_key", "label_confidence"), on=["source_uri", "record_key"], nulls_equal=True
    )
    diff = (both["label_confidence"] - both["label_confidence_right"]).abs().max()
    assert diff is None or diff < 1e-3  # same model and prompts in another process: same scores
    assert dask["run_id"].n_unique() == 1


def test_dask_shards_share_one_frontier_cap_and_one_concurrency_limit(tmp_path: Path) -> None:
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="test-frontier-one", limit=1))
    with OracleServer(ORACLE, delay_s=0.2) as server:
        # two allowances of about one call each: a shard answers one document, or two when the first came cheap
        cap = round(2.0 * _worst_call_usd(tmp_path, _frontier(server)), 6)
        rows = _run(tmp_path, "capped", DASK + _frontier(server, cap=cap, limit="test-frontier-one", in_flight=4))
        calls, in_flight = len(server.chat_requests), server.max_in_flight
    assert in_flight == 1  # two worker processes, four calls allowed each: the shared limit holds them to one
    answered = rows.filter(pl.col("route") == "frontier")
    assert answered.height == calls > 0
    assert rows["frontier_cost_usd"].sum() <= cap
    deferred = rows.filter(pl.col("route_reason").str.contains("budget exhausted"))
    assert deferred.height > 0 and (deferred["route"] == "deferred").all()  # the cap binds across processes


def test_threads_hold_one_shared_slot_per_call(tmp_path: Path) -> None:
    async def create() -> None:
        async with get_client() as client:
            await client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name="test-frontier-two", limit=2)
            )

    asyncio.run(create())
    with OracleServer(ORACLE, delay_s=0.2) as server:
        rows = _run(tmp_path, "gated", _frontier(server, limit="test-frontier-two", in_flight=8))
        in_flight = server.max_in_flight
    assert in_flight == 2
    assert (rows.filter(pl.col("label_confidence").is_not_null())["route"] == "frontier").all()


def test_a_missing_concurrency_limit_fails_the_run_before_any_shard(tmp_path: Path) -> None:
    with OracleServer(ORACLE) as server:
        with pytest.raises(ConcurrencyLimitMissingError, match="docroute setup"):
            _run(tmp_path, "nolimit", _frontier(server, limit="no-such-limit"))
        assert not server.chat_requests
    assert not (tmp_path / "out-nolimit" / "results").exists()


def test_runner_options_must_match_the_runner_kind() -> None:
    assert RunnerSpec().kind == "threads" and not RunnerSpec().distributed
    dask = RunnerSpec(kind="dask")
    assert dask.dask is not None and dask.dask.n_workers == 2 and dask.distributed
    assert RunnerSpec(kind="ray", ray={"num_gpus": 1}).ray.num_gpus == 1
    with pytest.raises(ValidationError, match=r"runner\.dask options are set but runner\.kind is .threads."):
        RunnerSpec(dask={"address": "tcp://scheduler:8786"})
    with pytest.raises(ValidationError):
        RunnerSpec(kind="spark")


def test_allowances_never_promise_more_than_the_cap() -> None:
    book = AllowanceBook(limit_usd=1.0, slots=2)
    first, second = book.grant(0), book.grant(1)
    assert first == pytest.approx(0.5) and second == pytest.approx(0.5)
    book.settle(0, 0.1)  # spent 0.1 of its 0.5: 0.4 comes back
    assert book.grant(2) == pytest.approx(0.4)
    book.settle(1, None)  # failed: its whole allowance counts as spent
    assert book.grant(3) == pytest.approx(0.0)
    book.settle(2, 0.4)
    book.settle(3, 0.0)
    assert book.spent_usd == pytest.approx(1.0) and book.grant(4) == 0.0


def test_a_local_ray_writes_the_same_rows_as_threads(tmp_path: Path) -> None:
    threads = _run(tmp_path, "threads", "runner: {kind: threads, max_workers: 2}\n")
    ray_runner = "runner: {kind: ray, max_workers: 2, ray: {num_cpus: 1, num_gpus: 0}}\n"
    ray, summary = _run_with_summary(tmp_path, "ray", ray_runner, shard_size=2)
    assert ray.select(COMPARED).equals(threads.select(COMPARED))
    assert len(summary.parts) >= 5 and 1 <= summary.worker_processes <= 2
    assert summary.engines_built == summary.worker_processes  # Ray keeps its workers: one load each
