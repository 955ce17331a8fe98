"""The learned candidate ranker on synthetic receipts generated here: it must learn layout cues, not memorise values.

Each receipt is drawn from a seeded generator with varied layouts: the shop name under or above a header, with or
without a registration code, addresses of 2–3 lines, dates in several formats and places, the total's label before
the amount or on the line above it, cash tendered always above the total (so "largest amount" is wrong), and an
optional tip that half the receipts lack, and on most a second date (a promotion's end, a returns deadline). A
header line often comes before the shop's name, so "the first line" is not the answer either. Training and test
receipts come from different seeds.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence
from datetime import date
from decimal import Decimal
from typing import Any

import numpy as np
import pytest

from docroute.engines.extract.ranker import (
    ExtractionRanker,
    FieldRanker,
    RankerMismatchError,
    RankerTrainingError,
    train_extraction_ranker,
    train_ranker,
)
from docroute.engines.extract.ranker_features import ranker_candidates
from docroute.engines.local.encoders import Encoded
from docroute.schemas.compare import values_match
from docroute.schemas.spec import ExtractSpec, FieldSpec

COMPANY = FieldSpec(name="company", type="str", description="the shop that issued the receipt")
DATE = FieldSpec(name="date", type="date")
TOTAL = FieldSpec(name="total", type="decimal", description="the total amount paid")
TIP = FieldSpec(name="tip", type="decimal", description="the tip", required=False)
SPEC = ExtractSpec(fields=[COMPANY, DATE, TOTAL, TIP])

_NAMES = [
    "GOLDEN",
    "LOTUS",
    "PEARL",
    "RIVER",
    "SUNRISE",
    "MAPLE",
    "CEDAR",
    "HARBOUR",
    "ORCHID",
    "JADE",
    "SILVER",
    "BAMBOO",
    "CORAL",
    "EMERALD",
]
_KINDS = ["BAKERY", "CAFE", "HARDWARE", "STATIONERY", "PHARMACY", "MART", "KITCHEN", "BOOKSTORE", "FLORIST"]
_SUFFIXES = ["SDN BHD", "ENTERPRISE", "TRADING", "LTD", "& CO"]
_STREETS = ["JALAN MAWAR", "JALAN SAGU", "LORONG KENARI", "MAIN STREET", "HIGH ROAD", "JALAN PUTRA"]
_TOWNS = ["KAJANG", "JOHOR BAHRU", "PETALING JAYA", "IPOH", "KLANG", "MELAKA"]
_ITEMS = ["TEA", "COFFEE", "BREAD", "PEN", "NOTEBOOK", "GLUE", "RICE", "NOODLES", "SOAP", "BATTERY", "TAPE", "CANDLE"]
_TOTAL_LABELS = ["TOTAL", "GRAND TOTAL", "TOTAL DUE", "NET TOTAL", "TOTAL (RM)"]


def _money(value: Decimal) -> str:
    return f"{value:.2f}"


def synthetic_receipt(rng: random.Random) -> tuple[str, dict[str, Any]]:
    """One receipt's text and gold values."""
    company = f"{rng.choice(_NAMES)} {rng.choice(_NAMES)} {rng.choice(_KINDS)} {rng.choice(_SUFFIXES)}"
    day = date(rng.randint(2015, 2024), rng.randint(1, 12), rng.randint(1, 28))
    written = rng.choice(
        [day.strftime("%d/%m/%Y"), day.strftime("%d-%m-%Y"), day.strftime("%d %b %Y").upper(), day.isoformat()]
    )
    lines: list[str] = []
    if rng.random() < 0.5:
        lines.append(rng.choice(["WELCOME", "TAX INVOICE", "*** RECEIPT ***", f"{rng.choice(_NAMES)} KIOSK 2"]))
    lines.append(company)
    if rng.random() < 0.5:
        lines.append(f"({rng.randint(100000, 999999)}-{rng.choice('ABCDKMXW')})")
    lines.append(f"NO. {rng.randint(1, 200)}, {rng.choice(_STREETS)} {rng.randint(1, 20)},")
    if rng.random() < 0.5:
        lines.append(f"TAMAN {rng.choice(_NAMES)},")
    lines.append(f"{rng.randint(10000, 99999)} {rng.choice(_TOWNS)}")
    lines.append(f"TEL: 0{rng.randint(3, 9)}-{rng.randint(1000000, 9999999)}")
    later = date(day.year + 1, rng.randint(1, 12), rng.randint(1, 28))
    promotion_first = rng.random() < 0.4  # a second date that is not the receipt's, above or below it
    if promotion_first:
        lines.append(f"PROMOTION ENDS {later.strftime('%d/%m/%Y')}")
    date_line = rng.choice([f"DATE: {written}", f"DATE : {written} {rng.randint(8, 21)}:{rng.randint(10, 59)}"])
    date_first = rng.random() < 0.7
    if date_first:
        lines.append(date_line)
    lines.append(f"INVOICE NO: {rng.randint(1000, 99999)}")
    total = Decimal(0)
    for _ in range(rng.randint(1, 6)):
        quantity, price = rng.randint(1, 4), Decimal(rng.randint(50, 4000)) / 100
        amount = quantity * price
        total += amount
        lines.append(f"{rng.choice(_ITEMS)} {quantity} x {_money(price)} {_money(amount)}")
    tip = Decimal(rng.randint(1, 20)) if rng.random() < 0.5 else None
    if tip is not None:
        lines.append(rng.choice([f"TIP {_money(tip)}", f"GRATUITY: {_money(tip)}"]))
        total += tip
    label = rng.choice(_TOTAL_LABELS)
    if rng.random() < 0.5:
        lines.append(f"{label}: {_money(total)}")
    else:
        lines += [f"{label}:", _money(total)]
    cash = (total + rng.randint(1, 50)).quantize(Decimal(1))
    lines += [f"CASH {_money(cash)}", f"CHANGE {_money(cash - total)}"]
    if not date_first:
        lines.append(date_line)
    if not promotion_first and rng.random() < 0.6:
        lines.append(f"RETURNS VALID UNTIL {later.strftime('%d/%m/%Y')}")
    lines.append(rng.choice(["THANK YOU", "PLEASE COME AGAIN", "GOODS SOLD ARE NOT RETURNABLE"]))
    gold = {"company": company, "date": day.isoformat(), "total": _money(total), "tip": tip}
    return "\n".join(lines), gold


