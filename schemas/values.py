"""Turn raw answers (model text, JSON values, gold labels) into the typed values a field's column holds.

Every answer — small model, frontier, or a gold label in an evaluation — passes through `coerce_value`, so a value
reaches Parquet only if it fits the declared type, and two answers compare equal when they mean the same thing.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation, localcontext
from typing import Any

from docroute.schemas.errors import DocrouteError
from docroute.schemas.spec import FieldSpec


class ValueCoercionError(DocrouteError, ValueError):
    """A raw value that cannot be read as its field's type; the message says why."""


_NUMBER = re.compile(r"[-+]?\(?\d[\d\s.,'’]*\)?")
_MONTHS = {
    name: i
    for i, names in enumerate(
        [
            ("jan", "january", "januari", "janvier", "januar", "enero"),
            ("feb", "february", "februari", "fevrier", "février", "februar", "febrero"),
            ("mar", "march", "mac", "mars", "maerz", "märz", "marzo"),
            ("apr", "april", "avril", "abril"),
            ("may", "mei", "mai", "mayo"),
            ("jun", "june", "juni", "juin", "junio"),
            ("jul", "july", "julai", "juli", "juillet", "julio"),
            ("aug", "august", "ogos", "aout", "août", "agosto"),
            ("sep", "sept", "september", "septembre", "septiembre"),
            ("oct", "october", "oktober", "octobre", "okt", "octubre"),
            ("nov", "november", "novembre", "noviembre"),
            ("dec", "december", "disember", "decembre", "décembre", "dezember", "dez", "diciembre"),
        ],
        start=1,
    )
    for name in names
}
_MONTH_WORD = r"(?P<mon>[A-Za-zéûä]{3,9})\.?"
_DATE_PATTERNS: tuple[re.Pattern[str], ...] = (
    re.compile(r"^(?P<y>\d{4})[-/.](?P<m>\d{1,2})[-/.](?P<d>\d{1,2})$"),
    re.compile(r"^(?P<a>\d{1,2})[-/.](?P<b>\d{1,2})[-/.](?P<y>\d{2}|\d{4})$"),
    re.compile(r"^(?P<d>\d{1,2})(?:st|nd|rd|th)?[\s\-/.]*" + _MONTH_WORD + r"[\s\-/.,]*(?P<y>\d{2}|\d{4})$"),
    re.compile(_MONTH_WORD + r"[\s\-/.]*(?P<d>\d{1,2})(?:st|nd|rd|th)?[\s,\-/.]+(?P<y>\d{4}|\d{2})$"),
    re.compile(r"^(?P<y>\d{4})(?P<m>\d{2})(?P<d>\d{2})$"),
)
_TIME = re.compile(r"(?P<h>\d{1,2}):(?P<mi>\d{2})(?::(?P<s>\d{2})(?:\.(?P<f>\d{1,6}))?)?\s*(?P<ampm>[AaPp]\.?[Mm]\.?)?")
_WEEKDAYS = {
    "mon",
    "monday",
    "tue",
    "tues",
    "tuesday",
    "wed",
    "wednesday",
    "thu",
    "thur",
    "thurs",
    "thursday",
    "fri",
    "friday",
    "sat",
    "saturday",
    "sun",
    "sunday",
}
_ZONE = re.compile(r"(?:\s*(?P<z>Z|UTC|GMT)|\s*(?:UTC|GMT)?\s*(?P<sign>[+-])(?P<zh>\d{2}):?(?P<zm>\d{2}))\s*$")
_TRUE = {"true", "yes", "y", "1", "t", "on", "ja", "oui", "si", "sí"}
_FALSE = {"false", "no", "n", "0", "f", "off", "nein", "non"}


def _full_year(year: int) -> int:
    if year >= 100:
        return year
    return 2000 + year if year < 70 else 1900 + year


