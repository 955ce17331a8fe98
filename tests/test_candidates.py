"""Candidate generation: the right answer must be offered, in a short, deterministic list."""

from __future__ import annotations

import time
from datetime import UTC, date, datetime
from decimal import Decimal

import pytest

from docroute.engines.scoring.candidates import Candidate, candidates_for
from docroute.schemas.spec import FieldSpec

RECEIPT = """\
KEDAI MAKAN SRI PELANGI SDN BHD (554433-K)
LOT 12, JALAN MAWAR 3,
TAMAN BUNGA RAYA,
43000 KAJANG, SELANGOR.
TEL: 03-8736 1122  FAX: 03-8736 1133
GST REG NO : 001122334455

SIMPLE TAX INVOICE
INVOICE NO: CS-2018-00917
DATE:14/03/2018 7:42:10 PM
CASHIER : AINA

NASI LEMAK AYAM        2 x 7.50      15.00
TEH TARIK              2 x 2.20       4.40
KUIH LAPIS             1 x 1.60       1.60
SERVICE CHARGE 10%                    2.10
SUB-TOTAL                            23.10
ROUNDING                             -0.02
TOTAL : RM 23.08
CASH                                 RM50.00
CHANGE                                26.92

THANK YOU, PLEASE COME AGAIN
"""

INVOICE = """\
Northwind Analytics GmbH
Kaiserstraße 41
60329 Frankfurt am Main

Rechnung Nr. RE-2024-0113
Datum: 05.02.2024
Fällig: 19.02.2024

Beratung Januar          12 h     1.234,50 EUR
Reisekosten                          (120,00) EUR
Summe netto                       € 1.114,50
Gesamtbetrag                      1.326,26 €
IBAN DE89370400440532013000
"""

EMAIL = """\
From: Dana Whitfield <dana.whitfield@example.org>
To: billing@acme-supplies.com
Subject: Order 55821 shipped on Jan 9, 2024

Hi team,

your order of 3 items (total $ 1,075.40) left our warehouse on Tuesday, 9 January 2024 at 14:05.
Tracking: https://track.example.org/p/ZX81-4471 - support line +1 (555) 010-2233.

Regards,
Dana Whitfield
Shipping Desk
"""


def spec(name: str, kind: str, **options: object) -> FieldSpec:
    return FieldSpec(name=name, type=kind, **options)


def surfaces(candidates: list[Candidate]) -> list[str]:
    return [c.surface for c in candidates]


def values(candidates: list[Candidate]) -> list[object]:
    return [c.value for c in candidates]


# --- dates -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "surface", "expected"),
    [
        ("Date: 25/12/2018", "25/12/2018", date(2018, 12, 25)),
        ("DATE:25/12/2018 8:13:39 PM", "25/12/2018", date(2018, 12, 25)),
        ("Date:12-01-19", "12-01-19", date(2019, 1, 12)),
        ("issued 2024-03-05T10:30:00Z", "2024-03-05", date(2024, 3, 5)),
        ("Datum 05.02.2024", "05.02.2024", date(2024, 2, 5)),
        ("on 12 Jan 2018 we", "12 Jan 2018", date(2018, 1, 12)),
        ("on Jan 12, 2018 we", "Jan 12, 2018", date(2018, 1, 12)),
        ("DUE 12-JAN-2018", "12-JAN-2018", date(2018, 1, 12)),
        ("Tuesday, 9 January 2024", "9 January 2024", date(2024, 1, 9)),
        ("5th March 2024", "5th March 2024", date(2024, 3, 5)),
        ("REF 20180312/1104", "20180312", date(2018, 3, 12)),
        ("05 MAR 18 18:24", "05 MAR 18", date(2018, 3, 5)),
        ("12/28/2017", "12/28/2017", date(2017, 12, 28)),  # only one reading is possible
    ],
)
def test_date_formats(text: str, surface: str, expected: date) -> None:
    found = candidates_for(spec("date", "date"), text)
    assert (surface, expected) in [(c.surface, c.value) for c in found]
    assert text.index(surface) in [c.start for c in found if c.surface == surface]


def test_date_order_reads_ambiguous_dates() -> None:
    assert values(candidates_for(spec("d", "date"), "03/04/2024")) == [date(2024, 4, 3)]
    assert values(candidates_for(spec("d", "date", date_order="MDY"), "03/04/2024")) == [date(2024, 3, 4)]


@pytest.mark.parametrize(
    "text",
    ["31/02/2018", "INV 12345678", "barcode 9556939040116", "ratio 1.2.3", "version 4.10.2", "total 12.50"],
)
def test_impossible_or_non_dates_are_not_offered(text: str) -> None:
    assert candidates_for(spec("date", "date"), text) == []