def receipts(seed: int, count: int) -> list[tuple[str, dict[str, Any]]]:
    rng = random.Random(seed)
    return [synthetic_receipt(rng) for _ in range(count)]


class HashEncoder:
    """A tiny deterministic encoder (hashed character trigrams), standing in for a real one's protocol."""

    def __init__(self, name: str = "test:trigrams_16", dim: int = 16) -> None:
        self.name, self.dim = name, dim

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        vectors = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for i in range(len(text) - 2):
                vectors[row, zlib.crc32(text[i : i + 3].encode()) % self.dim] += 1.0
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.where(norms == 0, 1, norms)

    def encode(self, texts: Sequence[str]) -> Encoded:
        return Encoded(self.embed(texts), [len(t) for t in texts], 10_000, 0.0)


@pytest.fixture(scope="module")
def train_set() -> list[tuple[str, dict[str, Any]]]:
    return receipts(seed=1, count=40)


@pytest.fixture(scope="module")
def test_set() -> list[tuple[str, dict[str, Any]]]:
    return receipts(seed=2, count=40)


@pytest.fixture(scope="module")
def trained(train_set: list[tuple[str, dict[str, Any]]]) -> ExtractionRanker:
    ranker, skipped = train_extraction_ranker(SPEC, train_set)
    assert skipped == {}
    return ranker


def _accuracy(ranker: FieldRanker, documents: list[tuple[str, dict[str, Any]]]) -> float:
    hits = [values_match(ranker.field, ranker.choose(text)[0], gold[ranker.field.name]) for text, gold in documents]
    return sum(hits) / len(hits)


