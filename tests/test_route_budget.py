"""Tests for tasks/route.py (which answers go to the frontier) and tasks/budget.py (the per-run frontier spend cap)."""

from __future__ import annotations

import random
import sys
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from docroute.engines.base import Prediction
from docroute.schemas.spec import JobSpec
from docroute.tasks.budget import FrontierBudget, release_run_budget, run_budget
from docroute.tasks.route import RouteDecision, decide, spec_thresholds

# --------------------------------------------------------------------------------------------------------------------
# decide()


def _spec(
    *,
    classify: bool = True,
    extract: bool = True,
    threshold: float = 0.8,
    field_thresholds: dict[str, float] | None = None,
) -> JobSpec:
    task: dict[str, Any] = {}
    if classify:
        task["classify"] = {"labels": [{"name": "invoice"}, {"name": "receipt"}]}
    if extract:
        task["extract"] = {
            "fields": [
                {"name": "total", "type": "decimal"},
                {"name": "vendor", "type": "str"},
                {"name": "note", "type": "str", "required": False},
            ]
        }
    return JobSpec.model_validate(
        {
            "name": "route-test",
            "source": {"url": "memory://in"},
            "output": {"url": "memory://out"},
            "task": task,
            "routing": {"threshold": threshold, "field_thresholds": field_thresholds or {}},
        }
    )


def _prediction(label_confidence: float | None = None, **field_confidences: float | None) -> Prediction:
    return Prediction(
        id="doc-1",
        model="llamacpp:gemma",
        label="invoice" if label_confidence is not None else None,
        label_confidence=label_confidence,
        fields={name: "x" for name in field_confidences},
        field_confidences=dict(field_confidences),
    )


_CONFIDENT = "confident: every required part at or above its threshold"


def test_confident_classification_is_kept() -> None:
    decision = decide(_prediction(0.93), spec_thresholds(_spec(extract=False)))
    assert decision == RouteDecision(False, 0.93, _CONFIDENT)


def test_low_label_confidence_escalates_with_numbers_in_the_reason() -> None:
    decision = decide(_prediction(0.5), spec_thresholds(_spec(extract=False)))
    assert decision == RouteDecision(True, 0.5, "low confidence: label 0.500 < 0.800")


def test_confidence_exactly_at_the_threshold_is_kept() -> None:
    assert decide(_prediction(0.8), spec_thresholds(_spec(extract=False))).escalate is False
    assert decide(_prediction(0.7999), spec_thresholds(_spec(extract=False))).escalate is True


def test_threshold_zero_keeps_everything_with_a_confidence_and_one_keeps_only_certainty() -> None:
    assert decide(_prediction(0.0), spec_thresholds(_spec(extract=False, threshold=0.0))).escalate is False
    assert decide(_prediction(0.999), spec_thresholds(_spec(extract=False, threshold=1.0))).escalate is True
    assert decide(_prediction(1.0), spec_thresholds(_spec(extract=False, threshold=1.0))).escalate is False


def test_missing_label_confidence_escalates() -> None:
    decision = decide(_prediction(None), spec_thresholds(_spec(extract=False)))
    assert decision == RouteDecision(True, None, "low confidence: label has no confidence < 0.800")


def test_field_thresholds_override_the_global_threshold() -> None:
    spec = _spec(threshold=0.8, field_thresholds={"total": 0.6})
    kept = decide(_prediction(0.9, total=0.65, vendor=0.85), spec_thresholds(spec))
    assert kept == RouteDecision(False, 0.65, _CONFIDENT)
    escalated = decide(_prediction(0.9, total=0.55, vendor=0.85), spec_thresholds(spec))
    assert escalated == RouteDecision(True, 0.55, "low confidence: total 0.550 < 0.600")
    # a stricter per-field threshold escalates what the global one would keep
    strict = _spec(threshold=0.5, field_thresholds={"vendor": 0.95})
    assert decide(_prediction(0.9, total=0.9, vendor=0.9), spec_thresholds(strict)) == RouteDecision(
        True, 0.9, "low confidence: vendor 0.900 < 0.950"
    )


def test_every_low_part_is_named_in_order() -> None:
    spec = _spec(field_thresholds={"total": 0.6})
    decision = decide(_prediction(0.5, total=0.55), spec_thresholds(spec))
    assert decision == RouteDecision(
        True,
        0.5,
        "low confidence: label 0.500 < 0.800; total 0.550 < 0.600; vendor has no confidence < 0.800",
    )


