"""Scanned documents and images (issue 18): OCR with the bundled models, reading order, and every refusal.

Every image and PDF is made here with Pillow or fpdf2, with text drawn at known boxes, so the tests know what OCR
must read and where. OCR runs with sockets blocked: the models come from the rapidocr_onnxruntime wheel and nothing
may be downloaded at run time.
"""

from __future__ import annotations

import io
import itertools
import socket
import struct
import threading
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from fpdf import FPDF
from PIL import Image, ImageDraw, ImageFont

from docroute.engines.local import llama_runtime
from docroute.schemas.outcomes import DocumentErrorCode
from docroute.schemas.spec import SourceSpec
from docroute.tasks.ingest import ocr
from docroute.tasks.ingest.layout import Box, OcrLine, PageLine, lines_text, mean_confidence, reading_order
from docroute.tasks.ingest.parse import ERROR_CODES, ParsedDocument, parse_document

pytestmark = pytest.mark.skipif(not ocr.ocr_available(), reason="OCR needs docroute's [ocr] extra (./dev setup)")

FONT = ImageFont.load_default(size=30)  # Pillow's bundled FreeType font: the same glyphs on every machine
INVOICE: tuple[tuple[int, int, str], ...] = (
    (40, 40, "ACME Supplies Ltd"),
    (40, 120, "Invoice INV-2041"),
    (40, 200, "TOTAL"),
    (560, 204, "1234.50"),  # a value a few pixels lower than its label: still the label's row
)


