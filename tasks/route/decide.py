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


def in_audit_sample(doc_id: str, fraction: float) -> bool:
    """Whether a document belongs to the audit sample: a fixed `fraction` of document ids, chosen by their hash.

    The sample is a random draw of documents independent of their content and of any model's confidence, and
    every one of its documents gets a frontier answer (escalated or audited), so `docroute train` can certify on it.
    """
    return fraction > 0 and int(doc_id[:8], 16) / 0xFFFFFFFF < fraction


def required_parts(spec: JobSpec) -> list[str]:
    """The parts whose confidence decides a row's route: the label, and every required field."""
    parts = ["label"] if spec.task.classify is not None else []
    if spec.task.extract is not None:
        parts += [f.name for f in spec.task.extract.fields if f.required]
    return parts


def spec_thresholds(spec: JobSpec) -> dict[str, float | None]:
    """The thresholds the job file states (a calibrated router may replace them)."""
    return {
        part: spec.routing.threshold if part == "label" else spec.field_threshold(part) for part in required_parts(spec)
    }


def part_confidence(prediction: Prediction, part: str) -> float | None:
    value = prediction.label_confidence if part == "label" else prediction.field_confidences.get(part)
    return None if value is None or math.isnan(value) else value  # NaN is unknown


def decide(prediction: Prediction, thresholds: dict[str, float | None]) -> RouteDecision:
    """Compare each required part's confidence with its threshold (None: no threshold is safe, escalate)."""
    parts = [(name, part_confidence(prediction, name), t) for name, t in thresholds.items()]
    known = [c for _, c, _ in parts if c is not None]
    confidence = min(known) if known else None
    below = []
    for name, c, t in parts:
        if t is None:
            below.append(f"{name} has no certified threshold")
        elif c is None or c < t:
            below.append(f"{name} {'has no confidence' if c is None else _fmt(c)} < {_fmt(t)}")
    if below:
        return RouteDecision(True, confidence, "low confidence: " + "; ".join(below))
    if not parts:  # nothing required: keep the small answer
        return RouteDecision(False, confidence, "no required parts")
    return RouteDecision(False, confidence, "confident: every required part at or above its threshold")
