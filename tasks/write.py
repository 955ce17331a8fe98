"""Write Parquet and JSON files to the output through fsspec, atomically where the filesystem allows.

Part files are named by run and shard, so a retried shard overwrites its own part instead of adding a second one.
On a local disk a file is written under a temporary name and renamed; an object store's PUT is already atomic.
"""

from __future__ import annotations

import json
import posixpath
import uuid
from datetime import date
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from docroute.schemas.spec import OutputSpec


def results_part_url(output: OutputSpec, run_date: date, run_id: str, shard_index: int) -> str:
    return f"{output.url}/results/run_date={run_date.isoformat()}/part-{run_id}-{shard_index:05d}.parquet"


def errors_part_url(output: OutputSpec, run_date: date, run_id: str, shard_index: int) -> str:
    """Where a shard's error rows are copied for triage."""
    return f"{output.url}/errors/run_date={run_date.isoformat()}/errors-{run_id}-{shard_index:05d}.parquet"


def batch_part_url(output: OutputSpec, run_date: date, run_id: str, batch_id: str) -> str:
    """Where a run writes the rows a collected frontier batch answered."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in batch_id)
    return f"{output.url}/results/run_date={run_date.isoformat()}/part-{run_id}-batch-{safe}.parquet"


def _atomic_write(output: OutputSpec, url: str, payload: bytes) -> None:
    fs, path = url_to_fs(url, **output.fsspec_options())
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        temporary = f"{posixpath.dirname(path)}/.{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp"
        with fs.open(temporary, "wb") as handle:
            handle.write(payload)
        fs.mv(temporary, path)
    else:
        with fs.open(path, "wb") as handle:
            handle.write(payload)


def write_parquet(output: OutputSpec, url: str, table: pa.Table) -> None:
    """Write one Parquet file; statistics and dictionary encoding on, compression from the spec."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=None if output.compression == "none" else output.compression)
    _atomic_write(output, url, sink.getvalue().to_pybytes())


def part_exists(output: OutputSpec, url: str) -> bool:
    fs, path = url_to_fs(url, **output.fsspec_options())
    return bool(fs.exists(path))


def read_parquet(output: OutputSpec, url: str) -> pa.Table:
    fs, path = url_to_fs(url, **output.fsspec_options())
    with fs.open(path, "rb") as handle:
        return pq.read_table(handle)


def write_json(output: OutputSpec, url: str, payload: dict[str, Any]) -> None:
    _atomic_write(output, url, json.dumps(payload, indent=2, sort_keys=True, default=str).encode())
