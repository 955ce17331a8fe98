"""Features of extraction candidates for the learned ranker (engines/extract/ranker.py): where a candidate sits, what
it says.

A 270M base model ranks candidates by how plausible their words are, not by where they stand: on receipts it picks
the largest amount or the first line, where a reader picks the amount after "TOTAL" and the lines under the shop's
name. The ranker learns those cues from a few labelled documents instead; this module turns one document and its
candidates into a feature matrix, with no model calls:

* hashed bag of words of the candidate itself, of what is left and right of it on its line, and of the lines above
  and below (namespaced, so "TOTAL" before an amount and "TOTAL" after it are different features). Keyword weights
  are learned from data, not listed here, so an invoice's "Amount due" or a form's "Name:" work the same way;
* position (line index from the top and bottom, relative position, how many lines a span covers) as dense values
  and as hashed position tokens, so the model can learn "the first line" or "a 3-line span near the top";
* format (upper-case, digit, letter and punctuation shares, length, word count, share of its line);
* value statistics for numbers (rank among the document's amounts, largest or not, how often it is repeated);
* optionally an encoder embedding of the candidate and of its context line, and an LM score when a caller has one;
* page geometry, when the request carries the OCR'd lines (schemas/page_geometry.py, `PageMap`): each candidate is
  mapped to the line(s) it was read from; its position counts the page's lines in reading order (the same as the
  text's lines where the text was written in reading order, right where it was not); the words of the other lines
  on its row (boxes overlapping vertically) join its left and right context, even where the text puts them on other
  lines (an amount printed a little lower than its "TOTAL"), and also hash in namespaces of their own ("gl", "gr");
  hashed "geo" tokens say its relative x and y on the page, its row from the page's top and bottom, its column, how
  many lines share its row and whether it is the row's last.

Without geometry every feature is the text's own, so text documents score exactly as they did; with geometry the
values above change or are added in the same columns: the width stays, a ranker trained on text reads OCR'd
documents (with their row context), and one trained with geometry also learns the "geo", "gl" and "gr" tokens.

The hash is crc32 (stable across processes, unlike `hash`), so a saved ranker reads the same columns everywhere.
"""

from __future__ import annotations

import math
import re
import zlib
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import numpy as np
from scipy import sparse

from docroute.engines.local.encoders import Encoder
from docroute.engines.scoring.candidates import Candidate, candidates_for
from docroute.engines.scoring.confidence import softmax
from docroute.schemas.page_geometry import PageLine
from docroute.schemas.spec import FieldSpec

__all__ = [
    "DENSE_FEATURES",
    "FEATURE_VERSION",
    "HASH_BITS",
    "LM_FEATURES",
    "Layout",
    "PageMap",
    "feature_width",
    "featurize",
    "ranker_candidates",
]

FEATURE_VERSION = 1
"""Bump when a feature changes meaning: a saved ranker records it and is refused by a different version. The
geometry features did not bump it: without geometry every column means what it meant, and with it the columns keep
their meaning (a line's place in reading order, the words beside it on its row, new hashed tokens in namespaces of
their own), so a ranker saved before reads OCR'd documents with their geometry."""

HASH_BITS = 14
"""2^14 hashed columns: collisions stay rare for the few thousand distinct words of a document collection."""

CANDIDATE_LIMIT = 64
"""Candidates kept per field and document: above the engine's default, as ranking them costs microseconds."""

_LONG_SPAN_SIZES = (5, 6)
"""Joined spans longer than engines/scoring/candidates.py offers (it stops at 4 lines): long postal addresses need
them."""
_LONG_SPAN_EARLY_LINES = 20
_MAX_SPAN_CHARS = 300
_POSITION_CAP = 8

DENSE_FEATURES = (
    "none",
    "located",
    "rel_line",
    "log_line",
    "log_from_bottom",
    "span_lines",
    "multi_line",
    "whole_line",
    "share_of_line",
    "log_length",
    "log_words",
    "upper_share",
    "digit_share",
    "alpha_share",
    "punct_share",
    "log_occurrences",
    "rel_last_line",
    "numeric",
    "amount_rank",
    "amount_is_max",
    "amount_is_second",
    "amount_log_value",
    "amount_has_cents",
    "amount_repeats",
)
LM_FEATURES = ("lm_log_prob", "lm_is_top")

