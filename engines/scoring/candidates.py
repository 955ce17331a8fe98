"""Candidate values for extraction fields, taken from the document itself.

The small model is a base LM that cannot be trusted to *write* a value, but it ranks well: each field's
answer is chosen among candidates found in the document, by scoring every candidate's surface text as the
continuation of a few-shot prompt. So this module sets the ceiling of extraction accuracy: the right answer
must be among the candidates (recall), while the list stays short enough to score (`limit`). When a document
offers more than `limit` candidates, those most likely to be an answer (near a label, early in the document,
shaped like an amount) are kept, deterministically, so the same document always yields the same list.

Everything here is pure Python and `re`: no model calls, and a 20 KB document takes milliseconds.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from docroute.schemas.spec import FieldSpec
from docroute.schemas.values import ValueCoercionError, coerce_value

__all__ = ["DEFAULT_LIMIT", "Candidate", "candidates_for"]

DEFAULT_LIMIT = 48


@dataclass(frozen=True, slots=True)
class Candidate:
    """One possible answer: what the LM scores (`surface`), what the column gets (`value`), and where it was.

    `start` is the character offset of the surface's first occurrence in the document, or -1 for candidates
    that do not come from the text (an enum value the text never mentions, yes/no).
    """

    surface: str
    value: Any
    start: int


def candidates_for(field: FieldSpec, text: str, *, limit: int = DEFAULT_LIMIT) -> list[Candidate]:
    """Return at most `limit` candidates for `field` found in `text`, each with its coerced, non-None value.

    Surfaces are unique, but different surfaces with the same value are all kept: the engine sums probability
    per value, and the model may prefer one spelling over another without that meaning a different answer.
    """
    if limit < 1:
        return []
    kind = field.type
    if kind == "enum":
        return _enum_candidates(field, text, limit)
    if kind == "bool":
        pool = _Pool(field)
        pool.add("yes", -1)
        pool.add("no", -1)
        return pool.select(limit)
    if kind in ("date", "datetime"):
        return _date_candidates(field, text, limit)
    if kind in ("decimal", "float", "int"):
        return _number_candidates(field, text, limit)
    return _text_candidates(field, text, limit)  # str and list[str]


# --- the pool: de-duplication, lazy coercion, selection ---------------------------------------------

_UNSET: Any = object()


@dataclass(slots=True)
class _Item:
    """A candidate under construction: `score` decides what survives `limit`, `group` the output order."""

    surface: str
    raw: str
    start: int
    score: float
    group: int
    seq: int
    value: Any = _UNSET


class _Pool:
    """Collects candidates by surface; coerces only what may be returned, as long documents offer many."""

    def __init__(self, spec: FieldSpec) -> None:
        self.spec = spec
        self.items: dict[str, _Item] = {}

    def add(
        self, surface: str, start: int, *, raw: str | None = None, score: float = 0.0, group: int = 0
    ) -> _Item | None:
        """Offer a surface; `raw` is a spelling for coercion when the surface itself is not parseable.

        A repeated surface keeps its first offset but the best score of its occurrences, so an amount first
        seen as an item price and later after "TOTAL" still ranks as a total.
        """
        surface = " ".join(surface.split())
        if not surface:
            return None
        item = self.items.get(surface)
        if item is None:
            item = _Item(surface, surface if raw is None else raw, start, score, group, len(self.items))
            self.items[surface] = item
        elif score > item.score:
            item.score = score
        return item

    def value(self, item: _Item) -> Any:
        """The item's typed value, or None when it does not coerce (computed once)."""
        if item.value is _UNSET:
            try:
                value = coerce_value(self.spec, item.raw)
            except (ValueCoercionError, ArithmeticError, ValueError):
                value = None
            item.value = None if value == [] else value
        return item.value

    def select(self, limit: int) -> list[Candidate]:
        """Keep the `limit` best-scored items that coerce (ties: output order), listed in output order."""
        items = sorted(self.items.values(), key=lambda it: (-it.score, it.group, it.start, it.seq))
        kept: list[_Item] = []
        for item in items:
            if len(kept) == limit:
                break
            if self.value(item) is not None:
                kept.append(item)
        kept.sort(key=lambda it: (it.group, it.start, it.seq))
        return [Candidate(it.surface, it.value, it.start) for it in kept]


# --- shared text helpers ---------------------------------------------------------------------------

