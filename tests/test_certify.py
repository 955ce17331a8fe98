"""Certified thresholds (tasks/route/certify.py) and confidence calibration (engines/scoring/calibration.py).

The simulations draw many calibration sets from populations whose true accuracy above any threshold (the "kept"
guarantee) and true routed accuracy relative to the frontier (the "overall" guarantee) are known in closed form, and
check that the certified threshold's TRUE value falls short of the target no more often than delta says. Seeded and
deterministic; a few seconds in all.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
from dataclasses import dataclass

import numpy as np
import pytest
from scipy import special, stats

from docroute.engines.scoring.calibration import (
    Calibrator,
    expected_calibration_error,
    fit_calibrator,
    reliability_table,
)
from docroute.tasks.route.certify import (
    DEFAULT_GRID,
    Certificate,
    accuracy_cost_curve,
    certify_parts,
    certify_threshold,
    clopper_pearson_lower,
    document_arrays,
    escalation_rate,
    guarantee_of,
)
from docroute.tasks.route.router import Router

TARGET = 0.9
DELTA = 0.1
SLACK = 0.03  # Monte-Carlo slack on a failure frequency from 600 draws (its standard error is at most 0.012)
DRAWS = 600
ROWS = 800


@dataclass(frozen=True)
class Population:
    """Confidence ~ Beta(a, b); P(correct | c) = base + scale * c**power, increasing in c."""

    a: float
    b: float
    base: float
    scale: float
    power: float

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        confidence = rng.beta(self.a, self.b, n)
        return confidence, self.correct(rng, confidence)

    def correct(self, rng: np.random.Generator, confidence: np.ndarray) -> np.ndarray:
        return rng.random(confidence.size) < self.base + self.scale * confidence**self.power

    def true_accuracy(self, t: float) -> float:
        """acc(t) = E[g(c) | c >= t], exactly: E[c^p 1{c >= t}] = B(a+p, b)/B(a, b) * P(Beta(a+p, b) >= t)."""
        tail = special.betaincc(self.a, self.b, t)
        moment = special.beta(self.a + self.power, self.b) / special.beta(self.a, self.b)
        return float(self.base + self.scale * moment * special.betaincc(self.a + self.power, self.b, t) / tail)

    def kept_share(self, t: float) -> float:
        return float(special.betaincc(self.a, self.b, t))

    def true_overall(self, t: float) -> float:
        """A(t) = 1 - P(c >= t, wrong) = 1 - (P(c >= t) - E[g(c) 1{c >= t}]), exactly (same moment as above)."""
        tail = special.betaincc(self.a, self.b, t)
        moment = special.beta(self.a + self.power, self.b) / special.beta(self.a, self.b)
        kept_right = self.base * tail + self.scale * moment * special.betaincc(self.a + self.power, self.b, t)
        return float(1.0 - (tail - kept_right))

    def truth(self, guarantee: str, t: float) -> float:
        """The quantity `guarantee` certifies, at threshold t."""
        return self.true_overall(t) if guarantee == "overall" else self.true_accuracy(t)


LINEAR = Population(a=2.0, b=1.0, base=0.5, scale=0.5, power=1.0)
CURVED = Population(a=6.0, b=1.2, base=0.3, scale=0.7, power=1.5)
STEEP = Population(a=8.0, b=1.5, base=0.3, scale=0.7, power=1.5)


GRID = np.asarray(DEFAULT_GRID)


def _grid_counts(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each grid threshold: rows kept (confidence >= t) and how many of them are right."""
    order = np.argsort(confidence)
    right_from = np.concatenate([np.cumsum(correct[order][::-1])[::-1], [0]])
    first = np.searchsorted(confidence[order], GRID, side="left")
    return confidence.size - first, right_from[first]


def _smallest(passing: np.ndarray) -> float | None:
    return float(GRID[np.argmax(passing)]) if passing.any() else None