@pytest.mark.parametrize("name", ["company", "date", "total", "tip"])
def test_ranker_generalises_to_unseen_layouts(
    trained: ExtractionRanker, test_set: list[tuple[str, dict[str, Any]]], name: str
) -> None:
    """Unseen shop names, amounts and layouts: the learned cues (position, labels), not the values, must carry over."""
    assert _accuracy(trained.rankers[name], test_set) >= 0.9


def test_total_is_not_the_largest_amount(trained: ExtractionRanker, test_set: list[tuple[str, dict[str, Any]]]) -> None:
    """Cash tendered is always larger than the total here, so the ranker must have learned the label, not size."""
    ranker = trained.rankers["total"]
    for text, gold in test_set[:10]:
        values, probs = ranker.rank(text)
        largest = max(v for v in values if v is not None)
        assert largest != Decimal(gold["total"])
        assert values_match(TOTAL, values[int(np.argmax(probs))], gold["total"])


def test_probabilities_sum_to_one_per_document(
    trained: ExtractionRanker, test_set: list[tuple[str, dict[str, Any]]]
) -> None:
    for text, _gold in test_set[:5]:
        for ranker in trained.rankers.values():
            values, probs = ranker.rank(text)
            assert len(values) == len(probs) > 0
            assert probs.sum() == pytest.approx(1.0)
            assert np.all(probs >= 0)
    values, _probs = trained.rankers["tip"].rank(test_set[0][0])
    assert values[-1] is None  # the optional field's "no value" option comes last


def test_optional_field_answers_no_value(trained: ExtractionRanker, test_set: list[tuple[str, dict[str, Any]]]) -> None:
    """Receipts without a tip get None (with confidence), receipts with one get its amount."""
    without = [(text, gold) for text, gold in test_set if gold["tip"] is None]
    with_tip = [(text, gold) for text, gold in test_set if gold["tip"] is not None]
    assert without and with_tip
    ranker = trained.rankers["tip"]
    chosen = [ranker.choose(text) for text, _gold in without]
    assert sum(value is None for value, _confidence in chosen) >= 0.9 * len(without)
    assert np.mean([confidence for value, confidence in chosen if value is None]) > 0.5
    assert _accuracy(ranker, with_tip) >= 0.85


def test_confidence_orders_answers(trained: ExtractionRanker, test_set: list[tuple[str, dict[str, Any]]]) -> None:
    """Confidences are probabilities of the chosen value, and right answers are on average more confident."""
    ranker = trained.rankers["company"]
    results = [(ranker.choose(text), gold["company"]) for text, gold in test_set]
    assert all(0.0 < confidence <= 1.0 for (_value, confidence), _gold in results)
    right = [c for (v, c), g in results if values_match(COMPANY, v, g)]
    wrong = [c for (v, c), g in results if not values_match(COMPANY, v, g)]
    assert not wrong or np.mean(right) > np.mean(wrong)


def test_round_trip_keeps_predictions(trained: ExtractionRanker, test_set: list[tuple[str, dict[str, Any]]]) -> None:
    data = trained.to_bytes()
    assert b"pickle" not in data[:200]
    loaded = ExtractionRanker.from_bytes(data)
    assert list(loaded.rankers) == list(trained.rankers)
    for name, ranker in trained.rankers.items():
        again = loaded.rankers[name]
        assert again.fingerprint == ranker.fingerprint and len(ranker.fingerprint) == 16
        assert again.field == ranker.field and again.encoder_name == ""
        text = test_set[3][0]
        assert np.allclose(again.rank(text)[1], ranker.rank(text)[1])
    assert loaded.extract(test_set[3][0]) == trained.extract(test_set[3][0])


def test_fingerprint_follows_the_training_data(train_set: list[tuple[str, dict[str, Any]]]) -> None:
    pairs = [(text, gold["date"]) for text, gold in train_set[:12]]
    first = train_ranker(DATE, pairs)
    assert train_ranker(DATE, pairs).fingerprint == first.fingerprint
    assert train_ranker(DATE, pairs[:-1]).fingerprint != first.fingerprint
    assert first.trained_on == first.offered == 12


