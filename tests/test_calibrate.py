"""docroute calibrate end to end: labeled documents → certified thresholds → router.json → runs route with it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import polars as pl
import pytest
from corpus import TOPIC_EXAMPLES, topic_job_yaml

from docroute.flows.calibrate import calibrate
from docroute.flows.process import process_documents
from docroute.schemas.load import load_job
from docroute.tasks.route.router import load_router

pytestmark = pytest.mark.usefixtures("prefect_server")

SUBJECTS = {
    "sports": ["The striker", "Our goalkeeper", "The tennis champion", "The cyclist", "The relay team", "The coach"],
    "weather": ["Heavy rain", "A cold front", "Thick fog", "Strong winds", "A heatwave", "Snow showers"],
    "cooking": ["Whisk the eggs", "Simmer the sauce", "Knead the dough", "Roast the chicken", "Fry the onions"],
}
ENDINGS = {
    "sports": ["won the final", "scored in extra time", "lost the match", "broke the record", "trained all week"],
    "weather": ["is expected tonight", "will reach the coast", "will clear by noon", "may cause flooding"],
    "cooking": ["for ten minutes", "until golden", "then season to taste", "and serve it warm"],
}


def _labeled_corpus(folder: Path, count: int) -> Path:
    """Short topic sentences in files, and a CSV of their gold labels keyed by path."""
    rng = random.Random(7)
    folder.mkdir(parents=True)
    rows = ["path,label"]
    for i in range(count):
        label = ("sports", "weather", "cooking")[i % 3]
        text = f"{rng.choice(SUBJECTS[label])} {rng.choice(ENDINGS[label])}."
        (folder / f"doc-{i:03d}.txt").write_text(text + "\n", encoding="utf-8")
        rows.append(f"doc-{i:03d}.txt,{label}")
    labels = folder.parent / "labels.csv"
    labels.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return labels


def test_calibration_certifies_writes_a_router_and_runs_use_it(tmp_path: Path) -> None:
    assert TOPIC_EXAMPLES  # the job's few-shot examples come from the shared corpus module
    labels = _labeled_corpus(tmp_path / "docs", 90)
    job = tmp_path / "job.yaml"
    job.write_text(
        topic_job_yaml(tmp_path / "docs", tmp_path / "out", extra="routing: {target_accuracy: 0.8, delta: 0.2}\n"),
        encoding="utf-8",
    )
    result = calibrate(str(job), labels=str(labels))
    router = result["router"]
    spec = load_job(job)
    assert router.spec_hash == spec.spec_hash() and router.sample_size == 90
    cert = router.certificates["label"]
    assert cert.n == 90 and cert.target_accuracy == 0.8 and cert.delta == pytest.approx(0.2)
    if cert.threshold is not None:  # the guarantee's evidence is consistent
        assert cert.lower_bound >= 0.8 and cert.kept_accuracy >= cert.lower_bound
    assert (tmp_path / "out" / "router.json").exists()
    assert json.loads((tmp_path / "out" / f"routers/router-{router.version}.json").read_text())["version"] == (
        router.version
    )
    assert load_router(spec).version == router.version

    summary = process_documents(str(job))
    rows = pl.read_parquet(f"{tmp_path}/out/results/**/*.parquet")
    assert (rows["router_version"] == router.version).all()
    kept = rows.filter(pl.col("route") == "small")
    if cert.threshold is None:
        assert kept.height == 0 and summary.deferred == 90
    else:
        assert (kept["label_confidence"] >= cert.threshold).all()
        escalated = rows.filter(pl.col("route") == "deferred")
        assert (escalated["label_confidence"] < cert.threshold).all()


def test_unreachable_target_escalates_everything(tmp_path: Path) -> None:
    labels = _labeled_corpus(tmp_path / "docs", 12)
    job = tmp_path / "job.yaml"
    job.write_text(
        topic_job_yaml(tmp_path / "docs", tmp_path / "out", extra="routing: {target_accuracy: 0.99, delta: 0.01}\n"),
        encoding="utf-8",
    )
    router = calibrate(str(job), labels=str(labels))["router"]
    assert router.certificates["label"].threshold is None and not router.meets_target
    summary = process_documents(str(job))
    assert summary.small == 0 and summary.deferred == 12
    rows = pl.read_parquet(f"{tmp_path}/out/results/**/*.parquet")
    assert rows["route_reason"].str.contains("no certified threshold").all()


def test_a_changed_task_ignores_the_old_router(tmp_path: Path) -> None:
    labels = _labeled_corpus(tmp_path / "docs", 12)
    job = tmp_path / "job.yaml"
    job.write_text(topic_job_yaml(tmp_path / "docs", tmp_path / "out"), encoding="utf-8")
    calibrate(str(job), labels=str(labels))
    changed = tmp_path / "changed.yaml"
    changed.write_text(
        topic_job_yaml(tmp_path / "docs", tmp_path / "out").replace("Short news and recipe", "Brief news and recipe"),
        encoding="utf-8",
    )
    process_documents(str(changed))
    rows = pl.read_parquet(f"{tmp_path}/out/results/**/*.parquet")
    assert rows["router_version"].is_null().all()


def test_evaluate_writes_report_with_gold_and_with_real_frontier_calls(tmp_path: Path) -> None:
    from oracle_server import OracleServer

    from docroute.flows.evaluate import evaluate_job

    labels = _labeled_corpus(tmp_path / "docs", 24)
    answers = [(line.split(",")[0], line.split(",")[1]) for line in labels.read_text().splitlines()[1:]]
    texts = {name: (tmp_path / "docs" / name).read_text().strip() for name, _ in answers}
    job = tmp_path / "job.yaml"
    job.write_text(topic_job_yaml(tmp_path / "docs", tmp_path / "out"), encoding="utf-8")
    result = evaluate_job(str(job), labels=str(labels), report=str(tmp_path / "report"), frontier_model="gpt-4o-mini")
    metrics = result["metrics"]
    assert metrics["n_documents"] == 24 and metrics["frontier_assumed_correct"] is True
    assert 0 <= metrics["small_only"]["accuracy"] <= 1 and metrics["frontier_only"]["cost_per_1000"] > 0
    assert metrics["routed"]["accuracy"] >= metrics["small_only"]["accuracy"]  # escalations answered by the gold
    for name in ("report.md", "metrics.json", "accuracy_vs_cost.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "job-file thresholds" in report and "## Certified operating points" in report
    assert set(metrics["certified"]) == {"kept", "overall"}  # both guarantees' operating points, on these labels
    for point in metrics["certified"].values():
        assert 0 <= point["escalation_rate"] <= 1 and point["cost_per_1000"] > 0 and "label" in point["thresholds"]

    oracle = [(texts[name], {"label": label}) for name, label in answers]
    with OracleServer(oracle) as server:
        called = tmp_path / "called.yaml"
        called.write_text(
            topic_job_yaml(tmp_path / "docs", tmp_path / "out")
            + f"frontier: {{provider: openai_compatible, model: oracle, base_url: {server.base_url}, "
            "price: {input_per_million: 1.0, output_per_million: 2.0}, max_retries: 0}\n",
            encoding="utf-8",
        )
        result = evaluate_job(str(called), labels=str(labels), report=str(tmp_path / "report2"), frontier="call")
        assert len(server.chat_requests) == 24
    metrics = result["metrics"]
    assert metrics["frontier_only"]["accuracy"] == 1.0 and metrics["frontier_assumed_correct"] is False
    assert metrics["per_label"] is not None


def test_fixed_sequence_certification_is_selected_by_the_spec(tmp_path: Path) -> None:
    labels = _labeled_corpus(tmp_path / "docs", 30)
    job = tmp_path / "job.yaml"
    job.write_text(
        topic_job_yaml(
            tmp_path / "docs",
            tmp_path / "out",
            extra="routing: {target_accuracy: 0.8, delta: 0.2, certification: fixed-sequence}\n",
        ),
        encoding="utf-8",
    )
    cert = calibrate(str(job), labels=str(labels))["router"].certificates["label"]
    assert "fixed-sequence" in cert.method and cert.n == 30
    if cert.threshold is not None:
        assert cert.lower_bound >= 0.8


def test_overall_guarantee_is_selected_by_the_spec_and_recorded(tmp_path: Path) -> None:
    labels = _labeled_corpus(tmp_path / "docs", 30)
    job = tmp_path / "job.yaml"
    job.write_text(
        topic_job_yaml(
            tmp_path / "docs",
            tmp_path / "out",
            extra="routing: {target_accuracy: 0.8, delta: 0.2, guarantee: overall, certification: fixed-sequence}\n",
        ),
        encoding="utf-8",
    )
    router = calibrate(str(job), labels=str(labels))["router"]
    cert = router.certificates["label"]
    assert router.guarantee == cert.guarantee == "overall" and "overall" in cert.method and cert.n == 30
    if cert.threshold is not None:
        assert cert.lower_bound >= 0.8
    assert json.loads((tmp_path / "out" / "router.json").read_text())["guarantee"] == "overall"
    assert load_router(load_job(job)).guarantee == "overall"


def test_document_unit_is_selected_by_the_spec_and_recorded(tmp_path: Path) -> None:
    labels = _labeled_corpus(tmp_path / "docs", 30)
    job = tmp_path / "job.yaml"
    job.write_text(
        topic_job_yaml(
            tmp_path / "docs",
            tmp_path / "out",
            extra="routing: {target_accuracy: 0.8, delta: 0.2, guarantee: overall, guarantee_unit: document}\n",
        ),
        encoding="utf-8",
    )
    result = calibrate(str(job), labels=str(labels))
    cert = result["router"].certificates["label"]
    assert cert.unit == "document" and "document-level" in cert.method and cert.delta == 0.2
    assert json.loads((tmp_path / "out" / "router.json").read_text())["certificates"]["label"]["unit"] == "document"
    assert load_router(load_job(job)).certificates["label"].unit == "document"


def test_whole_document_certification_uses_documents_with_every_part() -> None:
    import numpy as np

    from docroute.tasks.answer.score import PartArrays, documents_with_every_part

    parts = {
        "label": PartArrays(["a", "b", "c"], np.array([0.9, 0.8, 0.7]), np.array([1, 0, 1], dtype=bool), None),
        "total": PartArrays(
            ["c", "a"], np.array([0.6, 0.95]), np.array([0, 1], dtype=bool), np.array([1, 1], dtype=bool)
        ),
    }
    aligned = documents_with_every_part(parts)
    assert aligned["label"].doc_ids == aligned["total"].doc_ids == ["a", "c"]  # "b" has no gold total
    assert aligned["label"].confidence.tolist() == [0.9, 0.7] and aligned["total"].confidence.tolist() == [0.95, 0.6]
    assert aligned["total"].correct.tolist() == [True, False] and aligned["label"].frontier_correct is None