_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every connection off this machine fail, so a loader that tries to download is caught, not just slow.

    Loopback stays open: the end-to-end run talks to its local Prefect API; a model download never goes there.
    """
    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex
    create_connection, getaddrinfo = socket.create_connection, socket.getaddrinfo

    def host_of(address: Any) -> str:
        return str(address[0]) if isinstance(address, tuple) else str(address)

    def refuse(host: str) -> None:
        if host not in _LOOPBACK:
            raise OSError(f"network access to {host} during a test that must run offline")

    def guarded_connect(self: socket.socket, address: Any) -> Any:
        if self.family != socket.AF_UNIX:
            refuse(host_of(address))
        return connect(self, address)

    def guarded_connect_ex(self: socket.socket, address: Any) -> Any:
        if self.family != socket.AF_UNIX:
            refuse(host_of(address))
        return connect_ex(self, address)

    def guarded_create_connection(address: Any, *args: Any, **kwargs: Any) -> Any:
        refuse(host_of(address))
        return create_connection(address, *args, **kwargs)

    def guarded_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        refuse(str(host))
        return getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", guarded_connect_ex)
    monkeypatch.setattr(socket, "create_connection", guarded_create_connection)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)


def test_the_network_guard_refuses_a_remote_host(no_network: None) -> None:
    with pytest.raises(OSError, match="must run offline"):
        socket.create_connection(("example.com", 443), timeout=1)


@pytest.fixture
def no_ocr(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail if any page is OCR'd: refusals must come from headers and counts alone."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a refused document was OCR'd")

    monkeypatch.setattr(ocr, "ocr_image", refuse)


def _page(lines: Sequence[tuple[int, int, str]] = INVOICE, size: tuple[int, int] = (820, 300)) -> Image.Image:
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    for x, y, text in lines:
        draw.text((x, y), text, font=FONT, fill="black")
    return image


def _drawn_box(x: int, y: int, text: str) -> Box:
    left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((x, y), text, font=FONT)
    return Box(left, top, right, bottom)


def _encode(images: Sequence[Image.Image], fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    images[0].save(buffer, fmt, save_all=len(images) > 1, append_images=list(images[1:]), **options)
    return buffer.getvalue()


def _parse(data: bytes, uri: str, **options: Any) -> ParsedDocument:
    documents = parse_document(data, uri=uri, source=SourceSpec(url="memory://docs", **options))
    assert len(documents) == 1
    document = documents[0]
    assert (document.text is None) != (document.error is None)
    if document.error is not None:
        assert document.error_code in ERROR_CODES and document.error.startswith(f"{document.error_code}: ")
    return document


def _error(data: bytes, uri: str, code: str, **options: Any) -> str:
    document = _parse(data, uri, **options)
    assert document.error_code == code, document.error
    assert document.error is not None
    return document.error


def _png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming a size, followed by a few bytes of image data that decode to nothing."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    data = b"IDAT" + zlib.compress(b"\0" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
        + struct.pack(">I", len(data) - 4)
        + data
        + struct.pack(">I", zlib.crc32(data))
    )


def _squash(text: str) -> str:
    """The text without spaces inside lines: its rows, pages and characters only."""
    return "\n".join(line.replace(" ", "") for line in text.split("\n"))


# --- reading order (pure) -----------------------------------------------------------------------------------


def _line(text: str, *box: float, confidence: float = 0.9) -> OcrLine:
    return OcrLine(text, Box(*box), confidence)


def test_reading_order_puts_a_row_together_left_to_right_whatever_the_detection_order() -> None:
    detected = [
        _line("12.50", 500, 196, 580, 226),  # found first, 4 px higher than its label
        _line("Date 2024-03-01", 40, 100, 300, 130),
        _line("TOTAL", 40, 200, 130, 230),
        _line("Shop", 40, 20, 120, 50),
        _line("   ", 40, 300, 80, 330),  # blank: dropped
    ]
    lines = reading_order(detected, page=2, width=600, height=400)
    assert [(line.row, line.column, line.text) for line in lines] == [
        (0, 0, "Shop"),
        (1, 0, "Date 2024-03-01"),
        (2, 0, "TOTAL"),
        (2, 1, "12.50"),
    ]
    assert all(line.page == 2 for line in lines)
    assert lines[3].relative_box == Box(500 / 600, 196 / 400, 580 / 600, 226 / 400)
    assert lines_text(lines) == "Shop\nDate 2024-03-01\nTOTAL 12.50"


def test_lines_more_than_half_a_line_apart_are_separate_rows() -> None:
    lines = reading_order(
        [_line("first", 40, 100, 200, 130), _line("second", 300, 116, 400, 146)], page=1, width=500, height=300
    )  # centres 16 px apart with 30 px lines: over half a line height
    assert [(line.row, line.column) for line in lines] == [(0, 0), (1, 0)]


def test_pages_are_apart_in_the_text_and_confidence_is_the_mean_of_lines() -> None:
    first = reading_order([_line("one", 0, 0, 10, 10, confidence=0.8)], page=1, width=100, height=100)
    second = reading_order([_line("two", 0, 0, 10, 10, confidence=0.6)], page=2, width=100, height=100)
    lines: list[PageLine] = [*first, *second]
    assert lines_text(lines) == "one\n\ntwo"
    assert mean_confidence(lines) == pytest.approx(0.7)
    assert mean_confidence([]) is None


# --- images -------------------------------------------------------------------------------------------------


def test_png_is_read_offline_in_reading_order_with_each_line_box(no_network: None) -> None:
    ocr.reset_engine()  # load the models again, with sockets blocked: they must come from the wheel
    document = _parse(_encode([_page()], "PNG"), "scan.png")
    assert document.format == "image" and document.error is None
    assert document.text == "ACME Supplies Ltd\nInvoice INV-2041\nTOTAL 1234.50"
    assert (document.pages, document.ocr_pages) == (1, 1)
    assert document.ocr_confidence is not None and document.ocr_confidence > 0.9
    assert [(line.row, line.column) for line in document.lines] == [(0, 0), (1, 0), (2, 0), (2, 1)]
    for line, (x, y, text) in zip(document.lines, INVOICE, strict=True):
        drawn = _drawn_box(x, y, text)
        assert line.text == text and line.page == 1 and (line.page_width, line.page_height) == (820, 300)
        # the detector's box hugs the glyphs it drew, give or take a few pixels of padding
        assert abs(line.box.x0 - drawn.x0) <= 8 and abs(line.box.x1 - drawn.x1) <= 8, (line, drawn)
        assert abs(line.box.centre_y - drawn.centre_y) <= 6, (line, drawn)


@pytest.mark.parametrize(("uri", "fmt"), [("photo.jpg", "JPEG"), ("photo.jpeg", "JPEG"), ("scan.webp", "WEBP")])
def test_jpeg_and_webp_are_read(uri: str, fmt: str, no_network: None) -> None:
    document = _parse(_encode([_page()], fmt, quality=90), uri)
    assert document.text is not None and "TOTAL 1234.50" in document.text and "INV-2041" in document.text


def test_multi_page_tiff_reads_every_page_and_skips_a_blank_one(no_network: None) -> None:
    pages = [_page(INVOICE[:2]), Image.new("RGB", (820, 300), "white"), _page([(40, 40, "Page three notes")])]
    document = _parse(_encode(pages, "TIFF", compression="tiff_deflate"), "batch.tiff")
    assert document.text == "ACME Supplies Ltd\nInvoice INV-2041\n\nPage three notes"
    assert (document.pages, document.ocr_pages) == (3, 3)
    assert sorted({line.page for line in document.lines}) == [1, 3]


def test_an_image_without_text_is_a_reasoned_error() -> None:
    error = _error(_encode([Image.new("RGB", (400, 300), "white")], "PNG"), "blank.png", "ocr_no_text")
    assert "1 page(s)" in error


# --- PDFs ---------------------------------------------------------------------------------------------------


def test_image_only_pdf_is_rendered_and_read(no_network: None) -> None:
    pdf = _encode([_page(), _page([(40, 40, "Second page thanks")])], "PDF", resolution=200)
    document = _parse(pdf, "scan.pdf")
    assert document.format == "pdf" and document.text is not None
    # spaces between words included: the decoder keeps the ones the recogniser saw but did not pick (see below)
    assert document.text == "ACME Supplies Ltd\nInvoice INV-2041\nTOTAL 1234.50\n\nSecond page thanks"
    assert (document.pages, document.ocr_pages) == (2, 2)
    assert document.lines[-1].page == 2 and document.ocr_confidence is not None


def test_text_layer_pages_are_not_ocrd_and_scanned_pages_of_the_same_pdf_are(tmp_path: Path) -> None:
    pdf = FPDF()
    pdf.set_font("helvetica", size=12)
    pdf.add_page()
    pdf.multi_cell(w=0, text="A typed cover letter with a text layer, long enough to be trusted as the page's text.")
    scan = tmp_path / "scan.png"
    _page().save(scan)
    pdf.add_page()
    pdf.image(str(scan), x=10, y=10, w=190)
    mixed = _parse(bytes(pdf.output()), "mixed.pdf")
    assert mixed.text is not None
    assert mixed.text.startswith("A typed cover letter") and _squash(mixed.text).endswith("TOTAL1234.50")
    assert (mixed.pages, mixed.ocr_pages) == (2, 1) and {line.page for line in mixed.lines} == {1, 2}
    ocr_lines = [line for line in mixed.lines if line.page == 2]  # page 1's lines are its text layer's
    assert mixed.ocr_confidence == pytest.approx(mean_confidence(ocr_lines))

    typed = FPDF()
    typed.set_font("helvetica", size=12)
    typed.add_page()
    typed.multi_cell(w=0, text="Only typed text here, nothing scanned, so nothing is rendered or OCR'd.")
    document = _parse(bytes(typed.output()), "typed.pdf")
    assert (document.pages, document.ocr_pages, document.ocr_confidence) == (1, 0, None)
    assert document.lines and all(line.confidence == 1.0 for line in document.lines)  # text-layer lines


def test_without_the_ocr_extra_images_and_scanned_pdfs_say_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ocr, "ocr_available", lambda: False)
    assert "[ocr] extra" in _error(_encode([_page()], "PNG"), "scan.png", "ocr_unavailable")
    assert "[ocr] extra" in _error(_encode([_page()], "PDF"), "scan.pdf", "pdf_no_text")


# --- refusals -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(10_000, 8_000), (100_000, 100_000)])
def test_a_decompression_bomb_is_refused_from_its_header(size: tuple[int, int], no_ocr: None) -> None:
    """80 Mpx is under Pillow's own warning threshold (89 Mpx), so docroute's limit must catch it; 10 Gpx is over
    Pillow's error threshold, which must still read as the same refusal."""
    error = _error(_png_header(*size), "bomb.png", "image_too_large")
    assert "before decoding" in error


