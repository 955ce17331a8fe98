"""`docroute calibrate --candidates`: which is the cheapest small model that meets the target, end to end.

Real engines on a real labeled corpus (the one tests/test_calibrate.py builds). The job's own small model here is
WordLlama similarity rather than Gemma's label scoring because Gemma answers a few seconds per document on the test
machine's shared cores and the comparison would dominate the suite; its `usd_per_hour` plays a dear GPU box, so a
free candidate that meets the target must beat it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from corpus import topic_job_yaml
from test_calibrate import _labeled_corpus
from typer.testing import CliRunner

from docroute.flows.calibrate import CandidateOutcome, calibrate
from docroute.flows.cli import app
from docroute.schemas.candidates import CandidatesFileError, load_candidates
from docroute.schemas.load import load_job
from docroute.tasks.route.router import load_router

pytestmark = pytest.mark.usefixtures("prefect_server")

JOB_MODEL = "  classify_strategy: similarity\n  encoder: wordllama\n  usd_per_hour: 20000\n"
CANDIDATES = [
    {
        "name": "cheap",
        "small_model": {"engine": "llamacpp", "classify_strategy": "embedding_head", "encoder": "wordllama"},
    },
    {
        "name": "pricey",
        "small_model": {
            "engine": "llamacpp",
            "classify_strategy": "embedding_head",
            "encoder": "wordllama",
            "usd_per_hour": 50000,
        },
    },
]


def _job(tmp_path: Path, count: int, routing: str) -> tuple[Path, Path, Path]:
    """A labeled corpus, a job whose small model is the dear one, and a candidates file beside it."""
    labels = _labeled_corpus(tmp_path / "docs", count)
    job = tmp_path / "job.yaml"
    text = topic_job_yaml(tmp_path / "docs", tmp_path / "out", shard_size=16, extra=f"routing: {routing}\n")
    job.write_text(text.replace("  classify_strategy: label_scoring\n", JOB_MODEL), encoding="utf-8")
    candidates = tmp_path / "candidates" / "candidates.yaml"
    candidates.parent.mkdir()
    candidates.write_text(yaml.safe_dump(CANDIDATES, sort_keys=False), encoding="utf-8")
    return job, labels, candidates


def test_the_cheapest_candidate_that_meets_the_target_wins_and_its_router_is_written(tmp_path: Path) -> None:
    routing = "{target_accuracy: 0.95, delta: 0.2, guarantee: overall, certification: fixed-sequence}"
    job, labels, candidates = _job(tmp_path, 45, routing)
    result = calibrate(str(job), labels=str(labels), candidates=str(candidates), frontier_model="gpt-4o-mini")

    table = {v.name: v for v in result["candidates"]}
    assert list(table) == ["job", "cheap", "pricey"]  # the job's own model always first
    for verdict in table.values():
        m = verdict.measurement
        assert m.error is None and m.documents == 45
        assert 0 <= m.accuracy <= 1 and 0 <= m.escalation_rate <= 1
        assert m.small_cost_per_1000 >= 0 and m.frontier_cost_per_1000 >= 0 and m.cost_per_1000 >= 0
        assert (
            m.frontier_cost_per_1000
            <= m.all_frontier_cost_per_1000
            == pytest.approx(result["all_frontier_cost_per_1000"])
        )
        assert verdict.why and verdict.to_json()["outcome"] == verdict.outcome.value
    assert result["all_frontier_cost_per_1000"] > 0

    # the winner is the cheapest of those that meet the target, and every other one says why it lost
    meeting = [v for v in table.values() if v.measurement.meets_target]
    assert meeting, "WordLlama's head separates these topics: some candidate must meet an 80% target"
    cheapest = min(meeting, key=lambda v: v.measurement.cost_per_1000)
    assert result["winner"] == cheapest.name and cheapest.outcome is CandidateOutcome.CHOSEN
    for verdict in table.values():
        if verdict is not cheapest:
            expected = CandidateOutcome.DEARER if verdict.measurement.meets_target else CandidateOutcome.MISSES_TARGET
            assert verdict.outcome is expected
    # "pricey" answers exactly as "cheap" (one scoring) at 50,000 USD an hour: never the choice
    assert table["pricey"].measurement.accuracy == table["cheap"].measurement.accuracy
    assert table["pricey"].measurement.small_cost_per_1000 > table["cheap"].measurement.small_cost_per_1000
    assert table["pricey"].outcome in (CandidateOutcome.DEARER, CandidateOutcome.MISSES_TARGET)
    if table["pricey"].outcome is CandidateOutcome.DEARER:
        assert "more than" in table["pricey"].why
    # the job's model costs 20,000 USD an hour, so the free head wins whenever it meets the target
    assert table["cheap"].measurement.meets_target and result["winner"] == "cheap"

    # the router written is the winner's: its spec hash is the job's with the winner's small model
    spec = load_job(job)
    winner_spec = spec.model_copy(update={"small_model": load_candidates(candidates)[0].small_model})
    router = result["router"]
    assert router.spec_hash == winner_spec.spec_hash() == cheapest.measurement.spec_hash != spec.spec_hash()
    assert json.loads((tmp_path / "out" / "router.json").read_text())["spec_hash"] == winner_spec.spec_hash()
    assert load_router(spec).version == router.version

    # and the report says plainly that the job file must change, with the mapping to paste
    assert "small_model" in result["notice"] and "'cheap'" in result["notice"]
    pasted = yaml.safe_load(result["job_file_change"])["small_model"]
    edited = spec.model_validate(spec.model_dump() | {"small_model": pasted})
    assert edited.spec_hash() == router.spec_hash


def test_cli_compares_candidates_and_writes_the_jobs_router_when_none_meets_the_target(tmp_path: Path) -> None:
    job, labels, candidates = _job(tmp_path, 12, "{target_accuracy: 0.99, delta: 0.01}")
    arguments = ["calibrate", str(job), "--labels", str(labels), "--candidates", str(candidates)]
    result = CliRunner().invoke(app, [*arguments, "--frontier-model", "gpt-4o-mini"])
    assert result.exit_code == 0, result.output
    for name in ("job", "cheap", "pricey"):
        assert f"  {name}: misses_target: no threshold reaches accuracy 0.990" in result.output
    assert "No candidate meets the target: wrote the job's own small model's router" in result.output
    router = load_router(load_job(job))
    assert router is not None and router.spec_hash == load_job(job).spec_hash() and not router.meets_target


def test_bad_candidates_files_are_refused_naming_the_entry(tmp_path: Path) -> None:
    job, labels, candidates = _job(tmp_path, 3, "{target_accuracy: 0.8, delta: 0.2}")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "- name: cheap\n  small_model: {engine: llamacpp, encoder: wordllama}\n"
        "- name: big\n  small_model: {engine: llamacpp, usd_per_hour: -3}\n",
        encoding="utf-8",
    )
    result = CliRunner().invoke(app, ["calibrate", str(job), "--labels", str(labels), "--candidates", str(bad)])
    assert result.exit_code == 2
    assert "line 4: candidates[1] ('big').small_model.usd_per_hour" in result.output

    bad.write_text("- {name: job, small_model: {engine: llamacpp}}\n", encoding="utf-8")
    with pytest.raises(CandidatesFileError, match=r"candidates\[0\] \('job'\).name: 'job' is the job file's own"):
        load_candidates(bad)
    bad.write_text("- {name: a, small_model: {engine: gpu}}\n", encoding="utf-8")
    with pytest.raises(CandidatesFileError, match=r"candidates\[0\] \('a'\).small_model: Input tag 'gpu'"):
        load_candidates(bad)
    bad.write_text("small_model: {engine: llamacpp}\n", encoding="utf-8")
    with pytest.raises(CandidatesFileError, match="must be a non-empty YAML list"):
        calibrate(str(job), labels=str(labels), candidates=str(bad))

    # paths in the file are the file's own, as a job file's are
    bad.write_text("- {name: local, small_model: {engine: llamacpp, model_path: models/tiny.gguf}}\n")
    assert load_candidates(bad)[0].small_model.model_path == str(tmp_path / "models" / "tiny.gguf")

    # the escalations must be priced: without a frontier in the job, one has to be named
    with pytest.raises(ValueError, match="the job has no frontier: name one with --frontier-model"):
        calibrate(str(job), labels=str(labels), candidates=str(candidates))
    result = CliRunner().invoke(app, ["calibrate", str(job), "--labels", str(labels), "--frontier-model", "gpt-4o"])
    assert result.exit_code == 2 and "goes with --candidates" in result.output


def test_with_the_frontier_as_oracle_the_frontier_labels_the_sample_once_for_every_candidate(tmp_path: Path) -> None:
    from oracle_server import OracleServer

    job, labels, candidates = _job(tmp_path, 12, "{target_accuracy: 0.8, delta: 0.2, guarantee: overall}")
    answers = [line.split(",") for line in labels.read_text().splitlines()[1:]]
    oracle = [((tmp_path / "docs" / name).read_text().strip(), {"label": label}) for name, label in answers]
    with OracleServer(oracle) as server:
        job.write_text(
            job.read_text() + f"frontier: {{provider: openai_compatible, model: oracle, base_url: {server.base_url}, "
            "price: {input_per_million: 1.0, output_per_million: 2.0}, max_retries: 0}\n",
            encoding="utf-8",
        )
        result = calibrate(str(job), oracle="frontier", sample=8, candidates=str(candidates))
        assert len(server.chat_requests) == 8  # the job's sample, labelled once; candidates reuse those answers
    assert result["router"].labels_source == "frontier" and result["frontier_model"] == "oracle"
    assert [v.measurement.documents for v in result["candidates"]] == [8, 8, 8]
    assert result["all_frontier_cost_per_1000"] > 0


def test_judging_ties_go_to_the_earlier_candidate_and_unscorable_ones_say_why() -> None:
    from docroute.flows.calibrate import CandidateMeasurement, judge_candidates
    from docroute.schemas.spec import LlamaCppSpec

    def measured(name: str, small: float, frontier: float, uncertified: tuple[str, ...] = ()) -> CandidateMeasurement:
        return CandidateMeasurement(
            name,
            LlamaCppSpec(),
            "h",
            documents=10,
            accuracy=0.9,
            escalation_rate=0.2,
            small_cost_per_1000=small,
            frontier_cost_per_1000=frontier,
            all_frontier_cost_per_1000=1.0,
            uncertified=uncertified,
        )

    verdicts = judge_candidates(
        [
            measured("job", 0.1, 0.2),
            measured("same", 0.2, 0.1),
            measured("short", 0.0, 0.0, uncertified=("label",)),
            CandidateMeasurement("gone", LlamaCppSpec(), "h", error="EngineError: connection refused"),
        ],
        target_accuracy=0.9,
        delta=0.1,
    )
    assert [v.outcome for v in verdicts] == [
        CandidateOutcome.CHOSEN,
        CandidateOutcome.DEARER,  # as cheap as the job's own model is not cheaper: the job keeps its model
        CandidateOutcome.MISSES_TARGET,
        CandidateOutcome.UNAVAILABLE,
    ]
    assert "same $0.30 per 1,000 documents as job" in verdicts[1].why
    assert "label" in verdicts[2].why and "connection refused" in verdicts[3].why
    assert verdicts[3].to_json()["cost_per_1000"] is None and not verdicts[3].to_json()["meets_target"]
