"""Monotone maps from a model's raw confidence to a calibrated probability of being right, and how to measure it.

Pure: numpy, scipy and scikit-learn only; no I/O, no model imports.

Every map here is non-decreasing, so it never reorders rows: a threshold on calibrated confidence keeps the same rows
as some threshold on raw confidence. Calibration makes confidences mean what they say (a 0.9 is right about 90% of
the time); it does not by itself give a guarantee. Certified thresholds (tasks/route/certify.py) need the
calibrator to be
fitted on rows other than the ones used to certify, or the threshold grid becomes data-dependent on the raw scale.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

MIN_ROWS = 20
"""Fewer labelled rows than this (or only right, or only wrong, answers): the identity map."""

_EPS = 1e-6

CalibratorKind = Literal["isotonic", "temperature", "identity"]


@dataclass(frozen=True)
class Calibrator:
    """A monotone map raw confidence -> calibrated probability.

    isotonic: piecewise-linear through the breakpoints (x, y), flat beyond the ends (np.interp);
    temperature: sigmoid(logit(c) / temperature); identity: c unchanged. NaN stays NaN (unknown).
    """

    kind: str
    x: tuple[float, ...] = ()
    y: tuple[float, ...] = ()
    temperature: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("isotonic", "temperature", "identity"):
            raise ValueError(f"unknown calibrator kind {self.kind!r}")
        if self.kind == "isotonic" and (len(self.x) != len(self.y) or not self.x):
            raise ValueError("an isotonic calibrator needs matching, non-empty breakpoints")
        if self.kind == "temperature" and not (self.temperature is not None and self.temperature > 0):
            raise ValueError("a temperature calibrator needs a positive temperature")

    def apply(self, confidence: Any) -> np.ndarray:
        conf = np.asarray(confidence, dtype=np.float64)
        if self.kind == "identity":
            return conf.copy()
        if self.kind == "isotonic":
            out = np.interp(conf, np.asarray(self.x), np.asarray(self.y))
            return np.where(np.isnan(conf), np.nan, out)
        assert self.temperature is not None
        return _sigmoid(_logit(conf) / self.temperature)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "x": list(self.x), "y": list(self.y), "temperature": self.temperature}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Calibrator:
        temperature = data.get("temperature")
        return cls(
            kind=str(data["kind"]),
            x=tuple(float(v) for v in data.get("x", ())),
            y=tuple(float(v) for v in data.get("y", ())),
            temperature=None if temperature is None else float(temperature),
        )


IDENTITY = Calibrator("identity")


def _logit(conf: np.ndarray) -> np.ndarray:
    clipped = np.clip(conf, _EPS, 1 - _EPS)
    return np.log(clipped) - np.log1p(-clipped)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))


def _clean(confidence: Any, correct: Any) -> tuple[np.ndarray, np.ndarray]:
    """Rows with a known confidence, as floats, and their 0/1 correctness."""
    conf = np.asarray(confidence, dtype=np.float64).ravel()
    corr = np.asarray(correct, dtype=np.float64).ravel()
    if conf.shape != corr.shape:
        raise ValueError(f"confidence and correct differ in length: {conf.size} and {corr.size}")
    known = ~np.isnan(conf) & ~np.isnan(corr)
    return conf[known], corr[known]


def fit_calibrator(confidence: Any, correct: Any, kind: CalibratorKind = "isotonic") -> Calibrator:
    """Fit a monotone calibration map on labelled rows (NaN confidences are ignored).

    isotonic: scikit-learn's IsotonicRegression (non-decreasing, clipped to [0, 1], flat outside the fitted range).
    temperature: the T > 0 minimising the log-loss of sigmoid(logit(c) / T). identity, or too little signal
    (< MIN_ROWS rows, or one class only): the identity map.
    """
    conf, corr = _clean(confidence, correct)
    if kind == "identity" or conf.size < MIN_ROWS or np.unique(corr).size < 2:
        return IDENTITY
    if kind == "isotonic":
        from sklearn.isotonic import IsotonicRegression  # here: a run that applies a calibrator never imports sklearn

        model = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0, increasing=True)
        model.fit(conf, corr)
        return Calibrator(
            "isotonic",
            x=tuple(float(v) for v in model.X_thresholds_),
            y=tuple(float(v) for v in model.y_thresholds_),
        )
    if kind == "temperature":
        z = _logit(conf)
        sign = 2.0 * corr - 1.0

        def loss(log_t: float) -> float:
            return float(np.mean(np.logaddexp(0.0, -sign * z / np.exp(log_t))))

        from scipy import optimize

        result = optimize.minimize_scalar(loss, bounds=(-5.0, 5.0), method="bounded", options={"xatol": 1e-6})
        return Calibrator("temperature", temperature=float(np.exp(result.x)))
    raise ValueError(f"unknown calibrator kind {kind!r}: use 'isotonic', 'temperature' or 'identity'")


def reliability_table(confidence: Any, correct: Any, bins: int = 10) -> list[dict[str, Any]]:
    """Equal-width bins over [0, 1] (the last one closed): edges, row count, mean confidence and accuracy.

    Empty bins are listed with count 0 and None for the means. NaN confidences are left out.
    """
    if bins < 1:
        raise ValueError("bins must be at least 1")
    conf, corr = _clean(confidence, correct)
    conf = np.clip(conf, 0.0, 1.0)
    index = np.minimum((conf * bins).astype(np.int64), bins - 1)
    table = []
    for b in range(bins):
        mask = index == b
        count = int(mask.sum())
        table.append(
            {
                "lower": b / bins,
                "upper": (b + 1) / bins,
                "count": count,
                "mean_confidence": float(conf[mask].mean()) if count else None,
                "accuracy": float(corr[mask].mean()) if count else None,
            }
        )
    return table


def expected_calibration_error(confidence: Any, correct: Any, bins: int = 10) -> float:
    """Sum over equal-width bins of (share of rows) * |accuracy - mean confidence|; 0.0 for no rows."""
    table = reliability_table(confidence, correct, bins)
    total = sum(row["count"] for row in table)
    if total == 0:
        return 0.0
    return float(
        sum(row["count"] / total * abs(row["accuracy"] - row["mean_confidence"]) for row in table if row["count"])
    )
