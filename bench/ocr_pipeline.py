"""The pipeline around OCR: a real run over scanned receipts, and how much of it is OCR.

    python bench/ocr_pipeline.py [--receipts 20] [--seed 0] [--workers 1 2] [--no-append]

SROIE receipts (../shared/datasets/sroie, read at run time, never copied) are drawn as PNGs by bench/ocr.py `draw`
into a temporary folder, and the real flow, `docroute.flows.process.process_documents`, runs over them once per
`runner.max_workers` value, each time into a new output, in this process. The small model is replaced by
bench/memory_flat.py's null engine (the model's cost is not the question here); everything else is real: listing,
state, plan, reading, OCR, reading order, rows, Parquet, ledger, manifest, the Delta table, Prefect task runs.

Measured per run: wall time of the flow (the ephemeral Prefect API started beforehand), pages per second, and the
seconds spent inside `tasks/ingest/ocr.py ocr_image` summed over every page (instrumented in place). With one
worker, OCR and the rest take turns on one thread, so `1 - OCR seconds / flow seconds` is the share of the run
that is not OCR: the pipeline's overhead around it. With two, pages/s is the throughput of the machine's two cores.
Peak RSS of this process is reported once (after all runs). Results: a Markdown table on stdout,
bench/results/ocr/pipeline.{md,json}, appended to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory_flat import NullEngine, _start_prefect_server  # bench/memory_flat.py
from ocr import RESULTS, SROIE, draw, load_receipts  # bench/ocr.py
from publish import append_to_benchmarks, machine_info, machine_line

JOB = """name: bench-ocr-pipeline
source:
  url: {source}
  glob: "*.png"
task:
  instructions: Receipts.
  classify:
    labels:
      - name: receipt
        description: a shop receipt
      - name: other
        description: anything else
small_model:
  engine: llamacpp   # never loaded: replaced by the null engine
routing:
  threshold: 0.8
output:
  url: {output}
shard_size: 4
runner:
  max_workers: {workers}
"""


class OcrClock:
    """Seconds spent in `ocr_image`, summed over every call on every thread."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.pages = 0
        self._lock = threading.Lock()

    def wrap(self, function: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                with self._lock:
                    self.seconds += time.perf_counter() - started
                    self.pages += 1

        return timed


def run_flow(folder: Path, output: Path, workers: int) -> dict[str, float]:
    from docroute.flows.process import process_documents
    from docroute.tasks import shard
    from docroute.tasks.ingest import ocr
    from docroute.tasks.model import infer

    engine = NullEngine("receipt")
    shard.small_engine = infer.small_engine = lambda *_args, **_kwargs: engine
    clock = OcrClock()
    original = ocr.ocr_image
    ocr.ocr_image = clock.wrap(original)
    try:
        job = folder.parent / f"job-{workers}.yaml"
        job.write_text(JOB.format(source=folder, output=output, workers=workers), encoding="utf-8")
        started = time.perf_counter()
        summary = process_documents(str(job))
        seconds = time.perf_counter() - started
    finally:
        ocr.ocr_image = original
    if engine.requests != summary.listed:
        raise SystemExit(f"the null engine answered {engine.requests} of {summary.listed} documents")
    return {
        "workers": workers,
        "documents": summary.listed,
        "flow_seconds": seconds,
        "pages_per_second": clock.pages / seconds,
        "ocr_seconds": clock.seconds,
        "ocr_pages": clock.pages,
        "not_ocr_share": max(0.0, 1 - clock.seconds / seconds) if workers == 1 else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--receipts", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--no-append", action="store_true", help="do not append the table to BENCHMARKS.md")
    args = parser.parse_args()
    if not SROIE.is_dir():
        sys.exit(f"SROIE not found at {SROIE}")
    from PIL import Image

    from docroute.tasks.ingest import ocr

    ocr.ocr_image(Image.new("RGB", (64, 64), "white"), page=1)  # models loaded outside the timing
    _start_prefect_server()
    load_before = os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory(prefix="docroute-ocr-pipeline-") as scratch:
        folder = Path(scratch) / "scans"
        folder.mkdir()
        for receipt in load_receipts(args.receipts, args.seed):
            (folder / f"{receipt.name}.png").write_bytes(draw(receipt))
        for workers in args.workers:
            results.append(run_flow(folder, Path(scratch) / f"out-{workers}", workers))
    load_after = os.getloadavg()[0]
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    info = machine_info()
    command = f"python bench/ocr_pipeline.py --receipts {args.receipts} --seed {args.seed}"
    rows = [
        "| runner.max_workers | documents (pages) | flow s | pages / s | OCR s (summed) | share of the run not OCR |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        share = "—" if r["workers"] != 1 else f"{r['not_ocr_share']:.1%}"
        rows.append(
            f"| {r['workers']} | {r['documents']} ({r['ocr_pages']}) | {r['flow_seconds']:.1f} | "
            f"{r['pages_per_second']:.2f} | {r['ocr_seconds']:.1f} | {share} |"
        )
    table = (
        machine_line(info, command)
        + f" Load average {load_before:.1f} before, {load_after:.1f} after. Peak RSS {peak_mib:,.0f} MiB (this"
        " process: flow, OCR engine; the Prefect API server apart).\n\n" + "\n".join(rows) + "\n"
    )
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pipeline.md").write_text(f"# OCR in the pipeline\n\n{table}", encoding="utf-8")
    payload = {"machine": info, "load_average": [load_before, load_after], "peak_rss_mib": peak_mib, "runs": results}
    (RESULTS / "pipeline.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    if not args.no_append:
        append_to_benchmarks("OCR in the pipeline: scanned receipts through a real run", table)


if __name__ == "__main__":
    main()
