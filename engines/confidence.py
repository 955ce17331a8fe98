"""Pure functions that turn model scores into calibrated probabilities.

No I/O and no model imports, so routing and evaluation can test and reuse them directly.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np


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
