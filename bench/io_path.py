"""The I/O path: how close does the pipeline come to a plain script that reads the files and writes the Parquet?

    python bench/io_path.py [--sizes 10000 100000] [--shard-size 256] [--max-workers 2]

For each size N, N small local text documents are written, then two programs run, each in a fresh subprocess:

- the real flow, `process_documents`, with the small model replaced by an instant engine (bench/memory_flat.py's
  NullEngine: a fixed label at confidence 1.0, FOR THIS BENCHMARK ONLY), so what is timed is discovery, state,
  plan, reading, parsing, routing, Parquet, ledger, manifest and Prefect's orchestration of one task per shard;
- a plain script doing the least that gives the same output: walk the folder, read every file, decode it, hash
  it, and write the same Parquet (the flow's own Arrow result schema, one file per `shard_size` rows, zstd) with
  pyarrow — no state, no ledger, no orchestration, no error handling.

Both are timed after their imports (and, for the flow, after the ephemeral Prefect API has started); peak RSS is
each process's VmHWM. Target (issue 7): the flow at least 0.5x the plain script's docs/s, with flat memory.
Results: a Markdown table on stdout, bench/results/io_path/results.{md,json}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory_flat import (  # the sibling benchmark: its corpus, job and instant-engine flow child
    NULL_ENGINE_NOTE,
    _status_kib,
    child_env,
    job_yaml,
    machine,
    measure,
    write_corpus,
)
from publish import machine_line, publish  # bench/publish.py

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "io_path"


# ---------------------------------------------------------------- child: the plain script


def run_plain(job: Path, result_path: Path) -> None:
    """Read every .txt file under the job's source and write result-schema Parquet with pyarrow, nothing else."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from docroute.schemas.load import load_job
    from docroute.schemas.rows import result_schema

    spec = load_job(job)
    assert spec.task.classify is not None
    schema = result_schema(spec)
    label = spec.task.classify.labels[0].name
    output = Path(spec.output.url) / "plain"
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    paths = sorted(
        str(Path(folder) / name)
        for folder, _, names in os.walk(spec.source.url)
        for name in names
        if name.endswith(".txt")
    )
    for part, first in enumerate(range(0, len(paths), spec.shard_size)):
        chunk = paths[first : first + spec.shard_size]
        raw = [Path(path).read_bytes() for path in chunk]
        texts = [data.decode("utf-8") for data in raw]
        n = len(chunk)
        now = datetime.now(UTC)
        columns = {
            "doc_id": [hashlib.sha256(path.encode()).hexdigest()[:32] for path in chunk],
            "source_uri": chunk,
            "content_sha256": [hashlib.sha256(data).hexdigest() for data in raw],
            "processed_at": [now] * n,
            "route": ["small"] * n,
            "label": [label] * n,
            "label_confidence": [1.0] * n,
            "input_chars": [len(text) for text in texts],
        }
        arrays = [
            pa.array(columns[field.name], type=field.type) if field.name in columns else pa.nulls(n, field.type)
            for field in schema
        ]
        pq.write_table(pa.Table.from_arrays(arrays, schema=schema), output / f"part-{part:05d}.parquet")
    seconds = time.perf_counter() - started
    result = {"seconds": seconds, "documents": len(paths), "peak_rss_kib": _status_kib("self", "VmHWM")}
    result_path.write_text(json.dumps(result), encoding="utf-8")


# ---------------------------------------------------------------- parent


@dataclass
class Comparison:
    documents: int
    shard_size: int
    flow_seconds: float
    flow_docs_per_second: float
    flow_peak_rss_mib: float
    plain_seconds: float
    plain_docs_per_second: float
    plain_peak_rss_mib: float

    @property
    def ratio(self) -> float:
        return self.flow_docs_per_second / self.plain_docs_per_second


def measure_plain(n: int, shard_size: int, timeout: float) -> tuple[float, float]:
    """Seconds and peak RSS (MiB) of the plain script on a fresh corpus of N documents."""
    with tempfile.TemporaryDirectory(prefix=f"docroute-io-plain-{n}-") as scratch_name:
        scratch = Path(scratch_name)
        write_corpus(scratch / "docs", n)
        job = scratch / "job.yaml"
        job.write_text(job_yaml(scratch / "docs", scratch / "out", shard_size, 1), encoding="utf-8")
        result = scratch / "plain.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--plain", str(job), "--result", str(result)]
        run = subprocess.run(
            command, env=child_env(scratch / "home"), capture_output=True, text=True, timeout=timeout, check=False
        )
        if run.returncode != 0:
            raise SystemExit(f"the plain script failed:\n{run.stderr[-3000:]}")
        numbers = json.loads(result.read_text(encoding="utf-8"))
    if numbers["documents"] != n:
        raise SystemExit(f"the plain script read {numbers['documents']} documents, expected {n}")
    return numbers["seconds"], numbers["peak_rss_kib"] / 1024


def markdown(rows: Sequence[Comparison], info: dict[str, object], command: str) -> str:
    lines = [
        f"{machine_line(info, command)} Fresh process per program and size; {NULL_ENGINE_NOTE}.",
        "",
        "| N documents | shard size | flow s | flow docs/s | plain s | plain docs/s | flow / plain | "
        "flow peak RSS MiB | plain peak RSS MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r.documents:,} | {r.shard_size} | {r.flow_seconds:,.1f} | {r.flow_docs_per_second:,.0f} "
        f"| {r.plain_seconds:,.1f} | {r.plain_docs_per_second:,.0f} | {r.ratio:.2f} "
        f"| {r.flow_peak_rss_mib:,.0f} | {r.plain_peak_rss_mib:,.0f} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--max-workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--plain", type=Path, help=argparse.SUPPRESS)  # internal: run the plain script on a job
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--no-append", action="store_true", help="do not append the table to BENCHMARKS.md")
    options = parser.parse_args(argv)
    if options.plain is not None:
        run_plain(options.plain, options.result)
        return
    command = (
        f"python bench/io_path.py --sizes {' '.join(map(str, options.sizes))} --shard-size {options.shard_size} "
        f"--max-workers {options.max_workers}"
    )
    rows: list[Comparison] = []
    for n in options.sizes:
        plain_seconds, plain_peak = measure_plain(n, options.shard_size, options.timeout)
        flow = measure(n, options.shard_size, options.max_workers, options.timeout)
        row = Comparison(
            documents=n,
            shard_size=options.shard_size,
            flow_seconds=flow.flow_seconds,
            flow_docs_per_second=flow.docs_per_second,
            flow_peak_rss_mib=flow.peak_rss_mib,
            plain_seconds=plain_seconds,
            plain_docs_per_second=n / plain_seconds,
            plain_peak_rss_mib=plain_peak,
        )
        print(
            f"N={n:,}: flow {row.flow_docs_per_second:,.0f} docs/s, plain {row.plain_docs_per_second:,.0f} docs/s, "
            f"ratio {row.ratio:.2f}",
            flush=True,
        )
        rows.append(row)
    info = machine()
    table = markdown(rows, info, command)
    print()
    print(table)
    payload = {"machine": info, "command": command, "rows": [asdict(r) | {"ratio": r.ratio} for r in rows]}
    publish(options.results, "I/O path: flow vs plain script", table, payload, append=not options.no_append)


if __name__ == "__main__":
    main()
