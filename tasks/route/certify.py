"""Certified routing thresholds: a stated, finite-sample accuracy guarantee, on the kept rows or on the whole output.

Pure: numpy and scipy only, no I/O, no Prefect.

Two guarantees are offered (`routing.guarantee`): "kept" (the default, below) bounds the accuracy of the rows the
small model keeps, each kept row being trustworthy on its own; "overall" (further below) bounds the accuracy of the
whole routed output relative to the frontier, the target the cascade literature states (BARGAIN's accuracy-target
queries, behind DocETL's `cascade:`), and escalates far fewer rows at the same target.

The "kept" guarantee
--------------------
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
- Confidence calibration (engines/scoring/calibration.py) is monotone and so does not change which rows a threshold
  keeps;
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

The "overall" guarantee
-----------------------
Setting as above: n calibration rows, i.i.d. (or exchangeable) with the future documents, one part at a time; a
NaN confidence is never kept. The routed output takes the small model's answer where c >= t and the frontier's
elsewhere. Count an escalated row as right *relative to the frontier* (it carries the frontier's answer), so only a
kept-and-wrong row counts against the output. For a threshold t let

    R(t) = P(c >= t and y = 0)      (the risk: a future row is kept with a wrong answer)
    A(t) = 1 - R(t)                 (the accuracy of the routed output relative to the frontier)

both properties of the population and of t. What A(t) means for answers: the routed output differs from the
frontier's output on at most a share 1 - A(t) of documents when the gold answers are the frontier's own
(`docroute calibrate --oracle frontier`); against human gold labels its accuracy is at least
A(t) + (frontier accuracy) - 1, and exactly A(t) when the frontier is taken to be right.

Statistic. X_t = #{i : c_i >= t, y_i = 0}, the kept-and-wrong calibration rows. Unlike k_t above its number of
trials is not random: every one of the n rows is a Bernoulli(R(t)) trial, so X_t ~ Binomial(n, R(t)) exactly, and
all n rows (kept or not) carry evidence. Let UB(x, n, alpha) be the one-sided Clopper-Pearson upper bound
(1 when x = n, so also when n = 0); it satisfies P(UB(X_t, n, alpha) < R(t)) <= alpha for every value of R(t).
Reject H0(t): A(t) < target, i.e. R(t) > 1 - target, when LB_A(t) := 1 - UB(X_t, n, alpha) >= target. Under
H0(t), rejection means UB(X_t) <= 1 - target < R(t), so it has probability <= alpha.

Procedures. "bonferroni": every grid t at alpha = delta / m, certify the smallest rejected t; the proof above
applies word for word (union bound over the m true nulls). "fixed-sequence": test the grid from its TOP downwards,
each at the FULL level delta, on ALL n rows (no ordering split: `split` and `seed` are unused), stop at the first
threshold not rejected, certify the lowest rejected one.

Theorem (overall). For either procedure, P( the chosen t is not None and A(t) < target ) <= delta, over the draw
of the calibration set.

Proof for fixed-sequence. R is non-increasing in t ({c >= t'} is contained in {c >= t} for t' > t), so the true
nulls form a lower set of the grid: if H0(t) holds, so does H0(t') for every t' < t. Let t* be the largest grid
threshold whose null is true (if none is, no rejection can be false and there is nothing to prove). Going down from
the top, the false nulls above t* may be rejected; the first true null the sequence meets is t*, and every other
true null lies below it. The sequence only reaches a threshold below t* by rejecting t*, so a false certification
(the chosen t is a true null) implies that H0(t*) was rejected, an event of probability <= delta by the test's
validity at the single, fixed threshold t*. The order is fixed by the direction of the monotonicity, known before
the data are seen, which is why no D1 split is needed (the "kept" accuracy acc(t) has no such direction: it may
rise or fall as t decreases, so its order must be learned, on rows not used for testing). A second view of the same
fact: X_t is itself non-increasing in t, so UB(X_t) is, and the rejected set is always an upper set of the grid;
the fixed-sequence choice is therefore the smallest t with LB_A(t) >= target at level delta, the bonferroni rule
with delta in place of delta / m. It certifies a threshold at or below bonferroni's on every calibration set, and is
the better choice for "overall"; bonferroni is kept so that both guarantees offer the same two procedures. In the
simulations of `tests/test_certify.py` (800 rows, target 0.9, delta 0.1, the same draws as above) "overall"
escalates about 0.32 of rows with bonferroni and 0.24 to 0.25 with fixed-sequence, where "kept" escalates 0.63 to
0.67 and 0.51; observed failure rates 0.000 and 0.04 to 0.06, under delta.

What the "overall" guarantee is, and is not.
- It bounds a population rate, not the realised share of a finite future batch (which fluctuates around R(t)).
- It says nothing about a kept row taken alone: the kept rows' accuracy may be far below target when few rows are
  kept (A(t) = 1 - P(kept) * (1 - acc(t))). Use "kept" where each kept row feeds an automated action.
- Per part: R_p(t_p) counts rows where part p's confidence clears t_p and p is wrong. The router keeps a row only
  when every part clears its threshold, a subset of those rows, so P(row kept and p wrong) <= R_p(t_p): unlike the
  "kept" guarantee, the per-part statement does carry over to the rows the router actually keeps. For a whole-row
  statement (every part right), certify one row part (minimum confidence, correct = all parts right) as above; by
  the union bound the per-part statements alone only give a whole-row error <= sum over parts of (1 - target).
- Joint over parts: `certify_parts` certifies each of P parts at delta / P, so all P statements hold together with
  probability >= 1 - delta (union bound). The calibrator and distribution-shift caveats above apply unchanged.

Whole documents (`routing.guarantee_unit: document`)
----------------------------------------------------
Both guarantees above are stated per part. With several required parts (a label and fields, or several fields)
the per-part statements do not bound the share of *documents* that are right in every part: on receipts with four
required fields each part met 0.90 overall while only 0.844 of whole rows did (BENCHMARKS.md). `certify_document`
certifies the document instead, as one derived part of every row:

    c_doc = min over the required parts of that part's confidence     (NaN if any part's is NaN)
    y_doc = 1 when every required part is right, else 0

and gives every part the one threshold t certified for (c_doc, y_doc). The router keeps a row when every part
clears its threshold, and with one t for all parts that is exactly c_doc >= t: the rows the router keeps are the
rows the certificate speaks about, so either theorem above applies word for word to (c_doc, y_doc), with no
condition on how the parts' confidences relate. "kept" then bounds P(every part right | row kept); "overall" bounds
P(row kept and some part wrong), i.e. the share of documents whose routed answer differs from the frontier's in any
part. It is one statement, so it is made at the full delta (no union bound over parts); only documents with gold
answers for every required part are used (the caller aligns them). Any fixed score works in place of the minimum;
the minimum is chosen because it needs no data and keeps a row only when no part is doubtful. The price is more
escalation than per-part thresholds at the same target, since the target now applies to the product of the parts'
correctness; the per-part certificates remain the default.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import numpy as np
from scipy import special

DEFAULT_GRID: tuple[float, ...] = (*(round(0.02 * i, 2) for i in range(50)), 0.99, 0.995, 0.999)
"""Thresholds fixed before any data are seen: 0.00, 0.02, ..., 0.98, then 0.99, 0.995, 0.999 (53 values)."""

Procedure = Literal["bonferroni", "fixed-sequence"]
Guarantee = Literal["kept", "overall"]
GUARANTEES: tuple[Guarantee, ...] = ("kept", "overall")
Unit = Literal["part", "document"]
"""What one certificate speaks about: each required part on its own, or whole documents (every part right)."""
UNITS: tuple[Unit, ...] = ("part", "document")
DOCUMENT_PART = "document"
"""The name of the derived part `certify_document` certifies before copying its threshold to every part."""


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
    guarantee: str = "kept"  # what `lower_bound` bounds: acc(t) of kept rows, or A(t) of the routed output
    unit: str = "part"
    """part: this part's own statement; document: one statement on whole rows, shared by every part (the counts,
    accuracy and bound are then the document's)."""

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
            guarantee=str(data.get("guarantee", "kept")),  # routers written before "overall" existed certify "kept"
            unit=str(data.get("unit", "part")),  # and before "document" existed, every certificate was per part
        )


