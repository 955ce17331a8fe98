"""The distillation loop: frontier answers become labels, `docroute train` refits the head, escalations fall.

Everything real: the packaged Gemma 3 270M under llama.cpp embeds the texts, an OpenAI-compatible server on
127.0.0.1 plays the frontier (it knows each document's gold label by its reference), Prefect runs the flows.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from oracle_server import OracleServer

from docroute.flows.calibrate import calibrate
from docroute.flows.process import process_documents
from docroute.flows.train import train
from docroute.schemas.load import load_job
from docroute.tasks.account.trend import read_run_records, version_trend
from docroute.tasks.learn.training import TrainingDataError, finetune_lines, latest_per_document, split_labels
from docroute.tasks.route.router import load_router

pytestmark = pytest.mark.usefixtures("prefect_server")

PHRASES = {
    "sports": [
        "the striker scored twice",
        "a late penalty decided the derby",
        "the goalkeeper made a fine save",
        "the relay team broke the record",
        "the tennis final went to five sets",
        "the coach named an unchanged side",
        "the cyclists climbed the mountain stage",
        "fans filled the stadium",
    ],
    "weather": [
        "heavy rain is expected overnight",
        "a cold front moves in from the west",
        "fog will clear by late morning",
        "strong winds may bring down trees",
        "temperatures drop below freezing",
        "the heatwave continues into the weekend",
        "snow showers reach the hills",
        "a flood warning was issued for the valley",
    ],
    "cooking": [
        "simmer the sauce until it thickens",
        "knead the dough for ten minutes",
        "roast the chicken with lemon and thyme",
        "whisk the eggs with a pinch of salt",
        "fry the onions until golden",
        "season the soup to taste",
        "rest the meat before carving",
        "fold the flour into the batter",
    ],
    "finance": [
        "shares fell after the profit warning",
        "the central bank held interest rates",
        "the bond market rallied",
        "quarterly revenue beat forecasts",
        "the currency slipped against the dollar",
        "investors sold technology stocks",
        "the company announced a dividend cut",
        "inflation rose for a third month",
    ],
}
FILLERS = ["on Tuesday", "local reports say", "as expected", "in the north", "this week", "officials said"]


def _document(rng: random.Random, label: str, reference: str) -> str:
    """Two phrases of the topic and one of another, so a handful of examples leaves the small model unsure."""
    other = rng.choice([name for name in PHRASES if name != label])
    parts = [*rng.sample(PHRASES[label], 2), rng.choice(PHRASES[other])]
    rng.shuffle(parts)
    return f"{parts[0].capitalize()}, {rng.choice(FILLERS)}; {parts[1]} and {parts[2]}. Ref {reference}."


def _corpus(folder: Path, start: int, count: int, gold: dict[str, str]) -> None:
    rng = random.Random(start)
    folder.mkdir(parents=True)
    for i in range(start, start + count):
        label = list(PHRASES)[i % len(PHRASES)]
        reference = f"R{i:05d}"
        (folder / f"doc-{i:05d}.txt").write_text(_document(rng, label, reference) + "\n", encoding="utf-8")
        gold[reference] = label


def _job(path: Path, source: Path, output: Path, server: OracleServer) -> str:
    rng = random.Random(99)
    labels = "\n".join(
        f"      - name: {name}\n        examples:\n"
        + "\n".join(f"          - {json.dumps(_document(rng, name, 'X'))}" for _ in range(4))
        for name in PHRASES
    )
    path.write_text(
        f"""name: distil
source:
  url: {source}
task:
  instructions: Short news and recipe snippets.
  classify:
    labels:
{labels}
small_model:
  engine: llamacpp
  classify_strategy: embedding_head
frontier:
  provider: openai_compatible
  model: oracle-1
  base_url: {server.base_url}
  api_key: sk-test
  price: {{input_per_million: 1.0, output_per_million: 4.0}}
  max_retries: 0
routing:
  target_accuracy: 0.8
  delta: 0.2
  audit_fraction: 0.5
  max_frontier_usd: null
output:
  url: {output}