_WORD = re.compile(r"[^\W\d_]+|\d+")


def _hash(namespace: str, token: str) -> int:
    return zlib.crc32(f"{namespace}\x00{token}".encode()) & ((1 << HASH_BITS) - 1)


def _tokens(text: str) -> list[str]:
    """Lower-cased words; digit runs become their shape ("<d4>"), so years or codes share a feature, not a value."""
    return [w if not w.isdigit() else f"<d{min(len(w), 6)}>" for w in _WORD.findall(text.lower())]


@dataclass(frozen=True, slots=True)
class Layout:
    """A document's non-empty lines (whitespace collapsed) with their character offsets in the original text."""

    text: str
    lines: tuple[str, ...]
    starts: tuple[int, ...]

    @classmethod
    def of(cls, text: str) -> Layout:
        lines: list[str] = []
        starts: list[int] = []
        position = 0
        for raw in text.splitlines(keepends=True):
            collapsed = " ".join(raw.split())
            if collapsed:
                lines.append(collapsed)
                starts.append(position + len(raw) - len(raw.lstrip()))
            position += len(raw)
        return cls(text, tuple(lines), tuple(starts))

    def line_at(self, offset: int) -> int:
        """Index of the non-empty line holding character `offset` (the nearest one before it)."""
        return max(0, bisect_right(self.starts, offset) - 1)


_SAME_ROW_OVERLAP = 0.3
"""Two lines share a row for the context words when their boxes overlap vertically by 0.3 of the shorter one's
height (centres up to 0.7 of a height apart): looser than tasks/ingest/layout.py's row grouping (half a height), so
a value printed a little lower than its label still reads it as its neighbour when the reading order put the two
on different rows; lines of consecutive rows do not overlap at all."""
_X_BINS = 5
_Y_BINS = 10


@dataclass(frozen=True, slots=True)
class _Placed:
    """One page line and where its text sits in the document's text (`start` to `end`, character offsets)."""

    line: PageLine
    start: int
    end: int
    row: int
    """The line's row counted over the whole document, top to bottom, page after page."""
    index: int
    """The line's place in reading order among the document's located lines (row by row, left to right)."""