def clopper_pearson_lower(successes: int, trials: int, alpha: float) -> float:
    """One-sided exact lower confidence bound at level 1 - alpha for a binomial proportion; 0 when trials is 0."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if trials < 0 or not 0 <= successes <= max(trials, 0):
        raise ValueError(f"need 0 <= successes <= trials, got {successes} of {trials}")
    if trials == 0 or successes == 0:
        return 0.0
    from scipy import stats  # here: importing scipy.stats costs a run that only applies a router 0.3 s

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


def _cp_upper(successes: np.ndarray, trials: int, alpha: float) -> np.ndarray:
    """Vectorised one-sided Clopper-Pearson upper bound at level 1 - alpha; 1 when successes == trials (or 0 trials)."""
    successes = np.asarray(successes, dtype=np.float64)
    out = np.ones(successes.shape, dtype=np.float64)
    ok = successes < trials
    if ok.any():
        out[ok] = special.betaincinv(successes[ok] + 1, trials - successes[ok], 1 - alpha)
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
    from scipy import stats

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
    guarantee: str = "kept",
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
        guarantee=guarantee,
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
    guarantee: Guarantee = "kept",
) -> Certificate:
    """The smallest grid threshold that certifiably reaches `target_accuracy` with probability >= 1 - delta.

    `guarantee="kept"` (default) certifies the accuracy of the kept rows; `guarantee="overall"` the accuracy of the
    whole routed output relative to the frontier (kept-and-wrong rows are the only errors), which uses every row as
    evidence and escalates fewer rows (see the module docstring for both theorems and what each does not say).
    `procedure="bonferroni"` (default): every grid threshold tested at delta / len(grid) on all rows.
    `procedure="fixed-sequence"`: for "kept", a seeded random share `split` of the rows picks where to start, the
    other rows test the grid downwards from there at delta; for "overall", all rows test the grid from its top down
    at delta (the risk's monotonicity fixes the order, so no split). Kept count, kept accuracy and escalation rate
    are reported on all calibration rows; the lower bound is the one the decision used, on the certified quantity.
    """
    _check_target(target_accuracy, delta)
    conf, corr = _as_arrays(confidence, correct)
    thresholds = _check_grid(grid)
    m = int(thresholds.size)
    if guarantee == "overall":
        return _certify_overall(
            part, conf, corr, thresholds, target_accuracy=target_accuracy, delta=delta, procedure=procedure
        )
    if guarantee != "kept":
        raise ValueError(f"unknown guarantee {guarantee!r}: use 'kept' or 'overall'")
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


def _certify_overall(
    part: str,
    conf: np.ndarray,
    corr: np.ndarray,
    thresholds: np.ndarray,
    *,
    target_accuracy: float,
    delta: float,
    procedure: str,
) -> Certificate:
    """The "overall" guarantee: the smallest grid t whose lower bound on A(t) = 1 - P(c >= t, wrong) meets the target.

    Both procedures reduce to one rule because the kept-and-wrong count is non-increasing in t, so the passing
    thresholds are always an upper set of the grid: bonferroni tests each at delta / m; fixed-sequence walks down
    from the top at delta and stops at the first failure, which is the same as the smallest passing t at delta.
    """
    m = int(thresholds.size)
    n = int(conf.size)
    if procedure == "bonferroni":
        alpha = delta / m
        method = (
            f"overall (kept-and-wrong rows among all {n}), clopper-pearson upper bound, bonferroni over a fixed grid "
            f"of {m} thresholds (each at alpha={alpha:.3g})"
        )
    elif procedure == "fixed-sequence":
        alpha = delta
        method = (
            f"overall (kept-and-wrong rows among all {n}), clopper-pearson upper bound, fixed-sequence from the top "
            f"of a fixed grid of {m} thresholds down at alpha={alpha:.3g} (monotone risk: no ordering split)"
        )
    else:
        raise ValueError(f"unknown procedure {procedure!r}: use 'bonferroni' or 'fixed-sequence'")
    kept, right = _counts(conf, corr, thresholds)
    lower = 1.0 - _cp_upper(kept - right, n, alpha)
    chosen: int | None = None
    for i in range(m - 1, -1, -1):  # top down; stopping at the first failure is what makes fixed-sequence valid
        if lower[i] < target_accuracy:
            break
        chosen = i
    threshold = None if chosen is None else float(thresholds[chosen])
    bound = None if chosen is None else float(lower[chosen])
    return _certificate(
        part,
        threshold,
        conf,
        corr,
        target_accuracy=target_accuracy,
        delta=delta,
        lower_bound=bound,
        grid_size=m,
        method=method,
        guarantee="overall",
    )


def certify_parts(
    parts: Mapping[str, tuple[Any, Any]],
    *,
    target_accuracy: float,
    delta: float,
    grid: Sequence[float] = DEFAULT_GRID,
    procedure: Procedure = "bonferroni",
    split: float = 0.2,
    seed: int = 0,
    guarantee: Guarantee = "kept",
    unit: Unit = "part",
) -> dict[str, Certificate]:
    """Certify each part at delta / len(parts), so all parts' statements hold together with probability >= 1 - delta.

    `unit="document"` certifies whole documents instead (`certify_document`): one threshold for every part, one
    statement at the full delta; the parts' arrays must then be aligned row by row.
    """
    _check_target(target_accuracy, delta)
    if not parts:
        return {}
    options = {"grid": grid, "procedure": procedure, "split": split, "seed": seed, "guarantee": guarantee}
    if unit == "document":
        return certify_document(parts, target_accuracy=target_accuracy, delta=delta, **options)
    if unit != "part":
        raise ValueError(f"unknown unit {unit!r}: use 'part' or 'document'")
    per_part = delta / len(parts)
    return {
        name: certify_threshold(
            confidence, correct, part=name, target_accuracy=target_accuracy, delta=per_part, **options
        )
        for name, (confidence, correct) in parts.items()
    }


def document_arrays(parts: Mapping[str, tuple[Any, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Each row's document confidence (the minimum over parts; -inf, never kept, if any part's is NaN) and
    correctness (1 when every part is right)."""
    arrays = [_as_arrays(confidence, correct) for confidence, correct in parts.values()]
    sizes = {conf.size for conf, _ in arrays}
    if len(sizes) > 1:
        raise ValueError(f"document-level certification needs aligned parts; they have {sorted(sizes)} rows")
    confidence = np.min(np.vstack([conf for conf, _ in arrays]), axis=0)  # a NaN part is -inf here: never kept
    correct = np.logical_and.reduce([corr.astype(bool) for _, corr in arrays]).astype(np.float64)
    return confidence, correct


def certify_document(
    parts: Mapping[str, tuple[Any, Any]],
    *,
    target_accuracy: float,
    delta: float,
    grid: Sequence[float] = DEFAULT_GRID,
    procedure: Procedure = "bonferroni",
    split: float = 0.2,
    seed: int = 0,
    guarantee: Guarantee = "kept",
) -> dict[str, Certificate]:
    """One certificate on whole documents, its threshold given to every part (see "Whole documents" above)."""
    if not parts:
        return {}
    confidence, correct = document_arrays(parts)
    certificate = certify_threshold(
        confidence,
        correct,
        part=DOCUMENT_PART,
        target_accuracy=target_accuracy,
        delta=delta,
        grid=grid,
        procedure=procedure,
        split=split,
        seed=seed,
        guarantee=guarantee,
    )
    method = (
        f"document-level (confidence: the minimum over {', '.join(parts)}; right: every one of them right), "
        + certificate.method
    )
    return {name: replace(certificate, part=name, unit="document", method=method) for name in parts}


def guarantee_of(certificates: Mapping[str, Certificate]) -> str:
    """The guarantee every certificate states ("kept" when there are none); "mixed" when parts differ.

    A router can combine certificates from different rounds (`docroute train` keeps the parts its head does not
    answer), so the router-level label is derived rather than assumed.
    """
    kinds = {cert.guarantee for cert in certificates.values()}
    if not kinds:
        return "kept"
    return kinds.pop() if len(kinds) == 1 else "mixed"


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
