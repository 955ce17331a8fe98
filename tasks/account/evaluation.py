"""Score a run against gold answers: what routing buys in accuracy, and what it costs, at one threshold and all of them.

The point of docroute is a trade: keep the small model's confident answers, pay the frontier for the rest. This module
turns per-document correctness, confidence and cost into the numbers that judge that trade — small-only,
all-frontier and routed accuracy, escalation rate, cost per 1,000 documents, savings, calibration error per part,
a per-label or per-field breakdown — plus the accuracy-against-cost curve over every scalar threshold, and writes
them as a JSON file, a plot and a Markdown report. Pure numpy (and tasks/route/certify.py's scipy); matplotlib is
imported
only inside `write_report`.

Given `EvaluationInput.certification`, it also certifies thresholds on these labels under BOTH guarantees of
tasks/route/certify.py ("kept": accuracy of the kept rows; "overall": accuracy of the routed output relative to the
frontier) and reports each operating point's escalation, routed accuracy and cost, so a reader sees what choosing
one guarantee or the other costs on their own documents before setting `routing.guarantee`.

Conventions, shared with `tasks/route/decide.py`:

- a required part is kept when its confidence is at or above its threshold; a threshold of None, or a missing (NaN)
  confidence, escalates the row; a row is escalated when any required part is;
- an escalated row takes the frontier's answer for every part (the frontier re-answers the whole document) and
  costs the small model's price plus the frontier's: the small model always runs first;
- a row is correct when every required part is correct (every part, when no part is required);
- "all-frontier" means sending every document straight to the frontier, without the small model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from docroute.engines.scoring.calibration import expected_calibration_error, reliability_table
from docroute.schemas.pricing import format_usd
from docroute.tasks.route.certify import GUARANTEES, Procedure, Unit, certify_parts

ECE_BINS = 10
_SIGNIFICANT = 6
_UNROUNDED_KEYS = frozenset({"threshold", "thresholds"})  # thresholds are copied into job files: keep every digit


@dataclass(frozen=True)
class CertificationSettings:
    """The job's `routing` settings for certifying both guarantees' operating points on the evaluation labels."""

    target_accuracy: float
    delta: float
    procedure: Procedure = "bonferroni"
    unit: Unit = "part"


@dataclass
class EvaluationInput:
    """Per-document outcomes of one evaluation run; every array and list is aligned with `doc_ids`.

    `small_correct` / `small_confidence` / `frontier_correct` map a part ("label" or a field name) to one value per
    document. `required` names the parts that decide routing (and a row's correctness). `thresholds` is the
    operating point: one threshold per required part, None meaning the part always escalates. `frontier_correct`
    is None when the frontier was not scored; escalated rows then count as correct (and a flag says so).

    `per_label` drives the classification breakdown: ``{"gold": [...]}`` with the gold label of each document, and
    optionally ``"small"`` and ``"frontier"`` with each model's predicted label (None for no answer). Labels are
    compared exactly, so map them to canonical names first (e.g. with `schemas.compare.label_match`/`match_choice`).
    Without ``"small"`` only support and recall can be known.

    `certification` (the job's target, delta and procedure), when given, adds the operating points certified on
    these rows under each guarantee ("kept" and "overall"), so both can be compared with the one in use.
    """

    doc_ids: list[str]
    small_correct: dict[str, np.ndarray]
    small_confidence: dict[str, np.ndarray]
    required: list[str]
    frontier_correct: dict[str, np.ndarray] | None
    small_cost_per_doc: np.ndarray
    frontier_cost_per_doc: np.ndarray
    thresholds: dict[str, float | None]
    per_label: dict[str, list[str]] | None = None
    certification: CertificationSettings | None = None


# --------------------------------------------------------------------------------------------------------------------
# validation


def _vector(name: str, values: Any, n: int, dtype: type) -> np.ndarray:
    array = np.asarray(values, dtype=dtype)
    if array.shape != (n,):
        raise ValueError(f"{name} has shape {array.shape}; expected ({n},), one value per document")
    return array


def _costs(name: str, values: Any, n: int) -> np.ndarray:
    array = _vector(name, values, n, float)
    if not np.all(np.isfinite(array)) or np.any(array < 0):
        raise ValueError(f"{name} must be finite and non-negative: an unknown price would make every cost wrong")
    return array


@dataclass(frozen=True)
class _Checked:
    n: int
    small: dict[str, np.ndarray]
    confidence: dict[str, np.ndarray]
    frontier: dict[str, np.ndarray] | None
    small_cost: np.ndarray
    frontier_cost: np.ndarray


def _check(inp: EvaluationInput) -> _Checked:
    """Fail loudly on misaligned input: a silently broadcast array would produce plausible but wrong numbers."""
    n = len(inp.doc_ids)
    if n == 0:
        raise ValueError("no documents to evaluate")
    if len(set(inp.doc_ids)) != n:
        raise ValueError("doc_ids repeat: evaluation takes one row per document")
    if not inp.small_correct:
        raise ValueError("small_correct names no part")
    small = {p: _vector(f"small_correct[{p!r}]", v, n, bool) for p, v in inp.small_correct.items()}
    confidence = {p: _vector(f"small_confidence[{p!r}]", v, n, float) for p, v in inp.small_confidence.items()}
    frontier = (
        None
        if inp.frontier_correct is None
        else {p: _vector(f"frontier_correct[{p!r}]", v, n, bool) for p, v in inp.frontier_correct.items()}
    )
    for part in inp.required:
        if part not in small:
            raise ValueError(f"required part {part!r} has no small_correct")
        if part not in confidence:
            raise ValueError(f"required part {part!r} has no small_confidence: it could not be routed")
        if part not in inp.thresholds:
            raise ValueError(f"required part {part!r} has no threshold (use None to always escalate it)")
        threshold = inp.thresholds[part]
        if threshold is not None and not math.isfinite(threshold):
            raise ValueError(f"threshold of {part!r} is {threshold}; use None to always escalate")
    return _Checked(
        n=n,
        small=small,
        confidence=confidence,
        frontier=frontier,
        small_cost=_costs("small_cost_per_doc", inp.small_cost_per_doc, n),
        frontier_cost=_costs("frontier_cost_per_doc", inp.frontier_cost_per_doc, n),
    )


# --------------------------------------------------------------------------------------------------------------------
# building blocks


def calibration_summary(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> dict[str, Any]:
    """Expected calibration error with its reliability bins, for the report (engines/scoring/calibration.py computes
    both).

    Thresholds are only meaningful if confidence tracks accuracy; a high ECE says a threshold picked on one data set
    will not hold its accuracy on another. Rows without a finite confidence are left out (`n` counts the rest); a
    confidence of exactly 1.0 falls in the top bin; empty bins are not listed.
    """
    conf = np.asarray(confidence, dtype=float)
    hits = np.asarray(correct, dtype=bool)
    known = np.isfinite(conf)
    conf, hits = conf[known], hits[known]
    if conf.size == 0:
        return {"ece": None, "n": 0, "mean_confidence": None, "accuracy": None, "bins": []}
    table = [
        {
            "lower": row["lower"],
            "upper": row["upper"],
            "count": row["count"],
            "accuracy": row["accuracy"],
            "confidence": row["mean_confidence"],
        }
        for row in reliability_table(conf, hits, bins)
        if row["count"]
    ]
    return {
        "ece": expected_calibration_error(conf, hits, bins),
        "n": int(conf.size),
        "mean_confidence": float(np.clip(conf, 0.0, 1.0).mean()),
        "accuracy": float(hits.mean()),
        "bins": table,
    }


def _row_correct(correct: Mapping[str, np.ndarray], parts: Sequence[str], n: int) -> np.ndarray:
    """A row is right when every listed part is; a part without data counts as right (the caller flags it)."""
    row = np.ones(n, dtype=bool)
    for part in parts:
        if part in correct:
            row &= correct[part]
    return row


def _escalated(
    confidence: Mapping[str, np.ndarray], required: Sequence[str], thresholds: Mapping[str, float | None], n: int
) -> np.ndarray:
    """Which rows the operating point sends to the frontier (same rule as `tasks.route.decide`)."""
    escalate = np.zeros(n, dtype=bool)
    for part in required:
        threshold = thresholds[part]
        if threshold is None:
            escalate[:] = True
        else:
            escalate |= ~(confidence[part] >= threshold)  # NaN >= t is False: no confidence escalates
    return escalate


def _per_1000(total: float, n: int) -> float:
    return total / n * 1000.0


def _savings_pct(cost: float, baseline: float) -> float | None:
    """Share of the all-frontier bill saved (negative when routing costs more); None when that bill is zero."""
    return None if baseline <= 0 else (baseline - cost) / baseline * 100.0


def sweep(
    row_confidence: np.ndarray,
    small_row: np.ndarray,
    frontier_row: np.ndarray,
    small_cost: np.ndarray,
    frontier_cost: np.ndarray,
) -> list[dict[str, float | None]]:
    """Routed accuracy, escalation and cost for one scalar threshold at each distinct row confidence, then None.

    A row's confidence is its least confident required part (NaN: always escalates), so a scalar threshold t keeps
    exactly the rows whose confidence is >= t; the distinct row confidences give every keep-set a scalar threshold
    can produce. The last point (threshold None, i.e. above every confidence) escalates every row: its accuracy is
    the frontier's and its cost the small model's plus the frontier's. Points run from least to most escalation.
    Computed with one sort and cumulative sums, so a large evaluation set stays fast.
    """
    n = row_confidence.size
    rows = np.where(np.isfinite(row_confidence), row_confidence, -np.inf)
    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    gain = small_row[order].astype(float) - frontier_row[order].astype(float)
    saved = frontier_cost[order]
    # suffix sums: keeping rows k.. (those with confidence >= ordered[k]) changes accuracy by gain and saves cost
    gain_from = np.concatenate([np.cumsum(gain[::-1])[::-1], [0.0]])
    saved_from = np.concatenate([np.cumsum(saved[::-1])[::-1], [0.0]])
    frontier_hits = float(frontier_row.sum())
    everything = float(small_cost.sum() + frontier_cost.sum())
    thresholds = np.unique(ordered[np.isfinite(ordered)])
    starts = np.searchsorted(ordered, thresholds, side="left")
    points: list[dict[str, float | None]] = []
    for threshold, start in zip([*thresholds.tolist(), None], [*starts.tolist(), n], strict=True):
        points.append(
            {
                "threshold": threshold,
                "escalation_rate": start / n,
                "routed_accuracy": (frontier_hits + gain_from[start]) / n,
                "cost_per_1000": _per_1000(everything - saved_from[start], n),
            }
        )
    return points


def certified_points(
    confidence: Mapping[str, np.ndarray],
    small: Mapping[str, np.ndarray],
    required: Sequence[str],
    *,
    small_row: np.ndarray,
    frontier_row: np.ndarray,
    small_cost: np.ndarray,
    frontier_cost: np.ndarray,
    settings: CertificationSettings,
) -> dict[str, dict[str, Any]]:
    """Certify every required part under each guarantee on these rows, and measure the resulting operating points.

    Each guarantee gets its thresholds (certify_parts: every part at delta / parts, or with `settings.unit`
    document one threshold on whole rows at delta) and the routed numbers they give here. The certificates come
    from the same rows they are measured on, so the numbers show where each guarantee puts the thresholds and what
    that costs, not an independent test of either guarantee.
    """
    n = small_row.size
    frontier_total = float(frontier_cost.sum())
    points: dict[str, dict[str, Any]] = {}
    for guarantee in GUARANTEES:
        certificates = certify_parts(
            {part: (confidence[part], small[part]) for part in required},
            target_accuracy=settings.target_accuracy,
            delta=settings.delta,
            procedure=settings.procedure,
            guarantee=guarantee,
            unit=settings.unit,
        )
        thresholds = {part: cert.threshold for part, cert in certificates.items()}
        escalate = _escalated(confidence, required, thresholds, n)
        routed = np.where(escalate, frontier_row, small_row)
        total = float(small_cost.sum() + frontier_cost[escalate].sum())
        points[guarantee] = {
            "target_accuracy": settings.target_accuracy,
            "delta": settings.delta,
            "procedure": settings.procedure,
            "unit": settings.unit,
            "thresholds": thresholds,
            "lower_bounds": {part: cert.lower_bound for part, cert in certificates.items()},
            "escalation_rate": float(escalate.mean()),
            "escalated": int(escalate.sum()),
            "accuracy": float(routed.mean()),
            "kept_accuracy": float(small_row[~escalate].mean()) if (~escalate).any() else None,
            "cost_per_1000": _per_1000(total, n),
            "savings_pct": _savings_pct(total, frontier_total),
        }
    return points


def _prf(gold: Sequence[str | None], predicted: Sequence[str | None]) -> dict[str, Any]:
    """Per-label precision, recall, F1 and support, with 0 for 0/0 (scikit-learn's zero_division=0).

    Zero rather than a missing value keeps macro-F1 computable and the JSON numeric; a label the model never
    predicts is, for the reader, a label it gets wrong. A None prediction is a miss and counts for no label.
    """
    labels = sorted({label for label in [*gold, *predicted] if label is not None})
    per_label: dict[str, dict[str, float | int]] = {}
    for label in labels:
        tp = sum(1 for g, p in zip(gold, predicted, strict=True) if g == label and p == label)
        predicted_n = sum(1 for p in predicted if p == label)
        support = sum(1 for g in gold if g == label)
        precision = tp / predicted_n if predicted_n else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    scored = [v["f1"] for v in per_label.values() if v["support"]]
    accuracy = sum(1 for g, p in zip(gold, predicted, strict=True) if g is not None and g == p) / max(len(gold), 1)
    return {
        "labels": per_label,
        "macro_f1": float(np.mean(scored)) if scored else None,
        "accuracy": accuracy,
    }


def _recall_only(gold: Sequence[str | None], correct: np.ndarray) -> dict[str, Any]:
    """Without predicted labels only support and recall (accuracy within each gold label) are known."""
    per_label: dict[str, dict[str, float | int | None]] = {}
    for label in sorted({g for g in gold if g is not None}):
        members = np.array([g == label for g in gold])
        per_label[label] = {
            "precision": None,
            "recall": float(correct[members].mean()),
            "f1": None,
            "support": int(members.sum()),
        }
    return {"labels": per_label, "macro_f1": None, "accuracy": float(correct.mean())}


def _label_breakdown(
    per_label: Mapping[str, Sequence[str | None]],
    escalate: np.ndarray,
    *,
    small_label: np.ndarray | None,
    routed_label: np.ndarray | None,
    frontier_known: bool,
    n: int,
) -> dict[str, Any]:
    if "gold" not in per_label:
        raise ValueError('per_label needs "gold": the gold label of each document')
    lists = {k: list(v) for k, v in per_label.items()}
    for key, values in lists.items():
        if len(values) != n:
            raise ValueError(f"per_label[{key!r}] has {len(values)} labels for {n} documents")
    gold = lists["gold"]
    result: dict[str, Any] = {}
    small_pred = lists.get("small")
    if small_pred is not None:
        result["small"] = _prf(gold, small_pred)
        if "frontier" in lists:
            result["frontier"] = _prf(gold, lists["frontier"])
            routed = [f if e else s for s, f, e in zip(small_pred, lists["frontier"], escalate, strict=True)]
            result["routed"] = _prf(gold, routed)
        elif not frontier_known:  # the frontier is taken to be right: escalated rows carry the gold label
            routed = [g if e else s for s, g, e in zip(small_pred, gold, escalate, strict=True)]
            result["routed"] = _prf(gold, routed)
    else:
        if small_label is not None:
            result["small"] = _recall_only(gold, small_label)
        if routed_label is not None:
            result["routed"] = _recall_only(gold, routed_label)
    return result


# --------------------------------------------------------------------------------------------------------------------
# evaluate


def evaluate(inp: EvaluationInput) -> dict[str, Any]:
    """Compute every metric of one evaluation; the result is plain JSON-ready data (None, never NaN).

    Keys: n_documents, parts, required, thresholds, frontier_assumed_correct, flags, small_only, frontier_only,
    routed (accuracy, escalation_rate, escalated, cost_per_1000, savings_pct), per_part (small/frontier/routed
    accuracy, threshold, ECE per part), calibration (ECE with its bins per part that has confidences), per_label
    (classification breakdown, or None), sweep (see `sweep`), certified ("kept" and "overall" operating points
    certified on these rows, see `certified_points`; None without `inp.certification` or required parts).
    """
    data = _check(inp)
    n = data.n
    parts = list(data.small)
    row_parts = list(inp.required) or parts
    flags: list[str] = []

    frontier_known = data.frontier is not None
    frontier = data.frontier or {}
    if not frontier_known:
        flags.append(
            "frontier correctness unknown: escalated rows count as correct, so routed accuracy is an upper bound "
            "and all-frontier accuracy is taken as 1.0"
        )
    else:
        missing = [p for p in parts if p not in frontier]
        if missing:
            flags.append(f"no frontier correctness for {', '.join(missing)}: counted as correct when escalated")
    if not inp.required:
        flags.append("no required parts: nothing is routed and a row's correctness covers every part")
    for part in inp.required:
        if inp.thresholds[part] is None:
            flags.append(f"{part} has no threshold: every row escalates")
        unknown = int((~np.isfinite(data.confidence[part])).sum())
        if unknown:
            flags.append(f"{part}: {unknown} row(s) without a confidence always escalate")

    small_row = _row_correct(data.small, row_parts, n)
    frontier_row = _row_correct(frontier, row_parts, n)
    escalate = _escalated(data.confidence, inp.required, inp.thresholds, n)
    routed_row = np.where(escalate, frontier_row, small_row)

    small_total = float(data.small_cost.sum())
    frontier_total = float(data.frontier_cost.sum())
    routed_total = small_total + float(data.frontier_cost[escalate].sum())
    all_frontier_1000 = _per_1000(frontier_total, n)

    calibration = {
        part: calibration_summary(data.confidence[part], data.small[part]) for part in parts if part in data.confidence
    }
    per_part: dict[str, dict[str, Any]] = {}
    routed_by_part: dict[str, np.ndarray] = {}
    for part in parts:
        frontier_part = frontier.get(part, np.ones(n, dtype=bool))
        routed_by_part[part] = np.where(escalate, frontier_part, data.small[part])
        per_part[part] = {
            "required": part in inp.required,
            "threshold": inp.thresholds.get(part),
            "small_accuracy": float(data.small[part].mean()),
            "frontier_accuracy": float(frontier[part].mean()) if part in frontier else None,
            "routed_accuracy": float(routed_by_part[part].mean()),
            "ece": calibration[part]["ece"] if part in calibration else None,
        }

    if inp.required:
        row_confidence = np.min(np.vstack([data.confidence[p] for p in inp.required]), axis=0)  # NaN propagates
        curve = sweep(row_confidence, small_row, frontier_row, data.small_cost, data.frontier_cost)
    else:
        curve = []

    certified = None
    if inp.certification is not None and inp.required:
        certified = certified_points(
            data.confidence,
            data.small,
            inp.required,
            small_row=small_row,
            frontier_row=frontier_row,
            small_cost=data.small_cost,
            frontier_cost=data.frontier_cost,
            settings=inp.certification,
        )

    per_label = None
    if inp.per_label is not None:
        per_label = _label_breakdown(
            inp.per_label,
            escalate,
            small_label=data.small.get("label"),
            routed_label=routed_by_part.get("label"),
            frontier_known=frontier_known,
            n=n,
        )

    return {
        "n_documents": n,
        "parts": parts,
        "required": list(inp.required),
        "thresholds": {p: inp.thresholds.get(p) for p in inp.required},
        "frontier_assumed_correct": not frontier_known,
        "flags": flags,
        "small_only": {
            "accuracy": float(small_row.mean()),
            "cost_per_1000": _per_1000(small_total, n),
            "savings_pct": _savings_pct(small_total, frontier_total),
        },
        "frontier_only": {
            "accuracy": float(frontier_row.mean()) if frontier_known else None,
            "cost_per_1000": all_frontier_1000,
        },
        "routed": {
            "accuracy": float(routed_row.mean()),
            "escalation_rate": float(escalate.mean()),
            "escalated": int(escalate.sum()),
            "cost_per_1000": _per_1000(routed_total, n),
            "savings_pct": _savings_pct(routed_total, frontier_total),
        },
        "per_part": per_part,
        "calibration": calibration,
        "per_label": per_label,
        "sweep": curve,
        "certified": certified,
    }


# --------------------------------------------------------------------------------------------------------------------
# report


def _json_ready(value: Any, *, exact: bool = False) -> Any:
    """Plain JSON data: numpy scalars unwrapped, NaN/inf as None, floats to 6 significant digits (not thresholds)."""
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v, exact=exact or k in _UNROUNDED_KEYS) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return [_json_ready(v, exact=exact) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_json_ready(v, exact=exact) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return value if exact else float(f"{value:.{_SIGNIFICANT}g}")
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.1f}%"


def _money(value: float | None) -> str:
    return "—" if value is None else format_usd(value)


def _savings(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}%"


_GUARANTEE_NAMES = {"kept": "certified, kept rows", "overall": "certified, overall"}
_GUARANTEE_STYLE = {"kept": ("D", "tab:purple", (0.05, 0.55)), "overall": ("P", "tab:brown", (0.05, 0.8))}


def _plot(metrics: Mapping[str, Any], path: Path, *, title: str, operating_point_label: str) -> None:
    """Accuracy against cost: the scalar-threshold sweep, the operating point and the two baselines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg, set here: importing docroute draws nothing
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    curve = metrics.get("sweep") or []
    if curve:
        axes.plot(
            [p["cost_per_1000"] for p in curve],
            [p["routed_accuracy"] for p in curve],
            "-",
            color="tab:blue",
            linewidth=1.5,
            label="routed, one threshold for every part",
        )
    small, frontier, routed = metrics["small_only"], metrics["frontier_only"], metrics["routed"]
    assumed = frontier["accuracy"] is None
    frontier_accuracy = 1.0 if assumed else frontier["accuracy"]
    axes.scatter(
        [small["cost_per_1000"]],
        [small["accuracy"]],
        marker="s",
        s=60,
        color="tab:orange",
        zorder=3,
        label="small model only",
    )
    axes.scatter(
        [frontier["cost_per_1000"]],
        [frontier_accuracy],
        marker="^",
        s=70,
        color="tab:green",
        zorder=3,
        label="all frontier" + (" (accuracy assumed 1.0)" if assumed else ""),
    )
    axes.scatter(
        [routed["cost_per_1000"]],
        [routed["accuracy"]],
        marker="*",
        s=220,
        color="tab:red",
        zorder=4,
        label=operating_point_label,
    )
    for guarantee, point in (metrics.get("certified") or {}).items():
        marker, color, where = _GUARANTEE_STYLE.get(guarantee, ("o", "tab:gray", (0.05, 0.3)))
        name = _GUARANTEE_NAMES.get(guarantee, guarantee)
        axes.scatter(
            [point["cost_per_1000"]], [point["accuracy"]], marker=marker, s=90, color=color, zorder=4, label=name
        )
        axes.annotate(
            f"{name}\n{_pct(point['accuracy'])} accurate, {_pct(point['escalation_rate'])} escalated,"
            f"\n{_money(point['cost_per_1000'])} per 1,000 docs",
            xy=(point["cost_per_1000"], point["accuracy"]),
            xytext=where,
            textcoords="axes fraction",
            arrowprops={"arrowstyle": "->", "color": color},
            fontsize=8,
            color=color,
        )
    axes.annotate(
        f"{operating_point_label}\n{_pct(routed['accuracy'])} accurate, {_pct(routed['escalation_rate'])} escalated,"
        f"\n{_money(routed['cost_per_1000'])} per 1,000 docs",
        xy=(routed["cost_per_1000"], routed["accuracy"]),
        xytext=(0.35, 0.2),
        textcoords="axes fraction",
        arrowprops={"arrowstyle": "->", "color": "tab:red"},
        fontsize=9,
    )
    axes.set_xlabel("cost per 1,000 documents (USD)")
    axes.set_ylabel("routed accuracy (every required part right)")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, format="png")


def _shown(thresholds: Mapping[str, float | None]) -> str:
    return ", ".join(f"{p} ≥ {t:g}" if t is not None else f"{p}: always escalates" for p, t in thresholds.items())


def _certified_markdown(certified: Mapping[str, Any] | None) -> list[str]:
    """The two certified operating points side by side, with what each guarantee means (tasks/route/certify.py)."""
    if not certified:
        return []
    first = next(iter(certified.values()))
    lines = [
        "## Certified operating points",
        "",
        f"Thresholds certified on these labels at target accuracy {_pct(first['target_accuracy'])} with probability "
        f"≥ {1 - first['delta']:.3g} ({first['procedure']}), under each `routing.guarantee`. **kept**: the rows the "
        "small model keeps reach the target (each kept row is trustworthy on its own). **overall**: the whole routed "
        "output reaches the target relative to the frontier (only kept-and-wrong rows count against it). Certified "
        "and measured on the same rows: where each guarantee puts the thresholds, not an independent test of it. "
        + (
            "Certified on whole documents (`routing.guarantee_unit: document`): a row is right only when every "
            "required part is, and one threshold applies to its least confident part."
            if first.get("unit") == "document"
            else "Certified per part (`routing.guarantee_unit: part`): each required part reaches the target on its "
            "own; the routed accuracy below counts a row right only when every required part is."
        ),
        "",
        "| Guarantee | Thresholds | Escalation rate | Routed accuracy | Kept-row accuracy | Cost per 1,000 docs "
        "| Savings vs all-frontier |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for guarantee, point in certified.items():
        lines.append(
            f"| {guarantee} | {_shown(point['thresholds'])} | {_pct(point['escalation_rate'])} "
            f"| {_pct(point['accuracy'])} | {_pct(point['kept_accuracy'])} | {_money(point['cost_per_1000'])} "
            f"| {_savings(point['savings_pct'])} |"
        )
    return [*lines, ""]


def _markdown(metrics: Mapping[str, Any], *, title: str, operating_point_label: str, plot_name: str) -> str:
    small, frontier, routed = metrics["small_only"], metrics["frontier_only"], metrics["routed"]
    required = ", ".join(metrics["required"]) or "none"
    lines = [
        f"# {title}",
        "",
        f"{metrics['n_documents']:,} documents. A row is correct when every required part ({required}) is right; "
        "an escalated row takes the frontier's answer and costs the small model's price plus the frontier's.",
        "",
        "## Headline",
        "",
        "| | Accuracy | Escalation rate | Cost per 1,000 docs | Savings vs all-frontier |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| Small model only | {_pct(small['accuracy'])} | 0.0% | {_money(small['cost_per_1000'])} "
        f"| {_savings(small['savings_pct'])} |",
        f"| All frontier | {_pct(frontier['accuracy'])} | 100.0% | {_money(frontier['cost_per_1000'])} | — |",
        f"| **Routed: {operating_point_label}** | **{_pct(routed['accuracy'])}** | {_pct(routed['escalation_rate'])} "
        f"| {_money(routed['cost_per_1000'])} | {_savings(routed['savings_pct'])} |",
        "",
    ]
    thresholds = metrics.get("thresholds") or {}
    if thresholds:
        lines += [f"Operating point thresholds: {_shown(thresholds)}.", ""]
    lines += _certified_markdown(metrics.get("certified"))

    per_label = metrics.get("per_label")
    if per_label:
        lines += ["## Per label", ""]
        for system, name in (("small", "Small model"), ("frontier", "Frontier"), ("routed", "Routed")):
            table = per_label.get(system)
            if not table:
                continue
            macro = table.get("macro_f1")
            lines += [
                f"**{name}** — accuracy {_pct(table['accuracy'])}"
                + (f", macro F1 {macro:.3f}" if macro is not None else ""),
                "",
                "| Label | Precision | Recall | F1 | Support |",
                "| --- | ---: | ---: | ---: | ---: |",
            ]
            for label, row in table["labels"].items():
                cells = [f"{row[k]:.3f}" if row[k] is not None else "—" for k in ("precision", "recall", "f1")]
                lines.append(f"| {label} | {' | '.join(cells)} | {row['support']} |")
            lines.append("")
    lines += [
        "## Per part",
        "",
        "| Part | Required | Threshold | Small | Frontier | Routed | ECE |",
        "| --- | :---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for part, row in metrics["per_part"].items():
        threshold = "—" if row["threshold"] is None else f"{row['threshold']:g}"
        ece = "—" if row["ece"] is None else f"{row['ece']:.3f}"
        lines.append(
            f"| {part} | {'yes' if row['required'] else 'no'} | {threshold} | {_pct(row['small_accuracy'])} "
            f"| {_pct(row['frontier_accuracy'])} | {_pct(row['routed_accuracy'])} | {ece} |"
        )
    calibration = metrics.get("calibration") or {}
    scored = [f"{p} {c['ece']:.3f} (n={c['n']})" for p, c in calibration.items() if c.get("ece") is not None]
    lines += [
        "",
        "## Calibration",
        "",
        f"Expected calibration error ({ECE_BINS} equal-width bins; 0 means confidence equals accuracy): "
        + ("; ".join(scored) if scored else "no part has confidences")
        + ".",
        "",
    ]
    if metrics.get("flags"):
        lines += ["## Flags", "", *[f"- {flag}" for flag in metrics["flags"]], ""]
    lines += [
        "## Accuracy against cost",
        "",
        f"![Routed accuracy against cost per 1,000 documents]({plot_name})",
        "",
        f"The line applies one threshold to every required part ({len(metrics.get('sweep') or [])} points, "
        "from nothing escalated to everything escalated); the star is the operating point above"
        + ("; the other markers are the certified operating points." if metrics.get("certified") else "."),
        "",
    ]
    return "\n".join(lines)


def write_report(
    metrics: dict[str, Any], directory: str | Path, *, title: str, operating_point_label: str
) -> dict[str, Path]:
    """Write metrics.json, accuracy_vs_cost.png and report.md (which embeds the plot by relative path).

    The JSON is strict (no NaN, which many readers reject) and rounded to 6 significant digits, except thresholds,
    which keep every digit because they are copied into job files. Returns {"metrics", "plot", "report"} paths.
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    clean = _json_ready(metrics)
    paths = {
        "metrics": folder / "metrics.json",
        "plot": folder / "accuracy_vs_cost.png",
        "report": folder / "report.md",
    }
    paths["metrics"].write_text(json.dumps(clean, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    _plot(clean, paths["plot"], title=title, operating_point_label=operating_point_label)
    paths["report"].write_text(
        _markdown(clean, title=title, operating_point_label=operating_point_label, plot_name=paths["plot"].name),
        encoding="utf-8",
    )
    return paths
