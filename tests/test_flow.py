"""process_documents end to end: real files, the real embedded model, a real Prefect API and real HTTP frontier."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import polars as pl
import pyarrow.parquet as pq
import pytest
from corpus import COOKING, SPORTS, WEATHER, build_topic_corpus, topic_job_yaml
from oracle_server import OracleServer

from docroute.flows.process import process_documents
from docroute.schemas.load import load_job
from docroute.schemas.rows import result_schema
from docroute.schemas.summary import RunSummary

pytestmark = pytest.mark.usefixtures("prefect_server")


def _run(tmp_path: Path, extra: str = "", name: str = "job") -> tuple[RunSummary, pl.DataFrame, dict]:
    source = tmp_path / "docs"
    gold = build_topic_corpus(source) if not source.exists() else None
    job = tmp_path / f"{name}.yaml"
    job.write_text(topic_job_yaml(source, tmp_path / f"out-{name}", extra=extra), encoding="utf-8")
    summary = process_documents(str(job))
    rows = pl.read_parquet(f"{tmp_path}/out-{name}/results/**/*.parquet")
    return summary, rows, gold or {}


def _key(row: dict) -> str:
    name = row["source_uri"].rsplit("/", 1)[-1]
    return f"{name}#{row['record_key']}" if row["record_key"] else name


def test_every_document_becomes_exactly_one_typed_row(tmp_path: Path) -> None:
    summary, rows, gold = _run(tmp_path)
    assert sorted(_key(r) for r in rows.to_dicts()) == sorted(gold)
    assert rows["doc_id"].n_unique() == rows.height == summary.documents == len(gold)
    by_key = {_key(r): r for r in rows.to_dicts()}
    for key, label in gold.items():
        row = by_key[key]
        assert row["route_reason"], key
        if label is None:
            assert row["route"] == "error" and row["error"], key
            assert row["label"] is None
        else:
            assert row["route"] in ("small", "deferred"), key
            assert row["label"] in ("sports", "weather", "cooking")
            assert 0 < row["label_confidence"] <= 1 and row["small_model"].startswith("llamacpp:")
            assert json.loads(row["small_answer"])["label"] == row["label"]
    correct = sum(by_key[k]["label"] == v for k, v in gold.items() if v)
    assert correct >= 6, {k: by_key[k]["label"] for k in gold}
    reasons = {k: by_key[k]["error"] for k, v in gold.items() if v is None}
    assert reasons["corrupt.pdf"].startswith("pdf_corrupt")
    assert reasons["junk.txt"].startswith("binary")
    assert reasons["empty.txt"].startswith("empty")
    assert reasons["big.txt"].startswith("too_large")
    assert reasons["notes.xyz"].startswith("unsupported_format")
    assert reasons["records.jsonl#r3"].startswith("json_missing_text")
    # no frontier: every escalation is deferred with the small model's answer, never dropped
    deferred = rows.filter(pl.col("route") == "deferred")
    assert all("no frontier configured" in r for r in deferred["route_reason"])
    assert deferred["final_model"].str.starts_with("llamacpp:").all()
    # the written file has exactly the schema derived from the spec, and both engines read it typed
    spec = load_job(tmp_path / "job.yaml")
    part = next(Path(tmp_path / "out-job" / "results").rglob("*.parquet"))
    assert pq.read_schema(part).remove_metadata() == result_schema(spec).remove_metadata()
    assert rows.schema["label"] == pl.Categorical and rows.schema["processed_at"] == pl.Datetime("us", "UTC")
    described = {
        name: kind for name, kind, *_ in duckdb.sql(f"describe select * from read_parquet('{part}')").fetchall()
    }
    assert described["processed_at"] == "TIMESTAMP WITH TIME ZONE" and described["truncated"] == "BOOLEAN"
    assert described["label"] == "VARCHAR" and described["label_confidence"] == "DOUBLE"


INVOICES = {
    "inv-1.txt": "Northwind Office Supply\nInvoice No: NW-20931\nDate: 14/03/2024\nPaid: yes\n"
    "Paper 4 $263.17\nTOTAL DUE: $351.27 USD\n",
    "inv-2.md": "# Blue Heron Bakery\n\nInvoice No: BH-0042  \nDate: 02/04/2024  \nPaid: no  \n"
    "Croissants 12 €40.00  \nTOTAL DUE: €86.40 EUR\n",
}


def test_extraction_writes_one_typed_column_per_field(tmp_path: Path) -> None:
    source = tmp_path / "invoices"
    source.mkdir()
    for name, text in INVOICES.items():
        (source / name).write_text(text, encoding="utf-8")
    job = tmp_path / "extract.yaml"
    job.write_text(
        f"""name: invoices