def test_dates_in_documents() -> None:
    assert values(candidates_for(spec("date", "date"), RECEIPT)) == [date(2018, 3, 14)]
    assert values(candidates_for(spec("due", "date"), INVOICE)) == [date(2024, 2, 5), date(2024, 2, 19)]
    found = candidates_for(spec("shipped", "date"), EMAIL)
    assert surfaces(found) == ["Jan 9, 2024", "9 January 2024"]
    assert set(values(found)) == {date(2024, 1, 9)}  # two spellings, one value: both kept


def test_datetime_takes_the_time_next_to_the_date() -> None:
    found = candidates_for(spec("issued_at", "datetime"), RECEIPT)
    assert [(c.surface, c.value) for c in found] == [
        ("14/03/2018 7:42:10 PM", datetime(2018, 3, 14, 19, 42, 10, tzinfo=UTC))
    ]
    found = candidates_for(spec("sent", "datetime"), EMAIL)
    assert ("9 January 2024 at 14:05", datetime(2024, 1, 9, 14, 5, tzinfo=UTC)) in [(c.surface, c.value) for c in found]
    assert ("Jan 9, 2024", datetime(2024, 1, 9, tzinfo=UTC)) in [(c.surface, c.value) for c in found]


def test_datetime_variants() -> None:
    text = "a 2024-03-05T10:30:00+08:00 b 12-01-19 13:05 c 8:13 PM 25/12/2018"
    found = {c.surface: c.value for c in candidates_for(spec("at", "datetime"), text)}
    assert found == {
        "2024-03-05T10:30:00+08:00": datetime(2024, 3, 5, 2, 30, tzinfo=UTC),
        "12-01-19 13:05": datetime(2019, 1, 12, 13, 5, tzinfo=UTC),
        "8:13 PM 25/12/2018": datetime(2018, 12, 25, 20, 13, tzinfo=UTC),
    }


# --- amounts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "surface", "expected"),
    [
        ("TOTAL : RM 9.00", "9.00", Decimal("9.00")),
        ("TOTAL:RM60.30", "60.30", Decimal("60.30")),
        ("Total $ 33.90", "33.90", Decimal("33.90")),
        ("Amount due 1,234.50 USD", "1,234.50", Decimal("1234.50")),
        ("Summe 1.234,50 EUR", "1.234,50", Decimal("1234.50")),
        ("Gesamt 12,5 €", "12,5", Decimal("12.50")),
        ("Betrag 1 234,56", "1 234,56", Decimal("1234.56")),
        ("Refund (12.00)", "(12.00)", Decimal("-12.00")),
        ("Rounding -0.02", "-0.02", Decimal("-0.02")),
        ("Balance £1,000,000.00", "1,000,000.00", Decimal("1000000.00")),
    ],
)
def test_amount_formats(text: str, surface: str, expected: Decimal) -> None:
    found = candidates_for(spec("total", "decimal"), text)
    assert (surface, expected) in [(c.surface, c.value) for c in found]


def test_amount_surfaces_are_bare_numbers() -> None:
    found = candidates_for(spec("total", "decimal"), RECEIPT)
    assert "23.08" in surfaces(found)
    assert "50.00" in surfaces(found)
    assert not any(s.upper().startswith(("RM", "$")) for s in surfaces(found))


def test_dates_times_phones_and_ids_are_not_amounts() -> None:
    found = surfaces(candidates_for(spec("total", "decimal"), RECEIPT))
    for digits in ("14", "03", "2018", "7", "42", "10", "8736", "1122", "1133", "554433", "001122334455"):
        assert digits not in found, digits
    assert "2018" not in found and "00917" not in found  # CS-2018-00917
    assert "10" not in found  # "10%" is not an amount of a non-percentage field
    invoice = surfaces(candidates_for(spec("total", "decimal"), INVOICE))
    assert "2024" not in invoice and "05" not in invoice and "0113" not in invoice
    assert "370400440532013000" not in invoice and "89370400440532013000" not in invoice
    email = surfaces(candidates_for(spec("total", "decimal"), EMAIL))
    assert "1,075.40" in email
    assert not {"555", "010", "2233", "14", "05", "9", "2024", "4471"} & set(email)


def test_amounts_in_a_german_invoice() -> None:
    found = {c.surface: c.value for c in candidates_for(spec("gesamtbetrag", "decimal"), INVOICE)}
    assert found["1.326,26"] == Decimal("1326.26")
    assert found["1.114,50"] == Decimal("1114.50")
    assert found["(120,00)"] == Decimal("-120.00")


