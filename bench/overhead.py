"""Pipeline overhead: the same documents through `process_documents` vs the same engine called in a plain loop.

    python bench/overhead.py [--documents 400] [--shard-size 64] [--max-workers 2]

One process, one engine (the embedded llama.cpp Gemma 3 270M, built once and shared — the flow's shards find it
in the per-process engine cache, so model loading is outside both timings):

1. raw, batched: `engine.predict(shard)` for each shard of the documents' texts, in a plain loop;
2. raw, one by one: `engine.predict([document])` per document (the batching gain, issue 7 item 4);
3. the flow: `process_documents(job, full_refresh=True)` on the same files — listing, state, plan, reading and
   parsing, the model, routing, Parquet, ledger, manifest, and Prefect's task runs (its API already started).

The raw runs are repeated after the flow and averaged, so drift (thermal, other load) shows. Documents are
BANKING77 messages from ../shared/datasets when present (the demo's bundled sample otherwise), classified into the
demo job's six intents by the embedding head. Target (issue 7): flow wall time <= 1.10 x raw batched engine time.
Results: a Markdown table on stdout, bench/results/overhead/results.{md,json}.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory_flat import _start_prefect_server, machine  # the sibling benchmark's helpers
from publish import machine_line, publish  # bench/publish.py

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "datasets"
RESULTS = ROOT / "bench" / "results" / "overhead"


def texts(n: int) -> tuple[list[str], str]:
    """N distinct messages and where they come from."""
    banking = SHARED / "banking77" / "train.csv"
    if banking.exists():
        with banking.open(encoding="utf-8") as handle:
            rows = [row["text"] for row in csv.DictReader(handle)]
        step = max(1, len(rows) // n)  # spread over the intents rather than the first few
        return rows[::step][:n], "BANKING77 train (../shared/datasets)"
    bundled = sorted((ROOT / "examples" / "data" / "support").rglob("*.txt"))
    messages = [path.read_text(encoding="utf-8").strip() for path in bundled]
    return [f"{messages[i % len(messages)]} (#{i})" for i in range(n)], "the demo's bundled sample, repeated"


def job_file(scratch: Path, source: Path, shard_size: int, max_workers: int) -> Path:
    """The demo classification job, reading `source` and writing under `scratch`."""
    import yaml

    spec = yaml.safe_load((ROOT / "examples" / "demo_classify.yaml").read_text(encoding="utf-8"))
    spec["source"] = {"url": str(source), "glob": "**/*.txt"}
    spec["task"]["classify"]["examples_file"] = str(ROOT / "examples" / "data" / "support_examples.csv")
    spec["output"] = {"url": str(scratch / "out")}
    spec["shard_size"] = shard_size
    spec["runner"] = {"max_workers": max_workers}
    job = scratch / "job.yaml"
    job.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return job


def timed_raw(engine, batches: Sequence[Sequence[object]]) -> float:
    started = time.perf_counter()
    for batch in batches:
        engine.predict(batch)
    return time.perf_counter() - started


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--documents", type=int, default=400)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--max-workers", type=int, default=2)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--no-append", action="store_true", help="do not append the table to BENCHMARKS.md")
    options = parser.parse_args(argv)

    # a private Prefect home (a fresh database) and the ephemeral API, set before Prefect is imported
    home = Path(tempfile.mkdtemp(prefix="docroute-overhead-prefect-"))
    os.environ.pop("PREFECT_API_URL", None)
    os.environ.pop("PREFECT_PROFILE", None)
    os.environ.update({"PREFECT_HOME": str(home), "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})

    from docroute.engines.base import Request
    from docroute.flows.process import process_documents
    from docroute.schemas.load import load_job
    from docroute.tasks.ingest.read import document_id
    from docroute.tasks.model.infer import small_engine

    messages, origin = texts(options.documents)
    with tempfile.TemporaryDirectory(prefix="docroute-overhead-") as scratch_name:
        scratch = Path(scratch_name)
        source = scratch / "docs"
        source.mkdir()
        paths = []
        for i, message in enumerate(messages):
            path = source / f"msg{i:05d}.txt"
            path.write_text(message + "\n", encoding="utf-8")
            paths.append(path)
        job = job_file(scratch, source, options.shard_size, options.max_workers)
        spec = load_job(job)
        started = time.perf_counter()
        engine = small_engine(spec)  # the flow's shards get this same object from the per-process cache
        build_seconds = time.perf_counter() - started
        requests = [Request(id=document_id(str(p)), text=m + "\n") for p, m in zip(paths, messages, strict=True)]
        shards = [requests[i : i + options.shard_size] for i in range(0, len(requests), options.shard_size)]
        singles = [[request] for request in requests]
        engine.predict(requests[:8])  # warm caches (first-call allocations)
        _start_prefect_server()

        warm = scratch / "warm"
        warm.mkdir()
        (warm / "one.txt").write_text(messages[0], encoding="utf-8")
        warm_yaml = (
            job.read_text(encoding="utf-8")
            .replace(str(source), str(warm))
            .replace(str(scratch / "out"), str(scratch / "warm-out"))
        )
        (scratch / "warm.yaml").write_text(warm_yaml, encoding="utf-8")
        process_documents(str(scratch / "warm.yaml"))  # one file: Prefect registers the flow and its tasks

        raw_batched = [timed_raw(engine, shards)]
        raw_single = [timed_raw(engine, singles)]
        started = time.perf_counter()
        summary = process_documents(str(job), full_refresh=True)
        flow_seconds = time.perf_counter() - started
        raw_batched.append(timed_raw(engine, shards))
        raw_single.append(timed_raw(engine, singles))
        if summary.documents != len(messages):
            raise SystemExit(f"the flow wrote {summary.documents} rows for {len(messages)} documents")

    batched = sum(raw_batched) / len(raw_batched)
    single = sum(raw_single) / len(raw_single)
    info = machine()
    command = (
        f"python bench/overhead.py --documents {options.documents} --shard-size {options.shard_size} "
        f"--max-workers {options.max_workers}"
    )
    n = len(messages)
    table = "\n".join(
        [
            f"{machine_line(info, command)} Engine: {engine.name} (built in {build_seconds:.1f} s, outside "
            f"every timing); documents: {n} from {origin}.",
            "",
            "| run | wall s | docs/s | vs raw batched |",
            "|---|---:|---:|---:|",
            f"| raw engine, one call per shard of {options.shard_size} (mean of 2: "
            f"{raw_batched[0]:.1f}, {raw_batched[1]:.1f}) | {batched:.1f} | {n / batched:,.1f} | 1.00 |",
            f"| raw engine, one call per document (mean of 2: {raw_single[0]:.1f}, {raw_single[1]:.1f}) "
            f"| {single:.1f} | {n / single:,.1f} | {single / batched:.2f} |",
            f"| `process_documents` (full refresh, {len(summary.parts)} shards, max_workers {options.max_workers}) "
            f"| {flow_seconds:.1f} | {n / flow_seconds:,.1f} | {flow_seconds / batched:.2f} |",
        ]
    )
    print(table)
    payload = {
        "machine": info,
        "command": command,
        "documents": n,
        "origin": origin,
        "engine": engine.name,
        "engine_build_seconds": build_seconds,
        "raw_batched_seconds": raw_batched,
        "raw_single_seconds": raw_single,
        "flow_seconds": flow_seconds,
        "flow_over_raw": flow_seconds / batched,
    }
    publish(options.results, "Pipeline overhead", table, payload, append=not options.no_append)


if __name__ == "__main__":
    main()
