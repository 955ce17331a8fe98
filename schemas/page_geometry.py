"""Where a document's lines sit on its pages: the geometry OCR finds, as every layer below ingest reads it.

OCR (tasks/ingest/ocr.py, tasks/ingest/layout.py) produces these; the extraction rankers (engines/extract/) read them
from the request to use a line's position: its row and column, where it sits on the page. They live here, below
both, because an engine may not import tasks/. Pure values: no image library, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["Box", "PageLine"]


@dataclass(frozen=True, slots=True)
class Box:
    """An axis-aligned box in page pixels: left, top, right, bottom (y grows downwards, as in images)."""

    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def height(self) -> float:
        return max(self.y1 - self.y0, 0.0)

    @property
    def width(self) -> float:
        return max(self.x1 - self.x0, 0.0)

    @property
    def centre_y(self) -> float:
        return (self.y0 + self.y1) / 2

    @classmethod
    def around(cls, points: Iterable[Sequence[float]]) -> Box:
        """The box around a polygon's corners (OCR detectors return four corners of a possibly tilted box)."""
        xs, ys = zip(*((float(point[0]), float(point[1])) for point in points), strict=True)
        return cls(min(xs), min(ys), max(xs), max(ys))


@dataclass(frozen=True, slots=True)
class PageLine:
    """One line of a page in reading order, with what the extraction stage needs to use its position.

    `page` counts from 1; `row` counts the page's rows from 0, top to bottom; `column` counts a row's lines from 0,
    left to right; `box` is in page pixels and `page_width`/`page_height` give its relative position
    (`relative_box`), which is what compares across scans of different resolutions.
    """

    page: int
    row: int
    column: int
    text: str
    box: Box
    confidence: float
    page_width: float
    page_height: float

    @property
    def relative_box(self) -> Box:
        """The box as fractions of the page (0 to 1), independent of the scan's resolution."""
        width, height = self.page_width or 1.0, self.page_height or 1.0
        return Box(self.box.x0 / width, self.box.y0 / height, self.box.x1 / width, self.box.y1 / height)