def test_percentages_only_for_rate_fields() -> None:
    text = "SERVICE CHARGE 10% 2.10"
    assert surfaces(candidates_for(spec("service_charge", "decimal"), text)) == ["2.10"]
    rate = candidates_for(spec("service_rate", "decimal", description="service charge percent"), text)
    assert surfaces(rate) == ["10", "2.10"]


def test_float_fields_read_amounts_too() -> None:
    found = candidates_for(spec("total", "float"), "TOTAL : RM 23.08")
    assert [(c.surface, c.value) for c in found] == [("23.08", 23.08)]


def test_int_fields_take_whole_numbers_only() -> None:
    found = {c.surface: c.value for c in candidates_for(spec("quantity", "int"), RECEIPT)}
    assert found["2"] == 2 and found["1"] == 1
    assert not {"7.50", "15.00", "23", "7", "14", "2018"} & set(found)
    assert candidates_for(spec("n", "int"), "Population 1,234,567 in 2,001 towns")[0].value == 1234567
    assert values(candidates_for(spec("n", "int"), "Einwohner 1.234.567")) == [1234567]


# --- strings ---------------------------------------------------------------------------------------


def test_str_offers_lines_spans_and_parts() -> None:
    found = surfaces(candidates_for(spec("address", "str"), RECEIPT, limit=500))
    assert "KEDAI MAKAN SRI PELANGI SDN BHD (554433-K)" in found  # a line
    assert "KEDAI MAKAN SRI PELANGI SDN BHD" in found  # the name without its registration number
    assert "LOT 12, JALAN MAWAR 3, TAMAN BUNGA RAYA," in found  # a 2-line span
    assert "LOT 12, JALAN MAWAR 3, TAMAN BUNGA RAYA, 43000 KAJANG, SELANGOR." in found  # a 3-line span
    assert "CS-2018-00917" in found  # the value of "INVOICE NO: ..." and an id-like token
    assert "AINA" in found
    assert "THANK YOU, PLEASE COME AGAIN" in found
    # a span never crosses a blank line
    assert not any("GST REG NO : 001122334455 SIMPLE TAX INVOICE" in s for s in found)


def test_str_output_order_is_lines_then_spans_then_parts() -> None:
    found = candidates_for(spec("address", "str"), INVOICE)
    kinds = []
    lines = {" ".join(line.split()) for line in INVOICE.splitlines()}
    for candidate in found:
        kinds.append("line" if candidate.surface in lines else "other")
    first_other = kinds.index("other")
    assert "line" not in kinds[first_other:]
    line_starts = [c.start for c, kind in zip(found, kinds, strict=True) if kind == "line"]
    assert line_starts == sorted(line_starts)


def test_str_parts_from_an_email() -> None:
    found = surfaces(candidates_for(spec("sender_email", "str"), EMAIL))
    assert "dana.whitfield@example.org" in found
    assert "billing@acme-supplies.com" in found
    assert "https://track.example.org/p/ZX81-4471" in found
    assert "Dana Whitfield <dana.whitfield@example.org>" in found  # "From: ..." value
    assert "Dana Whitfield" in found


def test_str_keeps_labelled_lines_over_the_limit() -> None:
    filler = "\n".join(f"line number {i} of the general terms and conditions" for i in range(200))
    text = f"{filler}\nShip to:\nJordan Avery\n14 Elm Street\nSpringfield\n{filler}"
    found = surfaces(candidates_for(spec("ship_to", "str", description="shipping address"), text, limit=20))
    assert len(found) == 20
    assert "Jordan Avery" in found
    assert "Jordan Avery 14 Elm Street" in found
    # without a label the top of the document wins
    unlabelled = surfaces(candidates_for(spec("xyz", "str"), text, limit=20))
    assert "Jordan Avery" not in unlabelled
    assert unlabelled[0] == "line number 0 of the general terms and conditions"


def test_list_fields_use_string_candidates() -> None:
    found = candidates_for(spec("items", "list[str]"), "Apples; Pears\nPlums")
    assert found[0] == Candidate("Apples; Pears", ["Apples", "Pears"], 0)
    assert Candidate("Plums", ["Plums"], 14) in found


def test_crlf_and_ocr_spacing() -> None:
    found = candidates_for(spec("company", "str"), "ACME   SDN  BHD\r\nNO 5,  JALAN 2\r\n")
    assert surfaces(found)[:2] == ["ACME SDN BHD", "NO 5, JALAN 2"]
    assert found[1].start == len("ACME   SDN  BHD\r\n")


# --- enum and bool ---------------------------------------------------------------------------------


