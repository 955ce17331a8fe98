"""Scanned pages to text: open images and PDF pages within limits, OCR them with bundled models, keep the layout.

OCR runs on the embedded default with nothing downloaded at run time: `rapidocr_onnxruntime` 1.4 ships its PP-OCR
detection, orientation and recognition ONNX models inside its wheel and runs them on onnxruntime's CPU provider
(later `rapidocr` releases download models on first use, which a batch worker without egress cannot do). PDF pages
are rendered by `pypdfium2` (PDFium inside its wheel). Both come with docroute's `[ocr]` extra (README: formats):
OpenCV alone is ~150 MB and rapidocr_onnxruntime does not install on Python 3.13, so they are not in the default
install; without them an image is an `ocr_unavailable` row and a scanned PDF page is skipped, never a crash.

Hostile files are refused before they cost memory: an image's pixel count is read from its header (Pillow's
`Image.open` decodes nothing) and compared with `MAX_IMAGE_PIXELS` before any page is decoded, and the pages that need
OCR are counted against `source.max_pages` before the first is read; `OcrDeadline` stops a document's OCR between pages
once `source.max_ocr_seconds` is spent. Every refusal is an `OcrRefusedError` carrying the row's typed error code and
its sentence. A PDF's text layer is read here too (`pdf_text_layers`: PDFium's characters as lines in reading order
with their boxes), so text-layer pages and OCR'd pages give the extraction stage the same `PageLine`s.
"""

from __future__ import annotations

import io
import logging
import math
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from docroute.schemas.outcomes import DocumentErrorCode
from docroute.tasks.ingest.layout import Box, OcrLine, PageLine, lines_text, reading_order

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

#: Threads each of the engine's ONNX sessions computes one call with, unless `source.ocr_threads` says otherwise.
#: onnxruntime's default is a pool of one thread per core in each session, and a threads run calls the one shared
#: engine from every shard at once: on a 2-core worker two shards meant four threads per model spinning on two cores.
#: With one, a call computes on its caller's thread and the shards are what runs in parallel (measured: BENCHMARKS.md,
#: "OCR threads"). -1 is onnxruntime's default.
OCR_THREADS = 1

#: The least probability the recogniser must give a space, in some column between two characters, for a space to be
#: written there (`_SpacedDecoder`). Measured on 20 SROIE receipts (CER, PNG): 0.089 greedy; 0.002 to 0.01 all about
#: 0.037 with the characters unchanged; 0.05 left 0.072 (spaces still dropped), 0.0005 0.048 (words split).
SPACE_PROBABILITY = 0.005

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