_STOPWORDS = frozenset(
    """the and for from with this that which its are was were into onto than then when where what who
    whom whose has have had not any all each per via document value field text""".split()  # noqa: SIM905 - a word list
)
_LETTERS2 = re.compile(r"[^\W\d_]{2}")
_LETTERS3 = re.compile(r"[^\W\d_]{3}")


def _field_words(spec: FieldSpec) -> list[str]:
    """Words of the field's name and description that may label its value ("invoice", "vendor")."""
    words = re.split(r"[^a-z0-9]+", f"{spec.name.replace('_', ' ')} {spec.description}".lower())
    return list(dict.fromkeys(w for w in words if len(w) >= 3 and w not in _STOPWORDS and not w.isdigit()))


def _word_pattern(words: list[str]) -> re.Pattern[str] | None:
    """Match any of `words` at a word start, allowing a short suffix (plurals, "TOTAL:"), ignoring case."""
    if not words:
        return None
    alternation = "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True))
    return re.compile(rf"(?<![a-z0-9])(?:{alternation})[a-z]{{0,2}}(?![a-z])", re.IGNORECASE)


_LINE_BREAK = re.compile(r"\r\n|[\n\r\f\v\x1c-\x1e\x85\u2028\u2029]")


@dataclass(frozen=True, slots=True)
class _Line:
    """A physical line: its offset, its whitespace-collapsed text, and its raw text (for column splits)."""

    start: int
    text: str
    raw: str


def _lines(text: str) -> list[_Line]:
    """Split into lines keeping offsets; \\r\\n, \\r, form feeds and Unicode separators all break lines."""
    lines: list[_Line] = []
    position = 0
    for match in _LINE_BREAK.finditer(text):
        raw = text[position : match.start()]
        lines.append(_Line(position, " ".join(raw.split()), raw))
        position = match.end()
    raw = text[position:]
    lines.append(_Line(position, " ".join(raw.split()), raw))
    return lines


# --- enum ------------------------------------------------------------------------------------------


def _enum_candidates(spec: FieldSpec, text: str, limit: int) -> list[Candidate]:
    """One candidate per allowed value whatever the text says: the model judges which one the document means.

    `start` is where the value is first mentioned (ignoring case), or -1. Should there be more values than
    `limit`, the mentioned ones are kept first, then the others in declared order.
    """
    lowered = text.lower()
    found: list[tuple[bool, int, Candidate]] = []
    for rank, value in enumerate(spec.values or []):
        try:
            coerced = coerce_value(spec, value)
        except ValueCoercionError:
            continue
        if coerced is not None:
            match = re.search(rf"(?<!\w){re.escape(value.lower())}(?!\w)", lowered) if value.strip() else None
            position = match.start() if match else -1
            found.append((position < 0, rank, Candidate(value, coerced, position)))
    if len(found) > limit:
        found = sorted(found, key=lambda f: (f[0], f[1]))[:limit]
        found.sort(key=lambda f: f[1])
    return [candidate for _absent, _rank, candidate in found]


# --- dates and datetimes ---------------------------------------------------------------------------

_MONTH_NAMES = """january januari janvier januar enero jan february februari fevrier février februar
    febrero feb march mac mars maerz märz marzo mar april avril abril apr may mei mai mayo june juni juin
    junio jun july julai juli juillet julio jul august ogos aout août agosto aug september septembre
    septiembre sept sep october oktober octobre octubre okt oct november novembre noviembre nov december
    disember decembre décembre dezember diciembre dez dec""".split()  # noqa: SIM905 - a word list; parse_date has the final say on each name
_MON = "(?P<mon>" + "|".join(sorted(set(_MONTH_NAMES), key=len, reverse=True)) + r")(?![a-zéäû])\.?"
_YEAR_END = r"(?!\d|[.:]\d)"  # a year must not run on into more digits or a time ("May 5 10:30")
_ORDINAL = r"(?:st|nd|rd|th)?"