source: {{url: {source}}}
task:
  extract:
    fields:
      - {{name: vendor, type: str}}
      - {{name: invoice_number, type: str, required: false}}
      - {{name: invoice_date, type: date}}
      - {{name: total, type: decimal, precision: 12, scale: 2}}
      - {{name: currency, type: enum, values: [USD, EUR, GBP]}}
      - {{name: paid, type: bool, required: false}}
      - {{name: lines, type: int, required: false}}
    examples:
      - text: "Harbourside Stationers\\nInvoice No: HS-1188\\nDate: 05/02/2024\\nPaid: yes\\nTOTAL DUE: $31.36 USD"
        values: {{vendor: Harbourside Stationers, invoice_number: HS-1188, invoice_date: 05/02/2024,
                  total: "31.36", currency: USD, paid: true}}
routing: {{threshold: 0.0}}
output: {{url: {tmp_path / "out"}}}
""",
        encoding="utf-8",
    )
    summary = process_documents(str(job))
    assert summary.documents == 2 and summary.error == 0
    rows = pl.read_parquet(f"{tmp_path}/out/results/**/*.parquet").sort("source_uri")
    assert rows.schema["total"] == pl.Decimal(12, 2)
    assert rows.schema["invoice_date"] == pl.Date
    assert rows.schema["currency"] == pl.Categorical
    assert rows.schema["paid"] == pl.Boolean and rows.schema["lines"] == pl.Int64
    assert rows.schema["total_confidence"] == pl.Float64
    from datetime import date
    from decimal import Decimal

    assert rows["invoice_date"].to_list() == [date(2024, 3, 14), date(2024, 4, 2)]
    totals = rows["total"].to_list()  # which amount a 270M model picks is tested in test_llamacpp_engine
    assert totals[0] == Decimal("351.27")
    assert all(isinstance(t, Decimal) and t.as_tuple().exponent == -2 for t in totals)
    assert rows["currency"].cast(pl.String).to_list() == ["USD", "EUR"]
    part = next((tmp_path / "out" / "results").rglob("*.parquet"))
    described = {
        name: kind for name, kind, *_ in duckdb.sql(f"describe select * from read_parquet('{part}')").fetchall()
    }
    assert described["total"] == "DECIMAL(12,2)" and described["invoice_date"] == "DATE"


def test_ledger_and_manifest_match_the_rows(tmp_path: Path) -> None:
    summary, rows, _ = _run(tmp_path)
    manifest = json.loads(Path(summary.manifest).read_text())
    assert sum(p["rows"] for p in manifest["parts"]) == rows.height
    assert {Path(p["url"]).name for p in manifest["parts"]} == {
        Path(p).name for p in Path(tmp_path / "out-job" / "results").rglob("*.parquet")
    }
    costs = pl.read_parquet(summary.costs)
    small = costs.filter(pl.col("role") == "small")
    assert small["documents"].sum() == rows.height
    assert small["input_tokens"].sum() == rows["small_input_tokens"].sum()
    assert abs(small["engine_seconds"].sum() - rows["engine_seconds"].sum()) < 1e-6
    run = pl.read_parquet(summary.runs).to_dicts()[0]
    assert run["documents"] == rows.height
    for route in ("small", "frontier", "deferred", "error"):
        assert run[route] == rows.filter(pl.col("route") == route).height
    assert run["all_frontier_usd"] is None  # no frontier configured: no counterfactual
    assert costs["all_frontier_usd"].null_count() == costs.height


def _frontier_block(server: OracleServer, *, threshold: float, cap: str = "null", retries: int = 0) -> str:
    return f"""frontier:
  provider: openai_compatible
  model: oracle-1
  base_url: {server.base_url}
  api_key: sk-test
  price: {{input_per_million: 100.0, output_per_million: 400.0}}
  max_retries: {retries}
  timeout_s: 5
routing:
  threshold: {threshold}
  max_frontier_usd: {cap}
