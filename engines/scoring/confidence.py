"""Pure functions that turn model scores into calibrated probabilities.

No I/O and no model imports, so routing and evaluation can test and reuse them directly.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from docroute.schemas.spec import FieldSpec

LIST_SHARE = 0.2
"""A list[str] field keeps every candidate holding at least this share of the candidate set's probability."""


def softmax(log_scores: Sequence[float] | np.ndarray) -> np.ndarray:
    """Normalise log-scores over a closed set (labels or candidates) into probabilities."""
    values = np.asarray(log_scores, dtype=np.float64)
    if values.size == 0:
        return values
    shifted = np.exp(values - values.max())
    return shifted / shifted.sum()


def contextual_calibration(probs: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Divide by the label prior and renormalise (Zhao et al. 2021, "Calibrate before use").

    A base model prefers some label words whatever the text says; its preference on content-free input (or on
    the average document) estimates that bias, and dividing it out removes it.
    """
    prior = np.clip(np.asarray(prior, dtype=np.float64), 1e-12, None)
    adjusted = np.asarray(probs, dtype=np.float64) / prior
    total = adjusted.sum(axis=-1, keepdims=True)
    return adjusted / np.where(total == 0, 1, total)


def pick(probs: np.ndarray) -> tuple[int, float]:
    """Return the index of the most probable choice and its probability (the lowest index wins ties)."""
    index = int(np.argmax(probs))
    return index, float(probs[index])


def merge_by_value(probs: np.ndarray, values: Sequence[Hashable]) -> dict[Hashable, float]:
    """Sum the probability of candidates that mean the same value (e.g. "9.00" and "9.0" both 9.00)."""
    merged: dict[Hashable, float] = {}
    for prob, value in zip(probs, values, strict=True):
        merged[value] = merged.get(value, 0.0) + float(prob)
    return merged


def choice_probabilities(
    scores: np.ndarray, *, prior: np.ndarray | None = None, lengths: Sequence[int] | None = None
) -> np.ndarray:
    """Softmax over the whole choice set (optionally per-token mean scores), divided by the prior when given."""
    values = np.asarray(scores, dtype=np.float64)
    if lengths is not None:
        values = values / np.asarray(lengths, dtype=np.float64)
    probs = softmax(values)
    return contextual_calibration(probs, prior) if prior is not None else probs


def _hashable(value: Any) -> Hashable:
    return tuple(value) if isinstance(value, list) else value


def choose_value(
    field: FieldSpec, probs: np.ndarray, values: Sequence[Any], starts: Sequence[int]
) -> tuple[Any, float]:
    """Pick the value with the most probability, summed over candidates that mean the same value.

    A list[str] field takes every candidate holding at least LIST_SHARE,
    in document order; other fields take the value (not the spelling) with the largest summed probability.
    """
    if field.type == "list[str]":
        chosen = [i for i, p in enumerate(probs) if p >= LIST_SHARE and values[i] is not None]
        if not chosen:
            return [], float(sum(p for p, v in zip(probs, values, strict=True) if v is None))
        items: list[str] = []
        for i in sorted(chosen, key=lambda i: starts[i]):
            items.extend(v for v in values[i] if v not in items)
        return items, min(1.0, float(sum(probs[i] for i in chosen)))
    keys = [_hashable(v) for v in values]
    merged = merge_by_value(probs, keys)
    best = max(merged, key=lambda k: (merged[k], -keys.index(k)))
    return values[keys.index(best)], merged[best]
