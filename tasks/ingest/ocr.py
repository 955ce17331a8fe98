"""Scanned pages to text: open images and PDF pages within limits, OCR them with bundled models, keep the layout.

OCR runs on the embedded default with nothing downloaded at run time: `rapidocr_onnxruntime` 1.4 ships its PP-OCR
detection, orientation and recognition ONNX models inside its wheel and runs them on onnxruntime's CPU provider
(later `rapidocr` releases download models on first use, which a batch worker without egress cannot do). PDF pages
are rendered by `pypdfium2` (PDFium inside its wheel). Both come with docroute's `[ocr]` extra (README: formats):
OpenCV alone is ~150 MB and rapidocr_onnxruntime does not install on Python 3.13, so they are not in the default
install; without them an image is an `ocr_unavailable` row and a scanned PDF page is skipped, never a crash.

Hostile files are refused before they cost memory: an image's pixel count is read from its header (Pillow's
`Image.open` decodes nothing) and compared with `MAX_IMAGE_PIXELS` before any page is decoded, and the pages that need
OCR are counted against `source.max_pages` before the first is read. Every refusal is an `OcrRefusedError` carrying the
row's typed error code and its sentence.
"""

from __future__ import annotations

import io
import logging
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from docroute.schemas.outcomes import DocumentErrorCode
from docroute.tasks.ingest.layout import Box, OcrLine, PageLine, reading_order

if TYPE_CHECKING:
    from PIL import Image

#: The most pixels one page may have, checked from the header before decoding: an A4 page scanned at 600 dpi is
#: 35 Mpx; beyond 50 Mpx a page costs over 150 MB as RGB, and a few bytes of PNG header can claim billions.
MAX_IMAGE_PIXELS = 50_000_000

#: PDF pages are rendered at this resolution for OCR: enough for 8-point print, and the recogniser reads text lines
#: 48 pixels high, so more only costs time.
PDF_RENDER_DPI = 200

#: Whether each detected line is also run through the 0/180-degree orientation classifier. Off: document pages are
#: upright (a page scanned upside down is a page-level problem a per-line classifier does not fix), and measured on
#: typed pages it cost a third of the page's time and turned two of 40 upright lines over, which then were dropped.
CLASSIFY_LINE_ORIENTATION = False

#: Image formats docroute opens; Pillow's other decoders (some rarely exercised) are never reached by a hostile file.
IMAGE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "TIFF", "WEBP")

_logger = logging.getLogger(__name__)


class PageSource(StrEnum):
    """Where a page's text came from: the PDF's text layer, or OCR of the page's pixels."""

    TEXT_LAYER = "text_layer"
    OCR = "ocr"