def parse_date(text: str, order: str = "DMY") -> date:
    """Read a date written in any common way; `order` settles 03/04/2024 (DMY: 3 April)."""
    cleaned = " ".join(text.strip().split()).strip(" ,;")
    weekday = re.match(r"^([A-Za-z]{3,9})\.?,?\s+(?=\d)", cleaned)  # "Tue, 12 Mar 2024"
    if weekday and weekday.group(1).lower() in _WEEKDAYS:
        cleaned = cleaned[weekday.end() :]
    for pattern in _DATE_PATTERNS:
        match = pattern.match(cleaned)
        if not match:
            continue
        groups = match.groupdict()
        year = _full_year(int(groups["y"]))
        if groups.get("mon"):
            month = _MONTHS.get(groups["mon"].lower())
            if month is None:
                continue
            day = int(groups["d"])
        elif "a" in groups and groups.get("a"):
            first, second = int(groups["a"]), int(groups["b"])
            if order == "YMD" and len(groups["y"]) == 2:  # 24/03/04 read year first: 2024-03-04
                year, first, second = _full_year(first), second, int(groups["y"])
                order = "MDY"
            if order == "MDY":
                month, day = first, second
            else:
                day, month = first, second
            if month > 12 >= day:  # unambiguous the other way round
                day, month = month, day
        else:
            month, day = int(groups["m"]), int(groups["d"])
        try:
            return date(year, month, day)
        except ValueError as exc:
            raise ValueCoercionError(f"{text!r} is not a real date ({exc})") from None
    try:
        return datetime.fromisoformat(cleaned).date()
    except ValueError:
        pass
    raise ValueCoercionError(f"{text!r} is not a date in any format docroute reads")


def parse_datetime(text: str, order: str = "DMY") -> datetime:
    """Read a date and time; a value without a zone is taken as UTC, and every result is UTC."""
    cleaned = " ".join(text.strip().split())
    try:
        parsed = datetime.fromisoformat(cleaned.replace("Z", "+00:00"))
    except ValueError:
        offset = timedelta(0)
        zone = _ZONE.search(cleaned)
        if zone and _TIME.search(cleaned[: zone.start()]):
            if zone["sign"]:
                offset = timedelta(hours=int(zone["zh"]), minutes=int(zone["zm"]))
                offset = -offset if zone["sign"] == "-" else offset
            cleaned = cleaned[: zone.start()]
        match = _TIME.search(cleaned)
        date_part = cleaned[: match.start()] if match else cleaned
        day = parse_date(date_part.rstrip(" ,").removesuffix("T").rstrip(" ,"), order)
        clock = time()
        if match:
            hour = int(match["h"])
            ampm = (match["ampm"] or "").lower().replace(".", "")
            if ampm == "pm" and hour < 12:
                hour += 12
            elif ampm == "am" and hour == 12:
                hour = 0
            try:
                clock = time(hour, int(match["mi"]), int(match["s"] or 0), int((match["f"] or "0").ljust(6, "0")))
            except ValueError as exc:
                raise ValueCoercionError(f"{text!r} has an impossible time ({exc})") from None
        parsed = datetime.combine(day, clock, tzinfo=timezone(offset))
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def parse_number(text: str) -> Decimal:
    """Read an amount or count: currency signs, thousands separators and decimal commas are understood."""
    raw = unicodedata.normalize("NFKC", text).replace("\u2212", "-").strip()  # U+2212 is PDF text's minus
    match = _NUMBER.search(raw)
    if not match:
        raise ValueCoercionError(f"{text!r} holds no number")
    token = match.group(0).strip()
    before = raw[: match.start()].strip()
    negative = (
        token.startswith("-")
        or before.endswith("-")
        or before.startswith("-")
        or ((token.startswith("(") or before.startswith("(")) and raw.rstrip().endswith(")"))
    )
    body = re.sub(r"[^\d.,]", "", token)
    if not body or not body[0].isdigit():
        raise ValueCoercionError(f"{text!r} holds no number")
    body = body.rstrip(".,")
    if "," in body and "." in body:
        decimal_sep = "," if body.rfind(",") > body.rfind(".") else "."
    elif body.count(",") > 1:
        decimal_sep = "."  # 1,234,567
    elif "," in body:
        head, _, tail = body.partition(",")
        grouped = len(tail) == 3 and head and not head.startswith("0")  # 1,234 but not 0,125
        decimal_sep = "." if grouped else ","
    elif body.count(".") > 1:
        decimal_sep = ","  # 1.234.567 uses dots for thousands
    else:
        decimal_sep = "."
    thousands = "," if decimal_sep == "." else "."
    normalised = body.replace(thousands, "").replace(decimal_sep, ".")
    try:
        value = Decimal(normalised)
    except InvalidOperation:
        raise ValueCoercionError(f"{text!r} is not a number") from None
    return -value if negative else value


