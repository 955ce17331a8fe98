"""The embedded engine on the real Gemma 3 270M: label scoring, embedding head, candidate extraction."""

from __future__ import annotations

from datetime import date
from decimal import Decimal

import numpy as np
import pytest

from docroute.engines.base import Request
from docroute.engines.local.llamacpp import LlamaCppEngine
from docroute.schemas.spec import (
    ClassifySpec,
    ExtractExample,
    ExtractSpec,
    FieldSpec,
    LabelSpec,
    LlamaCppSpec,
    TaskSpec,
)

TOPICS = {
    "sports": [
        "The striker scored twice as the home side won the cup final.",
        "The tennis champion lost in straight sets at the open.",
        "The marathon runner broke the course record by a minute.",
        "Our goalkeeper saved a penalty in the last minute of the match.",
        "The basketball team signed a new point guard for the season.",
        "She won gold in the swimming relay at the championships.",
    ],
    "weather": [
        "Heavy rain and strong winds are expected across the coast tonight.",
        "Temperatures will drop below freezing with snow in the hills.",
        "A heatwave will bring highs of 38 degrees this weekend.",
        "Fog will clear by noon, leaving sunny skies in the afternoon.",
        "Thunderstorms may cause flooding in low-lying areas tomorrow.",
        "A cold front brings showers and a chilly breeze on Monday.",
    ],
    "cooking": [
        "Whisk the eggs with sugar, then fold in the flour gently.",
        "Simmer the tomato sauce with garlic and basil for twenty minutes.",
        "Roast the chicken at 200 degrees until the skin is golden.",
        "Knead the dough and let it rise for an hour before baking.",
        "Season the soup with salt and pepper and serve it hot.",
        "Fry the onions slowly until they caramelise, then add the stock.",
    ],
}
TEST_TEXTS = [
    ("The midfielder was sent off and his team lost the derby.", "sports"),
    ("The cyclist won the mountain stage of the tour.", "sports"),
    ("Expect a sunny morning followed by rain in the evening.", "weather"),
    ("Snow storms will close mountain roads overnight.", "weather"),
    ("Chop the carrots, add them to the pot and stir well.", "cooking"),
    ("Bake the bread for forty minutes until it sounds hollow.", "cooking"),
]


def _classify_task(with_examples: bool) -> TaskSpec:
    labels = [
        LabelSpec(name=name, description=f"texts about {name}", examples=texts if with_examples else [])
        for name, texts in TOPICS.items()
    ]
    return TaskSpec(instructions="Short news and recipe snippets.", classify=ClassifySpec(labels=labels))


def _requests(items: list[tuple[str, str]]) -> list[Request]:
    return [Request(id=f"doc-{i}", text=text) for i, (text, _) in enumerate(items)]


def test_label_scoring_classifies_and_gives_probabilities(runtime) -> None:
    engine = LlamaCppEngine(
        LlamaCppSpec(classify_strategy="label_scoring"), _classify_task(with_examples=True), runtime=runtime
    )
    assert engine.strategy == "label_scoring" and engine.few_shot_used == 18
    predictions = engine.predict(_requests(TEST_TEXTS))
    assert [p.id for p in predictions] == [f"doc-{i}" for i in range(len(TEST_TEXTS))]
    correct = sum(p.label == gold for p, (_, gold) in zip(predictions, TEST_TEXTS, strict=True))
    assert correct >= 5, [(p.label, p.label_confidence) for p in predictions]
    for prediction in predictions:
        assert prediction.ok and 1 / 3 <= prediction.label_confidence <= 1.0
        assert prediction.usage.input_tokens > prediction.usage.cached_tokens > 0
        assert prediction.engine_seconds > 0


def test_contextual_calibration_changes_the_prior(runtime) -> None:
    task = _classify_task(with_examples=True)
    calibrated = LlamaCppEngine(LlamaCppSpec(classify_strategy="label_scoring"), task, runtime=runtime)
    raw = LlamaCppEngine(LlamaCppSpec(classify_strategy="label_scoring", calibration="none"), task, runtime=runtime)
    assert calibrated._label_prior is not None and raw._label_prior is None
    assert np.isclose(calibrated._label_prior.sum(), 1.0)
    text = [Request("x", "Rain later.")]
    assert calibrated.predict(text)[0].label_confidence != raw.predict(text)[0].label_confidence


def test_answers_are_deterministic_whatever_came_before(runtime) -> None:
    engine = LlamaCppEngine(
        LlamaCppSpec(classify_strategy="label_scoring"), _classify_task(with_examples=True), runtime=runtime
    )
    alone = engine.predict([Request("a", TEST_TEXTS[3][0])])[0]
    after_others = engine.predict(_requests(TEST_TEXTS))[3]
    assert (alone.label, alone.label_confidence) == (after_others.label, after_others.label_confidence)