# (pattern, kind): the kind says how to rebuild, from the groups, a spelling that parse_date reads.
_DATE_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(r"(?<![\d.,/-])(?P<y>(?:19|20)\d{2})(?P<s>[-/.])(?P<m>\d{1,2})(?P=s)(?P<d>\d{1,2})" + _YEAR_END),
        "as_is",
    ),
    (
        re.compile(r"(?<![\d.,/])(?P<a>\d{1,2})(?P<s>[-/.])(?P<b>\d{1,2})(?P=s)(?P<y>\d{4}|\d{2})" + _YEAR_END),
        "numeric",
    ),
    (
        re.compile(r"(?<![\d.,/])(?P<a>\d{1,2}) ?/ ?(?P<b>\d{1,2}) ?/ ?(?P<y>(?:19|20)\d{2})" + _YEAR_END),
        "numeric",
    ),
    (  # a date run into its time, as OCR writes it when it loses the space: "29/06/20188:26:57AM", "06/04/1711:43"
        re.compile(r"(?<![\d.,/])(?P<a>\d{1,2})(?P<s>[-/.])(?P<b>\d{1,2})(?P=s)(?P<y>\d{4}|\d{2})(?=\d{1,2}:\d{2})"),
        "numeric",
    ),
    (
        re.compile(
            rf"(?<![\d.,])(?P<d>\d{{1,2}}){_ORDINAL}(?:[\s\-/.]|of\s)*{_MON}[\s\-/.,']*(?P<y>\d{{4}}|\d{{2}}){_YEAR_END}",
            re.IGNORECASE,
        ),
        "words",
    ),
    (
        re.compile(
            rf"(?<![a-z]){_MON}[\s\-/.]*(?P<d>\d{{1,2}}){_ORDINAL}(?!\d)[\s,\-/.']*(?P<y>\d{{4}}|\d{{2}}){_YEAR_END}",
            re.IGNORECASE,
        ),
        "words",
    ),
    (
        re.compile(r"(?<![\w.,/-])(?P<y>(?:19|20|21)\d{2})(?P<m>[01]\d)(?P<d>[0-3]\d)(?![\w-]|[.,]\d)"),
        "compact",
    ),
)
_TIME_AFTER = re.compile(
    r"(?:\s*,?\s*(?:at\s+|-\s*)?|T)"
    r"(?P<t>(?<!\d)\d{1,2}:\d{2}(?::\d{2}(?:\.\d{1,6})?)?(?!\d)(?:\s?[AaPp]\.?\s?[Mm]\.?(?![A-Za-z]))?)"
    r"(?P<z>Z|[+-]\d{2}:?\d{2})?"
)
_TIME_BEFORE = re.compile(r"(?P<t>(?<![\d:])\d{1,2}:\d{2}(?::\d{2})?(?:\s?[AaPp]\.?\s?[Mm]\.?)?)\s*,?\s*$")
_ISO_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
_DATE_LABELS = ["date", "dated", "tarikh", "datum", "fecha", "time", "issued"]


@dataclass(frozen=True, slots=True)
class _DateHit:
    """A date-shaped span: its offsets and a spelling `parse_date` reads."""

    start: int
    end: int
    normalised: str


def _find_dates(text: str) -> list[_DateHit]:
    """Every non-overlapping date-shaped span, leftmost-longest, whether or not it is a real date.

    Month-name dates are normalised to "12 Jan 2018" because parse_date cannot read "Jan 12, 2018"; numeric
    ones keep their order (the field's date_order settles 03/04) with "/" so mixed separators parse.
    """
    hits: list[_DateHit] = []
    for pattern, kind in _DATE_PATTERNS:
        for match in pattern.finditer(text):
            groups = match.groupdict()
            if kind == "words":
                normalised = f"{groups['d']} {groups['mon']} {groups['y']}"
            elif kind == "compact":
                normalised = f"{groups['y']}-{groups['m']}-{groups['d']}"
            elif kind == "numeric":
                normalised = f"{groups['a']}/{groups['b']}/{groups['y']}"
            else:
                normalised = match.group(0)
            hits.append(_DateHit(match.start(), match.end(), normalised))
    hits.sort(key=lambda h: (h.start, h.start - h.end))
    chosen: list[_DateHit] = []
    end = -1
    for hit in hits:
        if hit.start >= end:
            chosen.append(hit)
            end = hit.end
    return chosen


