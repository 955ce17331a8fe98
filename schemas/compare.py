"""Decide whether an answer matches a gold value, after normalising both by the field's type.

Gold files are written by people and OCR: "RM 9.00", "25/12/2018", "OCT 3, 2016", "BOOK TA .K (TAMAN DAYA) SDN BHD".
Comparing them with typed answers as raw strings would count formatting as error and make the small model look
worse (or better) than it is, which skews every routing threshold calibrated from it. So both sides pass through
the same `coerce_value` the result rows use, and then through one canonical key per type:

- ``str``: accents stripped, case folded, apostrophes removed, every other punctuation or symbol character replaced
  by a space, whitespace collapsed — ``"BOOK TA .K (TAMAN DAYA) SDN BHD"`` becomes ``"book ta k taman daya sdn bhd"``
  and ``"NO.3,JALAN"`` matches ``"No. 3, Jalan"``. A string with nothing left is empty.
- ``int``: the int.
- ``decimal`` / ``float``: a `Decimal` without currency or trailing zeros, so ``"RM 9.00" == 9.0 == "9"``. Floats are
  read to 12 significant digits so binary noise (``0.30000000000000004``) does not make a miss.
- ``date`` / ``datetime``: the ISO string (datetimes in UTC, as `coerce_value` returns them).
- ``enum``: the allowed value `coerce_value` maps the answer to (forgiving case and punctuation); ``bool``: the bool.
- ``list[str]``: a sorted tuple of the normalised items, empty items dropped, so order does not matter.

A value the field's type cannot read (gold ``"N/A"`` in a date column) keeps its normalised *raw string*: it then
equals only the same text, never a typed answer, so a broken gold cell shows up as a miss instead of matching
silently. Empty values (None, blank or punctuation-only text, an empty list, a float NaN from a data frame) are None.
"""

from __future__ import annotations

import math
import re
import unicodedata
from decimal import Decimal, localcontext
from typing import Any

from docroute.schemas.spec import FieldSpec
from docroute.schemas.values import ValueCoercionError, coerce_value, match_choice

_APOSTROPHES = re.compile(r"['’`ʼ]")
_FLOAT_DIGITS = 12


def _fold_text(text: str) -> str | None:
    """Case-, accent-, punctuation- and spacing-insensitive key of a string; None when nothing is left."""
    decomposed = unicodedata.normalize("NFKD", text)
    no_marks = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    folded = _APOSTROPHES.sub("", no_marks.casefold())
    spaced = "".join(ch if ch.isalnum() else " " for ch in folded)
    collapsed = " ".join(spaced.split())
    return collapsed or None


def _plain(value: Any) -> Any:
    """Turn numpy scalars (what data frames hand out) into Python values so coercion treats them like any other."""
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        return value.item()
    return value


def _is_empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    if isinstance(value, str) and not value.strip():
        return True
    return isinstance(value, (list, tuple)) and not value


def _number_key(value: Decimal | float | int) -> Decimal:
    """One Decimal per numeric value: 9, 9.0 and 9.00 give the same key (and the same repr)."""
    if isinstance(value, float):
        value = Decimal(format(value, f".{_FLOAT_DIGITS}g"))
    number = Decimal(value).normalize()
    if number == 0:
        return Decimal(0)  # -0 and 0E-2 read as plain 0
    exponent = number.as_tuple().exponent
    if isinstance(exponent, int) and exponent > 0:  # 1.2E+3 reads better as 1200
        with localcontext() as context:  # decimal(38, s) has more digits than the default context's 28
            context.prec = 80
            number = number.quantize(Decimal(1))
    return number


def _raw_key(value: Any) -> str | None:
    """The fallback key of an unreadable value: its folded text, which matches no typed answer."""
    if isinstance(value, (list, tuple)):
        return _fold_text(" ".join(str(item) for item in value))
    return _fold_text(str(value))


def normalise(field: FieldSpec, value: Any) -> Any:
    """Return the comparison key of `value` for `field` (see the module docstring for each type); None when empty."""
    value = _plain(value)
    if _is_empty(value):
        return None
    try:
        typed = coerce_value(field, value)
    except ValueCoercionError:
        return _raw_key(value)
    if typed is None:
        return None
    kind = field.type
    if kind == "str":
        return _fold_text(typed)
    if kind in ("decimal", "float"):
        return _number_key(typed)
    if kind in ("date", "datetime"):
        return typed.isoformat()
    if kind == "list[str]":
        items = sorted(key for item in typed if (key := _fold_text(item)) is not None)
        return tuple(items) or None
    return typed  # int, bool, enum: coerce_value already gives one canonical value


def values_match(field: FieldSpec, predicted: Any, gold: Any) -> bool:
    """Whether an answer equals the gold value once both are normalised; two empty values match, one does not."""
    left, right = normalise(field, predicted), normalise(field, gold)
    if left is None or right is None:
        return left is None and right is None
    return type(left) is type(right) and left == right  # True == 1 must not make a bool match an int


def _label_key(labels: list[str], value: str | None) -> str | None:
    if value is None or not str(value).strip():
        return None
    try:
        return match_choice(str(value), labels)
    except ValueCoercionError:
        return _fold_text(str(value))  # outside the label set: equal only to the same text, never to a real label


def label_match(labels: list[str], predicted: str | None, gold: str | None) -> bool:
    """Whether a predicted label is the gold label, forgiving case, spacing and punctuation (as `match_choice` does).

    Two missing labels match and one missing label does not; a label outside `labels` is compared as folded text,
    so it can only equal the same stray text, never a real label.
    """
    left, right = _label_key(labels, predicted), _label_key(labels, gold)
    if left is None or right is None:
        return left is None and right is None
    return left == right
