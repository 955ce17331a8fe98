"""Tests for tasks/route/decide.py (which answers go to the frontier), tasks/answer/budget.py (the per-run frontier
spend cap) and tasks/answer/escalate.py (per-call reservations against it, answers bounded by their schema),
against real local servers."""

from __future__ import annotations

import asyncio
import json
import random
import sys
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
from oracle_server import OracleServer

from docroute.engines.base import ExchangeKind, Prediction, Request, Usage
from docroute.engines.remote.anthropic import AnthropicEngine
from docroute.engines.remote.openai_compat import OpenAICompatibleEngine
from docroute.engines.scoring.prompts import answer_bytes_bound
from docroute.schemas.pricing import ModelPrice
from docroute.schemas.spec import JobSpec, TaskSpec
from docroute.tasks.answer.budget import FrontierBudget, release_run_budget, run_budget
from docroute.tasks.answer.escalate import BudgetGate, DeferReason, Escalation, escalate
from docroute.tasks.route.decide import RouteDecision, decide, spec_thresholds

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


# --------------------------------------------------------------------------------------------------------------------
# FrontierBudget.reserve: waiting on an event loop for calls in flight


def test_reserve_waits_for_calls_in_flight_and_takes_what_they_give_back() -> None:
    budget = FrontierBudget(limit_usd=1.0)

    async def scenario() -> tuple[bool, bool]:
        assert await budget.reserve(0.75)
        waiting = asyncio.create_task(budget.reserve(0.5))  # does not fit while 0.75 is held
        await asyncio.sleep(0.05)
        assert not waiting.done() and budget.in_flight == 1
        budget.settle(0.75, 0.25)  # the call cost less than its bound: 0.5 is free again
        got = await asyncio.wait_for(waiting, 1.0)
        budget.settle(0.5, 0.5)
        refused = await asyncio.wait_for(budget.reserve(0.5), 1.0)  # 0.75 spent, nothing in flight: refused at once
        return got, refused

    assert asyncio.run(scenario()) == (True, False)
    assert (budget.spent_usd, budget.reserved_usd, budget.in_flight) == (0.75, 0.0, 0)


def test_reserve_serves_callers_in_arrival_order() -> None:
    """A small claim never overtakes an earlier big one: escalations sent first are paid first."""
    budget = FrontierBudget(limit_usd=1.0)
    order: list[str] = []

    async def claim(name: str, amount: float) -> None:
        if await budget.reserve(amount):
            order.append(name)

    async def scenario() -> None:
        assert await budget.reserve(0.5)
        big = asyncio.create_task(claim("big", 0.75))
        await asyncio.sleep(0.01)
        small = asyncio.create_task(claim("small", 0.25))  # would fit now, but waits its turn
        await asyncio.sleep(0.05)
        assert order == []
        budget.settle(0.5, 0.0)
        await asyncio.wait_for(asyncio.gather(big, small), 1.0)

    asyncio.run(scenario())
    assert order == ["big", "small"]


def test_a_settle_from_another_thread_wakes_a_waiter_on_its_own_loop() -> None:
    budget = FrontierBudget(limit_usd=1.0)
    assert budget.try_reserve(1.0)
    timer = threading.Timer(0.1, budget.settle, args=(1.0, 0.5))

    async def scenario() -> bool:
        timer.start()
        return await asyncio.wait_for(budget.reserve(0.5), 5.0)

    assert asyncio.run(scenario()) is True
    assert budget.in_flight == 1 and budget.spent_usd == 0.5


def test_a_cancelled_waiter_leaves_the_line() -> None:
    budget = FrontierBudget(limit_usd=1.0)

    async def scenario() -> bool:
        assert await budget.reserve(1.0)
        waiting = asyncio.create_task(budget.reserve(0.5))
        await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        budget.settle(1.0, 0.25)
        return await asyncio.wait_for(budget.reserve(0.75), 1.0)  # not stuck behind the cancelled one

    assert asyncio.run(scenario()) is True


# --------------------------------------------------------------------------------------------------------------------
# output bounds from the answer schema