class OcrDeadline:
    """When a document's OCR must stop (`source.max_ocr_seconds`), counted from the first page it starts on.

    Checked between pages, never inside one: onnxruntime cannot be interrupted, and a page cut short would be text
    missing from the middle of a document. A page takes 1 to 20 s on a busy CPU, so the budget is overrun by at most
    one page.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = _clock()

    @property
    def elapsed(self) -> float:
        return _clock() - self.started

    def expired(self) -> bool:
        return self.elapsed >= self.seconds


_clock = time.monotonic  # module-level so that tests can advance time without sleeping


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


def _engine(threads: int | None = None) -> Any:
    """The OCR engine, built once per process and shared by its threads: loading its ONNX sessions takes a second.

    A lock rather than a bare cache, because the shards of a threads run start together and would each build one.
    Sharing is safe: onnxruntime's `InferenceSession.run` may be called from several threads at once, and nothing
    docroute calls on the engine changes its state (no per-call options are passed, which rapidocr would store; its
    detector does replace its pre-processing object on every call, but with the default `limit_type: min` each one
    is the same, so which thread's lands makes no difference).
    Kept per thread count (`threads`, else `OCR_THREADS`): a job's `source.ocr_threads` gets an engine built with it.
    """
    threads = OCR_THREADS if threads is None else threads
    with _ENGINE_LOCK:
        engine = _ENGINES.get(threads)
        if engine is None:
            engine = _ENGINES[threads] = _build_engine(threads)
        return engine


def reset_engine() -> None:
    """Forget the engine, so the next page loads the models again (tests: they must load offline)."""
    with _ENGINE_LOCK:
        _ENGINES.clear()


_ENGINES: dict[int, Any] = {}
_ENGINE_LOCK = threading.Lock()


def _build_engine(threads: int) -> Any:
    from rapidocr_onnxruntime import RapidOCR

    logging.getLogger("RapidOCR").setLevel(logging.WARNING)  # it logs a line per model loaded
    engine = RapidOCR(intra_op_num_threads=threads, inter_op_num_threads=1)
    decoder = engine.text_rec.postprocess_op
    engine.text_rec.postprocess_op = _SpacedDecoder(decoder.character, decoder.dict[" "])
    return engine


class _SpacedDecoder:
    """CTC decoding that keeps the spaces PP-OCR's recogniser sees but does not pick.

    The bundled recogniser (PP-OCRv4, trained mostly on Chinese, where words have no spaces) rarely makes the space
    the most likely class of a column: between two words of a receipt the columns go to "blank", with the space a
    distant second. Greedy decoding then glues the words ("TOTAL12.50"), which was half of all character errors
    measured on receipts. Here a space is written between two characters when any column between them gives the
    space at least `SPACE_PROBABILITY`; everything else is rapidocr's greedy decoding (best class per column,
    repeats merged, blanks dropped, confidence the mean of the kept characters' probabilities). Word boxes
    (rapidocr's `return_word_box`) are not produced: docroute never asks for them.
    """

    def __init__(self, characters: Sequence[str], space: int) -> None:
        self.character = list(characters)
        self.space = space

    def __call__(self, preds: Any, return_word_box: bool = False, **kwargs: Any) -> list[tuple[str, float]]:
        import numpy as np

        best = preds.argmax(axis=2)
        results: list[tuple[str, float]] = []
        for columns, probabilities, classes in zip(preds, preds.max(axis=2), best, strict=True):
            keep = np.flatnonzero((classes != 0) & np.concatenate(([True], classes[1:] != classes[:-1])))
            if not len(keep):
                results.append(("", 0.0))
                continue
            text = []
            for position, column in enumerate(keep):
                char = self.character[classes[column]]
                text.append(char)
                following = keep[position + 1] if position + 1 < len(keep) else None
                if following is None or char == " " or classes[following] == self.space:
                    continue
                if following - column > 1 and columns[column + 1 : following, self.space].max() >= SPACE_PROBABILITY:
                    text.append(" ")
            results.append(("".join(text), float(probabilities[keep].mean())))
        return results


def ocr_image(image: Image.Image, *, page: int, threads: int | None = None) -> OcrPage:
    """OCR one page image into lines in reading order (boxes in the image's pixels); `threads`: `_engine`'s."""
    import numpy as np

    rgb = image if image.mode == "RGB" else image.convert("RGB")
    pixels = np.ascontiguousarray(np.asarray(rgb)[:, :, ::-1])  # the engine reads OpenCV's BGR order
    result, _ = _engine(threads)(pixels, use_cls=CLASSIFY_LINE_ORIENTATION)
    raw = [
        OcrLine(str(text), Box.around(points), float(score))
        for points, text, score in (result or [])
        if str(text).strip()
    ]
    return OcrPage(page, tuple(reading_order(raw, page=page, width=float(rgb.width), height=float(rgb.height))))


# --- images -------------------------------------------------------------------------------------------------


class ImagePages(Iterator["Image.Image"]):
    """An image file's pages, decoded one at a time as they are iterated; `len` is the count from the headers."""

    def __init__(self, frames: Iterator[Image.Image], count: int) -> None:
        self._frames = frames
        self.count = count

    def __next__(self) -> Image.Image:
        return next(self._frames)

    def __len__(self) -> int:
        return self.count


def image_pages(data: bytes, *, max_pages: int, max_pixels: int = MAX_IMAGE_PIXELS) -> ImagePages:
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
    return ImagePages(_decode_frames(image, len(sizes)), len(sizes))


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
    data: bytes,
    indices: Sequence[int],
    *,
    dpi: int = PDF_RENDER_DPI,
    max_pixels: int = MAX_IMAGE_PIXELS,
    deadline: OcrDeadline | None = None,
) -> Iterator[tuple[int, Image.Image]]:
    """Render the given 0-based pages with PDFium, each scaled down if it would exceed `max_pixels`.

    A PDF page has no pixel count of its own, so an oversized page (a poster, a hostile MediaBox) is rendered
    smaller rather than refused: the resolution is ours to choose. Once `deadline` has expired no further page is
    rendered (the caller counts what it did not get), so time is not spent drawing a page nobody will read.
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
            if deadline is not None and deadline.expired():
                return
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


@dataclass(frozen=True, slots=True)
class TextLayerPage:
    """One PDF page's text layer as PDFium reads it: its lines in reading order, with their boxes."""

    page: int
    lines: tuple[PageLine, ...]

    @property
    def text(self) -> str:
        return lines_text(self.lines)


def pdf_text_layers(data: bytes, count: int, *, dpi: int = PDF_RENDER_DPI) -> list[TextLayerPage]:
    """The text layer of a PDF's first `count` pages, each as lines in reading order with their boxes.

    PDFium groups a page's characters into text runs, each on one line (`count_rects`/`get_rect`), and reads the text
    inside each run's rectangle; the runs are then put in reading order by the same rule as OCR'd lines
    (`layout.reading_order`), so a text-layer page and a scanned page give the extraction stage the same geometry.
    Boxes are in pixels at `dpi` (PDF points x dpi / 72, y from the top), the scale a scanned page of the same file
    is rendered at. Measured against pypdf on receipts (bench/pdf_text.py): fewer character errors, because pypdf
    writes text in the order it was drawn, which is not always reading order. A page PDFium cannot read has no lines.
    """
    import pypdfium2 as pdfium

    try:
        document = pdfium.PdfDocument(data)
    except Exception as exc:
        raise OcrRefusedError(DocumentErrorCode.PDF_CORRUPT, f"PDFium cannot open it: {_describe(exc)}") from None
    scale = dpi / 72
    pages: list[TextLayerPage] = []
    try:
        for index in range(min(count, len(document))):
            try:
                pages.append(TextLayerPage(index + 1, _page_text_lines(document[index], index + 1, scale)))
            except (MemoryError, RecursionError):
                raise
            except Exception as exc:
                _logger.debug("page %d's text layer cannot be read by PDFium: %s", index + 1, _describe(exc))
                pages.append(TextLayerPage(index + 1, ()))
    finally:
        document.close()
    return pages


def _page_text_lines(page: Any, number: int, scale: float) -> tuple[PageLine, ...]:
    """A page's characters grouped into runs (one line, no wide gap), then put in reading order.

    Runs are built from the characters and their boxes rather than from PDFium's own rectangles, because reading the
    text inside a rectangle also picks up any other text drawn over it (measured: overlapping receipt lines came
    out twice). A run ends at a line break, where the next character sits on another line or back to the left, or
    after a gap wider than `RUN_GAP` character heights: a label and a right-aligned amount are two runs of one row.
    """
    width, height = page.get_size()
    textpage = page.get_textpage()
    runs: list[OcrLine] = []
    try:
        text = textpage.get_text_range()
        chars: list[str] = []
        box: list[float] = []  # the current run's left, bottom, right, top in PDF points
        last: tuple[float, float, float, float] | None = None
        for index in range(min(textpage.count_chars(), len(text))):
            char = text[index]
            if char in "\r\n":
                _end_run(runs, chars, box, height, scale)
                last = None
                continue
            if char.isspace():
                if chars:
                    chars.append(" ")
                continue
            left, bottom, right, top = textpage.get_charbox(index, loose=True)
            if last is not None and not _continues(last, (left, bottom, right, top)):
                _end_run(runs, chars, box, height, scale)
            elif last is not None and chars and chars[-1] != " " and left - last[2] > SPACE_GAP * (top - bottom):
                chars.append(" ")  # two words drawn apart without a space character between them
            if not chars:
                box[:] = [left, bottom, right, top]
            else:
                box[:] = [min(box[0], left), min(box[1], bottom), max(box[2], right), max(box[3], top)]
            chars.append(char)
            last = (left, bottom, right, top)
        _end_run(runs, chars, box, height, scale)
    finally:
        textpage.close()
    return tuple(reading_order(runs, page=number, width=width * scale, height=height * scale))


#: A gap between two characters of one line wider than this many character heights starts a new run (a column).
RUN_GAP = 1.5

#: A gap wider than this many character heights, with no space character in it, is read as a space: writers that
#: place each word (or each cell) on its own draw no spaces at all.
SPACE_GAP = 0.15


def _continues(previous: tuple[float, float, float, float], char: tuple[float, float, float, float]) -> bool:
    """Whether a character follows the previous one on its line: vertically overlapping, close on the right."""
    p_left, p_bottom, p_right, p_top = previous
    left, bottom, _right, top = char
    size = max(p_top - p_bottom, top - bottom, 1e-6)
    overlap = min(p_top, top) - max(p_bottom, bottom)
    return (
        overlap >= 0.5 * min(p_top - p_bottom, top - bottom) and p_left - size * 0.2 <= left <= p_right + size * RUN_GAP
    )


def _end_run(runs: list[OcrLine], chars: list[str], box: list[float], height: float, scale: float) -> None:
    text = "".join(chars).strip()
    if text:
        left, bottom, right, top = box
        runs.append(
            OcrLine(
                " ".join(text.split()),
                Box(left * scale, (height - top) * scale, right * scale, (height - bottom) * scale),
                1.0,
            )
        )
    chars.clear()


def _describe(exc: BaseException) -> str:
    message = str(exc).strip()
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
