"""Certified routing thresholds: a stated, finite-sample accuracy guarantee for the rows the small model keeps.

Pure: numpy and scipy only, no I/O, no Prefect.

The guarantee
-------------
Setting. A calibration set of n documents with gold answers gives, for one *part* (the label, or one required
field), pairs (c_i, y_i): the small model's confidence and whether its answer was right. Assume the calibration
documents and the future documents the router will see are i.i.d. draws from one distribution (more generally, one
exchangeable sequence: by de Finetti's theorem the statement below then holds conditionally on its directing
measure, hence also unconditionally). A row with a missing (NaN) confidence is never kept, at any threshold, as
the router escalates it.

For a threshold t, let acc(t) = P(y = 1 | c >= t) be the accuracy, on a future document, of this part's answer
given that its confidence clears t: the long-run accuracy of the kept rows. It is a property of the population
and of t, not of the calibration draw.

Procedure (default, "bonferroni"). The grid of thresholds is fixed before the data are seen (DEFAULT_GRID, m=53
values). For each t in the grid, test H0(t): acc(t) < target at level alpha = delta / m: with k_t of the n_t
calibration rows with c >= t correct, reject H0(t) when the one-sided Clopper-Pearson lower bound
LB(k_t, n_t, alpha) >= target. The certified threshold is the SMALLEST grid t whose H0(t) is rejected (the fewest
escalations); None when no t is rejected, and then every row escalates for this part.

Theorem. P( the chosen t is not None and acc(t) < target ) <= delta, the probability being over the draw of the
calibration set.

Proof. Given n_t, the kept calibration rows are n_t i.i.d. draws from the distribution of (c, y) given c >= t, so
k_t ~ Binomial(n_t, acc(t)) and the Clopper-Pearson bound gives P(LB >= target | n_t) <= alpha whenever
acc(t) < target (also for n_t = 0, when LB = 0). So each true null is falsely rejected with probability <= alpha,
and by the union bound P(any true null among the m is rejected) <= m * alpha = delta. Outside that event every
rejected t, in particular whichever one is chosen (by any rule, smallest or not), has acc(t) >= target. The search
over the grid is thus fully accounted for; what would not be covered is a grid chosen after looking at the data
(e.g. the distinct calibration confidences), or a threshold tuned on the same rows by other means.

What the guarantee is, and is not.
- It bounds the *population* accuracy acc(t) of kept rows. The realised accuracy of a finite future batch of N kept
  rows fluctuates around acc(t) by about sqrt(acc(1 - acc) / N); it is not itself bounded by the certificate.
- It is per part: the label's accuracy on the rows whose *label* confidence clears the label threshold, each
  field's accuracy on the rows whose *field* confidence clears that field's threshold. The router keeps a row only
  when every part clears its threshold; accuracy of a part on that smaller set is not covered by this theorem (it is
  usually higher, as confidences are positively related, but nothing here proves it). For a guarantee on whole rows,
  certify one part built from the row: confidence = the minimum over its parts, correct = all parts correct, and
  use that single threshold for every part.
- Joint over parts: `certify_parts` certifies each of P parts at delta / P, so by the union bound all P
  statements hold together with probability >= 1 - delta.
- Confidence calibration (engines/calibration.py) is monotone and so does not change which rows a threshold keeps;
  but a calibrator fitted on the very rows being certified makes the grid, on the raw scale, data-dependent. Fit the
  calibrator on other rows, or certify on the confidences as the router will compare them, with the calibrator
  fitted beforehand on a disjoint set.
- A distribution shift (new document sources, a changed prompt or model) voids the exchangeability assumption;
  the router's spec hash check covers the last two only.

Alternative ("fixed-sequence"), less conservative and also valid. Split the calibration rows by a seeded random
permutation (independent of the data's values) into an ordering part D1 (a share `split`, default 0.2) and a testing
part D2. On D1, find the grid threshold t0 with the smallest exact binomial p-value for H0(t0) (ties: the lowest
such threshold). On D2, test t0, then each lower grid threshold in descending order, each at the FULL level delta
with Clopper-Pearson, and stop at the first threshold not rejected; certify the lowest rejected threshold (None if
t0 itself is not rejected). Validity (fixed-sequence testing, Maurer et al. 1995; used for risk control in "Learn
then Test", Angelopoulos et al. 2021): conditionally on D1 the sequence is fixed and D2 is an independent i.i.d.
sample, so each test is valid at level delta given D1; the rejected thresholds form a prefix of the sequence, so if
any true null is rejected the first true null in the sequence is, which happens with probability <= delta. The
theorem above therefore holds for this procedure too. It avoids Bonferroni's log(m) cost at the price of testing
on fewer rows: in the simulations of `tests/test_certify.py` (800 rows, target 0.9, delta 0.1) it escalates about
0.51 of rows where the default escalates 0.63 to 0.67, and its observed failure rate (0.06 to 0.08) is closer to,
still under, delta (the default's: under 0.005).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from scipy import special, stats

DEFAULT_GRID: tuple[float, ...] = (*(round(0.02 * i, 2) for i in range(50)), 0.99, 0.995, 0.999)
"""Thresholds fixed before any data are seen: 0.00, 0.02, ..., 0.98, then 0.99, 0.995, 0.999 (53 values)."""

Procedure = Literal["bonferroni", "fixed-sequence"]


@dataclass(frozen=True)
class Certificate:
    """One part's certified threshold and the evidence behind it (see the module docstring for the guarantee)."""

    part: str
    threshold: float | None
    target_accuracy: float
    delta: float
    n: int
    kept: int
    kept_accuracy: float | None
    lower_bound: float | None
    escalation_rate: float
    grid_size: int
    method: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Certificate:
        def opt(key: str) -> float | None:
            value = data.get(key)
            return None if value is None else float(value)

        return cls(
            part=str(data["part"]),
            threshold=opt("threshold"),
            target_accuracy=float(data["target_accuracy"]),
            delta=float(data["delta"]),
            n=int(data["n"]),
            kept=int(data["kept"]),
            kept_accuracy=opt("kept_accuracy"),
            lower_bound=opt("lower_bound"),
            escalation_rate=float(data["escalation_rate"]),
            grid_size=int(data["grid_size"]),
            method=str(data["method"]),
        )