INTENTS = TaskSpec.model_validate(
    {
        "instructions": "Messages sent by customers of an online bank.",
        "classify": {
            "labels": [
                {"name": "card_arrival", "description": "the customer is waiting for a new card"},
                {"name": "lost_or_stolen_card", "description": "the card was lost or stolen"},
                {"name": "exchange_rate", "description": "questions about currency exchange rates"},
                {"name": "pin_blocked", "description": "the PIN is blocked after wrong attempts"},
                {"name": "cash_withdrawal_charge", "description": "a fee was charged for an ATM cash withdrawal"},
                {"name": "transfer_not_received_by_recipient", "description": "a transfer has not arrived"},
            ]
        },
    }
)
INTENT_NEEDLES = {
    "card_arrival": "my new card",
    "lost_or_stolen_card": "card was stolen",
    "exchange_rate": "exchange rate",
    "pin_blocked": "PIN is blocked",
    "cash_withdrawal_charge": "ATM fee",
    "transfer_not_received_by_recipient": "transfer has not arrived",
}
INTENT_ANSWERS: list[Any] = [(needle, {"label": label}) for label, needle in INTENT_NEEDLES.items()]
PRICE = ModelPrice(input_per_million=0.1, output_per_million=0.4)


def _spellings(answer: dict[str, Any]) -> list[str]:
    """The ways a JSON writer may spell an answer: compact, spaced, pretty-printed, with \\u escapes."""
    return [
        json.dumps(answer, separators=(",", ":"), ensure_ascii=False),
        json.dumps(answer, ensure_ascii=False),
        json.dumps(answer, indent=2, ensure_ascii=False),
        json.dumps(answer, indent=4),
    ]


def test_a_label_answer_is_bounded_by_its_longest_label_and_never_above_max_output_tokens() -> None:
    bound = answer_bytes_bound(INTENTS)
    assert bound is not None
    for label in INTENTS.classify.label_names:  # type: ignore[union-attr]
        for spelling in _spellings({"label": label}):
            assert len(spelling.encode("utf-8")) <= bound
    assert bound < 2 * len('{"label":"transfer_not_received_by_recipient"}')
    engine = OpenAICompatibleEngine(task=INTENTS, model="gpt-4o-mini", base_url=None, api_key="k")
    assert engine.answer_tokens < 100 < engine.max_output_tokens == 512
    assert (
        OpenAICompatibleEngine(task=INTENTS, model="m", base_url=None, api_key="k", max_output_tokens=20).answer_tokens
        == 20
    )
    # a model that thinks before answering spends output tokens on thoughts: no schema bound for it
    assert OpenAICompatibleEngine(task=INTENTS, model="o4-mini", base_url=None, api_key="k").answer_tokens == 512
    thinking = OpenAICompatibleEngine(
        task=INTENTS, model="m", base_url=None, api_key="k", extra_body={"reasoning_effort": "low"}
    )
    assert thinking.answer_tokens == 512
    anthropic = AnthropicEngine(task=INTENTS, model="claude-haiku-4-5", api_key="k")
    assert anthropic.answer_tokens < 256 < anthropic.max_output_tokens
    assert (
        AnthropicEngine(task=INTENTS, model="claude-haiku-4-5", api_key="k", extra_body={"thinking": {}}).answer_tokens
        == 512
    )


def test_bounded_field_types_bound_an_extraction_and_free_text_does_not() -> None:
    fields: list[dict[str, Any]] = [
        {"name": "issued", "type": "date"},
        {"name": "at", "type": "datetime"},
        {"name": "paid", "type": "bool"},
        {"name": "count", "type": "int"},
        {"name": "ratio", "type": "float"},
        {"name": "total", "type": "decimal", "precision": 12, "scale": 2},
        {"name": "currency", "type": "enum", "values": ["EUR", "USD", "Złoty polski"]},
    ]
    bounded = TaskSpec.model_validate(
        {"classify": {"labels": [{"name": "a"}, {"name": "b"}]}, "extract": {"fields": fields}}
    )
    bound = answer_bytes_bound(bounded)
    assert bound is not None and bound < 512
    longest = {
        "label": "a",
        "issued": "2024-03-12",
        "at": "2024-03-12T14:30:00.123456+01:00",
        "paid": False,
        "count": -(2**63),
        "ratio": -1.7976931348623157e308,
        "total": "-1234567890.12",
        "currency": "Złoty polski",
    }
    for spelling in _spellings(longest):
        assert len(spelling.encode("utf-8")) <= bound
    for free in ({"name": "vendor", "type": "str"}, {"name": "tags", "type": "list[str]"}):
        unbounded = TaskSpec.model_validate({"extract": {"fields": [*fields, free]}})
        assert answer_bytes_bound(unbounded) is None
        engine = OpenAICompatibleEngine(task=unbounded, model="m", base_url=None, api_key="k", max_output_tokens=300)
        assert engine.answer_tokens == 300