@functools.cache
def _simulate(population: Population, procedure: str, seed: int) -> dict[str, float]:
    """Failure and success rates of `procedure`, and of an invalid rival, over DRAWS calibration sets."""
    rng = np.random.default_rng(seed)
    failures = found = naive_failures = 0
    escalations = []
    for _ in range(DRAWS):
        confidence, correct = population.sample(rng, ROWS)
        cert = certify_threshold(
            confidence, correct, part="label", target_accuracy=TARGET, delta=DELTA, procedure=procedure
        )
        escalations.append(cert.escalation_rate)
        if cert.threshold is not None:
            found += 1
            failures += population.true_accuracy(cert.threshold) < TARGET
        kept, right = _grid_counts(confidence, correct)
        naive = _smallest((kept > 0) & (right >= TARGET * kept))  # an invalid rival: the point estimate
        naive_failures += naive is not None and population.true_accuracy(naive) < TARGET
    return {
        "failure": failures / DRAWS,
        "found": found / DRAWS,
        "escalation": float(np.mean(escalations)),
        "naive_failure": naive_failures / DRAWS,
    }


# --- Clopper-Pearson ------------------------------------------------------------------------------------------------


def test_clopper_pearson_matches_scipy_and_edges() -> None:
    assert clopper_pearson_lower(90, 100, 0.05) == pytest.approx(stats.beta.ppf(0.05, 90, 11), rel=1e-12)
    assert clopper_pearson_lower(7, 10, 0.1) == pytest.approx(stats.beta.ppf(0.1, 7, 4), rel=1e-12)
    # scipy's own exact binomial interval agrees (two-sided at 1 - 2 alpha has the one-sided bound as its lower end)
    interval = stats.binomtest(45, 50).proportion_ci(confidence_level=0.9, method="exact")
    assert clopper_pearson_lower(45, 50, 0.05) == pytest.approx(interval.low, rel=1e-9)
    assert clopper_pearson_lower(0, 0, 0.05) == 0.0
    assert clopper_pearson_lower(0, 25, 0.05) == 0.0
    assert clopper_pearson_lower(20, 20, 0.05) == pytest.approx(0.05 ** (1 / 20), rel=1e-12)
    bounds = [clopper_pearson_lower(k, 40, 0.05) for k in range(41)]
    assert all(b2 > b1 for b1, b2 in itertools.pairwise(bounds))
    assert clopper_pearson_lower(30, 40, 0.01) < clopper_pearson_lower(30, 40, 0.05) < 30 / 40
    with pytest.raises(ValueError):
        clopper_pearson_lower(5, 4, 0.05)
    with pytest.raises(ValueError):
        clopper_pearson_lower(1, 4, 0.0)


def test_default_grid_is_fixed_and_sorted() -> None:
    assert len(DEFAULT_GRID) == 53
    assert DEFAULT_GRID[0] == 0.0 and DEFAULT_GRID[-4:] == (0.98, 0.99, 0.995, 0.999)
    assert list(DEFAULT_GRID) == sorted(set(DEFAULT_GRID))


def test_population_accuracy_formula_matches_monte_carlo() -> None:
    rng = np.random.default_rng(0)
    confidence, correct = CURVED.sample(rng, 400_000)
    for t in (0.0, 0.5, 0.8, 0.9):
        kept = confidence >= t
        assert CURVED.true_accuracy(t) == pytest.approx(correct[kept].mean(), abs=0.006)
        assert CURVED.kept_share(t) == pytest.approx(kept.mean(), abs=0.003)
        assert CURVED.true_overall(t) == pytest.approx(1 - (kept & ~correct).mean(), abs=0.003)


# --- the guarantee, by simulation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("procedure", ["bonferroni", "fixed-sequence"])
@pytest.mark.parametrize(("population", "seed"), [(LINEAR, 1), (CURVED, 2)], ids=["linear", "curved"])
def test_certified_threshold_meets_target_with_probability_one_minus_delta(
    population: Population, seed: int, procedure: str
) -> None:
    oracle = min(t for t in DEFAULT_GRID if population.true_accuracy(t) >= TARGET)
    assert population.true_accuracy(0.0) < TARGET < population.true_accuracy(oracle)  # reachable, and not by all
    result = _simulate(population, procedure, seed)
    assert result["failure"] <= DELTA + SLACK, result
    assert result["found"] >= 0.75, result  # meaningful: a threshold is certified in most draws
    assert result["escalation"] >= 1 - population.kept_share(oracle) - 0.02, result  # never beats the oracle by much
    # the same draws are able to catch an invalid rule: the point estimate over the grid fails far more than delta
    assert result["naive_failure"] > 3 * DELTA, result


def test_fixed_sequence_escalates_less_than_bonferroni() -> None:
    bonferroni = _simulate(CURVED, "bonferroni", 2)  # the same draws as the test above (cached)
    fixed = _simulate(CURVED, "fixed-sequence", 2)
    assert fixed["escalation"] < bonferroni["escalation"] - 0.05
    assert fixed["failure"] <= DELTA + SLACK


