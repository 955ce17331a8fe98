"""OCR line geometry reaches the extraction rankers, and text documents score exactly as before.

A scan's lines carry their boxes (tasks/ingest/layout.py); the request carries them to the engines
(engines/base.py `Request.geometry`), and the ranker features (engines/extract/ranker_features.py) use them: a value
on the row of its label reads that label as its left context even where the text put the two far apart. Without
geometry nothing may change, or every ranker trained on text would score differently. Synthetic pages only: no
SROIE, no OCR engine, no network.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import numpy as np
import pytest

from docroute.engines.base import Request
from docroute.engines.extract.extractor import RankerExtractor
from docroute.engines.extract.ranker import ExtractionRanker, train_extraction_ranker, train_ranker
from docroute.engines.extract.ranker_features import HASH_BITS, PageMap, _hash, featurize, ranker_candidates
from docroute.schemas.page_geometry import Box, PageLine
from docroute.schemas.spec import ExtractSpec, FieldSpec
from docroute.tasks.ingest import layout

TOTAL = FieldSpec(name="total", type="decimal", description="the total amount paid")
DATE = FieldSpec(name="date", type="date")
SPEC = ExtractSpec(fields=[TOTAL, DATE])

_WIDTH, _HEIGHT = 600.0, 900.0


def _line(page_row: int, column: int, text: str, x0: float, y0: float, *, dy: float = 0.0) -> PageLine:
    """A line of a synthetic page: 20 px high, 12 px a character, `dy` pixels off its row's baseline."""
    top = y0 + dy
    return PageLine(1, page_row, column, text, Box(x0, top, x0 + 12 * len(text), top + 20), 0.99, _WIDTH, _HEIGHT)