def test_a_real_tokenizer_spells_every_label_answer_within_the_bound(runtime: Any) -> None:
    """Gemma's tokenizer (the packaged model's; nothing is downloaded): tokens never outnumber the bound's bytes."""
    task = TaskSpec.model_validate(
        {"classify": {"labels": [{"name": n} for n in [*INTENT_NEEDLES, "überweisung_nicht_angekommen", "返金"]]}}
    )
    bound = answer_bytes_bound(task)
    assert bound is not None
    for label in task.classify.label_names:  # type: ignore[union-attr]
        for spelling in _spellings({"label": label}):
            assert len(runtime.tokenize(spelling)) <= bound


@dataclass
class _Seen:
    kind: ExchangeKind
    bound: Usage
    used: Usage | None = None


@dataclass
class _WatchedGate:
    """The real BudgetGate, plus a record of every call it admitted and the most the budget ever had committed."""

    gate: BudgetGate
    seen: list[_Seen] = field(default_factory=list)
    peak_committed_usd: float = 0.0

    def _watch(self) -> None:
        budget = self.gate.budget
        with budget._lock:
            self.peak_committed_usd = max(self.peak_committed_usd, budget.spent_usd + budget.reserved_usd)

    async def admit(self, request_id: str, kind: ExchangeKind, bound: Usage) -> Any:
        ticket = await self.gate.admit(request_id, kind, bound)
        self._watch()
        seen = _Seen(kind, bound)
        self.seen.append(seen)
        watch = self._watch

        class Ticket:
            def settle(self, used: Usage | None) -> None:
                seen.used = used
                ticket.settle(used)
                watch()

        return Ticket()


def _intent_requests(count: int) -> list[Request]:
    needles = list(INTENT_NEEDLES.values())
    return [
        Request(f"doc-{i:03d}", f"Hello, message {i}: {needles[i % len(needles)]} " + "and some more words " * (i % 5))
        for i in range(count)
    ]


def test_a_label_answers_real_tokens_fit_the_bound_it_reserved_and_asked_for() -> None:
    with OracleServer(INTENT_ANSWERS) as server:
        engine = OpenAICompatibleEngine(
            task=INTENTS, model="oracle-1", base_url=server.base_url, api_key="k", max_retries=0, timeout_s=10
        )
        gate = _WatchedGate(BudgetGate(FrontierBudget(limit_usd=None), PRICE))
        with engine:
            predictions = engine.predict(_intent_requests(6), gate=gate)
        bodies = [r["body"] for r in server.chat_requests]
        served = [r["response"]["usage"] for r in server.chat_requests]
    assert all(p.ok for p in predictions)
    assert {body["max_tokens"] for body in bodies} == {engine.answer_tokens}  # the bound is what was asked for
    assert len(gate.seen) == 6 and {s.kind for s in gate.seen} == {ExchangeKind.ANSWER}
    for seen in gate.seen:
        assert seen.used is not None
        assert seen.used.output_tokens <= seen.bound.output_tokens == engine.answer_tokens < 100
        assert seen.used.input_tokens <= seen.bound.input_tokens
    assert sorted(u["completion_tokens"] for u in served) == sorted(s.used.output_tokens for s in gate.seen if s.used)