@pytest.mark.parametrize("guarantee", ["kept", "overall"])
@pytest.mark.parametrize("procedure", ["bonferroni", "fixed-sequence"])
def test_parts_hold_jointly_with_probability_one_minus_delta(procedure: str, guarantee: str) -> None:
    """Three parts with dependent confidences (a Gaussian copula), each certified at delta/3."""
    populations = {"label": LINEAR, "amount": CURVED, "date": STEEP}
    rng = np.random.default_rng(3)
    rows = 1500
    failures = all_found = 0
    for _ in range(DRAWS):
        shared = rng.standard_normal(rows)
        parts = {}
        for name, pop in populations.items():
            latent = (shared + rng.standard_normal(rows)) / math.sqrt(2)
            confidence = special.betaincinv(pop.a, pop.b, special.ndtr(latent))
            parts[name] = (confidence, pop.correct(rng, confidence))
        certs = certify_parts(
            parts,
            target_accuracy=TARGET,
            delta=DELTA,
            procedure=procedure,
            guarantee=guarantee,  # type: ignore[arg-type]
        )
        assert all(cert.delta == pytest.approx(DELTA / 3) and cert.guarantee == guarantee for cert in certs.values())
        all_found += all(cert.threshold is not None for cert in certs.values())
        failures += any(
            cert.threshold is not None and populations[name].truth(guarantee, cert.threshold) < TARGET
            for name, cert in certs.items()
        )
    assert failures / DRAWS <= DELTA + SLACK
    assert all_found / DRAWS >= 0.75


# --- the "overall" guarantee, by simulation -------------------------------------------------------------------------


@functools.cache
def _simulate_overall(population: Population, procedure: str, seed: int) -> dict[str, float]:
    """Like `_simulate` for guarantee="overall", with the "kept" certificate of the same draws for comparison."""
    rng = np.random.default_rng(seed)
    failures = found = naive_failures = 0
    overall_escalations, kept_escalations = [], []
    for _ in range(DRAWS):
        confidence, correct = population.sample(rng, ROWS)
        common = {"part": "label", "target_accuracy": TARGET, "delta": DELTA, "procedure": procedure}
        cert = certify_threshold(confidence, correct, guarantee="overall", **common)  # type: ignore[arg-type]
        kept_cert = certify_threshold(confidence, correct, guarantee="kept", **common)  # type: ignore[arg-type]
        overall_escalations.append(cert.escalation_rate)
        kept_escalations.append(kept_cert.escalation_rate)
        if cert.threshold is not None:
            found += 1
            failures += population.true_overall(cert.threshold) < TARGET
        kept, right = _grid_counts(confidence, correct)
        naive = _smallest(1 - (kept - right) / ROWS >= TARGET)  # an invalid rival: the point estimate of A(t)
        naive_failures += naive is not None and population.true_overall(naive) < TARGET
    return {
        "failure": failures / DRAWS,
        "found": found / DRAWS,
        "escalation": float(np.mean(overall_escalations)),
        "kept_escalation": float(np.mean(kept_escalations)),
        "naive_failure": naive_failures / DRAWS,
    }


@pytest.mark.parametrize("procedure", ["bonferroni", "fixed-sequence"])
@pytest.mark.parametrize(("population", "seed"), [(LINEAR, 1), (CURVED, 2)], ids=["linear", "curved"])
def test_overall_threshold_meets_target_with_probability_one_minus_delta(
    population: Population, seed: int, procedure: str
) -> None:
    oracle = min(t for t in DEFAULT_GRID if population.true_overall(t) >= TARGET)
    assert population.true_overall(0.0) < TARGET < population.true_overall(oracle)  # reachable, and not by all
    result = _simulate_overall(population, procedure, seed)
    assert result["failure"] <= DELTA + SLACK, result
    assert result["found"] >= 0.75, result
    assert result["escalation"] >= 1 - population.kept_share(oracle) - 0.02, result  # never beats the oracle by much
    assert result["naive_failure"] > 3 * DELTA, result  # the same draws catch an invalid rule


@pytest.mark.parametrize("procedure", ["bonferroni", "fixed-sequence"])
@pytest.mark.parametrize(("population", "seed"), [(LINEAR, 1), (CURVED, 2)], ids=["linear", "curved"])
def test_overall_escalates_far_fewer_rows_than_kept(population: Population, seed: int, procedure: str) -> None:
    result = _simulate_overall(population, procedure, seed)  # the same draws as the test above (cached)
    assert result["escalation"] < result["kept_escalation"] - 0.2, result