shard_size: 32
""",
        encoding="utf-8",
    )
    return str(path)


def _kept_accuracy(output: Path, run_id: str, gold: dict[str, str]) -> tuple[float, int]:
    rows = pl.read_parquet(f"{output}/results/**/*.parquet").filter(pl.col("run_id") == run_id)
    kept = rows.filter(pl.col("route") == "small")
    refs = ["R" + uri.rsplit("doc-", 1)[1].removesuffix(".txt") for uri in kept["source_uri"]]
    right = sum(label == gold[ref] for label, ref in zip(kept["label"].to_list(), refs, strict=True))
    return right / max(kept.height, 1), kept.height


def test_two_rounds_escalate_less_at_the_same_certified_accuracy(tmp_path: Path) -> None:
    gold: dict[str, str] = {}
    first, second, output = tmp_path / "round1", tmp_path / "round2", tmp_path / "out"
    _corpus(first, 0, 200, gold)
    _corpus(second, 1000, 200, gold)
    with OracleServer([(f"Ref {ref}", {"label": label}) for ref, label in gold.items()]) as server:
        job1 = _job(tmp_path / "round1.yaml", first, output, server)
        job2 = _job(tmp_path / "round2.yaml", second, output, server)
        calibrate(job1, oracle="frontier", sample=80)  # round 0: a router for the head trained on the examples
        router0 = load_router(load_job(Path(job1)))
        assert router0 is not None and router0.head_version is None
        run1 = process_documents(job1)
        result = train(job1)
        router1 = load_router(load_job(Path(job2)))
        run2 = process_documents(job2)
        calibrate(job2, oracle="frontier", sample=40)  # recalibrating certifies the promoted head, not the old one
        recalibrated = load_router(load_job(Path(job2)))

    labels = pl.read_parquet(f"{output}/labels/**/*.parquet").filter(pl.col("run_id") == run1.run_id)
    assert labels.height == run1.frontier + run1.audited - _audited_and_replaced(output, run1.run_id)
    assert result["holdout"] >= 60 and result["train_labels"] > 0
    comparison = result["comparison"]
    assert comparison["current"]["target_accuracy"] == comparison["candidate"]["target_accuracy"] == 0.8
    assert result["promoted"], result["decision"]
    assert comparison["candidate"]["escalation_rate"] < comparison["current"]["escalation_rate"]
    assert comparison["candidate"]["lower_bound"] >= 0.8  # the promoted head's certificate meets the target

    assert router1 is not None and router1.head_version == result["version"] == router1.version
    assert Path(result["head"]).exists() and run2.router_version == router1.version
    assert run2.head_version == router1.head_version and run1.head_version is None
    assert recalibrated is not None and recalibrated.version != router1.version
    assert recalibrated.head_version == router1.head_version

    escalation1 = (run1.frontier + run1.deferred - _audited_and_replaced(output, run1.run_id)) / 200
    escalation2 = (run2.frontier + run2.deferred - _audited_and_replaced(output, run2.run_id)) / 200
    assert escalation2 < escalation1, (escalation1, escalation2)
    assert run1.escalation_rate == pytest.approx(escalation1) and run2.escalation_rate == pytest.approx(escalation2)
    trend = version_trend(read_run_records(load_job(Path(job2))))  # the ledger by version, as the UI shows it
    assert [(t["router_version"], t["runs"], t["documents"]) for t in trend] == [
        (router0.version, 1, 200),
        (router1.version, 1, 200),
    ]
    assert trend[1]["head_version"] == router1.head_version
    assert [t["escalation_rate"] for t in trend] == pytest.approx([escalation1, escalation2], abs=1e-4)
    assert trend[1]["cost_per_1k_docs_usd"] < trend[0]["cost_per_1k_docs_usd"]
    assert "distil-versions" in _artifact_keys()
    accuracy2, kept2 = _kept_accuracy(output, run2.run_id, gold)
    assert kept2 > 0 and accuracy2 >= 0.8, (accuracy2, kept2)

    finetune = [json.loads(line) for line in Path(result["finetune"]["train"]).read_text().splitlines()]
    assert len(finetune) == result["train_labels"]
    assert [m["role"] for m in finetune[0]["messages"]] == ["system", "user", "assistant"]
    reference = finetune[0]["messages"][1]["content"].rsplit("Ref ", 1)[1].split(".")[0]
    assert json.loads(finetune[0]["messages"][2]["content"]) == {"label": gold[reference]}


def _artifact_keys() -> set[str]:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def keys() -> set[str]:
        async with get_client() as client:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["distil-versions", "distil-training"]))
            )
            return {a.key for a in found}

    return asyncio.run(keys())


def _audited_and_replaced(output: Path, run_id: str) -> int:
    """Audited rows whose answer the frontier replaced count under route frontier but were not escalated."""
    rows = pl.read_parquet(f"{output}/results/**/*.parquet").filter(pl.col("run_id") == run_id)
    return rows.filter((pl.col("route") == "frontier") & pl.col("audited").fill_null(False)).height


def test_labels_are_deduplicated_and_the_audit_sample_is_held_out(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(
        f"""name: split