def test_too_many_pages_are_refused_before_any_is_read(no_ocr: None) -> None:
    pages = [_page([(40, 40, f"page {n}")]) for n in range(3)]
    assert "source.max_pages is 2" in _error(_encode(pages, "TIFF"), "long.tiff", "too_many_pages", max_pages=2)
    scan = _encode(pages, "PDF", resolution=200)
    assert "3 of its 3 pages" in _error(scan, "long.pdf", "too_many_pages", max_pages=2)


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("junk.png", b"this is not an image at all, just text with a .png name"),
        ("signature-only.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40),
        ("cut.jpg", _encode([_page()], "JPEG")[:600]),
    ],
)
def test_a_corrupt_image_is_image_corrupt(name: str, data: bytes) -> None:
    _error(data, name, "image_corrupt")


# --- end to end ---------------------------------------------------------------------------------------------


def _job_yaml(source: Path, output: Path) -> str:
    return f"""name: scans
source:
  url: {source}
  max_pages: 3
task:
  classify:
    labels:
      - name: invoice
        description: an invoice or a receipt with amounts, a total and an invoice number
      - name: recipe
        description: a cooking recipe with ingredients, an oven and a pan
small_model:
  engine: llamacpp
  encoder: wordllama
output:
  url: {output}
shard_size: 4
"""


