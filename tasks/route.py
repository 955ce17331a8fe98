"""Decide which small-model answers are kept and which go to the frontier. Pure: no I/O, no Prefect.

A row is escalated when the label's confidence, or any required field's, is under its threshold. The row's
confidence is its least confident required part, so one number says how sure the small model was of the whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from docroute.engines.base import Prediction
from docroute.schemas.spec import JobSpec


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """Whether to escalate, the row's confidence, and the reason in words."""

    escalate: bool
    confidence: float | None
    reason: str


def _fmt(value: float) -> str:
    return f"{value:.3f}"


def decide(prediction: Prediction, spec: JobSpec) -> RouteDecision:
    """Compare each required part's confidence with its threshold."""
    parts: list[tuple[str, float | None, float]] = []
    if spec.task.classify is not None:
        parts.append(("label", prediction.label_confidence, spec.routing.threshold))
    if spec.task.extract is not None:
        for field in spec.task.extract.fields:
            if field.required:
                parts.append(
                    (
                        field.name,
                        prediction.field_confidences.get(field.name),
                        spec.field_threshold(field.name),
                    )
                )
    parts = [(name, None if c is None or math.isnan(c) else c, t) for name, c, t in parts]  # NaN is unknown
    known = [c for _, c, _ in parts if c is not None]
    confidence = min(known) if known else None
    below = [
        f"{name} {'has no confidence' if c is None else _fmt(c)} < {_fmt(t)}"
        for name, c, t in parts
        if c is None or c < t
    ]
    if below:
        return RouteDecision(True, confidence, "low confidence: " + "; ".join(below))
    if not parts:  # nothing required: keep the small answer
        return RouteDecision(False, confidence, "no required parts")
    return RouteDecision(False, confidence, "confident: every required part at or above its threshold")