def test_optional_fields_never_escalate_nor_lower_the_row_confidence() -> None:
    spec = _spec(classify=False)
    decision = decide(_prediction(None, total=0.9, vendor=0.85, note=0.01), spec_thresholds(spec))
    assert decision == RouteDecision(False, 0.85, _CONFIDENT)
    # an optional field with no confidence at all is fine too
    assert decide(_prediction(None, total=0.9, vendor=0.85), spec_thresholds(spec)) == RouteDecision(
        False, 0.85, _CONFIDENT
    )


def test_row_confidence_is_the_least_confident_required_part() -> None:
    spec = _spec()
    assert decide(_prediction(0.97, total=0.91, vendor=0.88, note=0.1), spec_thresholds(spec)).confidence == 0.88
    assert decide(_prediction(0.82, total=0.91, vendor=0.88), spec_thresholds(spec)).confidence == 0.82
    # a part without confidence escalates but the row still reports the known minimum
    decision = decide(_prediction(0.97, total=0.91), spec_thresholds(spec))
    assert decision.escalate is True
    assert decision.confidence == 0.91


def test_reason_rounds_to_three_decimals() -> None:
    decision = decide(_prediction(0.123456), spec_thresholds(_spec(extract=False, threshold=0.75)))
    assert decision.reason == "low confidence: label 0.123 < 0.750"
    assert decision.confidence == 0.123456


def test_no_required_parts_keeps_the_small_answer() -> None:
    spec = JobSpec.model_validate(
        {
            "name": "route-test",
            "source": {"url": "memory://in"},
            "output": {"url": "memory://out"},
            "task": {"extract": {"fields": [{"name": "note", "type": "str", "required": False}]}},
        }
    )
    assert decide(_prediction(None, note=0.05), spec_thresholds(spec)) == RouteDecision(
        False, None, "no required parts"
    )


def test_nan_confidence_escalates() -> None:
    decision = decide(_prediction(float("nan")), spec_thresholds(_spec(extract=False)))
    assert decision.escalate is True


# --------------------------------------------------------------------------------------------------------------------
# FrontierBudget


def test_reserve_and_settle() -> None:
    budget = FrontierBudget(limit_usd=1.0)
    assert budget.remaining_usd == 1.0
    assert budget.try_reserve(0.25) is True
    assert budget.reserved_usd == 0.25
    assert budget.remaining_usd == 0.75
    budget.settle(0.25, 0.125)
    assert (budget.spent_usd, budget.reserved_usd) == (0.125, 0.0)
    assert budget.remaining_usd == 0.875


def test_reservation_up_to_exactly_the_cap_is_allowed() -> None:
    budget = FrontierBudget(limit_usd=1.0)
    assert budget.try_reserve(0.5) is True
    assert budget.try_reserve(0.5) is True
    assert budget.remaining_usd == 0.0
    assert budget.try_reserve(0.0) is True
    assert budget.try_reserve(0.001) is False
    assert budget.reserved_usd == 1.0  # a refused reservation holds nothing


def test_refusal_counts_spent_and_reserved() -> None:
    budget = FrontierBudget(limit_usd=1.0)
    assert budget.try_reserve(0.5)
    budget.settle(0.5, 0.5)
    assert budget.try_reserve(0.25)
    assert budget.try_reserve(0.375) is False  # 0.5 spent + 0.25 held + 0.375 > 1
    assert budget.try_reserve(0.25) is True


def test_settle_frees_the_unused_part_of_a_reservation() -> None:
    budget = FrontierBudget(limit_usd=1.0)
    assert budget.try_reserve(1.0)
    assert budget.try_reserve(0.125) is False
    budget.settle(1.0, 0.5)
    assert budget.try_reserve(0.5) is True
    assert budget.try_reserve(0.125) is False


def test_negative_reservation_is_an_error() -> None:
    with pytest.raises(ValueError, match="cannot be negative"):
        FrontierBudget(limit_usd=1.0).try_reserve(-0.01)


def test_no_cap() -> None:
    budget = FrontierBudget(limit_usd=None)
    assert budget.remaining_usd is None
    assert budget.try_reserve(1e9) is True
    budget.settle(1e9, 123.0)
    assert budget.spent_usd == 123.0


def test_zero_cap_refuses_any_spend() -> None:
    budget = FrontierBudget(limit_usd=0.0)
    assert budget.try_reserve(0.0001) is False
    assert budget.remaining_usd == 0.0


def test_reserved_never_goes_negative_and_remaining_never_below_zero() -> None:
    budget = FrontierBudget(limit_usd=1.0)
    budget.settle(0.5, 0.0)  # releasing more than is held
    assert budget.reserved_usd == 0.0
    assert budget.try_reserve(0.5)
    budget.settle(0.5, 1.5)  # a call that cost more than its bound
    assert budget.spent_usd == 1.5
    assert budget.remaining_usd == 0.0
    assert budget.try_reserve(0.0001) is False


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Make the interpreter switch threads far more often, so races get their chance."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