def clopper_pearson_lower(successes: int, trials: int, alpha: float) -> float:
    """One-sided exact lower confidence bound at level 1 - alpha for a binomial proportion; 0 when trials is 0."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if trials < 0 or not 0 <= successes <= max(trials, 0):
        raise ValueError(f"need 0 <= successes <= trials, got {successes} of {trials}")
    if trials == 0 or successes == 0:
        return 0.0
    return float(stats.beta.ppf(alpha, successes, trials - successes + 1))


def _cp_lower(successes: np.ndarray, trials: np.ndarray, alpha: float) -> np.ndarray:
    """Vectorised `clopper_pearson_lower`."""
    successes = np.asarray(successes, dtype=np.float64)
    trials = np.asarray(trials, dtype=np.float64)
    out = np.zeros(successes.shape, dtype=np.float64)
    ok = (trials > 0) & (successes > 0)
    if ok.any():
        out[ok] = special.betaincinv(successes[ok], trials[ok] - successes[ok] + 1, alpha)  # = beta.ppf, faster
    return out


def _as_arrays(confidence: Any, correct: Any) -> tuple[np.ndarray, np.ndarray]:
    """Float confidences with NaN made -inf (never kept), and 0/1 correctness."""
    conf = np.asarray(confidence, dtype=np.float64).ravel()
    corr = np.asarray(correct, dtype=np.float64).ravel()
    if conf.shape != corr.shape:
        raise ValueError(f"confidence and correct differ in length: {conf.size} and {corr.size}")
    if np.isnan(corr).any() or not np.isin(corr, (0.0, 1.0)).all():
        raise ValueError("correct must be booleans (or 0/1)")
    return np.where(np.isnan(conf), -np.inf, conf), corr


def _check_target(target_accuracy: float, delta: float) -> None:
    if not 0 < target_accuracy <= 1:
        raise ValueError(f"target_accuracy must be in (0, 1], got {target_accuracy}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def _check_grid(grid: Sequence[float]) -> np.ndarray:
    values = np.asarray(sorted({float(t) for t in grid}), dtype=np.float64)
    if values.size == 0 or not np.isfinite(values).all():
        raise ValueError("the grid needs at least one finite threshold")
    return values


def _counts(conf: np.ndarray, corr: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each grid threshold: how many rows have confidence >= t, and how many of those are correct."""
    order = np.argsort(conf, kind="stable")
    sorted_conf = conf[order]
    suffix_correct = np.concatenate([np.cumsum(corr[order][::-1])[::-1], [0.0]])
    first = np.searchsorted(sorted_conf, grid, side="left")
    return (conf.size - first).astype(np.int64), suffix_correct[first].astype(np.int64)


def _binomial_pvalue(successes: np.ndarray, trials: np.ndarray, target: float) -> np.ndarray:
    """Exact p-value of H0 "accuracy <= target" against "> target": P(Binomial(trials, target) >= successes)."""
    p = stats.binom.sf(successes - 1, trials, target)
    return np.where(trials > 0, p, 1.0)