class PageMap:
    """The document's page lines located in its text, so a candidate (a text offset) finds its line(s) and row.

    Lines are found in reading order, each at its first occurrence after the previous one; a line not found there is
    looked for from the start (the text's order may differ from the reading order), never on text another line
    already claimed. A line whose text is not in the document at all is left out; a candidate on text no line
    claims (a PDF page that had a text layer) has no geometry and keeps the text's features.
    """

    def __init__(self, text: str, geometry: Sequence[PageLine]) -> None:
        lines = sorted(geometry, key=lambda line: (line.page, line.row, line.column))
        pages = sorted({line.page for line in lines})
        rows_before: dict[int, int] = {}
        total = 0
        for page in pages:
            rows_before[page] = total
            total += 1 + max(line.row for line in lines if line.page == page)
        self.rows = total
        self.pages = pages
        claimed: list[_Placed] = []
        cursor = 0
        for line in lines:
            start = self._find(text, line.text, cursor, claimed)
            if start is None:
                start = self._find(text, line.text, 0, claimed)
            if start is None:
                continue
            row = rows_before[line.page] + line.row
            claimed.append(_Placed(line, start, start + len(line.text), row, len(claimed)))
            cursor = start + len(line.text)
        self.placed = sorted(claimed, key=lambda placed: placed.start)
        self._starts = [placed.start for placed in self.placed]

    @staticmethod
    def _find(text: str, needle: str, start: int, claimed: Sequence[_Placed]) -> int | None:
        if not needle:
            return None
        at = text.find(needle, start)
        while at >= 0:
            end = at + len(needle)
            if not any(at < other.end and other.start < end for other in claimed):
                return at
            at = text.find(needle, at + 1)
        return None

    def __bool__(self) -> bool:
        return bool(self.placed)

    def at(self, offset: int) -> _Placed | None:
        """The line holding character `offset`, or None when no page line covers it."""
        index = bisect_right(self._starts, offset) - 1
        if index >= 0 and offset < self.placed[index].end:
            return self.placed[index]
        return None

    def covering(self, start: int, end: int) -> list[_Placed]:
        """The lines overlapping characters `start` to `end`, in text order."""
        first = max(0, bisect_right(self._starts, start) - 1)
        return [p for p in self.placed[first:] if p.start < end and start < p.end]

    def relative_y(self, placed: _Placed) -> float:
        """The line's vertical centre as a share of the document's pages (0 top of the first, 1 bottom of the last)."""
        line = placed.line
        within = line.box.centre_y / (line.page_height or 1.0)
        return (self.pages.index(line.page) + min(1.0, max(0.0, within))) / len(self.pages)

    def relative_x(self, placed: _Placed, offset: int) -> float:
        """Where character `offset` of the line sits across the page, interpolated along the line's box."""
        line = placed.line
        share = (offset - placed.start) / max(1, len(line.text))
        x = line.box.x0 + line.box.width * share
        return min(1.0, max(0.0, x / (line.page_width or 1.0)))

    def row_neighbours(self, placed: _Placed, offset: int) -> tuple[list[PageLine], list[PageLine]]:
        """The other lines of `placed`'s row (vertical overlap) left and right of character `offset`, by their x."""
        own = placed.line
        x = self.relative_x(placed, offset) * (own.page_width or 1.0)
        left: list[PageLine] = []
        right: list[PageLine] = []
        for other in self.placed:
            line = other.line
            if other is placed or line.page != own.page:
                continue
            overlap = min(line.box.y1, own.box.y1) - max(line.box.y0, own.box.y0)
            if overlap < _SAME_ROW_OVERLAP * min(line.box.height, own.box.height) or overlap <= 0:
                continue
            (left if (line.box.x0 + line.box.x1) / 2 < x else right).append(line)
        left.sort(key=lambda line: line.box.x0)
        right.sort(key=lambda line: line.box.x0)
        return left, right


def ranker_candidates(field: FieldSpec, text: str, *, limit: int = CANDIDATE_LIMIT) -> list[Candidate]:
    """The candidates the ranker scores: engines/scoring/candidates.py's, plus 5- and 6-line spans for `str` fields.

    candidates_for joins at most 4 consecutive lines; a postal address printed one part per line ("S117, SECOND
    FLOOR," / "AEON TEBRAU CITY," / … / "81100 JOHOR BAHRU, JOHOR.") needs more. Longer spans are added only when
    they start in the first lines (where names and addresses sit), to keep the list short.
    """
    candidates = candidates_for(field, text, limit=limit)
    if field.type != "str":
        return candidates
    layout = Layout.of(text)
    seen = {c.surface for c in candidates}
    extra: list[Candidate] = []
    for size in _LONG_SPAN_SIZES:
        for first in range(min(_LONG_SPAN_EARLY_LINES, len(layout.lines) - size + 1)):
            joined = " ".join(layout.lines[first : first + size])
            if len(joined) <= _MAX_SPAN_CHARS and joined not in seen:
                seen.add(joined)
                extra.append(Candidate(joined, joined, layout.starts[first]))
    return candidates + extra


def _span_lines(layout: Layout, first: int, surface: str) -> int:
    """How many lines a surface starting on line `first` covers (spans are lines joined by one space)."""
    count, length = 1, len(layout.lines[first])
    while length < len(surface) and first + count < len(layout.lines):
        length += 1 + len(layout.lines[first + count])
        count += 1
    return count