INVOICE = """Northwind Office Supply
67 Mill Lane
Invoice No: NW-20931
Date: 14/03/2024
Paper A4 (box)        4   $263.17
Toner cartridge       1   $88.10
Subtotal: $351.27
TOTAL DUE: $351.27 USD
"""


def _extract_task() -> TaskSpec:
    fields = [
        FieldSpec(name="vendor", type="str", description="the company that issued the invoice"),
        FieldSpec(name="invoice_date", type="date"),
        FieldSpec(name="total", type="decimal", description="the total amount due"),
        FieldSpec(name="currency", type="enum", values=["USD", "EUR", "GBP"]),
        FieldSpec(name="po_number", type="str", required=False, description="purchase order number"),
    ]
    example = ExtractExample(
        text="Harbourside Stationers\nInvoice No: HS-1188\nDate: 05/02/2024\nPens 2 $14.00\nTOTAL DUE: $31.36 USD",
        values={"vendor": "Harbourside Stationers", "invoice_date": "05/02/2024", "total": "31.36", "currency": "USD"},
    )
    return TaskSpec(extract=ExtractSpec(fields=fields, examples=[example]))


def test_extraction_chooses_typed_values_from_the_document(runtime) -> None:
    engine = LlamaCppEngine(LlamaCppSpec(), _extract_task(), runtime=runtime)
    (prediction,) = engine.predict([Request("inv", INVOICE)])
    assert prediction.ok
    assert prediction.fields["invoice_date"] == date(2024, 3, 14)
    assert prediction.fields["total"] == Decimal("351.27")
    assert prediction.fields["currency"] == "USD"
    assert prediction.fields["vendor"] == "Northwind Office Supply"
    for name, confidence in prediction.field_confidences.items():
        assert 0.0 <= confidence <= 1.0, name
    assert prediction.field_confidences["invoice_date"] > 0.9  # the only date in the document


def test_required_field_without_candidates_has_zero_confidence(runtime) -> None:
    engine = LlamaCppEngine(LlamaCppSpec(), _extract_task(), runtime=runtime)
    (prediction,) = engine.predict([Request("note", "Please call me back about the delivery.")])
    assert prediction.fields["invoice_date"] is None
    assert prediction.field_confidences["invoice_date"] == 0.0
    assert prediction.fields["total"] is None and prediction.field_confidences["total"] == 0.0


def test_long_documents_are_truncated_and_say_so(runtime) -> None:
    engine = LlamaCppEngine(LlamaCppSpec(max_input_tokens=128), _extract_task(), runtime=runtime)
    long_text = INVOICE + "\n".join(f"Line {i}: nothing of interest here at all." for i in range(400))
    (prediction,) = engine.predict([Request("long", long_text)])
    assert prediction.ok and prediction.truncated
    short = engine.predict([Request("short", INVOICE)])[0]
    assert not short.truncated


def test_examples_are_dropped_to_fit_the_context(runtime) -> None:
    task = TaskSpec(
        extract=ExtractSpec(
            fields=[FieldSpec(name="total", type="decimal")],
            examples=[ExtractExample(text="word " * 3000, values={"total": "1.00"})] * 12,
        )
    )
    engine = LlamaCppEngine(LlamaCppSpec(n_ctx=2048), task, runtime=runtime)
    assert 0 < engine.examples_used < 12
    (prediction,) = engine.predict([Request("t", "Total: 12.50")])
    assert prediction.fields["total"] == Decimal("12.50")


def test_instructions_too_long_for_the_context_are_refused(runtime) -> None:
    from docroute.engines.base import EngineUnavailableError

    task = TaskSpec(instructions="word " * 3000, extract=ExtractSpec(fields=[FieldSpec(name="total", type="decimal")]))
    with pytest.raises(EngineUnavailableError, match="no room for documents"):
        LlamaCppEngine(LlamaCppSpec(n_ctx=2048), task, runtime=runtime)


def test_engine_seconds_count_compute_not_waiting(runtime) -> None:
    """Two shards in two threads share one model: each row's seconds exclude the time spent waiting for it."""
    import threading
    import time

    engine = LlamaCppEngine(
        LlamaCppSpec(classify_strategy="label_scoring"), _classify_task(with_examples=True), runtime=runtime
    )
    results: list = []
    batches = [_requests(TEST_TEXTS), _requests(TEST_TEXTS[::-1])]
    started = time.perf_counter()
    threads = [threading.Thread(target=lambda b=b: results.extend(engine.predict(b))) for b in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    assert len(results) == 12
    assert sum(p.engine_seconds for p in results) <= wall * 1.05