def _overall_bound(confidence: np.ndarray, correct: np.ndarray, t: float, alpha: float) -> float:
    """1 - the Clopper-Pearson upper bound on P(c >= t, wrong), straight from scipy."""
    n = confidence.size
    wrong = int(((confidence >= t) & ~correct).sum())
    return 1 - (1.0 if wrong == n else float(stats.beta.ppf(1 - alpha, wrong + 1, n - wrong)))


def test_overall_fixed_sequence_is_the_smallest_passing_threshold_at_full_delta() -> None:
    """Monotone risk makes the top-down sequence equal to "smallest t whose bound passes at delta", below bonferroni."""
    rng = np.random.default_rng(14)
    for _ in range(20):
        confidence, correct = CURVED.sample(rng, 600)
        fixed = certify_threshold(
            confidence,
            correct,
            part="label",
            target_accuracy=TARGET,
            delta=DELTA,
            procedure="fixed-sequence",
            guarantee="overall",
        )
        bonferroni = certify_threshold(
            confidence, correct, part="label", target_accuracy=TARGET, delta=DELTA, guarantee="overall"
        )

        expected = min(t for t in DEFAULT_GRID if _overall_bound(confidence, correct, t, DELTA) >= TARGET)
        assert fixed.threshold == expected and fixed.lower_bound == pytest.approx(
            _overall_bound(confidence, correct, expected, DELTA)
        )
        assert bonferroni.threshold is not None and bonferroni.threshold >= fixed.threshold
        alpha = DELTA / len(DEFAULT_GRID)
        assert bonferroni.threshold == min(
            t for t in DEFAULT_GRID if _overall_bound(confidence, correct, t, alpha) >= TARGET
        )
        assert fixed.guarantee == bonferroni.guarantee == "overall" and "no ordering split" in fixed.method
        kept = confidence >= fixed.threshold
        assert fixed.kept == kept.sum() and fixed.escalation_rate == pytest.approx(1 - kept.mean())
        assert Certificate.from_json(json.loads(json.dumps(fixed.to_json()))) == fixed


def test_overall_edges() -> None:
    rng = np.random.default_rng(15)
    confidence = rng.random(500)
    perfect = certify_threshold(
        confidence, np.ones(500, bool), part="x", target_accuracy=1.0, delta=0.1, guarantee="overall"
    )
    assert perfect.threshold is None and perfect.escalation_rate == 1.0  # 100% can never be certified
    all_right = certify_threshold(
        confidence, np.ones(500, bool), part="x", target_accuracy=0.9, delta=0.1, guarantee="overall"
    )
    assert all_right.threshold == 0.0 and all_right.escalation_rate == 0.0  # nothing kept is wrong
    empty = certify_threshold([], [], part="x", target_accuracy=0.9, delta=0.1, guarantee="overall")
    assert empty.threshold is None and empty.n == 0 and empty.escalation_rate == 1.0
    nan = np.concatenate([np.full(300, np.nan), np.full(100, 0.95)])
    wrong_when_unknown = np.concatenate([np.zeros(300, bool), np.ones(100, bool)])
    cert = certify_threshold(nan, wrong_when_unknown, part="x", target_accuracy=0.9, delta=0.1, guarantee="overall")
    assert cert.threshold == 0.0 and cert.kept == 100  # the wrong rows have no confidence: never kept, never count
    with pytest.raises(ValueError):
        certify_threshold([0.5], [True], part="x", target_accuracy=0.9, delta=0.1, guarantee="rows")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        certify_threshold(
            [0.5],
            [True],
            part="x",
            target_accuracy=0.9,
            delta=0.1,
            procedure="holm",
            guarantee="overall",  # type: ignore[arg-type]
        )