def _date_candidates(spec: FieldSpec, text: str, limit: int) -> list[Candidate]:
    """Dates (and, for datetime fields, the time written next to them) in document order.

    The surface is only the date (plus time) so the model scores "25/12/2018", not "DATE:25/12/2018". A date
    without a time is still a datetime candidate (midnight). Over `limit`, dates after a "date" label win.
    """
    pool = _Pool(spec)
    label = _word_pattern([*_field_words(spec), *_DATE_LABELS])
    with_time = spec.type == "datetime"
    for hit in _find_dates(text):
        line_start = max(text.rfind("\n", 0, hit.start), text.rfind("\r", 0, hit.start)) + 1
        context = text[max(line_start, hit.start - 60) : hit.start]
        score = 1.0 if label is not None and label.search(context) else 0.0
        start, end, raw = hit.start, hit.end, hit.normalised
        if with_time:
            after = _TIME_AFTER.match(text, hit.end)
            before = _TIME_BEFORE.search(text, max(0, hit.start - 20), hit.start)
            if after and after.end("t") - hit.end <= 30:
                zone = after.group("z") or ""
                if zone and not _ISO_DAY.fullmatch(raw):
                    zone = ""  # parse_datetime honours a zone only in ISO text: never attach one it ignores
                end = after.end("z") if zone else after.end("t")
                raw = f"{raw}T{after.group('t')}{zone}" if zone else f"{raw} {after.group('t')}"
            elif before:
                start, raw = before.start("t"), f"{raw} {before.group('t')}"
        item = pool.add(text[start:end], start, raw=raw, score=score)
        if item is not None and (start, end) != (hit.start, hit.end) and pool.value(item) is None:
            pool.add(text[hit.start : hit.end], hit.start, raw=hit.normalised, score=score)  # impossible time
    return pool.select(limit)


# --- numbers ---------------------------------------------------------------------------------------

_NUMBER = re.compile(
    r"(?<!\d)(?<!\d[.,'])"
    r"(?:\d{1,3}(?P<sep>[,.'])\d{3}(?:(?P=sep)\d{3})*(?:[.,]\d+)?(?!\d)|\d+(?:[.,]\d+)?)"
    r"(?!\d)"
)
_SPACE_GROUPED = re.compile(r"(?<![\d.,])\d{1,3}(?: \d{3})+,\d{1,2}(?![\d.,])")  # "1 234,50"
_TIME_SPAN = re.compile(r"(?<!\d)\d{1,2}:\d{2}(?::\d{2})?(?:\.\d{1,6})?(?!\d)")
_PHONE_SPAN = re.compile(r"(?<![\d.,])\+?\(?\d[\d()]*(?:(?:\s?-\s?|\s)\(?\d[\d()]*)+(?![.,]?\d)")
_PHONE_LABEL = re.compile(r"(?<![a-z])(?:tel|telefon|phone|ph|fax|hp|h/p|mobile|mob|whatsapp|call)\b", re.I)
_CURRENCIES = frozenset(
    """rm myr usd us eur gbp sgd s aud a cad c nzd hkd jpy cny rmb inr rs rp idr thb php chf sek nok dkk
    zar krw vnd brl mxn""".split()  # noqa: SIM905 - a word list
)
_CURRENCY_BEFORE = re.compile(r"(?:[$€£¥₹₩₱฿₫]|\b(?:RM|USD|EUR|MYR|SGD|GBP|AUD|INR|IDR))\s*$", re.I)
_CURRENCY_AFTER = re.compile(r"\s?(?:[$€£¥₹₩₱฿₫]|(?:RM|USD|EUR|MYR|SGD|GBP|AUD|INR|IDR)\b)", re.I)
_AMOUNT_WORDS = [
    "total",
    "subtotal",
    "amount",
    "amt",
    "due",
    "balance",
    "grand",
    "jumlah",
    "net",
    "price",
    "sum",
]
_PERCENT_WORDS = ("percent", "pct", "rate", "%")
_DECIMAL_TAIL = re.compile(r"[.,]\d{1,2}$")
_INT_SHAPED = re.compile(r"\d+|\d{1,3}(?:,\d{3})+|\d{1,3}(?:'\d{3})+|\d{1,3}(?:\.\d{3})+")
_CONTINUES = re.compile(r"[.,]\d")  # 1.2.3: a version, a section or a malformed date
_LETTERS_THEN_DIGIT = re.compile(r"[A-Za-z]+\d")  # 12AB34
_HYPHEN_AFTER = re.compile(r"-[A-Za-z0-9]")
_HYPHEN_BEFORE = re.compile(r"[A-Za-z0-9]-")
_PERCENT_AFTER = re.compile(r"\s?%")
_NON_DIGIT = re.compile(r"\D")
_LARGEST = 8


