"""File counts before and after `docroute compact`, and its wall time, for an output written in many small shards.

    python bench/compaction.py [--documents 10000] [--shard-size 32] [--format delta|iceberg] [--out DIR]

Three real runs of the flow (`process_documents`, the small model replaced by bench/memory_flat.py's NullEngine:
the files are what matters here, not the answers) over N short documents in shards of `--shard-size`: all N new;
then 5% changed and 5% added; then 2% deleted. Then the compaction flow (`compact_output`, retention 0 so replaced
parts go at once, and again with the default 7 days to show what stays for readers). Measured: committed parts
(what the `results` view and warehouses read) and Parquet files under `results/` before and after, the current
table's files, wall time of the compaction flow; checked: the current rows, the history's row count and the
table's rows are the same after as before. `--format iceberg` keeps the current table as Iceberg (the default
SQLite catalog) instead of Delta. Results: Markdown on stdout and in `<out>/results.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from memory_flat import LABELS, SENTENCES, NullEngine  # noqa: E402


def _job(source: Path, output: Path, shard_size: int, table_format: str = "delta") -> str:
    labels = "\n".join(f"      - {{name: {label}, description: texts about {label}}}" for label in LABELS)
    return f"""name: compaction-bench
source:
  url: {source}
task:
  instructions: Short news and recipe snippets.
  classify:
    labels:
{labels}
small_model:
  engine: llamacpp
  encoder: wordllama
  classify_strategy: similarity
output:
  url: {output}
  table: {{format: {table_format}}}
shard_size: {shard_size}
runner: {{max_workers: 2}}
"""


def _write(source: Path, index: int, note: str = "") -> None:
    folder = source / f"{index // 1000:03d}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"doc-{index:06d}.txt").write_text(f"{SENTENCES[index % len(SENTENCES)]} ({index}){note}\n")


def _patch_model() -> NullEngine:
    from docroute.tasks import shard
    from docroute.tasks.model import infer

    engine = NullEngine(LABELS[0])
    shard.small_engine = lambda _spec, _head=None: engine  # type: ignore[assignment]
    infer.small_engine = lambda _spec, _head=None: engine  # type: ignore[assignment]
    return engine


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=10_000)
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--format", choices=("delta", "iceberg"), default="delta", help="the current table's format")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/compaction[-iceberg]")
    args = parser.parse_args()
    suffix = "-iceberg" if args.format == "iceberg" else ""
    args.out = args.out or ROOT / "bench" / "results" / f"compaction{suffix}"

    import polars as pl
    from deltalake import DeltaTable

    from docroute.flows.compact import compact_output
    from docroute.flows.process import process_documents
    from docroute.schemas.load import load_job
    from docroute.tasks.account.views import open_views
    from docroute.tasks.store.compact import count_results_files
    from docroute.tasks.store.current import committed_parts, current_rows
    from docroute.tasks.store.iceberg_table import IcebergCurrentTable, read_iceberg_table

    _patch_model()
    n = args.documents
    with tempfile.TemporaryDirectory(prefix="docroute-compaction-") as tmp:
        source, output = Path(tmp) / "docs", Path(tmp) / "out"
        job = Path(tmp) / "job.yaml"
        job.write_text(_job(source, output, args.shard_size, args.format))
        for i in range(n):
            _write(source, i)
        runs = []
        started = time.perf_counter()
        runs.append(process_documents(str(job)))
        for i in range(0, n, 20):  # 5% changed
            _write(source, i, " (edited)")
        for i in range(n, n + n // 20):  # 5% added
            _write(source, i)
        runs.append(process_documents(str(job)))
        for i in range(1, n, 50):  # 2% deleted
            (source / f"{i // 1000:03d}" / f"doc-{i:06d}.txt").unlink()
        runs.append(process_documents(str(job)))
        runs_seconds = time.perf_counter() - started
        spec = load_job(job)

        def table_rows() -> int:
            if args.format == "delta":
                return DeltaTable(spec.output.layout.current_table()).to_pyarrow_table().num_rows
            read = read_iceberg_table(spec)
            return read[0].num_rows if read else 0

        def table_files() -> int:
            if args.format == "delta":
                return len(DeltaTable(spec.output.layout.current_table()).file_uris())
            table = IcebergCurrentTable(spec)
            try:
                return table.data_files()
            finally:
                table.close()

        def seen() -> tuple[pl.DataFrame, int, int]:
            current = current_rows(spec.output, include_deleted=True).sort("doc_id")
            history = open_views(spec).execute("SELECT count(*) FROM results").fetchone()
            return current, int(history[0]) if history else 0, table_rows()

        before = seen()
        parts_before, files_before = len(committed_parts(spec.output)), count_results_files(spec.output)
        table_files_before = table_files()
        timed = time.perf_counter()
        kept = compact_output(str(job))  # default retention: replaced parts stay 7 days for readers part-way
        seconds = time.perf_counter() - timed
        files_kept = count_results_files(spec.output)
        assert seen()[1:] == before[1:] and seen()[0].equals(before[0]), "compaction changed what readers see"
        purge = compact_output(str(job), retention_hours=0)  # nothing left to rewrite; the replaced parts go
        after = seen()
        assert before[0].equals(after[0]) and before[1:] == after[1:], "compaction changed what readers see"
        rows = {
            "date": datetime.now(UTC).date().isoformat(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}, Python "
            f"{platform.python_version()}",
            "documents": n,
            "table_format": args.format,
            "shard_size": args.shard_size,
            "runs": len(runs),
            "runs_seconds": round(runs_seconds, 1),
            "history_rows": before[1],
            "current_rows": before[0].height,
            "committed_parts_before": parts_before,
            "committed_parts_after": len(committed_parts(spec.output)),
            "results_files_before": files_before,
            "results_files_after_default_retention": files_kept,
            "results_files_after_retention_0": count_results_files(spec.output),
            "table_files_before": table_files_before,
            "table_files_after": kept.table.files_after,
            "table_files_after_retention_0": table_files(),
            "table_files_deleted": kept.table.vacuumed + purge.table.vacuumed,
            "compaction_flow_wall_seconds": round(seconds, 2),
            "compaction_seconds_in_flow": round(kept.seconds, 2),
            "purge_with_retention_0_seconds": round(purge.seconds, 2),
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    table = "| measure | value |\n|---|---:|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows.items())
    (args.out / "results.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