def _occurrences(layout: Layout, surface: str, first: int, span: int) -> list[tuple[int, int]]:
    """(line, column) of every place a single-line surface is written; a multi-line span only where it starts.

    Case is ignored: an enum's declared value ("card") is written "CARD" in the document.
    """
    if span > 1 or not surface:
        return [(first, max(0, layout.lines[first].find(surface)))]
    pattern = re.compile(r"(?<![\w.])" + re.escape(surface) + r"(?!\w|[.,]\d)", re.IGNORECASE)
    found = [(i, m.start()) for i, line in enumerate(layout.lines) for m in pattern.finditer(line)]
    return found or [(first, max(0, layout.lines[first].find(surface)))]


def _shares(surface: str) -> tuple[float, float, float, float]:
    """Upper-case share of letters, and digit, letter and punctuation shares of non-space characters."""
    chars = [c for c in surface if not c.isspace()]
    if not chars:
        return 0.0, 0.0, 0.0, 0.0
    letters = [c for c in chars if c.isalpha()]
    upper = sum(c.isupper() for c in letters) / len(letters) if letters else 0.0
    digits = sum(c.isdigit() for c in chars) / len(chars)
    punct = sum(not c.isalnum() for c in chars) / len(chars)
    return upper, digits, len(letters) / len(chars), punct


def _number(value: Any) -> Decimal | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)):
        return None
    try:
        number = Decimal(str(value))
    except ArithmeticError:
        return None
    return number if number.is_finite() else None


def feature_width(encoder_dim: int, uses_lm: bool) -> int:
    """Columns of a feature matrix: hashed words, dense values, two embeddings, then the LM scores."""
    return (1 << HASH_BITS) + len(DENSE_FEATURES) + 2 * encoder_dim + (len(LM_FEATURES) if uses_lm else 0)


