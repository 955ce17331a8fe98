"""Object storage: requests per document and docs/s when the source and the output are on S3 (moto's server).

    python bench/s3_path.py [--sizes 2000 10000] [--shard-size 256] [--max-workers 2]

moto's S3 server runs in this process on 127.0.0.1 behind a small WSGI middleware that counts every request by
kind (LIST, GET, HEAD, PUT, POST, DELETE); the documents are uploaded with boto3 first (not counted), then the
real flow runs in a fresh subprocess with s3fs talking HTTP to it, the small model replaced by an instant engine
(bench/memory_flat.py's NullEngine, FOR THIS BENCHMARK ONLY). What S3 cannot batch is a GET per object, so the
floor is one GET per document plus a LIST per 1,000 keys; everything above that is the pipeline's own traffic
(parts, state, plan, ledger, manifest), which should be per shard or per run, never per document.

moto is a pure-Python server sharing 2 cores with the flow here, so docs/s is a floor set by moto, not by S3;
requests per document is the number that carries over. Results: bench/results/s3_path/results.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory_flat import LABELS, NULL_ENGINE_NOTE, SENTENCES, child_env, machine  # the sibling benchmark's parts
from publish import machine_line, publish  # bench/publish.py

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "s3_path"
KEY, SECRET, BUCKET = "AKIABENCH", "bench-secret", "docroute-bench"


class RequestCounter:
    """WSGI middleware counting S3 requests by kind."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method, query = environ["REQUEST_METHOD"], environ.get("QUERY_STRING", "")
        path = environ.get("PATH_INFO", "/").strip("/")
        if method == "GET" and ("/" not in path) and ("list-type" in query or "prefix" in query or not query):
            kind = "LIST"
        else:
            kind = method
        with self._lock:
            self.counts[kind] += 1
        return self.app(environ, start_response)

    def reset(self) -> Counter[str]:
        with self._lock:
            counts, self.counts = self.counts, Counter()
        return counts


def start_moto() -> tuple[str, RequestCounter]:
    """moto's S3 app behind the counter, served by werkzeug on a free port, on a daemon thread."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request on the terminal
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    counter = RequestCounter(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", port, counter, threaded=True, request_handler=MotoRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{port}", counter


def upload(endpoint: str, n: int) -> None:
    import boto3

    client = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET, region_name="us-east-1"
    )
    if BUCKET not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
        client.create_bucket(Bucket=BUCKET)
    for i in range(n):
        text = f"Item {i}. {SENTENCES[i % len(SENTENCES)]} {SENTENCES[(i * 7 + 3) % len(SENTENCES)]}\n"
        client.put_object(Bucket=BUCKET, Key=f"docs-{n}/d{i // 1000:04d}/doc{i:07d}.txt", Body=text.encode())


def job_yaml(endpoint: str, n: int, shard_size: int, max_workers: int) -> str:
    labels = "\n".join(f"      - name: {name}\n        description: texts about {name}" for name in LABELS)
    s3 = f"{{endpoint_url: '{endpoint}', region: us-east-1, key: {KEY}, secret: {SECRET}}}"
    return f"""name: bench-s3-path
source:
  url: s3://{BUCKET}/docs-{n}
  glob: "**/*.txt"
  s3: {s3}
task:
  instructions: Short news and recipe snippets.
  classify:
    labels:
{labels}
small_model:
  engine: llamacpp   # never loaded: the child replaces the small model by a null engine
output:
  url: s3://{BUCKET}/out-{n}
  s3: {s3}
shard_size: {shard_size}
runner:
  max_workers: {max_workers}
"""


@dataclass
class S3Measurement:
    documents: int
    shard_size: int
    flow_seconds: float
    docs_per_second: float
    requests: dict[str, int] = field(default_factory=dict)

    @property
    def per_document(self) -> float:
        return sum(self.requests.values()) / self.documents


def measure(endpoint: str, counter: RequestCounter, n: int, shard_size: int, max_workers: int) -> S3Measurement:
    upload(endpoint, n)
    with tempfile.TemporaryDirectory(prefix=f"docroute-s3-{n}-") as scratch_name:
        scratch = Path(scratch_name)
        job = scratch / "job.yaml"
        job.write_text(job_yaml(endpoint, n, shard_size, max_workers), encoding="utf-8")
        result = scratch / "child.json"
        memory_flat = Path(__file__).resolve().parent / "memory_flat.py"
        command = [sys.executable, str(memory_flat), "--child", str(job), "--result", str(result)]
        counter.reset()
        run = subprocess.run(
            command, env=child_env(scratch / "home"), capture_output=True, text=True, timeout=3600, check=False
        )
        counts = counter.reset()
        if run.returncode != 0:
            raise SystemExit(f"the flow failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
        child = json.loads(result.read_text(encoding="utf-8"))
    if child["null_engine_requests"] != n:
        raise SystemExit(f"{child['null_engine_requests']} documents answered, expected {n}")
    return S3Measurement(n, shard_size, child["flow_seconds"], n / child["flow_seconds"], dict(counts))


def markdown(rows: Sequence[S3Measurement], info: dict[str, object], command: str) -> str:
    kinds = sorted({kind for row in rows for kind in row.requests})
    lines = [
        f"{machine_line(info, command)} moto S3 server in the parent process; {NULL_ENGINE_NOTE}.",
        "",
        "| N documents | shard size | flow s | docs/s | requests / document | "
        + " | ".join(f"{kind}" for kind in kinds)
        + " |",
        "|---:|---:|---:|---:|---:|" + "---:|" * len(kinds),
    ]
    for row in rows:
        lines.append(
            f"| {row.documents:,} | {row.shard_size} | {row.flow_seconds:,.1f} | {row.docs_per_second:,.0f} "
            f"| {row.per_document:.3f} | " + " | ".join(f"{row.requests.get(kind, 0):,}" for kind in kinds) + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2_000, 10_000])
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--max-workers", type=int, default=2)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--no-append", action="store_true", help="do not append the table to BENCHMARKS.md")
    options = parser.parse_args(argv)
    endpoint, counter = start_moto()
    rows = []
    for n in options.sizes:
        started = time.perf_counter()
        row = measure(endpoint, counter, n, options.shard_size, options.max_workers)
        print(
            f"N={n:,}: {row.docs_per_second:,.0f} docs/s, {row.per_document:.3f} requests/doc {row.requests} "
            f"({time.perf_counter() - started:,.0f} s with the upload)",
            flush=True,
        )
        rows.append(row)
    info = machine()
    command = (
        f"python bench/s3_path.py --sizes {' '.join(map(str, options.sizes))} --shard-size {options.shard_size} "
        f"--max-workers {options.max_workers}"
    )
    table = markdown(rows, info, command)
    print()
    print(table)
    payload = {
        "machine": info,
        "command": command,
        "rows": [asdict(r) | {"per_document": r.per_document} for r in rows],
    }
    publish(options.results, "Object storage path (moto S3)", table, payload, append=not options.no_append)


if __name__ == "__main__":
    main()
