"""Tests for schemas/values.py: every raw answer becomes a typed value of its field, or a ValueCoercionError."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest

from docroute.schemas.spec import FieldSpec
from docroute.schemas.values import (
    ValueCoercionError,
    clean_text,
    coerce_value,
    match_choice,
    parse_date,
    parse_datetime,
    parse_number,
    to_json_value,
)


def _field(kind: str, **options: Any) -> FieldSpec:
    return FieldSpec(name="x", type=kind, **options)


# --------------------------------------------------------------------------------------------------------------------
# parse_date


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-03-04", date(2024, 3, 4)),
        ("2024/3/4", date(2024, 3, 4)),
        ("2024.03.04", date(2024, 3, 4)),
        ("20240312", date(2024, 3, 12)),
        ("3 April 2024", date(2024, 4, 3)),
        ("Jan 12, 2018", date(2018, 1, 12)),
        ("OCT 3, 2016", date(2016, 10, 3)),
        ("12-JAN-2018", date(2018, 1, 12)),
        ("12 Jan, 2018", date(2018, 1, 12)),
        ("12 Jan 18", date(2018, 1, 12)),
        ("1st March 2024", date(2024, 3, 1)),
        ("March 1st, 2024", date(2024, 3, 1)),
        ("Mar. 5, 2024", date(2024, 3, 5)),
        ("Sept 9 2021", date(2021, 9, 9)),
        ("5 mars 2024", date(2024, 3, 5)),
        ("5. März 2024", date(2024, 3, 5)),
        ("17 Disember 2023", date(2023, 12, 17)),
        ("Tue, 12 Mar 2024", date(2024, 3, 12)),
        ("Tuesday 12 March 2024", date(2024, 3, 12)),
        ("Mon. 11 Mar 2024", date(2024, 3, 11)),
        ("  12   Jan   2018,", date(2018, 1, 12)),
        ("2024-03-04T10:00", date(2024, 3, 4)),
        ("13/04/2024", date(2024, 4, 13)),
    ],
)
def test_parse_date_formats(text: str, expected: date) -> None:
    assert parse_date(text) == expected


@pytest.mark.parametrize(
    ("text", "dmy", "mdy"),
    [
        ("03/04/2024", date(2024, 4, 3), date(2024, 3, 4)),
        ("04.03.2024", date(2024, 3, 4), date(2024, 4, 3)),
        ("12-01-2018", date(2018, 1, 12), date(2018, 12, 1)),
        # unambiguous either way: a part over 12 must be the day
        ("13/04/2024", date(2024, 4, 13), date(2024, 4, 13)),
        ("04/13/2024", date(2024, 4, 13), date(2024, 4, 13)),
        # month names are never ambiguous
        ("Jan 12, 2018", date(2018, 1, 12), date(2018, 1, 12)),
    ],
)
def test_parse_date_order_settles_ambiguous_dates(text: str, dmy: date, mdy: date) -> None:
    assert parse_date(text, "DMY") == dmy
    assert parse_date(text, "MDY") == mdy


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12.01.99", date(1999, 1, 12)),
        ("12/01/69", date(2069, 1, 12)),
        ("12/01/70", date(1970, 1, 12)),
        ("12/01/00", date(2000, 1, 12)),
        ("5 Jan 24", date(2024, 1, 5)),
    ],
)
def test_two_digit_years_pivot_at_1970(text: str, expected: date) -> None:
    assert parse_date(text) == expected


@pytest.mark.parametrize("text", ["31/02/2024", "2023-02-29", "32 Jan 2024", "2024-13-01"])
def test_impossible_dates_are_errors(text: str) -> None:
    with pytest.raises(ValueCoercionError, match="is not a real date"):
        parse_date(text)


@pytest.mark.parametrize("text", ["foo", "12 Foo 2024", "", "12/2024", "2024"])
def test_unreadable_dates_are_errors(text: str) -> None:
    with pytest.raises(ValueCoercionError):
        parse_date(text)


def test_leap_day() -> None:
    assert parse_date("29/02/2024") == date(2024, 2, 29)


@pytest.mark.parametrize("text", ["Jan 2024", "March 2019"])
def test_month_and_year_without_a_day_is_not_a_date(text: str) -> None:
    with pytest.raises(ValueCoercionError):
        parse_date(text)


def test_ymd_order_reads_year_first_short_dates() -> None:
    assert parse_date("24/03/04", "YMD") == date(2024, 3, 4)


# --------------------------------------------------------------------------------------------------------------------
# parse_datetime


def _utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-03-04T10:15:30Z", _utc(2024, 3, 4, 10, 15, 30)),
        ("2024-03-04T10:15:30+08:00", _utc(2024, 3, 4, 2, 15, 30)),
        ("2024-03-04T10:15:30.123456+00:00", _utc(2024, 3, 4, 10, 15, 30, 123456)),
        ("2024-03-04 10:15", _utc(2024, 3, 4, 10, 15)),
        ("2018-01-12 23:30 -02:00", _utc(2018, 1, 13, 1, 30)),
        ("12 Jan 2018 3:45 PM", _utc(2018, 1, 12, 15, 45)),
        ("Jan 12, 2018 3:45 p.m.", _utc(2018, 1, 12, 15, 45)),
        ("12 Jan 2018 12:05 AM", _utc(2018, 1, 12, 0, 5)),
        ("12 Jan 2018 12:05 PM", _utc(2018, 1, 12, 12, 5)),
        ("12 Jan 2018 11:59 pm", _utc(2018, 1, 12, 23, 59)),
        ("12/01/2018 10:00 +08:00", _utc(2018, 1, 12, 2, 0)),
        ("12/01/2018 10:00 -0530", _utc(2018, 1, 12, 15, 30)),
        ("12 Jan 2018 10:00 UTC", _utc(2018, 1, 12, 10, 0)),
        ("12 Jan 2018, 10:00 Z", _utc(2018, 1, 12, 10, 0)),
        ("12 Jan 2018 10:00 GMT+02:00", _utc(2018, 1, 12, 8, 0)),
        ("12 Jan 2018 10:00:05.5", _utc(2018, 1, 12, 10, 0, 5, 500000)),
        ("Mon, 11 Mar 2024 09:30:00 +0100", _utc(2024, 3, 11, 8, 30)),
        ("Wed, 13 Mar 2024 09:30:00 +0100", _utc(2024, 3, 13, 8, 30)),
        ("12 Jan 2018", _utc(2018, 1, 12)),
    ],
)
def test_parse_datetime_formats_and_zones(text: str, expected: datetime) -> None:
    parsed = parse_datetime(text)
    assert parsed == expected
    assert parsed.utcoffset() == timedelta(0)


def test_parse_datetime_order() -> None:
    assert parse_datetime("03/04/2024 10:00", "DMY") == _utc(2024, 4, 3, 10, 0)
    assert parse_datetime("03/04/2024 10:00", "MDY") == _utc(2024, 3, 4, 10, 0)


def test_impossible_time_is_an_error() -> None:
    with pytest.raises(ValueCoercionError, match="impossible time"):
        parse_datetime("12 Jan 2018 25:00")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Tue, 12 Mar 2024 09:30:00 +0100", _utc(2024, 3, 12, 8, 30)),
        ("Thu, 14 Mar 2024 09:30:00 GMT", _utc(2024, 3, 14, 9, 30)),
    ],
)
def test_parse_datetime_tuesday_and_thursday(text: str, expected: datetime) -> None:
    assert parse_datetime(text) == expected


# --------------------------------------------------------------------------------------------------------------------
# parse_number


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$1,234.56", "1234.56"),
        ("1.234,56 €", "1234.56"),
        ("1 234,56", "1234.56"),
        ("12 345,67 zł", "12345.67"),
        ("1'234.50", "1234.50"),
        ("12,5", "12.5"),
        ("0,5", "0.5"),
        ("1,234", "1234"),
        ("1,234,567", "1234567"),
        ("1.234.567", "1234567"),
        ("1 234 567", "1234567"),
        ("(1,234.50)", "-1234.50"),
        ("$(1,234.50)", "-1234.50"),
        ("-42", "-42"),
        ("$-42.50", "-42.50"),
        ("USD -3", "-3"),
        ("+7", "7"),
        ("USD 3,000", "3000"),
        ("€ 12.50", "12.50"),
        ("RM 1,234.5", "1234.5"),
        ("12.", "12"),
        ("１２３", "123"),
        ("Total: 12 items, 34 boxes", "12"),
    ],
)
def test_parse_number(text: str, expected: str) -> None:
    value = parse_number(text)
    assert value == Decimal(expected)
    assert str(value) == expected


@pytest.mark.parametrize("text", ["no number", "   ", "USD", "-"])
def test_parse_number_without_digits(text: str) -> None:
    with pytest.raises(ValueCoercionError, match="holds no number"):
        parse_number(text)


@pytest.mark.parametrize(("text", "expected"), [("-$42.50", "-42.50"), ("($1,234.50)", "-1234.50")])
def test_parse_number_negative_with_currency_symbol_inside(text: str, expected: str) -> None:
    assert parse_number(text) == Decimal(expected)


def test_parse_number_unicode_minus() -> None:
    assert parse_number("\u221242.50") == Decimal("-42.50")


def test_parse_number_decimal_comma_after_zero() -> None:
    assert parse_number("0,125") == Decimal("0.125")


# --------------------------------------------------------------------------------------------------------------------
# coerce_value by type


@pytest.mark.parametrize("kind", ["str", "int", "float", "decimal", "date", "datetime", "bool", "list[str]"])
@pytest.mark.parametrize("raw", [None, "", "   \n"])
def test_empty_answers_are_none(kind: str, raw: Any) -> None:
    assert coerce_value(_field(kind), raw) is None


def test_empty_enum_answer_is_none() -> None:
    assert coerce_value(_field("enum", values=["a", "b"]), " ") is None


def test_str() -> None:
    spec = _field("str")
    assert coerce_value(spec, "  Acme \n  Corp  ") == "Acme Corp"
    assert coerce_value(spec, 5) == "5"
    with pytest.raises(ValueCoercionError, match="expected text, got dict"):
        coerce_value(spec, {"a": 1})
    with pytest.raises(ValueCoercionError, match="expected text, got list"):
        coerce_value(spec, ["a"])


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(7, 7), ("1,000", 1000), ("12.0", 12), (12.0, 12), (Decimal("3"), 3), ("-5 units", -5), (2**63 - 1, 2**63 - 1)],
)
def test_int(raw: Any, expected: int) -> None:
    value = coerce_value(_field("int"), raw)
    assert value == expected
    assert type(value) is int


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (12.5, "12.5 is not a whole number"),
        ("12.5", "'12.5' is not a whole number"),
        (True, "True is a boolean, not a number"),
        (2**63, "does not fit a 64-bit integer"),
        (-(2**63) - 1, "does not fit a 64-bit integer"),
        ("abc", "'abc' holds no number"),
        ([1], "list value \\[1\\] is not a number"),
        (float("inf"), "inf is not a finite number"),
    ],
)
def test_int_rejects(raw: Any, message: str) -> None:
    with pytest.raises(ValueCoercionError, match=message):
        coerce_value(_field("int"), raw)


def test_int_lower_bound_fits() -> None:
    assert coerce_value(_field("int"), -(2**63)) == -(2**63)


@pytest.mark.parametrize(("raw", "expected"), [("1,5", 1.5), ("3.25", 3.25), (7, 7.0), ("$-0.5", -0.5)])
def test_float(raw: Any, expected: float) -> None:
    value = coerce_value(_field("float"), raw)
    assert value == expected
    assert type(value) is float


def test_float_rejects_nan() -> None:
    with pytest.raises(ValueCoercionError, match="nan is not a finite number"):
        coerce_value(_field("float"), float("nan"))


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("123.456", "123.46"),
        ("12.345", "12.34"),  # half-even: 4 is even
        ("12.355", "12.36"),  # half-even: 6 is even
        (1.005, "1.00"),  # the float's shortest repr is 1.005, rounded half-even
        ("(3.50)", "-3.50"),
        (3, "3.00"),
        ("€ 999,99", "999.99"),
        (Decimal("0.1"), "0.10"),
    ],
)
def test_decimal_quantises_to_scale(raw: Any, expected: str) -> None:
    value = coerce_value(_field("decimal", precision=5, scale=2), raw)
    assert isinstance(value, Decimal)
    assert str(value) == expected


@pytest.mark.parametrize("raw", ["1234.5", "999.995", 100000])
def test_decimal_precision_overflow(raw: Any) -> None:
    with pytest.raises(ValueCoercionError, match="has more than 5 digits"):
        coerce_value(_field("decimal", precision=5, scale=2), raw)


def test_decimal_scale_zero() -> None:
    assert str(coerce_value(_field("decimal", precision=4, scale=0), "12.5")) == "12"
    assert str(coerce_value(_field("decimal", precision=4, scale=0), "13.5")) == "14"


def test_wide_decimal_within_its_precision() -> None:
    value = coerce_value(_field("decimal", precision=38, scale=18), "12345678901.5")
    assert value == Decimal("12345678901.500000000000000000")


def test_huge_decimal_is_a_coercion_error() -> None:
    with pytest.raises(ValueCoercionError):
        coerce_value(_field("decimal", precision=18, scale=2), 10**30)


def test_date_field() -> None:
    dmy, mdy = _field("date"), _field("date", date_order="MDY")
    assert coerce_value(dmy, "05/02/2024") == date(2024, 2, 5)
    assert coerce_value(mdy, "05/02/2024") == date(2024, 5, 2)
    assert coerce_value(dmy, date(2024, 1, 2)) == date(2024, 1, 2)
    assert coerce_value(dmy, datetime(2024, 1, 2, 23, 59)) == date(2024, 1, 2)
    assert type(coerce_value(dmy, datetime(2024, 1, 2, 23, 59))) is date
    with pytest.raises(ValueCoercionError):
        coerce_value(dmy, "soon")


def test_datetime_field() -> None:
    spec = _field("datetime")
    assert coerce_value(spec, datetime(2024, 1, 2, 3, 4)) == _utc(2024, 1, 2, 3, 4)  # naive is UTC
    plus8 = datetime(2024, 1, 2, 3, 4, tzinfo=timezone(timedelta(hours=8)))
    converted = coerce_value(spec, plus8)
    assert converted == _utc(2024, 1, 1, 19, 4)
    assert converted.tzinfo == UTC
    assert coerce_value(spec, date(2024, 1, 2)) == _utc(2024, 1, 2)
    assert coerce_value(spec, "2024-01-02T03:04:05+08:00") == _utc(2024, 1, 1, 19, 4, 5)
    assert coerce_value(_field("datetime", date_order="MDY"), "01/02/2024 3:00 PM") == _utc(2024, 1, 2, 15, 0)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (True, True),
        (False, False),
        ("Yes", True),
        ("NO", False),
        ("true", True),
        ("False", False),
        ("1", True),
        ("0", False),
        (1, True),
        (0, False),
        ("Y.", True),
        ("on", True),
        ("off", False),
        ("Oui", True),
        ("Sí", True),
        ("nein", False),
    ],
)
def test_bool(raw: Any, expected: bool) -> None:
    assert coerce_value(_field("bool"), raw) is expected


@pytest.mark.parametrize("raw", ["maybe", "2", "yes please"])
def test_bool_rejects(raw: str) -> None:
    with pytest.raises(ValueCoercionError, match="is not yes/no"):
        coerce_value(_field("bool"), raw)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Net 30", "Net 30"),
        ("net-30", "Net 30"),
        ("NET 30", "Net 30"),
        ("due on receipt.", "Due on receipt"),
        ("cod", "COD"),
        ("C.O.D.", "COD"),
        ("Dué on Receipt", "Due on receipt"),
    ],
)
def test_enum_fuzzy_match(raw: str, expected: str) -> None:
    assert coerce_value(_field("enum", values=["Net 30", "Due on receipt", "COD"]), raw) == expected


def test_enum_rejects_unknown_value() -> None:
    with pytest.raises(ValueCoercionError, match=r"'net 60' is not one of the allowed values \(Net 30, COD\)"):
        coerce_value(_field("enum", values=["Net 30", "COD"]), "net 60")


def test_match_choice_truncates_long_choice_lists() -> None:
    choices = [f"v{i}" for i in range(12)]
    with pytest.raises(ValueCoercionError) as info:
        match_choice("zz", choices)
    assert str(info.value) == "'zz' is not one of the allowed values (v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, …)"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ('["a", "b"]', ["a", "b"]),
        ("a; b", ["a", "b"]),
        ("a;b\nc", ["a", "b", "c"]),
        ("single", ["single"]),
        ("[broken", ["[broken"]),
        ("[]", []),
        (["  a  b ", "", None, "c"], ["a b", "c"]),
        (("p", "q"), ["p", "q"]),
        ([1, 2], ["1", "2"]),
        ("a; ; b;", ["a", "b"]),
    ],
)
def test_list_of_strings(raw: Any, expected: list[str]) -> None:
    assert coerce_value(_field("list[str]"), raw) == expected


def test_list_of_strings_rejects() -> None:
    spec = _field("list[str]")
    with pytest.raises(ValueCoercionError, match="expected a list of strings, got dict"):
        coerce_value(spec, {"a": 1})
    with pytest.raises(ValueCoercionError, match="list items must be strings"):
        coerce_value(spec, '[{"a": 1}]')
    with pytest.raises(ValueCoercionError, match="list items must be strings"):
        coerce_value(spec, [["nested"]])


def test_clean_text() -> None:
    assert clean_text("  a\t b\n\nc  ") == "a b c"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (date(2024, 1, 2), "2024-01-02"),
        (_utc(2024, 1, 2, 3, 4, 5), "2024-01-02T03:04:05+00:00"),
        (Decimal("1.50"), "1.50"),
        (3, 3),
        (1.5, 1.5),
        ("x", "x"),
        (True, True),
        (None, None),
        (["a"], ["a"]),
    ],
)
def test_to_json_value(value: Any, expected: Any) -> None:
    assert to_json_value(value) == expected