def featurize(
    field: FieldSpec,
    text: str,
    candidates: Sequence[Candidate],
    *,
    with_none: bool,
    encoder: Encoder | None = None,
    lm_scores: Sequence[float] | None = None,
    uses_lm: bool = False,
    geometry: Sequence[PageLine] = (),
) -> sparse.csr_matrix:
    """One row per candidate (plus a last "no value" row when `with_none`), columns as `feature_width` says.

    `lm_scores` are the caller's log-likelihoods of the candidates (and of "no value" last, when `with_none`);
    they become a log-probability over the document's candidates, so their scale does not matter. `geometry` is the
    OCR'd lines of the document (the request's), empty for a text document: see the module's docstring.
    """
    layout = Layout.of(text)
    pages = PageMap(text, geometry) if geometry else None
    n_lines = max(1, len(layout.lines))
    hashed = 1 << HASH_BITS
    dense_at = {name: hashed + i for i, name in enumerate(DENSE_FEATURES)}
    dim = encoder.dim if encoder is not None else 0
    width = feature_width(dim, uses_lm)
    rows = len(candidates) + (1 if with_none else 0)

    numbers = [_number(c.value) for c in candidates]
    distinct = sorted({n for n in numbers if n is not None}, reverse=True)
    rank_of = {n: i for i, n in enumerate(distinct)}
    value_counts: dict[Decimal, int] = {}
    for n in numbers:
        if n is not None:
            value_counts[n] = value_counts.get(n, 0) + 1

    data: list[float] = []
    indices: list[int] = []
    indptr = [0]
    surfaces: list[str] = []
    contexts: list[str] = []
    for candidate, number in zip(candidates, numbers, strict=True):
        cells: dict[int, float] = {}

        def word(namespace: str, token: str, cells: dict[int, float] = cells) -> None:
            cells[_hash(namespace, token)] = 1.0

        def dense(name: str, value: float, cells: dict[int, float] = cells) -> None:
            cells[dense_at[name]] = value

        surface = candidate.surface
        for token in _tokens(surface):
            word("s", token)
        upper, digits, alpha, punct = _shares(surface)
        dense("log_length", math.log1p(len(surface)))
        dense("log_words", math.log1p(len(surface.split())))
        dense("upper_share", upper)
        dense("digit_share", digits)
        dense("alpha_share", alpha)
        dense("punct_share", punct)
        context = ""
        if candidate.start >= 0 and layout.lines:
            first = layout.line_at(candidate.start)
            span = _span_lines(layout, first, surface)
            places = _occurrences(layout, surface, first, span)
            last_line = max(line for line, _ in places)
            from_bottom = n_lines - 1 - (first + span - 1)
            rel_line, top_row = first / max(1, n_lines - 1), first
            placed = pages.at(candidate.start) if pages else None
            if pages and placed is not None:
                # the line's place in reading order, not in the text: the same where the text was written in
                # reading order (one line per OCR'd line, `cells_text`), right where it was not
                covered = pages.covering(candidate.start, candidate.start + len(surface)) or [placed]
                located = len(pages.placed)
                rel_line, top_row = placed.index / max(1, located - 1), placed.index
                from_bottom = located - 1 - max(p.index for p in covered)
                _geometry_words(word, pages, placed, start=candidate.start, surface=surface, text=text, span=span)
            dense("located", 1.0)
            dense("rel_line", rel_line)
            dense("log_line", math.log1p(top_row))
            dense("log_from_bottom", math.log1p(from_bottom))
            dense("span_lines", float(span))
            dense("multi_line", float(span > 1))
            line_text = layout.lines[first]
            dense("whole_line", float(span > 1 or surface == line_text))
            dense("share_of_line", min(1.0, len(surface) / max(1, len(line_text))))
            dense("log_occurrences", math.log1p(len(places) - 1))
            dense("rel_last_line", last_line / max(1, n_lines - 1))
            top, bottom = min(top_row, _POSITION_CAP), min(from_bottom, _POSITION_CAP)
            word("g", f"top{top}")
            word("g", f"bottom{bottom}")
            word("g", f"span{span}")
            word("g", f"span{span}top{top}")
            for line, column in places:
                own = layout.lines[line]
                end = column + len(surface) if span == 1 else len(own)
                for token in _tokens(own[:column]):
                    word("l", token)
                left = _tokens(own[:column])
                word("l1", left[-1] if left else "<start>")
                for token in _tokens(own[end:]) if span == 1 else ():
                    word("r", token)
                above = line - 1
                below = line + span
                for token in _tokens(layout.lines[above]) if above >= 0 else ["<top>"]:
                    word("p", token)
                if above - 1 >= 0:
                    for token in _tokens(layout.lines[above - 1]):
                        word("p2", token)
                for token in _tokens(layout.lines[below]) if below < n_lines else ["<bottom>"]:
                    word("n", token)
            previous = layout.lines[first - 1] if first > 0 else ""
            context = f"{previous}\n{line_text}"
        else:
            word("g", "unlocated")
        if number is not None:
            rank = rank_of[number]
            dense("numeric", 1.0)
            dense("amount_rank", rank / max(1, len(distinct) - 1))
            dense("amount_is_max", float(rank == 0))
            dense("amount_is_second", float(rank == 1))
            dense("amount_log_value", math.log1p(float(abs(number))))
            dense("amount_has_cents", float(number != number.to_integral_value()))
            dense("amount_repeats", math.log1p(value_counts[number] - 1))
            word("g", f"amount_rank{min(rank, _POSITION_CAP)}")
        surfaces.append(surface)
        contexts.append(context)
        for column in sorted(cells):
            indices.append(column)
            data.append(cells[column])
        indptr.append(len(indices))
    if with_none:
        indices.append(dense_at["none"])
        data.append(1.0)
        indptr.append(len(indices))
    blocks = [
        sparse.csr_matrix(
            (np.asarray(data, dtype=np.float64), np.asarray(indices, dtype=np.int64), np.asarray(indptr)),
            shape=(rows, hashed + len(DENSE_FEATURES)),
        )
    ]
    if encoder is not None:
        vectors = np.zeros((rows, 2 * dim))
        if candidates:
            vectors[: len(candidates), :dim] = _embed_unique(encoder, surfaces)
            vectors[: len(candidates), dim:] = _embed_unique(encoder, contexts)
        blocks.append(sparse.csr_matrix(vectors))
    if uses_lm:
        blocks.append(_lm_block(lm_scores, len(candidates), rows))
    matrix = sparse.hstack(blocks, format="csr") if len(blocks) > 1 else blocks[0]
    if matrix.shape != (rows, width):
        raise AssertionError(f"feature matrix is {matrix.shape}, expected {(rows, width)}")
    return matrix


