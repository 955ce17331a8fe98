"""Tests for schemas/compare.py: gold strings as receipts and invoices write them match the typed answers they mean.

Scoring decides the thresholds the router runs with, so a formatting difference counted as an error (or a broken
gold cell counted as a match) would move every threshold; these cases pin the normalisation per type.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import numpy as np
import pytest

from docroute.schemas.compare import label_match, normalise, values_match
from docroute.schemas.spec import FieldSpec


def _field(kind: str, **options: Any) -> FieldSpec:
    return FieldSpec(name="x", type=kind, **options)


# --------------------------------------------------------------------------------------------------------------------
# normalise, type by type


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("BOOK TA .K (TAMAN DAYA) SDN BHD", "book ta k taman daya sdn bhd"),
        ("book ta k taman daya sdn bhd", "book ta k taman daya sdn bhd"),
        ("  UNIHAIKKA   INTERNATIONAL\nSDN. BHD. ", "unihaikka international sdn bhd"),
        ("NO.3,JALAN PERMAS 10/8", "no 3 jalan permas 10 8"),
        ("Café  Müller — Zürich", "cafe muller zurich"),
        ("McDonald's", "mcdonalds"),
        ("MCDONALD’S", "mcdonalds"),
        ("A&W (M) SDN BHD", "a w m sdn bhd"),
        ("Straße", "strasse"),
    ],
)
def test_str_folds_case_accents_punctuation_and_spacing(raw: str, expected: str) -> None:
    assert normalise(_field("str"), raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("RM 9.00", Decimal("9")),
        ("RM9.00", Decimal("9")),
        ("9.0", Decimal("9")),
        ("9.00", Decimal("9")),
        (9, Decimal("9")),
        (9.0, Decimal("9")),
        (Decimal("9.000"), Decimal("9")),
        ("$1,234.50", Decimal("1234.5")),
        ("1.234,50 €", Decimal("1234.5")),
        ("USD 1,200", Decimal("1200")),
        ("(12.30)", Decimal("-12.3")),
        ("-0.00", Decimal("0")),
    ],
)
@pytest.mark.parametrize("kind", ["decimal", "float"])
def test_numbers_lose_currency_and_trailing_zeros(kind: str, raw: Any, expected: Decimal) -> None:
    key = normalise(_field(kind), raw)
    assert isinstance(key, Decimal)
    assert key == expected
    assert str(key) == str(expected)  # one canonical spelling, not 1.2E+3


def test_number_keys_are_plain_and_equal_across_spellings() -> None:
    decimal = _field("decimal")
    assert values_match(decimal, Decimal("9.00"), "RM 9.0")
    assert values_match(decimal, 9.0, "9.00")
    assert not values_match(decimal, "9.01", "RM 9.00")
    assert str(normalise(decimal, "1,200.00")) == "1200"


def test_float_binary_noise_is_not_a_miss() -> None:
    assert values_match(_field("float"), 0.1 + 0.2, "0.30")
    assert not values_match(_field("float"), 0.31, "0.30")


def test_decimal_uses_the_field_scale() -> None:
    two_places = _field("decimal", scale=2)
    assert values_match(two_places, "12.004", "12.00")  # the column holds 12.00 either way
    assert not values_match(_field("decimal", scale=3), "12.004", "12.00")


def test_int_reads_grouped_digits() -> None:
    assert normalise(_field("int"), "1,234") == 1234
    assert values_match(_field("int"), 3, "3.00")
    assert not values_match(_field("int"), 3, "4")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("OCT 3, 2016", "2016-10-03"),
        ("3 Oct 2016", "2016-10-03"),
        ("25/12/2018", "2018-12-25"),
        ("25-12-18", "2018-12-25"),
        ("25.12.2018", "2018-12-25"),
        ("2018-12-25", "2018-12-25"),
        ("20181225", "2018-12-25"),
        ("Tue, 25 Dec 2018", "2018-12-25"),
        (date(2018, 12, 25), "2018-12-25"),
        (datetime(2018, 12, 25, 10, 30), "2018-12-25"),
    ],
)
def test_date_formats_become_iso(raw: Any, expected: str) -> None:
    assert normalise(_field("date"), raw) == expected


def test_date_order_settles_ambiguous_dates() -> None:
    assert normalise(_field("date"), "03/04/2024") == "2024-04-03"
    assert normalise(_field("date", date_order="MDY"), "03/04/2024") == "2024-03-04"
    assert values_match(_field("date", date_order="MDY"), "OCT 3, 2016", "10/03/2016")


def test_datetime_becomes_utc_iso() -> None:
    field = _field("datetime")
    assert normalise(field, "25/12/2018 10:30 PM") == "2018-12-25T22:30:00+00:00"
    assert values_match(field, "2018-12-25T22:30:00Z", "25/12/2018 22:30")
    assert values_match(field, datetime(2018, 12, 25, 23, 30, tzinfo=UTC), "2018-12-26 00:30 +01:00")
    assert not values_match(field, "2018-12-25T22:31:00Z", "25/12/2018 22:30")


def test_enum_and_bool_compare_exactly_after_coercion() -> None:
    currency = _field("enum", values=["MYR", "USD", "SGD"])
    assert normalise(currency, " myr ") == "MYR"
    assert values_match(currency, "usd", "USD")
    assert not values_match(currency, "USD", "SGD")
    paid = _field("bool")
    assert normalise(paid, "Yes") is True
    assert values_match(paid, True, "yes")
    assert values_match(paid, "N", False)
    assert not values_match(paid, True, "no")


def test_list_order_and_item_formatting_do_not_matter() -> None:
    field = _field("list[str]")
    assert normalise(field, ["Nasi Lemak", "TEH TARIK", "roti canai"]) == ("nasi lemak", "roti canai", "teh tarik")
    assert values_match(field, ["TEH TARIK", "Nasi-Lemak"], "nasi lemak; teh tarik")
    assert values_match(field, '["b", "a"]', ["A", "B"])
    assert not values_match(field, ["a", "b"], ["a", "b", "c"])
    assert not values_match(field, ["a"], ["a", "a"])  # a repeated item is a different list


# --------------------------------------------------------------------------------------------------------------------
# empty and unreadable values


@pytest.mark.parametrize("empty", [None, "", "   ", "--", [], float("nan"), np.float64("nan")])
@pytest.mark.parametrize("kind", ["str", "decimal", "date", "list[str]"])
def test_empty_values_normalise_to_none(kind: str, empty: Any) -> None:
    assert normalise(_field(kind), empty) is None


def test_none_handling() -> None:
    total = _field("decimal")
    assert values_match(total, None, None)
    assert values_match(total, "", None)
    assert values_match(_field("list[str]"), [], None)
    assert not values_match(total, None, "RM 9.00")
    assert not values_match(total, "9.00", None)


@pytest.mark.parametrize(
    ("kind", "gold", "key", "typed_answer"),
    [
        ("date", "N/A", "n a", date(2018, 12, 25)),
        ("date", "31/02/2018", "31 02 2018", date(2018, 2, 28)),  # not a real date
        ("decimal", "see attached", "see attached", Decimal("0")),
        ("int", "12.5", "12 5", 12),
        ("bool", "maybe", "maybe", False),
        ("enum", "EUR", "eur", "USD"),
    ],
)
def test_unparseable_gold_keeps_its_text_and_never_matches_a_typed_answer(
    kind: str, gold: str, key: str, typed_answer: Any
) -> None:
    field = _field(kind, values=["MYR", "USD"]) if kind == "enum" else _field(kind)
    assert normalise(field, gold) == key
    assert not values_match(field, typed_answer, gold)
    assert values_match(field, gold.upper(), gold)  # the same stray text still equals itself


def test_bool_never_matches_an_int_key() -> None:
    # True == 1 in Python; keys of different types must not compare equal by accident
    assert not values_match(_field("bool"), True, "1.5")


def test_numpy_scalars_from_data_frames() -> None:
    assert values_match(_field("int"), np.int64(7), "7")
    assert values_match(_field("float"), np.float32(0.5), "0.50")
    assert values_match(_field("bool"), np.bool_(True), "yes")


# --------------------------------------------------------------------------------------------------------------------
# labels

_LABELS = ["invoice", "receipt", "purchase_order"]


@pytest.mark.parametrize(
    ("predicted", "gold", "expected"),
    [
        ("invoice", "invoice", True),
        ("Invoice", "invoice", True),
        (" RECEIPT. ", "receipt", True),
        ("purchase order", "purchase_order", True),
        ("Purchase-Order", "PURCHASE ORDER", True),
        ("invoice", "receipt", False),
        (None, None, True),
        ("", None, True),
        (None, "invoice", False),
        ("invoice", None, False),
        ("memo", "invoice", False),
        ("memo", "Memo", True),  # stray text outside the label set equals only itself
    ],
)
def test_label_match(predicted: str | None, gold: str | None, expected: bool) -> None:
    assert label_match(_LABELS, predicted, gold) is expected