source: {{url: {tmp_path}}}
task:
  classify:
    labels: [{{name: a}}, {{name: b}}]
frontier: {{provider: openai, model: gpt-4o-mini, api_key: k}}
routing: {{audit_fraction: 0.5}}
output: {{url: {tmp_path / "out"}}}
""",
        encoding="utf-8",
    )
    spec = load_job(job)
    ids = [f"{i:032x}" for i in (0, 1 << 124, 9 << 124, 15 << 124)]  # first two in the audit half, last two not
    frame = pl.DataFrame(
        {
            "doc_id": [ids[0], ids[1], ids[2], ids[3], ids[2], ids[3]],
            "content_sha256": ["c0", "c1", "c2", "c3", "c2", "c4"],
            "processed_at": [1, 1, 1, 1, 2, 1],
            "text": ["zero", "one", "two", "one", "two again", "renamed"],
            "kind": ["audit", "escalation", "escalation", "escalation", "escalation", "escalation"],
            "model": ["m"] * 6,
            "label": ["a", "b", "a", "b", "b", "old-label"],
        }
    )
    assert latest_per_document(frame, ["label"]).height == 5  # c2 answered twice: the later answer wins
    split = split_labels(spec, frame)
    assert split.unknown_labels == 1  # a label the job no longer defines is not trained on
    assert split.distinct == 4 and [t for t, _ in split.holdout] == ["zero", "one"]
    assert split.train == [("two again", {"label": "b"})]  # "one" under another id is a held-out copy: dropped
    assert split.dropped_as_copies == 1
    lines = [json.loads(line) for line in finetune_lines(spec, split.train)]
    assert lines[0]["messages"][-1] == {"role": "assistant", "content": '{"label": "b"}'}
    assert "two again" in lines[0]["messages"][1]["content"]


def test_training_without_an_audit_sample_says_why(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(
        f"""name: noaudit
source: {{url: {tmp_path}}}
task:
  classify:
    labels: [{{name: a}}, {{name: b}}]
output: {{url: {tmp_path / "out"}}}
""",
        encoding="utf-8",
    )
    with pytest.raises(TrainingDataError, match="audit_fraction"):
        train(str(job))
    batch = tmp_path / "batch.yaml"
    batch.write_text(
        job.read_text(encoding="utf-8").replace(
            "output:",
            "frontier: {provider: openai, model: gpt-4o-mini, api_key: k, mode: batch}\n"
            "routing: {audit_fraction: 0.2}\noutput:",
        ),
        encoding="utf-8",
    )
    with pytest.raises(TrainingDataError, match="synchronous"):  # batch mode never audits: no unbiased held-out
        train(str(batch))
    assert not np.any([p.exists() for p in (tmp_path / "out" / "router.json",)])


def test_an_extraction_job_exports_a_chat_finetuning_set(tmp_path: Path) -> None:
    import datetime as dt
    from decimal import Decimal

    import pyarrow as pa
    import pyarrow.parquet as pq

    job = tmp_path / "job.yaml"
    job.write_text(
        f"""name: invoices
source: {{url: {tmp_path / "docs"}}}
task:
  extract:
    fields:
      - {{name: vendor, type: str}}
      - {{name: invoice_date, type: date}}
      - {{name: total, type: decimal, precision: 12, scale: 2}}