def test_encoder_features_and_refusing_another_encoder(
    train_set: list[tuple[str, dict[str, Any]]], test_set: list[tuple[str, dict[str, Any]]]
) -> None:
    encoder = HashEncoder()
    pairs = [(text, gold["company"]) for text, gold in train_set[:24]]
    ranker = train_ranker(COMPANY, pairs, encoder=encoder)
    assert ranker.encoder_name == encoder.name and ranker.encoder_dim == encoder.dim
    assert _accuracy(ranker, test_set[:20]) >= 0.85
    data = ranker.to_bytes()
    loaded = FieldRanker.from_bytes(data, encoder=encoder)
    assert np.allclose(loaded.rank(test_set[0][0])[1], ranker.rank(test_set[0][0])[1])
    with pytest.raises(RankerMismatchError, match="trained with test:trigrams_16"):
        FieldRanker.from_bytes(data, encoder=HashEncoder(name="test:other_16"))
    with pytest.raises(RankerMismatchError, match="not no encoder"):
        FieldRanker.from_bytes(data)
    plain = train_ranker(COMPANY, pairs)
    with pytest.raises(RankerMismatchError, match="trained with no encoder"):
        ExtractionRanker.from_bytes(ExtractionRanker({"company": plain}, "").to_bytes(), encoder=encoder)


def test_optional_lm_scores_feature(
    train_set: list[tuple[str, dict[str, Any]]], test_set: list[tuple[str, dict[str, Any]]]
) -> None:
    """An LM score is one more feature when the caller has it; a ranker trained with it then needs it."""

    def lm(text: str, gold: Any) -> list[float]:  # an LM that prefers the right date, and knows nothing else
        return [2.0 if values_match(DATE, c.value, gold) else 0.0 for c in ranker_candidates(DATE, text)]

    pairs = [(text, gold["date"]) for text, gold in train_set[:16]]
    ranker = train_ranker(DATE, pairs, lm_scores=[lm(t, g) for t, g in pairs])
    assert ranker.uses_lm
    text, gold = test_set[0]
    candidates = ranker_candidates(DATE, text)
    value, confidence = ranker.choose(text, candidates, lm_scores=lm(text, gold["date"]))
    assert values_match(DATE, value, gold["date"]) and confidence > 0.5
    with pytest.raises(ValueError, match="lm_scores"):
        ranker.rank(text, candidates)


def test_too_little_data_is_refused() -> None:
    pairs = [("TOTAL 5.00\nCASH 10.00", "7.00"), ("TOTAL 3.00", "3.00")]  # only one gold value is a candidate
    with pytest.raises(RankerTrainingError, match="1 of 2 documents"):
        train_ranker(TOTAL, pairs)
    ranker, skipped = train_extraction_ranker(ExtractSpec(fields=[TOTAL]), [(t, {"total": g}) for t, g in pairs])
    assert ranker.rankers == {} and "total" in skipped


def test_enum_and_list_fields() -> None:
    """Fields whose options are not spans of the text: an enum mentioned in a decoy line too, and a list."""
    payment = FieldSpec(name="payment", type="enum", values=["cash", "card"])
    tags = FieldSpec(name="tags", type="list[str]", required=False)
    rng = random.Random(5)
    documents = []
    for _ in range(24):
        method, other = rng.sample(["CASH", "CARD"], 2)
        lines = [f"{other} PAYMENTS WELCOME", "ITEM 3.00", f"PAID BY: {method}", "THANK YOU"]
        if rng.random() < 0.5:
            lines.reverse()
        documents.append(("\n".join(lines), {"payment": method.lower(), "tags": None}))
    ranker, skipped = train_extraction_ranker(ExtractSpec(fields=[payment, tags]), documents[:16])
    assert "payment" in ranker.rankers
    hits = [ranker.rankers["payment"].choose(text)[0] == gold["payment"] for text, gold in documents[16:]]
    assert sum(hits) >= 7
    if "tags" in ranker.rankers:  # only "no value" was ever right: the ranker learns to say so
        assert ranker.rankers["tags"].choose(documents[20][0])[0] == []
    else:
        assert "tags" in skipped