def _receipt(rng: random.Random) -> tuple[list[tuple[str, str]], Decimal, str]:
    """Rows of (left, right) cells of a receipt, its total and its date: cash tendered above the total is larger,
    so "the largest amount" is wrong, and the subtotal differs from the total by a service charge."""
    subtotal = Decimal(rng.randint(500, 9000)) / 100
    charge = Decimal(rng.randint(10, 300)) / 100
    total = subtotal + charge
    cash = (total // 10 + 1) * 10 + 10
    day, month = rng.randint(1, 28), rng.randint(1, 12)
    when = f"{day:02d}/{month:02d}/2019"
    rows = [
        (rng.choice(["GOLDEN CAFE", "PEARL MART", "JADE KITCHEN"]), ""),
        (f"DATE: {when}", ""),
        ("ITEM A", f"{subtotal / 2:.2f}"),
        ("ITEM B", f"{subtotal - subtotal / 2:.2f}"),
        ("SUBTOTAL", f"{subtotal:.2f}"),
        ("SERVICE", f"{charge:.2f}"),
        ("CASH", f"{cash:.2f}"),
        ("TOTAL", f"{total:.2f}"),
        ("CHANGE", f"{cash - total:.2f}"),
        ("THANK YOU", ""),
    ]
    return rows, total, when


def _as_text(rows: Sequence[tuple[str, str]]) -> str:
    """The receipt as a text document: each label and its amount on one line."""
    return "\n".join(f"{left} {right}".strip() for left, right in rows)


def _as_scan(rows: Sequence[tuple[str, str]], *, skew: float = 12.0, seed: int = 0) -> tuple[str, tuple[PageLine, ...]]:
    """The receipt as OCR returns it: every amount right-aligned and `skew` pixels lower than its label (a tilted
    scan: by default past the reading order's row tolerance, so label and amount land on different rows and text
    lines), the lines detected in a shuffled order, then put in reading order and written as `lines_text`, as
    tasks/ingest/parse.py does."""
    detected: list[layout.OcrLine] = []
    for row, (left, right) in enumerate(rows):
        y = 40.0 + 40.0 * row
        detected.append(layout.OcrLine(left, Box(30.0, y, 30.0 + 12 * len(left), y + 20), 0.99))
        if right:
            x0 = 560.0 - 12 * len(right)
            detected.append(layout.OcrLine(right, Box(x0, y + skew, 560.0, y + skew + 20), 0.99))
    random.Random(seed).shuffle(detected)
    lines = layout.reading_order(detected, page=1, width=_WIDTH, height=_HEIGHT)
    return layout.lines_text(lines), tuple(lines)


def _training(count: int, seed: int) -> list[tuple[str, dict[str, Any]]]:
    rng = random.Random(seed)
    documents = []
    for _ in range(count):
        rows, total, when = _receipt(rng)
        documents.append((_as_text(rows), {"total": total, "date": when}))
    return documents


@pytest.fixture(scope="module")
def text_ranker() -> ExtractionRanker:
    ranker, skipped = train_extraction_ranker(SPEC, _training(40, seed=1), seed=0)
    assert not skipped
    return ranker


def test_layout_reexports_the_schema_types() -> None:
    """tasks/ingest/layout.py keeps its public names; they are the schema's types, not copies."""
    assert layout.Box is Box
    assert layout.PageLine is PageLine
    ordered = layout.reading_order(
        [layout.OcrLine("12.50", Box(400, 11, 460, 31), 0.9), layout.OcrLine("TOTAL", Box(20, 10, 90, 30), 0.9)],
        page=1,
        width=500,
        height=800,
    )
    assert [(line.text, line.row, line.column) for line in ordered] == [("TOTAL", 0, 0), ("12.50", 0, 1)]
    assert isinstance(ordered[0], PageLine)
    assert ordered[1].relative_box.x0 == pytest.approx(0.8)


def test_a_request_has_no_geometry_unless_given() -> None:
    assert Request("a", "text").geometry == ()
    line = _line(0, 0, "TOTAL", 10, 10)
    assert Request("a", "TOTAL", (line,)).geometry == (line,)


def test_page_map_finds_lines_in_any_text_order() -> None:
    rows, total, _when = _receipt(random.Random(3))
    text, lines = _as_scan(rows)
    assert "TOTAL\n" in text  # the skew put the amount on a text line of its own
    scrambled = "\n".join(reversed(text.splitlines()))
    for document in (text, scrambled):
        pages = PageMap(document, lines)
        assert len(pages.placed) == len(lines)
        amount = next(line for line in lines if line.text == f"{total:.2f}")
        offset = document.index(f"\n{amount.text}") + 1
        placed = pages.at(offset)
        assert placed is not None and placed.line == amount
        left, right = pages.row_neighbours(placed, offset)
        assert [line.text for line in left] == ["TOTAL"] and right == []
        assert pages.relative_x(placed, offset) > 0.8
        assert pages.relative_y(placed) == pytest.approx((40 + 40 * 7 + 12 + 10) / _HEIGHT)
        assert pages.at(len(document) + 5) is None
    same_row = _as_scan(rows, skew=3.0)[0]
    assert f"TOTAL {total:.2f}" in same_row  # a few pixels: one row, one text line, as before


def test_the_total_row_reaches_the_amounts_features() -> None:
    """The amount on the TOTAL row, on another text line, gets "total" as its left context only with geometry."""
    rows, total, _when = _receipt(random.Random(4))
    text, lines = _as_scan(rows)  # low enough for another row in the reading order, not for the overlap
    candidates = ranker_candidates(TOTAL, text)
    index = next(i for i, c in enumerate(candidates) if c.value == total)
    flat = featurize(TOTAL, text, candidates, with_none=False)
    placed = featurize(TOTAL, text, candidates, with_none=False, geometry=lines)
    assert flat.shape == placed.shape  # the width is fixed: saved rankers read the same columns
    for namespace in ("l", "gl", "gl1"):
        column = _hash(namespace, "total")
        assert flat[index, column] == 0
        assert placed[index, column] == 1
    # the words right of the label and its value on other rows do not leak in
    assert placed[index, _hash("l", "cash")] == 0
    geo_tokens = [_hash("geo", token) for token in ("col0", "cells2", "rightmost", "x4")]
    assert all(placed[index, column] == 1 for column in geo_tokens)
    assert all(flat[index, column] == 0 for column in geo_tokens)
    assert placed.shape[1] > 1 << HASH_BITS


def test_text_documents_score_exactly_as_without_geometry(text_ranker: ExtractionRanker) -> None:
    """No geometry, an empty one, or training with empty geometries: the same features, weights and fingerprint."""
    documents = _training(8, seed=2)
    for text, _gold in documents:
        candidates = ranker_candidates(TOTAL, text)
        before = featurize(TOTAL, text, candidates, with_none=False)
        after = featurize(TOTAL, text, candidates, with_none=False, geometry=())
        assert (before != after).nnz == 0
        field = text_ranker.rankers["total"]
        assert np.array_equal(field.rank(text)[1], field.rank(text, geometry=())[1])
        assert text_ranker.extract(text) == text_ranker.extract(text, ())
    pairs = [(text, gold["total"]) for text, gold in documents]
    plain = train_ranker(TOTAL, pairs, seed=0)
    empty = train_ranker(TOTAL, pairs, geometries=[()] * len(pairs), seed=0)
    assert np.array_equal(plain.weights, empty.weights)
    assert plain.fingerprint == empty.fingerprint
    with pytest.raises(ValueError, match="geometries"):
        train_ranker(TOTAL, pairs, geometries=[()], seed=0)


def test_a_text_trained_ranker_reads_the_total_row_of_a_scan(text_ranker: ExtractionRanker) -> None:
    """Trained on text receipts, the ranker finds the total of tilted scans whose text separates label and amount
    when the request carries the geometry; saved and loaded, it still does."""
    rng = random.Random(9)
    scans = []
    for _ in range(20):
        rows, total, _when = _receipt(rng)
        scans.append((*_as_scan(rows, seed=len(scans)), total))
    loaded = ExtractionRanker.from_bytes(text_ranker.to_bytes())
    with_geometry = [loaded.extract(text, lines)[0]["total"] == total for text, lines, total in scans]
    without = [loaded.extract(text)[0]["total"] == total for text, _lines, total in scans]
    assert sum(with_geometry) >= 17
    assert sum(with_geometry) > sum(without)


def test_the_ranker_engine_passes_the_request_geometry(text_ranker: ExtractionRanker) -> None:
    rows, total, _when = _receipt(random.Random(11))
    text, lines = _as_scan(rows)
    engine = RankerExtractor(SPEC, text_ranker)
    with_lines, without = engine.predict([Request("a", text, lines), Request("b", text)])
    assert with_lines.ok and without.ok
    assert with_lines.fields["total"] == total
    assert with_lines.field_confidences["total"] != without.field_confidences["total"]


def test_training_with_geometry_learns_the_row_tokens() -> None:
    """Rankers trained on scans (text and lines) use the geometric tokens: the same scans without lines lose."""
    rng = random.Random(5)
    scans = []
    for _ in range(40):
        rows, total, when = _receipt(rng)
        text, lines = _as_scan(rows, seed=len(scans))
        scans.append((text, lines, {"total": total, "date": when}))
    totals = ExtractSpec(fields=[TOTAL])
    ranker, skipped = train_extraction_ranker(
        totals, [(text, gold) for text, _lines, gold in scans[:25]], geometries=[s[1] for s in scans[:25]], seed=0
    )
    assert not skipped
    held = scans[25:]
    hits = [ranker.extract(text, lines)[0]["total"] == gold["total"] for text, lines, gold in held]
    assert sum(hits) >= len(held) - 1
    assert (
        ranker.rankers["total"].fingerprint
        != train_ranker(TOTAL, [(text, gold["total"]) for text, _lines, gold in scans[:25]], seed=0).fingerprint
    )


def test_a_date_run_into_its_time_is_a_candidate() -> None:
    """OCR that loses the space between a date and its time ("29/06/20188:26:57AM") still offers the date."""
    from docroute.engines.scoring.candidates import candidates_for

    for text, day in (
        ("29/06/20188:26:57AM", "2018-06-29"),
        ("05/SE200209/42193 06/04/1711:43AM", "2017-04-06"),
        ("DATE :08/02/20172:09:49PM", "2017-02-08"),
    ):
        assert [c.value.isoformat() for c in candidates_for(DATE, text)] == [day]
    amounts = [c.value for c in candidates_for(TOTAL, "29/06/20188:26:57AM TOTAL 12.50")]
    assert amounts == [Decimal("12.50")]
