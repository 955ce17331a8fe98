"""Send escalated documents to the frontier within the run's budget.

The budget is drawn per provider call, not per document up front. The frontier engine asks a `BudgetGate` before
each call it sends (the answer; a repair round or a longer answer only if one happens), with a token bound for
that call alone; the gate prices the bound at the worst case (`ModelPrice.worst_case_usd`), reserves it from the
run's `FrontierBudget`, and settles it at the real price the moment the call returns, so what one call did not
spend is free for the next at once. A call that does not fit waits while others are in flight; when none is and
it still does not fit, it is not sent. Engines count tokens; dollars are computed here.

What a refused call means for its row (`DeferReason`):
- the answer's call refused: nothing was sent, the row is `deferred` with the small model's answer and the next
  run retries it (`BUDGET_EXHAUSTED`);
- the second call refused (the first answer was invalid, or cut at its length bound, and the repair round or the
  longer answer did not fit): the first call was paid and is recorded on the row, and the row is `deferred` as a
  retryable frontier failure (`SECOND_CALL_OVER_BUDGET`); the next run asks again from the start.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from docroute.engines.base import (
    Engine,
    EngineError,
    ExchangeKind,
    ExchangeRefusedError,
    FrontierEngine,
    Prediction,
    Request,
    Usage,
)
from docroute.schemas.pricing import ModelPrice, format_usd
from docroute.tasks.answer.budget import FrontierBudget


class DeferReason(StrEnum):
    """Why a row the frontier should answer was left waiting; the sentence for people rides beside it."""

    BUDGET_EXHAUSTED = "budget_exhausted"  # the answer's call did not fit what the cap leaves: nothing sent
    SECOND_CALL_OVER_BUDGET = "second_call_over_budget"  # the repair/longer call did not fit; the first was paid
    QUEUED = "queued"  # waiting in a frontier batch (batch mode): the answer comes in a later run


@dataclass(frozen=True, slots=True)
class Escalation:
    """The frontier's outcome for one request: a prediction, or the reason none was asked for."""

    prediction: Prediction | None
    cost_usd: float
    deferred_reason: str | None = None  # the sentence written to the row's route_reason when no call was made
    reason: DeferReason | None = None  # the decision, typed: set whenever the row is left for a later run

    @property
    def queued(self) -> bool:
        """Waiting in a frontier batch: the row is deferred even without a small-model answer."""
        return self.reason is DeferReason.QUEUED


def budget_exhausted_message(worst_usd: float, budget: FrontierBudget, *, batch: bool = False) -> str:
    """The sentence a row deferred for the budget carries, its amounts written by `format_usd`."""
    limit = "no cap" if budget.limit_usd is None else format_usd(budget.limit_usd)
    price = " at the batch price" if batch else ""
    return (
        f"frontier budget exhausted: this call could cost up to {format_usd(worst_usd)}{price} and the run's cap of "
        f"{limit} leaves {format_usd(budget.remaining_usd or 0.0)}"
    )


@dataclass(frozen=True, slots=True)
class Refusal:
    """A call the gate would not admit."""

    kind: ExchangeKind
    reason: DeferReason
    message: str


class _Ticket:
    """One admitted call's reservation; settled once, at the real price (or at its bound when unknown)."""

    __slots__ = ("_budget", "_price", "_reserved_usd", "_settled")

    def __init__(self, budget: FrontierBudget, price: ModelPrice, reserved_usd: float) -> None:
        self._budget, self._price, self._reserved_usd = budget, price, reserved_usd
        self._settled = False

    def settle(self, used: Usage | None) -> None:
        if self._settled:
            return
        self._settled = True
        actual = self._reserved_usd if used is None else self._price.cost_of(used)
        self._budget.settle(self._reserved_usd, actual)


@dataclass
class BudgetGate:
    """The ExchangeGate (engines/base.py) of one `escalate` call: prices each call's token bound, reserves it.

    Admission runs on the engine's event loop and waits there (`FrontierBudget.reserve`) without blocking it.
    Refusals are recorded per request id, for `escalate` to tell a deferral from a failure.
    """

    budget: FrontierBudget
    price: ModelPrice
    refusals: dict[str, Refusal] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    async def admit(self, request_id: str, kind: ExchangeKind, bound: Usage) -> _Ticket:
        worst = self.price.worst_case_usd(bound.input_tokens, bound.output_tokens)
        if await self.budget.reserve(worst):
            return _Ticket(self.budget, self.price, worst)
        message = budget_exhausted_message(worst, self.budget)
        if kind is ExchangeKind.ANSWER:
            reason = DeferReason.BUDGET_EXHAUSTED
        else:
            reason = DeferReason.SECOND_CALL_OVER_BUDGET
            message = f"the {kind.value} call was not sent: {message}"
        with self._lock:
            self.refusals[request_id] = Refusal(kind, reason, message)
        raise ExchangeRefusedError(message)


def escalate(
    engine: Engine, requests: Sequence[Request], budget: FrontierBudget, price: ModelPrice
) -> dict[str, Escalation]:
    """Answer what the budget allows; returns one Escalation per request id.

    Requests are sent concurrently (up to the engine's max_concurrency) and claim the budget in their order, so
    earlier requests (escalations, before audits) are served first when it runs short.
    """
    if not isinstance(engine, FrontierEngine):
        raise TypeError(f"{engine.name} cannot bound its calls' cost, so it cannot serve as a frontier")
    if not requests:
        return {}
    gate = BudgetGate(budget, price)
    try:
        predictions = engine.predict(requests, gate=gate)
    except EngineError as exc:  # the whole batch failed: retry every row later, never lose one
        predictions = [Prediction(id=r.id, model=engine.name, error=str(exc), retryable=True) for r in requests]
    outcomes: dict[str, Escalation] = {}
    for prediction in predictions:
        refusal = gate.refusals.get(prediction.id)
        if refusal is not None and refusal.kind is ExchangeKind.ANSWER:
            outcomes[prediction.id] = Escalation(None, 0.0, refusal.message, refusal.reason)
            continue
        outcomes[prediction.id] = Escalation(
            prediction, price.cost_of(prediction.usage), reason=refusal.reason if refusal is not None else None
        )
    return outcomes