def test_certificates_and_routers_record_their_guarantee() -> None:
    old = _cert("label", 0.8).to_json()
    del old["guarantee"]  # a router.json written before the choice existed
    assert Certificate.from_json(old).guarantee == "kept"
    overall = Certificate.from_json({**old, "guarantee": "overall"})
    assert guarantee_of({}) == "kept" and guarantee_of({"label": overall}) == "overall"
    assert guarantee_of({"label": overall, "date": Certificate.from_json(old)}) == "mixed"
    router = Router(
        "v1",
        "2026-01-01T00:00:00+00:00",
        "job",
        "abc",
        "small",
        0.9,
        0.1,
        10,
        "gold",
        {"label": overall},
        guarantee="overall",
    )
    data = json.loads(json.dumps(router.to_json()))
    assert data["guarantee"] == "overall" and Router.from_json(data) == router
    del data["guarantee"]
    assert Router.from_json(data).guarantee == "kept"


# --- certify_threshold and friends ----------------------------------------------------------------------------------


def test_certify_picks_the_smallest_passing_grid_threshold() -> None:
    rng = np.random.default_rng(11)
    confidence, correct = LINEAR.sample(rng, 2000)
    cert = certify_threshold(confidence, correct, part="label", target_accuracy=TARGET, delta=DELTA)
    alpha = DELTA / len(DEFAULT_GRID)
    passing = [
        t
        for t in DEFAULT_GRID
        if clopper_pearson_lower(int(correct[confidence >= t].sum()), int((confidence >= t).sum()), alpha) >= TARGET
    ]
    assert cert.threshold == passing[0]
    kept = confidence >= cert.threshold
    assert cert.kept == kept.sum() and cert.n == 2000
    assert cert.kept_accuracy == pytest.approx(correct[kept].mean())
    assert cert.lower_bound == pytest.approx(clopper_pearson_lower(int(correct[kept].sum()), cert.kept, alpha))
    assert cert.lower_bound >= TARGET
    assert cert.escalation_rate == pytest.approx(1 - kept.mean())
    assert cert.grid_size == 53 and "bonferroni" in cert.method and "53" in cert.method
    assert Certificate.from_json(json.loads(json.dumps(cert.to_json()))) == cert


def test_unreachable_target_escalates_everything() -> None:
    rng = np.random.default_rng(12)
    confidence = rng.random(500)
    correct = rng.random(500) < 0.6  # 60% right whatever the confidence
    cert = certify_threshold(confidence, correct, part="vendor", target_accuracy=0.9, delta=0.1)
    assert cert.threshold is None and cert.kept == 0 and cert.kept_accuracy is None and cert.lower_bound is None
    assert cert.escalation_rate == 1.0
    assert Certificate.from_json(json.loads(json.dumps(cert.to_json()))) == cert
    perfect = certify_threshold(confidence, np.ones(500, bool), part="x", target_accuracy=1.0, delta=0.1)
    assert perfect.threshold is None  # accuracy 1 can never be certified from a finite sample
    empty = certify_threshold([], [], part="x", target_accuracy=0.9, delta=0.1)
    assert empty.threshold is None and empty.n == 0 and empty.escalation_rate == 1.0
    assert escalation_rate({"vendor": confidence}, {"vendor": cert}) == 1.0


def test_nan_confidences_are_never_kept() -> None:
    confidence = np.concatenate([np.full(300, 0.95), np.full(100, np.nan)])
    correct = np.concatenate([np.ones(300, bool), np.zeros(100, bool)])
    cert = certify_threshold(confidence, correct, part="label", target_accuracy=0.95, delta=0.1)
    assert cert.threshold == 0.0  # every known confidence is kept; the unknown ones still escalate
    assert cert.kept == 300 and cert.kept_accuracy == 1.0 and cert.escalation_rate == pytest.approx(0.25)
    assert escalation_rate({"label": confidence}, {"label": cert}) == pytest.approx(0.25)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        certify_threshold([0.5], [True, False], part="x", target_accuracy=0.9, delta=0.1)
    with pytest.raises(ValueError):
        certify_threshold([0.5], [True], part="x", target_accuracy=0.9, delta=1.0)
    with pytest.raises(ValueError):
        certify_threshold([0.5], [True], part="x", target_accuracy=0.9, delta=0.1, procedure="holm")  # type: ignore[arg-type]


def _cert(part: str, threshold: float | None) -> Certificate:
    return Certificate(part, threshold, 0.9, 0.05, 10, 0, None, None, 0.0, 53, "test")