"""


ORACLE = [(SPORTS, {"label": "sports"}), (WEATHER, {"label": "weather"}), (COOKING, {"label": "cooking"})]


def test_low_confidence_rows_are_answered_by_the_frontier(tmp_path: Path) -> None:
    with OracleServer(ORACLE) as server:
        summary, rows, gold = _run(tmp_path, _frontier_block(server, threshold=1.0))
        calls = len(server.chat_requests)
    readable = [k for k, v in gold.items() if v]
    assert summary.frontier == len(readable) == calls
    by_key = {_key(r): r for r in rows.to_dicts()}
    for key in readable:
        row = by_key[key]
        assert row["route"] == "frontier" and row["final_model"] == "openai_compatible:oracle-1"
        assert row["label"] == gold[key]  # the oracle knows the answers
        assert row["frontier_input_tokens"] > 0 and row["frontier_cost_usd"] > 0
        assert row["cost_usd"] == pytest.approx(row["small_cost_usd"] + row["frontier_cost_usd"])
        assert json.loads(row["small_answer"])["label"] in ("sports", "weather", "cooking")
    costs = pl.read_parquet(summary.costs)
    frontier_spend = costs.filter(pl.col("role") == "frontier")["cost_usd"].sum()
    assert frontier_spend == pytest.approx(rows["frontier_cost_usd"].sum())
    assert summary.frontier_cost_usd == pytest.approx(frontier_spend)
    assert summary.all_frontier_usd >= frontier_spend > 0
    assert costs["all_frontier_usd"].sum() == pytest.approx(summary.all_frontier_usd)
    labels = pl.read_parquet(f"{tmp_path}/out-job/labels/**/*.parquet")  # every frontier answer kept as a label
    assert labels.height == len(readable) and set(labels["kind"]) == {"escalation"}
    assert set(labels["model"]) == {"openai_compatible:oracle-1"}
    assert {_key(r): r["label"] for r in labels.to_dicts()} == {key: gold[key] for key in readable}
    assert labels.schema["label"] == rows.schema["label"]  # typed like the results
    texts = {_key(r): r["text"] for r in labels.to_dicts()}
    assert SPORTS in texts["a.txt"] and WEATHER in texts["b.md"]  # the text the models saw, kept with its label


def test_budget_cap_defers_the_rest_and_is_never_exceeded(tmp_path: Path) -> None:
    from docroute.engines.base import Request
    from docroute.tasks.model.infer import frontier_engine

    with OracleServer(ORACLE) as server:
        job = tmp_path / "probe.yaml"
        job.write_text(topic_job_yaml(tmp_path, tmp_path / "o", extra=_frontier_block(server, threshold=1.0)))
        spec = load_job(job)
        # the budget is drawn per call: what one call may cost, its answer bounded by the label set
        bound = frontier_engine(spec).answer_bound(Request("x", max(SPORTS, WEATHER, COOKING, key=len)))
        one_call = spec.frontier.unit_price.cost_usd(bound.input_tokens, bound.output_tokens)
        cap = round(one_call * 1.5, 6)
        summary, rows, _ = _run(tmp_path, _frontier_block(server, threshold=1.0, cap=str(cap)))
    spent = rows["frontier_cost_usd"].sum()
    assert spent <= cap
    assert spent >= cap - one_call  # deferred only once what is left could not pay for one more call
    assert summary.frontier >= 2
    budget_deferred = rows.filter(pl.col("route_reason").str.contains("budget exhausted"))
    assert budget_deferred.height >= 1 and (budget_deferred["route"] == "deferred").all()
    assert budget_deferred["label"].is_not_null().all()  # the small model's answer is kept


def test_frontier_failures_defer_or_error_but_never_lose_rows(tmp_path: Path) -> None:
    with OracleServer(ORACLE, faults=["500"] * 200) as server:
        _, rows, gold = _run(tmp_path, _frontier_block(server, threshold=1.0), name="down")
    readable = {k for k, v in gold.items() if v}
    by_key = {_key(r): r for r in rows.to_dicts()}
    assert rows.height == len(gold)
    for key in readable:
        assert by_key[key]["route"] == "deferred", by_key[key]["route_reason"]
        assert "will retry" in by_key[key]["route_reason"]
    with OracleServer(ORACLE, faults=["invalid"] * 200) as server:
        _, rows, _ = _run(tmp_path, _frontier_block(server, threshold=1.0), name="invalid")
    by_key = {_key(r): r for r in rows.to_dicts()}
    for key in readable:
        assert by_key[key]["route"] == "error" and "invalid answer" in by_key[key]["error"]
        assert by_key[key]["label"] is None


def test_run_publishes_keyed_artifacts(tmp_path: Path) -> None:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    _run(tmp_path)

    async def read() -> set[str]:
        async with get_client() as client:
            keys = ["topics-summary", "topics-costs", "topics-progress", "topics-output"]
            artifacts = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
            return {a.key for a in artifacts}

    assert asyncio.run(read()) == {"topics-summary", "topics-costs", "topics-progress", "topics-output"}


def test_batch_mode_defers_then_a_later_run_collects(tmp_path: Path) -> None:
    source, empty, output = tmp_path / "docs", tmp_path / "nothing-new", tmp_path / "out"
    gold = build_topic_corpus(source)
    empty.mkdir()
    readable = {k for k, v in gold.items() if v}

    def job(src: Path, server: OracleServer) -> str:
        path = tmp_path / f"batch-{src.name}.yaml"
        block = f"""frontier:
  provider: openai
  model: gpt-4o-mini
  base_url: {server.base_url}
  api_key: sk-test
  mode: batch
  max_retries: 0
