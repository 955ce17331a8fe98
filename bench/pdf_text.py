"""PDF text layers: pypdf against PDFium (pypdfium2) on receipts, character error rate and time per page.

    python bench/pdf_text.py [--receipts 50] [--seed 0] [--no-append]

Issue 18 asked to compare PDFium's text layer with the pypdf extraction docroute had, and keep the better. Receipts
come from the SROIE train split in ../shared/datasets/sroie (read at run time, never copied, as in bench/ocr.py):
each receipt's lines are written as real PDF text (fpdf2, Helvetica sized to each box's height) at their boxes on a
page of the receipt's size, so the file has a text layer and no image. The reference is the same lines in reading
order (`tasks/ingest/layout.py` from their true boxes). Compared, on the same bytes:

* pypdf `extract_text()`, docroute's extraction before this benchmark;
* pypdf `extract_text(extraction_mode="layout")`, its positional mode;
* PDFium `get_text_range()`, the page's text in its drawing order;
* PDFium text runs in reading order (`tasks/ingest/ocr.py pdf_text_layers`), which also gives each line its box.

CER is the edit distance over the reference's length, also ignoring spaces and line breaks (what is left is which
characters were read). Each receipt's lines are written in a shuffled order, as a PDF's drawing order need not be
its reading order (a right-aligned amount drawn before its label); `--in-order` writes them top to bottom instead.
Results: a Markdown table on stdout, bench/results/pdf_text/results.{md,json}, appended to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import random
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ocr import SROIE, Receipt, edit_distance, load_receipts, reference  # bench/ocr.py
from publish import machine_line, publish  # bench/publish.py

RESULTS = Path(__file__).resolve().parent / "results" / "pdf_text"
MARGIN = 40


def text_pdf(receipt: Receipt, *, shuffle: random.Random | None) -> bytes:
    """The receipt as a one-page PDF whose text layer holds every line at its box (1 pixel = 1 point)."""
    from fpdf import FPDF

    width = max(box[2] for box, _ in receipt.lines) + MARGIN
    height = max(box[3] for box, _ in receipt.lines) + MARGIN
    pdf = FPDF(unit="pt", format=(width, height))
    pdf.set_auto_page_break(False)
    pdf.add_page()
    lines = list(receipt.lines)
    if shuffle is not None:
        shuffle.shuffle(lines)
    for (x0, _y0, _x1, y1), text in lines:
        size = max(4.0, min(60.0, (y1 - _y0) * 0.8))
        pdf.set_font("helvetica", size=size)
        pdf.text(x0, y1 - (y1 - _y0) * 0.2, text.encode("latin-1", "replace").decode("latin-1"))
    return bytes(pdf.output())


def pypdf_plain(data: bytes) -> str:
    from pypdf import PdfReader

    return "\n\n".join(page.extract_text() or "" for page in PdfReader(io.BytesIO(data)).pages)


def pypdf_layout(data: bytes) -> str:
    from pypdf import PdfReader

    pages = PdfReader(io.BytesIO(data)).pages
    return "\n\n".join(page.extract_text(extraction_mode="layout") or "" for page in pages)


def pdfium_range(data: bytes) -> str:
    import pypdfium2 as pdfium

    document = pdfium.PdfDocument(data)
    try:
        texts = []
        for page in document:
            textpage = page.get_textpage()
            texts.append(textpage.get_text_range())
            textpage.close()
        return "\n\n".join(texts).replace("\r\n", "\n")
    finally:
        document.close()


def pdfium_lines(data: bytes) -> str:
    from docroute.tasks.ingest.ocr import pdf_text_layers

    return "\n\n".join(page.text for page in pdf_text_layers(data, 10_000))


METHODS: dict[str, tuple[str, Callable[[bytes], str]]] = {
    "pypdf": ("pypdf `extract_text()` (before)", pypdf_plain),
    "pypdf_layout": ('pypdf `extract_text(extraction_mode="layout")`', pypdf_layout),
    "pdfium_range": ("PDFium `get_text_range()`", pdfium_range),
    "pdfium_lines": ("PDFium text runs in reading order (`pdf_text_layers`, the default now)", pdfium_lines),
}


def squash(text: str) -> str:
    return "".join(text.split())


def run(receipts: list[Receipt], *, in_order: bool, seed: int) -> dict[str, dict[str, float]]:
    shuffle = None if in_order else random.Random(seed)
    files = [(text_pdf(receipt, shuffle=shuffle), reference(receipt)) for receipt in receipts]
    results: dict[str, dict[str, float]] = {}
    for name, (_label, extract) in METHODS.items():
        extract(files[0][0])  # imports and first-call set-up outside the timing
        errors = errors_squashed = chars = chars_squashed = 0
        seconds = 0.0
        for data, truth in files:
            started = time.perf_counter()
            text = extract(data)
            seconds += time.perf_counter() - started
            errors += edit_distance(truth, text.strip())
            chars += len(truth)
            errors_squashed += edit_distance(squash(truth), squash(text))
            chars_squashed += len(squash(truth))
        results[name] = {
            "pages": len(files),
            "cer": errors / max(chars, 1),
            "cer_ignoring_whitespace": errors_squashed / max(chars_squashed, 1),
            "ms_per_page": 1000 * seconds / len(files),
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--receipts", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--in-order", action="store_true", help="draw the lines top to bottom, not shuffled")
    parser.add_argument("--no-append", action="store_true", help="do not append the table to BENCHMARKS.md")
    args = parser.parse_args()
    if not SROIE.is_dir():
        sys.exit(f"SROIE not found at {SROIE}")
    receipts = load_receipts(args.receipts, args.seed)
    load_before = os.getloadavg()[0]
    results = run(receipts, in_order=args.in_order, seed=args.seed)
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "date": datetime.now(UTC).date().isoformat(),
    }
    order = " --in-order" if args.in_order else ""
    command = f"python bench/pdf_text.py --receipts {args.receipts} --seed {args.seed}{order}"
    rows = [
        "| text layer read by | pages | CER | CER ignoring whitespace | ms / page |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, (label, _extract) in METHODS.items():
        r = results[name]
        rows.append(
            f"| {label} | {r['pages']} | {r['cer']:.3f} | {r['cer_ignoring_whitespace']:.3f} | {r['ms_per_page']:.1f} |"
        )
    drawn = "top to bottom" if args.in_order else "in a shuffled order"
    table = (
        machine_line(info, command)
        + f" Lines drawn {drawn}. Load average {load_before:.1f} (other work shared the cores).\n\n"
        + "\n".join(rows)
        + "\n"
    )
    print(table)
    payload = {"machine": info, "in_order": args.in_order, "load_average": load_before, **results}
    publish(RESULTS, "PDF text layers: pypdf and PDFium on SROIE receipts", table, payload, append=not args.no_append)


if __name__ == "__main__":
    main()