def _certificate(
    part: str,
    threshold: float | None,
    conf: np.ndarray,
    corr: np.ndarray,
    *,
    target_accuracy: float,
    delta: float,
    lower_bound: float | None,
    grid_size: int,
    method: str,
) -> Certificate:
    n = int(conf.size)
    if threshold is None:
        kept, kept_accuracy = 0, None
    else:
        mask = conf >= threshold
        kept = int(mask.sum())
        kept_accuracy = float(corr[mask].mean()) if kept else None
    return Certificate(
        part=part,
        threshold=threshold,
        target_accuracy=float(target_accuracy),
        delta=float(delta),
        n=n,
        kept=kept,
        kept_accuracy=kept_accuracy,
        lower_bound=lower_bound,
        escalation_rate=1.0 - kept / n if n else 1.0,
        grid_size=grid_size,
        method=method,
    )


def certify_threshold(
    confidence: Any,
    correct: Any,
    *,
    part: str,
    target_accuracy: float,
    delta: float,
    grid: Sequence[float] = DEFAULT_GRID,
    procedure: Procedure = "bonferroni",
    split: float = 0.2,
    seed: int = 0,
) -> Certificate:
    """The smallest grid threshold whose kept rows certifiably reach `target_accuracy` with probability >= 1 - delta.

    `procedure="bonferroni"` (default): every grid threshold tested at delta / len(grid) on all rows.
    `procedure="fixed-sequence"`: a seeded random share `split` of the rows picks where to start, the other rows
    test the grid downwards from there at delta (see the module docstring for both proofs). Kept count, kept
    accuracy and escalation rate are reported on all calibration rows; the lower bound is the one the decision used.
    """
    _check_target(target_accuracy, delta)
    conf, corr = _as_arrays(confidence, correct)
    thresholds = _check_grid(grid)
    m = int(thresholds.size)
    common = {"target_accuracy": target_accuracy, "delta": delta, "grid_size": m}

    if procedure == "bonferroni":
        alpha = delta / m
        n_t, k_t = _counts(conf, corr, thresholds)
        lower = _cp_lower(k_t, n_t, alpha)
        passing = np.flatnonzero(lower >= target_accuracy)
        method = f"clopper-pearson, bonferroni over a fixed grid of {m} thresholds (each at alpha={alpha:.3g})"
        if passing.size == 0:
            return _certificate(part, None, conf, corr, lower_bound=None, method=method, **common)
        i = int(passing[0])
        return _certificate(
            part, float(thresholds[i]), conf, corr, lower_bound=float(lower[i]), method=method, **common
        )

    if procedure == "fixed-sequence":
        if not 0 < split < 1:
            raise ValueError(f"split must be in (0, 1), got {split}")
        permutation = np.random.default_rng(seed).permutation(conf.size)
        n_order = math.floor(conf.size * split)
        order_rows, test_rows = permutation[:n_order], permutation[n_order:]
        n1, k1 = _counts(conf[order_rows], corr[order_rows], thresholds)
        start = int(np.argmin(_binomial_pvalue(k1, n1, target_accuracy)))
        n2, k2 = _counts(conf[test_rows], corr[test_rows], thresholds)
        lower = _cp_lower(k2, n2, delta)
        rejected = []
        for i in range(start, -1, -1):  # t0, then each lower threshold
            if lower[i] < target_accuracy:
                break
            rejected.append(i)
        method = (
            f"clopper-pearson, fixed-sequence down a fixed grid of {m} thresholds at alpha={delta:.3g}: "
            f"start chosen on {n_order} rows, tests on {conf.size - n_order} other rows (seed {seed})"
        )
        if not rejected:
            return _certificate(part, None, conf, corr, lower_bound=None, method=method, **common)
        i = rejected[-1]
        return _certificate(
            part, float(thresholds[i]), conf, corr, lower_bound=float(lower[i]), method=method, **common
        )

    raise ValueError(f"unknown procedure {procedure!r}: use 'bonferroni' or 'fixed-sequence'")


def certify_parts(
    parts: Mapping[str, tuple[Any, Any]],
    *,
    target_accuracy: float,
    delta: float,
    grid: Sequence[float] = DEFAULT_GRID,
    procedure: Procedure = "bonferroni",
    split: float = 0.2,
    seed: int = 0,
) -> dict[str, Certificate]:
    """Certify each part at delta / len(parts), so all parts' statements hold together with probability >= 1 - delta."""
    _check_target(target_accuracy, delta)
    if not parts:
        return {}
    per_part = delta / len(parts)
    return {
        name: certify_threshold(
            confidence,
            correct,
            part=name,
            target_accuracy=target_accuracy,
            delta=per_part,
            grid=grid,
            procedure=procedure,
            split=split,
            seed=seed,
        )
        for name, (confidence, correct) in parts.items()
    }


