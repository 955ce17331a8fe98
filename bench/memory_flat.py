"""Peak memory of the pipeline against corpus size: does a 10x larger corpus need 10x the RAM?

    python bench/memory_flat.py [--sizes 10000 100000] [--shard-size 256] [--max-workers 2] [--second-run]

The flow keeps at most `runner.max_workers` shards in flight (flows/process.py), so its memory should be bounded by
the window, not by the corpus. This benchmark checks that claim end to end: for each size N it writes N small text
documents to a temporary folder, writes a classification job (no frontier) and runs the real flow,
`docroute.flows.process.process_documents`, in a FRESH subprocess, so each peak is independent of the previous size
(a process's peak RSS never goes down, and Python rarely hands freed memory back to the OS).

THE MODEL IS REPLACED BY A NULL ENGINE: pipeline overhead only. Answering 100,000 documents with the embedded
llama.cpp model would take hours on 2 cores, and its memory (weights, KV cache) is a constant that says nothing
about scaling. The child patches `small_engine` with `NullEngine` (defined below), which answers every request with
the job's first label at confidence 1.0, so every row is routed `small`. What is measured is everything else:
listing, state and plan, reading and parsing, building rows, Parquet writing, the ledger and manifest, and Prefect's
orchestration of one task run per shard.

Measured per size (Linux):
- peak RSS of the flow process: `VmHWM`, read by the child itself after the flow returns (`ru_maxrss` of
  RUSAGE_CHILDREN in this parent is a maximum over *all* children so far, so it could not separate the sizes);
- peak RSS of the ephemeral Prefect API server the flow starts as its own subprocess (its `VmHWM`, read by the
  child before it exits), shown apart because a deployment usually talks to a long-lived server instead;
- RSS after imports and server start-up, before the flow: the fixed floor every run pays;
- wall time of the `process_documents` call alone (server start-up excluded) and docs/s;
- rows written: `<out>/results/**/*.parquet` read back with polars; the benchmark fails unless rows == unique
  doc_ids == N and the null engine answered N requests (so the patch really took effect).

With `--second-run`, each size then runs the flow again in another fresh process over the same output after a
night's changes to the source (every 10th file rewritten, every 100th deleted, 1% new files): the incremental run,
whose state step joins the whole listing with the whole previous state and merges the next state (a first run has
no previous state to join). Its peak RSS and wall time are reported beside the first run's; the benchmark fails
unless it processed exactly the changed and new files and listed what the source holds.

Every child gets its own PREFECT_HOME (a fresh database) and no PREFECT_API_URL, so runs never share a server.
Results: a Markdown table on stdout and in bench/results/memory/results.md, raw numbers in results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from publish import machine_info  # bench/publish.py

if TYPE_CHECKING:
    from docroute.engines.base import Engine, Prediction, Request

machine = machine_info  # the sibling benchmarks import it from here (bench/publish.py has the one definition)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "memory"
NULL_ENGINE_NOTE = "model replaced by a null engine: pipeline overhead only"
DOCS_PER_FOLDER = 1000  # a realistic tree rather than one folder of 100k entries

SENTENCES = (
    "The striker scored twice as the home side won the cup final in extra time.",
    "Heavy rain and strong winds are expected across the coast tonight, with snow on the hills.",
    "Whisk the eggs with sugar, fold in the flour and bake the cake for thirty minutes.",
    "The tennis champion lost in straight sets at the open.",
    "Thunderstorms may cause flooding in low-lying areas tomorrow.",
    "Knead the dough and let it rise for an hour before baking.",
)
LABELS = ("sports", "weather", "cooking")


# ---------------------------------------------------------------- child: the flow with a null engine


class NullEngine:
    """A stand-in for the small model that costs nothing: every request gets one fixed label at confidence 1.0.

    It exists so the benchmark measures the pipeline around the model, not the model. It counts the requests it
    answered so the parent can check the patch was really used by the shard code.
    """

    name = "null-engine"

    def __init__(self, label: str) -> None:
        self.label = label
        self.requests = 0
        self._lock = threading.Lock()  # shards run on worker threads

    def predict(self, batch: Sequence[Request]) -> list[Prediction]:
        from docroute.engines.base import Prediction

        with self._lock:
            self.requests += len(batch)
        return [Prediction(id=r.id, model=self.name, label=self.label, label_confidence=1.0) for r in batch]

    def close(self) -> None:
        """Nothing to release."""


def _status_kib(pid: int | str, key: str) -> int | None:
    """A `VmHWM`/`VmRSS` line of /proc/<pid>/status in KiB, or None off Linux or once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _descendants(pid: int) -> list[int]:
    """Every live descendant of a process (Linux /proc), to find the ephemeral Prefect server."""
    found: list[int] = []
    try:
        threads = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for thread in threads:
        try:
            children = [int(c) for c in (thread / "children").read_text().split()]
        except (OSError, ValueError):
            continue
        for child in children:
            found += [child, *_descendants(child)]
    return found