frontier: {{provider: openai, model: gpt-4o-mini, api_key: k}}
routing: {{audit_fraction: 0.5}}
output: {{url: {tmp_path / "out"}}}
""",
        encoding="utf-8",
    )
    folder = tmp_path / "out" / "labels" / "run_date=2026-11-28"
    folder.mkdir(parents=True)
    ids = [f"{i:032x}" for i in (0, 15 << 124)]  # one held out (audit sample), one to train on
    pq.write_table(
        pa.table(
            {
                "doc_id": ids,
                "content_sha256": ["c0", "c1"],
                "processed_at": pa.array([dt.datetime(2026, 11, 28, tzinfo=dt.UTC)] * 2, pa.timestamp("us", "UTC")),
                "text": ["Invoice from ACME, 3 March 2026, total 12.50", "Globex invoice 1/2/2026 due 99.00"],
                "kind": ["audit", "escalation"],
                "model": ["openai:gpt-4o-mini"] * 2,
                "vendor": ["ACME", "Globex"],
                "invoice_date": pa.array([dt.date(2026, 3, 3), dt.date(2026, 2, 1)], pa.date32()),
                "total": pa.array([Decimal("12.50"), Decimal("99.00")], pa.decimal128(12, 2)),
            }
        ),
        folder / "labels-run-00000.parquet",
    )
    result = train(str(job))
    assert result["promoted"] is False and "fewer than 30" in result["decision"]
    (train_line,) = Path(result["finetune"]["train"]).read_text().splitlines()
    (holdout_line,) = Path(result["finetune"]["holdout"]).read_text().splitlines()
    messages = json.loads(train_line)["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert "Globex invoice" in messages[1]["content"] and "invoice_date" in messages[0]["content"]
    assert json.loads(messages[2]["content"]) == {"vendor": "Globex", "invoice_date": "2026-02-01", "total": "99.00"}
    assert json.loads(json.loads(holdout_line)["messages"][2]["content"])["vendor"] == "ACME"
    report = json.loads((tmp_path / "out" / "training" / result["version"] / "report.json").read_text())
    assert report["train_labels"] == 1 and report["holdout"] == 1

    from typer.testing import CliRunner

    from docroute.flows.cli import app

    printed = CliRunner().invoke(app, ["train", str(job)])  # the same round from the command line
    assert printed.exit_code == 0, printed.output
    assert "2 labels (2 distinct), trained on 0 examples + 1 labels, 1 held out" in printed.output
    assert "fine-tuning set: " in printed.output and "train.jsonl" in printed.output


def test_the_version_trend_reads_runs_written_before_it_existed() -> None:
    import datetime as dt

    start = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    runs = pl.DataFrame(
        {
            "run_id": ["a", "b", "c"],
            "started_at": [start, start + dt.timedelta(days=1), start + dt.timedelta(days=2)],
            "documents": [100, 100, 200],
            "frontier": [60, 50, 40],
            "deferred": [0, 10, 0],
            "cost_usd": [0.6, 0.6, 0.4],
            "frontier_cost_usd": [0.6, 0.6, 0.4],
            "router_version": [None, None, "r2"],
        }
    )  # the first runs' rows predate head_version and escalated: their frontier + deferred rows count
    trend = version_trend(runs.with_columns(pl.Series("head_version", [None, None, "r2"], pl.String)))
    assert [(t["router_version"], t["runs"], t["documents"], t["escalation_rate"]) for t in trend] == [
        ("none (job thresholds)", 2, 200, 0.6),
        ("r2", 1, 200, 0.2),
    ]
    assert trend[0]["cost_per_1k_docs_usd"] == pytest.approx(6.0) and trend[1]["cost_per_1k_docs_usd"] == 2.0
    assert version_trend(runs)[1]["head_version"] == "from the job's examples"


def test_an_extraction_round_fits_rankers_and_promotes_them_only_when_they_escalate_less(tmp_path: Path) -> None:
    """Worked examples give today's rankers; the frontier's answers train candidates certified on the audit sample."""
    import datetime as dt
    from decimal import Decimal

    import pyarrow as pa
    import pyarrow.parquet as pq
    from test_ranker import receipts

    from docroute.engines.extract.extractor import ExtractMethod
    from docroute.schemas.load import load_job
    from docroute.tasks.model.infer import small_engine

    worked = tmp_path / "worked.jsonl"
    worked.write_text(
        "\n".join(json.dumps({"text": t, "values": v}, default=str) for t, v in receipts(seed=1, count=20)),
        encoding="utf-8",
    )
    job = tmp_path / "job.yaml"
    job.write_text(
        f"""name: receipts
source: {{url: {tmp_path / "docs"}}}
task:
  extract:
    examples_file: {worked}
    fields:
      - {{name: company, type: str}}
      - {{name: date, type: date}}
      - {{name: total, type: decimal, precision: 12, scale: 2}}
      - {{name: tip, type: decimal, precision: 12, scale: 2, required: false}}