def test_escalation_rate_over_parts() -> None:
    parts = {
        "label": np.array([0.9, 0.9, 0.5, 0.9, np.nan]),
        "amount": np.array([0.9, 0.4, 0.9, 0.9, 0.9]),
    }
    certs = {"label": _cert("label", 0.8), "amount": _cert("amount", 0.8)}
    assert escalation_rate(parts, certs) == pytest.approx(3 / 5)  # rows 2, 3 and 5 (NaN label)
    assert escalation_rate(parts, {"label": _cert("label", 0.8)}) == pytest.approx(2 / 5)
    assert escalation_rate(parts, {"label": _cert("label", 0.0), "amount": _cert("amount", 0.0)}) == pytest.approx(
        1 / 5
    )
    assert escalation_rate(parts, {**certs, "amount": _cert("amount", None)}) == 1.0
    assert escalation_rate(parts, {}) == 0.0
    with pytest.raises(ValueError):
        escalation_rate({"label": parts["label"]}, certs)


def test_accuracy_cost_curve_end_points_and_monotone() -> None:
    rng = np.random.default_rng(13)
    confidence, correct = CURVED.sample(rng, 400)
    frontier_correct = rng.random(400) < 0.97
    frontier_cost = rng.uniform(0.01, 0.03, 400)
    curve = accuracy_cost_curve(
        confidence, correct, small_cost=0.001, frontier_cost=frontier_cost, frontier_correct=frontier_correct
    )
    thresholds = [p["threshold"] for p in curve]
    assert thresholds == sorted(thresholds) and len(curve) == len(np.unique(confidence)) + 2
    first, last = curve[0], curve[-1]
    assert first["threshold"] == 0.0 and first["kept"] == 400 and first["escalation_rate"] == 0.0
    assert first["accuracy"] == pytest.approx(correct.mean()) and first["cost_per_row"] == pytest.approx(0.001)
    assert last["threshold"] > confidence.max() and last["kept"] == 0 and last["escalation_rate"] == 1.0
    assert last["kept_accuracy"] is None
    assert last["accuracy"] == pytest.approx(frontier_correct.mean())
    assert last["cost_per_row"] == pytest.approx(0.001 + frontier_cost.mean())
    kept = [p["kept_fraction"] for p in curve]
    costs = [p["cost_per_row"] for p in curve]
    assert all(a >= b for a, b in itertools.pairwise(kept))
    assert all(b >= a - 1e-15 for a, b in itertools.pairwise(costs))
    for point in curve[::37]:  # spot-check against a direct computation
        keep = confidence >= point["threshold"]
        routed = np.where(keep, correct, frontier_correct)
        assert point["accuracy"] == pytest.approx(routed.mean())
        assert point["cost_per_row"] == pytest.approx(0.001 + frontier_cost[~keep].sum() / 400)

    perfect_frontier = accuracy_cost_curve(confidence, correct, small_cost=0.0, frontier_cost=1.0)
    accuracy = [p["accuracy"] for p in perfect_frontier]
    assert all(b >= a - 1e-12 for a, b in itertools.pairwise(accuracy))  # escalating more never hurts
    assert accuracy[-1] == 1.0 and perfect_frontier[-1]["cost_per_row"] == 1.0

    chosen = accuracy_cost_curve(confidence, correct, small_cost=0.0, frontier_cost=1.0, thresholds=[0.9, 0.5])
    assert [p["threshold"] for p in chosen] == [0.5, 0.9]
    assert chosen[1]["kept"] == (confidence >= 0.9).sum()


# --- calibration ----------------------------------------------------------------------------------------------------


