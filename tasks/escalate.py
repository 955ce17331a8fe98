"""Send escalated documents to the frontier within the run's budget.

Each request reserves the price of its worst case (engines/base.py FrontierEngine.usage_bound) before any call is
made; requests that do not fit wait as `deferred` with their small-model answer, and each reservation is settled
at the real price once the answer is back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from docroute.engines.base import Engine, FrontierEngine, Prediction, Request
from docroute.schemas.pricing import ModelPrice
from docroute.tasks.budget import FrontierBudget
from docroute.tasks.infer import run_engine


@dataclass(frozen=True, slots=True)
class Escalation:
    """The frontier's outcome for one request: a prediction, or the reason none was asked for."""

    prediction: Prediction | None
    cost_usd: float
    deferred_reason: str | None = None
    queued: bool = False  # waiting in a frontier batch: the row is deferred even without a small-model answer


def escalate(
    engine: Engine, requests: Sequence[Request], budget: FrontierBudget, price: ModelPrice
) -> dict[str, Escalation]:
    """Answer what the budget allows; returns one Escalation per request id."""
    if not isinstance(engine, FrontierEngine):
        raise TypeError(f"{engine.name} cannot bound its calls' cost, so it cannot serve as a frontier")
    outcomes: dict[str, Escalation] = {}
    reserved: list[tuple[Request, float]] = []
    for request in requests:
        bound = engine.usage_bound(request)
        worst = price.worst_case_usd(bound.input_tokens, bound.output_tokens)
        if budget.try_reserve(worst):
            reserved.append((request, worst))
        else:
            outcomes[request.id] = Escalation(
                None,
                0.0,
                f"frontier budget exhausted: this call could cost up to ${worst:.4f} and the run's cap of "
                f"${budget.limit_usd:.2f} leaves ${budget.remaining_usd or 0:.4f}",
            )
    predictions = run_engine(engine, [request for request, _ in reserved])
    for (request, worst), prediction in zip(reserved, predictions, strict=True):
        cost = price.cost_of(prediction.usage)
        budget.settle(worst, cost)
        outcomes[request.id] = Escalation(prediction, cost)
    return outcomes