def escalation_rate(parts_confidence: Mapping[str, Any], certificates: Mapping[str, Certificate]) -> float:
    """Share of rows escalated: a row escalates when ANY certified part is under its threshold.

    A part with threshold None always escalates; a NaN confidence is under every threshold (as in the router).
    Every certified part needs its confidences; parts without a certificate are ignored. No parts: 0.0.
    """
    missing = [part for part in certificates if part not in parts_confidence]
    if missing:
        raise ValueError(f"no confidences for certified parts: {', '.join(missing)}")
    lengths = {np.asarray(parts_confidence[p], dtype=np.float64).size for p in certificates}
    if len(lengths) > 1:
        raise ValueError(f"parts have different numbers of rows: {sorted(lengths)}")
    n = lengths.pop() if lengths else 0
    if n == 0:
        return 0.0
    escalate = np.zeros(n, dtype=bool)
    for part, cert in certificates.items():
        conf = np.asarray(parts_confidence[part], dtype=np.float64).ravel()
        if cert.threshold is None:
            return 1.0
        escalate |= np.isnan(conf) | (conf < cert.threshold)
    return float(escalate.mean())


def _per_row(value: Any, n: int, name: str) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if array.ndim == 0:
        return np.full(n, float(array))
    array = array.ravel()
    if array.size != n:
        raise ValueError(f"{name} has {array.size} values for {n} rows")
    return array


def accuracy_cost_curve(
    confidence: Any,
    correct: Any,
    *,
    small_cost: Any,
    frontier_cost: Any,
    frontier_correct: Any = None,
    thresholds: Sequence[float] | None = None,
) -> list[dict[str, Any]]:
    """Accuracy and cost of routing at each threshold: keep rows with confidence >= t, send the rest to the frontier.

    `small_cost` and `frontier_cost` are per-row arrays or scalars (every row pays the small model; escalated rows
    also pay the frontier). `frontier_correct` (array or scalar) defaults to 1.0: the frontier answer is taken as
    right. Default thresholds: 0, every distinct confidence, and one just above the largest (all escalated).
    NaN confidences escalate at every threshold. Each point: threshold, kept, kept_fraction, escalation_rate,
    kept_accuracy (None if nothing kept), accuracy (of all rows as routed), cost_per_row. Sorted by threshold.
    """
    conf, corr = _as_arrays(confidence, correct)
    n = conf.size
    small = _per_row(small_cost, n, "small_cost")
    frontier = _per_row(frontier_cost, n, "frontier_cost")
    frontier_ok = _per_row(1.0 if frontier_correct is None else frontier_correct, n, "frontier_correct")
    finite = conf[np.isfinite(conf)]
    if thresholds is None:
        top = float(max(finite.max(initial=0.0), 0.0))
        points = np.unique(np.concatenate([[0.0], finite, [np.nextafter(top, np.inf)]]))
    else:
        points = np.asarray(sorted({float(t) for t in thresholds}), dtype=np.float64)
    if n == 0:
        return []
    order = np.argsort(conf, kind="stable")
    sorted_conf = conf[order]

    def suffix(values: np.ndarray) -> np.ndarray:
        return np.concatenate([np.cumsum(values[order][::-1])[::-1], [0.0]])

    kept_correct = suffix(corr)
    kept_frontier_ok = suffix(frontier_ok)
    kept_frontier_cost = suffix(frontier)
    total_frontier_ok, total_frontier_cost, small_per_row = frontier_ok.sum(), frontier.sum(), small.mean()
    first = np.searchsorted(sorted_conf, points, side="left")
    curve = []
    for t, i in zip(points, first, strict=True):
        kept = int(n - i)
        routed_correct = kept_correct[i] + (total_frontier_ok - kept_frontier_ok[i])
        curve.append(
            {
                "threshold": float(t),
                "kept": kept,
                "kept_fraction": kept / n,
                "escalation_rate": 1.0 - kept / n,
                "kept_accuracy": float(kept_correct[i] / kept) if kept else None,
                "accuracy": float(routed_correct / n),
                "cost_per_row": float(small_per_row + (total_frontier_cost - kept_frontier_cost[i]) / n),
            }
        )
    return curve