def _excluded_spans(text: str, spec: FieldSpec) -> bytearray:
    """Mark the characters of dates, times and phone numbers: their digits are never amounts or counts."""
    mask = bytearray(len(text))
    date_spec = FieldSpec(name="date", type="date", date_order=spec.date_order)
    for hit in _find_dates(text):
        if "/" in text[hit.start : hit.end] or _is_date(date_spec, hit.normalised):
            mask[hit.start : hit.end] = b"\x01" * (hit.end - hit.start)
    for match in _TIME_SPAN.finditer(text):
        mask[match.start() : match.end()] = b"\x01" * (match.end() - match.start())
    for match in _PHONE_SPAN.finditer(text):
        span = match.group(0)
        digits = sum(ch.isdigit() for ch in span)
        if not 7 <= digits <= 15:
            continue
        line_start = text.rfind("\n", 0, match.start()) + 1
        labelled = _PHONE_LABEL.search(text, max(line_start, match.start() - 40), match.start()) is not None
        if labelled or (digits >= 8 and ("-" in span or span.startswith(("+", "(")))):
            mask[match.start() : match.end()] = b"\x01" * (match.end() - match.start())
    return mask


def _is_date(date_spec: FieldSpec, normalised: str) -> bool:
    """Whether a date-shaped span is a real date (then its digits are not numbers)."""
    try:
        coerce_value(date_spec, normalised)
    except ValueCoercionError:
        return False
    return True


def _glued_letters_before(text: str, start: int) -> str:
    """The run of letters ending right before `start`: "RM" in "RM9.00", "TD" in "TD0116"."""
    i = start
    while i > 0 and text[i - 1].isalpha():
        i -= 1
    return text[i:start]


@dataclass(slots=True)
class _NumberFlags:
    """What is known of a number's occurrences; any labelled occurrence makes the surface labelled."""

    near_label: bool = False
    decimal: bool = False
    currency: bool = False


def _number_candidates(spec: FieldSpec, text: str, limit: int) -> list[Candidate]:
    """Amounts or counts in document order; over `limit`, keep labelled, decimal, currency and large ones.

    The surface is the bare number ("9.00" for "RM 9.00") because gold answers usually are; a minus sign or
    accounting parentheses stay in it because they change the value. Digits of dates, times and phone
    numbers, ids (glued to letters or hyphens, zero-padded), barcodes (13+ digits) and percentages (unless the
    field is a rate) are not offered. An int field takes whole-number tokens only, never part of a decimal.
    """
    pool = _Pool(spec)
    want_int = spec.type == "int"
    about = f"{spec.name} {spec.description}".lower()
    want_percent = any(word in about for word in _PERCENT_WORDS)
    mask = _excluded_spans(text, spec)
    lines = _lines(text)
    starts = [line.start for line in lines]
    label = _word_pattern([*_AMOUNT_WORDS, *_field_words(spec)])
    labelled_lines: set[int] = set()
    previous_text_line: list[int] = []
    last = -1
    for i, line in enumerate(lines):
        previous_text_line.append(last)
        if line.text:
            last = i
            if label is not None and label.search(line.text):
                labelled_lines.add(i)

    tokens = [(m.start(), m.end(), m.group(0)) for m in _NUMBER.finditer(text)]
    tokens += [(m.start(), m.end(), m.group(0)) for m in _SPACE_GROUPED.finditer(text)]
    tokens.sort()
    flags: dict[str, _NumberFlags] = {}
    for start, end, token in tokens:
        if mask.find(1, start, end) != -1:
            continue  # part of a date, a time or a phone number
        if token.isdigit() and (len(token) > 12 or (len(token) > 1 and token[0] == "0")):
            continue  # barcodes and account numbers; zero-padded ids such as 000306020352
        if _CONTINUES.match(text, end):
            continue
        decimal = bool(_DECIMAL_TAIL.search(token)) or ("," in token and "." in token)
        if want_int and not _INT_SHAPED.fullmatch(token):
            continue
        glued = _glued_letters_before(text, start)
        currency = (
            glued.lower() in _CURRENCIES
            or bool(_CURRENCY_BEFORE.search(text, max(0, start - 6), start))
            or bool(_CURRENCY_AFTER.match(text, end))
        )
        if glued and not (currency or decimal):
            continue  # digits glued to letters: an id such as TD01167104
        if _LETTERS_THEN_DIGIT.match(text, end, end + 12):
            continue
        hyphen_before = start >= 2 and _HYPHEN_BEFORE.match(text, start - 2, start)
        if _HYPHEN_AFTER.match(text, end) or (hyphen_before and not (decimal and not text[start - 2].isdigit())):
            continue  # 789417-W, INV-2024-001 (but "Discount-2.00" is an amount)
        if not want_percent and _PERCENT_AFTER.match(text, end):
            continue
        raw = _NON_DIGIT.sub("", token) if want_int else token.replace(" ", "")
        surface = token
        if text[start - 1 : start] == "(" and text[end : end + 1] == ")":
            surface, raw = f"({token})", f"({raw})"
        elif text[start - 1 : start] == "-" and not text[start - 2 : start - 1].isalnum():
            surface, raw = f"-{token}", f"-{raw}"
        line = bisect_right(starts, start) - 1
        near = line in labelled_lines or previous_text_line[line] in labelled_lines
        item = pool.add(surface, start, raw=raw)
        if item is not None:
            seen = flags.setdefault(item.surface, _NumberFlags())
            seen.near_label |= near
            seen.decimal |= decimal
            seen.currency |= currency

    largest = _largest(pool, flags, want_int)
    for surface, seen in flags.items():
        pool.items[surface].score = (
            4.0 * seen.near_label + 2.0 * (seen.decimal or want_int) + 2.0 * seen.currency + 3.0 * (surface in largest)
        )
    return pool.select(limit)


