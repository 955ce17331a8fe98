"""Scanned documents' pages as images for the vLLM vision path (`small_model.vision`), rendered only when sent.

A request carries a `PageImages` (schemas/pages.py) whose `render` reads the file again, checks it is the content
that was parsed (its SHA-256), and renders the first pages with the OCR code's own limits (tasks/ingest/ocr.py:
headers checked before decoding, PDF pages rendered straight at the asked size). Nothing is kept between calls:
a shard holds the file bytes and pixels of one model call's documents at a time, never every page it read.

Which documents: an image file, and a PDF with at least one page read by OCR (no text layer). Every other
document stays on the text path.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass
from typing import Any

from fsspec.core import url_to_fs

from docroute.schemas.pages import PageImages, PageImagesError
from docroute.schemas.spec import JobSpec, SourceSpec
from docroute.tasks.ingest import ocr
from docroute.tasks.ingest.read import SourceDocument


def wants_page_images(spec: JobSpec) -> bool:
    """Whether the job's small model looks at page images (a vLLM small model with `vision` set)."""
    return getattr(spec.small_model, "vision", None) is not None


def page_images(spec: JobSpec, doc: SourceDocument) -> PageImages | None:
    """The document's pages for the vision path, or None (no vision, a text document, an unreadable one)."""
    if not wants_page_images(spec) or not doc.ok or not doc.content_sha256 or not doc.pages:
        return None
    if doc.format == "image" or (doc.format == "pdf" and doc.ocr_pages):
        render = PageRenderer(spec.source, doc.uri, doc.format, doc.content_sha256)
        return PageImages(key=doc.content_sha256, count=doc.pages, render=render)
    return None


@dataclass(frozen=True, slots=True)
class PageRenderer:
    """Renders one file's first pages when called: `PageImages.render` for a document of `source`."""

    source: SourceSpec
    uri: str
    format: str
    sha256: str

    def __call__(self, pages: int, max_pixels: int) -> list[Any]:
        """The first `pages` page images of the file, each of at most `max_pixels` pixels."""
        try:
            fs, path = url_to_fs(self.uri, **self.source.fsspec_options())
            data = fs.cat_file(path)
        except Exception as exc:
            raise PageImagesError(f"the file cannot be read again: {type(exc).__name__}: {exc}") from None
        if hashlib.sha256(data).hexdigest() != self.sha256:
            raise PageImagesError("the file changed after it was read; a later run answers its new content")
        return _render(data, self.format, self.source.max_pages, pages, max_pixels)


def _render(data: bytes, fmt: str, max_pages: int, pages: int, max_pixels: int) -> list[Any]:
    try:
        if fmt == "pdf":
            return [image for _, image in ocr.render_pdf_pages(data, range(pages), max_pixels=max_pixels)]
        frames = ocr.image_pages(data, max_pages=max_pages)
        return [_bounded(frame, max_pixels) for frame in itertools.islice(frames, pages)]
    except ocr.OcrRefusedError as refused:
        raise PageImagesError(f"its page images cannot be rendered: {refused}") from None


def _bounded(image: Any, max_pixels: int) -> Any:
    """A decoded frame scaled down to at most `max_pixels` at once, so a 35 Mpx scan is not kept at full size."""
    width, height = image.size
    if width * height <= max_pixels:
        return image
    scale = math.sqrt(max_pixels / (width * height))
    return image.resize((max(1, int(width * scale)), max(1, int(height * scale))))
