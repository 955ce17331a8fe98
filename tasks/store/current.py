"""Read the current answer of every document: the committed rows the newest state snapshot points at.

The results folder is an append-only history: a changed file gets a new row in a new part, a deferred row is
answered in a later part. The state snapshot of the newest committed manifest names, for each document, the part
holding its current row, so "current" never depends on clocks or on which files happen to be listed.
"""

from __future__ import annotations

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from docroute.schemas.spec import OutputSpec
from docroute.tasks.store.state import committed_manifests, latest_manifest, live_parts, load_state
from docroute.tasks.store.write import read_parquet


def committed_parts(output: OutputSpec) -> list[str]:
    """Every part holding committed history, oldest first: what the manifests name, less the parts a compaction
    replaced with its own files (`state.live_parts`)."""
    return live_parts(manifest for _, manifest in committed_manifests(output))


def current_rows(output: OutputSpec, *, include_deleted: bool = False) -> pl.DataFrame:
    """One row per document: its current answer, result, deferral or error.

    Documents whose file has left the source are left out, unless `include_deleted`: then they are there too,
    with the time a run first missed their file in `deleted_at` (null for the others).
    """
    state = load_state(output)
    if latest_manifest(output) is None or state is None or state.height == 0:
        return pl.DataFrame()
    if not include_deleted:
        state = state.filter(pl.col("deleted_at").is_null())
    tables = []
    for (part,), docs in state.group_by(["part_url"], maintain_order=True):
        table = read_parquet(output, str(part))
        wanted = pa.array(docs["doc_id"].to_list(), type=pa.string())
        tables.append(table.filter(pc.is_in(table["doc_id"], value_set=wanted)))
    if not tables:
        return pl.DataFrame()
    frame = pl.from_arrow(pa.concat_tables(tables, promote_options="permissive"))
    assert isinstance(frame, pl.DataFrame)
    if include_deleted:
        frame = frame.join(state.select("doc_id", "deleted_at"), on="doc_id", how="left")
    return frame