def test_enum_offers_every_allowed_value() -> None:
    field = spec("status", "enum", values=["paid", "unpaid", "void"])
    found = candidates_for(field, "Status: UNPAID")
    assert surfaces(found) == ["paid", "unpaid", "void"]
    assert [c.start for c in found] == [-1, 8, -1]
    assert surfaces(candidates_for(field, "")) == ["paid", "unpaid", "void"]


def test_enum_over_the_limit_keeps_mentioned_values() -> None:
    field = spec("country", "enum", values=[f"country {i}" for i in range(60)])
    found = candidates_for(field, "Shipped to country 55.", limit=5)
    assert surfaces(found) == ["country 0", "country 1", "country 2", "country 3", "country 55"]


def test_bool_offers_yes_and_no() -> None:
    found = candidates_for(spec("paid", "bool"), "anything")
    assert [(c.surface, c.value) for c in found] == [("yes", True), ("no", False)]


# --- limit, de-duplication, determinism ------------------------------------------------------------


def long_receipt() -> str:
    items = "\n".join(
        f"ITEM {i:03d}   {i % 7 + 1} x {i + 0.25:.2f}   {(i % 7 + 1) * (i + 0.25):.2f}" for i in range(80)
    )
    return f"MEGA MART\n{items}\nSUB TOTAL 9,990.75\nGRAND TOTAL : RM 10,590.20\nCASH 10,600.00\nCHANGE 9.80\n"


def test_limit_keeps_amounts_near_keywords() -> None:
    text = long_receipt()
    field = spec("total", "decimal")
    assert len(candidates_for(field, text, limit=1000)) > 48
    found = candidates_for(field, text)
    assert len(found) == 48
    for surface in ("9,990.75", "10,590.20", "10,600.00"):  # labelled, and the largest amounts
        assert surface in surfaces(found)
    starts = [c.start for c in found]
    assert starts == sorted(starts)  # document order survives the selection
    small = surfaces(candidates_for(field, text, limit=3))
    assert "10,590.20" in small and "9,990.75" in small


def test_limit_is_respected_for_every_type() -> None:
    text = long_receipt() + "\n" + RECEIPT + "\n" + INVOICE + "\n" + EMAIL
    for kind in ("str", "list[str]", "date", "datetime", "decimal", "float", "int"):
        for limit in (1, 5, 48):
            assert len(candidates_for(spec("field", kind), text, limit=limit)) <= limit
    assert candidates_for(spec("field", "str"), text, limit=0) == []


def test_dedupe_by_surface_keeps_first_occurrence() -> None:
    text = "PRICE 9.00\nTAX 0.00\nTOTAL 9.00\nPAID RM9.00\nTOTAL 9.0\n"
    found = candidates_for(spec("total", "decimal"), text)
    assert [(c.surface, c.start) for c in found] == [("9.00", 6), ("0.00", 15), ("9.0", text.index("9.0\n"))]
    assert found[0].value == found[2].value == Decimal("9.00")  # same value, different surfaces: both kept


def test_every_candidate_is_well_formed() -> None:
    for document in (RECEIPT, INVOICE, EMAIL, long_receipt()):
        for kind in ("str", "list[str]", "date", "datetime", "decimal", "float", "int"):
            found = candidates_for(spec("field", kind), document)
            assert len({c.surface for c in found}) == len(found)
            for candidate in found:
                assert candidate.value is not None and candidate.value != []
                assert candidate.surface == " ".join(candidate.surface.split())
                assert 0 <= candidate.start < len(document)


def test_deterministic() -> None:
    text = long_receipt() + RECEIPT + INVOICE + EMAIL
    for kind in ("str", "date", "datetime", "decimal", "int"):
        field = spec("total_amount", kind, description="the grand total")
        assert candidates_for(field, text, limit=30) == candidates_for(field, text, limit=30)


def test_empty_and_numberless_documents() -> None:
    for kind in ("str", "date", "datetime", "decimal", "int", "list[str]"):
        assert candidates_for(spec("field", kind), "") == []
        assert candidates_for(spec("field", kind), "\n\n   \n") == []
    assert candidates_for(spec("total", "decimal"), "no numbers here") == []


def test_fast_on_a_20kb_document() -> None:
    text = ((RECEIPT + INVOICE + EMAIL + long_receipt()) * 5)[:20_000]
    for kind in ("str", "date", "datetime", "decimal", "int"):
        field = spec("total", kind)
        candidates_for(field, text)
        began = time.perf_counter()
        candidates_for(field, text)
        assert time.perf_counter() - began < 0.25  # ~10-30 ms in practice; generous for slow CI machines
    began = time.perf_counter()
    candidates_for(spec("s", "str"), "1" * 20_000 + "@" + "a." * 5_000)  # no quadratic regex backtracking
    assert time.perf_counter() - began < 0.25