def _start_prefect_server() -> None:
    """Start the ephemeral API server now, so its start-up (and database migrations) stays out of the timing.

    The client finds the same singleton later (prefect/client/orchestration: `SubprocessASGIServer()`); with an
    explicit PREFECT_API_URL there is nothing to start.
    """
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return
    from prefect.server.api.server import SubprocessASGIServer

    SubprocessASGIServer().start()


def run_child(job: Path, result_path: Path) -> None:
    """Patch the small model out, run the real flow once, and write what this process measured to `result_path`."""
    from docroute.flows.process import process_documents
    from docroute.schemas.load import load_job
    from docroute.schemas.spec import JobSpec
    from docroute.tasks import shard
    from docroute.tasks.model import infer

    spec = load_job(job)
    assert spec.task.classify is not None, "the benchmark job is a classification job"
    engine = NullEngine(spec.task.classify.labels[0].name)

    def null_small_engine(_spec: JobSpec, _head_version: str | None = None) -> Engine:
        return engine

    # tasks/shard.py does `from docroute.tasks.model.infer import small_engine`: its own name is what shards call
    shard.small_engine = null_small_engine
    infer.small_engine = null_small_engine

    _start_prefect_server()
    rss_before = _status_kib("self", "VmRSS")
    started = time.perf_counter()
    summary = process_documents(str(job))
    seconds = time.perf_counter() - started
    server_peaks = [p for p in (_status_kib(pid, "VmHWM") for pid in _descendants(os.getpid())) if p]
    result = {
        "flow_seconds": seconds,
        "rss_before_flow_kib": rss_before,
        "peak_rss_kib": _status_kib("self", "VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "server_peak_rss_kib": max(server_peaks) if server_peaks else None,
        "null_engine_requests": engine.requests,
        "listed": summary.listed,
        "up_to_date": summary.up_to_date,
        "parts": len(summary.parts),
    }
    result_path.write_text(json.dumps(result), encoding="utf-8")


# ---------------------------------------------------------------- parent: corpora, jobs, subprocesses, table


@dataclass
class Measurement:
    """One size's numbers, as printed and stored."""

    documents: int
    shard_size: int
    max_workers: int
    peak_rss_mib: float
    rss_before_flow_mib: float | None
    server_peak_rss_mib: float | None
    flow_seconds: float
    docs_per_second: float
    rows_written: int
    unique_doc_ids: int
    generate_seconds: float
    child_seconds: float
    second_peak_rss_mib: float | None = None  # --second-run: the incremental run after the source changed
    second_flow_seconds: float | None = None
    second_processed: int | None = None


def write_corpus(folder: Path, n: int, *, start: int = 0) -> None:
    """Short, distinct .txt documents numbered start..n-1, DOCS_PER_FOLDER to a sub-folder."""
    for i in range(start, n):
        sub = folder / f"d{i // DOCS_PER_FOLDER:04d}"
        if i % DOCS_PER_FOLDER == 0 or i == start:
            sub.mkdir(parents=True, exist_ok=True)
        text = f"Item {i}. {SENTENCES[i % len(SENTENCES)]} {SENTENCES[(i * 7 + 3) % len(SENTENCES)]}\n"
        (sub / f"doc{i:07d}.txt").write_text(text, encoding="utf-8")


def change_corpus(folder: Path, n: int) -> tuple[int, int, int]:
    """A night's changes: every 10th file rewritten, every 100th deleted, 1% new files; (changed, deleted, added)."""
    changed = deleted = 0
    for i in range(n):
        path = folder / f"d{i // DOCS_PER_FOLDER:04d}" / f"doc{i:07d}.txt"
        if i % 100 == 1:
            path.unlink()
            deleted += 1
        elif i % 10 == 0:
            path.write_text(f"Item {i}, revised. {SENTENCES[(i + 1) % len(SENTENCES)]}\n", encoding="utf-8")
            changed += 1
    added = max(1, n // 100)
    write_corpus(folder, n + added, start=n)
    return changed, deleted, added


def job_yaml(source: Path, output: Path, shard_size: int, max_workers: int, *, table: bool = True) -> str:
    """A classification job in the shape of tests/corpus.py's `topic_job_yaml`, without a frontier; `table=False`
    turns the current table off (to see its share of the memory)."""
    labels = "\n".join(f"      - name: {name}\n        description: texts about {name}" for name in LABELS)
    return f"""name: bench-memory-flat
source:
  url: {source}
  glob: "**/*.txt"
task:
  instructions: Short news and recipe snippets.
  classify:
    labels:
{labels}
small_model:
  engine: llamacpp   # never loaded: the benchmark's child replaces the small model by a null engine
routing:
  threshold: 0.8
output:
  url: {output}
  table: {{enabled: {"true" if table else "false"}}}
shard_size: {shard_size}
runner:
  max_workers: {max_workers}
"""


def count_rows(output: Path) -> tuple[int, int]:
    """Rows and distinct doc_ids across the written result parts."""
    import polars as pl

    frame = (
        pl.scan_parquet(str(output / "results" / "**" / "*.parquet"))
        .select(pl.len().alias("rows"), pl.col("doc_id").n_unique().alias("ids"))
        .collect()
    )
    return int(frame["rows"][0]), int(frame["ids"][0])


def child_env(prefect_home: Path) -> dict[str, str]:
    """No analytics, a private Prefect home (fresh database) and the ephemeral local API."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_PROFILE")}
    env.update(
        {
            "DO_NOT_TRACK": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_HOME": str(prefect_home),
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",  # 2 busy cores: migrations can be slow
        }
    )
    return env


def run_flow(job: Path, scratch: Path, name: str, n: int, timeout: float) -> tuple[dict[str, Any], float]:
    """One run of the flow in a fresh subprocess with its own Prefect home: what it measured, and its wall time."""
    result_path, log_path = scratch / f"{name}.json", scratch / f"{name}.log"
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(job), "--result", str(result_path)]
    started = time.perf_counter()
    with log_path.open("w", encoding="utf-8") as log:
        env = child_env(scratch / f"prefect-home-{name}")
        run = subprocess.run(command, check=False, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    seconds = time.perf_counter() - started
    if run.returncode != 0 or not result_path.exists():
        text = log_path.read_text(encoding="utf-8", errors="replace")
        first = text.find("Traceback")  # the first error, not the shutdown noise that follows it
        shown = text[first : first + 6000] if first >= 0 else text[-4000:]
        raise SystemExit(f"N={n}: the {name} flow subprocess failed (exit {run.returncode}); its log:\n{shown}")
    return json.loads(result_path.read_text(encoding="utf-8")), seconds


def measure(
    n: int, shard_size: int, max_workers: int, timeout: float, *, second_run: bool = False, table: bool = True
) -> Measurement:
    """Generate the corpus, run the flow in a fresh subprocess and check every document became exactly one row;
    with `second_run`, change the corpus and run the flow again over the same output."""
    second: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix=f"docroute-memflat-{n}-") as scratch_name:
        scratch = Path(scratch_name)
        source, output = scratch / "docs", scratch / "out"
        started = time.perf_counter()
        write_corpus(source, n)
        generated = time.perf_counter() - started
        job = scratch / "job.yaml"
        job.write_text(job_yaml(source, output, shard_size, max_workers, table=table), encoding="utf-8")
        child, child_seconds = run_flow(job, scratch, "first", n, timeout)
        rows, ids = count_rows(output)
        if second_run:
            changed, deleted, added = change_corpus(source, n)
            second, _ = run_flow(job, scratch, "second", n, timeout)
            expected = (changed + added, n - deleted + added, n - deleted - changed)
            got = (second["null_engine_requests"], second["listed"], second["up_to_date"])
            if got != expected:
                raise SystemExit(f"N={n}, second run: (processed, listed, up to date) = {got}, expected {expected}")
    if rows != n or ids != n or child["null_engine_requests"] != n:
        raise SystemExit(
            f"N={n}: {rows} rows, {ids} unique doc_ids, {child['null_engine_requests']} null-engine requests; "
            f"expected {n} of each"
        )
    mib = 1024.0
    return Measurement(
        documents=n,
        shard_size=shard_size,
        max_workers=max_workers,
        peak_rss_mib=child["peak_rss_kib"] / mib,
        rss_before_flow_mib=child["rss_before_flow_kib"] / mib if child["rss_before_flow_kib"] else None,
        server_peak_rss_mib=child["server_peak_rss_kib"] / mib if child["server_peak_rss_kib"] else None,
        flow_seconds=child["flow_seconds"],
        docs_per_second=n / child["flow_seconds"],
        rows_written=rows,
        unique_doc_ids=ids,
        generate_seconds=generated,
        child_seconds=child_seconds,
        second_peak_rss_mib=second["peak_rss_kib"] / mib if second else None,
        second_flow_seconds=second["flow_seconds"] if second else None,
        second_processed=second["null_engine_requests"] if second else None,
    )


def _mib(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"


def markdown(measurements: Sequence[Measurement], info: dict[str, Any], command: str) -> str:
    """The table plus the line that says what it measures and where."""
    second = any(m.second_peak_rss_mib is not None for m in measurements)
    lines = [
        f"Machine: {info['platform']}, {info['cores']} cores ({info['processor']}), Python {info['python']}; "
        f"{info['date']}. Command: `{command}`. Each N runs in a fresh process; {NULL_ENGINE_NOTE}.",
        "",
        "| N documents | shard size | peak RSS MiB (flow process) | RSS before flow MiB | Prefect server peak MiB "
        "| wall s (flow) | docs/s | rows written |"
        + (" second run: peak RSS MiB | second run: wall s | second run: processed |" if second else ""),
        "|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if second else ""),
    ]
    lines += [
        f"| {m.documents:,} | {m.shard_size} | {_mib(m.peak_rss_mib)} | {_mib(m.rss_before_flow_mib)} "
        f"| {_mib(m.server_peak_rss_mib)} | {m.flow_seconds:,.1f} | {m.docs_per_second:,.0f} | {m.rows_written:,} |"
        + (
            f" {_mib(m.second_peak_rss_mib)} | {m.second_flow_seconds or 0:,.1f} | {m.second_processed or 0:,} |"
            if second
            else ""
        )
        for m in measurements
    ]
    ordered = sorted(measurements, key=lambda m: m.documents)
    if len(ordered) >= 2 and ordered[-1].documents > ordered[0].documents:
        small, large = ordered[0], ordered[-1]
        grown = large.peak_rss_mib - small.peak_rss_mib
        per_doc = grown * 1024 / (large.documents - small.documents)
        lines += [
            "",
            f"Peak RSS of the flow process from N={small.documents:,} to N={large.documents:,}: {grown:+,.0f} MiB "
            f"({per_doc:,.2f} KiB per extra document).",
        ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="corpus sizes N")
    parser.add_argument("--shard-size", type=int, default=256, help="documents per shard (job shard_size)")
    parser.add_argument("--max-workers", type=int, default=2, help="shards in flight (job runner.max_workers)")
    parser.add_argument(
        "--second-run", action="store_true", help="run each size again after changing the corpus (incremental run)"
    )
    parser.add_argument("--no-table", action="store_true", help="turn the current table off (its share of memory)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one size's flow subprocess may take")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for results.md and results.json")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # internal: run one job, patched
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.child is not None:
        run_child(options.child, options.result)
        return
    command = "python bench/memory_flat.py " + " ".join(
        [
            "--sizes",
            *map(str, options.sizes),
            "--shard-size",
            str(options.shard_size),
            "--max-workers",
            str(options.max_workers),
            *(["--second-run"] if options.second_run else []),
            *(["--no-table"] if options.no_table else []),
        ]
    )
    print(f"{NULL_ENGINE_NOTE}; each N in a fresh subprocess", flush=True)
    measurements = []
    for n in options.sizes:
        m = measure(
            n,
            options.shard_size,
            options.max_workers,
            options.timeout,
            second_run=options.second_run,
            table=not options.no_table,
        )
        print(
            f"N={n:,}: peak RSS {m.peak_rss_mib:,.0f} MiB, {m.flow_seconds:,.1f} s, {m.docs_per_second:,.0f} docs/s, "
            f"{m.rows_written:,} rows (corpus written in {m.generate_seconds:,.1f} s)"
            + (
                f"; second run: peak RSS {m.second_peak_rss_mib:,.0f} MiB, {m.second_flow_seconds or 0:,.1f} s"
                if m.second_peak_rss_mib is not None
                else ""
            ),
            flush=True,
        )
        measurements.append(m)
    info = machine_info()
    table = markdown(measurements, info, command)
    print()
    print(table)
    options.results.mkdir(parents=True, exist_ok=True)
    (options.results / "results.md").write_text(
        f"# Peak memory against corpus size ({NULL_ENGINE_NOTE})\n\n{table}", encoding="utf-8"
    )
    payload = {
        "machine": info,
        "command": command,
        "note": NULL_ENGINE_NOTE,
        "measurements": [asdict(m) for m in measurements],
    }
    (options.results / "results.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