def _largest(pool: _Pool, flags: dict[str, _NumberFlags], want_int: bool) -> set[str]:
    """Surfaces of the largest amounts (decimal or currency-marked): a total is usually among them."""
    ranked: list[tuple[Decimal, int, str]] = []
    for surface, seen in flags.items():
        if not (seen.decimal or seen.currency or want_int):
            continue
        item = pool.items[surface]
        value = pool.value(item)
        if value is not None:
            ranked.append((abs(Decimal(str(value))), item.start, surface))
    ranked.sort(key=lambda r: (-r[0], r[1]))
    return {surface for _value, _start, surface in ranked[:_LARGEST]}


# --- strings ---------------------------------------------------------------------------------------

_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_URL = re.compile(r"(?:https?://|www\.)[^\s<>\"']+", re.IGNORECASE)
_TOKEN = re.compile(r"[\w/#.-]+")
_KEY_VALUE = re.compile(r"^(?P<key>[^\W\d_][^:\d]{0,29}?)\s*:\s*(?P<value>.+)$")
_COLUMNS = re.compile(r"\t+| {3,}")
# Names come wrapped in codes: "AEON CO. (M) BHD (126926-H)", "CAFE SDN BHD 1110644-W", "#000002 BAIFU SDN
# BHD", "MYNEWS RETAIL SB(306295-X) FKA BISON STORES SB". Stripped, the name gets a surface of its own.
_CODE = r"(?=\S*[A-Za-z#])[#(]?[A-Za-z]{0,3}\d[\w/.-]{2,}\)?"  # digits with a letter or #
_TRAILING_GROUP = re.compile(r"\s*(?:\([^()]*\)|\[[^\[\]]*\]|<[^<>]*>)\s*$")  # also "Name <mail@host>"
_TRAILING_CODE = re.compile(r"\s+" + _CODE + r"\s*$")
_LEADING_CODE = re.compile(r"^" + _CODE + r"\s+")
_BEFORE_CODE_GROUP = re.compile(r"^(.*?[^\W\d_]{2}.*?)\s*[(\[][^()\[\]]*\d[^()\[\]]*[)\]]")

_EARLY_LINES = 15  # names, addresses and headers sit at the top of most documents
_SPAN_SIZES = (2, 3, 4)  # multi-line names and addresses; 4 lines covers most postal addresses
_MAX_LINE_CHARS = 200
_MAX_SPAN_CHARS = 300
_LINE, _SPAN, _PART = 0, 1, 2  # output groups: lines, then spans, then parts of lines


def _without_codes(text: str) -> list[str]:
    """Variants of a line without its leading/trailing codes and bracketed groups (a few at most)."""
    variants: list[str] = []
    current = text
    for _ in range(3):
        stripped = _TRAILING_GROUP.sub("", current)
        if stripped == current:
            stripped = _TRAILING_CODE.sub("", current)
        if stripped == current:
            break
        current = stripped
        variants.append(current)
    for base in (text, *variants[:1]):
        stripped = _LEADING_CODE.sub("", base)
        if stripped != base:
            variants.append(stripped)
    match = _BEFORE_CODE_GROUP.match(text)
    if match:
        variants.append(match.group(1))
    return [v for v in dict.fromkeys(variants) if v != text and _LETTERS3.search(v)]