def _as_decimal(raw: Any) -> Decimal:
    if isinstance(raw, bool):
        raise ValueCoercionError(f"{raw!r} is a boolean, not a number")
    if isinstance(raw, Decimal):
        return raw
    if isinstance(raw, int):
        return Decimal(raw)
    if isinstance(raw, float):
        if not math.isfinite(raw):
            raise ValueCoercionError(f"{raw!r} is not a finite number")
        return Decimal(repr(raw))
    if isinstance(raw, str):
        return parse_number(raw)
    raise ValueCoercionError(f"{type(raw).__name__} value {raw!r} is not a number")


def _fold(text: str) -> str:
    """Compare labels loosely: case, accents, spacing and punctuation do not matter."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    return re.sub(r"[^a-z0-9]+", "", folded)


def match_choice(raw: str, choices: list[str]) -> str:
    """Map an answer to one of the allowed values, forgiving case, spacing and punctuation."""
    if raw in choices:
        return raw
    folded = _fold(raw)
    for choice in choices:
        if _fold(choice) == folded:
            return choice
    shown = ", ".join(choices[:10]) + (", …" if len(choices) > 10 else "")
    raise ValueCoercionError(f"{raw!r} is not one of the allowed values ({shown})")


def clean_text(text: str) -> str:
    """Collapse runs of whitespace; extracted strings carry no layout."""
    return " ".join(str(text).split())


def coerce_value(field: FieldSpec, raw: Any) -> Any:
    """Return the field's typed value for a raw answer, None for an empty one, or raise ValueCoercionError."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    kind = field.type
    if kind == "str":
        if isinstance(raw, (dict, list)):
            raise ValueCoercionError(f"expected text, got {type(raw).__name__}")
        return clean_text(str(raw)) or None
    if kind == "int":
        value = _as_decimal(raw)
        if value != value.to_integral_value():
            raise ValueCoercionError(f"{raw!r} is not a whole number")
        result = int(value)
        if not -(2**63) <= result < 2**63:
            raise ValueCoercionError(f"{raw!r} does not fit a 64-bit integer")
        return result
    if kind == "float":
        return float(_as_decimal(raw))
    if kind == "decimal":
        with localcontext() as context:  # the default 28 digits are fewer than decimal128's 38
            context.prec = 80
            try:
                value = _as_decimal(raw).quantize(Decimal(1).scaleb(-field.scale), rounding=ROUND_HALF_EVEN)
            except InvalidOperation:
                raise ValueCoercionError(f"{raw!r} does not fit decimal({field.precision},{field.scale})") from None
        if len(value.as_tuple().digits) > field.precision:
            raise ValueCoercionError(f"{raw!r} has more than {field.precision} digits")
        return value
    if kind == "date":
        if isinstance(raw, datetime):
            return raw.date()
        if isinstance(raw, date):
            return raw
        return parse_date(str(raw), field.date_order)
    if kind == "datetime":
        if isinstance(raw, datetime):
            return raw.replace(tzinfo=UTC) if raw.tzinfo is None else raw.astimezone(UTC)
        if isinstance(raw, date):
            return datetime.combine(raw, time(), tzinfo=UTC)
        return parse_datetime(str(raw), field.date_order)
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        token = _fold(str(raw))
        if token in _TRUE:
            return True
        if token in _FALSE:
            return False
        raise ValueCoercionError(f"{raw!r} is not yes/no")
    if kind == "enum":
        return match_choice(str(raw), field.values or [])
    if kind == "list[str]":
        if isinstance(raw, str):
            stripped = raw.strip()
            if stripped.startswith("["):
                try:
                    raw = json.loads(stripped)
                except json.JSONDecodeError:
                    raw = [stripped]
            else:
                raw = re.split(r"\s*[;\n]\s*", stripped)
        if not isinstance(raw, (list, tuple)):
            raise ValueCoercionError(f"expected a list of strings, got {type(raw).__name__}")
        items = [clean_text(str(item)) for item in raw if item is not None and str(item).strip()]
        if any(isinstance(item, (dict, list)) for item in raw):
            raise ValueCoercionError("list items must be strings")
        return items
    raise ValueCoercionError(f"unknown field type {kind}")


def to_json_value(value: Any) -> Any:
    """Render a typed value for JSON (small_answer column, prompts): ISO dates, decimals as strings."""
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    return value
