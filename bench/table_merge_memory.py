"""Memory of one current-table merge against the table's size: delta-rs's MERGE versus docroute's own Delta files.

    python bench/table_merge_memory.py [--sizes 10000 100000 300000] [--fraction 0.1] [--no-append]

For each size N a Delta table of N rows with the shape of a docroute current table (doc_id, provenance strings,
an answer label and fields, confidences, UTC timestamps, `deleted_at`) is written, and a source of N x fraction
rows (the changed documents: every k-th doc_id with new values) is saved as Parquet. Then each way of merging it
runs in a FRESH subprocess (a process's peak RSS never goes down), which samples its own RSS every few
milliseconds and reports the peak over its RSS just before the merge (libraries already imported, table opened):

- `delta-rs MERGE`: `DeltaTable.merge(...).when_matched_update_all().when_not_matched_insert_all()`, the source
  streamed in batches of 256 rows, with row groups of 16,384 rows (what docroute used before);
- `docroute`: `tasks/store/table.py DeltaCurrentTable.merge`, the files written by `tasks/store/delta_files.py`.

Both produce the same table (checked: row count and the changed rows' values). Results: a Markdown table on stdout,
bench/results/table_merge/results.{md,json}, appended to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from publish import machine_info, machine_line, publish  # bench/publish.py

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "table_merge"
WAYS = ("delta-rs MERGE", "docroute")


def _table(start: int, stop: int, step: int, label: str):
    import pyarrow as pa

    from docroute.schemas.rows import UTC_MICROS

    ids = list(range(start, stop, step))
    now = datetime(2026, 12, 1, tzinfo=UTC)
    text = [f"s3://bucket/source/folder-{i // 1000:05d}/document-{i:09d}.pdf" for i in ids]
    return pa.table(
        {
            "doc_id": [f"{i:016x}" for i in ids],
            "source_uri": text,
            "run_id": [f"run-{label}-0123456789abcdef"] * len(ids),
            "run_date": [now.date()] * len(ids),
            "doc_format": ["pdf"] * len(ids),
            "route": ["small"] * len(ids),
            "route_outcome": ["kept"] * len(ids),
            "route_reason": [f"confidence 0.9{i % 10} at or above the certified threshold 0.87" for i in ids],
            "label": [f"label-{label}-{i % 77}" for i in ids],
            "company": [f"Company number {i % 5000} Sdn Bhd" for i in ids],
            "total": [float(i % 10_000) / 100 for i in ids],
            "address": [f"{i % 999} Jalan Example, Taman {i % 321}, 81100 Johor Bahru" for i in ids],
            "confidence": [0.5 + (i % 50) / 100 for i in ids],
            "small_cost_usd": [0.00001] * len(ids),
            "processed_at": pa.array([now] * len(ids), UTC_MICROS),
            "deleted_at": pa.array([None] * len(ids), UTC_MICROS),
        }
    )


def _rss_mib() -> float:
    with Path("/proc/self/status").open(encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return 0.0


def child(way: str, work: Path) -> None:
    """Merge `work/source.parquet` into a copy of `work/table` one way; print the peak RSS over the start."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from deltalake import DeltaTable, WriterProperties

    from docroute.schemas.spec import OutputSpec
    from docroute.tasks.store.table import Commit, DeltaCurrentTable

    output = OutputSpec(url=str(work / "out"))
    target = Path(output.layout.current_table())
    shutil.rmtree(work / "out", ignore_errors=True)
    shutil.copytree(work / "table", target)
    source = pq.ParquetFile(work / "source.parquet")
    reader = pa.RecordBatchReader.from_batches(source.schema_arrow, source.iter_batches(batch_size=256))
    changed = pq.read_table(work / "source.parquet", columns=["doc_id"])["doc_id"].combine_chunks()
    table = DeltaTable(str(target)) if way == "delta-rs MERGE" else DeltaCurrentTable(output)
    peak = [_rss_mib()]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.003)

    threading.Thread(target=sample, daemon=True).start()
    time.sleep(0.05)
    before = _rss_mib()
    peak[0] = before
    started = time.perf_counter()
    if way == "delta-rs MERGE":
        assert isinstance(table, DeltaTable)
        table.merge(
            reader,
            predicate="t.doc_id = s.doc_id",
            source_alias="s",
            target_alias="t",
            writer_properties=WriterProperties(max_row_group_size=16_384),
        ).when_matched_update_all().when_not_matched_insert_all().execute()
    else:
        assert isinstance(table, DeltaCurrentTable)
        table.merge(reader, changed, Commit("bench", 2, "bench"))
    seconds = time.perf_counter() - started
    stop.set()
    rows = DeltaTable(str(target)).to_pyarrow_dataset()
    merged = rows.count_rows()
    relabelled = rows.count_rows(filter=pa.compute.field("label").cast(pa.string()).isin(_labels("new")))
    print(json.dumps({"peak_mib": peak[0] - before, "seconds": seconds, "rows": merged, "changed": relabelled}))