@pytest.mark.parametrize("fault", ["malformed", "invalid"])
def test_a_repair_round_is_admitted_on_its_own_with_the_bound_of_its_own_messages(fault: str) -> None:
    with OracleServer(INTENT_ANSWERS, faults=[fault]) as server:
        engine = OpenAICompatibleEngine(task=INTENTS, model="oracle-1", base_url=server.base_url, api_key="k")
        gate = _WatchedGate(BudgetGate(FrontierBudget(limit_usd=1.0), PRICE))
        with engine:
            (prediction,) = engine.predict(_intent_requests(1), gate=gate)
        served = [r["response"]["usage"] for r in server.chat_requests]
    assert prediction.ok and [s.kind for s in gate.seen] == [ExchangeKind.ANSWER, ExchangeKind.REPAIR]
    first, repair = gate.seen
    assert repair.bound.input_tokens > first.bound.input_tokens  # the bad answer and the reason are sent too
    for seen, usage in zip(gate.seen, served, strict=True):
        assert seen.used == Usage(usage["prompt_tokens"], usage["completion_tokens"], 0)
        assert seen.used.input_tokens <= seen.bound.input_tokens and seen.used.output_tokens <= seen.bound.output_tokens
    assert gate.gate.budget.spent_usd == pytest.approx(PRICE.cost_of(prediction.usage))


def test_an_answer_cut_at_its_bound_is_asked_again_with_max_output_tokens() -> None:
    with OracleServer(INTENT_ANSWERS, faults=["length"]) as server:
        engine = OpenAICompatibleEngine(task=INTENTS, model="oracle-1", base_url=server.base_url, api_key="k")
        gate = _WatchedGate(BudgetGate(FrontierBudget(limit_usd=1.0), PRICE))
        with engine:
            (prediction,) = engine.predict(_intent_requests(1), gate=gate)
        first, second = (r["body"] for r in server.chat_requests)
    assert prediction.ok and prediction.label == "card_arrival"
    assert (first["max_tokens"], second["max_tokens"]) == (engine.answer_tokens, 512)
    assert first["messages"] == second["messages"]
    assert [s.kind for s in gate.seen] == [ExchangeKind.ANSWER, ExchangeKind.WIDEN]
    assert gate.seen[1].bound.output_tokens == 512


# --------------------------------------------------------------------------------------------------------------------
# escalate(): a cap that binds, under concurrency, against a real local server


def test_a_binding_cap_is_spent_but_never_passed_with_calls_in_flight() -> None:
    cap = 0.004
    with OracleServer(INTENT_ANSWERS, delay_s=0.01) as server:
        engine = OpenAICompatibleEngine(
            task=INTENTS,
            model="oracle-1",
            base_url=server.base_url,
            api_key="k",
            max_concurrency=8,
            max_retries=0,
            timeout_s=10,
        )
        requests = _intent_requests(240)
        one_call = max(PRICE.worst_case_usd(*_tokens(engine.answer_bound(r))) for r in requests)
        assert cap > 20 * one_call  # the test means something: the cap holds many calls' bounds
        budget = FrontierBudget(limit_usd=cap)
        watched = _WatchedBudget(budget)
        with engine:
            outcomes = escalate(engine, requests, budget, PRICE)
        calls, in_flight = len(server.chat_requests), server.max_in_flight
    watched.stop()
    answered = [o for o in outcomes.values() if o.prediction is not None and o.prediction.ok]
    deferred = [o for o in outcomes.values() if o.reason is DeferReason.BUDGET_EXHAUSTED]
    assert len(answered) + len(deferred) == len(requests) and answered and deferred
    assert calls == len(answered)  # a call the budget refused was never sent
    assert in_flight > 1  # calls really overlapped
    assert watched.peak_usd <= cap  # spent + reserved, sampled throughout the run
    assert budget.spent_usd == pytest.approx(sum(o.cost_usd for o in outcomes.values()))
    assert cap - one_call <= budget.spent_usd <= cap
    assert budget.spent_usd >= 0.9 * cap
    assert budget.in_flight == 0 and budget.reserved_usd == 0.0
    for outcome in deferred:
        assert outcome.prediction is None and outcome.cost_usd == 0.0
        assert outcome.deferred_reason is not None
        assert "frontier budget exhausted: this call could cost up to $0.000" in outcome.deferred_reason
        assert "and the run's cap of $0.0040 leaves $0.000" in outcome.deferred_reason
        assert "$0.00 " not in outcome.deferred_reason