def _is_id(token: str) -> bool:
    """Letters and digits mixed, like "789417-W", "TD01167104" or "INV-2024-001"."""
    return (
        len(token) >= 4
        and any(ch.isdigit() for ch in token)
        and any(ch.isalpha() for ch in token)
        and token[0].isalnum()
        and token[-1].isalnum()
    )


def _text_candidates(spec: FieldSpec, text: str, limit: int) -> list[Candidate]:
    """Lines, multi-line spans (names, addresses) and parts of lines (e-mails, URLs, ids, "Key: value").

    Over `limit`, items on a line naming the field (and on the two lines after it) win, then items from the
    top of the document, earlier first; at equal position a line beats a span, a shorter span a longer one.
    A line with no word in it (only numbers, dates, punctuation) ranks below text lines: it is rarely a
    string answer, and a number field would have been declared for it.
    """
    pool = _Pool(spec)
    lines = _lines(text)
    label = _word_pattern(_field_words(spec))
    nonempty = [i for i, line in enumerate(lines) if line.text]
    rank = {line_no: r for r, line_no in enumerate(nonempty)}
    wordless = {i for i in nonempty if not _LETTERS2.search(lines[i].text)}
    labelled: set[int] = set()
    if label is not None:
        for r, i in enumerate(nonempty):
            if label.search(lines[i].text):
                labelled.update(nonempty[r : r + 3])

    def score(first: int, count: int = 1) -> float:
        """Higher is kept first: labelled, then early, then by position; extra span lines cost a little."""
        position = rank[first]
        bonus = 1000.0 * (first in labelled) + 500.0 * (position < _EARLY_LINES)
        return bonus - position - 0.3 * (count - 1)

    for i in nonempty:
        line = lines[i]
        if 2 <= len(line.text) <= _MAX_LINE_CHARS:
            pool.add(line.text, line.start, score=score(i) - 20.0 * (i in wordless), group=_LINE)

    blocks: list[list[int]] = []
    for i in nonempty:
        if blocks and blocks[-1][-1] == i - 1:
            blocks[-1].append(i)
        else:
            blocks.append([i])
    for size in _SPAN_SIZES:
        for block in blocks:
            for k in range(len(block) - size + 1):
                members = block[k : k + size]
                joined = " ".join(lines[j].text for j in members)
                if len(joined) <= _MAX_SPAN_CHARS:
                    penalty = 20.0 * sum(j in wordless for j in members)
                    pool.add(joined, lines[members[0]].start, score=score(members[0], size) - penalty, group=_SPAN)

    for i in nonempty:
        _add_parts(pool, lines[i], score(i) - 0.5)
    return pool.select(limit)


def _add_parts(pool: _Pool, line: _Line, base: float) -> None:
    """Offer the parts of one line that may be an answer on their own."""
    raw, start = line.raw, line.start
    for pattern in (_EMAIL, _URL):
        for match in pattern.finditer(raw):
            pool.add(match.group(0).rstrip(".,;:)!?"), start + match.start(), score=base, group=_PART)
    for match in _TOKEN.finditer(raw):
        token = match.group(0).strip(".-/#")
        if _is_id(token):
            pool.add(token, start + raw.find(token, match.start()), score=base - 1.0, group=_PART)
    if len(line.text) > _MAX_LINE_CHARS:
        return
    stems = [line.text]
    key_value = _KEY_VALUE.match(line.text)
    if key_value and not key_value.group("value").startswith("//"):
        offset = raw.find(":") + 1
        value_start = start + offset + len(raw[offset:]) - len(raw[offset:].lstrip())
        pool.add(key_value.group("value"), value_start, score=base + 0.4, group=_PART)
        stems.append(key_value.group("value"))
    for stem in stems:
        for variant in _without_codes(stem):
            at = start + max(0, raw.find(variant.split(" ", 1)[0]))
            pool.add(variant, at, score=base + 0.3, group=_PART)
    columns = [c for c in _COLUMNS.split(raw.strip()) if c.strip()]
    if len(columns) > 1:
        offset = 0
        for column in columns:
            at = raw.find(column, offset)
            offset = at + len(column)
            if len(column.strip()) >= 2:
                pool.add(column, start + at, score=base - 0.2, group=_PART)