class OcrRefusedError(Exception):
    """A document OCR will not read, with the row's error code and the sentence for its owner."""

    def __init__(self, code: DocumentErrorCode, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class OcrPage:
    """One page after OCR: its lines in reading order (empty when OCR found no text)."""

    page: int
    lines: tuple[PageLine, ...]


@lru_cache(maxsize=1)
def ocr_available() -> bool:
    """Whether the `[ocr]` extra is installed (rapidocr_onnxruntime, onnxruntime, OpenCV and pypdfium2); asked once."""
    try:
        import cv2  # noqa: F401
        import pypdfium2  # noqa: F401
        import rapidocr_onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def require_ocr(what: str) -> None:
    """Refuse `what` with `ocr_unavailable` when the extra is missing, naming how to install it."""
    if not ocr_available():
        raise OcrRefusedError(
            DocumentErrorCode.OCR_UNAVAILABLE,
            f"{what} needs OCR, which is not installed: install docroute's [ocr] extra (./dev setup does)",
        )


@lru_cache(maxsize=1)
def _engine() -> Any:
    """The OCR engine, built once per process: loading its three ONNX sessions takes about a second."""
    from rapidocr_onnxruntime import RapidOCR

    logging.getLogger("RapidOCR").setLevel(logging.WARNING)  # it logs a line per model loaded
    return RapidOCR()


def ocr_image(image: Image.Image, *, page: int) -> OcrPage:
    """OCR one page image into lines in reading order (boxes in the image's pixels)."""
    import numpy as np

    rgb = image if image.mode == "RGB" else image.convert("RGB")
    pixels = np.ascontiguousarray(np.asarray(rgb)[:, :, ::-1])  # the engine reads OpenCV's BGR order
    result, _ = _engine()(pixels, use_cls=CLASSIFY_LINE_ORIENTATION)
    raw = [
        OcrLine(str(text), Box.around(points), float(score))
        for points, text, score in (result or [])
        if str(text).strip()
    ]
    return OcrPage(page, tuple(reading_order(raw, page=page, width=float(rgb.width), height=float(rgb.height))))


# --- images -------------------------------------------------------------------------------------------------


def image_pages(data: bytes, *, max_pages: int, max_pixels: int = MAX_IMAGE_PIXELS) -> Iterator[Image.Image]:
    """Check an image file's pages (a TIFF's frames) from their headers, then decode them one at a time.

    The pages are counted and each one's size read before this returns, so a 10,000-frame TIFF or a header
    claiming a gigapixel is refused for the cost of reading headers, before anything is decoded or OCR'd.
    """
    from PIL import Image, UnidentifiedImageError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own, lower limit decides below
        try:
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        except Image.DecompressionBombError as exc:
            raise OcrRefusedError(DocumentErrorCode.IMAGE_TOO_LARGE, f"{exc} (refused before decoding)") from None
        except UnidentifiedImageError:
            raise OcrRefusedError(
                DocumentErrorCode.IMAGE_CORRUPT,
                f"not a {'/'.join(name.lower() for name in IMAGE_FORMATS)} image docroute can open"
                f" (starts with {data[:16]!r})",
            ) from None
        except Exception as exc:
            raise OcrRefusedError(
                DocumentErrorCode.IMAGE_CORRUPT, f"its header cannot be read: {_describe(exc)}"
            ) from None
        sizes = _frame_sizes(image, max_pages)
    for index, (width, height) in enumerate(sizes):
        _check_pixels(width, height, max_pixels, page=index + 1)
    return _decode_frames(image, len(sizes))


def _decode_frames(image: Image.Image, count: int) -> Iterator[Image.Image]:
    for index in range(count):
        try:
            image.seek(index)
            image.load()
            page = image.convert("RGB")
        except (MemoryError, RecursionError):
            raise
        except Exception as exc:
            raise OcrRefusedError(
                DocumentErrorCode.IMAGE_CORRUPT, f"page {index + 1} cannot be decoded: {_describe(exc)}"
            ) from None
        yield page


def _frame_sizes(image: Image.Image, max_pages: int) -> list[tuple[int, int]]:
    """Each frame's size from its header, refusing more than `max_pages` frames without walking them all."""
    sizes: list[tuple[int, int]] = []
    for index in range(max_pages + 1):
        try:
            image.seek(index)
        except EOFError:
            break
        except Exception as exc:
            raise OcrRefusedError(
                DocumentErrorCode.IMAGE_CORRUPT, f"page {index + 1}'s header cannot be read: {_describe(exc)}"
            ) from None
        if index == max_pages:
            raise OcrRefusedError(
                DocumentErrorCode.TOO_MANY_PAGES,
                f"the image has more than {max_pages} pages to OCR (source.max_pages is {max_pages})",
            )
        sizes.append(image.size)
    return sizes


def _check_pixels(width: int, height: int, max_pixels: int, *, page: int) -> None:
    if width <= 0 or height <= 0:
        raise OcrRefusedError(DocumentErrorCode.IMAGE_CORRUPT, f"page {page} claims a size of {width}x{height} pixels")
    if width * height > max_pixels:
        raise OcrRefusedError(
            DocumentErrorCode.IMAGE_TOO_LARGE,
            f"page {page} is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}"
            " (a decompression bomb, or a scan at a needlessly high resolution); refused before decoding",
        )


# --- PDF pages ----------------------------------------------------------------------------------------------


def render_pdf_pages(
    data: bytes, indices: Sequence[int], *, dpi: int = PDF_RENDER_DPI, max_pixels: int = MAX_IMAGE_PIXELS
) -> Iterator[tuple[int, Image.Image]]:
    """Render the given 0-based pages with PDFium, each scaled down if it would exceed `max_pixels`.

    A PDF page has no pixel count of its own, so an oversized page (a poster, a hostile MediaBox) is rendered
    smaller rather than refused: the resolution is ours to choose.
    """
    import pypdfium2 as pdfium

    try:
        document = pdfium.PdfDocument(data)
    except Exception as exc:
        raise OcrRefusedError(
            DocumentErrorCode.PDF_CORRUPT, f"PDFium cannot open it to render: {_describe(exc)}"
        ) from None
    try:
        for index in indices:
            try:
                page = document[index]
                width, height = page.get_size()
                scale = dpi / 72
                if width * height * scale * scale > max_pixels:
                    scale = math.sqrt(max_pixels / max(width * height, 1.0))
                bitmap = page.render(scale=scale)
                image = bitmap.to_pil()
            except (MemoryError, RecursionError):
                raise
            except Exception as exc:
                raise OcrRefusedError(
                    DocumentErrorCode.PDF_CORRUPT, f"page {index + 1} cannot be rendered: {_describe(exc)}"
                ) from None
            yield index, image
    finally:
        document.close()


def _describe(exc: BaseException) -> str:
    message = str(exc).strip()
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