def test_shard_threads_sharing_one_budget_spend_it_without_passing_it() -> None:
    """Four shards as threads, two engines (each with its own event loop) and one run budget, as a threads run."""
    cap = 0.003
    with OracleServer(INTENT_ANSWERS, delay_s=0.005) as server:
        engines = [
            OpenAICompatibleEngine(
                task=INTENTS, model="oracle-1", base_url=server.base_url, api_key="k", max_concurrency=4, max_retries=0
            )
            for _ in range(2)
        ]
        shards = [[Request(f"s{s}-{r.id}", r.text) for r in _intent_requests(60)] for s in range(4)]
        one_call = max(PRICE.worst_case_usd(*_tokens(engines[0].answer_bound(r))) for shard in shards for r in shard)
        budget = FrontierBudget(limit_usd=cap)
        watched = _WatchedBudget(budget)
        start = threading.Barrier(4)

        def shard_task(index: int) -> dict[str, Escalation]:
            start.wait()
            return escalate(engines[index % 2], shards[index], budget, PRICE)

        try:
            with ThreadPoolExecutor(max_workers=4) as pool:
                results = list(pool.map(shard_task, range(4)))
        finally:
            for engine in engines:
                engine.close()
        calls = len(server.chat_requests)
    watched.stop()
    outcomes = [o for result in results for o in result.values()]
    answered = [o for o in outcomes if o.prediction is not None and o.prediction.ok]
    deferred = [o for o in outcomes if o.reason is DeferReason.BUDGET_EXHAUSTED]
    assert len(outcomes) == 240 and len(answered) + len(deferred) == 240
    assert answered and deferred and calls == len(answered)
    assert watched.peak_usd <= cap
    assert budget.spent_usd == pytest.approx(sum(o.cost_usd for o in outcomes))
    assert cap - one_call <= budget.spent_usd <= cap
    assert budget.spent_usd >= 0.9 * cap
    assert budget.in_flight == 0


def test_a_repair_round_the_budget_cannot_pay_for_leaves_a_retryable_paid_row() -> None:
    with OracleServer(INTENT_ANSWERS, faults=["invalid"]) as server:
        engine = OpenAICompatibleEngine(
            task=INTENTS, model="oracle-1", base_url=server.base_url, api_key="k", max_retries=0
        )
        (request,) = _intent_requests(1)
        first_call = PRICE.worst_case_usd(*_tokens(engine.answer_bound(request)))
        budget = FrontierBudget(limit_usd=first_call * 1.05)  # the answer fits; the repair round (longer) cannot
        with engine:
            outcome = escalate(engine, [request], budget, PRICE)[request.id]
        calls = len(server.chat_requests)
    assert calls == 1
    assert outcome.reason is DeferReason.SECOND_CALL_OVER_BUDGET and outcome.deferred_reason is None
    prediction = outcome.prediction
    assert prediction is not None and not prediction.ok and prediction.retryable  # the next run asks again
    assert prediction.error is not None and prediction.error.startswith("the repair call was not sent: frontier budget")
    assert outcome.cost_usd == pytest.approx(budget.spent_usd)  # the first call was paid, and is on the row
    assert 0 < budget.spent_usd <= first_call * 1.05
    assert prediction.usage.output_tokens > 0


def _tokens(usage: Usage) -> tuple[int, int]:
    return usage.input_tokens, usage.output_tokens


class _WatchedBudget:
    """Samples spent + reserved of a budget, under its lock, every few milliseconds until stopped."""

    def __init__(self, budget: FrontierBudget) -> None:
        self.budget = budget
        self.peak_usd = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            with self.budget._lock:
                self.peak_usd = max(self.peak_usd, self.budget.spent_usd + self.budget.reserved_usd)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._run_once()

    def _run_once(self) -> None:
        with self.budget._lock:
            self.peak_usd = max(self.peak_usd, self.budget.spent_usd + self.budget.reserved_usd)