@pytest.mark.usefixtures("prefect_server")
def test_a_run_reads_scans_and_reports_pages_and_ocr_confidence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: None
) -> None:
    from docroute.flows.process import process_documents

    def no_language_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("a language model was loaded for a job that classifies by the bundled encoder")

    monkeypatch.setattr(llama_runtime, "shared_runtime", no_language_model)
    source = tmp_path / "docs"
    source.mkdir()
    (source / "invoice.png").write_bytes(_encode([_page()], "PNG"))
    (source / "invoice.pdf").write_bytes(_encode([_page()], "PDF", resolution=200))
    (source / "bomb.png").write_bytes(_png_header(100_000, 100_000))
    (source / "note.txt").write_text("Whisk two eggs with flour, then bake in the oven for twenty minutes.")
    job = tmp_path / "job.yaml"
    job.write_text(_job_yaml(source, tmp_path / "out"), encoding="utf-8")

    summary = process_documents(str(job))
    assert summary.documents == 4
    written = pl.read_parquet(f"{tmp_path}/out/results/**/*.parquet").to_dicts()
    rows = {Path(row["source_uri"]).name: row for row in written}
    for name in ("invoice.png", "invoice.pdf"):
        row = rows[name]
        assert row["doc_format"] == ("image" if name.endswith("png") else "pdf")
        assert (row["pages"], row["ocr_pages"]) == (1, 1) and row["ocr_confidence"] > 0.9, row
        assert row["label"] == "invoice" and row["route"] != "error", row
    bomb = rows["bomb.png"]
    assert (bomb["route"], bomb["route_outcome"], bomb["error_code"]) == ("error", "unreadable", "image_too_large")
    assert bomb["pages"] is None and bomb["ocr_confidence"] is None
    note = rows["note.txt"]
    assert (note["doc_format"], note["pages"], note["ocr_pages"], note["label"]) == ("txt", None, None, "recipe")


# --- spaces between words (the recogniser's CTC decoding) -------------------------------------------------------


def _columns(*columns: dict[str, float]) -> np.ndarray:
    """Recogniser output for one line: per column, the probability of each named class ("" is the CTC blank)."""
    characters = ["blank", "T", "O", "1", "2", " "]
    preds = np.zeros((1, len(columns), len(characters)), dtype=np.float32)
    for index, column in enumerate(columns):
        for name, probability in column.items():
            preds[0, index, characters.index(name or "blank")] = probability
    return preds


def test_a_space_the_recogniser_saw_but_did_not_pick_is_written() -> None:
    decoder = ocr._SpacedDecoder(["blank", "T", "O", "1", "2", " "], space=5)
    seen = {"": 0.97, " ": 0.02}  # a gap between words: blank wins, the space is a distant second
    unseen = {"": 0.999, " ": 0.001}
    preds = _columns({"T": 0.9}, {"O": 0.9}, seen, {"1": 0.9}, {"1": 0.9}, {"": 0.9}, {"1": 0.8}, unseen, {"2": 0.9})
    [(text, confidence)] = decoder(preds)
    assert text == "TO 112"  # repeats merged, a blank between two 1s keeps both, an unseen space stays out
    assert confidence == pytest.approx(np.mean([0.9, 0.9, 0.9, 0.8, 0.9]))
    [(picked, _)] = decoder(_columns({"T": 0.9}, {" ": 0.6}, seen, {"O": 0.9}))
    assert picked == "T O"  # a space that won its column is not doubled
    assert decoder(_columns({"": 0.9}, {"": 0.9})) == [("", 0.0)]


