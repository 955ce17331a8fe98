"""Typed row outcomes: what later runs decide on (retries, batch queues), never the wording of `route_reason`."""

from __future__ import annotations

from datetime import UTC, datetime

import pyarrow as pa

from docroute.engines.base import Prediction
from docroute.schemas.outcomes import RETRIED_OUTCOMES, RouteOutcome, legacy_outcome, outcome_of_record
from docroute.schemas.rows import ResultRow
from docroute.tasks.answer.escalate import DeferReason, Escalation
from docroute.tasks.answer.frontier_batches import QUEUED
from docroute.tasks.answer.outcome import finish_escalated
from docroute.tasks.store.state import state_of_part


def _row(route: str = "error", outcome: RouteOutcome = RouteOutcome.SMALL_MODEL_FAILED) -> ResultRow:
    return ResultRow(
        doc_id="d1",
        source_uri="file:///in/a.txt",
        run_id="run-1",
        spec_hash="h",
        processed_at=datetime(2026, 12, 1, tzinfo=UTC),
        route=route,
        route_reason="small model failed: the engine timed out",
        route_outcome=outcome,
    )


def _retry(routes: list[str], reasons: list[str], outcomes: list[str | None] | None) -> list[bool]:
    columns = {
        "doc_id": [f"d{i}" for i in range(len(routes))],
        "source_uri": ["u"] * len(routes),
        "source_etag": ["e"] * len(routes),
        "spec_hash": ["h"] * len(routes),
        "small_model": ["m"] * len(routes),
        "route": routes,
        "route_reason": reasons,
    }
    if outcomes is not None:
        columns["route_outcome"] = outcomes
    return state_of_part(pa.table(columns), "file:///out/part.parquet")["retry"].to_pylist()


def test_a_row_whose_small_answer_failed_waits_for_its_batch_instead_of_being_queued_again() -> None:
    row = _row()
    finish_escalated(row, Escalation(None, 0.0, QUEUED, DeferReason.QUEUED), row.route_reason, has_small=False)
    assert row.route == "deferred" and row.route_outcome is RouteOutcome.QUEUED and row.error is None
    assert row.final_model is None
    # the next run reads the part's state: a queued row is not retried (it would be queued and paid for twice)
    assert _retry([row.route], [row.route_reason], [row.route_outcome.value]) == [False]


def test_what_is_retried_is_decided_by_the_outcome_not_the_sentence() -> None:
    reworded = "the engine gave no answer this time"  # no longer starts with "small model failed"
    outcomes = [o.value for o in RouteOutcome]
    routes = ["error"] * len(outcomes)
    assert _retry(routes, [reworded] * len(outcomes), outcomes) == [o in RETRIED_OUTCOMES for o in RouteOutcome]
    assert RouteOutcome.QUEUED not in RETRIED_OUTCOMES and RouteOutcome.UNREADABLE not in RETRIED_OUTCOMES


def test_parts_written_before_the_outcome_column_are_read_as_those_runs_decided() -> None:
    routes = ["deferred", "deferred", "error", "error", "error", "small"]
    reasons = [
        "low confidence; frontier budget exhausted",
        f"low confidence; {QUEUED}",
        "small model failed: timeout",
        "shard failed after retries: OSError",
        "parse failed: pdf_encrypted",
        "confident",
    ]
    assert _retry(routes, reasons, None) == [True, False, True, True, False, False]
    assert legacy_outcome("deferred", reasons[1]) is RouteOutcome.QUEUED
    assert outcome_of_record({"route": "error", "route_reason": reasons[3]}) is RouteOutcome.SHARD_FAILED
    assert outcome_of_record({"route_outcome": "kept", "route": "small"}) is RouteOutcome.KEPT


def test_every_way_a_row_is_finished_sets_its_outcome() -> None:
    answered = Prediction(id="d1", model="openai:gpt-4o-mini", label="a")
    failed = Prediction(id="d1", model="openai:gpt-4o-mini", error="HTTP 400", retryable=False)
    transient = Prediction(id="d1", model="openai:gpt-4o-mini", error="HTTP 503", retryable=True)
    cases = [
        (None, True, "deferred", RouteOutcome.NO_FRONTIER),
        (None, False, "error", RouteOutcome.SMALL_MODEL_FAILED),
        (Escalation(None, 0.0, "cap", DeferReason.BUDGET_EXHAUSTED), True, "deferred", RouteOutcome.BUDGET_EXHAUSTED),
        (Escalation(None, 0.0, "cap", DeferReason.BUDGET_EXHAUSTED), False, "error", RouteOutcome.BUDGET_EXHAUSTED),
        (Escalation(answered, 0.01), True, "frontier", RouteOutcome.ANSWERED_BY_FRONTIER),
        (Escalation(transient, 0.0), True, "deferred", RouteOutcome.FRONTIER_RETRYABLE),
        (Escalation(failed, 0.0), True, "error", RouteOutcome.FRONTIER_FAILED),
        (Escalation(failed, 0.0), False, "error", RouteOutcome.SMALL_MODEL_FAILED),  # the small failure is retried
    ]
    for outcome, has_small, route, expected in cases:
        row = _row(
            "small" if has_small else "error", RouteOutcome.KEPT if has_small else RouteOutcome.SMALL_MODEL_FAILED
        )
        finish_escalated(row, outcome, "low confidence", has_small)
        assert (row.route, row.route_outcome) == (route, expected), (outcome, has_small)


def test_a_shard_that_failed_for_good_still_gives_every_file_a_row_retried_later() -> None:
    from docroute.schemas.documents import DocumentRef
    from docroute.schemas.spec import JobSpec
    from docroute.tasks.answer.outcome import failed_shard_rows

    spec = JobSpec.model_validate(
        {
            "name": "j",
            "source": {"url": "/in"},
            "task": {"classify": {"labels": [{"name": "a"}, {"name": "b"}]}},
            "output": {"url": "/out"},
        }
    )
    refs = [DocumentRef(uri=f"file:///in/{i}.txt", path=f"/in/{i}.txt", size=3, etag=f"e{i}") for i in range(3)]
    rows = failed_shard_rows(spec, refs, "run-1", "OSError: disk full")
    assert [r.source_uri for r in rows] == [ref.uri for ref in refs]
    assert {(r.route, r.route_outcome) for r in rows} == {("error", RouteOutcome.SHARD_FAILED)}
    assert all(r.error == "shard failed after retries: OSError: disk full" for r in rows)
    assert RouteOutcome.SHARD_FAILED in RETRIED_OUTCOMES