routing:
  threshold: 1.0
"""
        path.write_text(topic_job_yaml(src, output, extra=block), encoding="utf-8")
        return str(path)

    with OracleServer(ORACLE) as server:
        server.hold_batches = True
        first = process_documents(job(source, server))
        assert first.deferred == len(readable) and first.frontier == 0
        assert len(server.batches) == 1 and not server.chat_requests  # nothing sent synchronously
        (batch,) = server.batches.values()
        assert batch["endpoint"] == "/v1/chat/completions" and batch["completion_window"] == "24h"
        lines = server.files[batch["input_file_id"]]["content"].decode().splitlines()
        assert len(lines) == len(readable)
        assert all(json.loads(line)["body"]["response_format"]["type"] == "json_schema" for line in lines)
        state = json.loads(next((output / "state" / "frontier_batches").glob("*.json")).read_text())
        assert state["status"] == "submitted" and len(state["requests"]) == len(readable)
        assert not list((output / "state" / "frontier_batches" / "staging").rglob("*.jsonl"))

        waiting = process_documents(job(empty, server))  # still in progress: nothing changes
        assert waiting.documents == 0

        server.complete_batches()
        collected = process_documents(job(empty, server))
        price = load_job(Path(job(empty, server))).frontier.unit_price
    assert collected.frontier == len(readable) and collected.documents == len(readable)
    rows = pl.read_parquet(f"{output}/results/**/*.parquet")
    latest = rows.sort("processed_at").group_by("doc_id").last()
    assert latest.height == len(gold)
    by_key = {_key(r): r for r in latest.to_dicts()}
    for key in readable:
        row = by_key[key]
        assert row["route"] == "frontier" and row["label"] == gold[key]
        assert row["route_outcome"] == "answered_by_frontier"
        assert row["final_model"] == "openai:gpt-4o-mini" and "frontier batch batch_1" in row["route_reason"]
        expected = price.cost_usd(row["frontier_input_tokens"], row["frontier_output_tokens"], batch=True)
        assert row["frontier_cost_usd"] == pytest.approx(expected)
    first_rows = rows.sort("processed_at").group_by("doc_id").first()
    assert set(first_rows.filter(pl.col("route") == "deferred")["route_outcome"]) == {"queued"}
    state = json.loads(next((output / "state" / "frontier_batches").glob("*.json")).read_text())
    assert state["status"] == "collected" and state["batch_status"] == "completed"
    labels = pl.read_parquet(f"{output}/labels/**/*.parquet")  # a batch's answers become labels when collected
    assert {_key(r): r["label"] for r in labels.to_dicts()} == {key: gold[key] for key in readable}
    assert set(labels["kind"]) == {"escalation"} and labels["text"].null_count() == 0


def test_audits_check_kept_rows_and_warn_when_agreement_is_low(tmp_path: Path) -> None:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    everything_is_cooking = [(text, {"label": "cooking"}) for text in (SPORTS, WEATHER, COOKING)]
    with OracleServer(everything_is_cooking) as server:
        extra = _frontier_block(server, threshold=0.0).replace("routing:\n", "routing:\n  audit_fraction: 1.0\n")
        summary, rows, gold = _run(tmp_path, extra, name="audit")
    readable = {k for k, v in gold.items() if v}
    by_key = {_key(r): r for r in rows.to_dicts()}
    assert summary.audited == len(readable) == rows["audited"].sum()
    for key in readable:
        row = by_key[key]
        small_label = json.loads(row["small_answer"])["label"]
        assert row["audit_agrees"] == (small_label == "cooking")
        assert row["route"] == ("small" if small_label == "cooking" else "frontier")
        assert row["label"] == "cooking" and row["frontier_cost_usd"] > 0
    assert summary.audit_agreement == pytest.approx(rows["audit_agrees"].sum() / len(readable))
    assert summary.audit_agreement < 0.95
    labels = pl.read_parquet(f"{tmp_path}/out-audit/labels/**/*.parquet")
    assert labels.height == len(readable) and set(labels["kind"]) == {"audit"}
    assert set(labels["label"]) == {"cooking"}  # the frontier's answer, agreeing or not

    async def keys() -> set[str]:
        async with get_client() as client:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["topics-audit-warning"]))
            )
            return {a.key for a in found}

    assert asyncio.run(keys()) == {"topics-audit-warning"}