frontier: {{provider: openai, model: gpt-4o-mini, api_key: k}}
routing: {{audit_fraction: 0.5, target_accuracy: 0.8, delta: 0.2}}
output: {{url: {tmp_path / "out"}}}
""",
        encoding="utf-8",
    )
    harvested = receipts(seed=5, count=160)
    rng = random.Random(3)
    folder = tmp_path / "out" / "labels" / "run_date=2026-11-28"
    folder.mkdir(parents=True)
    pq.write_table(
        pa.table(
            {
                "doc_id": [f"{rng.getrandbits(128):032x}" for _ in harvested],
                "content_sha256": [f"c{i}" for i in range(len(harvested))],
                "processed_at": pa.array(
                    [dt.datetime(2026, 11, 28, tzinfo=dt.UTC)] * len(harvested), pa.timestamp("us", "UTC")
                ),
                "text": [text for text, _ in harvested],
                "kind": ["escalation"] * len(harvested),
                "model": ["openai:gpt-4o-mini"] * len(harvested),
                "company": [gold["company"] for _, gold in harvested],
                "date": pa.array([dt.date.fromisoformat(gold["date"]) for _, gold in harvested], pa.date32()),
                "total": pa.array([Decimal(gold["total"]) for _, gold in harvested], pa.decimal128(12, 2)),
                "tip": pa.array([gold["tip"] for _, gold in harvested], pa.decimal128(12, 2)),
            }
        ),
        folder / "labels-run-00000.parquet",
    )
    spec = load_job(job)
    assert small_engine(spec).extraction_choice.method == ExtractMethod.RANKER  # 20 worked examples: no LM

    result = train(str(job))
    comparison = result["comparison"]
    assert result["holdout"] >= 30 and result["train_labels"] >= 30 and result["train_examples"] == 20
    assert set(comparison["candidate"]) == {"company", "date", "total"}  # the required fields, each certified
    for name in ("current", "candidate"):
        assert 0 <= comparison[f"{name}_escalation"] <= 1 and 0 <= comparison[f"{name}_accuracy"] <= 1
    assert result["promoted"] == (comparison["candidate_escalation"] < comparison["current_escalation"])
    assert Path(spec.output.layout.ranker(result["version"])).is_file()
    router = json.loads((tmp_path / "out" / "router.json").read_text()) if result["promoted"] else None
    if router is not None:  # promoted: the next run's engine answers fields with the promoted rankers
        assert router["head_version"] == result["version"]
        engine = small_engine(spec, result["version"])
        assert "promoted by docroute train" in engine.extraction_choice.why
    report = (tmp_path / "out" / "training" / result["version"] / "report.json").read_text()
    assert "candidate_escalation" in report


def test_candidate_rankers_are_promoted_only_when_fewer_rows_escalate() -> None:
    """The promotion rule itself, on answers whose rightness is known: a row escalates when any field does."""
    from docroute.schemas.spec import JobSpec
    from docroute.tasks.learn.training import compare_extractors

    spec = JobSpec.model_validate(
        {
            "name": "t",
            "source": {"url": "memory://docs"},
            "output": {"url": "memory://out"},
            "task": {"extract": {"fields": [{"name": "total", "type": "decimal"}, {"name": "vendor", "type": "str"}]}},
            "routing": {"target_accuracy": 0.9, "delta": 0.1},
        }
    )
    rng = random.Random(0)
    gold = [{"total": f"{i}.00", "vendor": f"SHOP {i}"} for i in range(400)]

    def answers(right_share: float) -> list[tuple[dict[str, object], dict[str, float | None]]]:
        rows = []
        for g in gold:
            right = rng.random() < right_share
            values = dict(g) if right else {"total": "0.01", "vendor": "WRONG"}
            confidence = rng.uniform(0.6, 1.0) if right else rng.uniform(0.0, 0.7)
            rows.append((values, {"total": confidence, "vendor": confidence}))
        return rows

    weak, strong = answers(0.6), answers(0.95)
    better = compare_extractors(spec, ["total", "vendor"], gold, weak, strong)
    assert better.promote and better.candidate_escalation < better.current_escalation
    assert better.candidate_accuracy > better.current_accuracy and "promoted the rankers" in better.reason
    worse = compare_extractors(spec, ["total", "vendor"], gold, strong, weak)
    assert not worse.promote and "kept the current extractor" in worse.reason
    failed = compare_extractors(spec, ["total", "vendor"], gold, strong, [None] * len(gold))  # every row failed
    assert failed.candidate_escalation == 1.0 and not failed.promote


def test_a_round_that_certifies_some_parts_refuses_a_whole_document_guarantee(tmp_path: Path) -> None:
    from docroute.flows.train import _refuse_partial_document_certificate

    job = tmp_path / "job.yaml"
    job.write_text(
        "name: receipts\nsource: {url: docs}\noutput: {url: out}\n"
        "task:\n  classify: {labels: [{name: receipt}, {name: other}]}\n"
        "  extract: {fields: [{name: total, type: decimal, required: true}]}\n"
        "routing: {guarantee_unit: document}\n",
        encoding="utf-8",
    )
    spec = load_job(job)
    with pytest.raises(TrainingDataError, match=r"guarantee_unit is document.*label, total together"):
        _refuse_partial_document_certificate(spec, ["label"])
    _refuse_partial_document_certificate(spec, ["label", "total"])  # every part: nothing to refuse
    per_part = spec.model_copy(update={"routing": spec.routing.model_copy(update={"guarantee_unit": "part"})})
    _refuse_partial_document_certificate(per_part, ["label"])