@pytest.mark.usefixtures("fast_switching")
def test_concurrent_reservations_never_exceed_the_cap() -> None:
    """16 threads reserve random amounts and settle at most what they reserved, thousands of times each.

    Amounts are multiples of 1/1024 dollar, so every sum is exact in binary floating point and the cap can be checked
    with no tolerance at all.
    """
    cap = 8.0
    threads, rounds = 16, 2000
    budget = FrontierBudget(limit_usd=cap)
    start = threading.Barrier(threads)

    def worker(seed: int) -> tuple[float, int, int]:
        rng = random.Random(seed)
        spent = 0.0
        accepted = refused = 0
        start.wait()
        for _ in range(rounds):
            amount = rng.randint(1, 64) / 1024
            if not budget.try_reserve(amount):
                refused += 1
                continue
            accepted += 1
            # while a reservation is held, spent + reserved (read together under the budget's lock) fits the cap
            with budget._lock:
                assert budget.spent_usd + budget.reserved_usd <= cap
            actual = rng.randint(0, int(amount * 1024)) / 1024
            budget.settle(amount, actual)
            spent += actual
            assert budget.spent_usd <= cap
        return spent, accepted, refused

    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = [future.result() for future in [pool.submit(worker, seed) for seed in range(threads)]]

    total_spent = sum(spent for spent, _, _ in results)
    accepted = sum(a for _, a, _ in results)
    refused = sum(r for _, _, r in results)
    assert accepted + refused == threads * rounds
    assert refused > 0, "the cap was never reached: the test did not exercise refusals"
    assert accepted > 0
    assert budget.spent_usd <= cap
    assert budget.spent_usd == total_spent  # every settlement was recorded, none lost to a race
    assert budget.reserved_usd == 0.0  # every reservation was released
    assert budget.remaining_usd == cap - total_spent


@pytest.mark.usefixtures("fast_switching")
def test_concurrent_reserve_and_settle_keep_exact_totals_without_a_cap() -> None:
    budget = FrontierBudget(limit_usd=None)

    def worker(_: int) -> None:
        for _ in range(2000):
            assert budget.try_reserve(0.5)
            budget.settle(0.5, 0.25)

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(worker, range(16)))
    assert budget.spent_usd == 16 * 2000 * 0.25
    assert budget.reserved_usd == 0.0


# --------------------------------------------------------------------------------------------------------------------
# run_budget / release_run_budget


@pytest.fixture
def run_id() -> Iterator[str]:
    value = f"test-run-{uuid.uuid4().hex}"
    try:
        yield value
    finally:
        release_run_budget(value)


def test_run_budget_is_shared_per_run(run_id: str) -> None:
    first = run_budget(run_id, 2.0)
    assert first.limit_usd == 2.0
    assert run_budget(run_id, 2.0) is first
    # the first call's limit stands
    assert run_budget(run_id, 99.0) is first
    assert first.limit_usd == 2.0
    other = f"{run_id}-other"
    try:
        assert run_budget(other, 2.0) is not first
    finally:
        release_run_budget(other)


def test_release_returns_the_budget_and_forgets_it(run_id: str) -> None:
    budget = run_budget(run_id, 1.0)
    assert budget.try_reserve(0.5)
    budget.settle(0.5, 0.25)
    released = release_run_budget(run_id)
    assert released is budget
    assert released.spent_usd == 0.25
    assert release_run_budget(run_id) is None
    fresh = run_budget(run_id, 1.0)
    assert fresh is not budget
    assert fresh.spent_usd == 0.0


def test_release_unknown_run_is_none() -> None:
    assert release_run_budget(f"never-{uuid.uuid4().hex}") is None


@pytest.mark.usefixtures("fast_switching")
def test_threads_of_one_run_get_one_budget(run_id: str) -> None:
    start = threading.Barrier(16)

    def fetch(_: int) -> FrontierBudget:
        start.wait()
        return run_budget(run_id, 1.0)

    with ThreadPoolExecutor(max_workers=16) as pool:
        budgets = list(pool.map(fetch, range(16)))
    assert len({id(b) for b in budgets}) == 1
    assert budgets[0] is run_budget(run_id, 1.0)


def test_a_part_without_a_certified_threshold_always_escalates() -> None:
    decision = decide(_prediction(1.0), {"label": None})
    assert decision.escalate and "label has no certified threshold" in decision.reason
