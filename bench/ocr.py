"""OCR on receipts: character error rate and pages per second of the bundled OCR, as images and as scanned PDFs.

    python bench/ocr.py [--receipts 20] [--seed 0] [--no-append]

Receipts come from the SROIE train split in ../shared/datasets/sroie (read at run time, never copied): each receipt's
OCR lines are drawn at their boxes on a white page (Pillow's bundled font, sized to each box's height), then read
back through `parse_document` twice: as a PNG, and as an image-only PDF of the same page (rendered by PDFium at
200 dpi, the page's own resolution). The reference is the same lines put in reading order by
`tasks/ingest/layout.py` from their true boxes, so the error counts what OCR missed or misread, not the layout rule.
CER is the edit distance over the reference's length; "CER ignoring spaces" removes spaces from both first,
because the recogniser used to drop spaces between words (half the errors before `ocr._SpacedDecoder`). `--threads
PAGES` instead measures pages per second with onnxruntime's default thread pools and with one thread per session,
read by one caller and by `--workers` callers at once. Throughput is OCR'd pages per second in this
one process (the engine loaded beforehand), with the machine's load average beside it: on a shared machine it is
what was measured, not a bound. Extraction accuracy per field against the same receipts as text:
bench/ocr_extraction.py.
Results: a Markdown table on stdout, bench/results/ocr/results.{md,json}, appended to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from publish import machine_info, machine_line, publish  # bench/publish.py

ROOT = Path(__file__).resolve().parent.parent
SROIE = ROOT.parent / "shared" / "datasets" / "sroie" / "train" / "box"
RESULTS = ROOT / "bench" / "results" / "ocr"
MARGIN = 40


@dataclass(frozen=True)
class Receipt:
    name: str
    lines: list[tuple[tuple[float, float, float, float], str]]


def load_receipts(count: int, seed: int) -> list[Receipt]:
    """`count` receipts of the split, drawn with a fixed seed; each line is a box and its text."""
    files = sorted(SROIE.glob("*.csv"))
    random.Random(seed).shuffle(files)
    receipts = []
    for path in files[:count]:
        lines = []
        for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
            parts = raw.split(",", 8)
            if len(parts) < 9 or not parts[8].strip():
                continue
            xs, ys = [float(v) for v in parts[0:8:2]], [float(v) for v in parts[1:8:2]]
            lines.append(((min(xs), min(ys), max(xs), max(ys)), parts[8].strip()))
        receipts.append(Receipt(path.stem, lines))
    return receipts


def draw(receipt: Receipt, *, fit_width: bool = False) -> bytes:
    """The receipt as a PNG: every line's text at its box, in a font as tall as most of the box; with `fit_width`,
    also shrunk until it is no wider than the box (so a wide label does not run into the amount beside it)."""
    from PIL import Image, ImageDraw, ImageFont

    width = int(max(box[2] for box, _ in receipt.lines)) + MARGIN
    height = int(max(box[3] for box, _ in receipt.lines)) + MARGIN
    page = Image.new("L", (width, height), 255)
    pen = ImageDraw.Draw(page)
    fonts: dict[int, ImageFont.FreeTypeFont | ImageFont.ImageFont] = {}
    for (x0, y0, x1, y1), text in receipt.lines:
        size = max(10, min(60, round((y1 - y0) * 0.8)))
        font = fonts.setdefault(size, ImageFont.load_default(size=size))
        while fit_width and size > 8 and font.getlength(text) > max(x1 - x0, 1):
            size -= 1
            font = fonts.setdefault(size, ImageFont.load_default(size=size))
        pen.text((x0, y0), text, font=font, fill=0)
    buffer = io.BytesIO()
    page.save(buffer, "PNG")
    return buffer.getvalue()


def as_pdf(png: bytes) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.open(io.BytesIO(png)).save(buffer, "PDF", resolution=200)
    return buffer.getvalue()


def reference(receipt: Receipt) -> str:
    from docroute.tasks.ingest.layout import Box, OcrLine, lines_text, reading_order

    lines = [OcrLine(text, Box(*box), 1.0) for box, text in receipt.lines]
    return lines_text(reading_order(lines, page=1, width=1.0, height=1.0))


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance, two rows at a time."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def run(receipts: list[Receipt]) -> dict[str, dict[str, float]]:
    from docroute.schemas.spec import SourceSpec
    from docroute.tasks.ingest import ocr
    from docroute.tasks.ingest.parse import parse_document

    source = SourceSpec(url="memory://bench")
    from PIL import Image

    ocr.ocr_image(Image.new("RGB", (64, 64), "white"), page=1)  # load the models outside the timing
    results: dict[str, dict[str, float]] = {}
    for variant in ("png", "pdf"):
        errors = errors_nospace = chars = chars_nospace = 0
        seconds = 0.0
        failed = 0
        for receipt in receipts:
            png = draw(receipt)
            data = png if variant == "png" else as_pdf(png)
            started = time.perf_counter()
            document = parse_document(data, uri=f"{receipt.name}.{variant}", source=source)[0]
            seconds += time.perf_counter() - started
            truth = reference(receipt)
            text = document.text or ""
            failed += document.text is None
            errors += edit_distance(truth, text)
            chars += len(truth)
            squash_truth, squash_text = truth.replace(" ", ""), text.replace(" ", "")
            errors_nospace += edit_distance(squash_truth, squash_text)
            chars_nospace += len(squash_truth)
        results[variant] = {
            "receipts": len(receipts),
            "failed": failed,
            "cer": errors / max(chars, 1),
            "cer_ignoring_spaces": errors_nospace / max(chars_nospace, 1),
            "seconds_per_page": seconds / len(receipts),
            "pages_per_second": len(receipts) / seconds,
        }
    return results


def threads_comparison(receipts: list[Receipt], workers: int) -> dict[str, dict[str, float]]:
    """Pages per second with one thread per core in each ONNX session (onnxruntime's default) and with one.

    Each setting reads the receipts' PNGs twice: one after another in one thread, then split over `workers` threads
    calling the one shared engine at once, as the shards of a threads run do.
    """
    from concurrent.futures import ThreadPoolExecutor

    from docroute.schemas.spec import SourceSpec
    from docroute.tasks.ingest import ocr
    from docroute.tasks.ingest.parse import parse_document

    pages = [draw(receipt) for receipt in receipts]
    cores = os.cpu_count() or 1
    results: dict[str, dict[str, float]] = {}
    try:
        for label, threads in ((f"{cores} (one per core: onnxruntime's default)", cores), ("1 (docroute's)", 1)):
            source = SourceSpec(url="memory://bench", ocr_threads=threads)

            def read(png: bytes, source: SourceSpec = source) -> None:
                parse_document(png, uri="receipt.png", source=source)

            ocr.reset_engine()
            read(pages[0])  # load the models outside the timing
            started = time.perf_counter()
            for png in pages:
                read(png)
            serial = time.perf_counter() - started
            started = time.perf_counter()
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(read, pages))
            parallel = time.perf_counter() - started
            results[label] = {
                "pages": len(pages),
                "serial_pages_per_second": len(pages) / serial,
                "parallel_pages_per_second": len(pages) / parallel,
                "load_average": os.getloadavg()[0],
            }
    finally:
        ocr.reset_engine()
    return results


def threads_table(results: dict[str, dict[str, float]], workers: int) -> str:
    rows = [
        f"| source.ocr_threads | pages | pages / s, 1 caller | pages / s, {workers} callers at once | load |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, r in results.items():
        rows.append(
            f"| {label} | {r['pages']} | {r['serial_pages_per_second']:.2f} | {r['parallel_pages_per_second']:.2f} | "
            f"{r['load_average']:.1f} |"
        )
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--receipts", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-append", action="store_true", help="do not append the table to BENCHMARKS.md")
    parser.add_argument(
        "--threads", type=int, default=0, metavar="PAGES", help="instead: pages/s by onnxruntime threads on PAGES pages"
    )
    parser.add_argument("--workers", type=int, default=2, help="with --threads: threads reading pages at once")
    args = parser.parse_args()
    if not SROIE.is_dir():
        sys.exit(f"SROIE not found at {SROIE}")
    if args.threads:
        threads_main(args)
        return
    receipts = load_receipts(args.receipts, args.seed)
    load_before = os.getloadavg()[0]
    results = run(receipts)
    load_after = os.getloadavg()[0]
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    info = machine_info()
    command = f"python bench/ocr.py --receipts {args.receipts} --seed {args.seed}"
    rows = [
        "| input | receipts | CER | CER ignoring spaces | s / page | pages / s | failed |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for variant, label in (("png", "PNG image"), ("pdf", "image-only PDF (PDFium, 200 dpi)")):
        r = results[variant]
        rows.append(
            f"| {label} | {r['receipts']} | {r['cer']:.3f} | {r['cer_ignoring_spaces']:.3f} | "
            f"{r['seconds_per_page']:.2f} | {r['pages_per_second']:.2f} | {r['failed']} |"
        )
    table = (
        machine_line(info, command)
        + f" Load average {load_before:.1f} before, {load_after:.1f} after (other work shared the cores)."
        + f" Peak RSS {peak_mib:,.0f} MiB.\n\n"
        + "\n".join(rows)
        + "\n"
    )
    print(table)
    payload = {"machine": info, "load_average": [load_before, load_after], "peak_rss_mib": peak_mib, **results}
    publish(RESULTS, "OCR on SROIE receipts drawn from their boxes", table, payload, append=not args.no_append)


def threads_main(args: argparse.Namespace) -> None:
    load_before = os.getloadavg()[0]
    results = threads_comparison(load_receipts(args.threads, args.seed), args.workers)
    info = machine_info()
    command = f"python bench/ocr.py --threads {args.threads} --workers {args.workers} --seed {args.seed}"
    table = (
        machine_line(info, command)
        + f" Load average {load_before:.1f} before (other work shared the cores).\n\n"
        + threads_table(results, args.workers)
    )
    print(table)
    payload = {"machine": info, "workers": args.workers, **results}
    title = "OCR threads: onnxruntime pools per session"
    publish(RESULTS / "threads", title, table, payload, append=not args.no_append)


if __name__ == "__main__":
    main()
