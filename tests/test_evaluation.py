"""Tests for tasks/account/evaluation.py on small sets whose every number is worked out by hand in the comments.

These numbers are what a reader uses to choose a threshold and to justify the frontier bill, so each metric is
checked against arithmetic done independently of the code.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from docroute.tasks.account.evaluation import (
    CertificationSettings,
    EvaluationInput,
    _certified_markdown,
    calibration_summary,
    evaluate,
    write_report,
)
from docroute.tasks.route.certify import certify_threshold

T, F = True, False


def _classification(**overrides: Any) -> EvaluationInput:
    """Five documents, one part ("label").

    gold      a    a    b    b    c
    small     a    b    b    b    a     correct T F T T F   (3/5 = 0.6)
    conf      0.9  0.4  0.8  0.95 0.3
    frontier  a    a    b    c    c     correct T T T F T   (4/5 = 0.8)
    threshold 0.5 escalates docs 1 and 4 (40%); routed: T T T T T = 1.0
    small cost 0.001 each -> 0.005 -> $1.00 per 1,000
    frontier cost .01 .02 .01 .01 .03 -> 0.08 -> $16.00 per 1,000
    routed 0.005 + 0.02 + 0.03 = 0.055 -> $11.00 per 1,000; savings (16 - 11) / 16 = 31.25%
    """
    values: dict[str, Any] = {
        "doc_ids": [f"d{i}" for i in range(5)],
        "small_correct": {"label": np.array([T, F, T, T, F])},
        "small_confidence": {"label": np.array([0.9, 0.4, 0.8, 0.95, 0.3])},
        "required": ["label"],
        "frontier_correct": {"label": np.array([T, T, T, F, T])},
        "small_cost_per_doc": np.full(5, 0.001),
        "frontier_cost_per_doc": np.array([0.01, 0.02, 0.01, 0.01, 0.03]),
        "thresholds": {"label": 0.5},
        "per_label": {
            "gold": ["a", "a", "b", "b", "c"],
            "small": ["a", "b", "b", "b", "a"],
            "frontier": ["a", "a", "b", "c", "c"],
        },
    }
    values.update(overrides)
    return EvaluationInput(**values)


def _extraction(**overrides: Any) -> EvaluationInput:
    """Four documents, two required fields and one optional one, frontier not scored.

    total  correct T T F T   conf 0.9  0.7 0.6 NaN    threshold 0.8
    date   correct T F T T   conf 0.95 0.9 0.2 0.99   threshold 0.5
    vendor correct T T F F   (optional, no confidence)
    escalated: doc1 (total 0.7), doc2 (total 0.6), doc3 (no total confidence) -> 75%
    small row (total and date) T F F T -> 0.5; routed: doc0 kept T, the rest assumed right -> 1.0
    """
    values: dict[str, Any] = {
        "doc_ids": ["r0", "r1", "r2", "r3"],
        "small_correct": {
            "total": np.array([T, T, F, T]),
            "date": np.array([T, F, T, T]),
            "vendor": np.array([T, T, F, F]),
        },
        "small_confidence": {
            "total": np.array([0.9, 0.7, 0.6, np.nan]),
            "date": np.array([0.95, 0.9, 0.2, 0.99]),
        },
        "required": ["total", "date"],
        "frontier_correct": None,
        "small_cost_per_doc": np.zeros(4),
        "frontier_cost_per_doc": np.zeros(4),
        "thresholds": {"total": 0.8, "date": 0.5},
        "per_label": None,
    }
    values.update(overrides)
    return EvaluationInput(**values)


# --------------------------------------------------------------------------------------------------------------------
# headline numbers


def test_headline_numbers() -> None:
    m = evaluate(_classification())
    assert m["n_documents"] == 5
    assert m["small_only"]["accuracy"] == pytest.approx(0.6)
    assert m["frontier_only"]["accuracy"] == pytest.approx(0.8)
    assert m["routed"]["accuracy"] == pytest.approx(1.0)
    assert m["routed"]["escalation_rate"] == pytest.approx(0.4)
    assert m["routed"]["escalated"] == 2
    assert m["small_only"]["cost_per_1000"] == pytest.approx(1.0)
    assert m["frontier_only"]["cost_per_1000"] == pytest.approx(16.0)
    assert m["routed"]["cost_per_1000"] == pytest.approx(11.0)
    assert m["routed"]["savings_pct"] == pytest.approx(31.25)
    assert m["small_only"]["savings_pct"] == pytest.approx(93.75)  # (16 - 1) / 16
    assert m["frontier_assumed_correct"] is False
    assert m["flags"] == []


def test_threshold_is_inclusive_like_the_router() -> None:
    # conf 0.8 at threshold 0.8 is kept (tasks/route/decide.py: escalate when c < t)
    m = evaluate(_classification(thresholds={"label": 0.8}))
    assert m["routed"]["escalated"] == 2  # 0.4 and 0.3 only


def test_expected_calibration_error_by_hand() -> None:
    # bins: 9 holds 0.9 and 0.95 (both right): |1 - 0.925| * 2/5 = 0.03; 8 holds 0.8 (right): 0.2 / 5 = 0.04;
    # 4 holds 0.4 (wrong): 0.4 / 5 = 0.08; 3 holds 0.3 (wrong): 0.3 / 5 = 0.06 -> 0.21
    m = evaluate(_classification())
    calibration = m["calibration"]["label"]
    assert calibration["ece"] == pytest.approx(0.21)
    assert calibration["n"] == 5
    assert [b["count"] for b in calibration["bins"]] == [1, 1, 1, 2]
    assert m["per_part"]["label"]["ece"] == pytest.approx(0.21)


def test_ece_edges() -> None:
    perfect = calibration_summary(np.array([1.0, 1.0, 0.0]), np.array([T, T, F]))
    assert perfect["ece"] == pytest.approx(0.0)  # 1.0 falls in the top bin, 0.0 in the bottom one
    assert calibration_summary(np.array([np.nan]), np.array([T]))["ece"] is None
    # NaN rows are left out: only the 0.75 row (wrong) counts -> 0.75
    assert calibration_summary(np.array([np.nan, 0.75]), np.array([T, F]))["ece"] == pytest.approx(0.75)


def test_per_label_precision_recall_f1() -> None:
    per_label = evaluate(_classification())["per_label"]
    small = per_label["small"]["labels"]
    # a: tp 1 of 2 predicted, 2 gold; b: tp 2 of 3 predicted, 2 gold; c: never predicted, 1 gold
    assert small["a"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert small["b"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert small["c"] == pytest.approx({"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1})
    assert per_label["small"]["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert per_label["small"]["accuracy"] == pytest.approx(0.6)
    frontier = per_label["frontier"]["labels"]
    assert frontier["b"]["f1"] == pytest.approx(2 / 3)  # precision 1, recall 1/2
    assert frontier["c"]["f1"] == pytest.approx(2 / 3)  # precision 1/2, recall 1
    routed = per_label["routed"]  # docs 1 and 4 take the frontier's a and c: every label right
    assert routed["macro_f1"] == pytest.approx(1.0)
    assert all(row["f1"] == pytest.approx(1.0) for row in routed["labels"].values())


def test_per_label_with_gold_only_gives_recall() -> None:
    m = evaluate(_classification(per_label={"gold": ["a", "a", "b", "b", "c"]}))
    small = m["per_label"]["small"]["labels"]
    assert small["a"] == {"precision": None, "recall": 0.5, "f1": None, "support": 2}
    assert small["b"]["recall"] == pytest.approx(1.0)
    assert small["c"]["recall"] == pytest.approx(0.0)
    assert m["per_label"]["routed"]["labels"]["c"]["recall"] == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------------------------------
# sweep


def test_sweep_points_by_hand() -> None:
    curve = evaluate(_classification())["sweep"]
    # one point per distinct confidence (escalating those below it), then None: escalate everything
    assert [p["threshold"] for p in curve] == [0.3, 0.4, 0.8, 0.9, 0.95, None]
    assert [p["escalation_rate"] for p in curve] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert [p["routed_accuracy"] for p in curve] == pytest.approx([0.6, 0.8, 1.0, 1.0, 1.0, 0.8])
    assert [p["cost_per_1000"] for p in curve] == pytest.approx([1.0, 7.0, 11.0, 13.0, 15.0, 17.0])


def test_sweep_endpoints() -> None:
    m = evaluate(_classification())
    first, last = m["sweep"][0], m["sweep"][-1]
    assert first["routed_accuracy"] == pytest.approx(m["small_only"]["accuracy"])
    assert first["cost_per_1000"] == pytest.approx(m["small_only"]["cost_per_1000"])
    # threshold above every confidence: the frontier's accuracy, at the small model's price plus the frontier's
    assert last["routed_accuracy"] == pytest.approx(m["frontier_only"]["accuracy"])
    assert last["cost_per_1000"] == pytest.approx(
        m["small_only"]["cost_per_1000"] + m["frontier_only"]["cost_per_1000"]
    )


def test_sweep_takes_the_least_confident_required_part() -> None:
    # row confidences min(total, date): 0.9, 0.7, 0.2, NaN; the NaN row escalates at every threshold
    curve = evaluate(_extraction())["sweep"]
    assert [p["threshold"] for p in curve] == [0.2, 0.7, 0.9, None]
    assert [p["escalation_rate"] for p in curve] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    # small rows T F F T, frontier assumed right: 0.2 keeps 0-2 -> T F F + T = 0.5; 0.7 keeps 0, 1 -> 0.75
    assert [p["routed_accuracy"] for p in curve] == pytest.approx([0.5, 0.75, 1.0, 1.0])


def test_sweep_scales_to_many_rows() -> None:
    rng = np.random.default_rng(0)
    n = 50_000
    confidence = rng.random(n)
    inp = EvaluationInput(
        doc_ids=[str(i) for i in range(n)],
        small_correct={"label": rng.random(n) < confidence},
        small_confidence={"label": confidence},
        required=["label"],
        frontier_correct={"label": rng.random(n) < 0.95},
        small_cost_per_doc=np.full(n, 1e-5),
        frontier_cost_per_doc=np.full(n, 2e-3),
        thresholds={"label": 0.7},
        per_label=None,
    )
    m = evaluate(inp)
    curve = m["sweep"]
    assert len(curve) == np.unique(confidence).size + 1
    rates = [p["escalation_rate"] for p in curve]
    assert rates == sorted(rates)
    at = next(p for p in curve if p["threshold"] is not None and p["threshold"] >= 0.7)
    assert at["routed_accuracy"] == pytest.approx(m["routed"]["accuracy"])
    assert at["cost_per_1000"] == pytest.approx(m["routed"]["cost_per_1000"])


# --------------------------------------------------------------------------------------------------------------------
# extraction, unknown frontier, flags


def test_extraction_with_unknown_frontier() -> None:
    m = evaluate(_extraction())
    assert m["small_only"]["accuracy"] == pytest.approx(0.5)
    assert m["routed"]["escalation_rate"] == pytest.approx(0.75)
    assert m["routed"]["accuracy"] == pytest.approx(1.0)
    assert m["frontier_only"]["accuracy"] is None
    assert m["frontier_assumed_correct"] is True
    assert any("frontier correctness unknown" in flag for flag in m["flags"])
    assert any(flag.startswith("total: 1 row(s) without a confidence") for flag in m["flags"])
    assert m["routed"]["savings_pct"] is None  # a zero frontier bill has no share to save
    per_part = m["per_part"]
    assert per_part["vendor"] == {
        "required": False,
        "threshold": None,
        "small_accuracy": 0.5,
        "frontier_accuracy": None,
        "routed_accuracy": 1.0,  # doc0 kept (right), docs 1-3 taken from the frontier (assumed right)
        "ece": None,
    }
    assert per_part["total"]["small_accuracy"] == pytest.approx(0.75)
    assert per_part["date"]["threshold"] == 0.5
    assert "vendor" not in m["calibration"]
    # total: 0.9 right (bin 9), 0.7 right (bin 7), 0.6 wrong (bin 6) -> (0.1 + 0.3 + 0.6) / 3
    assert m["calibration"]["total"]["ece"] == pytest.approx(1.0 / 3)


def test_none_threshold_escalates_everything() -> None:
    m = evaluate(_classification(thresholds={"label": None}))
    assert m["routed"]["escalation_rate"] == pytest.approx(1.0)
    assert m["routed"]["accuracy"] == pytest.approx(0.8)
    assert m["routed"]["cost_per_1000"] == pytest.approx(17.0)
    assert any("no threshold" in flag for flag in m["flags"])


def test_frontier_missing_a_part_is_flagged() -> None:
    inp = _extraction(frontier_correct={"total": np.array([F, F, F, F])})
    m = evaluate(inp)
    # escalated rows 1-3 take the frontier's total (wrong); date is unknown for the frontier and counted right
    assert m["routed"]["accuracy"] == pytest.approx(0.25)
    assert m["frontier_only"]["accuracy"] == pytest.approx(0.0)
    assert any("no frontier correctness for date, vendor" in flag for flag in m["flags"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"doc_ids": []}, "no documents"),
        ({"doc_ids": ["d0", "d0", "d1", "d2", "d3"]}, "repeat"),
        ({"small_cost_per_doc": np.full(4, 0.001)}, "one value per document"),
        ({"small_confidence": {"label": np.array([0.9, 0.4])}}, "one value per document"),
        ({"thresholds": {}}, "no threshold"),
        ({"thresholds": {"label": math.nan}}, "use None"),
        ({"required": ["total"]}, "no small_correct"),
        ({"frontier_cost_per_doc": np.array([0.01, -1, 0, 0, 0])}, "non-negative"),
        ({"per_label": {"gold": ["a"]}}, "1 labels for 5 documents"),
        ({"per_label": {"small": ["a"] * 5}}, "gold"),
    ],
)
def test_bad_input_fails_loudly(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        evaluate(_classification(**overrides))


# --------------------------------------------------------------------------------------------------------------------
# write_report


def _no_nan(token: str) -> None:
    raise AssertionError(f"metrics.json holds {token}")


def test_write_report_writes_three_files(tmp_path: Path) -> None:
    metrics = evaluate(_classification())
    metrics["extra"] = {"nan": float("nan"), "inf": np.float64("inf"), "count": np.int64(3)}
    paths = write_report(metrics, tmp_path / "out", title="Receipts: routing", operating_point_label="threshold 0.5")
    assert set(paths) == {"metrics", "plot", "report"}
    assert all(path.parent == tmp_path / "out" and path.is_file() for path in paths.values())

    png = paths["plot"].read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(png) > 10_000  # axes, a line, markers and text: not an empty canvas

    loaded = json.loads(paths["metrics"].read_text(), parse_constant=_no_nan)
    assert loaded["extra"] == {"nan": None, "inf": None, "count": 3}
    assert loaded["routed"]["accuracy"] == 1.0
    assert loaded["routed"]["savings_pct"] == 31.25
    assert loaded["per_label"]["small"]["labels"]["b"]["precision"] == 0.666667  # 6 significant digits
    assert loaded["thresholds"] == {"label": 0.5}

    report = paths["report"].read_text()
    assert report.startswith("# Receipts: routing")
    assert "![Routed accuracy against cost per 1,000 documents](accuracy_vs_cost.png)" in report
    assert "| **Routed: threshold 0.5** | **100.0%** | 40.0% | $11.00 | 31.2% |" in report
    assert "| Small model only | 60.0% | 0.0% | $1.00 | 93.8% |" in report
    assert "| b | 0.667 | 1.000 | 0.800 | 2 |" in report
    assert "label 0.210 (n=5)" in report


def test_write_report_for_extraction_without_frontier(tmp_path: Path) -> None:
    paths = write_report(evaluate(_extraction()), str(tmp_path), title="Invoices", operating_point_label="certified")
    loaded = json.loads(paths["metrics"].read_text(), parse_constant=_no_nan)
    assert loaded["frontier_only"]["accuracy"] is None
    report = paths["report"].read_text()
    assert "| vendor | no | — | 50.0% | — | 100.0% | — |" in report
    assert "frontier correctness unknown" in report
    assert paths["plot"].read_bytes().startswith(b"\x89PNG")


def test_thresholds_keep_every_digit(tmp_path: Path) -> None:
    metrics = evaluate(_classification(small_confidence={"label": np.array([0.123456789, 0.4, 0.8, 0.95, 0.3])}))
    paths = write_report(metrics, tmp_path, title="t", operating_point_label="p")
    loaded = json.loads(paths["metrics"].read_text())
    assert loaded["sweep"][0]["threshold"] == 0.123456789


def test_importing_evaluation_does_not_import_matplotlib() -> None:
    code = "import sys, docroute.tasks.account.evaluation; print('matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# --------------------------------------------------------------------------------------------------------------------
# certified operating points (both guarantees)


def _many(rows: int = 1000) -> EvaluationInput:
    """A classification set large enough to certify: accuracy rises with confidence (P(right | c) = c)."""
    rng = np.random.default_rng(5)
    confidence = rng.beta(4.0, 1.0, rows)
    small = rng.random(rows) < confidence
    frontier = rng.random(rows) < 0.97
    return EvaluationInput(
        doc_ids=[f"d{i}" for i in range(rows)],
        small_correct={"label": small},
        small_confidence={"label": confidence},
        required=["label"],
        frontier_correct={"label": frontier},
        small_cost_per_doc=np.full(rows, 0.001),
        frontier_cost_per_doc=np.full(rows, 0.02),
        thresholds={"label": 0.5},
        certification=CertificationSettings(target_accuracy=0.9, delta=0.1),
    )


def test_certified_operating_points_for_both_guarantees(tmp_path: Path) -> None:
    inp = _many()
    metrics = evaluate(inp)
    certified = metrics["certified"]
    assert set(certified) == {"kept", "overall"}
    confidence, small = inp.small_confidence["label"], inp.small_correct["label"]
    frontier = inp.frontier_correct["label"]  # type: ignore[index]
    for guarantee, point in certified.items():
        cert = certify_threshold(
            confidence, small, part="label", target_accuracy=0.9, delta=0.1, guarantee=guarantee
        )  # one part: certify_parts' delta / 1
        assert point["thresholds"] == {"label": cert.threshold} and cert.threshold is not None
        assert point["lower_bounds"] == {"label": cert.lower_bound}
        escalate = confidence < cert.threshold
        assert point["escalation_rate"] == pytest.approx(escalate.mean()) and point["escalated"] == escalate.sum()
        assert point["accuracy"] == pytest.approx(np.where(escalate, frontier, small).mean())
        assert point["kept_accuracy"] == pytest.approx(small[~escalate].mean())
        assert point["cost_per_1000"] == pytest.approx(1.0 + 20.0 * escalate.mean())
        assert point["savings_pct"] == pytest.approx((20.0 - point["cost_per_1000"]) / 20.0 * 100)
    assert certified["overall"]["escalation_rate"] < certified["kept"]["escalation_rate"] - 0.1
    assert certified["kept"]["kept_accuracy"] >= 0.9  # what each guarantee is about, seen on its own rows
    assert 1 - (~small & (confidence >= certified["overall"]["thresholds"]["label"])).mean() >= 0.9

    paths = write_report(metrics, tmp_path, title="Both", operating_point_label="threshold 0.5")
    loaded = json.loads(paths["metrics"].read_text(), parse_constant=_no_nan)
    assert loaded["certified"]["overall"]["thresholds"] == certified["overall"]["thresholds"]  # every digit
    report = paths["report"].read_text()
    assert "## Certified operating points" in report
    for guarantee, point in certified.items():
        row = (
            f"| {guarantee} | label ≥ {point['thresholds']['label']:g} | {point['escalation_rate'] * 100:.1f}% "
            f"| {point['accuracy'] * 100:.1f}% |"
        )
        assert row in report
    assert paths["plot"].read_bytes().startswith(b"\x89PNG")


def test_no_certified_points_without_settings() -> None:
    metrics = evaluate(_classification())
    assert metrics["certified"] is None
    assert evaluate(_classification(required=[], certification=CertificationSettings(0.9, 0.1)))["certified"] is None


def test_certified_points_on_whole_documents_share_one_threshold() -> None:
    rows = 1000
    rng = np.random.default_rng(8)
    label_confidence, total_confidence = rng.beta(4.0, 1.0, rows), rng.beta(5.0, 1.0, rows)
    label_right, total_right = rng.random(rows) < label_confidence, rng.random(rows) < total_confidence
    inp = _many(rows)
    inp.small_correct = {"label": label_right, "total": total_right}
    inp.small_confidence = {"label": label_confidence, "total": total_confidence}
    inp.frontier_correct = {"label": np.ones(rows, dtype=bool), "total": np.ones(rows, dtype=bool)}
    inp.required = ["label", "total"]
    inp.thresholds = {"label": 0.5, "total": 0.5}
    by_unit = {}
    for unit in ("part", "document"):
        inp.certification = CertificationSettings(target_accuracy=0.9, delta=0.1, unit=unit)
        by_unit[unit] = evaluate(inp)["certified"]["overall"]
    document, part = by_unit["document"], by_unit["part"]
    assert document["unit"] == "document" and part["unit"] == "part"
    assert len(set(document["thresholds"].values())) == 1
    # the frontier is right on every row here, so the routed accuracy is the whole-document A(t) on these rows
    assert document["accuracy"] >= 0.9 and document["escalation_rate"] >= part["escalation_rate"]
    markdown = "\n".join(_certified_markdown({"overall": document}))
    assert "Certified on whole documents" in markdown