def _geometry_words(
    word: Callable[[str, str], None],
    pages: PageMap,
    placed: _Placed,
    *,
    start: int,
    surface: str,
    text: str,
    span: int,
) -> None:
    """A located candidate's geometric words: its row's other lines as context, where it sits, its column.

    Row neighbours of every place a single-line surface is written (an amount repeated under "SUBTOTAL" and on
    the "TOTAL" row) join the text's left ("l") and right ("r") context, so a ranker trained on text reads a label
    the OCR put on another text line; they are also hashed in namespaces of their own ("gl", "gr"), which only
    geometry sets, for a ranker trained with it. Position tokens ("geo") bin the relative x and y, count the
    page's rows above and below, and say the column, how many lines share the row and whether it is the row's last.
    """
    offsets = [start]
    if span == 1 and surface:
        pattern = re.compile(r"(?<![\w.])" + re.escape(surface) + r"(?!\w|[.,]\d)", re.IGNORECASE)
        offsets = sorted({start, *(m.start() for m in pattern.finditer(text))})
    for offset in offsets:
        at = pages.at(offset)
        if at is None:
            continue
        left, right = pages.row_neighbours(at, offset)
        for line in left:
            for token in _tokens(line.text):
                word("l", token)
                word("gl", token)
        for line in right if span == 1 else ():
            for token in _tokens(line.text):
                word("r", token)
                word("gr", token)
        nearest = _tokens(left[-1].text) if left else []
        word("gl1", nearest[-1] if nearest else "<start>")
    x = pages.relative_x(placed, start)
    y = pages.relative_y(placed)
    left, right = pages.row_neighbours(placed, start)
    word("geo", f"x{min(_X_BINS - 1, int(x * _X_BINS))}")
    word("geo", f"y{min(_Y_BINS - 1, int(y * _Y_BINS))}")
    word("geo", f"col{min(placed.line.column, _POSITION_CAP)}")
    word("geo", f"row{min(placed.row, _POSITION_CAP)}")
    word("geo", f"rows_below{min(pages.rows - 1 - placed.row, _POSITION_CAP)}")
    word("geo", f"cells{min(1 + len(left) + len(right), _POSITION_CAP)}")
    word("geo", "rightmost" if not right else "inner")


def _embed_unique(encoder: Encoder, texts: list[str]) -> np.ndarray:
    """Embed each distinct text once (spans share lines, amounts share contexts); empty texts stay zero."""
    distinct = sorted({t for t in texts if t})
    if not distinct:
        return np.zeros((len(texts), encoder.dim))
    vectors = encoder.embed(distinct)
    row = {t: i for i, t in enumerate(distinct)}
    out = np.zeros((len(texts), encoder.dim))
    for i, t in enumerate(texts):
        if t:
            out[i] = vectors[row[t]]
    return out


def _lm_block(lm_scores: Sequence[float] | None, located: int, rows: int) -> sparse.csr_matrix:
    """The LM's log-probability over this document's options and whether it is the LM's first choice."""
    block = np.zeros((rows, len(LM_FEATURES)))
    if lm_scores is None:
        raise ValueError("this ranker was trained with LM scores: pass lm_scores for the candidates")
    scores = np.asarray(lm_scores, dtype=np.float64)
    if len(scores) not in (located, rows):
        raise ValueError(f"lm_scores has {len(scores)} entries for {located} candidates")
    if len(scores):
        log_probs = np.log(np.clip(softmax(scores), 1e-12, None))
        block[: len(scores), 0] = log_probs
        block[int(np.argmax(scores)), 1] = 1.0
    return sparse.csr_matrix(block)
