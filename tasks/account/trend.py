"""Escalation rate and cost per 1,000 documents for each router/head version, over every committed run.

The distillation loop is worth what this table shows: each `docroute train` promotion should move the escalation
rate and the bill down. It is built from the per-run ledger rows (`<output>/runs/`), of committed runs only, and
published as a table artifact so the trend is visible in the Prefect UI; a warehouse can group the same files.
"""

from __future__ import annotations

import io
from typing import Any

import polars as pl
from fsspec.core import url_to_fs

from docroute.schemas.spec import JobSpec
from docroute.tasks.store.state import committed_run_ids


def read_run_records(spec: JobSpec) -> pl.DataFrame:
    """Every committed run's ledger row (files of runs without a manifest are left out), oldest first."""
    fs, root = url_to_fs(spec.output.layout.runs_dir(), **spec.output.fsspec_options())
    fs.invalidate_cache(root)
    files = sorted(fs.glob(f"{root}/**/*.parquet")) if fs.exists(root) else []
    if not files:
        return pl.DataFrame()
    contents = fs.cat(files)  # concurrent GETs on object stores
    frames = [pl.read_parquet(io.BytesIO(contents[path])) for path in files]
    runs = pl.concat(frames, how="diagonal_relaxed")
    committed = committed_run_ids(spec.output)
    return runs.filter(pl.col("run_id").is_in(list(committed))).sort("started_at")


def version_trend(runs: pl.DataFrame) -> list[dict[str, Any]]:
    """One row per router/head version, in the order the versions were first used."""
    if runs.is_empty():
        return []
    for column in ("router_version", "head_version", "escalated"):
        if column not in runs.columns:
            runs = runs.with_columns(pl.lit(None, pl.Int64 if column == "escalated" else pl.String).alias(column))
    runs = runs.with_columns(
        pl.col("router_version").fill_null("none (job thresholds)"),
        pl.col("head_version").fill_null("from the job's examples"),
        # runs written before the escalated count existed: their frontier and deferred rows
        pl.coalesce(pl.col("escalated"), pl.col("frontier") + pl.col("deferred")).alias("escalated"),
    )
    grouped = (
        runs.group_by(["router_version", "head_version"], maintain_order=True)
        .agg(
            pl.len().alias("runs"),
            pl.col("started_at").min().alias("first_run"),
            pl.col("documents").sum(),
            pl.col("escalated").sum(),
            pl.col("cost_usd").sum(),
            pl.col("frontier_cost_usd").sum(),
        )
        .sort("first_run")
    )
    rows = []
    for row in grouped.iter_rows(named=True):
        documents = row["documents"] or 0

        def per_1k(total: float, documents: int = documents) -> float | None:
            return round(1000 * total / documents, 6) if documents else None

        rows.append(
            {
                "router_version": row["router_version"],
                "head_version": row["head_version"],
                "runs": row["runs"],
                "first_run": str(row["first_run"]),
                "documents": documents,
                "escalation_rate": round(row["escalated"] / documents, 4) if documents else None,
                "cost_per_1k_docs_usd": round(1000 * row["cost_usd"] / documents, 6) if documents else None,
                "frontier_per_1k_docs_usd": round(1000 * row["frontier_cost_usd"] / documents, 6)
                if documents
                else None,
            }
        )
    return rows