def test_words_of_a_rendered_pdf_page_keep_their_spaces(no_network: None) -> None:
    document = _parse(_encode([_page()], "PDF", resolution=200), "scan.pdf")
    assert document.text == "ACME Supplies Ltd\nInvoice INV-2041\nTOTAL 1234.50"


# --- text-layer PDFs: PDFium's text, in reading order, with boxes ----------------------------------------------


def _text_pdf(cells: Sequence[tuple[float, float, str]]) -> bytes:
    """A one-page PDF (points, 400 x 300) whose text layer draws each cell at (x, baseline y), in the given order."""
    pdf = FPDF(unit="pt", format=(400, 300))
    pdf.set_font("helvetica", size=12)
    pdf.add_page()
    for x, y, text in cells:
        pdf.text(x, y, text)
    return bytes(pdf.output())


def test_a_text_layer_is_read_in_reading_order_with_boxes_whatever_the_drawing_order() -> None:
    cells = [
        (300, 122, "1234.50"),  # drawn first, and 2 points below its label: still the label's row, after it
        (40, 40, "ACME Supplies Ltd, Main Street 4"),
        (40, 120, "TOTAL DUE"),
        (40, 80, "Invoice INV-2041 of 1 March"),
    ]
    document = _parse(_text_pdf(cells), "typed.pdf")
    assert document.text == "ACME Supplies Ltd, Main Street 4\nInvoice INV-2041 of 1 March\nTOTAL DUE 1234.50"
    assert (document.pages, document.ocr_pages, document.ocr_confidence) == (1, 0, None)
    assert [(line.row, line.column, line.text) for line in document.lines][-2:] == [
        (2, 0, "TOTAL DUE"),
        (2, 1, "1234.50"),
    ]
    scale = ocr.PDF_RENDER_DPI / 72  # boxes in pixels at the resolution a scanned page of the file is rendered at
    amount = document.lines[-1]
    assert (amount.page_width, amount.page_height) == pytest.approx((400 * scale, 300 * scale))
    assert amount.box.x0 == pytest.approx(300 * scale, abs=2 * scale)
    assert amount.box.y0 < 122 * scale < amount.box.y1  # the baseline is inside the box, y from the top
    assert 0.3 < amount.relative_box.y0 < 0.45


def test_without_pdfium_the_text_layer_is_pypdfs_and_has_no_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ocr, "ocr_available", lambda: False)
    document = _parse(_text_pdf([(40, 40, "Only typed text here, long enough to be trusted as text.")]), "typed.pdf")
    assert document.text == "Only typed text here, long enough to be trusted as text." and document.lines == ()