def _overconfident(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    confidence = rng.uniform(0.3, 1.0, n)
    return confidence, rng.random(n) < confidence**3  # says 0.8 when right half the time


def test_isotonic_reduces_calibration_error_and_is_monotone() -> None:
    rng = np.random.default_rng(21)
    fit_conf, fit_correct = _overconfident(rng, 3000)
    test_conf, test_correct = _overconfident(rng, 3000)
    calibrator = fit_calibrator(fit_conf, fit_correct)
    assert calibrator.kind == "isotonic"
    before = expected_calibration_error(test_conf, test_correct)
    after = expected_calibration_error(calibrator.apply(test_conf), test_correct)
    assert before > 0.1 and after < before / 3
    grid = np.linspace(-0.5, 1.5, 2001)
    mapped = calibrator.apply(grid)
    assert np.all(np.diff(mapped) >= 0) and mapped.min() >= 0 and mapped.max() <= 1
    assert np.isnan(calibrator.apply(np.array([np.nan, 0.5]))[0])
    assert Calibrator.from_json(json.loads(json.dumps(calibrator.to_json()))) == calibrator


def test_temperature_recovers_a_known_temperature() -> None:
    rng = np.random.default_rng(22)
    logits = rng.normal(0.0, 2.5, 20_000)
    confidence = special.expit(logits)
    correct = rng.random(logits.size) < special.expit(logits / 2.0)  # the truth is twice as soft
    calibrator = fit_calibrator(confidence, correct, kind="temperature")
    assert calibrator.kind == "temperature"
    assert calibrator.temperature == pytest.approx(2.0, rel=0.08)
    assert np.all(np.diff(calibrator.apply(np.linspace(0, 1, 501))) >= 0)
    assert expected_calibration_error(calibrator.apply(confidence), correct) < expected_calibration_error(
        confidence, correct
    )
    assert Calibrator.from_json(json.loads(json.dumps(calibrator.to_json()))) == calibrator


def test_identity_fallbacks() -> None:
    rng = np.random.default_rng(23)
    few = fit_calibrator(rng.random(19), rng.random(19) < 0.5)
    one_class = fit_calibrator(rng.random(200), np.ones(200, bool), kind="temperature")
    asked = fit_calibrator(rng.random(200), rng.random(200) < 0.5, kind="identity")
    for calibrator in (few, one_class, asked):
        assert calibrator.kind == "identity"
        values = np.array([0.1, 0.7, np.nan])
        np.testing.assert_array_equal(calibrator.apply(values), values)
        assert Calibrator.from_json(json.loads(json.dumps(calibrator.to_json()))) == calibrator
    with pytest.raises(ValueError):
        fit_calibrator(rng.random(100), rng.random(100) < 0.5, kind="platt")  # type: ignore[arg-type]


def test_reliability_table_and_ece() -> None:
    confidence = np.array([0.05, 0.15, 0.15, 0.95, 1.0, np.nan])
    correct = np.array([0, 1, 0, 1, 1, 1], bool)
    table = reliability_table(confidence, correct, bins=10)
    assert len(table) == 10 and table[0]["lower"] == 0.0 and table[-1]["upper"] == 1.0
    assert [row["count"] for row in table] == [1, 2, 0, 0, 0, 0, 0, 0, 0, 2]
    assert table[1]["accuracy"] == 0.5 and table[1]["mean_confidence"] == pytest.approx(0.15)
    assert table[2]["accuracy"] is None and table[-1]["mean_confidence"] == pytest.approx(0.975)
    expected = (1 * 0.05 + 2 * abs(0.5 - 0.15) + 2 * abs(1 - 0.975)) / 5
    assert expected_calibration_error(confidence, correct, bins=10) == pytest.approx(expected)
    assert expected_calibration_error([], []) == 0.0


# --- whole documents (`routing.guarantee_unit: document`) -----------------------------------------------------------

DOCUMENT_PARTS = {"label": LINEAR, "amount": CURVED, "date": STEEP}


def _document_draw(rng: np.random.Generator, rows: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Three parts whose confidences depend on each other (a Gaussian copula), each right as its population says."""
    shared = rng.standard_normal(rows)
    parts = {}
    for name, pop in DOCUMENT_PARTS.items():
        latent = (shared + rng.standard_normal(rows)) / math.sqrt(2)
        confidence = special.betaincinv(pop.a, pop.b, special.ndtr(latent))
        parts[name] = (confidence, pop.correct(rng, confidence))
    return parts


POPULATION_ROWS = 400_000
DOCUMENT_TARGET = {"kept": 0.8, "overall": TARGET}
"""Whole documents are right less often than any one part: the kept rows' target is set where it is reachable."""


@functools.cache
def _population_draw() -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """400,000 rows of the population: its document-level truth at any thresholds, to Monte-Carlo error ≈ 0.001
    (no closed form exists with dependent parts)."""
    parts = _document_draw(np.random.default_rng(99), POPULATION_ROWS)
    return parts, document_arrays(parts)[1]


def _document_truth_of(thresholds: dict[str, float], guarantee: str) -> float:
    """acc (kept rows all right) or A (1 - share kept with a part wrong) of whole documents at these thresholds."""
    population, right = _population_draw()
    kept = np.ones(POPULATION_ROWS, dtype=bool)
    for name, threshold in thresholds.items():
        kept &= population[name][0] >= threshold
    if guarantee == "kept":
        return float(right[kept].mean()) if kept.any() else 1.0
    return float(1.0 - (kept & (right == 0)).mean())


@functools.cache
def _simulate_documents(guarantee: str, procedure: str, per_part: bool = False) -> dict[str, float]:
    """Document-level failure rate of whole-document certificates, and (`per_part`) of per-part ones, same draws."""
    target = DOCUMENT_TARGET[guarantee]
    rng = np.random.default_rng(4)
    failures = found = per_part_failures = 0
    escalations = []
    for _ in range(DRAWS):
        parts = _document_draw(rng, 1500)
        common = {"target_accuracy": target, "delta": DELTA, "procedure": procedure, "guarantee": guarantee}
        certs = certify_parts(parts, unit="document", **common)  # type: ignore[arg-type]
        thresholds = {cert.threshold for cert in certs.values()}
        assert len(thresholds) == 1  # one threshold for every part
        threshold = thresholds.pop()
        escalations.append(next(iter(certs.values())).escalation_rate)
        if threshold is not None:
            found += 1
            failures += _document_truth_of(dict.fromkeys(parts, threshold), guarantee) < target
        if not per_part:
            continue
        each = certify_parts(parts, unit="part", **common)  # type: ignore[arg-type]
        if all(cert.threshold is not None for cert in each.values()):
            chosen = {name: float(cert.threshold) for name, cert in each.items()}  # type: ignore[arg-type]
            per_part_failures += _document_truth_of(chosen, guarantee) < target
    return {
        "failure": failures / DRAWS,
        "found": found / DRAWS,
        "escalation": float(np.mean(escalations)),
        "per_part_failure": per_part_failures / DRAWS,
    }


@pytest.mark.parametrize("guarantee", ["kept", "overall"])
@pytest.mark.parametrize("procedure", ["bonferroni", "fixed-sequence"])
def test_whole_documents_meet_the_target_with_probability_one_minus_delta(guarantee: str, procedure: str) -> None:
    result = _simulate_documents(guarantee, procedure)
    assert result["failure"] <= DELTA + SLACK, result
    assert result["found"] >= 0.75, result


def test_per_part_certificates_do_not_bound_whole_documents() -> None:
    """Why the document unit exists: each part meets the target, the documents do not (as on receipts)."""
    result = _simulate_documents("overall", "fixed-sequence", per_part=True)
    assert result["per_part_failure"] > 3 * DELTA, result
    assert result["failure"] <= DELTA + SLACK, result


def test_document_certificates_share_one_threshold_at_full_delta() -> None:
    rng = np.random.default_rng(11)
    parts = _document_draw(rng, 2000)
    certs = certify_parts(parts, target_accuracy=0.8, delta=0.1, unit="document", guarantee="overall")
    confidence, correct = document_arrays(parts)
    single = certify_threshold(
        confidence, correct, part="document", target_accuracy=0.8, delta=0.1, guarantee="overall"
    )
    assert set(certs) == set(parts)
    for name, cert in certs.items():
        assert cert.part == name and cert.unit == "document" and cert.delta == 0.1  # one statement: no union bound
        assert (cert.threshold, cert.lower_bound, cert.kept, cert.n) == (
            single.threshold,
            single.lower_bound,
            single.kept,
            single.n,
        )
        assert "document-level" in cert.method and "minimum over label, amount, date" in cert.method
    assert escalation_rate({k: v[0] for k, v in parts.items()}, certs) == pytest.approx(single.escalation_rate)
    assert Certificate.from_json(json.loads(json.dumps(certs["label"].to_json()))) == certs["label"]
    legacy = {k: v for k, v in certs["label"].to_json().items() if k != "unit"}  # routers written before the unit
    assert Certificate.from_json(legacy).unit == "part"


def test_document_rows_need_every_part_and_a_nan_part_is_never_kept() -> None:
    parts = {
        "label": (np.array([0.99, 0.99, 0.99, 0.2]), np.array([1, 1, 0, 1])),
        "total": (np.array([0.95, np.nan, 0.99, 0.99]), np.array([1, 1, 1, 1])),
    }
    confidence, correct = document_arrays(parts)
    assert confidence[0] == 0.95 and confidence[1] == -np.inf and confidence[3] == 0.2
    assert correct.tolist() == [1.0, 1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="aligned"):
        document_arrays({"label": ([0.9, 0.8], [1, 1]), "total": ([0.9], [1])})
    with pytest.raises(ValueError, match="unit"):
        certify_parts(parts, target_accuracy=0.9, delta=0.1, unit="rows")  # type: ignore[arg-type]
