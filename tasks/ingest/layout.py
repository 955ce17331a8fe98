"""Page geometry of OCR'd text: lines in reading order, each with its box, row and column on its page.

Extraction fields are positional (the amount on the row of "TOTAL", the block at the top of a receipt), so a scan's
text keeps where each line sat. OCR returns lines in detection order, which is not reading order: a right-aligned
amount is often found before the label on its left, or a few pixels higher. `reading_order` sorts lines into rows
(top to bottom) and columns (left to right within a row); `lines_text` writes one text line per row, so a label and
its value stay on one line of the text the models read. `Box` and `PageLine` live in schemas/page_geometry.py (the
extraction engines read them from the request) and are re-exported here. Pure: no image library, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from docroute.schemas.page_geometry import Box, PageLine

__all__ = [
    "CELL_SEPARATOR",
    "ROW_TOLERANCE",
    "Box",
    "OcrLine",
    "PageLine",
    "lines_text",
    "mean_confidence",
    "reading_order",
]

#: Two lines are one row when their vertical centres are within this share of their mean height: half a line
#: height tolerates a skewed scan or a baseline a few pixels off, and still separates consecutive lines of text.
ROW_TOLERANCE = 0.5

#: What separates two lines of one row in the text: a single space, so "TOTAL 12.50" reads as printed.
CELL_SEPARATOR = " "


@dataclass(frozen=True, slots=True)
class OcrLine:
    """One line as the recogniser returned it: its text, box and confidence (0 to 1), in no particular order."""

    text: str
    box: Box
    confidence: float


def reading_order(lines: Iterable[OcrLine], *, page: int, width: float, height: float) -> list[PageLine]:
    """Order one page's lines into rows and columns; blank lines are dropped.

    Lines are taken by vertical centre; a line joins the current row while its centre is within `ROW_TOLERANCE`
    of the mean height of it and the row's lines from the row's mean centre, so a row's drift on a tilted scan is
    followed rather than anchored to its first line. Within a row, lines go left to right by their left edge.
    """
    pending = sorted((line for line in lines if line.text.strip()), key=lambda line: (line.box.centre_y, line.box.x0))
    rows: list[list[OcrLine]] = []
    for line in pending:
        if rows and _same_row(rows[-1], line):
            rows[-1].append(line)
        else:
            rows.append([line])
    ordered: list[PageLine] = []
    for row_index, row in enumerate(rows):
        for column, line in enumerate(sorted(row, key=lambda item: item.box.x0)):
            ordered.append(
                PageLine(page, row_index, column, line.text.strip(), line.box, line.confidence, width, height)
            )
    return ordered


def _same_row(row: Sequence[OcrLine], line: OcrLine) -> bool:
    centre = sum(item.box.centre_y for item in row) / len(row)
    row_height = sum(item.box.height for item in row) / len(row)
    return abs(line.box.centre_y - centre) <= ROW_TOLERANCE * (row_height + line.box.height) / 2


def lines_text(lines: Sequence[PageLine]) -> str:
    """The text of lines in reading order: one text line per row, pages apart by a blank line."""
    out: list[str] = []
    previous: tuple[int, int] | None = None
    for line in lines:
        key = (line.page, line.row)
        if previous is None:
            out.append(line.text)
        elif key == previous:
            out[-1] = f"{out[-1]}{CELL_SEPARATOR}{line.text}"
        else:
            if line.page != previous[0]:
                out.append("")
            out.append(line.text)
        previous = key
    return "\n".join(out)


def mean_confidence(lines: Sequence[PageLine]) -> float | None:
    """The mean of the lines' confidences (the row's `ocr_confidence`); None when there is no line."""
    return sum(line.confidence for line in lines) / len(lines) if lines else None