def test_a_pdf_pdfium_cannot_open_falls_back_to_pypdf(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(data: bytes, count: int) -> list[ocr.TextLayerPage]:
        raise ocr.OcrRefusedError(DocumentErrorCode.PDF_CORRUPT, "PDFium cannot open it")

    monkeypatch.setattr(ocr, "pdf_text_layers", refuse)
    document = _parse(_text_pdf([(40, 40, "Typed text that pypdf still reads well enough.")]), "typed.pdf")
    assert document.text == "Typed text that pypdf still reads well enough." and document.lines == ()


# --- the time budget: source.max_ocr_seconds -------------------------------------------------------------------


@pytest.fixture
def slow_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each look at the OCR clock is 100 s later than the one before: time passes without anyone sleeping."""
    ticks = itertools.count(0, 100)
    monkeypatch.setattr(ocr, "_clock", lambda: float(next(ticks)))


def _pages(count: int) -> list[Image.Image]:
    return [_page([(40, 40, f"Page number {n} notes")]) for n in range(1, count + 1)]


def test_when_the_time_budget_runs_out_the_pages_read_are_kept_and_the_rest_counted(slow_clock: None) -> None:
    # started at 0; page 1 starts at 100 (under 150) and is read; page 2 would start at 200: not read
    tiff = _parse(_encode(_pages(3), "TIFF"), "batch.tiff", max_ocr_seconds=150)
    assert tiff.text == "Page number 1 notes"
    assert (tiff.pages, tiff.ocr_pages, tiff.ocr_unread_pages) == (3, 1, 2)
    pdf = _parse(_encode(_pages(3), "PDF", resolution=200), "batch.pdf", max_ocr_seconds=150)
    assert pdf.text is not None and _squash(pdf.text) == "Pagenumber1notes"
    assert (pdf.pages, pdf.ocr_pages, pdf.ocr_unread_pages) == (3, 1, 2)


def test_a_document_the_budget_ends_before_any_text_is_an_ocr_time_limit_row(slow_clock: None, no_ocr: None) -> None:
    for data, uri in ((_encode(_pages(2), "TIFF"), "batch.tiff"), (_encode(_pages(2), "PDF"), "batch.pdf")):
        error = _error(data, uri, "ocr_time_limit", max_ocr_seconds=50)
        assert "source.max_ocr_seconds is 50" in error and "0 page(s) read, 2 page(s)" in error


def test_within_the_budget_nothing_is_left_unread() -> None:
    document = _parse(_encode(_pages(2), "TIFF"), "batch.tiff")
    assert (document.pages, document.ocr_pages, document.ocr_unread_pages) == (2, 2, 0)
    assert "ocr_time_limit" in ERROR_CODES and SourceSpec(url="memory://x").max_ocr_seconds == 300
    with pytest.raises(ValueError, match="max_ocr_seconds"):
        SourceSpec(url="memory://x", max_ocr_seconds=0)


# --- one engine per process, one thread per call ----------------------------------------------------------------


def test_threads_share_one_engine_built_once(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[int] = []
    gate = threading.Barrier(4)

    def slow_build(threads: int) -> object:
        built.append(threads)
        return object()

    monkeypatch.setattr(ocr, "_build_engine", slow_build)
    ocr.reset_engine()
    engines: list[object] = []

    def build() -> None:
        gate.wait()
        engines.append(ocr._engine())

    workers = [threading.Thread(target=build) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    ocr.reset_engine()
    assert built == [ocr.OCR_THREADS] and len({id(engine) for engine in engines}) == 1
    monkeypatch.setattr(ocr, "_build_engine", slow_build)
    assert ocr._engine(3) is ocr._engine(3) is not ocr._engine(1) and built[-2:] == [3, 1]  # one per thread count
    ocr.reset_engine()


def test_each_onnx_session_computes_on_one_thread_and_threads_read_pages_at_once() -> None:
    ocr.reset_engine()
    engine = ocr._engine()
    for session in (engine.text_det.infer.session, engine.text_rec.session.session):  # rapidocr 1.4's attributes
        assert session.get_session_options().intra_op_num_threads == ocr.OCR_THREADS == 1
    assert SourceSpec(url="memory://x").ocr_threads == 1
    with pytest.raises(ValueError, match="ocr_threads"):
        SourceSpec(url="memory://x", ocr_threads=0)
    image = _page()
    results: list[str] = []

    def read() -> None:
        results.append(lines_text(ocr.ocr_image(image, page=1).lines))

    workers = [threading.Thread(target=read) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert results == ["ACME Supplies Ltd\nInvoice INV-2041\nTOTAL 1234.50"] * 3


def test_a_partly_read_document_says_so_in_its_row(tmp_path: Path, slow_clock: None) -> None:
    from docroute.schemas.documents import DocumentRef
    from docroute.schemas.outcomes import RouteOutcome
    from docroute.schemas.rows import rows_to_table
    from docroute.schemas.spec import JobSpec
    from docroute.tasks.answer.outcome import base_row
    from docroute.tasks.ingest.read import read_documents

    path = tmp_path / "batch.tiff"
    path.write_bytes(_encode(_pages(3), "TIFF"))
    source = SourceSpec(url=str(tmp_path), max_ocr_seconds=150)
    [document] = read_documents(source, [DocumentRef(str(path), str(path), path.stat().st_size, None)])
    assert document.ok and (document.pages, document.ocr_pages, document.ocr_unread_pages) == (3, 1, 2)
    spec = JobSpec.model_validate(
        {
            "name": "partly-read",
            "source": {"url": str(tmp_path)},
            "task": {"instructions": "Scans.", "classify": {"labels": [{"name": "a"}, {"name": "b"}]}},
            "small_model": {"engine": "llamacpp"},
            "output": {"url": str(tmp_path / "out")},
        }
    )
    row = base_row(
        document, spec_hash="h", run_id="r", router_version=None, route="small", reason="x", outcome=RouteOutcome.KEPT
    )
    table = rows_to_table([row], spec)
    assert table.column("ocr_unread_pages").to_pylist() == [2] and table.column("ocr_pages").to_pylist() == [1]