def _labels(label: str) -> list[str]:
    return [f"label-{label}-{i}" for i in range(77)]


def measure(size: int, fraction: float, scratch: Path) -> dict[str, dict[str, float]]:
    import pyarrow.parquet as pq
    from deltalake import Schema
    from deltalake.transaction import create_table_with_add_actions
    from fsspec.implementations.local import LocalFileSystem

    from docroute.tasks.store.delta_files import DeltaFileWriter

    work = scratch / f"n{size}"
    (work / "table").mkdir(parents=True)
    rows = _table(0, size, 1, "old")
    written = DeltaFileWriter(LocalFileSystem(), str(work / "table"), rows.schema, 128 * 2**20).write(rows.to_batches())
    create_table_with_add_actions(
        str(work / "table"), Schema.from_arrow(rows.schema), [f.add_action() for f in written], mode="error"
    )
    step = max(1, round(1 / fraction))
    source = _table(0, size, step, "new")
    pq.write_table(source, work / "source.parquet")
    del rows
    found: dict[str, dict[str, float]] = {}
    for way in WAYS:
        run = subprocess.run(
            [sys.executable, __file__, "--child", way, "--work", str(work)], capture_output=True, text=True, check=False
        )
        if run.returncode != 0:
            raise SystemExit(f"N={size} {way}: failed\n{run.stderr[-3000:]}")
        result = json.loads(run.stdout.strip().splitlines()[-1])
        if result["rows"] != size or result["changed"] != source.num_rows:
            raise SystemExit(f"N={size} {way}: wrong table {result} (want {size} rows, {source.num_rows} changed)")
        found[way] = result
        print(f"N={size:,} {way}: +{result['peak_mib']:.0f} MiB in {result['seconds']:.2f} s", file=sys.stderr)
    shutil.rmtree(work)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 300_000])
    parser.add_argument("--fraction", type=float, default=0.1, help="share of the documents the merge changes")
    parser.add_argument("--no-append", action="store_true", help="do not append to BENCHMARKS.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.work)
        return
    with tempfile.TemporaryDirectory(prefix="docroute-merge-bench-") as scratch:
        results = {size: measure(size, args.fraction, Path(scratch)) for size in args.sizes}
    header = "| N documents | changed | " + " | ".join(f"{w}: peak MiB over start | {w}: s" for w in WAYS) + " |"
    lines = [header, "|" + "---:|" * (2 + 2 * len(WAYS))]
    for size, found in results.items():
        cells = " | ".join(f"+{found[w]['peak_mib']:.0f} | {found[w]['seconds']:.2f}" for w in WAYS)
        lines.append(f"| {size:,} | {round(size * args.fraction):,} | {cells} |")
    command = "python bench/table_merge_memory.py --sizes " + " ".join(map(str, args.sizes))
    info = machine_info()
    table = "\n".join(
        [
            f"{machine_line(info, command)} One merge of {args.fraction:.0%} of the documents into a table of N rows"
            " shaped like docroute's, each way in a fresh process; peak RSS over the process just before the merge.",
            "",
            *lines,
        ]
    )
    print(table)
    payload = {"info": info, "sizes": args.sizes, "fraction": args.fraction, "results": results}
    publish(RESULTS, "Current-table merge: peak memory against table size", table, payload, append=not args.no_append)


if __name__ == "__main__":
    main()
